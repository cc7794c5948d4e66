// NEXTRON_CUDA_CHECK: turn a failed CUDA runtime call into a nextron::Error naming the call and the error.
#pragma once

#include <cuda_runtime.h>

#include "core/error.h"

#define NEXTRON_CUDA_CHECK(call)                                                                         \
  do {                                                                                                   \
    cudaError_t nextron_err_ = (call);                                                                   \
    if (nextron_err_ != cudaSuccess)                                                                     \
      throw ::nextron::Error(::nextron::detail::concat("CUDA error in ", #call, ": ",                    \
                                                       cudaGetErrorString(nextron_err_), " at ", __FILE__, \
                                                       ":", __LINE__));                                  \
  } while (0)
