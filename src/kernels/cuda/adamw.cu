// AdamW on flat fp32 buffers on the GPU, with the optional fused write of the bf16 GEMM shadow of the parameters
// (CPU reference: optim/adamw.cpp, torch.optim.AdamW's single-tensor arithmetic).
//
// One thread per element (grid-stride). Whether an element is decayed comes from a binary search over the few
// hundred sorted decay ranges (a per-element mask would cost a byte per parameter). The arithmetic is optim/
// adamw.cpp's, operation by operation, with explicitly rounded intrinsics (__fmul_rn, __fadd_rn, ...) so that nvcc
// cannot contract a multiply and an add into an FMA: the CPU build (x86-64 without -mfma) does not contract either,
// so both round identically and the results agree bit for bit (the tests allow a few ulp in case a CPU build
// enables FMA). The per-step scalars are formed on the host in double, exactly as adamw.cpp's step_scalars.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/loss_optim.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

// optim/adamw.cpp's StepScalars: computed in double (torch's Python floats), used as fp32 scalars.
struct StepScalars {
  float decay_mul;  // 1 - lr * wd
  float w1;         // lerp weight 1 - beta1
  bool w1_small;    // torch's lerp branch: |w| < 0.5
  float one_minus_w1;
  float beta2;
  float w2;        // 1 - beta2
  float bc2_sqrt;  // (1 - beta2^step) ** 0.5
  float eps;
  float neg_step_size;  // -(lr / (1 - beta1^step))
};

StepScalars step_scalars(const AdamWStep& h) {
  StepScalars s;
  s.decay_mul = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.w1 = static_cast<float>(1.0 - h.beta1);
  s.w1_small = std::abs(s.w1) < 0.5f;
  s.one_minus_w1 = 1.0f - s.w1;
  s.beta2 = static_cast<float>(h.beta2);
  s.w2 = static_cast<float>(1.0 - h.beta2);
  const double t = static_cast<double>(h.step);
  const double bc1 = 1.0 - std::pow(h.beta1, t), bc2 = 1.0 - std::pow(h.beta2, t);
  s.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
  s.eps = static_cast<float>(h.eps);
  s.neg_step_size = static_cast<float>(-(h.lr / bc1));
  return s;
}

// Whether element i lies in one of the sorted, disjoint ranges (n_ranges int64 pairs [begin, end)): the last
// range beginning at or before i must still contain it.
__device__ __forceinline__ bool in_ranges(const int64_t* __restrict__ ranges, int64_t n_ranges, int64_t i) {
  int64_t lo = 0, hi = n_ranges;  // find the first range with begin > i
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(ranges + 2 * mid) <= i)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo > 0 && i < __ldg(ranges + 2 * (lo - 1) + 1);
}

// grid-stride over n elements; params, exp_avg, exp_avg_sq (n) fp32 updated in place, params_bf16 (n) written
// when not nullptr. No shared memory.
__global__ void adamw_kernel(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ exp_avg,
                             float* __restrict__ exp_avg_sq, bf16* __restrict__ params_bf16, int64_t n,
                             const int64_t* __restrict__ decay_ranges, int64_t n_decay_ranges, StepScalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float param = params[i];
    if (in_ranges(decay_ranges, n_decay_ranges, i)) param = __fmul_rn(param, s.decay_mul);  // decoupled decay first
    const float grad = grads[i];
    // m = lerp(m, g, w1) in torch's two-branch form.
    float mi = exp_avg[i];
    mi = s.w1_small ? __fadd_rn(mi, __fmul_rn(s.w1, __fsub_rn(grad, mi)))
                    : __fsub_rn(grad, __fmul_rn(__fsub_rn(grad, mi), s.one_minus_w1));
    // v = v * beta2 + ((1 - beta2) * g) * g
    float vi = __fmul_rn(exp_avg_sq[i], s.beta2);
    vi = __fadd_rn(vi, __fmul_rn(__fmul_rn(s.w2, grad), grad));
    // p += ((-step_size) * m) / (sqrt(v) / sqrt(bc2) + eps)
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bc2_sqrt), s.eps);
    const float p = __fadd_rn(param, __fdiv_rn(__fmul_rn(s.neg_step_size, mi), denom));
    params[i] = p;
    exp_avg[i] = mi;
    exp_avg_sq[i] = vi;
    if (params_bf16 != nullptr) params_bf16[i] = to_bf16(p);
  }
}

}  // namespace

void adamw_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, bf16* params_bf16, int64_t n,
                const int64_t* decay_ranges, int64_t n_decay_ranges, const AdamWStep& h, cudaStream_t stream) {
  NEXTRON_CHECK(h.step >= 1, "AdamW: step is the 1-based number of this update, got ", h.step);
  NEXTRON_CHECK(n >= 0 && n_decay_ranges >= 0, "AdamW: negative size (n = ", n, ", n_decay_ranges = ", n_decay_ranges,
                ")");
  NEXTRON_CHECK(n_decay_ranges == 0 || decay_ranges != nullptr, "AdamW: null decay ranges with a count of ",
                n_decay_ranges);
  if (n == 0) return;
  NEXTRON_CHECK(params && grads && exp_avg && exp_avg_sq, "AdamW: null buffer for a non-empty update");
  const StepScalars s = step_scalars(h);
  const int64_t blocks = std::min(ceil_div(n, kThreads), kMaxBlocks);
  adamw_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params, grads, exp_avg, exp_avg_sq, params_bf16,
                                                                       n, decay_ranges, n_decay_ranges, s);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
