// CUDA implementations of fastrlhf_cuda::ppo_{policy,value}_{fwd,bwd} (kernels/ppo.cu).
// Outputs (partials, gradient) are allocated by the caller (fastrlhf/ops/ppo.py).
#include "checks.h"
#include "ops.h"

namespace fastrlhf {
namespace {

// The kernels' view of a PPO loss's tokens: x, old, target [B, T] floating, mask [B, T] of any
// dtype, row_counts int64 [B] when given; flat contiguous copies where needed, kept alive here.
struct Tokens {
  std::vector<at::Tensor> keep;
  fastrlhf_ppo_tokens t;
  at::ScalarType acc;
};

Tokens tokens_of(const at::Tensor& x, const at::Tensor& old, const at::Tensor& target, const at::Tensor& mask,
                 const std::optional<at::Tensor>& row_counts) {
  FASTRLHF_CHECK_CUDA(x);
  FASTRLHF_CHECK_FLOAT(x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [B, T], got ", text(x.sizes()));
  for (const at::Tensor* t : {&old, &target}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "inputs must all be on ", x.device(), ", got ", t->device());
    TORCH_CHECK_TYPE(dtype_in(t->scalar_type(), {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}),
                     "inputs must have dtype float32/float16/bfloat16/float64, got ",
                     dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->sizes() == x.sizes(), "inputs must have shape ", text(x.sizes()), ", got ", text(t->sizes()));
  }
  FASTRLHF_CHECK_SAME_DEVICE(mask, x);
  FASTRLHF_CHECK_MASK(mask);
  FASTRLHF_CHECK_SHAPE(mask, x.sizes());
  if (row_counts.has_value()) {
    FASTRLHF_CHECK_SAME_DEVICE(*row_counts, x);
    FASTRLHF_CHECK_DTYPE(*row_counts, at::kLong);
    FASTRLHF_CHECK_SHAPE(*row_counts, x.sizes().slice(0, 1));
    FASTRLHF_CHECK_CONTIGUOUS(*row_counts);
  }
  Tokens out{{flat(x), flat(old), flat(target), flat(mask)}, {}, acc_of({&x, &old, &target})};
  out.t = {rows_arg(out.keep[0]), rows_arg(out.keep[1]), rows_arg(out.keep[2]), rows_arg(out.keep[3]),
           x.numel(), x.size(1), row_counts.has_value() ? row_counts->data_ptr<int64_t>() : nullptr,
           kernel_dtype(out.acc)};
  return out;
}

// sums [n_sums, P] in the accumulation dtype and counts [n_sums + 1, P] int32; returns P.
int64_t check_partials(const at::Tensor& x, at::ScalarType acc, int64_t n_sums, const at::Tensor& sums,
                       const at::Tensor& counts) {
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == n_sums, "sums must have shape [", text(n_sums),
                    ", n_parts], got ", text(sums.sizes()));
  FASTRLHF_CHECK_OUT(sums, x, acc, sums.sizes());
  FASTRLHF_CHECK_OUT(counts, x, at::kInt, (std::vector<int64_t>{n_sums + 1, sums.size(1)}));
  return sums.size(1);
}

// grad and scale: single floating values on x's device; grad_x: x's dtype and shape.
void check_grad(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& grad_x) {
  for (const at::Tensor* t : {&grad, &scale}) {
    TORCH_CHECK_VALUE(t->device() == x.device() && t->numel() == 1,
                      "grad and scale must be single values on ", x.device(), ", got shape ", text(t->sizes()),
                      " on ", t->device());
    TORCH_CHECK_TYPE(dtype_in(t->scalar_type(), {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}),
                     "grad and scale must have dtype float32/float16/bfloat16/float64, got ",
                     dtype_name(t->scalar_type()));
  }
  FASTRLHF_CHECK_OUT(grad_x, x, x.scalar_type(), x.sizes());
}

}  // namespace

void ppo_policy_fwd(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                    const at::Tensor& mask, const std::optional<at::Tensor>& row_counts, double ratio_low,
                    double ratio_high, double dual_clip, double log_ratio_clamp, const at::Tensor& sums,
                    const at::Tensor& counts) {
  const Tokens tok = tokens_of(logprobs, old_logprobs, advantages, mask, row_counts);
  const int64_t n_parts = check_partials(logprobs, tok.acc, 2, sums, counts);
  if (tok.t.n == 0) return;
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const fastrlhf_policy_clip clip{ratio_low, ratio_high, dual_clip, log_ratio_clamp};
  FASTRLHF_CHECK_LAUNCH(fastrlhf_ppo_policy_fwd(&tok.t, &clip, n_parts, sums.data_ptr(), counts.data_ptr<int32_t>(),
                                                current_stream(logprobs)),
                        "ppo_policy_fwd");
}

void ppo_value_fwd(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                   const at::Tensor& mask, const std::optional<at::Tensor>& row_counts, double clip,
                   const at::Tensor& sums, const at::Tensor& counts) {
  const Tokens tok = tokens_of(values, old_values, returns, mask, row_counts);
  const int64_t n_parts = check_partials(values, tok.acc, 1, sums, counts);
  if (tok.t.n == 0) return;
  const c10::cuda::CUDAGuard guard(values.device());
  FASTRLHF_CHECK_LAUNCH(fastrlhf_ppo_value_fwd(&tok.t, clip, n_parts, sums.data_ptr(), counts.data_ptr<int32_t>(),
                                               current_stream(values)),
                        "ppo_value_fwd");
}

void ppo_policy_bwd(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& logprobs,
                    const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
                    const std::optional<at::Tensor>& row_counts, double ratio_low, double ratio_high,
                    double dual_clip, double log_ratio_clamp, const at::Tensor& grad_logprobs) {
  const Tokens tok = tokens_of(logprobs, old_logprobs, advantages, mask, row_counts);
  check_grad(logprobs, grad, scale, grad_logprobs);
  if (tok.t.n == 0) return;
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const fastrlhf_policy_clip clip{ratio_low, ratio_high, dual_clip, log_ratio_clamp};
  FASTRLHF_CHECK_LAUNCH(fastrlhf_ppo_policy_bwd(&tok.t, &clip, rows_arg(flat(grad)), rows_arg(flat(scale)),
                                                grad_logprobs.data_ptr(), current_stream(logprobs)),
                        "ppo_policy_bwd");
}

void ppo_value_bwd(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& values,
                   const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
                   const std::optional<at::Tensor>& row_counts, double clip, const at::Tensor& grad_values) {
  const Tokens tok = tokens_of(values, old_values, returns, mask, row_counts);
  check_grad(values, grad, scale, grad_values);
  if (tok.t.n == 0) return;
  const c10::cuda::CUDAGuard guard(values.device());
  FASTRLHF_CHECK_LAUNCH(fastrlhf_ppo_value_bwd(&tok.t, clip, rows_arg(flat(grad)), rows_arg(flat(scale)),
                                               grad_values.data_ptr(), current_stream(values)),
                        "ppo_value_bwd");
}

}  // namespace fastrlhf
