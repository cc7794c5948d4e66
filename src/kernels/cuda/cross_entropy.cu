// Fused token-level cross-entropy on bf16 logits (N, V) (CPU reference: kernels/cpu/cross_entropy.cpp).
//
// The logits of a language model are the largest activation (V = 151936 for Qwen3-Next), so neither direction
// materialises the probabilities: the forward streams each row once, keeping a running (max, sum of exp) per
// thread in fp32 (the online softmax), and the backward streams it again, recomputing p = exp(logit - lse) and
// writing scale * (p - onehot) as bf16 straight into the gradient. Both are memory bound: one block per row,
// 16-byte vector loads (8 bf16) over the aligned body of the row, scalar loads for the unaligned head and tail.
//
// exp is __expf (ex2.approx): its relative error, a few fp32 ulp for the arguments that dominate the sum
// (logit - max near 0), is far below what the fp32 lse and the bf16 gradient can show.
#include <cfloat>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/loss_optim.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kIgnoreIndex = -100;  // transformers' ignore_index (cpu::kIgnoreIndex)
constexpr int kVec = 8;                 // bf16 per 16-byte load

// A row of V bf16 split into a scalar head [0, head), `nvec` 16-byte vectors from `head`, and a scalar tail
// [tail, V). head is the number of elements before the first 16-byte aligned one (rows of odd V, or a view that
// does not start aligned); without vectorisation (vec == false) the whole row is the head.
struct RowSplit {
  int64_t head, nvec, tail;
};

__device__ __forceinline__ RowSplit split_row(const bf16* row, int64_t V, bool vec) {
  RowSplit r;
  if (!vec) {
    r.head = V;
    r.nvec = 0;
    r.tail = V;
    return r;
  }
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);  // even: bf16 is 2-byte aligned
  const int64_t head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / 2);
  r.head = head < V ? head : V;
  r.nvec = (V - r.head) / kVec;
  r.tail = r.head + r.nvec * kVec;
  return r;
}

// 8 bf16 from a 16-byte aligned address, widened to fp32.
__device__ __forceinline__ void load8(const bf16* p, float (&f)[kVec]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec / 2; ++j) {
    const float2 t = __bfloat1622float2(h[j]);
    f[2 * j] = t.x;
    f[2 * j + 1] = t.y;
  }
}

// 8 fp32 rounded to bf16 and stored at a 16-byte aligned address.
__device__ __forceinline__ void store8(bf16* p, const float (&f)[kVec]) {
  alignas(16) __nv_bfloat162 h[kVec / 2];
#pragma unroll
  for (int j = 0; j < kVec / 2; ++j) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(h);
}

// Online softmax state of one thread: m is the running max (starts at -FLT_MAX rather than -inf so that a -inf
// logit contributes exp(-inf) = 0 instead of exp(-inf - -inf) = NaN), s = sum of exp(x - m) over the elements
// seen. A NaN logit is skipped by the max but poisons s, so the loss of that row is NaN, as on the CPU.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s *= __expf(m - x);
    m = x;
  }
  s += __expf(x - m);
}

__device__ __forceinline__ void online_add8(float& m, float& s, const float (&f)[kVec]) {
  float mx = f[0];
#pragma unroll
  for (int j = 1; j < kVec; ++j) mx = fmaxf(mx, f[j]);
  if (mx > m) {
    s *= __expf(m - mx);
    m = mx;
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) s += __expf(f[j] - m);
}

// grid (N), block kThreads. Shared: 32 floats for the block max and sum.
__global__ void cross_entropy_forward_kernel(float* row_loss, float* lse, const bf16* __restrict__ logits,
                                             const int64_t* __restrict__ targets, int64_t V, int64_t* bad_target) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const bf16* x = logits + n * V;  // (V)
  const RowSplit r = split_row(x, V, true);

  float m = -FLT_MAX, s = 0.0f;
  for (int64_t v = threadIdx.x; v < r.head; v += blockDim.x) online_add(m, s, to_f32(x[v]));
  for (int64_t k = threadIdx.x; k < r.nvec; k += blockDim.x) {
    float f[kVec];
    load8(x + r.head + k * kVec, f);
    online_add8(m, s, f);
  }
  for (int64_t v = r.tail + threadIdx.x; v < V; v += blockDim.x) online_add(m, s, to_f32(x[v]));

  // Merge the per-thread states: rescale every partial sum to the row max, then sum.
  const float row_max = block_max(m, red);
  const float row_sum = block_sum(s * __expf(m - row_max), red);
  if (threadIdx.x == 0) {
    const float l = row_max + logf(row_sum);
    lse[n] = l;
    const int64_t t = targets[n];
    float loss = 0.0f;
    if (t >= 0 && t < V) {
      loss = l - to_f32(x[t]);
    } else if (t != kIgnoreIndex && bad_target != nullptr) {
      // The largest bad row wins whatever the block order: the flag is deterministic.
      atomicMax(reinterpret_cast<long long*>(bad_target), static_cast<long long>(n + 1));
    }
    if (row_loss != nullptr) row_loss[n] = loss;
  }
}

// grid (N), block kThreads; no shared memory. dlogits may equal logits: every element is read and then written by
// the same thread (the same split of the row in both), so in-place is safe.
__global__ void cross_entropy_backward_kernel(bf16* dlogits, const bf16* logits, const float* __restrict__ lse,
                                              const int64_t* __restrict__ targets, float scale, int64_t V) {
  const int64_t n = blockIdx.x;
  const bf16* x = logits + n * V;  // (V)
  bf16* dx = dlogits + n * V;      // (V)
  const int64_t t = targets[n];
  // 16-byte vectors need the input and output rows at the same offset from a 16-byte boundary.
  const bool vec = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(dx)) & 15) == 0;
  const RowSplit r = split_row(dx, V, vec);

  if (!(t >= 0 && t < V)) {  // ignored (or bad) target: a zero gradient row, without reading the logits
    const bf16 zero = to_bf16(0.0f);
    for (int64_t v = threadIdx.x; v < r.head; v += blockDim.x) dx[v] = zero;
    const float fz[kVec] = {};
    for (int64_t k = threadIdx.x; k < r.nvec; k += blockDim.x) store8(dx + r.head + k * kVec, fz);
    for (int64_t v = r.tail + threadIdx.x; v < V; v += blockDim.x) dx[v] = zero;
    return;
  }

  const float l = lse[n];
  // d loss / d logit v = scale * (softmax_v - [v == t]).
  for (int64_t v = threadIdx.x; v < r.head; v += blockDim.x)
    dx[v] = to_bf16(scale * (__expf(to_f32(x[v]) - l) - (v == t ? 1.0f : 0.0f)));
  for (int64_t k = threadIdx.x; k < r.nvec; k += blockDim.x) {
    const int64_t v0 = r.head + k * kVec;
    float f[kVec];
    load8(x + v0, f);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f[j] = scale * (__expf(f[j] - l) - (v0 + j == t ? 1.0f : 0.0f));
    store8(dx + v0, f);
  }
  for (int64_t v = r.tail + threadIdx.x; v < V; v += blockDim.x)
    dx[v] = to_bf16(scale * (__expf(to_f32(x[v]) - l) - (v == t ? 1.0f : 0.0f)));
}

void check_shape(int64_t N, int64_t V, const char* what) {
  NEXTRON_CHECK(N >= 0 && V >= 1, what, ": need N >= 0 and V >= 1, got N = ", N, ", V = ", V);
  NEXTRON_CHECK(N <= 0x7fffffff, what, ": N = ", N, " rows exceed the grid limit 2^31 - 1 (one block per row)");
}

}  // namespace

void cross_entropy_forward(float* row_loss, float* lse, const bf16* logits, const int64_t* targets, int64_t N,
                           int64_t V, int64_t* bad_target, cudaStream_t stream) {
  check_shape(N, V, "cross_entropy_forward");
  if (N == 0) return;
  cross_entropy_forward_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(row_loss, lse, logits, targets, V,
                                                                                  bad_target);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void cross_entropy_backward(bf16* dlogits, const bf16* logits, const float* lse, const int64_t* targets, float scale,
                            int64_t N, int64_t V, cudaStream_t stream) {
  check_shape(N, V, "cross_entropy_backward");
  if (N == 0) return;
  cross_entropy_backward_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(dlogits, logits, lse, targets, scale,
                                                                                   V);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
