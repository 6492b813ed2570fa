// TopKGather selection kernels: the per-row rule of docs/ops.md.
//
// Row b keeps k_b = keep(L_b) of its valid tokens, the best by score (NaN ranks like -inf, ties:
// lower position first), plus its first k - k_b padding positions, k = keep(S); the k positions are
// written in ascending order. Both paths find, per row, the key `thr` of the k_b-th best valid score
// and how many valid keys equal to it to take (`takeEq`) with an MSD radix select over
// order-preserving uint32 keys (8 bits per pass, 4 passes; pass 0 also counts L_b), then stream the
// row in position order and write every taken position i at slot
//     #(valid keys > thr before i) + min(#(valid keys == thr before i), takeEq)
//                                  + min(#(padding before i), k - k_b)
// which is exactly the stable-descending-sort selection, already in ascending order. A row whose
// k_b equals L_b (or 0) needs no radix pass: every valid token is taken (thr = 0, takeEq = all).
//
// - Single-block path (short rows, or enough rows to fill the GPU): one 1024-thread block per row,
//   shared-memory histograms, no workspace; reads the row up to 5 times on one SM.
// - Multi-block path (long rows, few of them: batch 1 prefill): the row is cut into 2048-score
//   chunks, one 256-thread block each. Every radix pass is a kernel whose blocks add their shared
//   histogram into the row's global one; each block of the next kernel replays the digit choices
//   from the global histograms (4 x 256 bins, a few hundred cycles), so no grid-wide sync is
//   needed. A count kernel stores each chunk's (greater, equal, padding) counts and the write kernel
//   starts each chunk from the sum over the chunks before it. 1 memset + 6 launches, all SMs busy.
#include "topk_gather_kernels.h"

#include "../common/device_utils.cuh"

namespace tokenskip {
namespace topk {

namespace {

constexpr int kGroup = 4;  // consecutive scores per thread per step (one float4)
constexpr int kSingleThreads = 1024;
constexpr int kMultiThreads = 256;
constexpr int kChunkSteps = 2;
constexpr int64_t kChunk = int64_t(kMultiThreads) * kGroup * kChunkSteps;  // 2048 scores per block
constexpr int kPasses = 4;
constexpr int kBins = 256;
constexpr uint32_t kAllTies = 0xffffffffu;
// Auto path choice: multi-block for rows longer than this, while the grid stays moderate.
constexpr int64_t kMultiMinS = 8192;
constexpr int64_t kMultiMaxBlocks = 1024;

using u64 = unsigned long long;

enum : uint8_t { kOut = 0, kReal = 1, kPad = 2 };  // position past the row end / valid token / padding

struct Group {
    uint32_t key[kGroup];
    uint8_t cls[kGroup];
};

// Keys and classes of positions 4g .. 4g+3 (vrow == nullptr: no padding).
__device__ __forceinline__ void loadGroup(const float* row, const uint8_t* vrow, int64_t S, int64_t g, bool aligned,
                                          Group& G) {
    const int64_t i0 = g * kGroup;
    float v[kGroup];
    if (aligned && i0 + kGroup <= S) {
        const float4 f = *reinterpret_cast<const float4*>(row + i0);
        v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    } else {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) v[j] = i0 + j < S ? row[i0 + j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
        G.key[j] = device::selectKey(v[j]);
        G.cls[j] = i0 + j >= S ? kOut : (vrow == nullptr || vrow[i0 + j] != 0) ? kReal : kPad;
    }
}

// Warp-aggregated shared-memory histogram increment. Router scores of one layer cluster in a few
// bins, so plain atomics would serialise up to 32 ways; lanes with equal bins add once together.
// Must be called by all 32 lanes (uniform loop trip counts guarantee it).
__device__ __forceinline__ void histAdd(uint32_t* hist, uint32_t bin, bool valid) {
    const uint32_t tag = valid ? bin : 0xffffffffu;
    const unsigned peers = __match_any_sync(0xffffffffu, tag);
    if (valid && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(hist + bin, uint32_t(__popc(peers)));
}

// Where a row's radix select stands. Uniform across the block once shared.
struct SelectState {
    uint32_t prefix;     // key bits fixed so far; thr once done
    uint32_t remaining;  // rank of thr among the keys matching prefix; takeEq once done
    uint32_t fill;       // padding positions this row keeps: k - k_b
    uint32_t done;       // 1: prefix/remaining are final
};

__device__ __forceinline__ uint32_t passMask(int pass) { return pass == 0 ? 0u : ~0u << (32 - 8 * pass); }
__device__ __forceinline__ int passShift(int pass) { return 24 - 8 * pass; }

// Warp 0 (all 32 lanes): fold pass `pass`'s histogram (digits of the valid keys matching
// st.prefix) into st. Pass 0's histogram counts every valid key, which gives L_b and k_b.
__device__ void advance(SelectState& st, const uint32_t* hist, int pass, int64_t S, Keep keep) {
    const int lane = threadIdx.x & 31;
    uint32_t c[8], sum = 0;  // lane l holds digits 255 - 8l .. 248 - 8l (highest keys first)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        c[j] = hist[kBins - 1 - lane * 8 - j];
        sum += c[j];
    }
    uint32_t incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    const uint32_t excl = incl - sum;
    if (pass == 0) {
        const int64_t L = __shfl_sync(0xffffffffu, incl, 31);
        const int64_t kb = keepCount(L, keep);
        st.fill = uint32_t(keepCount(S, keep) - kb);
        st.prefix = 0u;
        if (kb <= 0 || kb >= L) {  // every valid token is taken
            st.remaining = kAllTies;
            st.done = 1u;
            return;
        }
        st.remaining = uint32_t(kb);
        st.done = 0u;
    }
    if (st.done) return;
    const bool mine = excl < st.remaining && st.remaining <= incl;  // exactly one lane
    uint32_t digit = 0u, rem = 0u;
    if (mine) {
        uint32_t above = excl;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (above + c[j] >= st.remaining) {
                digit = uint32_t(kBins - 1 - lane * 8 - j);
                rem = st.remaining - above;
                break;
            }
            above += c[j];
        }
    }
    const int src = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;
    digit = __shfl_sync(0xffffffffu, digit, src);
    rem = __shfl_sync(0xffffffffu, rem, src);
    st.prefix |= digit << passShift(pass);
    st.remaining = rem;
    if (pass == kPasses - 1) st.done = 1u;
}

struct Counts {
    uint32_t gt, eq, pad;  // valid keys > thr, valid keys == thr, padding positions
};

// Three counts of one tile (each <= 4096) in one 64-bit word, 21 bits each.
__device__ __forceinline__ u64 pack(uint32_t gt, uint32_t eq, uint32_t pad) {
    return u64(gt) | (u64(eq) << 21) | (u64(pad) << 42);
}
__device__ __forceinline__ Counts unpack(u64 x) {
    return {uint32_t(x & 0x1fffffu), uint32_t((x >> 21) & 0x1fffffu), uint32_t(x >> 42)};
}

// Streams groups g0 + s * blockDim.x + threadIdx.x (s < nSteps) in position order; with kWrite, writes
// every taken position at its slot (header comment), counting from `base`, the row's counts before
// group g0. Returns the counts of the streamed groups (in every thread). Contains __syncthreads.
template <bool kWrite, typename IdxT>
__device__ Counts compact(const float* row, const uint8_t* vrow, int64_t S, int64_t g0, int64_t nSteps, bool aligned,
                          const SelectState& st, Counts base, IdxT* out, u64* scratch) {
    const uint32_t thr = st.prefix, takeEq = st.remaining, fill = st.fill;
    Counts run = base;
    for (int64_t s = 0; s < nSteps; ++s) {
        const int64_t g = g0 + s * blockDim.x + threadIdx.x;
        Group G;
        loadGroup(row, vrow, S, g, aligned, G);
        uint32_t nGt = 0, nEq = 0, nPad = 0;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
            nGt += G.cls[j] == kReal && G.key[j] > thr;
            nEq += G.cls[j] == kReal && G.key[j] == thr;
            nPad += G.cls[j] == kPad;
        }
        u64 total;
        const Counts before = unpack(device::blockExclusiveSum<u64>(pack(nGt, nEq, nPad), total, scratch));
        if (kWrite) {
            uint32_t gt = run.gt + before.gt, eq = run.eq + before.eq, pad = run.pad + before.pad;
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
                const IdxT pos = IdxT(g * kGroup + j);
                if (G.cls[j] == kReal) {
                    if (G.key[j] > thr) {
                        out[gt + min(eq, takeEq) + min(pad, fill)] = pos;
                        ++gt;
                    } else if (G.key[j] == thr) {
                        if (eq < takeEq) out[gt + eq + min(pad, fill)] = pos;
                        ++eq;
                    }
                } else if (G.cls[j] == kPad) {
                    if (pad < fill) out[gt + min(eq, takeEq) + pad] = pos;
                    ++pad;
                }
            }
        }
        const Counts t = unpack(total);
        run.gt += t.gt;
        run.eq += t.eq;
        run.pad += t.pad;
    }
    return {run.gt - base.gt, run.eq - base.eq, run.pad - base.pad};
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Row b of scores [B,S] and of valid [B,S] (nullptr: no padding).
struct Row {
    const float* scores;
    const uint8_t* valid;
    __device__ Row(const float* s, const uint8_t* v, int64_t b, int64_t S)
        : scores(s + b * S), valid(v ? v + b * S : nullptr) {}
};

// ------------------------------------------------------------------------ single block per row
template <typename IdxT>
__global__ void __launch_bounds__(kSingleThreads)
selectRowKernel(const float* __restrict__ scores, const uint8_t* __restrict__ valid, int64_t S, int64_t k, Keep keep,
                IdxT* __restrict__ index) {
    __shared__ uint32_t hist[kBins];
    __shared__ u64 scratch[32];
    __shared__ SelectState sState;
    const int64_t b = blockIdx.x;
    const Row r(scores, valid, b, S);  // [S]
    const float* row = r.scores;
    const uint8_t* vrow = r.valid;
    const bool aligned = aligned16(row);
    const int64_t groups = (S + kGroup - 1) / kGroup;
    const int64_t steps = (groups + blockDim.x - 1) / blockDim.x;  // uniform trip count for all threads

    SelectState st{0u, 0u, 0u, 0u};
    for (int pass = 0; pass < kPasses && !st.done; ++pass) {
        for (int i = threadIdx.x; i < kBins; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        const uint32_t mask = passMask(pass);
        const int shift = passShift(pass);
        for (int64_t s = 0; s < steps; ++s) {
            Group G;
            loadGroup(row, vrow, S, s * blockDim.x + threadIdx.x, aligned, G);
#pragma unroll
            for (int j = 0; j < kGroup; ++j)
                histAdd(hist, (G.key[j] >> shift) & 0xffu, G.cls[j] == kReal && (G.key[j] & mask) == st.prefix);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            advance(st, hist, pass, S, keep);
            if (threadIdx.x == 0) sState = st;
        }
        __syncthreads();
        st = sState;
    }
    compact<true>(row, vrow, S, 0, steps, aligned, st, Counts{0u, 0u, 0u}, index + b * k, scratch);
}

// ------------------------------------------------------------------------- several blocks per row
// Warp 0 replays passes 0 .. passes-1 from the row's global histograms; shared with the block.
__device__ SelectState replay(const uint32_t* rowHist, int passes, int64_t S, Keep keep, SelectState* shared) {
    if (threadIdx.x < 32) {
        SelectState st{0u, 0u, 0u, 0u};
        for (int p = 0; p < passes && !st.done; ++p) advance(st, rowHist + p * kBins, p, S, keep);
        if (threadIdx.x == 0) *shared = st;
    }
    __syncthreads();
    return *shared;
}

// hist [B][kPasses][kBins] (zeroed before pass 0). Grid (chunks, B).
__global__ void __launch_bounds__(kMultiThreads)
histChunkKernel(const float* __restrict__ scores, const uint8_t* __restrict__ valid, int64_t S, Keep keep, int pass,
                uint32_t* __restrict__ hist) {
    __shared__ uint32_t h[kBins];
    __shared__ SelectState sState;
    const int64_t b = blockIdx.y;
    const Row r(scores, valid, b, S);
    const float* row = r.scores;
    const uint8_t* vrow = r.valid;
    uint32_t* rowHist = hist + b * kPasses * kBins;
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) h[i] = 0u;
    const SelectState st = replay(rowHist, pass, S, keep, &sState);  // its __syncthreads orders the clear
    if (st.done) return;  // uniform: this row needs no more passes
    const bool aligned = aligned16(row);
    const uint32_t mask = passMask(pass);
    const int shift = passShift(pass);
    const int64_t g0 = int64_t(blockIdx.x) * (kChunk / kGroup);
    for (int s = 0; s < kChunkSteps; ++s) {
        Group G;
        loadGroup(row, vrow, S, g0 + s * blockDim.x + threadIdx.x, aligned, G);
#pragma unroll
        for (int j = 0; j < kGroup; ++j)
            histAdd(h, (G.key[j] >> shift) & 0xffu, G.cls[j] == kReal && (G.key[j] & mask) == st.prefix);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kBins; i += blockDim.x)
        if (h[i]) atomicAdd(rowHist + pass * kBins + i, h[i]);
}

// Grid (chunks, B), after the 4 histogram passes. kWrite false: counts [B][chunks][3] <- each
// chunk's (greater, equal, padding) counts. kWrite true: index [B,k] <- each chunk's taken positions,
// starting from the sum of the counts of the chunks before it.
template <bool kWrite, typename IdxT>
__global__ void __launch_bounds__(kMultiThreads)
chunkKernel(const float* __restrict__ scores, const uint8_t* __restrict__ valid, int64_t S, int64_t k, Keep keep,
            const uint32_t* __restrict__ hist, uint32_t* __restrict__ counts, IdxT* __restrict__ index) {
    __shared__ u64 scratch[32];
    __shared__ uint32_t scratch32[32];
    __shared__ SelectState sState;
    const int64_t b = blockIdx.y;
    const Row r(scores, valid, b, S);
    const SelectState st = replay(hist + b * kPasses * kBins, kPasses, S, keep, &sState);
    const int64_t g0 = int64_t(blockIdx.x) * (kChunk / kGroup);
    uint32_t* mine = counts + (b * gridDim.x + blockIdx.x) * 3;
    if (!kWrite) {
        const Counts c = compact<false, IdxT>(r.scores, r.valid, S, g0, kChunkSteps, aligned16(r.scores), st,
                                              Counts{0u, 0u, 0u}, nullptr, scratch);
        if (threadIdx.x == 0) {
            mine[0] = c.gt;
            mine[1] = c.eq;
            mine[2] = c.pad;
        }
        return;
    }
    uint32_t gt = 0u, eq = 0u, pad = 0u;
    for (int64_t c = threadIdx.x; c < blockIdx.x; c += blockDim.x) {
        const uint32_t* q = counts + (b * gridDim.x + c) * 3;
        gt += q[0];
        eq += q[1];
        pad += q[2];
    }
    Counts base;
    device::blockExclusiveSum<uint32_t>(gt, base.gt, scratch32);
    device::blockExclusiveSum<uint32_t>(eq, base.eq, scratch32);
    device::blockExclusiveSum<uint32_t>(pad, base.pad, scratch32);
    compact<true>(r.scores, r.valid, S, g0, kChunkSteps, aligned16(r.scores), st, base, index + b * k, scratch);
}

int64_t chunksOf(int64_t S) { return (S + kChunk - 1) / kChunk; }
size_t histBytes(int64_t B) { return alignUp256(size_t(B) * kPasses * kBins * sizeof(uint32_t)); }
size_t countBytes(int64_t B, int64_t S) { return alignUp256(size_t(B) * size_t(chunksOf(S)) * 3 * sizeof(uint32_t)); }

template <typename IdxT>
cudaError_t launchTyped(const float* scores, const uint8_t* valid, int64_t B, int64_t S, int64_t k, Keep keep,
                        bool multi, IdxT* index, void* workspace, cudaStream_t stream) {
    if (!multi) {
        selectRowKernel<IdxT><<<unsigned(B), kSingleThreads, 0, stream>>>(scores, valid, S, k, keep, index);
        return cudaGetLastError();
    }
    if (workspace == nullptr || B > 65535) return cudaErrorInvalidValue;  // gridDim.y limit
    auto* hist = static_cast<uint32_t*>(workspace);                                          // [B][4][256]
    auto* counts = reinterpret_cast<uint32_t*>(static_cast<char*>(workspace) + histBytes(B));  // [B][chunks][3]
    cudaError_t err = cudaMemsetAsync(hist, 0, size_t(B) * kPasses * kBins * sizeof(uint32_t), stream);
    if (err != cudaSuccess) return err;
    const dim3 grid(unsigned(chunksOf(S)), unsigned(B));
    for (int pass = 0; pass < kPasses; ++pass)
        histChunkKernel<<<grid, kMultiThreads, 0, stream>>>(scores, valid, S, keep, pass, hist);
    chunkKernel<false, IdxT><<<grid, kMultiThreads, 0, stream>>>(scores, valid, S, k, keep, hist, counts, index);
    chunkKernel<true, IdxT><<<grid, kMultiThreads, 0, stream>>>(scores, valid, S, k, keep, hist, counts, index);
    return cudaGetLastError();
}

} // namespace

bool useMultiBlock(int64_t B, int64_t S) { return S > kMultiMinS && B * chunksOf(S) <= kMultiMaxBlocks; }

size_t selectWorkspaceSize(int64_t B, int64_t S) {
    if (B <= 0 || S <= 0) return 0;
    return histBytes(B) + countBytes(B, S);
}

cudaError_t launchSelect(const float* scores, const uint8_t* valid, int B, int S, Keep keep, SelectAlgo algo,
                         IndexKind ik, void* index, void* workspace, cudaStream_t stream) {
    if (B < 0 || S < 0 || !validKeep(keep)) return cudaErrorInvalidValue;
    const int64_t k = keepCount(S, keep);
    if (B == 0 || k == 0) return cudaSuccess;
    const bool multi = algo == SelectAlgo::kMultiBlock || (algo == SelectAlgo::kAuto && useMultiBlock(B, S));
    if (ik == IndexKind::kI32)
        return launchTyped(scores, valid, B, S, k, keep, multi, static_cast<int32_t*>(index), workspace, stream);
    return launchTyped(scores, valid, B, S, k, keep, multi, static_cast<int64_t*>(index), workspace, stream);
}

} // namespace topk
} // namespace tokenskip
