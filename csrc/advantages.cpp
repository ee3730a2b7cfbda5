// CUDA implementations of fastrlhf_cuda::gae_fwd and group_advantages_fwd (kernels/advantages.cu).
// Outputs and the chunk-map scratch are allocated by the caller (fastrlhf/cuda/advantages.py)
// and written here.
#include "checks.h"
#include "ops.h"

namespace fastrlhf {

void gae_fwd(const at::Tensor& rewards, const std::optional<at::Tensor>& values,
             const at::Tensor& mask, double gamma, double lam, bool skip_holes, int64_t threads,
             int64_t chunk, const at::Tensor& advantages, const at::Tensor& returns,
             const at::Tensor& maps) {
  FASTRLHF_CHECK_CUDA(rewards);
  FASTRLHF_CHECK_FLOAT(rewards);
  TORCH_CHECK_VALUE(rewards.dim() == 2, "rewards must have shape [B, T], got ", text(rewards.sizes()));
  FASTRLHF_CHECK_SAME_DEVICE(mask, rewards);
  FASTRLHF_CHECK_MASK(mask);
  FASTRLHF_CHECK_SHAPE(mask, rewards.sizes());
  TORCH_CHECK_VALUE(threads >= 32 && threads <= 512 && (threads & (threads - 1)) == 0,
                    "threads must be a power of two in [32, 512], got ", text(threads));
  TORCH_CHECK_VALUE(chunk >= 1, "chunk must be >= 1, got ", text(chunk));
  at::ScalarType acc = acc_of({&rewards});
  if (values.has_value()) {
    FASTRLHF_CHECK_SAME_DEVICE(*values, rewards);
    FASTRLHF_CHECK_FLOAT(*values);
    FASTRLHF_CHECK_SHAPE(*values, rewards.sizes());
    acc = acc_of({&rewards, &*values});
    FASTRLHF_CHECK_OUT(returns, rewards, acc, rewards.sizes());
  }
  FASTRLHF_CHECK_OUT(advantages, rewards, acc, rewards.sizes());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  TORCH_CHECK_VALUE(T < (int64_t(1) << 31) - 2048, "rewards must have fewer than 2**31 - 2048 positions per row, got T = ",
                    text(T));
  const int64_t n_chunks = chunk >= T ? 1 : (T + chunk - 1) / chunk;
  const std::vector<int64_t> maps_shape{B, n_chunks, 5};  // 5 numbers per chunk map
  if (n_chunks > 1) FASTRLHF_CHECK_OUT(maps, rewards, acc, maps_shape);
  if (rewards.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = unit_t(rewards), m = unit_t(mask);
  const at::Tensor v = values.has_value() ? unit_t(*values) : at::Tensor();
  fastrlhf_gae_params params{};
  params.B = B;
  params.T = T;
  params.rewards = rows_arg(r);
  params.values = v.defined() ? rows_arg(v) : no_rows();
  params.mask = rows_arg(m);
  params.gamma = gamma;
  params.gamma_lam = gamma * lam;
  params.skip_holes = skip_holes ? 1 : 0;
  params.acc = kernel_dtype(acc);
  params.advantages = advantages.data_ptr();
  params.returns = v.defined() ? returns.data_ptr() : nullptr;
  params.threads = static_cast<int>(threads);
  params.chunk = chunk;
  params.maps = n_chunks > 1 ? maps.data_ptr() : nullptr;
  FASTRLHF_CHECK_LAUNCH(fastrlhf_gae_fwd(&params, current_stream(rewards)), "gae_fwd");
}

void group_advantages_fwd(const at::Tensor& scores, int64_t group_size, int64_t method, double eps,
                          const at::Tensor& out) {
  FASTRLHF_CHECK_CUDA(scores);
  FASTRLHF_CHECK_FLOAT(scores);
  TORCH_CHECK_VALUE(scores.dim() == 1, "scores must have one dimension, got shape ", text(scores.sizes()));
  TORCH_CHECK_VALUE(group_size >= 1 && scores.size(0) % group_size == 0,
                    "group_size must be >= 1 and divide N = ", text(scores.size(0)), ", got ", text(group_size));
  TORCH_CHECK_VALUE(method >= 0 && method <= 2, "method must be 0 (grpo), 1 (rloo) or 2 (dr_grpo), got ",
                    text(method));
  FASTRLHF_CHECK_OUT(out, scores, acc_of({&scores}), scores.sizes());
  if (scores.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous();
  FASTRLHF_CHECK_LAUNCH(
      fastrlhf_group_advantages_fwd(rows_arg(s), s.size(0) / group_size, group_size, static_cast<int>(method),
                                    eps, kernel_dtype(out), out.data_ptr(), current_stream(scores)),
      "group_advantages_fwd");
}

}  // namespace fastrlhf
