// ScatterTokens kernels.
//
// Out of place (out != hidden): out = hidden + delta scattered at index rows, in one pass over the
// output. A [B,S] int32 inverse map (row s -> j with index[b, j] == s, or -1) is built first (memset
// + one tiny kernel), then every output row is written exactly once: a vector copy of the hidden
// row, or hidden row + delta row added in the hidden dtype. That is the minimum traffic for a
// separate output (read hidden + read delta + write out), instead of copy-then-add which reads and
// writes the k updated rows twice.
//
// In place (out == hidden: what TensorRT hands the plugin when it accepts the output-to-input alias,
// see scatter_tokens_plugin.cpp): only the k indexed rows are read, added to and written back, one
// thread group per delta row; no inverse map, no workspace, the S - k other rows are not touched.
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

// h[v] + d[v] for one row of rowVecs packs, by the `lane`-th of `tpr` threads.
template <typename T, int N>
__device__ __forceinline__ void addRow(const device::Pack<T, N>* hrow, const device::Pack<T, N>* drow,
                                       device::Pack<T, N>* orow, int64_t rowVecs, int lane, int tpr) {
    using P = device::Pack<T, N>;
#pragma unroll 4
    for (int64_t v = lane; v < rowVecs; v += tpr) {
        P h = hrow[v];
        const P d = drow[v];
#pragma unroll
        for (int e = 0; e < N; ++e) h.v[e] = device::addRounded(h.v[e], d.v[e]);
        orow[v] = h;
    }
}

// Out of place: one output row per group of 2^tprLog2 threads; rows are B*S flat rows of rowVecs packs.
template <typename T, int N>
__global__ void scatterAddKernel(const device::Pack<T, N>* __restrict__ hidden,
                                 const device::Pack<T, N>* __restrict__ delta, const int32_t* __restrict__ inverse,
                                 int64_t S, int64_t k, int64_t rowVecs, int64_t rows, int tprLog2,
                                 device::Pack<T, N>* __restrict__ out) {
    using P = device::Pack<T, N>;
    const int tpr = 1 << tprLog2;
    const int lane = threadIdx.x & (tpr - 1);
    const int64_t rowsPerBlock = blockDim.x >> tprLog2;
    for (int64_t r = blockIdx.x * rowsPerBlock + (threadIdx.x >> tprLog2); r < rows; r += gridDim.x * rowsPerBlock) {
        const int32_t j = inverse[r];
        const P* hrow = hidden + r * rowVecs;
        P* orow = out + r * rowVecs;
        if (j < 0) {
#pragma unroll 4
            for (int64_t v = lane; v < rowVecs; v += tpr) orow[v] = hrow[v];
        } else {
            addRow<T, N>(hrow, delta + ((r / S) * k + j) * rowVecs, orow, rowVecs, lane, tpr);
        }
    }
}

// In place: hidden[b, index[b, j], :] += delta[b, j, :], one group of 2^tprLog2 threads per flat
// delta row r = b * k + j. Indices are unique per row (TopKGather's guarantee), so no two groups
// touch the same row; out-of-range indices are skipped.
template <typename T, int N, typename IdxT>
__global__ void scatterInPlaceKernel(device::Pack<T, N>* hidden, const device::Pack<T, N>* __restrict__ delta,
                                     const IdxT* __restrict__ index, int64_t S, int64_t k, int64_t rowVecs,
                                     int64_t rows, int tprLog2) {
    const int tpr = 1 << tprLog2;
    const int lane = threadIdx.x & (tpr - 1);
    const int64_t rowsPerBlock = blockDim.x >> tprLog2;
    for (int64_t r = blockIdx.x * rowsPerBlock + (threadIdx.x >> tprLog2); r < rows; r += gridDim.x * rowsPerBlock) {
        const int64_t s = int64_t(index[r]);
        if (s < 0 || s >= S) continue;
        device::Pack<T, N>* hrow = hidden + ((r / k) * S + s) * rowVecs;
        addRow<T, N>(hrow, delta + r * rowVecs, hrow, rowVecs, lane, tpr);
    }
}

template <typename T, int N>
static void launchAddAs(const void* hidden, const void* delta, const int32_t* inverse, int B, int S, int H, int k,
                        void* out, cudaStream_t stream) {
    using P = device::Pack<T, N>;
    const int64_t rowVecs = H / N;
    const int64_t rows = int64_t(B) * S;
    const host::RowSplit split = host::rowSplit(rows, rowVecs);
    scatterAddKernel<T, N><<<split.blocks, 256, 0, stream>>>(static_cast<const P*>(hidden), static_cast<const P*>(delta),
                                                             inverse, S, k, rowVecs, rows, split.tprLog2,
                                                             static_cast<P*>(out));
}

template <typename T, int N, typename IdxT>
static void launchInPlaceAs(void* hidden, const void* delta, const IdxT* index, int B, int S, int H, int k,
                            cudaStream_t stream) {
    using P = device::Pack<T, N>;
    const int64_t rowVecs = H / N;
    const int64_t rows = int64_t(B) * k;
    const host::RowSplit split = host::rowSplit(rows, rowVecs);
    scatterInPlaceKernel<T, N, IdxT><<<split.blocks, 256, 0, stream>>>(static_cast<P*>(hidden),
                                                                       static_cast<const P*>(delta), index, S, k,
                                                                       rowVecs, rows, split.tprLog2);
}

// 16-byte packs when H and every pointer allow it, else one element at a time.
template <typename T>
static bool wide(const void* const* ptrs, int n, int H) {
    constexpr int kWide = 16 / int(sizeof(T));
    return H % kWide == 0 && host::vectorBytes(16, ptrs, n) == 16;
}

template <typename T>
static void launchAdd(const void* hidden, const void* delta, const int32_t* inverse, int B, int S, int H, int k,
                      void* out, cudaStream_t stream) {
    const void* ptrs[3] = {hidden, delta, out};
    if (wide<T>(ptrs, 3, H))
        launchAddAs<T, 16 / sizeof(T)>(hidden, delta, inverse, B, S, H, k, out, stream);
    else
        launchAddAs<T, 1>(hidden, delta, inverse, B, S, H, k, out, stream);
}

template <typename T, typename IdxT>
static void launchInPlace(void* hidden, const void* delta, const IdxT* index, int B, int S, int H, int k,
                          cudaStream_t stream) {
    const void* ptrs[2] = {hidden, delta};
    if (wide<T>(ptrs, 2, H))
        launchInPlaceAs<T, 16 / sizeof(T), IdxT>(hidden, delta, index, B, S, H, k, stream);
    else
        launchInPlaceAs<T, 1, IdxT>(hidden, delta, index, B, S, H, k, stream);
}

template <typename IdxT>
static cudaError_t inPlaceTyped(ElemKind ek, void* hidden, const void* delta, const IdxT* index, int B, int S, int H,
                                int k, cudaStream_t stream) {
    switch (ek) {
    case ElemKind::kF32: launchInPlace<float>(hidden, delta, index, B, S, H, k, stream); break;
    case ElemKind::kF16: launchInPlace<__half>(hidden, delta, index, B, S, H, k, stream); break;
    case ElemKind::kBF16: launchInPlace<__nv_bfloat16>(hidden, delta, index, B, S, H, k, stream); break;
    default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

size_t workspaceSize(int B, int S, int, int) { return alignUp256(size_t(B > 0 ? B : 0) * size_t(S > 0 ? S : 0) * 4); }

cudaError_t launchScatterInPlace(ElemKind ek, IndexKind ik, void* hidden, const void* delta, const void* index, int B,
                                 int S, int H, int k, cudaStream_t stream) {
    if (B < 0 || S < 0 || H < 0 || k < 0) return cudaErrorInvalidValue;
    if (B == 0 || S == 0 || H == 0 || k == 0) return cudaSuccess;
    if (ik == IndexKind::kI32)
        return inPlaceTyped(ek, hidden, delta, static_cast<const int32_t*>(index), B, S, H, k, stream);
    return inPlaceTyped(ek, hidden, delta, static_cast<const int64_t*>(index), B, S, H, k, stream);
}

cudaError_t launchScatterTokens(ElemKind ek, IndexKind ik, const void* hidden, const void* delta, const void* index,
                                int B, int S, int H, int k, void* out, void* workspace, cudaStream_t stream) {
    if (B < 0 || S < 0 || H < 0 || k < 0) return cudaErrorInvalidValue;
    if (out == hidden) return launchScatterInPlace(ek, ik, out, delta, index, B, S, H, k, stream);
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

#define TOKENSKIP_SCATTER_ENTRY(NAME, INPLACE, T, EK, IT, IK)                                                       \
    TOKENSKIP_API int NAME(const T* hidden, const T* delta, const IT* index, int B, int S, int H, int k, T* out,   \
                           void* workspace, cudaStream_t stream) {                                                  \
        return int(tokenskip::scatter::launchScatterTokens(EK, IK, hidden, delta, index, B, S, H, k, out,          \
                                                           workspace, stream));                                     \
    }                                                                                                               \
    TOKENSKIP_API int INPLACE(T* hidden, const T* delta, const IT* index, int B, int S, int H, int k,              \
                              cudaStream_t stream) {                                                                \
        return int(tokenskip::scatter::launchScatterInPlace(EK, IK, hidden, delta, index, B, S, H, k, stream));   \
    }
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f32_i32, tokenskip_scatter_tokens_inplace_f32_i32, float,
                        ElemKind::kF32, int32_t, IndexKind::kI32)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f32_i64, tokenskip_scatter_tokens_inplace_f32_i64, float,
                        ElemKind::kF32, int64_t, IndexKind::kI64)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f16_i32, tokenskip_scatter_tokens_inplace_f16_i32, __half,
                        ElemKind::kF16, int32_t, IndexKind::kI32)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_f16_i64, tokenskip_scatter_tokens_inplace_f16_i64, __half,
                        ElemKind::kF16, int64_t, IndexKind::kI64)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_bf16_i32, tokenskip_scatter_tokens_inplace_bf16_i32, __nv_bfloat16,
                        ElemKind::kBF16, int32_t, IndexKind::kI32)
TOKENSKIP_SCATTER_ENTRY(tokenskip_scatter_tokens_bf16_i64, tokenskip_scatter_tokens_inplace_bf16_i64, __nv_bfloat16,
                        ElemKind::kBF16, int64_t, IndexKind::kI64)
#undef TOKENSKIP_SCATTER_ENTRY
