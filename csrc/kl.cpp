// CUDA implementations of fastrlhf_cuda::kl_penalty_fwd / kl_penalty_bwd /
// kl_penalized_rewards_fwd (kernels/kl.cu). Outputs are allocated by the caller
// (fastrlhf/cuda/kl.py) and written here; an empty gradient output means "not wanted".
#include "checks.h"
#include "ops.h"

namespace fastrlhf {
namespace {

void check_pair(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator) {
  FASTRLHF_CHECK_CUDA(logprobs);
  FASTRLHF_CHECK_FLOAT(logprobs);
  FASTRLHF_CHECK_SAME_DEVICE(ref_logprobs, logprobs);
  FASTRLHF_CHECK_FLOAT(ref_logprobs);
  FASTRLHF_CHECK_SHAPE(ref_logprobs, logprobs.sizes());
  TORCH_CHECK_VALUE(estimator >= 0 && estimator <= 3,
                    "estimator must be 0 (k1), 1 (abs), 2 (k2) or 3 (k3), got ", text(estimator));
}

// The kernels' view of flat log-probs lp, rf (contiguous) and the estimator.
fastrlhf_kl_tokens kl_tokens(const at::Tensor& lp, const at::Tensor& rf, int64_t estimator, double clamp,
                             double log_ratio_clamp) {
  return {lp.numel(), rows_arg(lp), rows_arg(rf), {static_cast<int>(estimator), clamp, log_ratio_clamp},
          kernel_dtype(acc_of({&lp, &rf}))};
}

}  // namespace

void kl_penalty_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator,
                    double clamp, double log_ratio_clamp, const at::Tensor& out) {
  check_pair(logprobs, ref_logprobs, estimator);
  const at::ScalarType acc = acc_of({&logprobs, &ref_logprobs});
  FASTRLHF_CHECK_OUT(out, logprobs, acc, logprobs.sizes());
  if (logprobs.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(logprobs.device());
  const at::Tensor lp = flat(logprobs), rf = flat(ref_logprobs);
  const fastrlhf_kl_tokens t = kl_tokens(lp, rf, estimator, clamp, log_ratio_clamp);
  FASTRLHF_CHECK_LAUNCH(fastrlhf_kl_penalty_fwd(&t, out.data_ptr(), current_stream(logprobs)), "kl_penalty_fwd");
}

void kl_penalty_bwd(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                    int64_t estimator, bool straight, double clamp, double log_ratio_clamp,
                    const at::Tensor& grad_logprobs, const at::Tensor& grad_ref_logprobs) {
  check_pair(logprobs, ref_logprobs, estimator);
  FASTRLHF_CHECK_SAME_DEVICE(grad, logprobs);
  FASTRLHF_CHECK_FLOAT(grad);
  FASTRLHF_CHECK_SHAPE(grad, logprobs.sizes());
  const bool want_logp = grad_logprobs.numel() > 0, want_ref = grad_ref_logprobs.numel() > 0;
  if (want_logp) FASTRLHF_CHECK_OUT(grad_logprobs, logprobs, logprobs.scalar_type(), logprobs.sizes());
  if (want_ref) FASTRLHF_CHECK_OUT(grad_ref_logprobs, logprobs, ref_logprobs.scalar_type(), logprobs.sizes());
  if (logprobs.numel() == 0 || !(want_logp || want_ref)) return;

  const c10::cuda::CUDAGuard guard(logprobs.device());
  const at::Tensor g = flat(grad), lp = flat(logprobs), rf = flat(ref_logprobs);
  const fastrlhf_kl_tokens t = kl_tokens(lp, rf, estimator, clamp, log_ratio_clamp);
  FASTRLHF_CHECK_LAUNCH(fastrlhf_kl_penalty_bwd(&t, rows_arg(g), straight ? 1 : 0,
                                                want_logp ? grad_logprobs.data_ptr() : nullptr,
                                                want_ref ? grad_ref_logprobs.data_ptr() : nullptr,
                                                current_stream(logprobs)),
                        "kl_penalty_bwd");
}

void kl_penalized_rewards_fwd(const at::Tensor& scores, const at::Tensor& logprobs,
                              const at::Tensor& ref_logprobs, const at::Tensor& mask, double kl_coef,
                              const std::optional<at::Tensor>& kl_coef_t, int64_t estimator,
                              double kl_clamp, double log_ratio_clamp, double score_clip,
                              const at::Tensor& rewards, const at::Tensor& kl) {
  check_pair(logprobs, ref_logprobs, estimator);
  TORCH_CHECK_VALUE(logprobs.dim() == 2, "logprobs must have shape [B, T], got ", text(logprobs.sizes()));
  FASTRLHF_CHECK_SAME_DEVICE(scores, logprobs);
  FASTRLHF_CHECK_FLOAT(scores);
  FASTRLHF_CHECK_SHAPE(scores, logprobs.sizes().slice(0, 1));
  FASTRLHF_CHECK_SAME_DEVICE(mask, logprobs);
  FASTRLHF_CHECK_MASK(mask);
  FASTRLHF_CHECK_SHAPE(mask, logprobs.sizes());
  if (kl_coef_t.has_value()) {
    FASTRLHF_CHECK_SAME_DEVICE(*kl_coef_t, logprobs);
    FASTRLHF_CHECK_FLOAT(*kl_coef_t);
    TORCH_CHECK_VALUE(kl_coef_t->dim() == 0, "kl_coef_t must be 0-dim, got shape ", text(kl_coef_t->sizes()));
  }
  const at::ScalarType acc = acc_of({&logprobs, &ref_logprobs});
  FASTRLHF_CHECK_OUT(rewards, logprobs, acc, logprobs.sizes());
  FASTRLHF_CHECK_OUT(kl, logprobs, acc, logprobs.sizes());
  if (logprobs.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(logprobs.device());
  const at::Tensor lp = unit_t(logprobs), rf = unit_t(ref_logprobs), m = unit_t(mask);
  const at::Tensor s = scores.contiguous();
  const fastrlhf_kl_rewards_params params{lp.size(0),
                                          lp.size(1),
                                          rows_arg(s),
                                          rows_arg(lp),
                                          rows_arg(rf),
                                          rows_arg(m),
                                          kl_coef,
                                          kl_coef_t.has_value() ? rows_arg(*kl_coef_t) : no_rows(),
                                          {static_cast<int>(estimator), kl_clamp, log_ratio_clamp},
                                          score_clip,
                                          kernel_dtype(acc),
                                          rewards.data_ptr(),
                                          kl.data_ptr()};
  FASTRLHF_CHECK_LAUNCH(fastrlhf_kl_rewards_fwd(&params, current_stream(logprobs)), "kl_penalized_rewards_fwd");
}

}  // namespace fastrlhf
