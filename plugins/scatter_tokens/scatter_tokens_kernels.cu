// ScatterTokens kernels.
//
// out = hidden + delta scattered at index rows, in one pass over the output: a [B,S] int32
// inverse map (row s -> j with index[b, j] == s, or -1) is built first (memset + one tiny
// kernel), then every output row is written exactly once: a plain vector copy of the hidden row,
// or hidden row + delta row added in the hidden dtype. Traffic is the minimum
// (read hidden + read delta + write out), instead of copy-then-add which reads and writes the
// k updated rows twice. When out aliases hidden, untouched rows are skipped entirely.
#include "scatter_tokens_kernels.h"

#include "../common/device_utils.cuh"
#include "../common/tokenskip_kernels.h"

namespace tokenskip {
namespace scatter {

// inverse[b, index[b, j]] = j for valid indices. inverse [B,S] pre-filled with -1.
template <typename IdxT>
__global__ void inverseKernel(const IdxT* __restrict__ index, int64_t S, int64_t k, int64_t rows,
                              int32_t* __restrict__ inverse) {
    for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
        const int64_t b = r / k;
        const int64_t s = int64_t(index[r]);
        if (s >= 0 && s < S) inverse[b * S + s] = int32_t(r - b * k);
    }
}

// One output row per group of 2^tprLog2 threads; rows are B*S flat rows of rowVecs packs.
template <typename T, int N>
__global__ void scatterAddKernel(const device::Pack<T, N>* hidden,  // may alias out
                                 const device::Pack<T, N>* __restrict__ delta,
                                 const int32_t* __restrict__ inverse, int64_t S, int64_t k, int64_t rowVecs,
                                 int64_t rows, int tprLog2, bool inPlace, device::Pack<T, N>* out) {
    using P = device::Pack<T, N>;
    const int tpr = 1 << tprLog2;
    const int lane = threadIdx.x & (tpr - 1);
    const int64_t rowsPerBlock = blockDim.x >> tprLog2;
    for (int64_t r = blockIdx.x * rowsPerBlock + (threadIdx.x >> tprLog2); r < rows; r += gridDim.x * rowsPerBlock) {
        const int32_t j = inverse[r];
        const P* hrow = hidden + r * rowVecs;
        P* orow = out + r * rowVecs;
        if (j < 0) {
            if (inPlace) continue;
#pragma unroll 4
            for (int64_t v = lane; v < rowVecs; v += tpr) orow[v] = hrow[v];
        } else {
            const int64_t b = r / S;
            const P* drow = delta + (b * k + j) * rowVecs;
#pragma unroll 4
            for (int64_t v = lane; v < rowVecs; v += tpr) {
                P h = hrow[v];
                const P d = drow[v];
#pragma unroll
                for (int e = 0; e < N; ++e) h.v[e] = device::addRounded(h.v[e], d.v[e]);
                orow[v] = h;
            }
        }
    }
}

template <typename T, int N>
static void launchAddAs(const void* hidden, const void* delta, const int32_t* inverse, int B, int S, int H, int k,
                        void* out, cudaStream_t stream) {
    using P = device::Pack<T, N>;
    const int64_t rowVecs = H / N;
    const int64_t rows = int64_t(B) * S;
    const host::RowSplit split = host::rowSplit(rows, rowVecs);
    int tprLog2 = 0;
    while ((1 << tprLog2) < split.threadsPerRow) ++tprLog2;
    scatterAddKernel<T, N><<<split.blocks, 256, 0, stream>>>(static_cast<const P*>(hidden), static_cast<const P*>(delta),
                                                             inverse, S, k, rowVecs, rows, tprLog2, hidden == out,
                                                             static_cast<P*>(out));
}

// Widest pack (16 bytes) when H and all three pointers allow it, else one element at a time.
template <typename T>
static void launchAdd(const void* hidden, const void* delta, const int32_t* inverse, int B, int S, int H, int k,
                      void* out, cudaStream_t stream) {
    constexpr int kWide = 16 / int(sizeof(T));
    const void* ptrs[3] = {hidden, delta, out};
    if (H % kWide == 0 && host::vectorBytes(16, ptrs, 3) == 16)
        launchAddAs<T, kWide>(hidden, delta, inverse, B, S, H, k, out, stream);
    else
        launchAddAs<T, 1>(hidden, delta, inverse, B, S, H, k, out, stream);
}

size_t workspaceSize(int B, int S, int, int) { return alignUp256(size_t(B > 0 ? B : 0) * size_t(S > 0 ? S : 0) * 4); }

cudaError_t launchScatterTokens(ElemKind ek, IndexKind ik, const void* hidden, const void* delta, const void* index,
                                int B, int S, int H, int k, void* out, void* workspace, cudaStream_t stream) {
    if (B < 0 || S < 0 || H < 0 || k < 0) return cudaErrorInvalidValue;
    if (B == 0 || S == 0 || H == 0) return cudaSuccess;
    if (workspace == nullptr) return cudaErrorInvalidValue;
    auto* inverse = static_cast<int32_t*>(workspace);  // [B,S]
    cudaError_t err = cudaMemsetAsync(inverse, 0xff, size_t(B) * S * sizeof(int32_t), stream);
    if (err != cudaSuccess) return err;
    if (k > 0) {
        const int64_t rows = int64_t(B) * k;
        const int blocks = int(rows / 256 + 1 < 65536 ? rows / 256 + 1 : 65536);
        if (ik == IndexKind::kI32)
            inverseKernel<<<blocks, 256, 0, stream>>>(static_cast<const int32_t*>(index), S, k, rows, inverse);
        else
            inverseKernel<<<blocks, 256, 0, stream>>>(static_cast<const int64_t*>(index), S, k, rows, inverse);
    }
    switch (ek) {
    case ElemKind::kF32: launchAdd<float>(hidden, delta, inverse, B, S, H, k, out, stream); break;
    case ElemKind::kF16: launchAdd<__half>(hidden, delta, inverse, B, S, H, k, out, stream); break;
    case ElemKind::kBF16: launchAdd<__nv_bfloat16>(hidden, delta, inverse, B, S, H, k, out, stream); break;
    default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

} // namespace scatter
} // namespace tokenskip

// ------------------------------------------------------------------------------ C entry points
using tokenskip::ElemKind;
using tokenskip::IndexKind;

TOKENSKIP_API size_t tokenskip_scatter_tokens_workspace_size(int B, int S, int H, int k) {
    return tokenskip::scatter::workspaceSize(B, S, H, k);
}

#define TOKENSKIP_SCATTER_ENTRY(NAME, T, EK, IT, IK)                                                                \
    TOKENSKIP_API int NAME(const T* hidden, const T* delta, const IT* index, int B, int S, int H, int k, T* out,   \
                           void* workspace, cudaStream_t stream) {                                                  \
        return int(tokenskip::scatter::launchScatterTokens(EK, IK, hidden, delta, index, B, S, H, k, out,          \
                                                           workspace, stream));                                     \
    }
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f32_i32, float, ElemKind::kF32, int32_t, IndexKind::kI32)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f32_i64, float, ElemKind::kF32, int64_t, IndexKind::kI64)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f16_i32, __half, ElemKind::kF16, int32_t, IndexKind::kI32)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f16_i64, __half, ElemKind::kF16, int64_t, IndexKind::kI64)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_bf16_i32, __nv_bfloat16, ElemKind::kBF16, int32_t, IndexKind::kI32)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_bf16_i64, __nv_bfloat16, ElemKind::kBF16, int64_t, IndexKind::kI64)
#undef TOKENSKIP_SCATTER_ENTRY
