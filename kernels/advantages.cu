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
// rows); a block scans one chunk in tiles of blockDim * kItems positions aligned to
// multiples of the tile, latest tile first. Thread k of a tile owns the kItems consecutive
// positions [g0, g0 + kItems), g0 = tile end - kItems (k + 1), and reads them straight from
// global memory: one 16-byte load of fp32 rewards (values, outputs alike; 8 bytes of bf16,
// 4 of a bool mask) when every row starts on such a boundary, scalar loads otherwise; a warp
// covers 512 contiguous bytes either way. Masked inputs are loaded and then dropped by a
// select (never multiplied: NaN there never reaches an output).
//
// Each tile takes one of three paths, the same for the whole block:
//   fast: every position is a step (zero mode always; skip mode when the tile's valid
//     positions form at most one run and holes around it cannot matter: see below). Then
//     every thread's composite is p = gl^4, q = gamma gl^3, s = 0 with only (u, w) varying,
//     and the scan carries two numbers per thread with per-level constants (gl = gamma_lam).
//     Positions past T in the row's last tile are steps with r = V = 0: from the state (0, 0)
//     after the row's end they change nothing.
//   empty (skip mode, no valid position in the tile): outputs 0, the carry passes through.
//   general: the full maps (5 numbers), as the semantics above say.
// In skip mode a tile whose valid positions form one run [a, b) is a zero-mode tile when
// the row is this one tile, or when the run reaches the tile's first position (the carry out
// is the state at a) and either its last (no holes above) or the carry in is (0, 0). One
// barrier counts the run ends of the tile (__syncthreads_count; a warp with a hole inside one
// thread's positions votes 32 times).
//
// The scan: each thread composes its positions, warps scan their threads' composites with
// shuffles (lane order = processing order), the warp totals go through shared memory
// (double-buffered by tile parity) and every warp scans them again itself: one barrier per
// tile (two in skip mode), and each thread replays the plain recurrence over its positions
// from the state entering them. The state leaving a tile is the carry into the next one.
//
// Rows of several chunks take two launches. The summary pass stores each chunk's composite
// map (5 numbers); the scan pass starts each chunk from the state its row has after it: one
// warp composes the maps of the later chunks of the row, in a fixed order, and applies them
// to (0, 0). Fixed order everywhere: deterministic.
#include "common.cuh"

namespace fastrlhf {
namespace {

constexpr int kItems = kGroup;  // positions per thread in a tile
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

template <typename A> __device__ __forceinline__ StepMap<A> shfl(const StepMap<A>& m, int lane) {
  return {__shfl_sync(0xffffffffu, m.p, lane), __shfl_sync(0xffffffffu, m.q, lane),
          __shfl_sync(0xffffffffu, m.u, lane), __shfl_sync(0xffffffffu, m.s, lane),
          __shfl_sync(0xffffffffu, m.w, lane)};
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

// ----------------------------------------------------------- the fast path's composites
// A span of n >= 1 steps whose maps all have s = 0 composes to p = gl^n, q = gamma gl^(n-1),
// s = 0; Span holds (p, q) of such a span. Composing two spans: (p1 p2, p2 q1).
template <typename A> struct Span {
  A p, q;
};

template <typename A> __device__ __forceinline__ Span<A> twice(const Span<A>& a) { return {a.p * a.p, a.p * a.q}; }
template <typename A> __device__ __forceinline__ Span<A> join(const Span<A>& a, const Span<A>& b) {
  return {a.p * b.p, b.p * a.q};
}

// The span of n * unit steps (n >= 1), by doubling.
template <typename A> __device__ __forceinline__ Span<A> span_of(Span<A> unit, int n) {
  Span<A> out = unit;
  bool first = true;
  for (; n > 0; n >>= 1, unit = twice(unit)) {
    if (n & 1) {
      out = first ? unit : join(out, unit);
      first = false;
    }
  }
  return out;
}

// (u, w) of a fast-path composite: A' = p A + q nv + u, nv' = w, its (p, q) known by its span.
template <typename A> struct Part {
  A u, w;
};

template <typename A> __device__ __forceinline__ Part<A> shfl_up(const Part<A>& m, int delta) {
  return {__shfl_up_sync(0xffffffffu, m.u, delta), __shfl_up_sync(0xffffffffu, m.w, delta)};
}

// Inclusive scan of parts over the lanes, each lane's part spanning `unit`; returns the span
// of 32 lanes.
template <typename A> __device__ __forceinline__ Span<A> warp_scan(Part<A>& m, Span<A> unit, int lane) {
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const Part<A> before = shfl_up(m, delta);
    if (lane >= delta) m.u = fma(unit.p, before.u, fma(unit.q, before.w, m.u));  // m (span `unit`) after before
    unit = twice(unit);
  }
  return unit;
}

// ------------------------------------------------------------------- loading and storing
// (kernels are templated on numbers, not on these types: their names stay readable)
// One thread's kItems positions of a tile: (u, w) = (r - V, V) where valid, else (0, 0), and
// which positions are valid and which lie inside the chunk (position order: k = 0 earliest).
template <typename A> struct Group {
  A u[kItems], w[kItems];
  uint32_t valid, inside;  // bit k: position k is valid, inside the chunk
};

__device__ __forceinline__ bool bit(uint32_t bits, int k) { return (bits >> k) & 1u; }

template <typename A> struct GaeArgs {
  int64_t B, T, chunk, n_chunks;
  fastrlhf_rows rewards, values, mask;
  bool has_values, skip;
  A gamma, gl;
  A* maps;
  A* adv;
  A* ret;
};

// A row's inputs and outputs, addressed once per work item (then 32-bit-free offsets t).
template <typename A> struct Row {
  const char* r;
  const char* v;
  const char* m;
  A* adv;
  A* ret;
};

template <typename A> __device__ __forceinline__ Row<A> row_of(const GaeArgs<A>& a, int64_t row) {
  auto at = [row](const fastrlhf_rows& t) {
    return static_cast<const char*>(t.data) + row * t.row_stride * dtype_bytes(t.dtype);
  };
  return {at(a.rewards), a.has_values ? at(a.values) : nullptr, at(a.mask), a.adv + row * a.T,
          a.has_values ? a.ret + row * a.T : nullptr};
}

template <typename A> __device__ __forceinline__ void finish(Group<A>& g, const A (&r)[kItems], const A (&v)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) {  // selects: a masked NaN never reaches a result
    g.u[k] = bit(g.valid, k) ? r[k] - v[k] : A(0);
    g.w[k] = bit(g.valid, k) ? v[k] : A(0);
  }
}

// Any layout and dtypes: scalar loads, each input in its own dtype (a switch the block takes
// the same way), the mask of any dtype.
template <typename A> struct AnyIO {
  static __device__ __forceinline__ bool valid(const GaeArgs<A>& a, const Row<A>& row, int t) {
    return mask_at({row.m, a.mask.dtype, 0}, t);
  }

  static __device__ __forceinline__ Group<A> load(const GaeArgs<A>& a, const Row<A>& row, int g0, int end) {
    Group<A> g{{}, {}, 0u, 0u};
    A r[kItems], v[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int t = g0 + k;
      const bool in = t < end;
      g.inside |= uint32_t(in) << k;
      g.valid |= uint32_t(in && valid(a, row, t)) << k;
      r[k] = in ? load_as<A>({row.r, a.rewards.dtype, 0}, t) : A(0);
      v[k] = in && a.has_values ? load_as<A>({row.v, a.values.dtype, 0}, t) : A(0);
    }
    finish(g, r, v);
    return g;
  }

  static __device__ __forceinline__ void store(const GaeArgs<A>& a, const Row<A>& row, int g0, const Group<A>& g,
                                               const A (&adv)[kItems], const A (&ret)[kItems]) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (!bit(g.inside, k)) continue;
      row.adv[g0 + k] = adv[k];
      if (a.has_values) row.ret[g0 + k] = ret[k];
    }
  }
};

// The common layout: rewards and values in the accumulation dtype, a mask of kMaskBytes
// bytes, every row starting on a 16-byte boundary (as kItems positions of each), T a
// multiple of kItems: a group is one load per 16 bytes, all inside the chunk or all outside.
template <typename A, int kMaskBytes> struct VecIO {
  // The mask's bits at t that must not all be 0 (a float's sign bit dropped).
  static __device__ __forceinline__ bool valid(const GaeArgs<A>& a, const Row<A>& row, int t) {
    if (kMaskBytes == 1) return reinterpret_cast<const uint8_t*>(row.m)[t] != 0;
    const uint32_t sign = dtype_is_float(a.mask.dtype) ? 0x7fffffffu : 0xffffffffu;
    if (kMaskBytes == 4) return (reinterpret_cast<const uint32_t*>(row.m)[t] & sign) != 0;
    const uint2 w = reinterpret_cast<const uint2*>(row.m)[t];
    return (w.x | (w.y & sign)) != 0;
  }

  static __device__ __forceinline__ Group<A> load(const GaeArgs<A>& a, const Row<A>& row, int g0, int end) {
    Group<A> g{{}, {}, 0u, 0u};
    A r[kItems] = {}, v[kItems] = {};
    if (g0 < end) {  // the whole group (T is a multiple of kItems)
      g.valid = mask_group<kMaskBytes>({row.m, a.mask.dtype, 0}, g0);
      g.inside = (1u << kItems) - 1;
      load_group(row.r, g0, r);
      if (a.has_values) load_group(row.v, g0, v);
    }
    finish(g, r, v);
    return g;
  }

  static __device__ __forceinline__ void store(const GaeArgs<A>& a, const Row<A>& row, int g0, const Group<A>& g,
                                               const A (&adv)[kItems], const A (&ret)[kItems]) {
    if (g.inside == 0) return;
    store_group(row.adv, g0, adv);
    if (a.has_values) store_group(row.ret, g0, ret);
  }
};

// The composite of the maps of chunks n_chunks - 1, ..., c + 1 of a row (in that order), on
// the last lane of the calling warp. Lane L composes the L-th run of ceil(n / 32)
// consecutive maps; a warp scan composes the runs.
template <typename A>
__device__ __forceinline__ StepMap<A> later_chunks(const A* row_maps, int64_t c, int64_t n_chunks, int lane) {
  const int64_t n = n_chunks - 1 - c;
  const int64_t run = (n + kWarpSize - 1) / kWarpSize;
  StepMap<A> mine = identity_map<A>();
#pragma unroll 1  // a few maps per lane: no unrolled copies
  for (int64_t k = lane * run; k < (lane + 1) * run && k < n; ++k) {
    const A* m = row_maps + (n_chunks - 1 - k) * 5;
    mine = then(mine, StepMap<A>{m[0], m[1], m[2], m[3], m[4]});
  }
  return warp_scan(mine, lane);
}

// kMaskBytes: 0 any layout (AnyIO), else VecIO with masks of that many bytes.
template <typename A, int kMaskBytes> struct IOFor { using type = VecIO<A, kMaskBytes>; };
template <typename A> struct IOFor<A, 0> { using type = AnyIO<A>; };

// ----------------------------------------------------------------------------- the kernel
enum class Path { kFast, kEmpty, kGeneral };

// The fast path's spans, per block: a thread's composite (kItems steps), the lanes before
// lane L (L threads), the warps before warp W (32 W threads) and the whole block.
template <typename A> struct FastSpans {
  Span<A> unit, block;
  Span<A> lanes[kWarpSize];
  Span<A> warps[kMaxWarps];
};

template <typename A> __device__ __forceinline__ void fill_spans(FastSpans<A>& sp, A gamma, A gl) {
  const Span<A> unit = twice(twice(Span<A>{gl, gamma}));  // kItems = 4 steps
  const int t = threadIdx.x;
  if (t == 0) {
    sp.unit = unit;
    sp.block = span_of(unit, static_cast<int>(blockDim.x));
  }
  if (t < kWarpSize) sp.lanes[t] = span_of(unit, t > 0 ? t : 1);
  if (t < kMaxWarps) sp.warps[t] = span_of(unit, t > 0 ? t * kWarpSize : 1);
  __syncthreads();
}

// One block per (row, chunk) work item, item = row * n_chunks + c; chunk c covers positions
// [c * chunk, min((c + 1) * chunk, T)). kSummary: write the chunk's composite map to
// maps[item * 5 ..] (chunks c >= 1 only: no scan reads chunk 0's). Else: scan the chunk from
// the state after it (read from the maps of the later chunks) and write the outputs.
// Blocks of kMaxScanThreads per SM the registers must allow: 2 (64 registers: 50 % of the
// threads resident), fp64 1 (its maps take twice the registers).
template <typename A> constexpr int kGaeMinBlocks = sizeof(A) == 8 ? 1 : 2;

template <typename A, bool kSummary, int kMaskBytes>
__global__ void __launch_bounds__(kMaxScanThreads, kGaeMinBlocks<A>) gae_kernel(const GaeArgs<A> a) {
  using IO = typename IOFor<A, kMaskBytes>::type;
  __shared__ StepMap<A> warp_maps[2][kMaxWarps];  // by tile parity: one barrier per tile
  __shared__ Part<A> warp_parts[2][kMaxWarps];
  __shared__ FastSpans<A> spans;
  __shared__ A s_state[2];  // the state after the chunk
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  const int tile = blockDim.x * kItems;
  fill_spans(spans, a.gamma, a.gl);
  int parity = 0;

  for (int64_t item = blockIdx.x; item < a.B * a.n_chunks; item += gridDim.x) {
    const int64_t row = item / a.n_chunks;
    const int c = static_cast<int>(item % a.n_chunks);
    if (kSummary && c == 0) continue;
    // positions inside a row in 32 bits (T < 2^31)
    const int lo = c * static_cast<int>(a.chunk);
    const int end = a.T - lo > a.chunk ? lo + static_cast<int>(a.chunk) : static_cast<int>(a.T);
    const bool one_tile = a.n_chunks == 1 && a.T <= tile;  // the whole row in one tile
    const Row<A> rw = row_of(a, row);
    StepMap<A> chunk_map = identity_map<A>();  // summary: the tiles composed so far
    A carry_a = A(0), carry_nv = A(0);  // scan: the state after the tile; nothing follows the row
    if (!kSummary && c + 1 < a.n_chunks) {
      if (warp == 0) {
        const StepMap<A> later = later_chunks(a.maps + row * a.n_chunks * 5, c, a.n_chunks, lane);
        if (lane == kWarpSize - 1) {
          s_state[0] = later.u;  // applied to (0, 0)
          s_state[1] = later.w;
        }
      }
      __syncthreads();  // s_state is rewritten only after this item's tile barriers
      carry_a = s_state[0];
      carry_nv = s_state[1];
    }
    for (int base = lo + (end - 1 - lo) / tile * tile; base >= lo; base -= tile, parity ^= 1) {  // the main loop
      const int g0 = base + tile - kItems * (threadIdx.x + 1);
      const Group<A> g = IO::load(a, rw, g0, end);

      Path path = Path::kFast;
      if (a.skip) {
        // Run ends at this thread's positions: valid here, not at the next position (the
        // tile's and the chunk's ends count as not valid). A hole between two valid positions
        // of one thread makes its whole warp vote (two runs at least).
        const int next = g0 + kItems;
        const int top = (base + tile < end ? base + tile : end) - 1;
        // read with the group, not after the vote: no load waits for loaded data
        const uint32_t above = threadIdx.x > 0 && next < end && IO::valid(a, rw, next);
        const bool first = IO::valid(a, rw, base), last = IO::valid(a, rw, top);
        const uint32_t after = (g.valid >> 1) | (above << (kItems - 1));  // bit k: position k + 1 valid
        const bool run_end = (g.valid & ~after) != 0;
        const uint32_t lowest = g.valid & (0u - g.valid);  // adding it clears the lowest run
        const bool hole_inside = ((g.valid + lowest) & g.valid) != 0;
        const bool warp_hole = __any_sync(0xffffffffu, hole_inside);
        const int runs = __syncthreads_count(run_end || warp_hole);
        if (runs == 0) {
          path = Path::kEmpty;
        } else if (runs == 1) {
          const bool fast = kSummary ? (first && last)
                                     : (one_tile || (first && (last || (carry_a == A(0) && carry_nv == A(0)))));
          path = fast ? Path::kFast : Path::kGeneral;
        } else {
          path = Path::kGeneral;
        }
      }

      if (path == Path::kEmpty) {  // skip mode, no valid position: zeros, the carry passes
        if (!kSummary) IO::store(a, rw, g0, g, g.u, g.w);
        continue;
      }

      if (path == Path::kFast) {
        // This thread's composite: its kItems positions are all steps (r = V = 0 where masked).
        Part<A> inclusive{g.u[kItems - 1], g.w[0]};
#pragma unroll
        for (int k = kItems - 2; k >= 0; --k) inclusive.u = fma(a.gl, inclusive.u, fma(a.gamma, g.w[k + 1], g.u[k]));
        const Span<A> warp_span = warp_scan(inclusive, spans.unit, lane);
        if (lane == kWarpSize - 1) warp_parts[parity][warp] = inclusive;
        __syncthreads();
        Part<A> total = lane < n_warps ? warp_parts[parity][lane] : Part<A>{A(0), A(0)};
        warp_scan(total, warp_span, lane);  // every warp scans the warp totals itself
        const Part<A> block{__shfl_sync(0xffffffffu, total.u, n_warps - 1),
                            __shfl_sync(0xffffffffu, total.w, n_warps - 1)};
        if (kSummary) {
          chunk_map = then(chunk_map, StepMap<A>{spans.block.p, spans.block.q, block.u, A(0), block.w});
          continue;
        }
        const Part<A> before_warp{__shfl_sync(0xffffffffu, total.u, warp > 0 ? warp - 1 : 0),
                                  __shfl_sync(0xffffffffu, total.w, warp > 0 ? warp - 1 : 0)};
        const Part<A> before_lane = shfl_up(inclusive, 1);
        A x = carry_a, nv = carry_nv;  // the state entering this thread's positions
        if (warp > 0) {
          const Span<A> sw = spans.warps[warp];
          x = fma(sw.p, x, fma(sw.q, nv, before_warp.u));
          nv = before_warp.w;
        }
        if (lane > 0) {
          const Span<A> sl = spans.lanes[lane];
          x = fma(sl.p, x, fma(sl.q, nv, before_lane.u));
          nv = before_lane.w;
        }
        A adv[kItems], ret[kItems];
#pragma unroll
        for (int k = kItems - 1; k >= 0; --k) {
          x = fma(a.gl, x, fma(a.gamma, nv, g.u[k]));
          nv = g.w[k];
          adv[k] = bit(g.valid, k) ? x : A(0);
          ret[k] = bit(g.valid, k) ? x + g.w[k] : A(0);
        }
        IO::store(a, rw, g0, g, adv, ret);
        const A next_a = fma(spans.block.p, carry_a, fma(spans.block.q, carry_nv, block.u));
        carry_nv = block.w;
        carry_a = next_a;
        continue;
      }

      // The general path: this thread's positions composed in processing order.
      const uint32_t steps = a.skip ? g.valid : g.inside;
      StepMap<A> mine = identity_map<A>();
#pragma unroll
      for (int k = kItems - 1; k >= 0; --k) {
        if (bit(steps, k)) mine = then(mine, StepMap<A>{a.gl, a.gamma, g.u[k], A(0), g.w[k]});
      }
      const StepMap<A> inclusive = warp_scan(mine, lane);
      if (lane == kWarpSize - 1) warp_maps[parity][warp] = inclusive;
      __syncthreads();
      StepMap<A> total = lane < n_warps ? warp_maps[parity][lane] : identity_map<A>();
      total = warp_scan(total, lane);  // every warp scans the warp totals itself
      const StepMap<A> block = shfl(total, n_warps - 1);
      if (kSummary) {
        chunk_map = then(chunk_map, block);
        continue;
      }
      // The exclusive prefix: the maps of every earlier thread in the block.
      const StepMap<A> in_warp = shfl_up(inclusive, 1);
      const StepMap<A> before_warp = shfl(total, warp > 0 ? warp - 1 : 0);
      StepMap<A> prefix = lane > 0 ? in_warp : identity_map<A>();
      if (warp > 0) prefix = then(before_warp, prefix);
      A x = prefix.p * carry_a + prefix.q * carry_nv + prefix.u;
      A nv = prefix.s * carry_nv + prefix.w;
      A adv[kItems], ret[kItems];
#pragma unroll
      for (int k = kItems - 1; k >= 0; --k) {
        if (bit(steps, k)) {
          x = a.gl * x + a.gamma * nv + g.u[k];
          nv = g.w[k];
        }
        adv[k] = bit(g.valid, k) ? x : A(0);
        ret[k] = bit(g.valid, k) ? x + g.w[k] : A(0);
      }
      IO::store(a, rw, g0, g, adv, ret);
      const A next_a = block.p * carry_a + block.q * carry_nv + block.u;
      carry_nv = block.s * carry_nv + block.w;
      carry_a = next_a;
    }
    if (kSummary && threadIdx.x == 0) {
      A* out = a.maps + item * 5;
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
    if (method == FASTRLHF_GRPO) {  // unbiased std, second pass
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
      if (method == FASTRLHF_GRPO) {
        y = (x - mean) / denom;
      } else if (method == FASTRLHF_RLOO) {  // minus the mean of the others
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

namespace fastrlhf {
namespace {

// Whether every row of t starts on a 16-byte boundary, as kItems positions of it do (t
// absent: yes).
bool rows_vectorize(const fastrlhf_rows& t) {
  if (t.data == nullptr) return true;
  const int64_t bytes = dtype_bytes(t.dtype);
  const int64_t group = bytes * kItems < 16 ? bytes * kItems : 16;
  return reinterpret_cast<uintptr_t>(t.data) % group == 0 && (t.row_stride * bytes) % group == 0;
}

template <typename A, int kMaskBytes>
cudaError_t launch_gae(const GaeArgs<A>& args, unsigned int grid, int threads, cudaStream_t stream) {
  if (args.n_chunks > 1) {
    gae_kernel<A, true, kMaskBytes><<<grid, threads, 0, stream>>>(args);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  gae_kernel<A, false, kMaskBytes><<<grid, threads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_gae_fwd(const fastrlhf_gae_params* params, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_gae_params& p = *params;
  if (p.B <= 0 || p.T <= 0) return cudaSuccess;
  if (p.threads < kWarpSize || p.threads > kMaxScanThreads || (p.threads & (p.threads - 1)) != 0 ||
      p.chunk < 1 || p.T >= (int64_t(1) << 31) - 4 * kMaxScanThreads)
    return cudaErrorInvalidValue;
  const int64_t n_chunks = p.chunk >= p.T ? 1 : (p.T + p.chunk - 1) / p.chunk;
  if (n_chunks > 1 && (p.maps == nullptr || p.chunk % (int64_t(p.threads) * kItems) != 0))
    return cudaErrorInvalidValue;
  return with_acc(p.acc, [&](auto tag) {
    using A = decltype(tag);
    const GaeArgs<A> args{p.B, p.T, n_chunks > 1 ? p.chunk : p.T, n_chunks, p.rewards, p.values, p.mask,
                          p.values.data != nullptr, p.skip_holes != 0, static_cast<A>(p.gamma),
                          static_cast<A>(p.gamma_lam), static_cast<A*>(p.maps), static_cast<A*>(p.advantages),
                          static_cast<A*>(p.returns)};
    const unsigned int grid = grid_for(p.B * n_chunks);
    // 16-byte groups when the inputs are in the accumulation dtype and every row of every input
    // and output starts on a group boundary; else scalar loads of any dtype and layout
    const fastrlhf_dtype acc = sizeof(A) == 8 ? FASTRLHF_FLOAT64 : FASTRLHF_FLOAT32;
    const int mask_bytes = dtype_bytes(p.mask.dtype);
    const bool vec = p.T % kItems == 0 && p.rewards.dtype == acc && (!args.has_values || p.values.dtype == acc) &&
                     rows_vectorize(p.rewards) && rows_vectorize(p.values) && rows_vectorize(p.mask) &&
                     mask_bytes != 2 && reinterpret_cast<uintptr_t>(p.advantages) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.returns) % 16 == 0;
    if (vec && mask_bytes == 1) return launch_gae<A, 1>(args, grid, p.threads, stream);
    if (vec && mask_bytes == 4) return launch_gae<A, 4>(args, grid, p.threads, stream);
    if (vec && mask_bytes == 8) return launch_gae<A, 8>(args, grid, p.threads, stream);
    return launch_gae<A, 0>(args, grid, p.threads, stream);
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
