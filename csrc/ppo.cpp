// CUDA implementations of fastrlhf_cuda::ppo_loss_fwd / ppo_loss_bwd (kernels/ppo.cu).
// Outputs (partials, gradient) are allocated by the caller (fastrlhf/cuda/ppo.py).
#include <torch/library.h>

#include "checks.h"

namespace fastrlhf {
namespace {

// x, old, y: [B, T] floating; mask [B, T]; row_counts int64 [B] when given.
void check_inputs(const at::Tensor& x, const at::Tensor& old, const at::Tensor& y, const at::Tensor& mask,
                  const std::optional<at::Tensor>& row_counts) {
  FASTRLHF_CHECK_CUDA(x);
  FASTRLHF_CHECK_FLOAT(x);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [B, T], got ", x.sizes());
  for (const at::Tensor* t : {&old, &y}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "inputs must all be on ", x.device(), ", got ", t->device());
    TORCH_CHECK_TYPE(dtype_in(t->scalar_type(), {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}),
                     "inputs must have dtype float32/float16/bfloat16/float64, got ",
                     dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->sizes() == x.sizes(), "inputs must have shape ", x.sizes(), ", got ", t->sizes());
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
}

const int64_t* counts_ptr(const std::optional<at::Tensor>& row_counts) {
  return row_counts.has_value() ? row_counts->data_ptr<int64_t>() : nullptr;
}

void ppo_loss_fwd(bool value, const at::Tensor& x, const at::Tensor& old, const at::Tensor& y,
                  const at::Tensor& mask, const std::optional<at::Tensor>& row_counts, double c0, double c1,
                  double c2, double c3, const at::Tensor& sums, const at::Tensor& counts) {
  check_inputs(x, old, y, mask, row_counts);
  const at::ScalarType acc = acc_of({&x, &old, &y});
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == (value ? 1 : 2),
                    "sums must have shape [", value ? 1 : 2, ", n_parts], got ", sums.sizes());
  const int64_t n_parts = sums.size(1);
  FASTRLHF_CHECK_OUT(sums, x, acc, sums.sizes());
  FASTRLHF_CHECK_OUT(counts, x, at::kInt, (std::vector<int64_t>{value ? 2 : 3, n_parts}));
  if (x.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xf = flat(x), of = flat(old), yf = flat(y), mf = flat(mask);
  FASTRLHF_CHECK_LAUNCH(
      fastrlhf_ppo_loss_fwd(value ? 1 : 0, xf.numel(), x.size(1), rows_arg(xf), rows_arg(of), rows_arg(yf),
                            mask_arg(mf), counts_ptr(row_counts), c0, c1, c2, c3, acc == at::kDouble ? 1 : 0,
                            n_parts, sums.data_ptr(), counts.data_ptr<int32_t>(), current_stream(x)),
      "ppo_loss_fwd");
}

void ppo_loss_bwd(bool value, const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& x,
                  const at::Tensor& old, const at::Tensor& y, const at::Tensor& mask,
                  const std::optional<at::Tensor>& row_counts, double c0, double c1, double c2, double c3,
                  const at::Tensor& grad_x) {
  check_inputs(x, old, y, mask, row_counts);
  for (const at::Tensor* t : {&grad, &scale}) {
    TORCH_CHECK_VALUE(t->device() == x.device() && t->numel() == 1,
                      "grad and scale must be single values on ", x.device(), ", got shape ", t->sizes(),
                      " on ", t->device());
    TORCH_CHECK_TYPE(dtype_in(t->scalar_type(), {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}),
                     "grad and scale must have dtype float32/float16/bfloat16/float64, got ",
                     dtype_name(t->scalar_type()));
  }
  FASTRLHF_CHECK_OUT(grad_x, x, x.scalar_type(), x.sizes());
  if (x.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xf = flat(x), of = flat(old), yf = flat(y), mf = flat(mask);
  const at::Tensor g = flat(grad), s = flat(scale);
  FASTRLHF_CHECK_LAUNCH(
      fastrlhf_ppo_loss_bwd(value ? 1 : 0, xf.numel(), x.size(1), rows_arg(g), rows_arg(s), rows_arg(xf),
                            rows_arg(of), rows_arg(yf), mask_arg(mf), counts_ptr(row_counts), c0, c1, c2, c3,
                            acc_of({&x, &old, &y}) == at::kDouble ? 1 : 0, grad_x.data_ptr(),
                            current_stream(x)),
      "ppo_loss_bwd");
}

}  // namespace
}  // namespace fastrlhf

TORCH_LIBRARY_IMPL(fastrlhf_cuda, CUDA, m) {
  m.impl("ppo_loss_fwd", &fastrlhf::ppo_loss_fwd);
  m.impl("ppo_loss_bwd", &fastrlhf::ppo_loss_bwd);
}
