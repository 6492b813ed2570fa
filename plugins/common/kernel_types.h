// Element and index kinds shared by the kernel launchers and the TensorRT plugins.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace tokenskip {

enum class ElemKind : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum class IndexKind : int32_t { kI32 = 0, kI64 = 1 };

inline size_t elemBytes(ElemKind e) { return e == ElemKind::kF32 ? 4 : 2; }
inline size_t indexBytes(IndexKind i) { return i == IndexKind::kI32 ? 4 : 8; }

// k = min(S, max(min_keep, ceil(keep_num * S / keep_den))) in exact integer arithmetic (docs/ops.md);
// -1 for a bad fraction or S < 0.
inline int64_t keepCount(int64_t S, int64_t keepNum, int64_t keepDen, int64_t minKeep) {
    if (S < 0 || keepNum < 0 || keepDen < 1 || minKeep < 1) return -1;
    int64_t k = (keepNum * S + keepDen - 1) / keepDen;
    if (k < minKeep) k = minKeep;
    return k < S ? k : S;
}

// Round a byte count up to 256 so that workspace slices stay aligned for vector loads.
inline size_t alignUp256(size_t n) { return (n + 255) & ~size_t(255); }

} // namespace tokenskip
