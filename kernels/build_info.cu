// What the kernels were built for, and whether they run on a given device.
#include "common.cuh"

namespace {

__global__ void probe_kernel() {}

}  // namespace

#define FASTRLHF_STRINGIFY(...) #__VA_ARGS__
#define FASTRLHF_EXPAND_STRINGIFY(...) FASTRLHF_STRINGIFY(__VA_ARGS__)

extern "C" const char* fastrlhf_kernels_arch_list(void) {
#ifdef __CUDA_ARCH_LIST__
  return FASTRLHF_EXPAND_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

extern "C" int fastrlhf_kernels_cuda_version(void) { return CUDART_VERSION; }

extern "C" cudaError_t fastrlhf_kernels_check_device(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, probe_kernel);  // no image for this device: an error
  if (err != cudaSuccess) (void)cudaGetLastError();  // do not leave it for the next launch check
  const cudaError_t restore = cudaSetDevice(previous);
  return err != cudaSuccess ? err : restore;
}
