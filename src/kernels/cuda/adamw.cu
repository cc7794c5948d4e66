// AdamW on flat fp32 buffers on the GPU, with the optional fused write of the bf16 GEMM shadow of the parameters
// (CPU reference: optim/adamw.cpp, torch.optim.AdamW's single-tensor arithmetic).
//
// Memory-bound (30 bytes per element with the shadow), so the kernel is built for the loads: each block takes tiles
// of kTile = 4 kThreads consecutive elements (grid-stride over tiles), each thread four consecutive elements as one
// 16-byte load / store per fp32 buffer and one 8-byte store of the shadow, when every buffer is so aligned (the
// parameter table aligns entries to 8 elements, and a whole-table or 4-aligned ZeRO range keeps that; otherwise the
// same tiles run with scalar accesses). Whether an element is decayed comes from the sorted decay ranges (a
// per-element mask would cost a byte per parameter): one binary search per tile (thread 0, into shared memory) finds
// the first range that ends after the tile's start, and each thread walks forward from it over its four elements
// (a tile meets few ranges: the walk is a step or two). The arithmetic is optim/
// adamw.cpp's, operation by operation, with explicitly rounded intrinsics (__fmul_rn, __fadd_rn, ...) so that nvcc
// cannot contract a multiply and an add into an FMA: the CPU build (x86-64 without -mfma) does not contract either,
// so both round identically and the results agree bit for bit (the tests allow a few ulp in case a CPU build
// enables FMA). The per-step scalars are formed on the host in double, exactly as adamw.cpp's step_scalars.
#include <algorithm>
#include <cmath>
#include <cstdint>

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

// The index of the first of the sorted, disjoint ranges (n_ranges int64 pairs [begin, end)) whose end is above i.
__device__ __forceinline__ int64_t first_range_ending_after(const int64_t* __restrict__ ranges, int64_t n_ranges,
                                                            int64_t i) {
  int64_t lo = 0, hi = n_ranges;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (__ldg(ranges + 2 * mid + 1) <= i)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// optim/adamw.cpp's update of one element, operation by operation.
__device__ __forceinline__ void adamw_element(float& param, float grad, float& mi, float& vi, bool decayed,
                                              const StepScalars& s) {
  if (decayed) param = __fmul_rn(param, s.decay_mul);  // decoupled decay first
  // m = lerp(m, g, w1) in torch's two-branch form.
  mi = s.w1_small ? __fadd_rn(mi, __fmul_rn(s.w1, __fsub_rn(grad, mi)))
                  : __fsub_rn(grad, __fmul_rn(__fsub_rn(grad, mi), s.one_minus_w1));
  // v = v * beta2 + ((1 - beta2) * g) * g
  vi = __fmul_rn(vi, s.beta2);
  vi = __fadd_rn(vi, __fmul_rn(__fmul_rn(s.w2, grad), grad));
  // p += ((-step_size) * m) / (sqrt(v) / sqrt(bc2) + eps)
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), s.bc2_sqrt), s.eps);
  param = __fadd_rn(param, __fdiv_rn(__fmul_rn(s.neg_step_size, mi), denom));
}

constexpr int kPerThread = 4;
constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kPerThread;

// Tiles of kTile elements, grid-stride; thread t owns elements [tile + 4 t, +4). kVector: 16-byte accesses (every
// fp32 pointer 16-byte aligned, the shadow 8-byte aligned or null). params, exp_avg, exp_avg_sq (n) fp32 updated in
// place, params_bf16 (n) written when not nullptr.
template <bool kVector>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ exp_avg,
                 float* __restrict__ exp_avg_sq, bf16* __restrict__ params_bf16, int64_t n,
                 const int64_t* __restrict__ decay_ranges, int64_t n_decay_ranges, StepScalars s) {
  __shared__ int64_t tile_range[1];  // the first decay range ending after the tile's first element
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kTile; tile < n;
       tile += static_cast<int64_t>(gridDim.x) * kTile) {
    __syncthreads();  // the previous tile's readers of tile_range are done
    if (threadIdx.x == 0) tile_range[0] = first_range_ending_after(decay_ranges, n_decay_ranges, tile);
    __syncthreads();
    const int64_t i0 = tile + static_cast<int64_t>(threadIdx.x) * kPerThread;
    if (i0 >= n) continue;
    const int count = static_cast<int>(n - i0 < kPerThread ? n - i0 : kPerThread);
    float p[kPerThread], g[kPerThread], m[kPerThread], v[kPerThread];
    if (kVector && count == kPerThread) {
      const float4 p4 = *reinterpret_cast<const float4*>(params + i0);
      const float4 g4 = __ldg(reinterpret_cast<const float4*>(grads + i0));
      const float4 m4 = *reinterpret_cast<const float4*>(exp_avg + i0);
      const float4 v4 = *reinterpret_cast<const float4*>(exp_avg_sq + i0);
      p[0] = p4.x, p[1] = p4.y, p[2] = p4.z, p[3] = p4.w;
      g[0] = g4.x, g[1] = g4.y, g[2] = g4.z, g[3] = g4.w;
      m[0] = m4.x, m[1] = m4.y, m[2] = m4.z, m[3] = m4.w;
      v[0] = v4.x, v[1] = v4.y, v[2] = v4.z, v[3] = v4.w;
    } else {
      for (int e = 0; e < count; ++e) {
        p[e] = params[i0 + e];
        g[e] = grads[i0 + e];
        m[e] = exp_avg[i0 + e];
        v[e] = exp_avg_sq[i0 + e];
      }
    }
    int64_t r = tile_range[0];
    for (int e = 0; e < count; ++e) {
      const int64_t i = i0 + e;
      while (r < n_decay_ranges && __ldg(decay_ranges + 2 * r + 1) <= i) ++r;
      const bool decayed = r < n_decay_ranges && __ldg(decay_ranges + 2 * r) <= i;
      adamw_element(p[e], g[e], m[e], v[e], decayed, s);
    }
    if (kVector && count == kPerThread) {
      *reinterpret_cast<float4*>(params + i0) = make_float4(p[0], p[1], p[2], p[3]);
      *reinterpret_cast<float4*>(exp_avg + i0) = make_float4(m[0], m[1], m[2], m[3]);
      *reinterpret_cast<float4*>(exp_avg_sq + i0) = make_float4(v[0], v[1], v[2], v[3]);
      if (params_bf16 != nullptr) {
        __align__(8) bf16 b[kPerThread] = {to_bf16(p[0]), to_bf16(p[1]), to_bf16(p[2]), to_bf16(p[3])};
        *reinterpret_cast<uint2*>(params_bf16 + i0) = *reinterpret_cast<const uint2*>(b);
      }
    } else {
      for (int e = 0; e < count; ++e) {
        params[i0 + e] = p[e];
        exp_avg[i0 + e] = m[e];
        exp_avg_sq[i0 + e] = v[e];
        if (params_bf16 != nullptr) params_bf16[i0 + e] = to_bf16(p[e]);
      }
    }
  }
}

bool aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0; }

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
  const int64_t blocks = std::min(ceil_div(n, kTile), kMaxBlocks);
  const bool vector = aligned(params, 16) && aligned(grads, 16) && aligned(exp_avg, 16) && aligned(exp_avg_sq, 16) &&
                      (params_bf16 == nullptr || aligned(params_bf16, 8));
  if (vector)
    adamw_kernel<true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        params, grads, exp_avg, exp_avg_sq, params_bf16, n, decay_ranges, n_decay_ranges, s);
  else
    adamw_kernel<false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        params, grads, exp_avg, exp_avg_sq, params_bf16, n, decay_ranges, n_decay_ranges, s);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
