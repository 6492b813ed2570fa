// TopKGather: selection (topk_select.cu), then the row gather
// kept[b, j, :] = hidden[b, index[b, j], :] as a dtype-agnostic row copy with the widest vector (up
// to 16 bytes) that the row size and pointers allow; and the C entry points of both.
#include "topk_gather_kernels.h"

#include "../common/device_utils.cuh"
#include "../common/tokenskip_kernels.h"

namespace tokenskip {
namespace topk {

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
    gatherRowsKernel<V, IdxT><<<split.blocks, 256, 0, stream>>>(static_cast<const V*>(hidden), index, S, k, rowVecs,
                                                                rows, split.tprLog2, static_cast<V*>(kept));
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

cudaError_t launchTopKGather(ElemKind ek, IndexKind ik, const void* hidden, const float* scores, const uint8_t* valid,
                             int B, int S, int H, Keep keep, void* kept, void* index, void* workspace,
                             cudaStream_t stream) {
    if (B < 0 || S < 0 || H < 0 || !validKeep(keep)) return cudaErrorInvalidValue;
    cudaError_t err = launchSelect(scores, valid, B, S, keep, SelectAlgo::kAuto, ik, index, workspace, stream);
    const int64_t k = keepCount(S, keep);
    if (err != cudaSuccess || B == 0 || k == 0 || H == 0) return err;
    if (ik == IndexKind::kI32)
        launchGather(hidden, static_cast<const int32_t*>(index), B, S, H, int(k), elemBytes(ek), kept, stream);
    else
        launchGather(hidden, static_cast<const int64_t*>(index), B, S, H, int(k), elemBytes(ek), kept, stream);
    return cudaGetLastError();
}

} // namespace topk
} // namespace tokenskip

// ------------------------------------------------------------------------------ C entry points
using tokenskip::ElemKind;
using tokenskip::IndexKind;
using tokenskip::Keep;
using tokenskip::topk::SelectAlgo;

TOKENSKIP_API int64_t tokenskip_keep_count(int64_t S, int64_t keep_num, int64_t keep_den, int64_t min_keep) {
    return tokenskip::keepCount(S, Keep{keep_num, keep_den, min_keep});
}

TOKENSKIP_API size_t tokenskip_topk_gather_workspace_size(int B, int S) {
    return tokenskip::topk::selectWorkspaceSize(B, S);
}

TOKENSKIP_API int tokenskip_topk_select_uses_multi_block(int B, int S) {
    return tokenskip::topk::useMultiBlock(B, S) ? 1 : 0;
}

#define TOKENSKIP_SELECT_ENTRY(NAME, IT, IK)                                                                        \
    TOKENSKIP_API int NAME(const float* scores, const bool* valid, int B, int S, int64_t keep_num, int64_t keep_den, \
                           int64_t min_keep, int algo, IT* index, void* workspace, cudaStream_t stream) {           \
        if (algo < 0 || algo > 2) return int(cudaErrorInvalidValue);                                               \
        return int(tokenskip::topk::launchSelect(scores, reinterpret_cast<const uint8_t*>(valid), B, S,             \
                                                 Keep{keep_num, keep_den, min_keep}, SelectAlgo(algo), IK, index,   \
                                                 workspace, stream));                                               \
    }
TOKENSKIP_SELECT_ENTRY(tokenskip_topk_select_i32, int32_t, IndexKind::kI32)
TOKENSKIP_SELECT_ENTRY(tokenskip_topk_select_i64, int64_t, IndexKind::kI64)
#undef TOKENSKIP_SELECT_ENTRY

#define TOKENSKIP_TOPK_ENTRY(NAME, T, EK, IT, IK)                                                                   \
    TOKENSKIP_API int NAME(const T* hidden, const float* scores, const bool* valid, int B, int S, int H,            \
                           int64_t keep_num, int64_t keep_den, int64_t min_keep, T* kept, IT* index,                \
                           void* workspace, cudaStream_t stream) {                                                  \
        return int(tokenskip::topk::launchTopKGather(EK, IK, hidden, scores, reinterpret_cast<const uint8_t*>(valid), \
                                                     B, S, H, Keep{keep_num, keep_den, min_keep}, kept, index,      \
                                                     workspace, stream));                                           \
    }
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f32_i32, float, ElemKind::kF32, int32_t, IndexKind::kI32)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f32_i64, float, ElemKind::kF32, int64_t, IndexKind::kI64)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f16_i32, __half, ElemKind::kF16, int32_t, IndexKind::kI32)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_f16_i64, __half, ElemKind::kF16, int64_t, IndexKind::kI64)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_bf16_i32, __nv_bfloat16, ElemKind::kBF16, int32_t, IndexKind::kI32)
TOKENSKIP_TOPK_ENTRY(tokenskip_topk_gather_bf16_i64, __nv_bfloat16, ElemKind::kBF16, int64_t, IndexKind::kI64)
#undef TOKENSKIP_TOPK_ENTRY
