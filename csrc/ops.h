// The CUDA implementations of the fastrlhf_cuda ops (schemas and registration in module.cpp),
// one csrc/<family>.cpp each. Each checks its arguments (ValueError/TypeError naming them),
// fills the launcher's arguments (kernels/launchers.cuh) and launches on the current stream;
// outputs are allocated by the caller (fastrlhf/cuda/<family>.py or the op layer).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastrlhf {

// logprobs.cpp
void token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                        int64_t ignore_index, bool with_entropy, const at::Tensor& logp,
                        const at::Tensor& entropy, const at::Tensor& stats);
void token_logprobs_bwd(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                        const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                        const at::Tensor& entropy, double temperature, int64_t ignore_index,
                        const at::Tensor& grad_logits);

// advantages.cpp
void gae_fwd(const at::Tensor& rewards, const std::optional<at::Tensor>& values, const at::Tensor& mask,
             double gamma, double lam, bool skip_holes, int64_t threads, int64_t chunk,
             const at::Tensor& advantages, const at::Tensor& returns, const at::Tensor& maps);
void group_advantages_fwd(const at::Tensor& scores, int64_t group_size, int64_t method, double eps,
                          const at::Tensor& out);

// kl.cpp
void kl_penalty_fwd(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, int64_t estimator,
                    double clamp, double log_ratio_clamp, const at::Tensor& out);
void kl_penalty_bwd(const at::Tensor& grad, const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                    int64_t estimator, bool straight, double clamp, double log_ratio_clamp,
                    const at::Tensor& grad_logprobs, const at::Tensor& grad_ref_logprobs);
void kl_penalized_rewards_fwd(const at::Tensor& scores, const at::Tensor& logprobs,
                              const at::Tensor& ref_logprobs, const at::Tensor& mask, double kl_coef,
                              const std::optional<at::Tensor>& kl_coef_t, int64_t estimator,
                              double kl_clamp, double log_ratio_clamp, double score_clip,
                              const at::Tensor& rewards, const at::Tensor& kl);

// ppo.cpp
void ppo_policy_fwd(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                    const at::Tensor& mask, const std::optional<at::Tensor>& row_counts, double ratio_low,
                    double ratio_high, double dual_clip, double log_ratio_clamp, const at::Tensor& sums,
                    const at::Tensor& counts);
void ppo_value_fwd(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                   const at::Tensor& mask, const std::optional<at::Tensor>& row_counts, double clip,
                   const at::Tensor& sums, const at::Tensor& counts);
void ppo_policy_bwd(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& logprobs,
                    const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
                    const std::optional<at::Tensor>& row_counts, double ratio_low, double ratio_high,
                    double dual_clip, double log_ratio_clamp, const at::Tensor& grad_logprobs);
void ppo_value_bwd(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& values,
                   const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
                   const std::optional<at::Tensor>& row_counts, double clip, const at::Tensor& grad_values);

}  // namespace fastrlhf
