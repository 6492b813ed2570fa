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
#include <stddef.h>
#include <stdint.h>

#define TOKENSKIP_API extern "C" __attribute__((visibility("default")))

// k = min(S, max(min_keep, ceil(keep_num * S / keep_den))) in exact integer arithmetic (docs/ops.md).
// Returns -1 for a bad fraction (keep_den < 1, keep_num < 0, min_keep < 1) or S < 0.
TOKENSKIP_API int64_t tokenskip_keep_count(int64_t S, int64_t keep_num, int64_t keep_den, int64_t min_keep);

// Source hash the library was compiled from (sha256 of plugins/ sources), "unknown" if not set.
TOKENSKIP_API const char* tokenskip_plugins_source_hash(void);

// ---------------------------------------------------------------------------------- TopKGather
// Bytes of scratch memory the calls below need (currently 0: selection and compaction run in one
// kernel per row). Pass a buffer of at least this size (NULL when 0).
TOKENSKIP_API size_t tokenskip_topk_gather_workspace_size(int B, int S, int H, int k);

// index[b, :] = the k best positions of scores[b, :] (ties: lower position first), ascending.
// scores [B,S] float32 -> index [B,k].
TOKENSKIP_API int tokenskip_topk_select_i32(const float* scores, int B, int S, int k, int32_t* index,
                                            void* workspace, cudaStream_t stream);
TOKENSKIP_API int tokenskip_topk_select_i64(const float* scores, int B, int S, int k, int64_t* index,
                                            void* workspace, cudaStream_t stream);

// Selection as above, then kept[b, j, :] = hidden[b, index[b, j], :].
// hidden [B,S,H], scores [B,S] float32 -> kept [B,k,H] (hidden's dtype), index [B,k].
TOKENSKIP_API int tokenskip_topk_gather_f32_i32(const float* hidden, const float* scores, int B, int S, int H, int k,
                                                float* kept, int32_t* index, void* workspace, cudaStream_t stream);
TOKENSKIP_API int tokenskip_topk_gather_f32_i64(const float* hidden, const float* scores, int B, int S, int H, int k,
                                                float* kept, int64_t* index, void* workspace, cudaStream_t stream);
TOKENSKIP_API int tokenskip_topk_gather_f16_i32(const __half* hidden, const float* scores, int B, int S, int H, int k,
                                                __half* kept, int32_t* index, void* workspace, cudaStream_t stream);
TOKENSKIP_API int tokenskip_topk_gather_f16_i64(const __half* hidden, const float* scores, int B, int S, int H, int k,
                                                __half* kept, int64_t* index, void* workspace, cudaStream_t stream);
TOKENSKIP_API int tokenskip_topk_gather_bf16_i32(const __nv_bfloat16* hidden, const float* scores, int B, int S,
                                                 int H, int k, __nv_bfloat16* kept, int32_t* index, void* workspace,
                                                 cudaStream_t stream);
TOKENSKIP_API int tokenskip_topk_gather_bf16_i64(const __nv_bfloat16* hidden, const float* scores, int B, int S,
                                                 int H, int k, __nv_bfloat16* kept, int64_t* index, void* workspace,
                                                 cudaStream_t stream);

// ------------------------------------------------------------------------------- ScatterTokens
// Bytes of scratch memory ScatterTokens needs: a [B,S] int32 inverse map (row -> delta row or -1).
TOKENSKIP_API size_t tokenskip_scatter_tokens_workspace_size(int B, int S, int H, int k);

// out = hidden; out[b, index[b, j], :] += delta[b, j, :] (added in the hidden dtype, one rounding).
// hidden [B,S,H], delta [B,k,H], index [B,k] (unique per row, in [0,S); others are ignored) -> out [B,S,H].
// out may equal hidden (in place). workspace: tokenskip_scatter_tokens_workspace_size() bytes.
TOKENSKIP_API int tokenskip_scatter_tokens_f32_i32(const float* hidden, const float* delta, const int32_t* index,
                                                   int B, int S, int H, int k, float* out, void* workspace,
                                                   cudaStream_t stream);
TOKENSKIP_API int tokenskip_scatter_tokens_f32_i64(const float* hidden, const float* delta, const int64_t* index,
                                                   int B, int S, int H, int k, float* out, void* workspace,
                                                   cudaStream_t stream);
TOKENSKIP_API int tokenskip_scatter_tokens_f16_i32(const __half* hidden, const __half* delta, const int32_t* index,
                                                   int B, int S, int H, int k, __half* out, void* workspace,
                                                   cudaStream_t stream);
TOKENSKIP_API int tokenskip_scatter_tokens_f16_i64(const __half* hidden, const __half* delta, const int64_t* index,
                                                   int B, int S, int H, int k, __half* out, void* workspace,
                                                   cudaStream_t stream);
TOKENSKIP_API int tokenskip_scatter_tokens_bf16_i32(const __nv_bfloat16* hidden, const __nv_bfloat16* delta,
                                                    const int32_t* index, int B, int S, int H, int k,
                                                    __nv_bfloat16* out, void* workspace, cudaStream_t stream);
TOKENSKIP_API int tokenskip_scatter_tokens_bf16_i64(const __nv_bfloat16* hidden, const __nv_bfloat16* delta,
                                                    const int64_t* index, int B, int S, int H, int k,
                                                    __nv_bfloat16* out, void* workspace, cudaStream_t stream);
