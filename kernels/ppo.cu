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

// The two losses, as functors of (x, old, target) -> Terms: Policy reads log-prob, old
// log-prob, advantage; Value reads value, old value, return.
struct PolicyLoss {
  static constexpr bool kPolicy = true;
  fastrlhf_policy_clip clip;
  template <typename A> __device__ __forceinline__ Terms<A> operator()(A logp, A old, A adv) const {
    return policy_terms(logp, old, adv, A(clip.ratio_low), A(clip.ratio_high), A(clip.dual_clip),
                        A(clip.log_ratio_clamp));
  }
};

struct ValueLoss {
  static constexpr bool kPolicy = false;
  double clip;
  template <typename A> __device__ __forceinline__ Terms<A> operator()(A v, A old, A ret) const {
    return value_terms(v, old, ret, A(clip));
  }
};

template <typename A, typename Loss>
__device__ __forceinline__ Terms<A> terms_at(const fastrlhf_ppo_tokens& t, const Loss& loss, int64_t i) {
  return loss(load_as<A>(t.x, i), load_as<A>(t.old, i), load_as<A>(t.target, i));
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

// Block p sums its contiguous share of the tokens: sums [k, n_parts], counts [k + 1, n_parts]
// (policy: loss, -log-ratio; valid, clipped, dual-clipped. value: loss; valid, clipped).
template <typename A, typename Loss>
__global__ void __launch_bounds__(kThreads) ppo_fwd_kernel(fastrlhf_ppo_tokens t, Loss loss, int64_t n_parts,
                                                           int64_t chunk, A* __restrict__ sums,
                                                           int32_t* __restrict__ counts) {
  __shared__ Partial<A> smem[kMaxWarps];
  for (int64_t part = blockIdx.x; part < n_parts; part += gridDim.x) {
    const int64_t lo = part * chunk;
    const int64_t hi = lo + chunk < t.n ? lo + chunk : t.n;
    Partial<A> acc = PartialOp<A>::identity();
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      if (!mask_at(t.mask, i)) continue;  // masked tokens are never read: NaN there is harmless
      const Terms<A> r = terms_at<A>(t, loss, i);
      acc.loss += t.row_counts ? r.loss / static_cast<A>(t.row_counts[i / t.T]) : r.loss;
      acc.neg_lr -= r.lr;
      acc.valid += 1;
      acc.clipped += r.clipped;
      acc.lower += r.lower;
    }
    acc = block_reduce<PartialOp<A>>(acc, smem);
    if (threadIdx.x == 0) {
      sums[part] = acc.loss;
      counts[part] = acc.valid;
      counts[n_parts + part] = acc.clipped;
      if (Loss::kPolicy) {
        sums[n_parts + part] = acc.neg_lr;
        counts[2 * n_parts + part] = acc.lower;
      }
    }
  }
}

// grad_x = grad * scale * d loss_token / dx (/ row count) on valid tokens, 0 elsewhere.
template <typename A, typename Loss>
__global__ void __launch_bounds__(kThreads) ppo_bwd_kernel(fastrlhf_ppo_tokens t, Loss loss, fastrlhf_rows grad,
                                                           fastrlhf_rows scale, void* grad_x) {
  const A w = load_as<A>(grad, 0) * load_as<A>(scale, 0);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < t.n; i += int64_t(gridDim.x) * blockDim.x) {
    A g = A(0);
    if (mask_at(t.mask, i)) {
      A d = terms_at<A>(t, loss, i).d;
      if (t.row_counts) d = d / static_cast<A>(t.row_counts[i / t.T]);
      g = w * d;
    }
    store_as(grad_x, t.x.dtype, i, g);
  }
}

template <typename Loss>
cudaError_t launch_fwd(const fastrlhf_ppo_tokens& t, const Loss& loss, int64_t n_parts, void* sums,
                       int32_t* counts, cudaStream_t stream) {
  if (t.n <= 0 || n_parts <= 0) return cudaSuccess;
  const int64_t chunk = (t.n + n_parts - 1) / n_parts;
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    ppo_fwd_kernel<A, Loss><<<grid_for(n_parts), kThreads, 0, stream>>>(t, loss, n_parts, chunk,
                                                                        static_cast<A*>(sums), counts);
    return cudaGetLastError();
  });
}

template <typename Loss>
cudaError_t launch_bwd(const fastrlhf_ppo_tokens& t, const Loss& loss, fastrlhf_rows grad, fastrlhf_rows scale,
                       void* grad_x, cudaStream_t stream) {
  if (t.n <= 0) return cudaSuccess;
  const int64_t blocks = (t.n + kThreads - 1) / kThreads;
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    ppo_bwd_kernel<A, Loss><<<static_cast<int>(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(
        t, loss, grad, scale, grad_x);
    return cudaGetLastError();
  });
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_ppo_policy_fwd(const fastrlhf_ppo_tokens* tokens, const fastrlhf_policy_clip* clip,
                                               int64_t n_parts, void* sums, int32_t* counts, cudaStream_t stream) {
  return fastrlhf::launch_fwd(*tokens, fastrlhf::PolicyLoss{*clip}, n_parts, sums, counts, stream);
}

extern "C" cudaError_t fastrlhf_ppo_value_fwd(const fastrlhf_ppo_tokens* tokens, double clip, int64_t n_parts,
                                              void* sums, int32_t* counts, cudaStream_t stream) {
  return fastrlhf::launch_fwd(*tokens, fastrlhf::ValueLoss{clip}, n_parts, sums, counts, stream);
}

extern "C" cudaError_t fastrlhf_ppo_policy_bwd(const fastrlhf_ppo_tokens* tokens, const fastrlhf_policy_clip* clip,
                                               fastrlhf_rows grad, fastrlhf_rows scale, void* grad_x,
                                               cudaStream_t stream) {
  return fastrlhf::launch_bwd(*tokens, fastrlhf::PolicyLoss{*clip}, grad, scale, grad_x, stream);
}

extern "C" cudaError_t fastrlhf_ppo_value_bwd(const fastrlhf_ppo_tokens* tokens, double clip, fastrlhf_rows grad,
                                              fastrlhf_rows scale, void* grad_x, cudaStream_t stream) {
  return fastrlhf::launch_bwd(*tokens, fastrlhf::ValueLoss{clip}, grad, scale, grad_x, stream);
}
