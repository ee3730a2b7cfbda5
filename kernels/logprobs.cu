// Token log-probs and entropy from logits: one streaming pass over each row per direction.
//
// Same semantics as fastrlhf/triton/logprobs.py. One block per row (blocks loop when there
// are more rows than the grid holds). Forward: every thread keeps an online softmax state
// over its share of the row, z = x * inv_temp in fp32 (fp64 for fp64 logits):
//   m = max z,  s = sum exp(z - m),  t = sum exp(z - m) * (z - m),
// the states are merged across the block in a fixed order, then
//   logp = (z[label] - m) - log s,  entropy = log s - t / s,  stats = (m, log s).
// Backward, per element, with log p = (z - m) - log s:
//   dx = (g_logp * (1[label] - p) - g_ent * p * (log p + H)) * inv_temp,
// where 1[label] is 0 everywhere for a label outside [0, V).
// The row is read as a scalar head, 16-byte packs (evict-first) and a scalar tail.
#include "common.cuh"

namespace fastrlhf {
namespace {

constexpr int kMaxThreads = 512;

template <typename A> struct Softmax {
  A m;  // running max of z
  A s;  // sum exp(z - m)
  A t;  // sum exp(z - m) * (z - m)  (only with entropy)
};

// Reducer for block_reduce: merges two states onto the larger max.
template <typename A, bool kEntropy> struct SoftmaxOp {
  static __device__ __forceinline__ Softmax<A> identity() { return {neg_inf<A>(), A(0), A(0)}; }

  static __device__ __forceinline__ Softmax<A> combine(const Softmax<A>& a, const Softmax<A>& b) {
    const A m = a.m > b.m ? a.m : b.m;
    const A shift = m == neg_inf<A>() ? A(0) : m;  // all -inf so far: keep exp finite
    const A ea = fast_exp(a.m - shift);
    const A eb = fast_exp(b.m - shift);
    Softmax<A> r;
    r.m = m;
    r.s = a.s * ea + b.s * eb;
    // t is relative to the max: moving it by d adds d * s (skipped where s = 0, m = -inf).
    r.t = kEntropy ? (a.s > A(0) ? ea * (a.t + (a.m - shift) * a.s) : A(0)) +
                         (b.s > A(0) ? eb * (b.t + (b.m - shift) * b.s) : A(0))
                   : A(0);
    return r;
  }

  static __device__ __forceinline__ Softmax<A> shuffle_xor(const Softmax<A>& v, int offset) {
    return {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
            kEntropy ? __shfl_xor_sync(0xffffffffu, v.t, offset) : A(0)};
  }
};

// Adds kN values of z to a thread's state: one rescale (rare once the max has settled), then
// one exp per value.
template <bool kEntropy, typename A, int kN>
__device__ __forceinline__ void accumulate(Softmax<A>& st, const A (&z)[kN]) {
  A vmax = z[0];
#pragma unroll
  for (int k = 1; k < kN; ++k) vmax = z[k] > vmax ? z[k] : vmax;
  if (vmax > st.m) {
    const A alpha = fast_exp(st.m - vmax);  // 0 while st.m = -inf
    if (kEntropy) st.t = st.s > A(0) ? alpha * (st.t + (st.m - vmax) * st.s) : A(0);
    st.s *= alpha;
    st.m = vmax;
  }
  const A shift = st.m == neg_inf<A>() ? A(0) : st.m;
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const A e = fast_exp(z[k] - shift);
    st.s += e;
    if (kEntropy) st.t += e > A(0) ? e * (z[k] - shift) : A(0);  // no 0 * inf
  }
}

template <bool kEntropy, typename T>
__device__ __forceinline__ void accumulate_pack(Softmax<acc_t<T>>& st, const Pack<T>& p,
                                                acc_t<T> inv_temp) {
  acc_t<T> z[Pack<T>::kN];
#pragma unroll
  for (int k = 0; k < Pack<T>::kN; ++k) z[k] = to_acc(p.v[k]) * inv_temp;
  accumulate<kEntropy>(st, z);
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads) token_logprobs_fwd_kernel(fastrlhf_logprobs_fwd_params p) {
  using A = acc_t<T>;
  using Op = SoftmaxOp<A, kEntropy>;
  constexpr int kN = Pack<T>::kN;
  __shared__ Softmax<A> smem[kMaxWarps];
  const int64_t tid = threadIdx.x;
  const int64_t stride = blockDim.x;
  const T* __restrict__ x = static_cast<const T*>(p.in.logits);
  const int64_t n_rows = p.in.n_rows, D1 = p.in.D1, s0 = p.in.s0, s1 = p.in.s1, V = p.in.V;
  const A inv_temp = static_cast<A>(p.in.inv_temp);
  A* __restrict__ logp = static_cast<A*>(p.logp);
  A* __restrict__ entropy = static_cast<A*>(p.entropy);
  A* __restrict__ stats = static_cast<A*>(p.stats);

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const T* xr = x + row_offset(row, D1, s0, s1);
    // Thread 0 fetches the label's logit first, so its latency hides behind the stream.
    int64_t label = 0;
    A z_label = A(0);
    if (tid == 0) {
      label = load_index(p.in.labels, p.in.label_dtype, row);
      if (label >= 0 && label < V) z_label = to_acc(xr[label]) * inv_temp;
    }

    Softmax<A> st = Op::identity();
    const int64_t head = aligned_head(xr, V);
    const int64_t n_packs = (V - head) / kN;
    const int64_t tail = head + n_packs * kN;
    if (tid < head) {
      const A z[1] = {to_acc(xr[tid]) * inv_temp};
      accumulate<kEntropy>(st, z);
    }
    const T* body = xr + head;
    for (int64_t i = tid; i < n_packs; i += 2 * stride) {  // two 16-byte loads in flight
      const Pack<T> a = load_pack_streaming(body + i * kN);
      const bool has_b = i + stride < n_packs;
      Pack<T> b{};
      if (has_b) b = load_pack_streaming(body + (i + stride) * kN);
      accumulate_pack<kEntropy>(st, a, inv_temp);
      if (has_b) accumulate_pack<kEntropy>(st, b, inv_temp);
    }
    if (tail + tid < V) {
      const A z[1] = {to_acc(xr[tail + tid]) * inv_temp};
      accumulate<kEntropy>(st, z);
    }
    st = block_reduce<Op>(st, smem);

    if (tid == 0) {
      const A log_s = acc_log(st.s);
      stats[2 * row] = st.m;
      stats[2 * row + 1] = log_s;
      const bool keep = label != p.in.ignore_index;
      const bool in_range = label >= 0 && label < V;
      // Clamps that keep NaN (fmin / fmax would drop it): a NaN or +inf logit, or a row of
      // only -inf, gives NaN as in the reference, never a plausible 0.
      const A lp = (z_label - st.m) - log_s;
      const A h = log_s - st.t / st.s;
      logp[row] = keep ? (in_range ? (lp > A(0) ? A(0) : lp) : A(NAN)) : A(0);
      if (kEntropy) entropy[row] = keep ? (h < A(0) ? A(0) : h) : A(0);
    }
  }
}

// d logits of one element; `is_label` selects the one-hot term.
template <bool kEntropy, typename A>
__device__ __forceinline__ A grad_element(A z, bool is_label, A m, A log_s, A g_logp, A g_ent,
                                          A H, A inv_temp) {
  const A logq = (z - m) - log_s;
  const A p = fast_exp(logq);
  A g = (is_label ? g_logp : A(0)) - g_logp * p;
  if (kEntropy) g -= g_ent * p * (p > A(0) ? logq + H : A(0));
  return g * inv_temp;
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads) token_logprobs_bwd_kernel(fastrlhf_logprobs_bwd_params p) {
  using A = acc_t<T>;
  constexpr int kN = Pack<T>::kN;
  const int64_t tid = threadIdx.x;
  const int64_t stride = blockDim.x;
  const T* x = static_cast<const T*>(p.in.logits);  // dx may alias x (inplace): no __restrict__
  T* dx = static_cast<T*>(p.grad_logits);
  const int64_t n_rows = p.in.n_rows, D1 = p.in.D1, s0 = p.in.s0, s1 = p.in.s1, V = p.in.V;
  const int64_t d0 = p.d0, d1 = p.d1;
  const A inv_temp = static_cast<A>(p.in.inv_temp);
  const A* __restrict__ stats = static_cast<const A*>(p.stats);
  const A* __restrict__ entropy = static_cast<const A*>(p.entropy);
  const A* __restrict__ grad_logp = static_cast<const A*>(p.grad_logp);
  const A* __restrict__ grad_entropy = static_cast<const A*>(p.grad_entropy);

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const T* xr = x + row_offset(row, D1, s0, s1);
    T* dr = dx + row_offset(row, D1, d0, d1);
    const int64_t label = load_index(p.in.labels, p.in.label_dtype, row);
    const bool keep = label != p.in.ignore_index;
    // A label outside [0, V) (another shard's token) keeps the -logsumexp gradient.
    const A g_logp = keep ? grad_logp[row] : A(0);
    const A g_ent = kEntropy && keep ? grad_entropy[row] : A(0);
    const A H = kEntropy ? entropy[row] : A(0);
    const A m = stats[2 * row];
    const A log_s = stats[2 * row + 1];
    auto grad = [&](T v, int64_t idx) {
      return from_acc<T>(grad_element<kEntropy>(to_acc(v) * inv_temp, idx == label, m, log_s,
                                                g_logp, g_ent, H, inv_temp));
    };

    const int64_t head = aligned_head(xr, V);
    const int64_t n_packs = (V - head) / kN;
    const int64_t tail = head + n_packs * kN;
    const bool packed_store = same_alignment(xr, dr);  // else packs are stored element-wise
    if (tid < head) dr[tid] = grad(xr[tid], tid);
    for (int64_t i = tid; i < n_packs; i += stride) {
      const int64_t start = head + i * kN;
      Pack<T> p = load_pack_streaming(xr + start);
#pragma unroll
      for (int k = 0; k < kN; ++k) p.v[k] = grad(p.v[k], start + k);
      if (packed_store) {
        store_pack_streaming(dr + start, p);
      } else {
#pragma unroll
        for (int k = 0; k < kN; ++k) dr[start + k] = p.v[k];
      }
    }
    if (tail + tid < V) dr[tail + tid] = grad(xr[tail + tid], tail + tid);
  }
}

// Threads per block: enough for >= 4 packs per thread, 32 to kMaxThreads.
int threads_for(int64_t V, int pack) {
  int t = kWarpSize;
  while (t < kMaxThreads && int64_t(t) * 4 * pack < V) t *= 2;
  return t;
}

// Calls f(T{}) for the element type of `dtype` (a floating dtype).
template <typename F> cudaError_t with_float_type(fastrlhf_dtype dtype, F&& f) {
  switch (dtype) {
    case FASTRLHF_FLOAT32: return f(float{});
    case FASTRLHF_FLOAT16: return f(__half{});
    case FASTRLHF_BFLOAT16: return f(__nv_bfloat16{});
    case FASTRLHF_FLOAT64: return f(double{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_token_logprobs_fwd(const fastrlhf_logprobs_fwd_params* params,
                                                   cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_logprobs_fwd_params& p = *params;
  if (p.in.n_rows <= 0) return cudaSuccess;
  return with_float_type(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = p.entropy ? token_logprobs_fwd_kernel<T, true> : token_logprobs_fwd_kernel<T, false>;
    kernel<<<grid_for(p.in.n_rows), threads_for(p.in.V, Pack<T>::kN), 0, stream>>>(p);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fastrlhf_token_logprobs_bwd(const fastrlhf_logprobs_bwd_params* params,
                                                   cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_logprobs_bwd_params& p = *params;
  if (p.in.n_rows <= 0) return cudaSuccess;
  return with_float_type(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = p.grad_entropy ? token_logprobs_bwd_kernel<T, true> : token_logprobs_bwd_kernel<T, false>;
    kernel<<<grid_for(p.in.n_rows), threads_for(p.in.V, Pack<T>::kN), 0, stream>>>(p);
    return cudaGetLastError();
  });
}
