// Device helpers shared by every fastrlhf kernel: element types with fp32 (fp64) math,
// 16-byte vector loads and stores, warp and block reductions, 64-bit row addressing.
// No torch headers: this compiles with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

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

// exp/log in the accumulation type. fp32 uses the hardware exp2 (as Triton's tl.exp does):
// relative error ~1e-7 plus |x| * 6e-8 from the argument scaling, far below bf16 rounding.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -INFINITY; }

// ------------------------------------------------------------------- 16-byte vector access
// Pack<T>: 16 bytes of T. A row is read as a scalar head up to the first 16-byte boundary,
// an aligned body of packs and a scalar tail, so any row start and any V vectorize.
template <typename T> struct alignas(16) Pack {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};

template <typename T> __device__ __forceinline__ Pack<T> load_pack_streaming(const T* p) {
  union { uint4 raw; Pack<T> pack; } u;
  u.raw = __ldcs(reinterpret_cast<const uint4*>(p));  // read once: evict first
  return u.pack;
}

template <typename T> __device__ __forceinline__ void store_pack_streaming(T* p, const Pack<T>& pack) {
  union { uint4 raw; Pack<T> pack; } u;
  u.pack = pack;
  __stcs(reinterpret_cast<uint4*>(p), u.raw);
}

// Elements of p before the first 16-byte-aligned address (at most n).
template <typename T> __device__ __forceinline__ int64_t aligned_head(const T* p, int64_t n) {
  constexpr int kN = Pack<T>::kN;
  const int past = static_cast<int>((reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T));
  const int64_t head = past == 0 ? 0 : kN - past;
  return head < n ? head : n;
}

// Whether a and b sit at the same offset from a 16-byte boundary (then packs line up).
template <typename T> __device__ __forceinline__ bool same_alignment(const T* a, const T* b) {
  return reinterpret_cast<uintptr_t>(a) % 16 == reinterpret_cast<uintptr_t>(b) % 16;
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
