// TopKGather kernels.
//
// 1. select: one 1024-thread block per row. A 4-pass MSD radix select (8 bits per pass) over
//    order-preserving uint32 keys finds the k-th largest key `thr` and how many keys equal to it
//    must be taken (`takeEq`: the tie rule keeps the lowest positions). A final pass streams the
//    row in ascending order and writes position i at output slot
//        (#keys > thr before i) + min(#keys == thr before i, takeEq)
//    for every kept i, using one block-wide prefix sum of packed (gt, eq) counts per tile. This
//    yields exactly the stable-descending-sort top-k, already in ascending position order, in
//    5 reads of the row and no extra memory. No cap on S or k.
// 2. gather: kept[b, j, :] = hidden[b, index[b, j], :] as a dtype-agnostic row copy with the
//    widest vector (up to 16 bytes) that the row size and pointers allow.
#include "topk_gather_kernels.h"

#include "../common/device_utils.cuh"
#include "../common/tokenskip_kernels.h"

namespace tokenskip {
namespace topk {

constexpr int kSelectThreads = 1024;
constexpr int kGroup = 4;  // consecutive scores handled by one thread per step (one float4)

// Keys of scores[4g .. 4g+3] (valid[] false past the end of the row).
__device__ __forceinline__ void loadKeys(const float* row, int64_t S, int64_t g, bool aligned, uint32_t (&key)[kGroup],
                                         bool (&valid)[kGroup]) {
    const int64_t i0 = g * kGroup;
    if (aligned && i0 + kGroup <= S) {
        const float4 v = *reinterpret_cast<const float4*>(row + i0);
        key[0] = device::orderedKey(v.x); key[1] = device::orderedKey(v.y);
        key[2] = device::orderedKey(v.z); key[3] = device::orderedKey(v.w);
#pragma unroll
        for (int j = 0; j < kGroup; ++j) valid[j] = true;
    } else {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
            valid[j] = i0 + j < S;
            key[j] = valid[j] ? device::orderedKey(row[i0 + j]) : 0u;
        }
    }
}

// Warp-aggregated shared-memory histogram increment. Router scores of one layer cluster in a few
// bins, so plain atomics would serialise up to 32 ways; lanes with equal bins add once together.
// Must be called by all 32 lanes (uniform loop trip counts guarantee it).
__device__ __forceinline__ void histAdd(uint32_t* hist, uint32_t bin, bool valid) {
    const uint32_t tag = valid ? bin : 0xffffffffu;
    const unsigned peers = __match_any_sync(0xffffffffu, tag);
    if (valid && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(hist + bin, uint32_t(__popc(peers)));
}

template <typename IdxT>
__global__ void __launch_bounds__(kSelectThreads) selectKernel(const float* __restrict__ scores, int S, int k,
                                                              IdxT* __restrict__ index) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t scratch[32];
    __shared__ uint32_t sPrefix, sRemaining;

    const int64_t b = blockIdx.x;
    const float* row = scores + b * S;  // [S]
    IdxT* out = index + b * k;          // [k]
    const int tid = threadIdx.x;

    if (k >= S) {  // everything kept: identity
        for (int i = tid; i < S; i += blockDim.x) out[i] = IdxT(i);
        return;
    }
    if (k <= 0) return;

    const bool aligned = (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
    const int64_t groups = (int64_t(S) + kGroup - 1) / kGroup;
    const int64_t steps = (groups + blockDim.x - 1) / blockDim.x;  // uniform trip count for all threads

    // ---- radix select of the k-th largest key, 8 bits per pass, most significant first
    uint32_t prefix = 0, mask = 0, remaining = uint32_t(k);  // rank of the target among keys matching prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        for (int64_t step = 0; step < steps; ++step) {
            uint32_t key[kGroup];
            bool valid[kGroup];
            loadKeys(row, S, step * blockDim.x + tid, aligned, key, valid);
#pragma unroll
            for (int j = 0; j < kGroup; ++j)
                histAdd(hist, (key[j] >> shift) & 0xffu, valid[j] && (key[j] & mask) == prefix);
        }
        __syncthreads();
        if (tid < 32) {  // warp 0 finds the digit holding the target, scanning digits high -> low
            uint32_t c[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) { c[j] = hist[255 - tid * 8 - j]; sum += c[j]; }
            uint32_t incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
                if (tid >= o) incl += y;
            }
            const uint32_t excl = incl - sum;
            if (excl < remaining && remaining <= incl) {
                uint32_t above = excl;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (above + c[j] >= remaining) {
                        sPrefix = prefix | (uint32_t(255 - tid * 8 - j) << shift);
                        sRemaining = remaining - above;
                        break;
                    }
                    above += c[j];
                }
            }
        }
        __syncthreads();
        prefix = sPrefix;
        remaining = sRemaining;
        mask |= 0xffu << shift;
    }
    const uint32_t thr = prefix;       // key of the k-th largest score
    const uint32_t takeEq = remaining; // keys == thr to keep, lowest positions first (>= 1)

    // ---- stable compaction in ascending position order
    uint32_t gtBase = 0, eqBase = 0;  // counts over the tiles already written
    for (int64_t step = 0; step < steps; ++step) {
        const int64_t g = step * blockDim.x + tid;
        uint32_t key[kGroup];
        bool valid[kGroup];
        loadKeys(row, S, g, aligned, key, valid);
        uint32_t nGt = 0, nEq = 0;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
            nGt += valid[j] && key[j] > thr;
            nEq += valid[j] && key[j] == thr;
        }
        // a tile holds <= 4096 scores, so both counts fit in 16 bits of one packed word
        uint32_t total;
        const uint32_t before = device::blockExclusiveSum((nGt << 16) | nEq, total, scratch);
        uint32_t gt = gtBase + (before >> 16), eq = eqBase + (before & 0xffffu);
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
            if (!valid[j]) continue;
            const IdxT pos = IdxT(g * kGroup + j);
            if (key[j] > thr) {
                out[gt + min(eq, takeEq)] = pos;
                ++gt;
            } else if (key[j] == thr) {
                if (eq < takeEq) out[gt + eq] = pos;
                ++eq;
            }
        }
        gtBase += total >> 16;
        eqBase += total & 0xffffu;
    }
}

// kept[r, :] = src[b, index[r], :] for every flat kept row r = b * k + j. V is the copy vector.
template <typename V, typename IdxT>
__global__ void gatherRowsKernel(const V* __restrict__ src, const IdxT* __restrict__ index, int64_t S, int64_t k,
                                 int64_t rowVecs, int64_t rows, int tprLog2, V* __restrict__ dst) {
    const int tpr = 1 << tprLog2;
    const int lane = threadIdx.x & (tpr - 1);
    const int64_t rowsPerBlock = blockDim.x >> tprLog2;
    for (int64_t r = blockIdx.x * rowsPerBlock + (threadIdx.x >> tprLog2); r < rows; r += gridDim.x * rowsPerBlock) {
        const int64_t b = r / k;
        const int64_t s = int64_t(index[r]);
        const V* srow = src + (b * S + s) * rowVecs;
        V* drow = dst + r * rowVecs;
#pragma unroll 4
        for (int64_t v = lane; v < rowVecs; v += tpr) drow[v] = srow[v];
    }
}

template <typename V, typename IdxT>
static void launchGatherAs(const void* hidden, const IdxT* index, int B, int S, int k, size_t rowBytes, void* kept,
                           cudaStream_t stream) {
    const int64_t rowVecs = int64_t(rowBytes / sizeof(V));
    const int64_t rows = int64_t(B) * k;
    const host::RowSplit split = host::rowSplit(rows, rowVecs);
    int tprLog2 = 0;
    while ((1 << tprLog2) < split.threadsPerRow) ++tprLog2;
    gatherRowsKernel<V, IdxT><<<split.blocks, 256, 0, stream>>>(static_cast<const V*>(hidden), index, S, k, rowVecs,
                                                                rows, tprLog2, static_cast<V*>(kept));
}

template <typename IdxT>
static void launchGather(const void* hidden, const IdxT* index, int B, int S, int H, int k, size_t elem, void* kept,
                         cudaStream_t stream) {
    const size_t rowBytes = size_t(H) * elem;
    const void* ptrs[2] = {hidden, kept};
    switch (host::vectorBytes(rowBytes, ptrs, 2)) {
    case 16: launchGatherAs<uint4>(hidden, index, B, S, k, rowBytes, kept, stream); break;
    case 8: launchGatherAs<uint2>(hidden, index, B, S, k, rowBytes, kept, stream); break;
    case 4: launchGatherAs<uint32_t>(hidden, index, B, S, k, rowBytes, kept, stream); break;
    case 2: launchGatherAs<uint16_t>(hidden, index, B, S, k, rowBytes, kept, stream); break;
    default: launchGatherAs<uint8_t>(hidden, index, B, S, k, rowBytes, kept, stream); break;
    }
}

static bool badShape(int B, int S, int H, int k) { return B < 0 || S < 0 || H < 0 || k < 0 || k > S; }

cudaError_t launchSelect(const float* scores, int B, int S, int k, IndexKind ik, void* index, cudaStream_t stream) {
    if (badShape(B, S, 0, k)) return cudaErrorInvalidValue;
    if (B == 0 || k == 0) return cudaSuccess;
    if (ik == IndexKind::kI32)
        selectKernel<int32_t><<<B, kSelectThreads, 0, stream>>>(scores, S, k, static_cast<int32_t*>(index));
    else
        selectKernel<int64_t><<<B, kSelectThreads, 0, stream>>>(scores, S, k, static_cast<int64_t*>(index));
    return cudaGetLastError();
}

cudaError_t launchTopKGather(ElemKind ek, IndexKind ik, const void* hidden, const float* scores, int B, int S, int H,
                             int k, void* kept, void* index, void* /*workspace*/, cudaStream_t stream) {
    if (badShape(B, S, H, k)) return cudaErrorInvalidValue;
    cudaError_t err = launchSelect(scores, B, S, k, ik, index, stream);
    if (err != cudaSuccess || B == 0 || k == 0 || H == 0) return err;
    if (ik == IndexKind::kI32)
        launchGather(hidden, static_cast<const int32_t*>(index), B, S, H, k, elemBytes(ek), kept, stream);
    else
        launchGather(hidden, static_cast<const int64_t*>(index), B, S, H, k, elemBytes(ek), kept, stream);
    return cudaGetLastError();
}

size_t workspaceSize(int, int, int, int) { return 0; }

} // namespace topk
} // namespace tokenskip

// ------------------------------------------------------------------------------ C entry points
using tokenskip::ElemKind;
using tokenskip::IndexKind;

TOKENSKIP_API int64_t tokenskip_keep_count(int64_t S, int64_t keep_num, int64_t keep_den, int64_t min_keep) {
    return tokenskip::keepCount(S, keep_num, keep_den, min_keep);
}

TOKENSKIP_API size_t tokenskip_topk_gather_workspace_size(int B, int S, int H, int k) {
    return tokenskip::topk::workspaceSize(B, S, H, k);
}

TOKENSKIP_API int tokenskip_topk_select_i32(const float* scores, int B, int S, int k, int32_t* index, void*,
                                            cudaStream_t stream) {
    return int(tokenskip::topk::launchSelect(scores, B, S, k, IndexKind::kI32, index, stream));
}
TOKENSKIP_API int tokenskip_topk_select_i64(const float* scores, int B, int S, int k, int64_t* index, void*,
                                            cudaStream_t stream) {
    return int(tokenskip::topk::launchSelect(scores, B, S, k, IndexKind::kI64, index, stream));
}

#define TOKENSKIP_TOPK_ENTRY(NAME, T, EK, IT, IK)                                                                   \
    TOKENSKIP_API int NAME(const T* hidden, const float* scores, int B, int S, int H, int k, T* kept, IT* index,   \
                           void* workspace, cudaStream_t stream) {                                                  \
        return int(tokenskip::topk::launchTopKGather(EK, IK, hidden, scores, B, S, H, k, kept, index, workspace,   \
                                                     stream));                                                      \
    }
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f32_i32, float, ElemKind::kF32, int32_t, IndexKind::kI32)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f32_i64, float, ElemKind::kF32, int64_t, IndexKind::kI64)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f16_i32, __half, ElemKind::kF16, int32_t, IndexKind::kI32)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f16_i64, __half, ElemKind::kF16, int64_t, IndexKind::kI64)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_bf16_i32, __nv_bfloat16, ElemKind::kBF16, int32_t, IndexKind::kI32)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_bf16_i64, __nv_bfloat16, ElemKind::kBF16, int64_t, IndexKind::kI64)
#undef TOKENSKIP_TOPK_ENTRY
