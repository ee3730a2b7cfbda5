// Device helpers shared by every fastrlhf kernel: element types with fp32 (fp64) math,
// 16-byte vector loads and stores, warp and block reductions, 64-bit row addressing.
// No torch headers: this compiles with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "launchers.cuh"

namespace fastrlhf {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads per block at most

// ------------------------------------------------------------------------- element types
// Acc<T>: the type math happens in (fp32, fp64 for fp64 inputs). Conversions go through the
// explicit intrinsics: extensions are built with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// exp2/log in the accumulation type. fp32: the hardware exp2 without denormal handling
// (ex2.approx.ftz: one MUFU.EX2; a result below 2^-126 is 0, relative error ~2^-22); fp64:
// the accurate library functions. Callers fold scales into the argument's multiply-add.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

// 1 / x for x >= 1 of moderate size (counts): the approximate hardware reciprocal refined by
// Newton steps to the type's precision (within an ulp of 1 / x), with no slow-path call.
__device__ __forceinline__ float recip(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return fmaf(r, fmaf(-x, r, 1.0f), r);
}
__device__ __forceinline__ double recip(double x) {
  double r;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(x));
  r = fma(r, fma(-x, r, 1.0), r);
  return fma(r, fma(-x, r, 1.0), r);
}

template <typename A> __device__ __forceinline__ A neg_inf() { return -INFINITY; }
template <typename A> constexpr A kLog2e = A(1.44269504088896340736);  // log2(e)
template <typename A> constexpr A kLn2 = A(0.69314718055994530942);    // ln(2)

// ------------------------------------------------------------------- 16-byte vector access
// A pack is 16 bytes (a uint4) of kPack<T> elements. A row is read as a scalar head up to
// the first 16-byte boundary, an aligned body of packs and a scalar tail, so any row start
// and any V vectorize.
template <typename T> constexpr int kPack = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ uint4 load_pack_streaming(const void* p) {
  return __ldcs(static_cast<const uint4*>(p));  // read once: evict first
}

__device__ __forceinline__ void store_pack_streaming(void* p, const uint4& v) {
  __stcs(static_cast<uint4*>(p), v);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int k) {
  return k == 0 ? v.x : (k == 1 ? v.y : (k == 2 ? v.z : v.w));
}

// The elements of a pack in the accumulation type (bf16 and fp16: one instruction each).
template <typename T> struct Unpack;
template <> struct Unpack<float> {
  static __device__ __forceinline__ void run(const uint4& v, float (&out)[4]) {
    for (int k = 0; k < 4; ++k) out[k] = __uint_as_float(word(v, k));
  }
};
template <> struct Unpack<double> {
  static __device__ __forceinline__ void run(const uint4& v, double (&out)[2]) {
    out[0] = __hiloint2double(static_cast<int>(v.y), static_cast<int>(v.x));
    out[1] = __hiloint2double(static_cast<int>(v.w), static_cast<int>(v.z));
  }
};
template <> struct Unpack<__nv_bfloat16> {  // a bf16 is the high half of its fp32 value
  static __device__ __forceinline__ void run(const uint4& v, float (&out)[8]) {
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = __uint_as_float(word(v, k) << 16);
      out[2 * k + 1] = __uint_as_float(word(v, k) & 0xffff0000u);
    }
  }
};
template <> struct Unpack<__half> {
  static __device__ __forceinline__ void run(const uint4& v, float (&out)[8]) {
    for (int k = 0; k < 4; ++k) {
      const uint32_t w = word(v, k);
      out[2 * k] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
      out[2 * k + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
    }
  }
};

template <typename T, int N>
__device__ __forceinline__ void unpack(const uint4& v, acc_t<T> (&out)[N], int at) {
  acc_t<T> part[kPack<T>];
  Unpack<T>::run(v, part);
#pragma unroll
  for (int k = 0; k < kPack<T>; ++k) out[at + k] = part[k];
}

// Accumulation-type values rounded to the elements of a pack (bf16/fp16: two per instruction).
template <typename T> __device__ __forceinline__ uint4 to_pack(const acc_t<T> (&in)[kPack<T>]);
template <> __device__ __forceinline__ uint4 to_pack<float>(const float (&in)[4]) {
  return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
}
template <> __device__ __forceinline__ uint4 to_pack<double>(const double (&in)[2]) {
  return make_uint4(static_cast<uint32_t>(__double2loint(in[0])), static_cast<uint32_t>(__double2hiint(in[0])),
                    static_cast<uint32_t>(__double2loint(in[1])), static_cast<uint32_t>(__double2hiint(in[1])));
}
template <typename V2, typename F> __device__ __forceinline__ uint4 pack_pairs(const float (&in)[8], F round_pair) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const V2 two = round_pair(in[2 * k], in[2 * k + 1]);
    w[k] = *reinterpret_cast<const uint32_t*>(&two);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}
template <> __device__ __forceinline__ uint4 to_pack<__nv_bfloat16>(const float (&in)[8]) {
  return pack_pairs<__nv_bfloat162>(in, [](float a, float b) { return __floats2bfloat162_rn(a, b); });
}
template <> __device__ __forceinline__ uint4 to_pack<__half>(const float (&in)[8]) {
  return pack_pairs<__half2>(in, [](float a, float b) { return __floats2half2_rn(a, b); });
}

// The largest element of U packs in the accumulation type; NaN elements are ignored unless
// all are NaN (maxNum). bf16/fp16: one paired max per two elements.
template <typename T, int U> struct PacksMax {
  static __device__ __forceinline__ acc_t<T> run(const uint4 (&v)[U]) {
    acc_t<T> x[U * kPack<T>];
#pragma unroll
    for (int u = 0; u < U; ++u) unpack<T>(v[u], x, u * kPack<T>);
    acc_t<T> m = x[0];
#pragma unroll
    for (int k = 1; k < U * kPack<T>; ++k) m = fmax(m, x[k]);
    return m;
  }
};

template <typename V2> __device__ __forceinline__ V2 as_pair(uint32_t w) {
  union { uint32_t u; V2 v; } c;
  c.u = w;
  return c.v;
}

template <typename V2, int U> __device__ __forceinline__ float packs_max_pairs(const uint4 (&v)[U]) {
  V2 m = as_pair<V2>(v[0].x);
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int k = u == 0 ? 1 : 0; k < 4; ++k) m = __hmax2(m, as_pair<V2>(word(v[u], k)));
  }
  return fmaxf(__low2float(m), __high2float(m));
}

template <int U> struct PacksMax<__nv_bfloat16, U> {
  static __device__ __forceinline__ float run(const uint4 (&v)[U]) { return packs_max_pairs<__nv_bfloat162>(v); }
};
template <int U> struct PacksMax<__half, U> {
  static __device__ __forceinline__ float run(const uint4 (&v)[U]) { return packs_max_pairs<__half2>(v); }
};

template <typename T, int U> __device__ __forceinline__ acc_t<T> packs_max(const uint4 (&v)[U]) {
  return PacksMax<T, U>::run(v);
}

// Bytes [b, b + 16) of the 32 bytes a then c, for b = 4q + r in [0, 16) a multiple of
// sizeof(T): two word selections and a byte permute (only what sizeof(T) needs), no local
// memory. Realigns a row read in 16-byte packs to another 16-byte alignment.
template <typename T> __device__ __forceinline__ uint4 funnel_pack(const uint4& a, const uint4& c, int b) {
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
  uint32_t d[6], e[5];
  const bool two = (b & 8) != 0, one = (b & 4) != 0;
#pragma unroll
  for (int k = 0; k < 6; ++k) d[k] = two ? w[k + 2] : w[k];
#pragma unroll
  for (int k = 0; k < 5; ++k) e[k] = (sizeof(T) < 8 && one) ? d[k + 1] : d[k];
  if (sizeof(T) >= 4) return make_uint4(e[0], e[1], e[2], e[3]);
  const uint32_t sel = 0x3210u + 0x1111u * static_cast<uint32_t>(b & 3);
  return make_uint4(__byte_perm(e[0], e[1], sel), __byte_perm(e[1], e[2], sel), __byte_perm(e[2], e[3], sel),
                    __byte_perm(e[3], e[4], sel));
}

// Elements of p before the first 16-byte-aligned address (at most n).
template <typename T> __device__ __forceinline__ int aligned_head(const T* p, int n) {
  const int past = static_cast<int>((reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T));
  const int head = past == 0 ? 0 : kPack<T> - past;
  return head < n ? head : n;
}

// Row r of a [..., V] tensor whose leading dims merge into (D0, D1) with strides (s0, s1):
// its first element is at (r / D1) * s0 + (r % D1) * s1, in 64-bit arithmetic.
__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t D1, int64_t s0, int64_t s1) {
  return (row / D1) * s0 + (row % D1) * s1;
}

// Element i of an int32 or int64 index array (labels).
__device__ __forceinline__ int64_t load_index(const void* p, fastrlhf_dtype dtype, int64_t i) {
  return dtype == FASTRLHF_INT64 ? static_cast<const int64_t*>(p)[i]
                                 : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// ---------------------------------------------------------------------------- reductions
// A reducer R has: using T; static T identity(); static T combine(T, T) (associative).
// Combination order is fixed by the thread layout: same input, same bits.
template <typename R, typename T>
__device__ __forceinline__ T warp_reduce(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = R::combine(v, R::shuffle_xor(v, offset));
  }
  return v;
}

// Block-wide reduction; every thread gets the result. `smem` holds kMaxWarps values and may
// be reused once this returns (the trailing barrier protects it).
template <typename R, typename T>
__device__ __forceinline__ T block_reduce(T v, T* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_reduce<R>(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < n_warps ? smem[lane] : R::identity();
  v = warp_reduce<R>(v);
  __syncthreads();
  return v;
}

template <typename A> struct SumOp {
  static __device__ __forceinline__ A identity() { return A(0); }
  static __device__ __forceinline__ A combine(A a, A b) { return a + b; }
  static __device__ __forceinline__ A shuffle_xor(A v, int offset) {
    return __shfl_xor_sync(0xffffffffu, v, offset);
  }
};

template <typename A> struct MaxOp {
  static __device__ __forceinline__ A identity() {
    return std::numeric_limits<A>::has_infinity ? -std::numeric_limits<A>::infinity()
                                                : std::numeric_limits<A>::lowest();
  }
  static __device__ __forceinline__ A combine(A a, A b) { return a > b ? a : b; }
  static __device__ __forceinline__ A shuffle_xor(A v, int offset) {
    return __shfl_xor_sync(0xffffffffu, v, offset);
  }
};

// ------------------------------------------------------ runtime-typed access (small ops)
// Inputs of the small ops (log-probs, rewards, masks) may mix dtypes; a uniform switch per
// element costs far less than the memory access it guards.
template <typename A> __device__ __forceinline__ A load_as(const fastrlhf_rows& t, int64_t i) {
  switch (t.dtype) {
    case FASTRLHF_FLOAT16: return static_cast<A>(__half2float(static_cast<const __half*>(t.data)[i]));
    case FASTRLHF_BFLOAT16:
      return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(t.data)[i]));
    case FASTRLHF_FLOAT64: return static_cast<A>(static_cast<const double*>(t.data)[i]);
    default: return static_cast<A>(static_cast<const float*>(t.data)[i]);
  }
}

template <typename A>
__device__ __forceinline__ void store_as(void* p, fastrlhf_dtype dtype, int64_t i, A v) {
  switch (dtype) {
    case FASTRLHF_FLOAT16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case FASTRLHF_BFLOAT16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
    case FASTRLHF_FLOAT64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v); break;
  }
}

// Bytes of one element of `dtype`.
__host__ __device__ __forceinline__ int dtype_bytes(fastrlhf_dtype dtype) {
  switch (dtype) {
    case FASTRLHF_FLOAT16: case FASTRLHF_BFLOAT16: case FASTRLHF_INT16: return 2;
    case FASTRLHF_FLOAT64: case FASTRLHF_INT64: return 8;
    case FASTRLHF_BOOL: case FASTRLHF_UINT8: case FASTRLHF_INT8: return 1;
    default: return 4;
  }
}

__host__ __device__ __forceinline__ bool dtype_is_float(fastrlhf_dtype dtype) {
  return dtype == FASTRLHF_FLOAT32 || dtype == FASTRLHF_FLOAT16 || dtype == FASTRLHF_BFLOAT16 ||
         dtype == FASTRLHF_FLOAT64;
}

// mask[i] != 0, for any mask dtype: floating masks ignore the sign bit (-0.0 == 0).
__device__ __forceinline__ bool mask_at(const fastrlhf_rows& m, int64_t i) {
  const bool is_float = dtype_is_float(m.dtype);
  switch (dtype_bytes(m.dtype)) {
    case 1: return static_cast<const uint8_t*>(m.data)[i] != 0;
    case 2: return (static_cast<const uint16_t*>(m.data)[i] & (is_float ? 0x7fffu : 0xffffu)) != 0;
    case 4:
      return (static_cast<const uint32_t*>(m.data)[i] & (is_float ? 0x7fffffffu : 0xffffffffu)) != 0;
    default:
      return (static_cast<const uint64_t*>(m.data)[i] &
              (is_float ? 0x7fffffffffffffffull : 0xffffffffffffffffull)) != 0;
  }
}

// ------------------------------------------------- groups of 4 tokens (the small ops)
// The small ops read their token inputs 4 at a time when the layout allows: 4 values of the
// accumulation type A in one 16-byte load (fp64: two), 4 mask values in one load of 4, 16 or
// 32 bytes. i is a multiple of 4 and the data 16-byte aligned (as 4 elements).
constexpr int kGroup = 4;

template <typename A> __device__ __forceinline__ void load_group(const void* data, int64_t i, A (&out)[kGroup]) {
  constexpr int kPer = kPack<A>;
#pragma unroll
  for (int j = 0; j < kGroup / kPer; ++j) {
    A part[kPer];
    Unpack<A>::run(load_pack_streaming(static_cast<const A*>(data) + i + j * kPer), part);
#pragma unroll
    for (int k = 0; k < kPer; ++k) out[j * kPer + k] = part[k];
  }
}

template <typename A> __device__ __forceinline__ void store_group(void* data, int64_t i, const A (&v)[kGroup]) {
  constexpr int kPer = kPack<A>;
#pragma unroll
  for (int j = 0; j < kGroup / kPer; ++j) {
    A part[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) part[k] = v[j * kPer + k];
    store_pack_streaming(static_cast<A*>(data) + i + j * kPer, to_pack<A>(part));
  }
}

// Bit k set where mask element i + k != 0, for a mask of kBytes bytes (1, 4 or 8; a float
// mask's sign bit ignored).
template <int kBytes> __device__ __forceinline__ uint32_t mask_group(const fastrlhf_rows& m, int64_t i) {
  const uint32_t sign = dtype_is_float(m.dtype) ? 0x7fffffffu : 0xffffffffu;
  uint32_t bits = 0;
  if (kBytes == 1) {
    const uint32_t w = __ldcs(reinterpret_cast<const unsigned int*>(static_cast<const uint8_t*>(m.data) + i));
#pragma unroll
    for (int k = 0; k < kGroup; ++k) bits |= uint32_t(((w >> (8 * k)) & 0xffu) != 0) << k;
  } else if (kBytes == 4) {
    const uint4 w = load_pack_streaming(static_cast<const uint32_t*>(m.data) + i);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) bits |= uint32_t((word(w, k) & sign) != 0) << k;
  } else {  // the low word, and the high word without a float's sign bit
    const uint4 lo = load_pack_streaming(static_cast<const uint64_t*>(m.data) + i);
    const uint4 hi = load_pack_streaming(static_cast<const uint64_t*>(m.data) + i + 2);
    bits = uint32_t((lo.x | (lo.y & sign)) != 0) | uint32_t((lo.z | (lo.w & sign)) != 0) << 1 |
           uint32_t((hi.x | (hi.y & sign)) != 0) << 2 | uint32_t((hi.z | (hi.w & sign)) != 0) << 3;
  }
  return bits;
}

// mask_group for a mask of 1, 4 or 8 bytes known at run time (the same for every thread).
__device__ __forceinline__ uint32_t mask_group_any(const fastrlhf_rows& m, int64_t i) {
  switch (dtype_bytes(m.dtype)) {
    case 1: return mask_group<1>(m, i);
    case 4: return mask_group<4>(m, i);
    default: return mask_group<8>(m, i);
  }
}

// kG values of t from element i: one group load (kG = 4), or a scalar load in t's dtype.
template <typename A, int kG> __device__ __forceinline__ void load_tokens(const fastrlhf_rows& t, int64_t i, A (&out)[kG]) {
  if constexpr (kG == kGroup) {
    load_group(t.data, i, out);
  } else {
    out[0] = load_as<A>(t, i);
  }
}

// kG mask bits from element i (bit k: valid).
template <int kG> __device__ __forceinline__ uint32_t mask_tokens(const fastrlhf_rows& m, int64_t i) {
  if constexpr (kG == kGroup) {
    return mask_group_any(m, i);
  } else {
    return mask_at(m, i) ? 1u : 0u;
  }
}

// Stores kG values at element i of `data` (dtype `dtype`; the group store only in A).
template <typename A, int kG>
__device__ __forceinline__ void store_tokens(void* data, fastrlhf_dtype dtype, int64_t i, const A (&v)[kG]) {
  if constexpr (kG == kGroup) {
    store_group(data, i, v);
  } else {
    store_as(data, dtype, i, v[0]);
  }
}

// The grid-stride loop of an elementwise kernel over n tokens in groups of kG: f(first token,
// tokens in the group). The main loop runs over whole groups; the n % kG last tokens (kG = 4)
// go one per thread after it.
template <int kG, typename F> __device__ __forceinline__ void for_tokens(int64_t n, F&& f) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t n_groups = n / kG;
  for (int64_t g = first; g < n_groups; g += stride) f(g * kG, std::integral_constant<int, kG>{});  // the main loop
  if (kG > 1 && n_groups * kG + first < n) f(n_groups * kG + first, std::integral_constant<int, 1>{});
}

// Whether t (absent: yes) is in the accumulation dtype `acc` (a mask: any dtype of 1, 4 or 8
// bytes) and starts, as do all its rows (row_stride elements apart), on a group boundary.
inline bool groups_load(const fastrlhf_rows& t, fastrlhf_dtype acc, bool is_mask = false) {
  if (t.data == nullptr) return true;
  const int64_t bytes = dtype_bytes(t.dtype);
  if (is_mask ? bytes == 2 : t.dtype != acc) return false;
  const int64_t align = bytes * kGroup < 16 ? bytes * kGroup : 16;
  return reinterpret_cast<uintptr_t>(t.data) % align == 0 && (t.row_stride * bytes) % align == 0;
}

// q = n / d for all 32-bit n and a divisor fixed per launch (Granlund and Montgomery: one
// multiply-high, two adds, two shifts instead of a division).
struct FastDiv {
  uint32_t d, magic, s1, s2;
};

inline FastDiv make_fast_div(uint32_t d) {
  uint32_t l = 0;
  while ((uint64_t(1) << l) < d) ++l;  // ceil(log2 d)
  const uint64_t magic = ((uint64_t(1) << 32) * ((uint64_t(1) << l) - d)) / d + 1;
  return {d, static_cast<uint32_t>(magic), l < 1 ? l : 1, l > 1 ? l - 1 : 0};
}

__device__ __forceinline__ uint32_t divide(const FastDiv& f, uint32_t n) {
  const uint32_t t = __umulhi(f.magic, n);
  return (t + ((n - t) >> f.s1)) >> f.s2;
}

// x clamped to [-bound, bound]; NaN stays NaN; bound = inf changes nothing.
template <typename A> __device__ __forceinline__ A clamp_abs(A x, A bound) {
  return x < -bound ? -bound : (x > bound ? bound : x);
}

// Calls f(float{}) or f(double{}): the accumulation type of a launch (FASTRLHF_FLOAT32 or
// FASTRLHF_FLOAT64; anything else is cudaErrorInvalidValue).
template <typename F> cudaError_t with_acc(fastrlhf_dtype acc, F&& f) {
  if (acc == FASTRLHF_FLOAT64) return f(double{});
  return acc == FASTRLHF_FLOAT32 ? f(float{}) : cudaErrorInvalidValue;
}

// Grid size for a kernel whose blocks loop over `work` items: one block per item, capped at
// the grid x limit.
inline unsigned int grid_for(int64_t work) {
  const int64_t cap = 2147483647;
  return static_cast<unsigned int>(work < 1 ? 1 : (work < cap ? work : cap));
}

}  // namespace fastrlhf
