// KL estimators, their gradient, and KL-penalized per-token rewards.
//
// Same semantics as fastrlhf/triton/kl.py. Math in fp32 (fp64 for fp64 inputs); a missing
// clamp is +inf, which changes nothing. Estimators: 0 k1, 1 abs, 2 k2, 3 k3 (kl_math.cuh: to a
// few ulps relative near a log-ratio of 0, where exp(-x) - 1 + x written directly cancels).
//
// Every kernel takes its tokens kG at a time: kG = 4 with one 16-byte load per input (fp64:
// two) and a 4-, 16- or 32-byte mask load when the inputs are in the accumulation dtype and
// 16-byte aligned (kernels/common.cuh load_group, mask_group), else kG = 1 with a scalar load
// of each input in its own dtype. Masked tokens are loaded too and then dropped by a select
// (never multiplied: NaN there never reaches an output), so no load waits on the mask.
#include "common.cuh"
#include "kl_math.cuh"

namespace fastrlhf {
namespace {

constexpr int kThreads = 256;

// The estimator of x, the log-ratio after its clamp.
template <typename A> __device__ __forceinline__ A kl_value(A x, int estimator) {
  switch (estimator) {
    case FASTRLHF_K1: return x;
    case FASTRLHF_ABS: return fabs(x);
    case FASTRLHF_K2: return A(0.5) * x * x;
    default: return k3_value(x);
  }
}

template <typename A> struct Estimator {
  int estimator;
  A clamp, log_ratio_clamp;

  __device__ __forceinline__ A estimate(A lr) const {
    return clamp_abs(kl_value(clamp_abs(lr, log_ratio_clamp), estimator), clamp);
  }

  // d estimate / d lr: 0 where a clamp is active; straight-through: lr (k2's gradient).
  __device__ __forceinline__ A derivative(A lr, bool straight) const {
    if (straight) return lr;
    const A x = clamp_abs(lr, log_ratio_clamp);
    A d;
    switch (estimator) {
      case FASTRLHF_K1: d = A(1); break;
      case FASTRLHF_ABS: d = x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0)); break;
      case FASTRLHF_K2: d = x; break;
      default: d = k3_slope(x); break;
    }
    const bool active = fabs(lr) > log_ratio_clamp || fabs(kl_value(x, estimator)) > clamp;
    return active ? A(0) : d;
  }
};

template <typename A> Estimator<A> estimator_of(const fastrlhf_kl_estimator& e) {
  return {e.estimator, static_cast<A>(e.clamp), static_cast<A>(e.log_ratio_clamp)};
}

template <typename A, int kG>
__global__ void __launch_bounds__(kThreads) kl_fwd_kernel(const fastrlhf_kl_tokens t, Estimator<A> est, A* out) {
  for_tokens<kG>(t.n, [&](int64_t i, auto size) {
    constexpr int N = decltype(size)::value;
    A lp[N], rf[N], kl[N];
    load_tokens<A, N>(t.logprobs, i, lp);
    load_tokens<A, N>(t.ref_logprobs, i, rf);
#pragma unroll
    for (int k = 0; k < N; ++k) kl[k] = est.estimate(lp[k] - rf[k]);
    store_tokens<A, N>(out, t.acc, i, kl);
  });
}

template <typename A, int kG>
__global__ void __launch_bounds__(kThreads) kl_bwd_kernel(const fastrlhf_kl_tokens t, Estimator<A> est, fastrlhf_rows grad,
                                                          bool straight, void* dlogp, void* dref) {
  for_tokens<kG>(t.n, [&](int64_t i, auto size) {
    constexpr int N = decltype(size)::value;
    A lp[N], rf[N], g[N], d[N], neg[N];
    load_tokens<A, N>(t.logprobs, i, lp);
    load_tokens<A, N>(t.ref_logprobs, i, rf);
    load_tokens<A, N>(grad, i, g);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      d[k] = g[k] * est.derivative(lp[k] - rf[k], straight);
      neg[k] = -d[k];
    }
    if (dlogp) store_tokens<A, N>(dlogp, t.logprobs.dtype, i, d);
    if (dref) store_tokens<A, N>(dref, t.ref_logprobs.dtype, i, neg);
  });
}

// One block per row: one pass writes kl and the penalty (selected by the mask) and finds the
// last valid token; after the block's max reduction, thread 0 adds the score there. Rows are
// read in groups of kG from the row's start (kG = 4: T and every row stride multiples of 4).
template <typename A, int kG>
__global__ void __launch_bounds__(kThreads) kl_rewards_kernel(const fastrlhf_kl_rewards_params p, Estimator<A> est) {
  __shared__ int64_t smem[kMaxWarps];
  const A coef = p.kl_coef_t.data ? load_as<A>(p.kl_coef_t, 0) : static_cast<A>(p.kl_coef);
  A* rewards = static_cast<A*>(p.rewards);
  A* kl_out = static_cast<A*>(p.kl);
  for (int64_t row = blockIdx.x; row < p.B; row += gridDim.x) {
    const fastrlhf_rows lp_row{static_cast<const char*>(p.logprobs.data) +
                                   row * p.logprobs.row_stride * dtype_bytes(p.logprobs.dtype),
                               p.logprobs.dtype, 0};
    const fastrlhf_rows rf_row{static_cast<const char*>(p.ref_logprobs.data) +
                                   row * p.ref_logprobs.row_stride * dtype_bytes(p.ref_logprobs.dtype),
                               p.ref_logprobs.dtype, 0};
    const fastrlhf_rows m_row{static_cast<const char*>(p.mask.data) + row * p.mask.row_stride * dtype_bytes(p.mask.dtype),
                              p.mask.dtype, 0};
    int64_t last = -1;
    for (int64_t t = int64_t(threadIdx.x) * kG; t < p.T; t += int64_t(blockDim.x) * kG) {  // the main loop
      const uint32_t valid = mask_tokens<kG>(m_row, t);
      A lp[kG], rf[kG], k_out[kG], r_out[kG];
      load_tokens<A, kG>(lp_row, t, lp);
      load_tokens<A, kG>(rf_row, t, rf);
#pragma unroll
      for (int k = 0; k < kG; ++k) {
        const bool ok = (valid >> k) & 1u;
        k_out[k] = ok ? est.estimate(lp[k] - rf[k]) : A(0);
        r_out[k] = ok ? -coef * k_out[k] : A(0);
        last = ok ? t + k : last;
      }
      store_tokens<A, kG>(kl_out + row * p.T, p.acc, t, k_out);
      store_tokens<A, kG>(rewards + row * p.T, p.acc, t, r_out);
    }
    last = block_reduce<MaxOp<int64_t>>(last, smem);  // also orders the writes above
    if (threadIdx.x == 0 && last >= 0) {
      rewards[row * p.T + last] += clamp_abs(load_as<A>(p.scores, row), static_cast<A>(p.score_clip));
    }
  }
}

unsigned int elementwise_blocks(int64_t groups) {
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks < 65536 ? blocks : 65536));  // then the threads loop
}

// Whether n flat tokens of these inputs (and outputs, in the accumulation dtype) load in
// groups of 4.
bool flat_groups(const fastrlhf_kl_tokens& t, std::initializer_list<const void*> outs) {
  for (const void* o : outs) {
    if (o && reinterpret_cast<uintptr_t>(o) % 16 != 0) return false;
  }
  return groups_load(t.logprobs, t.acc) && groups_load(t.ref_logprobs, t.acc);
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_kl_penalty_fwd(const fastrlhf_kl_tokens* tokens, void* out, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_kl_tokens& t = *tokens;
  if (t.n <= 0) return cudaSuccess;
  const bool groups = flat_groups(t, {out});
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    if (groups) {
      kl_fwd_kernel<A, kGroup><<<elementwise_blocks(t.n / kGroup), kThreads, 0, stream>>>(t, estimator_of<A>(t.est),
                                                                                          static_cast<A*>(out));
    } else {
      kl_fwd_kernel<A, 1><<<elementwise_blocks(t.n), kThreads, 0, stream>>>(t, estimator_of<A>(t.est),
                                                                           static_cast<A*>(out));
    }
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fastrlhf_kl_penalty_bwd(const fastrlhf_kl_tokens* tokens, fastrlhf_rows grad, int straight,
                                               void* grad_logprobs, void* grad_ref_logprobs, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_kl_tokens& t = *tokens;
  if (t.n <= 0 || (!grad_logprobs && !grad_ref_logprobs)) return cudaSuccess;
  const bool groups = flat_groups(t, {grad_logprobs, grad_ref_logprobs}) && groups_load(grad, t.acc);
  return with_acc(t.acc, [&](auto tag) {
    using A = decltype(tag);
    if (groups) {
      kl_bwd_kernel<A, kGroup><<<elementwise_blocks(t.n / kGroup), kThreads, 0, stream>>>(
          t, estimator_of<A>(t.est), grad, straight != 0, grad_logprobs, grad_ref_logprobs);
    } else {
      kl_bwd_kernel<A, 1><<<elementwise_blocks(t.n), kThreads, 0, stream>>>(
          t, estimator_of<A>(t.est), grad, straight != 0, grad_logprobs, grad_ref_logprobs);
    }
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fastrlhf_kl_rewards_fwd(const fastrlhf_kl_rewards_params* params, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_kl_rewards_params& p = *params;
  if (p.B <= 0 || p.T <= 0) return cudaSuccess;
  const bool groups = p.T % kGroup == 0 && groups_load(p.logprobs, p.acc) && groups_load(p.ref_logprobs, p.acc) &&
                      groups_load(p.mask, p.acc, true) && reinterpret_cast<uintptr_t>(p.rewards) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.kl) % 16 == 0;
  return with_acc(p.acc, [&](auto tag) {
    using A = decltype(tag);
    if (groups) {
      kl_rewards_kernel<A, kGroup><<<grid_for(p.B), kThreads, 0, stream>>>(p, estimator_of<A>(p.est));
    } else {
      kl_rewards_kernel<A, 1><<<grid_for(p.B), kThreads, 0, stream>>>(p, estimator_of<A>(p.est));
    }
    return cudaGetLastError();
  });
}
