// Plain C entry points of the tokenskip CUDA kernels (no TensorRT needed to call them).
//
// They exist so the kernels can be tested and benchmarked on a GPU from Python (ctypes + torch
// tensor pointers) and reused outside TensorRT. The TensorRT plugins call the same launchers.
// All pointers are device pointers to contiguous row-major tensors; every call is asynchronous on
// `stream` and returns a cudaError_t value (0 = cudaSuccess). Shapes: B batch rows, S tokens per
// row, H hidden size, k kept tokens per row (0 <= k <= S).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TOKENSKIP_API extern "C" __attribute__((visibility("default")))

// keep(n) = min(n, max(min_keep, ceil(keep_num * n / keep_den))) in exact integer arithmetic
// (docs/ops.md). Returns -1 for a bad fraction (keep_den < 1, keep_num < 0, min_keep < 1) or n < 0.
TOKENSKIP_API int64_t tokenskip_keep_count(int64_t n, int64_t keep_num, int64_t keep_den, int64_t min_keep);

// Source hash the library was compiled from (sha256 of plugins/ sources), "unknown" if not set.
TOKENSKIP_API const char* tokenskip_plugins_source_hash(void);

// ---------------------------------------------------------------------------------- TopKGather
// The rule (docs/ops.md): k = keep(S) output slots per row; row b takes keep(L_b) of its valid
// tokens (L_b = its number of valid positions), the best by score (NaN ranks like -inf, ties: lower
// position first), and fills the other k - keep(L_b) slots with its lowest padding positions;
// index[b, :] lists the k taken positions in ascending order. valid [B,S] bool (false = padding) may
// be NULL: no padding.

// Bytes of scratch memory the calls below need for B rows of S scores (any path). Pass a buffer of
// at least this size.
TOKENSKIP_API size_t tokenskip_topk_gather_workspace_size(int B, int S);

// 1 when the default (auto) path runs the multi-block selection for B rows of S scores, else 0.
TOKENSKIP_API int tokenskip_topk_select_uses_multi_block(int B, int S);

// Selection only: scores [B,S] float32 (+ valid) -> index [B,k]. algo: 0 = auto, 1 = one block per
// row, 2 = several blocks per row (needs B <= 65535). Same result whatever the algo.
TOKENSKIP_API int tokenskip_topk_select_i32(const float* scores, const bool* valid, int B, int S, int64_t keep_num,
                                            int64_t keep_den, int64_t min_keep, int algo, int32_t* index,
                                            void* workspace, cudaStream_t stream);
TOKENSKIP_API int tokenskip_topk_select_i64(const float* scores, const bool* valid, int B, int S, int64_t keep_num,
                                            int64_t keep_den, int64_t min_keep, int algo, int64_t* index,
                                            void* workspace, cudaStream_t stream);

// Selection (auto path), then kept[b, j, :] = hidden[b, index[b, j], :].
// hidden [B,S,H], scores [B,S] float32, valid [B,S] bool or NULL -> kept [B,k,H] (hidden's dtype), index [B,k].
#define TOKENSKIP_TOPK_DECL(NAME, T, IT)                                                                           \
    TOKENSKIP_API int NAME(const T* hidden, const float* scores, const bool* valid, int B, int S, int H,            \
                           int64_t keep_num, int64_t keep_den, int64_t min_keep, T* kept, IT* index,                \
                           void* workspace, cudaStream_t stream);
TOKENSKIP_TOPK_DECL(tokenskip_topk_gather_f32_i32, float, int32_t)
TOKENSKIP_TOPK_DECL(tokenskip_topk_gather_f32_i64, float, int64_t)
TOKENSKIP_TOPK_DECL(tokenskip_topk_gather_f16_i32, __half, int32_t)
TOKENSKIP_TOPK_DECL(tokenskip_topk_gather_f16_i64, __half, int64_t)
TOKENSKIP_TOPK_DECL(tokenskip_topk_gather_bf16_i32, __nv_bfloat16, int32_t)
TOKENSKIP_TOPK_DECL(tokenskip_topk_gather_bf16_i64, __nv_bfloat16, int64_t)
#undef TOKENSKIP_TOPK_DECL

// ------------------------------------------------------------------------------- ScatterTokens
// Bytes of scratch memory the out-of-place ScatterTokens needs: a [B,S] int32 inverse map.
TOKENSKIP_API size_t tokenskip_scatter_tokens_workspace_size(int B, int S, int H, int k);

// out = hidden; out[b, index[b, j], :] += delta[b, j, :] (added in the hidden dtype, one rounding).
// hidden [B,S,H], delta [B,k,H], index [B,k] (unique per row, in [0,S); others are ignored) -> out [B,S,H].
// out may equal hidden (then it runs the in-place kernel below and needs no workspace); otherwise
// workspace: tokenskip_scatter_tokens_workspace_size() bytes.
// The _inplace_ variants add into hidden directly, touching only the k indexed rows of each row.
#define TOKENSKIP_SCATTER_DECL(NAME, INPLACE, T, IT)                                                               \
    TOKENSKIP_API int NAME(const T* hidden, const T* delta, const IT* index, int B, int S, int H, int k, T* out,   \
                           void* workspace, cudaStream_t stream);                                                   \
    TOKENSKIP_API int INPLACE(T* hidden, const T* delta, const IT* index, int B, int S, int H, int k,              \
                              cudaStream_t stream);
TOKENSKIP_SCATTER_DECL(tokenskip_scatter_tokens_f32_i32, tokenskip_scatter_tokens_inplace_f32_i32, float, int32_t)
TOKENSKIP_SCATTER_DECL(tokenskip_scatter_tokens_f32_i64, tokenskip_scatter_tokens_inplace_f32_i64, float, int64_t)
TOKENSKIP_SCATTER_DECL(tokenskip_scatter_tokens_f16_i32, tokenskip_scatter_tokens_inplace_f16_i32, __half, int32_t)
TOKENSKIP_SCATTER_DECL(tokenskip_scatter_tokens_f16_i64, tokenskip_scatter_tokens_inplace_f16_i64, __half, int64_t)
TOKENSKIP_SCATTER_DECL(tokenskip_scatter_tokens_bf16_i32, tokenskip_scatter_tokens_inplace_bf16_i32, __nv_bfloat16,
                       int32_t)
TOKENSKIP_SCATTER_DECL(tokenskip_scatter_tokens_bf16_i64, tokenskip_scatter_tokens_inplace_bf16_i64, __nv_bfloat16,
                       int64_t)
#undef TOKENSKIP_SCATTER_DECL
