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

// Policy: x, old, y = log-prob, old log-prob, advantage; c0, c1 ratio bounds, c2 dual clip,
// c3 log-ratio clamp.
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

// Value: x, old, y = value, old value, return; c0 = clip.
template <typename A> __device__ __forceinline__ Terms<A> value_terms(A v, A old, A ret, A clip) {
  const A err = v - ret;
  const A loss1 = err * err;
  const A lo = old - clip, hi = old + clip;
  const A err2 = (v < lo ? lo : (v > hi ? hi : v)) - ret;
  const A loss2 = err2 * err2;
  const bool clipped = loss2 > loss1;
  return {A(0.5) * (clipped ? loss2 : loss1), clipped, false, A(0), clipped ? A(0) : err};
}

template <typename A>
__device__ __forceinline__ Terms<A> terms(bool value, fastrlhf_rows x, fastrlhf_rows old,
                                          fastrlhf_rows y, int64_t i, A c0, A c1, A c2, A c3) {
  const A a = load_as<A>(x, i), b = load_as<A>(old, i), c = load_as<A>(y, i);
  return value ? value_terms(a, b, c, c0) : policy_terms(a, b, c, c0, c1, c2, c3);
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

template <typename A>
__global__ void __launch_bounds__(kThreads) ppo_fwd_kernel(
    bool value, int64_t n, int64_t T, fastrlhf_rows x, fastrlhf_rows old, fastrlhf_rows y,
    fastrlhf_mask mask, const int64_t* __restrict__ row_counts, A c0, A c1, A c2, A c3,
    int64_t n_parts, int64_t chunk, A* __restrict__ sums, int32_t* __restrict__ counts) {
  __shared__ Partial<A> smem[kMaxWarps];
  for (int64_t part = blockIdx.x; part < n_parts; part += gridDim.x) {
    const int64_t lo = part * chunk;
    const int64_t hi = lo + chunk < n ? lo + chunk : n;
    Partial<A> acc = PartialOp<A>::identity();
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      if (!mask_at(mask, i)) continue;  // masked tokens are never read: NaN there is harmless
      const Terms<A> t = terms(value, x, old, y, i, c0, c1, c2, c3);
      acc.loss += row_counts ? t.loss / static_cast<A>(row_counts[i / T]) : t.loss;
      acc.neg_lr -= t.lr;
      acc.valid += 1;
      acc.clipped += t.clipped;
      acc.lower += t.lower;
    }
    acc = block_reduce<PartialOp<A>>(acc, smem);
    if (threadIdx.x == 0) {
      sums[part] = acc.loss;
      counts[part] = acc.valid;
      counts[n_parts + part] = acc.clipped;
      if (!value) {
        sums[n_parts + part] = acc.neg_lr;
        counts[2 * n_parts + part] = acc.lower;
      }
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) ppo_bwd_kernel(
    bool value, int64_t n, int64_t T, fastrlhf_rows grad, fastrlhf_rows scale, fastrlhf_rows x,
    fastrlhf_rows old, fastrlhf_rows y, fastrlhf_mask mask, const int64_t* __restrict__ row_counts,
    A c0, A c1, A c2, A c3, void* dx) {
  const A w = load_as<A>(grad, 0) * load_as<A>(scale, 0);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    A g = A(0);
    if (mask_at(mask, i)) {
      A d = terms(value, x, old, y, i, c0, c1, c2, c3).d;
      if (row_counts) d = d / static_cast<A>(row_counts[i / T]);
      g = w * d;
    }
    store_as(dx, x.dtype, i, g);
  }
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_ppo_loss_fwd(int value, int64_t n, int64_t T, fastrlhf_rows x,
                                             fastrlhf_rows old, fastrlhf_rows y, fastrlhf_mask mask,
                                             const int64_t* row_counts, double c0, double c1,
                                             double c2, double c3, int acc_double, int64_t n_parts,
                                             void* sums, int32_t* counts, cudaStream_t stream) {
  using namespace fastrlhf;
  if (n <= 0 || n_parts <= 0) return cudaSuccess;
  const int64_t chunk = (n + n_parts - 1) / n_parts;
  return with_acc(acc_double, [&](auto tag) {
    using A = decltype(tag);
    ppo_fwd_kernel<A><<<grid_for(n_parts), kThreads, 0, stream>>>(
        value != 0, n, T, x, old, y, mask, row_counts, static_cast<A>(c0), static_cast<A>(c1),
        static_cast<A>(c2), static_cast<A>(c3), n_parts, chunk, static_cast<A*>(sums), counts);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fastrlhf_ppo_loss_bwd(int value, int64_t n, int64_t T, fastrlhf_rows grad,
                                             fastrlhf_rows scale, fastrlhf_rows x, fastrlhf_rows old,
                                             fastrlhf_rows y, fastrlhf_mask mask,
                                             const int64_t* row_counts, double c0, double c1,
                                             double c2, double c3, int acc_double, void* grad_x,
                                             cudaStream_t stream) {
  using namespace fastrlhf;
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return with_acc(acc_double, [&](auto tag) {
    using A = decltype(tag);
    ppo_bwd_kernel<A><<<static_cast<int>(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(
        value != 0, n, T, grad, scale, x, old, y, mask, row_counts, static_cast<A>(c0),
        static_cast<A>(c1), static_cast<A>(c2), static_cast<A>(c3), grad_x);
    return cudaGetLastError();
  });
}
