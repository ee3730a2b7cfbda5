// KL estimators, their gradient, and KL-penalized per-token rewards.
//
// Same semantics as fastrlhf/triton/kl.py. Math in fp32 (fp64 for fp64 inputs); a missing
// clamp is +inf, which changes nothing. Estimators: 0 k1, 1 abs, 2 k2, 3 k3.
#include "common.cuh"

namespace fastrlhf {
namespace {

constexpr int kThreads = 256;

// The estimator of x, the log-ratio after its clamp.
template <typename A> __device__ __forceinline__ A kl_value(A x, int estimator) {
  switch (estimator) {
    case 0: return x;
    case 1: return fabs(x);
    case 2: return A(0.5) * x * x;
    default: return exp(-x) - A(1) + x;
  }
}

template <typename A>
__device__ __forceinline__ A kl_estimate(A lr, int estimator, A clamp, A log_ratio_clamp) {
  return clamp_abs(kl_value(clamp_abs(lr, log_ratio_clamp), estimator), clamp);
}

// d estimate / d lr: 0 where a clamp is active; straight-through: lr (k2's gradient).
template <typename A>
__device__ __forceinline__ A kl_derivative(A lr, int estimator, bool straight, A clamp,
                                           A log_ratio_clamp) {
  if (straight) return lr;
  const A x = clamp_abs(lr, log_ratio_clamp);
  A d;
  switch (estimator) {
    case 0: d = A(1); break;
    case 1: d = x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0)); break;
    case 2: d = x; break;
    default: d = A(1) - exp(-x); break;
  }
  const bool active = fabs(lr) > log_ratio_clamp || fabs(kl_value(x, estimator)) > clamp;
  return active ? A(0) : d;
}

template <typename A>
__global__ void __launch_bounds__(kThreads) kl_fwd_kernel(int64_t n, fastrlhf_rows logp,
                                                          fastrlhf_rows ref, int estimator, A clamp,
                                                          A log_ratio_clamp, A* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const A lr = load_as<A>(logp, i) - load_as<A>(ref, i);
    out[i] = kl_estimate(lr, estimator, clamp, log_ratio_clamp);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) kl_bwd_kernel(
    int64_t n, fastrlhf_rows grad, fastrlhf_rows logp, fastrlhf_rows ref, int estimator,
    bool straight, A clamp, A log_ratio_clamp, void* dlogp, void* dref) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const A lr = load_as<A>(logp, i) - load_as<A>(ref, i);
    const A d = load_as<A>(grad, i) * kl_derivative(lr, estimator, straight, clamp, log_ratio_clamp);
    if (dlogp) store_as(dlogp, logp.dtype, i, d);
    if (dref) store_as(dref, ref.dtype, i, -d);
  }
}

// One block per row: one pass writes kl and the penalty and finds the last valid token;
// after the block's max reduction, thread 0 adds the score there.
template <typename A>
__global__ void __launch_bounds__(kThreads) kl_rewards_kernel(
    int64_t B, int64_t T, fastrlhf_rows scores, fastrlhf_rows logp, fastrlhf_rows ref,
    fastrlhf_rows mask, A kl_coef, fastrlhf_rows kl_coef_t, int estimator, A kl_clamp,
    A log_ratio_clamp, A score_clip, A* __restrict__ rewards, A* __restrict__ kl) {
  __shared__ int64_t smem[kMaxWarps];
  const A coef = kl_coef_t.data ? load_as<A>(kl_coef_t, 0) : kl_coef;
  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    int64_t last = -1;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const bool valid = mask_at(mask, row * mask.row_stride + t);
      A k = A(0);
      if (valid) {
        const A lr = load_as<A>(logp, row * logp.row_stride + t) - load_as<A>(ref, row * ref.row_stride + t);
        k = kl_estimate(lr, estimator, kl_clamp, log_ratio_clamp);
        last = t;
      }
      kl[row * T + t] = k;
      rewards[row * T + t] = valid ? -coef * k : A(0);
    }
    last = block_reduce<MaxOp<int64_t>>(last, smem);  // also orders the writes above
    if (threadIdx.x == 0 && last >= 0) {
      rewards[row * T + last] += clamp_abs(load_as<A>(scores, row), score_clip);
    }
  }
}

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? blocks : 65536);  // then the threads loop
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_kl_penalty_fwd(const fastrlhf_kl_tokens* tokens, void* out, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_kl_tokens& t = *tokens;
  if (t.n <= 0) return cudaSuccess;
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    kl_fwd_kernel<A><<<elementwise_blocks(t.n), kThreads, 0, stream>>>(
        t.n, t.logprobs, t.ref_logprobs, t.est.estimator, static_cast<A>(t.est.clamp),
        static_cast<A>(t.est.log_ratio_clamp), static_cast<A*>(out));
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fastrlhf_kl_penalty_bwd(const fastrlhf_kl_tokens* tokens, fastrlhf_rows grad, int straight,
                                               void* grad_logprobs, void* grad_ref_logprobs, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_kl_tokens& t = *tokens;
  if (t.n <= 0 || (!grad_logprobs && !grad_ref_logprobs)) return cudaSuccess;
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    kl_bwd_kernel<A><<<elementwise_blocks(t.n), kThreads, 0, stream>>>(
        t.n, grad, t.logprobs, t.ref_logprobs, t.est.estimator, straight != 0, static_cast<A>(t.est.clamp),
        static_cast<A>(t.est.log_ratio_clamp), grad_logprobs, grad_ref_logprobs);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fastrlhf_kl_rewards_fwd(const fastrlhf_kl_rewards_params* params, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_kl_rewards_params& p = *params;
  if (p.B <= 0 || p.T <= 0) return cudaSuccess;
  return with_acc(p.acc, [&](auto tag) {
    using A = decltype(tag);
    kl_rewards_kernel<A><<<grid_for(p.B), kThreads, 0, stream>>>(
        p.B, p.T, p.scores, p.logprobs, p.ref_logprobs, p.mask, static_cast<A>(p.kl_coef), p.kl_coef_t,
        p.est.estimator, static_cast<A>(p.est.clamp), static_cast<A>(p.est.log_ratio_clamp),
        static_cast<A>(p.score_clip), static_cast<A*>(p.rewards), static_cast<A*>(p.kl));
    return cudaGetLastError();
  });
}
