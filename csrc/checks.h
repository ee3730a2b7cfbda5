// Input checks as small macros, dtype mapping and row addressing shared by the CUDA op
// implementations. A failed check raises ValueError/TypeError in Python with the argument's
// name, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "launchers.cuh"

namespace fastrlhf {

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline std::string dtype_names(std::initializer_list<at::ScalarType> types) {
  std::string out;
  for (auto t : types) out += (out.empty() ? "" : "/") + std::string(dtype_name(t));
  return out;
}

inline bool dtype_in(at::ScalarType t, std::initializer_list<at::ScalarType> types) {
  for (auto u : types) if (u == t) return true;
  return false;
}

// Numbers reach error messages as strings made here, never through operator<< of a number:
// on an H200 image (torch 2.11, g++ 13.3) every failed check whose message streamed an integer
// or a shape crashed the process instead of raising, while messages of strings raised.
inline std::string text(int64_t v) { return std::to_string(v); }
inline std::string text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
inline std::string text(at::IntArrayRef v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

}  // namespace fastrlhf

#define FASTRLHF_CHECK_CUDA(x) \
  TORCH_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())

#define FASTRLHF_CHECK_SAME_DEVICE(x, ref)                                                   \
  TORCH_CHECK_VALUE((x).device() == (ref).device(), #x " must be on ", (ref).device(),       \
                    " like " #ref ", got ", (x).device())

// FASTRLHF_CHECK_DTYPE(x, at::kFloat, at::kHalf): one of the listed dtypes.
#define FASTRLHF_CHECK_DTYPE(x, ...)                                                         \
  TORCH_CHECK_TYPE(::fastrlhf::dtype_in((x).scalar_type(), {__VA_ARGS__}),                   \
                   #x " must have dtype ", ::fastrlhf::dtype_names({__VA_ARGS__}), ", got ", \
                   ::fastrlhf::dtype_name((x).scalar_type()))

// FASTRLHF_CHECK_SHAPE(x, expected): expected converts to at::IntArrayRef.
#define FASTRLHF_CHECK_SHAPE(x, expected)                                                    \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef(expected), #x " must have shape ",        \
                    ::fastrlhf::text(at::IntArrayRef(expected)), ", got ", ::fastrlhf::text((x).sizes()))

#define FASTRLHF_CHECK_FLOAT(x) FASTRLHF_CHECK_DTYPE(x, at::kFloat, at::kHalf, at::kBFloat16, at::kDouble)

#define FASTRLHF_CHECK_MASK(x)                                                              \
  TORCH_CHECK_TYPE(!(x).is_complex(), #x " must be a bool, integer or floating tensor, got ", \
                   ::fastrlhf::dtype_name((x).scalar_type()))

// An output written by the kernels: on `ref`'s device, `dtype`, `shape`, contiguous.
#define FASTRLHF_CHECK_OUT(x, ref, dtype, shape)                                            \
  do {                                                                                      \
    FASTRLHF_CHECK_SAME_DEVICE(x, ref);                                                     \
    FASTRLHF_CHECK_DTYPE(x, dtype);                                                         \
    FASTRLHF_CHECK_SHAPE(x, shape);                                                         \
    FASTRLHF_CHECK_CONTIGUOUS(x);                                                           \
  } while (0)

#define FASTRLHF_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous, got strides ", ::fastrlhf::text((x).strides()))

#define FASTRLHF_CHECK_LAUNCH(err, name)                                                     \
  do {                                                                                       \
    const cudaError_t fastrlhf_err_ = (err);                                                 \
    TORCH_CHECK(fastrlhf_err_ == cudaSuccess, "fastrlhf CUDA kernel ", name, " failed: ",   \
                cudaGetErrorString(fastrlhf_err_));                                          \
  } while (0)

namespace fastrlhf {

// The kernels' name of a dtype: every dtype an input may have (floating inputs, int32/int64
// labels, masks of any dtype but complex).
inline fastrlhf_dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FASTRLHF_FLOAT32;
    case at::kHalf: return FASTRLHF_FLOAT16;
    case at::kBFloat16: return FASTRLHF_BFLOAT16;
    case at::kDouble: return FASTRLHF_FLOAT64;
    case at::kBool: return FASTRLHF_BOOL;
    case at::kByte: return FASTRLHF_UINT8;
    case at::kChar: return FASTRLHF_INT8;
    case at::kShort: return FASTRLHF_INT16;
    case at::kInt: return FASTRLHF_INT32;
    case at::kLong: return FASTRLHF_INT64;
    default: TORCH_CHECK_TYPE(false, "fastrlhf CUDA kernels do not read dtype ", dtype_name(t));
  }
}

inline fastrlhf_dtype kernel_dtype(const at::Tensor& x) { return kernel_dtype(x.scalar_type()); }

// The accumulation (and output) dtype for inputs of dtype t: float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// An input of the small ops as the launchers take it: [B, T] with unit stride along T
// (row_stride = stride(0)) or flat and contiguous (row_stride 0). See unit_t / flat.
inline fastrlhf_rows rows_arg(const at::Tensor& x) {
  return {x.data_ptr(), kernel_dtype(x), x.dim() == 2 ? x.stride(0) : 0};
}

inline fastrlhf_rows no_rows() { return {nullptr, FASTRLHF_FLOAT32, 0}; }

// x ([B, T]) read in place when T has unit stride, else a contiguous copy.
inline at::Tensor unit_t(const at::Tensor& x) {
  return x.size(1) > 1 && x.stride(1) != 1 ? x.contiguous() : x;
}

// x as a contiguous 1-D tensor (a copy only when it is not contiguous).
inline at::Tensor flat(const at::Tensor& x) { return x.reshape(-1).contiguous(); }

// float64 if any input is float64, else float32.
inline at::ScalarType acc_of(std::initializer_list<const at::Tensor*> xs) {
  for (const at::Tensor* x : xs) if (x->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline cudaStream_t current_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
}

// Row addressing of [..., V] tensors sharing their leading shape: row r of tensor k starts
// at (r / D1) * s0[k] + (r % D1) * s1[k]. Leading dims are merged where every tensor's memory
// allows; nullopt when three or more separate strides would remain (the caller copies).
struct RowLayout {
  int64_t n_rows;
  int64_t D1;
  std::vector<int64_t> s0, s1;
};

inline std::optional<RowLayout> row_layout(std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& first = **tensors.begin();
  const int64_t lead = first.dim() - 1;
  const size_t k = tensors.size();
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> strides;  // [dim][tensor]
  int64_t n_rows = 1;
  for (int64_t d = 0; d < lead; ++d) {
    const int64_t n = first.size(d);
    n_rows *= n;
    if (n == 1) continue;
    std::vector<int64_t> st;
    for (const at::Tensor* t : tensors) st.push_back(t->stride(d));
    bool merge = !sizes.empty();
    for (size_t i = 0; merge && i < k; ++i) merge = strides.back()[i] == n * st[i];
    if (merge) {
      sizes.back() *= n;
      strides.back() = st;
    } else {
      sizes.push_back(n);
      strides.push_back(st);
    }
  }
  if (sizes.size() > 2) return std::nullopt;
  RowLayout r{n_rows, 1, std::vector<int64_t>(k, 0), std::vector<int64_t>(k, 0)};
  if (sizes.size() == 2) {
    r.D1 = sizes[1];
    r.s0 = strides[0];
    r.s1 = strides[1];
  } else {
    r.D1 = n_rows > 0 ? n_rows : 1;
    if (sizes.size() == 1) r.s1 = strides[0];
  }
  return r;
}

}  // namespace fastrlhf
