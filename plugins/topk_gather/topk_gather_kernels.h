// Host launchers of the TopKGather kernels (used by the plugin and the C entry points).
#pragma once

#include "../common/kernel_types.h"

namespace tokenskip {
namespace topk {

// Which selection kernels run: auto (multi-block for long rows and small batches), or forced.
enum class SelectAlgo : int32_t { kAuto = 0, kSingleBlock = 1, kMultiBlock = 2 };

// index [B,k], k = keep(S): per row, the keep(L_b) best valid positions of scores [B,S] (NaN = -inf,
// ties: lower position first) and the lowest k - keep(L_b) padding positions, ascending
// (docs/ops.md). valid [B,S] bytes (0 = padding), nullptr = no padding. `index` is int32 or int64
// according to `ik`. The multi-block path needs selectWorkspaceSize(B, S) bytes of workspace.
cudaError_t launchSelect(const float* scores, const uint8_t* valid, int B, int S, Keep keep, SelectAlgo algo,
                         IndexKind ik, void* index, void* workspace, cudaStream_t stream);

// launchSelect (auto path), then kept [B,k,H] <- hidden [B,S,H] rows at index.
cudaError_t launchTopKGather(ElemKind ek, IndexKind ik, const void* hidden, const float* scores, const uint8_t* valid,
                             int B, int S, int H, Keep keep, void* kept, void* index, void* workspace,
                             cudaStream_t stream);

// Workspace bytes for any path and any batch up to B rows of S (0 if B or S is 0).
size_t selectWorkspaceSize(int64_t B, int64_t S);

// Whether the auto path picks the multi-block kernels for B rows of S.
bool useMultiBlock(int64_t B, int64_t S);

} // namespace topk
} // namespace tokenskip
