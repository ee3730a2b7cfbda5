// PPO clipped policy loss and clipped value loss: per-block partial sums (forward) and the
// elementwise gradient (backward).
//
// Same semantics as fastrlhf/triton/ppo.py. Forward: block p sums the loss, the minus
// log-ratio and the counts (valid, clipped, dual-clipped) over its contiguous share of the
// flattened tokens, in a fixed order; the caller sums the n_parts partials (no atomics: same
// input, same bits). A missing clip or clamp is +inf, which changes nothing.
#include "common.cuh"

namespace fastrlhf {
namespace {

constexpr int kThreads = 256;
// Blocks of kThreads per SM the registers must allow: 4 (64 registers), fp64 1 (its exp and
// four tokens of maps in flight need more).
template <typename A> constexpr int kMinBlocks = sizeof(A) == 8 ? 1 : 4;

template <typename A> struct Terms {
  A loss;        // the token's loss
  bool clipped;  // the clipped branch was taken
  bool lower;    // the dual clip was taken (policy)
  A lr;          // the clamped log-ratio (policy)
  A d;           // d loss / d x
};

// Policy: ratio bounds lo = 1 - clip_low, hi = 1 + clip_high, dual clip, log-ratio clamp.
template <typename A>
__device__ __forceinline__ Terms<A> policy_terms(A logp, A old, A adv, A lo, A hi, A dual_clip,
                                                 A log_ratio_clamp) {
  const A raw = logp - old;
  const A lr = clamp_abs(raw, log_ratio_clamp);
  const A ratio = exp(lr);
  const A loss1 = -adv * ratio;
  const A loss2 = -adv * (ratio < lo ? lo : (ratio > hi ? hi : ratio));
  const bool clipped = loss2 > loss1;
  const A loss = clipped ? loss2 : loss1;
  const A loss3 = -(adv < A(0) ? adv : A(-1)) * dual_clip;  // -A * c where A < 0; no 0 * inf
  const bool lower = adv < A(0) && loss > loss3;             // never without a dual clip
  const A d = (clipped || lower || fabs(raw) > log_ratio_clamp) ? A(0) : loss1;
  return {lower ? loss3 : loss, clipped, lower, lr, d};
}

// Value: clip of the value around the old value.
template <typename A> __device__ __forceinline__ Terms<A> value_terms(A v, A old, A ret, A clip) {
  const A err = v - ret;
  const A loss1 = err * err;
  const A lo = old - clip, hi = old + clip;
  const A err2 = (v < lo ? lo : (v > hi ? hi : v)) - ret;
  const A loss2 = err2 * err2;
  const bool clipped = loss2 > loss1;
  return {A(0.5) * (clipped ? loss2 : loss1), clipped, false, A(0), clipped ? A(0) : err};
}

// The clip arguments of both losses in the accumulation type (inf: off).
template <typename A> struct Clips {
  A ratio_low, ratio_high, dual_clip, log_ratio_clamp;  // policy
  A clip;                                               // value
};

template <bool kPolicy, typename A> __device__ __forceinline__ Terms<A> terms(A x, A old, A target, const Clips<A>& c) {
  if constexpr (kPolicy) {
    return policy_terms(x, old, target, c.ratio_low, c.ratio_high, c.dual_clip, c.log_ratio_clamp);
  } else {
    return value_terms(x, old, target, c.clip);
  }
}

template <typename A> struct Partial {
  A loss, neg_lr;
  int valid, clipped, lower;
};

template <typename A> struct PartialOp {
  static __device__ __forceinline__ Partial<A> identity() { return {A(0), A(0), 0, 0, 0}; }
  static __device__ __forceinline__ Partial<A> combine(const Partial<A>& a, const Partial<A>& b) {
    return {a.loss + b.loss, a.neg_lr + b.neg_lr, a.valid + b.valid, a.clipped + b.clipped,
            a.lower + b.lower};
  }
  static __device__ __forceinline__ Partial<A> shuffle_xor(const Partial<A>& v, int offset) {
    return {__shfl_xor_sync(0xffffffffu, v.loss, offset), __shfl_xor_sync(0xffffffffu, v.neg_lr, offset),
            __shfl_xor_sync(0xffffffffu, v.valid, offset), __shfl_xor_sync(0xffffffffu, v.clipped, offset),
            __shfl_xor_sync(0xffffffffu, v.lower, offset)};
  }
};

// Where a thread's tokens sit in their rows (seq-mean-token-mean divides each token's loss by
// its row's count): the row and column of its current token, advanced by a fixed step without
// a division per token (step = q rows + r columns, T and the step fixed per launch).
struct RowWalk {
  int64_t row;
  uint32_t col;

  __device__ __forceinline__ void advance(uint32_t q, uint32_t r, uint32_t T) {
    row += q;
    col += r;
    if (col >= T) {
      col -= T;
      row += 1;
    }
  }
};

__device__ __forceinline__ RowWalk walk_from(int64_t i, int64_t T) { return {i / T, static_cast<uint32_t>(i % T)}; }

// The row of the k-th token from the walk's token (k < kGroup).
__device__ __forceinline__ int64_t row_at(const RowWalk& w, const FastDiv& T, int k) {
  return w.row + divide(T, w.col + static_cast<uint32_t>(k));
}

// The per-launch constants of the token walk: T as a divisor, and a step of `step` tokens.
struct Walk {
  FastDiv T;
  uint32_t q, r;  // step = q * T + r
};

inline Walk walk_of(int64_t T, int64_t step) {
  return {make_fast_div(static_cast<uint32_t>(T)), static_cast<uint32_t>(step / T), static_cast<uint32_t>(step % T)};
}

// N tokens from i: their terms, valid bits, and row weights (1 / row count, or 1; a row with a
// valid token counts at least 1, and the weight of other rows is never selected).
template <bool kPolicy, typename A, int N>
__device__ __forceinline__ uint32_t tokens_at(const fastrlhf_ppo_tokens& t, const Clips<A>& c, int64_t i,
                                              const RowWalk& rw, const Walk& walk, Terms<A> (&r)[N], A (&w)[N]) {
  const uint32_t valid = mask_tokens<N>(t.mask, i);  // loaded with the inputs, selected after
  A x[N], old[N], target[N];
  load_tokens<A, N>(t.x, i, x);
  load_tokens<A, N>(t.old, i, old);
  load_tokens<A, N>(t.target, i, target);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    r[k] = terms<kPolicy>(x[k], old[k], target[k], c);
    w[k] = t.row_counts ? recip(static_cast<A>(t.row_counts[row_at(rw, walk.T, k)])) : A(1);
  }
  return valid;
}

// Block p sums its contiguous share [p * chunk, (p + 1) * chunk) of the tokens (chunk a
// multiple of kG): sums [k, n_parts], counts [k + 1, n_parts] (policy: loss, -log-ratio;
// valid, clipped, dual-clipped. value: loss; valid, clipped). A thread sums its groups in
// order, then the block in a fixed tree: same input, same bits.
template <typename A, bool kPolicy, int kG>
__global__ void __launch_bounds__(kThreads, kMinBlocks<A>) ppo_fwd_kernel(const fastrlhf_ppo_tokens t, const Clips<A> c, const Walk walk,
                                                           int64_t n_parts, int64_t chunk, A* __restrict__ sums,
                                                           int32_t* __restrict__ counts) {
  __shared__ Partial<A> smem[kMaxWarps];
  const int64_t step = int64_t(kG) * blockDim.x;
  for (int64_t part = blockIdx.x; part < n_parts; part += gridDim.x) {
    const int64_t lo = part * chunk;
    const int64_t hi = lo + chunk < t.n ? lo + chunk : t.n;
    Partial<A> acc = PartialOp<A>::identity();
    auto add = [&](int64_t i, const RowWalk& rw, auto size) {
      constexpr int N = decltype(size)::value;
      Terms<A> r[N];
      A w[N];
      const uint32_t valid = tokens_at<kPolicy, A, N>(t, c, i, rw, walk, r, w);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const bool ok = (valid >> k) & 1u;
        acc.loss += ok ? r[k].loss * w[k] : A(0);
        acc.neg_lr -= ok ? r[k].lr : A(0);
        acc.valid += ok;
        acc.clipped += ok && r[k].clipped;
        acc.lower += ok && r[k].lower;
      }
    };
    int64_t i = lo + int64_t(kG) * threadIdx.x;
    RowWalk rw = t.row_counts && i < hi ? walk_from(i, t.T) : RowWalk{0, 0};
    for (; i + kG <= hi; i += step) {  // the main loop
      add(i, rw, std::integral_constant<int, kG>{});
      if (t.row_counts) rw.advance(walk.q, walk.r, walk.T.d);
    }
    if (kG > 1) {  // the last hi - lo mod kG tokens, one per thread
      const int64_t j = lo + (hi - lo) / kG * kG + threadIdx.x;
      if (j < hi) add(j, t.row_counts ? walk_from(j, t.T) : RowWalk{0, 0}, std::integral_constant<int, 1>{});
    }
    acc = block_reduce<PartialOp<A>>(acc, smem);
    if (threadIdx.x == 0) {
      sums[part] = acc.loss;
      counts[part] = acc.valid;
      counts[n_parts + part] = acc.clipped;
      if (kPolicy) {
        sums[n_parts + part] = acc.neg_lr;
        counts[2 * n_parts + part] = acc.lower;
      }
    }
  }
}

// grad_x = grad * scale * d loss_token / dx (/ row count) on valid tokens, 0 elsewhere.
template <typename A, bool kPolicy, int kG>
__global__ void __launch_bounds__(kThreads, kMinBlocks<A>) ppo_bwd_kernel(const fastrlhf_ppo_tokens t, const Clips<A> c, const Walk walk,
                                                           fastrlhf_rows grad, fastrlhf_rows scale, void* grad_x) {
  const A scale_all = load_as<A>(grad, 0) * load_as<A>(scale, 0);
  const int64_t first = kG * (blockIdx.x * int64_t(blockDim.x) + threadIdx.x);
  RowWalk rw = t.row_counts && first < t.n ? walk_from(first, t.T) : RowWalk{0, 0};
  for_tokens<kG>(t.n, [&](int64_t i, auto size) {
    constexpr int N = decltype(size)::value;
    const RowWalk here = N == kG ? rw : walk_from(i, t.T);  // the tail token: its own row
    Terms<A> r[N];
    A w[N], g[N];
    const uint32_t valid = tokens_at<kPolicy, A, N>(t, c, i, here, walk, r, w);
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = (valid >> k) & 1u ? scale_all * (r[k].d * w[k]) : A(0);
    store_tokens<A, N>(grad_x, t.x.dtype, i, g);
    if (N == kG && t.row_counts) rw.advance(walk.q, walk.r, walk.T.d);
  });
}

unsigned int elementwise_blocks(int64_t groups) {
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks < 65536 ? blocks : 65536));  // then the threads loop
}

// Whether the tokens load in groups of 4 (x, old, target in the accumulation dtype, a mask
// of 1, 4 or 8 bytes, all 16-byte aligned), with an output too when given.
bool token_groups(const fastrlhf_ppo_tokens& t, const void* out = nullptr) {
  return groups_load(t.x, t.acc) && groups_load(t.old, t.acc) && groups_load(t.target, t.acc) &&
         groups_load(t.mask, t.acc, true) && reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

template <typename A> Clips<A> clips_of(const fastrlhf_policy_clip* policy, double value_clip) {
  if (policy) {
    return {static_cast<A>(policy->ratio_low), static_cast<A>(policy->ratio_high), static_cast<A>(policy->dual_clip),
            static_cast<A>(policy->log_ratio_clamp), A(0)};
  }
  return {A(0), A(0), A(0), A(0), static_cast<A>(value_clip)};
}

template <bool kPolicy>
cudaError_t launch_fwd(const fastrlhf_ppo_tokens& t, const fastrlhf_policy_clip* policy, double value_clip,
                       int64_t n_parts, void* sums, int32_t* counts, cudaStream_t stream) {
  if (t.n <= 0 || n_parts <= 0) return cudaSuccess;
  const bool groups = token_groups(t);
  const int64_t g = groups ? kGroup : 1;
  const int64_t chunk = ((t.n + n_parts - 1) / n_parts + g - 1) / g * g;  // whole groups per part
  if (t.T < 1 || t.T >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const Walk walk = walk_of(t.T, g * kThreads);
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    const Clips<A> c = clips_of<A>(policy, value_clip);
    if (groups) {
      ppo_fwd_kernel<A, kPolicy, kGroup><<<grid_for(n_parts), kThreads, 0, stream>>>(
          t, c, walk, n_parts, chunk, static_cast<A*>(sums), counts);
    } else {
      ppo_fwd_kernel<A, kPolicy, 1><<<grid_for(n_parts), kThreads, 0, stream>>>(t, c, walk, n_parts, chunk,
                                                                               static_cast<A*>(sums), counts);
    }
    return cudaGetLastError();
  });
}

template <bool kPolicy>
cudaError_t launch_bwd(const fastrlhf_ppo_tokens& t, const fastrlhf_policy_clip* policy, double value_clip,
                       fastrlhf_rows grad, fastrlhf_rows scale, void* grad_x, cudaStream_t stream) {
  if (t.n <= 0) return cudaSuccess;
  if (t.T < 1 || t.T >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const bool groups = token_groups(t, grad_x);
  const int64_t g = groups ? kGroup : 1;
  const unsigned int blocks = elementwise_blocks(t.n / g);
  const Walk walk = walk_of(t.T, g * kThreads * int64_t(blocks));  // the grid-stride step
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    const Clips<A> c = clips_of<A>(policy, value_clip);
    if (groups) {
      ppo_bwd_kernel<A, kPolicy, kGroup><<<blocks, kThreads, 0, stream>>>(t, c, walk, grad, scale, grad_x);
    } else {
      ppo_bwd_kernel<A, kPolicy, 1><<<blocks, kThreads, 0, stream>>>(t, c, walk, grad, scale, grad_x);
    }
    return cudaGetLastError();
  });
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_ppo_policy_fwd(const fastrlhf_ppo_tokens* tokens, const fastrlhf_policy_clip* clip,
                                               int64_t n_parts, void* sums, int32_t* counts, cudaStream_t stream) {
  return fastrlhf::launch_fwd<true>(*tokens, clip, 0.0, n_parts, sums, counts, stream);
}

extern "C" cudaError_t fastrlhf_ppo_value_fwd(const fastrlhf_ppo_tokens* tokens, double clip, int64_t n_parts,
                                              void* sums, int32_t* counts, cudaStream_t stream) {
  return fastrlhf::launch_fwd<false>(*tokens, nullptr, clip, n_parts, sums, counts, stream);
}

extern "C" cudaError_t fastrlhf_ppo_policy_bwd(const fastrlhf_ppo_tokens* tokens, const fastrlhf_policy_clip* clip,
                                               fastrlhf_rows grad, fastrlhf_rows scale, void* grad_x,
                                               cudaStream_t stream) {
  return fastrlhf::launch_bwd<true>(*tokens, clip, 0.0, grad, scale, grad_x, stream);
}

extern "C" cudaError_t fastrlhf_ppo_value_bwd(const fastrlhf_ppo_tokens* tokens, double clip, fastrlhf_rows grad,
                                              fastrlhf_rows scale, void* grad_x, cudaStream_t stream) {
  return fastrlhf::launch_bwd<false>(*tokens, nullptr, clip, grad, scale, grad_x, stream);
}
