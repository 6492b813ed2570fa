// Host launchers of the ScatterTokens kernels (used by the plugin and the C entry points).
#pragma once

#include "../common/kernel_types.h"

namespace tokenskip {
namespace scatter {

// out [B,S,H] = hidden; out[b, index[b,j], :] += delta[b, j, :] (delta [B,k,H], index [B,k], unique per
// row). Indices outside [0, S) are ignored. out == hidden runs launchScatterInPlace (no workspace);
// otherwise workspace: workspaceSize() bytes.
cudaError_t launchScatterTokens(ElemKind ek, IndexKind ik, const void* hidden, const void* delta, const void* index,
                                int B, int S, int H, int k, void* out, void* workspace, cudaStream_t stream);

// hidden[b, index[b,j], :] += delta[b, j, :] in place: touches only the k indexed rows of each row.
cudaError_t launchScatterInPlace(ElemKind ek, IndexKind ik, void* hidden, const void* delta, const void* index, int B,
                                 int S, int H, int k, cudaStream_t stream);

size_t workspaceSize(int B, int S, int H, int k);

} // namespace scatter
} // namespace tokenskip
