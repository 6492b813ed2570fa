// Element and index kinds and the keep-count rule shared by the kernels and the TensorRT plugins.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define TOKENSKIP_HD __host__ __device__
#else
#define TOKENSKIP_HD
#endif

namespace tokenskip {

enum class ElemKind : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum class IndexKind : int32_t { kI32 = 0, kI64 = 1 };

inline size_t elemBytes(ElemKind e) { return e == ElemKind::kF32 ? 4 : 2; }
inline size_t indexBytes(IndexKind i) { return i == IndexKind::kI32 ? 4 : 8; }

// The keep fraction of a TopKGather node (attributes keep_num, keep_den, min_keep).
struct Keep {
    int64_t num;
    int64_t den;
    int64_t minKeep;
};

inline bool validKeep(Keep k) { return k.num >= 0 && k.den >= 1 && k.minKeep >= 1; }

// keep(n) = min(n, max(min_keep, ceil(keep_num * n / keep_den))) in exact integer arithmetic
// (docs/ops.md): the batch width k = keep(S) and a row's real-token count k_b = keep(L_b).
// -1 for a bad fraction or n < 0.
TOKENSKIP_HD inline int64_t keepCount(int64_t n, Keep keep) {
    if (n < 0 || keep.num < 0 || keep.den < 1 || keep.minKeep < 1) return -1;
    int64_t k = (keep.num * n + keep.den - 1) / keep.den;
    if (k < keep.minKeep) k = keep.minKeep;
    return k < n ? k : n;
}

// Round a byte count up to 256 so that workspace slices stay aligned for vector loads.
inline size_t alignUp256(size_t n) { return (n + 255) & ~size_t(255); }

} // namespace tokenskip
