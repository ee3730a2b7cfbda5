// The fastrlhf_cuda operator library (the schema of every op and its CUDA implementation from
// csrc/<family>.cpp, declared in ops.h) and the Python module around it, which exposes build
// information.
//
// Ops take their outputs as mutable arguments: the Python launchers (fastrlhf/cuda/) allocate
// them, as the Triton launchers do. A backward op's grad_logits may be logits itself (an
// in-place backward); these ops are called eagerly from inside fastrlhf's own custom ops,
// which carry the public schemas.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "launchers.cuh"
#include "ops.h"

TORCH_LIBRARY(fastrlhf_cuda, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
        "bool with_entropy, Tensor(a!) logp, Tensor(b!) entropy, Tensor(c!) stats) -> ()");
  m.def("token_logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor stats, Tensor entropy, float temperature, int ignore_index, "
        "Tensor(a!) grad_logits) -> ()");
  m.def("gae_fwd(Tensor rewards, Tensor? values, Tensor mask, float gamma, float lam, bool skip_holes, "
        "int threads, int chunk, Tensor(a!) advantages, Tensor(b!) returns, Tensor(c!) maps) -> ()");
  m.def("group_advantages_fwd(Tensor scores, int group_size, int method, float eps, Tensor(a!) out) -> ()");
  m.def("kl_penalty_fwd(Tensor logprobs, Tensor ref_logprobs, int estimator, float clamp, "
        "float log_ratio_clamp, Tensor(a!) out) -> ()");
  m.def("kl_penalty_bwd(Tensor grad, Tensor logprobs, Tensor ref_logprobs, int estimator, bool straight, "
        "float clamp, float log_ratio_clamp, Tensor(a!) grad_logprobs, Tensor(b!) grad_ref_logprobs) -> ()");
  m.def("kl_penalized_rewards_fwd(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, "
        "float kl_coef, Tensor? kl_coef_t, int estimator, float kl_clamp, float log_ratio_clamp, "
        "float score_clip, Tensor(a!) rewards, Tensor(b!) kl) -> ()");
  m.def("ppo_policy_fwd(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, "
        "Tensor? row_counts, float ratio_low, float ratio_high, float dual_clip, float log_ratio_clamp, "
        "Tensor(a!) sums, Tensor(b!) counts) -> ()");
  m.def("ppo_value_fwd(Tensor values, Tensor old_values, Tensor returns, Tensor mask, Tensor? row_counts, "
        "float clip, Tensor(a!) sums, Tensor(b!) counts) -> ()");
  m.def("ppo_policy_bwd(Tensor grad, Tensor scale, Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
        "Tensor mask, Tensor? row_counts, float ratio_low, float ratio_high, float dual_clip, "
        "float log_ratio_clamp, Tensor(a!) grad_logprobs) -> ()");
  m.def("ppo_value_bwd(Tensor grad, Tensor scale, Tensor values, Tensor old_values, Tensor returns, "
        "Tensor mask, Tensor? row_counts, float clip, Tensor(a!) grad_values) -> ()");
}

TORCH_LIBRARY_IMPL(fastrlhf_cuda, CUDA, m) {
  m.impl("token_logprobs_fwd", &fastrlhf::token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &fastrlhf::token_logprobs_bwd);
  m.impl("gae_fwd", &fastrlhf::gae_fwd);
  m.impl("group_advantages_fwd", &fastrlhf::group_advantages_fwd);
  m.impl("kl_penalty_fwd", &fastrlhf::kl_penalty_fwd);
  m.impl("kl_penalty_bwd", &fastrlhf::kl_penalty_bwd);
  m.impl("kl_penalized_rewards_fwd", &fastrlhf::kl_penalized_rewards_fwd);
  m.impl("ppo_policy_fwd", &fastrlhf::ppo_policy_fwd);
  m.impl("ppo_value_fwd", &fastrlhf::ppo_value_fwd);
  m.impl("ppo_policy_bwd", &fastrlhf::ppo_policy_bwd);
  m.impl("ppo_value_bwd", &fastrlhf::ppo_value_bwd);
}

namespace {

namespace py = pybind11;

py::dict build_info() {
  py::dict info;
  const int cuda = fastrlhf_kernels_cuda_version();
  info["cuda"] = std::to_string(cuda / 1000) + "." + std::to_string(cuda % 1000 / 10);
  info["archs"] = std::string(fastrlhf_kernels_arch_list());  // e.g. "800,900"
  info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                  "." + std::to_string(TORCH_VERSION_PATCH);
  info["compiler"] = std::string(__VERSION__);
  return info;
}

// "" when the kernels run on `device`, else the CUDA error, e.g. "no kernel image is available".
std::string check_device(int device) {
  const cudaError_t err = fastrlhf_kernels_check_device(device);
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrlhf CUDA kernels; the ops are torch.ops.fastrlhf_cuda.*";
  m.def("build_info", &build_info,
        "What the extension was built with: cuda and torch versions, archs (nvcc's "
        "__CUDA_ARCH_LIST__) and the host compiler.");
  m.def("check_device", &check_device, py::arg("device"),
        "'' when the kernels have code for CUDA device `device`, else the CUDA error.");
}
