// Host launchers of the TopKGather kernels (used by the plugin and the C entry points).
#pragma once

#include "../common/kernel_types.h"

namespace tokenskip {
namespace topk {

// index [B,k] <- the k best positions of each row of scores [B,S] (ties: lower position first),
// in ascending order. `index` is int32 or int64 according to `ik`.
cudaError_t launchSelect(const float* scores, int B, int S, int k, IndexKind ik, void* index, cudaStream_t stream);

// launchSelect, then kept [B,k,H] <- hidden [B,S,H] rows at index. Workspace: workspaceSize() bytes.
cudaError_t launchTopKGather(ElemKind ek, IndexKind ik, const void* hidden, const float* scores, int B, int S, int H,
                             int k, void* kept, void* index, void* workspace, cudaStream_t stream);

size_t workspaceSize(int B, int S, int H, int k);

} // namespace topk
} // namespace tokenskip
