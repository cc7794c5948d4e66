#include <cuda_runtime.h>

#include <sstream>

#include "core/cuda/device.h"
#include "core/cuda/check.h"

namespace nextron::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later queries start clean
    return 0;
  }
  return n;
}

std::string device_description(int index) {
  cudaDeviceProp p{};
  NEXTRON_CUDA_CHECK(cudaGetDeviceProperties(&p, index));
  std::ostringstream os;
  os << p.name << ", " << (p.totalGlobalMem >> 20) << " MiB, sm_" << p.major << p.minor;
  return os.str();
}

}  // namespace nextron::cuda
