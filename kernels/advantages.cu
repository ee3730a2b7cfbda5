// GAE / discounted returns (a reverse scan) and group advantages (GRPO, RLOO, Dr.GRPO).
//
// Same semantics as fastrlhf/triton/advantages.py. GAE walks a row backwards with the state
// (A, nv): the running advantage and the value of the next valid step. Each position maps
// the state affinely,
//   valid step:        A' = gamma_lam * A + gamma * nv + (r - V),  nv' = V
//   hole, skip mode:   the identity (the step does not exist)
//   hole, zero mode:   a step with r = V = 0
// and such maps A' = p A + q nv + u, nv' = s nv + w compose into maps of the same form.
//
// A row is cut into chunks of `chunk` positions (one chunk when the launcher keeps whole
// rows); a block scans one chunk in tiles of blockDim * kItems positions, latest first,
// staged through shared memory so global loads and stores stay coalesced. Each thread owns
// kItems consecutive positions: it composes their maps, an exclusive scan of those
// composites across the block (warp shuffles, then one warp over the warp totals) gives the
// state entering its positions, and it replays the plain recurrence over them. The state
// leaving a tile is the carry into the next one.
//
// Rows of several chunks take two launches. The summary pass stores each chunk's composite
// map (5 numbers); the scan pass starts each chunk from the state its row has after it: one
// warp composes the maps of the later chunks of the row, in a fixed order, and applies them
// to (0, 0). Fixed order everywhere: deterministic.
#include "common.cuh"

namespace fastrlhf {
namespace {

constexpr int kItems = 4;
constexpr int kMaxScanThreads = 512;

template <typename A> struct StepMap {
  A p, q, u, s, w;  // A' = p A + q nv + u,  nv' = s nv + w
};

template <typename A> __device__ __forceinline__ StepMap<A> identity_map() {
  return {A(1), A(0), A(0), A(1), A(0)};
}

// The map of `later` (applied first), then `earlier`.
template <typename A>
__device__ __forceinline__ StepMap<A> then(const StepMap<A>& later, const StepMap<A>& earlier) {
  return {earlier.p * later.p, earlier.p * later.q + earlier.q * later.s,
          earlier.p * later.u + earlier.q * later.w + earlier.u, earlier.s * later.s,
          earlier.s * later.w + earlier.w};
}

template <typename A> __device__ __forceinline__ StepMap<A> shfl_up(const StepMap<A>& m, int delta) {
  return {__shfl_up_sync(0xffffffffu, m.p, delta), __shfl_up_sync(0xffffffffu, m.q, delta),
          __shfl_up_sync(0xffffffffu, m.u, delta), __shfl_up_sync(0xffffffffu, m.s, delta),
          __shfl_up_sync(0xffffffffu, m.w, delta)};
}

// Inclusive scan over the lanes of a warp, lane order = processing order.
template <typename A> __device__ __forceinline__ StepMap<A> warp_scan(StepMap<A> m, int lane) {
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const StepMap<A> before = shfl_up(m, delta);
    if (lane >= delta) m = then(before, m);
  }
  return m;
}

// The composite of the maps of chunks n_chunks - 1, ..., c + 1 of a row (in that order), on
// the last lane of the calling warp. Lane L composes the L-th run of ceil(n / 32)
// consecutive maps; a warp scan composes the runs.
template <typename A>
__device__ __forceinline__ StepMap<A> later_chunks(const A* row_maps, int64_t c, int64_t n_chunks,
                                                   int lane) {
  const int64_t n = n_chunks - 1 - c;
  const int64_t run = (n + kWarpSize - 1) / kWarpSize;
  StepMap<A> mine = identity_map<A>();
  for (int64_t k = lane * run; k < (lane + 1) * run && k < n; ++k) {
    const A* m = row_maps + (n_chunks - 1 - k) * 5;
    mine = then(mine, StepMap<A>{m[0], m[1], m[2], m[3], m[4]});
  }
  return warp_scan(mine, lane);
}

// Shared-memory slot of tile position i: one pad word per 32 keeps both the coalesced
// staging loops and the per-thread kItems reads free of bank conflicts.
__device__ __forceinline__ int slot(int i) { return i + (i >> 5); }

// One block per (row, chunk) work item, item = row * n_chunks + c; chunk c covers positions
// [c * chunk, min((c + 1) * chunk, T)). kSummary: write the chunk's composite map to
// maps[item * 5 ..] (chunks c >= 1 only: no scan reads chunk 0's). Else: scan the chunk from
// the state after it (read from the maps of the later chunks) and write the outputs.
template <typename A, bool kSummary>
__global__ void __launch_bounds__(kMaxScanThreads) gae_kernel(
    int64_t B, int64_t T, int64_t chunk, int64_t n_chunks, fastrlhf_rows rewards,
    fastrlhf_rows values, bool has_values, fastrlhf_rows mask, A gamma, A gamma_lam,
    bool skip_holes, A* __restrict__ maps, A* __restrict__ adv, A* __restrict__ ret) {
  constexpr int kSlots = kMaxScanThreads * kItems + kMaxScanThreads * kItems / kWarpSize;
  constexpr uint8_t kValid = 1, kStep = 2;
  __shared__ A s_u[kSlots];  // r - V, then the advantage
  __shared__ A s_w[kSlots];  // V, then the return
  __shared__ uint8_t s_flags[kSlots];
  __shared__ StepMap<A> warp_maps[kMaxWarps];
  __shared__ A s_state[2];  // the state after the chunk
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  const int tile = blockDim.x * kItems;

  for (int64_t item = blockIdx.x; item < B * n_chunks; item += gridDim.x) {
    const int64_t row = item / n_chunks, c = item % n_chunks;
    if (kSummary && c == 0) continue;
    const int64_t lo = c * chunk;
    const int64_t end = T - lo > chunk ? lo + chunk : T;
    StepMap<A> chunk_map = identity_map<A>();  // summary: the tiles composed so far
    A carry_a = A(0), carry_nv = A(0);  // scan: the state after the tile; nothing follows the row
    if (!kSummary && c + 1 < n_chunks) {
      if (warp == 0) {
        const StepMap<A> later = later_chunks(maps + row * n_chunks * 5, c, n_chunks, lane);
        if (lane == kWarpSize - 1) {
          s_state[0] = later.u;  // applied to (0, 0)
          s_state[1] = later.w;
        }
      }
      __syncthreads();  // s_state is rewritten only after this item's tile barriers
      carry_a = s_state[0];
      carry_nv = s_state[1];
    }
    for (int64_t hi = end; hi > lo; hi -= tile) {
      // Stage the tile, latest position first: tile index i is position hi - 1 - i. Inputs
      // are read without waiting on the mask and zeroed where masked.
      for (int i = threadIdx.x; i < tile; i += blockDim.x) {
        const int64_t t = hi - 1 - i;
        const bool inside = t >= lo;
        const bool valid = inside && mask_at(mask, row * mask.row_stride + t);
        const A r = inside ? load_as<A>(rewards, row * rewards.row_stride + t) : A(0);
        const A v = inside && has_values ? load_as<A>(values, row * values.row_stride + t) : A(0);
        s_u[slot(i)] = valid ? r - v : A(0);
        s_w[slot(i)] = valid ? v : A(0);
        s_flags[slot(i)] = (valid ? kValid : 0) | (valid || (inside && !skip_holes) ? kStep : 0);
      }
      __syncthreads();
      // This thread's kItems positions, composed in processing order.
      StepMap<A> mine = identity_map<A>();
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int i = slot(threadIdx.x * kItems + k);
        if (s_flags[i] & kStep) mine = then(mine, StepMap<A>{gamma_lam, gamma, s_u[i], A(0), s_w[i]});
      }
      // Inclusive scan of the composites: warps, then warp 0 over the warp totals.
      const StepMap<A> inclusive = warp_scan(mine, lane);
      if (lane == kWarpSize - 1) warp_maps[warp] = inclusive;
      __syncthreads();
      if (warp == 0) {
        StepMap<A> total = lane < n_warps ? warp_maps[lane] : identity_map<A>();
        total = warp_scan(total, lane);
        if (lane < n_warps) warp_maps[lane] = total;
      }
      __syncthreads();
      const StepMap<A> total = warp_maps[n_warps - 1];  // the whole tile
      if (kSummary) {  // read before the next tile's first barrier: no overwrite race
        chunk_map = then(chunk_map, total);
        continue;
      }
      // The exclusive prefix: the maps of every earlier thread in the block.
      const StepMap<A> in_warp = shfl_up(inclusive, 1);
      StepMap<A> prefix = lane > 0 ? in_warp : identity_map<A>();
      if (warp > 0) prefix = then(warp_maps[warp - 1], prefix);

      // Replay the recurrence over this thread's positions from the state entering them;
      // each thread overwrites only its own slots with the outputs.
      A a = prefix.p * carry_a + prefix.q * carry_nv + prefix.u;
      A nv = prefix.s * carry_nv + prefix.w;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int i = slot(threadIdx.x * kItems + k);
        const uint8_t flags = s_flags[i];
        const A w = s_w[i];
        if (flags & kStep) {
          a = gamma_lam * a + gamma * nv + s_u[i];
          nv = w;
        }
        s_u[i] = flags & kValid ? a : A(0);
        s_w[i] = flags & kValid ? a + w : A(0);
      }
      const A next_a = total.p * carry_a + total.q * carry_nv + total.u;
      carry_nv = total.s * carry_nv + total.w;
      carry_a = next_a;
      __syncthreads();
      for (int i = threadIdx.x; i < tile; i += blockDim.x) {  // coalesced stores
        const int64_t t = hi - 1 - i;
        if (t < lo) break;
        adv[row * T + t] = s_u[slot(i)];
        if (has_values) ret[row * T + t] = s_w[slot(i)];
      }
      __syncthreads();  // the next tile restages the shared arrays
    }
    if (kSummary && threadIdx.x == 0) {
      A* out = maps + item * 5;
      out[0] = chunk_map.p;
      out[1] = chunk_map.q;
      out[2] = chunk_map.u;
      out[3] = chunk_map.s;
      out[4] = chunk_map.w;
    }
  }
}

// Statistics and outputs in double (STATS_DTYPE of fastrlhf/_numerics.py: no finite fp32 score
// overflows them), stored as A.
template <typename A>
__global__ void group_advantages_kernel(fastrlhf_rows scores, int64_t n_groups, int64_t G,
                                        int method, A eps, A* __restrict__ out) {
  using S = double;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * warps_per_block;
  const bool many = G > 1;  // a group of one has no baseline: mean 0, std 1
  // One warp per group; lanes stride over its members, warp sums in a fixed order.
  for (int64_t g = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; g < n_groups; g += stride) {
    const int64_t base = g * G;
    S total = S(0);
    for (int64_t i = lane; i < G; i += kWarpSize) total += load_as<S>(scores, base + i);
    total = warp_reduce<SumOp<S>>(total);
    const S mean = many ? total / S(G) : S(0);
    S denom = S(1);
    if (method == 0) {  // grpo: unbiased std, second pass
      S ss = S(0);
      for (int64_t i = lane; i < G; i += kWarpSize) {
        const S d = load_as<S>(scores, base + i) - mean;
        ss += d * d;
      }
      ss = warp_reduce<SumOp<S>>(ss);
      denom = (many ? sqrt(ss / S(G - 1)) : S(1)) + S(eps);
    }
    for (int64_t i = lane; i < G; i += kWarpSize) {
      const S x = load_as<S>(scores, base + i);
      S y;
      if (method == 0) {
        y = (x - mean) / denom;
      } else if (method == 1) {  // rloo: minus the mean of the others
        y = many ? x - (total - x) / S(G - 1) : x;
      } else {
        y = x - mean;
      }
      out[base + i] = static_cast<A>(y);
    }
  }
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_gae_fwd(const fastrlhf_gae_params* params, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_gae_params& p = *params;
  if (p.B <= 0 || p.T <= 0) return cudaSuccess;
  if (p.threads < kWarpSize || p.threads > kMaxScanThreads || (p.threads & (p.threads - 1)) != 0 ||
      p.chunk < 1)
    return cudaErrorInvalidValue;
  const int64_t n_chunks = p.chunk >= p.T ? 1 : (p.T + p.chunk - 1) / p.chunk;
  if (n_chunks > 1 && p.maps == nullptr) return cudaErrorInvalidValue;
  return with_acc(p.acc, [&](auto tag) {
    using A = decltype(tag);
    const unsigned int grid = grid_for(p.B * n_chunks);
    const bool has_values = p.values.data != nullptr;
    if (n_chunks > 1) {
      gae_kernel<A, true><<<grid, p.threads, 0, stream>>>(
          p.B, p.T, p.chunk, n_chunks, p.rewards, p.values, has_values, p.mask, static_cast<A>(p.gamma),
          static_cast<A>(p.gamma_lam), p.skip_holes != 0, static_cast<A*>(p.maps), nullptr, nullptr);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    gae_kernel<A, false><<<grid, p.threads, 0, stream>>>(
        p.B, p.T, p.chunk, n_chunks, p.rewards, p.values, has_values, p.mask, static_cast<A>(p.gamma),
        static_cast<A>(p.gamma_lam), p.skip_holes != 0, static_cast<A*>(p.maps),
        static_cast<A*>(p.advantages), static_cast<A*>(p.returns));
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fastrlhf_group_advantages_fwd(fastrlhf_rows scores, int64_t n_groups, int64_t group_size,
                                                     int method, double eps, fastrlhf_dtype acc, void* out,
                                                     cudaStream_t stream) {
  using namespace fastrlhf;
  if (n_groups <= 0) return cudaSuccess;
  constexpr int kThreads = 256;
  constexpr int64_t kGroupsPerBlock = kThreads / kWarpSize;
  return with_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    group_advantages_kernel<A><<<grid_for((n_groups + kGroupsPerBlock - 1) / kGroupsPerBlock), kThreads, 0, stream>>>(
        scores, n_groups, group_size, method, static_cast<A>(eps), static_cast<A*>(out));
    return cudaGetLastError();
  });
}
