// Device helpers shared by the tokenskip kernels: ordered float keys, a block-wide scan, packed
// vector loads and the "several rows per block" work split used by the row-copy kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace tokenskip {
namespace device {

// Order-preserving map float -> uint32: a > b <=> key(a) > key(b) for all non-NaN floats, with
// -inf lowest and +inf highest. -0.0 and +0.0 map to the same key because they compare equal (the
// reference sorts by value, so they are a tie resolved by position).
__device__ __forceinline__ uint32_t orderedKey(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u << 1) == 0u) u = 0u;  // -0.0 -> +0.0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The selection key of a score (docs/ops.md): orderedKey, with every NaN ranked exactly like -inf.
// Never 0 (the smallest key is -inf's, 0x007fffff), which the selection uses as "below everything".
__device__ __forceinline__ uint32_t selectKey(float f) {
    return f != f ? 0x007fffffu : orderedKey(f);
}

// Block-wide exclusive prefix sum of one T (uint32_t or unsigned long long) per thread (blockDim.x a
// multiple of 32, <= 1024). `scratch` is 32 T of shared memory; `total` receives the block sum.
// Contains __syncthreads: every thread of the block must call it.
template <typename T>
__device__ __forceinline__ T blockExclusiveSum(T value, T& total, T* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nWarps = blockDim.x >> 5;
    T x = value;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        T w = lane < nWarps ? scratch[lane] : T(0);
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        scratch[lane] = w;  // inclusive sums of warp totals
    }
    __syncthreads();
    const T before = warp ? scratch[warp - 1] : T(0);
    total = scratch[nWarps - 1];
    __syncthreads();  // scratch may be reused by the caller's next call
    return before + x - value;
}

// N elements of T loaded/stored as one aligned vector (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T fromFloat(float x);
template <> __device__ __forceinline__ float fromFloat<float>(float x) { return x; }
template <> __device__ __forceinline__ __half fromFloat<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// a + b rounded once to T. For fp16/bf16 the float32 sum rounded to T equals the correctly rounded
// T sum (float32 has > 2p+2 mantissa bits, so double rounding is innocuous), which is also what
// numpy / PyTorch compute.
template <typename T>
__device__ __forceinline__ T addRounded(T a, T b) { return fromFloat<T>(toFloat(a) + toFloat(b)); }

} // namespace device

namespace host {

// Work split for kernels that process whole rows of `rowVecs` vectors: a group of `threadsPerRow`
// threads (a power of two <= blockThreads) per row, blockThreads / threadsPerRow rows per block.
struct RowSplit {
    int threadsPerRow;
    int tprLog2;  // threadsPerRow == 1 << tprLog2
    int rowsPerBlock;
    int blocks;
};

inline RowSplit rowSplit(int64_t rows, int64_t rowVecs, int blockThreads = 256) {
    int tpr = 1, log2 = 0;
    while (tpr < blockThreads && tpr < rowVecs) {
        tpr <<= 1;
        ++log2;
    }
    RowSplit s;
    s.threadsPerRow = tpr;
    s.tprLog2 = log2;
    s.rowsPerBlock = blockThreads / tpr;
    int64_t blocks = (rows + s.rowsPerBlock - 1) / s.rowsPerBlock;
    const int64_t cap = int64_t(1) << 20;  // grid-stride beyond this
    s.blocks = int(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
    return s;
}

// Widest vector (16/8/4/2/1 bytes) that divides the row size and every base address.
inline int vectorBytes(size_t rowBytes, const void* const* ptrs, int nPtrs) {
    for (int w = 16; w > 1; w >>= 1) {
        bool ok = rowBytes % size_t(w) == 0;
        for (int i = 0; ok && i < nPtrs; ++i) ok = (reinterpret_cast<uintptr_t>(ptrs[i]) % uintptr_t(w)) == 0;
        if (ok) return w;
    }
    return 1;
}

} // namespace host
} // namespace tokenskip
