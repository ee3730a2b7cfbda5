// k3 = exp(-x) - 1 + x and its derivative 1 - exp(-x), each to a few ulps relative for every
// log-ratio x, in float and double: the forms and ranges of fastrlhf/reference/kl.py
// (k3_parts), which fastrlhf/triton/kl.py follows too.
//
// Written directly, k3 cancels to nothing near x = 0 (exp(-x) - 1 + x in fp32 is off by 1e-5
// relative at x = -0.11). Where -2 < x < 1 it is the Taylor series of e^y - 1 - y (y = -x) to
// y^23 / 23! by Horner (truncation under 1e-17 of the value); for x >= 1, exp(-x) + (x - 1)
// (x - 1 exact, both terms positive); for x <= -2, expm1(-x) + x (a cancellation of at most
// 1.5x). The derivative is -expm1(-x) everywhere.
//
// Plain C++ besides the function qualifiers: tests/test_cuda_kl_math.py compiles this header
// for the host with g++ and checks it against fp64 on a machine without a GPU.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FASTRLHF_HD __host__ __device__ __forceinline__
#else
#define FASTRLHF_HD inline
#endif

namespace fastrlhf {

template <typename A> FASTRLHF_HD A k3_value(A x) {
  using std::exp;
  using std::expm1;
  const bool near = x > A(-2) && x < A(1);
  const A y = near ? -x : A(0);  // the series only where it is taken
  A p = A(3.868170170630684e-23);
  p = p * y + A(8.896791392450574e-22);
  p = p * y + A(1.9572941063391263e-20);
  p = p * y + A(4.110317623312165e-19);
  p = p * y + A(8.22063524662433e-18);
  p = p * y + A(1.5619206968586225e-16);
  p = p * y + A(2.8114572543455206e-15);
  p = p * y + A(4.779477332387385e-14);
  p = p * y + A(7.647163731819816e-13);
  p = p * y + A(1.1470745597729725e-11);
  p = p * y + A(1.6059043836821613e-10);
  p = p * y + A(2.08767569878681e-09);
  p = p * y + A(2.505210838544172e-08);
  p = p * y + A(2.755731922398589e-07);
  p = p * y + A(2.7557319223985893e-06);
  p = p * y + A(2.48015873015873e-05);
  p = p * y + A(0.0001984126984126984);
  p = p * y + A(0.001388888888888889);
  p = p * y + A(0.008333333333333333);
  p = p * y + A(0.041666666666666664);
  p = p * y + A(0.16666666666666666);
  p = p * y + A(0.5);
  if (near) return y * y * p;
  return x >= A(1) ? exp(-x) + (x - A(1)) : expm1(-x) + x;
}

template <typename A> FASTRLHF_HD A k3_slope(A x) {
  using std::expm1;
  return -expm1(-x);
}

}  // namespace fastrlhf
