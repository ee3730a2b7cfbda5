// CUDA implementations of fastrlhf_cuda::token_logprobs_fwd / token_logprobs_bwd: checks,
// row addressing, current stream, then the C-ABI launchers of kernels/logprobs.cu.
// Outputs are allocated by the caller (fastrlhf/cuda/logprobs.py) and written here.
#include <ATen/ops/empty_like.h>

#include "checks.h"
#include "ops.h"

namespace fastrlhf {
namespace {

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  FASTRLHF_CHECK_CUDA(logits);
  FASTRLHF_CHECK_FLOAT(logits);
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1,
                    "logits must have a vocabulary dimension V >= 1, got shape ", text(logits.sizes()));
  TORCH_CHECK_VALUE(logits.size(-1) < (int64_t(1) << 31),
                    "logits must have a vocabulary dimension V < 2**31, got shape ", text(logits.sizes()));
  TORCH_CHECK_VALUE(logits.stride(-1) == 1 || logits.size(-1) == 1,
                    "logits must have unit stride on the last dimension, got strides ", text(logits.strides()));
  FASTRLHF_CHECK_SAME_DEVICE(labels, logits);
  FASTRLHF_CHECK_DTYPE(labels, at::kInt, at::kLong);
  FASTRLHF_CHECK_SHAPE(labels, logits.sizes().slice(0, logits.dim() - 1));
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", text(temperature));
}

std::vector<int64_t> with_pair(at::IntArrayRef sizes) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.push_back(2);
  return out;
}

// Logits [..., V] with their labels (and a gradient sharing their row layout) as the kernels
// address them. The logits (and grad_logits) are used in place when their leading dims merge
// into at most two strides; else as contiguous copies (the gradient of a copy is written back
// by the caller: dx is then not grad_logits). The tensors keep what `in` points to alive.
struct LogitsView {
  at::Tensor x, dx, labels;
  fastrlhf_logits in;
  int64_t d0 = 0, d1 = 0;  // dx's row strides
};

LogitsView logits_view(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                       int64_t ignore_index, const at::Tensor* grad_logits = nullptr) {
  LogitsView v{logits, grad_logits ? *grad_logits : at::Tensor(), labels.contiguous(), {}};
  auto layout = [&] { return grad_logits ? row_layout({&v.x, &v.dx}) : row_layout({&v.x}); };
  std::optional<RowLayout> rows = layout();
  if (!rows) {  // a layout of three or more strides: work on contiguous copies
    const bool inplace = grad_logits && grad_logits->is_same(logits);
    v.x = logits.contiguous();
    if (grad_logits) {
      v.dx = inplace ? v.x
                     : (grad_logits->is_contiguous() ? *grad_logits
                                                     : at::empty_like(v.x, at::MemoryFormat::Contiguous));
    }
    rows = layout();
  }
  v.in = {kernel_dtype(v.x), v.x.data_ptr(), rows->n_rows, v.x.size(-1), rows->D1, rows->s0[0], rows->s1[0],
          v.labels.data_ptr(), kernel_dtype(v.labels), 1.0 / temperature, ignore_index};
  if (grad_logits) {
    v.d0 = rows->s0[1];
    v.d1 = rows->s1[1];
  }
  return v;
}

}  // namespace

void token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                        int64_t ignore_index, bool with_entropy, const at::Tensor& logp,
                        const at::Tensor& entropy, const at::Tensor& stats) {
  check_logits_labels(logits, labels, temperature);
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  FASTRLHF_CHECK_OUT(logp, logits, acc, labels.sizes());
  FASTRLHF_CHECK_OUT(stats, logits, acc, with_pair(labels.sizes()));
  if (with_entropy) FASTRLHF_CHECK_OUT(entropy, logits, acc, labels.sizes());
  if (labels.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(logits.device());
  const LogitsView v = logits_view(logits, labels, temperature, ignore_index);
  const fastrlhf_logprobs_fwd_params params{v.in, logp.data_ptr(), with_entropy ? entropy.data_ptr() : nullptr,
                                            stats.data_ptr()};
  FASTRLHF_CHECK_LAUNCH(fastrlhf_token_logprobs_fwd(&params, current_stream(v.x)), "token_logprobs_fwd");
}

void token_logprobs_bwd(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                        const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& stats,
                        const at::Tensor& entropy, double temperature, int64_t ignore_index,
                        const at::Tensor& grad_logits) {
  check_logits_labels(logits, labels, temperature);
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  FASTRLHF_CHECK_OUT(stats, logits, acc, with_pair(labels.sizes()));
  FASTRLHF_CHECK_SAME_DEVICE(grad_logp, logits);
  FASTRLHF_CHECK_SHAPE(grad_logp, labels.sizes());
  FASTRLHF_CHECK_SAME_DEVICE(grad_logits, logits);
  FASTRLHF_CHECK_SHAPE(grad_logits, logits.sizes());
  TORCH_CHECK_TYPE(grad_logits.scalar_type() == logits.scalar_type(), "grad_logits must have dtype ",
                   dtype_name(logits.scalar_type()), " like logits, got ",
                   dtype_name(grad_logits.scalar_type()));
  TORCH_CHECK_VALUE(grad_logits.stride(-1) == 1 || grad_logits.size(-1) == 1,
                    "grad_logits must have unit stride on the last dimension, got strides ",
                    text(grad_logits.strides()));
  at::Tensor g_ent;
  if (grad_entropy.has_value()) {
    FASTRLHF_CHECK_SAME_DEVICE(*grad_entropy, logits);
    FASTRLHF_CHECK_SHAPE(*grad_entropy, labels.sizes());
    FASTRLHF_CHECK_OUT(entropy, logits, acc, labels.sizes());
    g_ent = grad_entropy->to(acc).contiguous();
  }
  if (labels.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g_logp = grad_logp.to(acc).contiguous();
  const LogitsView v = logits_view(logits, labels, temperature, ignore_index, &grad_logits);
  const fastrlhf_logprobs_bwd_params params{v.in,
                                            v.dx.data_ptr(),
                                            v.d0,
                                            v.d1,
                                            stats.data_ptr(),
                                            g_ent.defined() ? entropy.data_ptr() : nullptr,
                                            g_logp.data_ptr(),
                                            g_ent.defined() ? g_ent.data_ptr() : nullptr};
  FASTRLHF_CHECK_LAUNCH(fastrlhf_token_logprobs_bwd(&params, current_stream(v.x)), "token_logprobs_bwd");
  if (!v.dx.is_same(grad_logits)) grad_logits.copy_(v.dx);
}

}  // namespace fastrlhf
