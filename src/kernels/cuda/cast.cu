// dtype casts on the GPU: fp32 -> bf16 (round to nearest even, as torch and core/dtype.h's f32_to_bf16; NaN stays
// NaN) for the bf16 weight shadow of the fp32 master buffer, and bf16 -> fp32 (exact).
//
// Vector path (both pointers 16-byte aligned): each thread of a grid-stride loop converts a group of 8 consecutive
// elements with 16-byte accesses (two fp32 float4s, one bf16 uint4); a last group of n % 8 elements goes element by
// element. Otherwise the scalar path: one thread per element, grid-stride loop with 64-bit indices. Each element is
// converted by the same instruction on both paths, so the results are bit-identical.
#include <algorithm>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/vec_io.cuh"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int kVec = vec::kBf16;  // elements per thread per iteration of the vector path

template <bool kVector, typename Out, typename In>
__global__ void cast_kernel(Out* __restrict__ out, const In* __restrict__ in, int64_t n) {
  if constexpr (kVector) {
    const int64_t groups = (n + kVec - 1) / kVec;
    for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
      const int64_t i = g * kVec;
      if (i + kVec <= n) {
        float v[kVec];
        vec::load8(v, in + i);
        vec::store8(out + i, v);
      } else {
        for (int64_t k = i; k < n; ++k) {
          if constexpr (std::is_same_v<Out, bf16>)
            out[k] = to_bf16(in[k]);
          else
            out[k] = to_f32(in[k]);
        }
      }
    }
  } else {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
      if constexpr (std::is_same_v<Out, bf16>)
        out[i] = to_bf16(in[i]);
      else
        out[i] = to_f32(in[i]);
    }
  }
}

template <typename Out, typename In>
void launch_cast(Out* out, const In* in, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (vec::aligned16(out) && vec::aligned16(in))
    cast_kernel<true><<<grid_stride_blocks(ceil_div(n, kVec)), kThreads, 0, stream>>>(out, in, n);
  else
    cast_kernel<false><<<grid_stride_blocks(n), kThreads, 0, stream>>>(out, in, n);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace

void cast_f32_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream) { launch_cast(out, in, n, stream); }

void cast_bf16_to_f32(float* out, const bf16* in, int64_t n, cudaStream_t stream) { launch_cast(out, in, n, stream); }

}  // namespace nextron::cuda
