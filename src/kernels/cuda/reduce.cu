// Deterministic fp64 sums of fp32 buffers (the loss sum, the global gradient norm) and the in-place scale of
// gradient clipping (CPU references: kernels/cpu/cross_entropy.cpp's loss sum, optim/grad_clip.cpp).
//
// A float atomicAdd would make the sum depend on block timing, and a resumed run must reproduce the uninterrupted
// one bit for bit, so the sums use a fixed assignment: a grid of exactly kBlocks x kThreads threads (never derived
// from the device), element i of a range goes to thread i mod (kBlocks * kThreads), every thread adds its elements
// in index order in double, each block reduces its threads in a fixed tree into partials[block] (in the caller's
// scratch), and one block then reduces the kBlocks partials, again in a fixed order. Ranges are passed to the
// kernel by value in batches of kMaxRanges; the batches add into the same partials in launch order.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/loss_optim.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kBlocks = 1024;    // fixed: the element-to-thread assignment must not depend on the device
constexpr int kMaxRanges = 120;  // ranges per launch, passed by value (about 1.9 KiB of the 4 KiB parameter space)
constexpr int kScaleThreads = 256;
constexpr int64_t kScaleMaxBlocks = 8192;

// [begin, end) offsets into x, count of them used.
struct RangeBatch {
  int64_t begin[kMaxRanges];
  int64_t end[kMaxRanges];
  int count;
};

__device__ __forceinline__ double warp_sum_f64(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The double twin of device_utils' block_sum (blockDim.x a multiple of 32); every thread gets the sum.
__device__ __forceinline__ double block_sum_f64(double v, double* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum_f64(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0;
  return warp_sum_f64(v);
}

// grid (kBlocks), block kThreads. partials (kBlocks) doubles: overwritten, or added to when `accumulate` (later
// batches of ranges). Shared: 32 doubles for the block reduction.
template <bool kSquare>
__global__ void partial_sums_kernel(double* partials, const float* __restrict__ x, RangeBatch batch, bool accumulate) {
  __shared__ double red[32];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  for (int r = 0; r < batch.count; ++r) {
    const float* xr = x + batch.begin[r];
    const int64_t len = batch.end[r] - batch.begin[r];
    for (int64_t i = tid; i < len; i += stride) {
      const double v = static_cast<double>(xr[i]);
      acc += kSquare ? v * v : v;
    }
  }
  acc = block_sum_f64(acc, red);
  if (threadIdx.x == 0) partials[blockIdx.x] = accumulate ? partials[blockIdx.x] + acc : acc;
}

// grid (1), block kThreads: *out = sum of partials[0, count) in a fixed order. Shared: 32 doubles.
__global__ void final_sum_kernel(double* out, const double* __restrict__ partials, int count) {
  __shared__ double red[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = block_sum_f64(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

__global__ void scale_kernel(float* x, int64_t n, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] *= scale;
}

// The shared driver of both sums: the non-empty ranges in batches, then the final reduction.
template <bool kSquare>
void sum_ranges(double* out, const float* x, const std::vector<std::pair<int64_t, int64_t>>& ranges, void* scratch,
                cudaStream_t stream, const char* what) {
  std::vector<std::pair<int64_t, int64_t>> todo;
  for (const auto& [b, e] : ranges) {
    NEXTRON_CHECK(b >= 0 && b <= e, what, ": invalid range [", b, ", ", e, ")");
    if (e > b) todo.emplace_back(b, e);
  }
  if (todo.empty()) {  // the empty sum: no launch
    NEXTRON_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    return;
  }
  NEXTRON_CHECK(x != nullptr && scratch != nullptr, what, ": null input or scratch for a non-empty sum");
  double* partials = static_cast<double*>(scratch);  // (kBlocks)
  for (size_t first = 0; first < todo.size(); first += kMaxRanges) {
    RangeBatch batch;
    std::memset(&batch, 0, sizeof(batch));
    batch.count = static_cast<int>(std::min<size_t>(kMaxRanges, todo.size() - first));
    for (int r = 0; r < batch.count; ++r) {
      batch.begin[r] = todo[first + r].first;
      batch.end[r] = todo[first + r].second;
    }
    partial_sums_kernel<kSquare><<<kBlocks, kThreads, 0, stream>>>(partials, x, batch, first > 0);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  final_sum_kernel<<<1, kThreads, 0, stream>>>(out, partials, kBlocks);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace

size_t sum_scratch_bytes(int64_t /*n*/) { return kBlocks * sizeof(double); }

void sum_f64(double* out, const float* x, int64_t n, void* scratch, cudaStream_t stream) {
  NEXTRON_CHECK(n >= 0, "sum_f64: n must be >= 0, got ", n);
  sum_ranges<false>(out, x, {{0, n}}, scratch, stream, "sum_f64");
}

void sum_squares_f64(double* out, const float* x, const std::vector<std::pair<int64_t, int64_t>>& ranges, void* scratch,
                     cudaStream_t stream) {
  sum_ranges<true>(out, x, ranges, scratch, stream, "sum_squares_f64");
}

void scale_inplace(float* x, int64_t n, float scale, cudaStream_t stream) {
  NEXTRON_CHECK(n >= 0, "scale_inplace: n must be >= 0, got ", n);
  if (n == 0) return;
  const int64_t blocks = std::min(ceil_div(n, kScaleThreads), kScaleMaxBlocks);
  scale_kernel<<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(x, n, scale);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
