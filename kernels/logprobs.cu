// Token log-probs and entropy from logits: one streaming pass over each row per direction.
//
// Same semantics as fastrlhf/triton/logprobs.py. One block per row (blocks loop when there
// are more rows than the grid holds); a row is read as a scalar head up to its first 16-byte
// boundary, an aligned body of 16-byte packs (evict-first) and a scalar tail, with 32-bit
// offsets inside the row (V < 2^31).
//
// Forward, in the log2 domain. With c = log2(e) / temperature, every thread keeps over its
// share of the row the running max mx of the raw logits x, and relative to it
//   s = sum 2^y,  t = sum 2^y * y  (entropy only),  y = (x - mx) * c
// (mx taken as 0 while it is -inf: no inf - inf). The difference is exact for logits of
// like magnitude, so the row's max contributes exactly 1 whatever mx * c rounds to (a single
// finite logit gives log-prob 0 and entropy 0 exactly, as in the reference). The max of a
// group of 4 packs is taken first (paired bf16/fp16 max: under one instruction per element),
// and the state is rescaled only when it grows (rare once the max settles); then each
// element costs its unpack, a subtract, a multiply, one exp2, one add (and for the entropy a
// clamp and one multiply-add: no 0 * -inf for -inf logits). No block barrier in the loop: the
// threads' states are merged once per row (warps by shuffles, then one warp over the warps'
// states), always onto the state with the larger max, which makes the merge order-
// independent (same bits run to run). At the end, with the row max MX:
//   stats = (m, log s) with m = MX / temperature (the row max of z = x / temperature, as the
//   reference) and log s = ln S + R, where R = MX / T - m is m's rounding residual (one exact
//   fma): log s is relative to m itself, so m + log s is the row's log-sum-exp however large
//   the logits;
//   logp = (x_label / T - m) - log s,  entropy = ln S - ln 2 * t / S.
// fp64 logits: the same in fp64 with the accurate exp2.
//
// Backward, per element off the label, with t = x / T - m (one multiply-add):
//   p = 2^(t log2(e) - log s log2(e)),  dx = p * (k0 + k1 * t),
//   k0 = -(g_logp + g_ent (H - log s)) / T,  k1 = -g_ent / T   (per row),
// which is (g_logp (1[label] - p) - g_ent p (log p + H)) / T off the label (p * t is 0 where
// p = 0: t is clamped to a finite value first). The thread that stores the label's element
// overwrites it afterwards with the full formula (it read that logit before its stores: the
// gradient may be written into the logits). A label outside [0, V) has no such element: every
// element keeps the -logsumexp gradient. When the gradient rows sit at another offset from a
// 16-byte boundary than the logits rows (the label shift x[:, :-1] of an odd V), the body
// follows the gradient's alignment and realigns the logits: two 16-byte loads and a funnel
// of word selects and byte permutes per pack, so loads and stores stay 16 bytes wide.
#include "common.cuh"

namespace fastrlhf {
namespace {

constexpr int kMaxThreads = 512;
// Packs per thread per iteration of the main loops (fp64: fewer, its exp2 is a long
// polynomial that would run out of registers).
template <typename T> constexpr int kFwdPacks = sizeof(T) == 8 ? 1 : 4;
template <typename T> constexpr int kBwdPacks = sizeof(T) == 8 ? 1 : 2;
// Blocks of kMaxThreads per SM the register allocation must allow: the forward 2 (64
// registers), the backward 4 (32 registers: all threads resident; 3 when it realigns the
// logits); fp64 1 (its exp2 needs more).
template <typename T> constexpr int kFwdMinBlocks = sizeof(T) == 8 ? 1 : 2;
template <typename T, bool kShifted> constexpr int kBwdMinBlocks = sizeof(T) == 8 ? 1 : (kShifted ? 3 : 4);

// ---------------------------------------------------------------------------- forward
template <typename A> struct Online {
  A mx;  // running max of the raw logits (-inf: none yet)
  A s;   // sum 2^y, y = (x - shift_of(mx)) * c
  A t;   // sum 2^y * y (entropy only)
};

// What the logits are measured from: the max, or 0 while it is -inf (a row of -inf logits so
// far must give 2^-inf = 0, not 2^(-inf + inf)).
template <typename A> __device__ __forceinline__ A shift_of(A mx) { return mx == neg_inf<A>() ? A(0) : mx; }

// Adds N logits (their max gmax known) to a thread's state; neg_shift = -shift_of(st.mx).
template <bool kEntropy, typename A, int N>
__device__ __forceinline__ void add(Online<A>& st, A& neg_shift, A gmax, const A (&x)[N], A c) {
  if (gmax > st.mx) {  // the max grows: rescale the sums to the new shift (NaN never grows it)
    const A d = (-neg_shift - gmax) * c;  // the old y minus the new, in log2 units
    const A alpha = fast_exp2(d);
    if (st.s != A(0)) {  // nothing to rescale yet (and 0 * inf must not make NaN)
      if (kEntropy) st.t = alpha * fma(d, st.s, st.t);
      st.s *= alpha;
    }
    st.mx = gmax;
    neg_shift = -gmax;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A y = (x[k] + neg_shift) * c;
    const A e = fast_exp2(y);
    st.s += e;
    // y = -inf (a -inf logit) has e = 0: clamp y so that e * y is 0, not NaN (NaN y: e is NaN)
    if (kEntropy) st.t = fma(e, fmax(y, -std::numeric_limits<A>::max()), st.t);
  }
}

template <bool kEntropy, typename A> __device__ __forceinline__ void add_one(Online<A>& st, A& neg_shift, A x, A c) {
  const A one[1] = {x};
  add<kEntropy>(st, neg_shift, x, one, c);
}

// b merged into a: onto the state with the larger max, so merge(a, b) == merge(b, a) bit for bit.
template <bool kEntropy, typename A> __device__ __forceinline__ Online<A> merge(Online<A> a, Online<A> b, A c) {
  if (b.mx > a.mx) {
    const Online<A> k = a;
    a = b;
    b = k;
  }
  if (b.s != A(0)) {  // b adds nothing (and 0 * inf must not make NaN)
    const A d = (shift_of(b.mx) - shift_of(a.mx)) * c;
    const A alpha = fast_exp2(d);
    a.s = fma(b.s, alpha, a.s);
    if (kEntropy) a.t = fma(alpha, fma(d, b.s, b.t), a.t);
  }
  return a;
}

template <bool kEntropy, typename A> __device__ __forceinline__ Online<A> warp_merge(Online<A> st, A c) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Online<A> other{__shfl_xor_sync(0xffffffffu, st.mx, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                          kEntropy ? __shfl_xor_sync(0xffffffffu, st.t, offset) : A(0)};
    st = merge<kEntropy>(st, other, c);
  }
  return st;
}

// fma(a, b, -r) where r is a rounding of a * b: the rounding's residual, exact; 0 when a * b
// is not finite (no residual to correct).
template <typename A> __device__ __forceinline__ A residual(A a, A b, A r) {
  const A d = fma(a, b, -r);
  return isfinite(d) ? d : A(0);
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads, kFwdMinBlocks<T>) token_logprobs_fwd_kernel(const fastrlhf_logprobs_fwd_params p) {
  using A = acc_t<T>;
  constexpr int kN = kPack<T>;
  __shared__ Online<A> smem[2][kMaxWarps];  // by row parity: one barrier per row
  const int tid = threadIdx.x;
  const int stride = blockDim.x;
  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int V = static_cast<int>(p.in.V);
  const A it = static_cast<A>(p.in.inv_temp);
  const A c = static_cast<A>(p.in.inv_temp * 1.44269504088896340736);  // log2(e) / temperature
  int parity = 0;

  for (int64_t row = blockIdx.x; row < p.in.n_rows; row += gridDim.x, parity ^= 1) {
    const T* __restrict__ xr = static_cast<const T*>(p.in.logits) + row_offset(row, p.in.D1, p.in.s0, p.in.s1);
    // Thread 0 reads the label's logit first: its latency hides behind the stream.
    int64_t label = 0;
    A x_label = A(0);
    if (tid == 0) {
      label = load_index(p.in.labels, p.in.label_dtype, row);
      if (label >= 0 && label < V) x_label = to_acc(xr[label]);
    }

    Online<A> st{neg_inf<A>(), A(0), A(0)};
    A neg_shift = A(0);
    const int head = aligned_head(xr, V);
    const int n_packs = (V - head) / kN;
    const int tail = head + n_packs * kN;
    if (tid < head) add_one<kEntropy>(st, neg_shift, to_acc(xr[tid]), c);
    const T* body = xr + head;
    int i = tid;
    for (; i + (kFwdPacks<T> - 1) * stride < n_packs; i += kFwdPacks<T> * stride) {  // the main loop
      uint4 v[kFwdPacks<T>];
#pragma unroll
      for (int u = 0; u < kFwdPacks<T>; ++u) v[u] = load_pack_streaming(body + (i + u * stride) * kN);
      A x[kFwdPacks<T> * kN];
#pragma unroll
      for (int u = 0; u < kFwdPacks<T>; ++u) unpack<T>(v[u], x, u * kN);
      add<kEntropy>(st, neg_shift, packs_max<T, kFwdPacks<T>>(v), x, c);
    }
#pragma unroll
    for (int u = 0; u < kFwdPacks<T> - 1; ++u) {  // fewer than kFwdPacks<T> packs left
      if (i + u * stride < n_packs) {
        const uint4 v[1] = {load_pack_streaming(body + (i + u * stride) * kN)};
        A x[kN];
        unpack<T>(v[0], x, 0);
        add<kEntropy>(st, neg_shift, packs_max<T, 1>(v), x, c);
      }
    }
    if (tail + tid < V) add_one<kEntropy>(st, neg_shift, to_acc(xr[tail + tid]), c);

    st = warp_merge<kEntropy>(st, c);
    if (lane == 0) smem[parity][warp] = st;
    __syncthreads();  // the next row writes the other half of smem: no second barrier
    if (warp == 0) {
      const int n_warps = (stride + kWarpSize - 1) / kWarpSize;
      st = lane < n_warps ? smem[parity][lane] : Online<A>{neg_inf<A>(), A(0), A(0)};
      st = warp_merge<kEntropy>(st, c);
      if (tid == 0) {
        const A m = st.mx * it;  // the row max of z = x / T, as the reference has it
        const A ln_s = acc_log(st.s);
        const A log_s = ln_s + residual(st.mx, it, m);
        A* stats = static_cast<A*>(p.stats);
        stats[2 * row] = m;
        stats[2 * row + 1] = log_s;
        const bool keep = label != p.in.ignore_index;
        const bool in_range = label >= 0 && label < V;
        // Clamps that keep NaN (fmin / fmax would drop it): a NaN or +inf logit, or a row of
        // only -inf, gives NaN as in the reference, never a plausible 0.
        const A lp = fma(x_label, it, -m) - log_s;
        static_cast<A*>(p.logp)[row] = keep ? (in_range ? (lp > A(0) ? A(0) : lp) : A(NAN)) : A(0);
        if (kEntropy) {
          const A h = ln_s - kLn2<A> * (st.t / st.s);
          static_cast<A*>(p.entropy)[row] = keep ? (h < A(0) ? A(0) : h) : A(0);
        }
      }
    }
  }
}

// --------------------------------------------------------------------------- backward
// Per-row constants of the gradient (see the file comment).
template <typename A> struct GradRow {
  A it, neg_m, neg_ls2, k0, k1;
  // the label's own element (the one-hot term), in the reference's order
  A g_logp, g_ent, H, log_s;
};

template <bool kEntropy, typename A> __device__ __forceinline__ A grad_off_label(A x, const GradRow<A>& r) {
  const A t = fma(x, r.it, r.neg_m);
  const A pr = fast_exp2(fma(t, kLog2e<A>, r.neg_ls2));
  if (!kEntropy) return pr * r.k0;
  // p * t, with t = -inf (a -inf logit, p = 0) clamped: 0, not NaN (NaN t: p is NaN)
  return fma(pr * fmax(t, -std::numeric_limits<A>::max()), r.k1, pr * r.k0);
}

template <bool kEntropy, typename A> __device__ __forceinline__ A grad_at_label(A x, const GradRow<A>& r) {
  const A t = fma(x, r.it, r.neg_m);
  const A pr = fast_exp2(fma(t, kLog2e<A>, r.neg_ls2));
  A g = r.g_logp - r.g_logp * pr;
  if (kEntropy) g -= r.g_ent * pr * (pr > A(0) ? (t - r.log_s) + r.H : A(0));
  return g * r.it;
}

template <bool kEntropy, typename T>
__device__ __forceinline__ uint4 grad_pack(const uint4& v, const GradRow<acc_t<T>>& r) {
  acc_t<T> x[kPack<T>];
  unpack<T>(v, x, 0);
#pragma unroll
  for (int k = 0; k < kPack<T>; ++k) x[k] = grad_off_label<kEntropy>(x[k], r);
  return to_pack<T>(x);
}

// kShifted: the gradient's rows start at another offset from a 16-byte boundary than the
// logits' rows; the body follows the gradient and realigns the logits (funnel_pack).
template <typename T, bool kEntropy, bool kShifted>
__global__ void __launch_bounds__(kMaxThreads, kBwdMinBlocks<T, kShifted>) token_logprobs_bwd_kernel(const fastrlhf_logprobs_bwd_params p) {
  using A = acc_t<T>;
  constexpr int kN = kPack<T>;
  const int tid = threadIdx.x;
  const int stride = blockDim.x;
  const int V = static_cast<int>(p.in.V);
  const A* stats = static_cast<const A*>(p.stats);

  for (int64_t row = blockIdx.x; row < p.in.n_rows; row += gridDim.x) {
    // x and dx may be the same memory (an in-place backward): no __restrict__
    const T* xr = static_cast<const T*>(p.in.logits) + row_offset(row, p.in.D1, p.in.s0, p.in.s1);
    T* dr = static_cast<T*>(p.grad_logits) + row_offset(row, p.in.D1, p.d0, p.d1);
    const int64_t label = load_index(p.in.labels, p.in.label_dtype, row);
    const bool keep = label != p.in.ignore_index;
    GradRow<A> r;
    r.it = static_cast<A>(p.in.inv_temp);
    r.g_logp = keep ? static_cast<const A*>(p.grad_logp)[row] : A(0);
    r.g_ent = kEntropy && keep ? static_cast<const A*>(p.grad_entropy)[row] : A(0);
    r.H = kEntropy ? static_cast<const A*>(p.entropy)[row] : A(0);
    r.log_s = stats[2 * row + 1];
    r.neg_m = -stats[2 * row];
    r.neg_ls2 = -r.log_s * kLog2e<A>;
    r.k0 = -(kEntropy ? fma(r.g_ent, r.H - r.log_s, r.g_logp) : r.g_logp) * r.it;
    r.k1 = -r.g_ent * r.it;

    const int head = aligned_head(dr, V);  // the body follows the stores' alignment
    const int n_packs = (V - head) / kN;
    const int tail = head + n_packs * kN;
    // The thread storing the label's element reads its logit before any of its stores.
    const bool in_range = keep && label >= 0 && label < V;
    const int l = in_range ? static_cast<int>(label) : 0;
    const int owner = !in_range ? -1 : (l < head ? l : (l < tail ? (l - head) / kN % stride : l - tail));
    const A x_label = tid == owner ? to_acc(xr[l]) : A(0);

    if (tid < head) dr[tid] = from_acc<T>(grad_off_label<kEntropy>(to_acc(xr[tid]), r));
    T* body = dr + head;
    // kShifted: pack j of the body holds bytes [b, b + 16) of the 16-byte blocks j and j + 1
    // from xb on (the second block only when b > 0: it holds needed bytes, so never lies past
    // the logits' last 16-byte block).
    const int b = kShifted ? static_cast<int>(reinterpret_cast<uintptr_t>(xr + head) % 16) : 0;
    const char* xb = reinterpret_cast<const char*>(xr + head) - b;
    const int next = b ? 16 : 0;
    auto load = [&](int j) {
      if (!kShifted) return load_pack_streaming(xb + 16 * j);
      return funnel_pack<T>(load_pack_streaming(xb + 16 * j), load_pack_streaming(xb + 16 * j + next), b);
    };
    int i = tid;
    for (; i + (kBwdPacks<T> - 1) * stride < n_packs; i += kBwdPacks<T> * stride) {  // the main loop
      uint4 v[kBwdPacks<T>];
#pragma unroll
      for (int u = 0; u < kBwdPacks<T>; ++u) v[u] = load(i + u * stride);
#pragma unroll
      for (int u = 0; u < kBwdPacks<T>; ++u) store_pack_streaming(body + (i + u * stride) * kN, grad_pack<kEntropy, T>(v[u], r));
    }
#pragma unroll
    for (int u = 0; u < kBwdPacks<T> - 1; ++u) {  // fewer than kBwdPacks<T> packs left
      if (i + u * stride < n_packs) store_pack_streaming(body + (i + u * stride) * kN, grad_pack<kEntropy, T>(load(i + u * stride), r));
    }
    if (tail + tid < V) dr[tail + tid] = from_acc<T>(grad_off_label<kEntropy>(to_acc(xr[tail + tid]), r));
    if (tid == owner) dr[l] = from_acc<T>(grad_at_label<kEntropy>(x_label, r));  // after its pack: program order
  }
}

// ---------------------------------------------------------------------------- launchers
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

// Whether every row of the gradient starts at the same offset from a 16-byte boundary as the
// same row of the logits (then the packs of both line up).
bool rows_aligned_alike(const fastrlhf_logprobs_bwd_params& p, int64_t elem) {
  auto off16 = [](int64_t bytes) { return ((bytes % 16) + 16) % 16; };
  const uintptr_t gap = reinterpret_cast<uintptr_t>(p.in.logits) - reinterpret_cast<uintptr_t>(p.grad_logits);
  return gap % 16 == 0 && (p.in.n_rows <= p.in.D1 || off16((p.in.s0 - p.d0) * elem) == 0) &&
         (p.in.D1 <= 1 || off16((p.in.s1 - p.d1) * elem) == 0);
}

}  // namespace
}  // namespace fastrlhf

namespace fastrlhf {
namespace {

// One block per row of the kernel that pick(T{}) names, for the logits' element type T.
template <typename P, typename Pick> cudaError_t launch_rows(const P& p, Pick pick, cudaStream_t stream) {
  if (p.in.n_rows <= 0) return cudaSuccess;
  if (p.in.V < 1 || p.in.V >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  return with_float_type(p.in.dtype, [&](auto tag) {
    pick(tag)<<<grid_for(p.in.n_rows), threads_for(p.in.V, kPack<decltype(tag)>), 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace
}  // namespace fastrlhf

extern "C" cudaError_t fastrlhf_token_logprobs_fwd(const fastrlhf_logprobs_fwd_params* params, cudaStream_t stream) {
  using namespace fastrlhf;
  const bool entropy = params->entropy != nullptr;
  return launch_rows(*params, [&](auto tag) {
    using T = decltype(tag);
    return entropy ? token_logprobs_fwd_kernel<T, true> : token_logprobs_fwd_kernel<T, false>;
  }, stream);
}

extern "C" cudaError_t fastrlhf_token_logprobs_bwd(const fastrlhf_logprobs_bwd_params* params, cudaStream_t stream) {
  using namespace fastrlhf;
  const fastrlhf_logprobs_bwd_params& p = *params;
  const bool ent = p.grad_entropy != nullptr;
  return launch_rows(p, [&](auto tag) {
    using T = decltype(tag);
    if (rows_aligned_alike(p, sizeof(T))) {
      return ent ? token_logprobs_bwd_kernel<T, true, false> : token_logprobs_bwd_kernel<T, false, false>;
    }
    return ent ? token_logprobs_bwd_kernel<T, true, true> : token_logprobs_bwd_kernel<T, false, true>;
  }, stream);
}
