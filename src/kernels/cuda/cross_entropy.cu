// Fused token-level cross-entropy on bf16 logits (CPU reference: kernels/cpu/cross_entropy.cpp), over the whole
// vocabulary or, under tensor parallelism, one rank's slice of the logit columns (vocab-parallel, as Megatron's).
//
// The logits of a language model are the largest activation (V = 151936 for Qwen3-Next), so neither direction
// materialises the probabilities: the forward streams each row once, keeping a running (max, sum of exp) per
// thread in fp32 (the online softmax), and the backward streams it again, recomputing p = exp(logit - lse) and
// writing scale * (p - onehot) as bf16 straight into the gradient. Both are memory bound: one block per row,
// 16-byte vector loads (8 bf16) over the aligned body of the row, scalar loads for the unaligned head and tail.
//
// Vocab-parallel: a rank holds columns [vocab_begin, vocab_begin + V_local) of every row. cross_entropy_partial
// reduces its columns to three numbers per row (max, sum of exp relative to it, the target's logit when held) with
// the same online-softmax pass; after the caller all-gathers them, cross_entropy_combine (one thread per row, in
// double like the CPU) merges the P ranks' maxima and rescaled sums into lse and the row loss; the backward then
// needs only the lse and the local columns. The whole vocabulary is the shard begin 0, V_local = V_full.
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

// The max of a row of V bf16 and the sum of exp(x - max) over it, reduced over the whole block (every thread gets
// both). red: 32 floats of shared memory; synchronises the block.
__device__ __forceinline__ void row_max_sumexp(const bf16* x, int64_t V, float* red, float& row_max, float& row_sum) {
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
  row_max = block_max(m, red);
  row_sum = block_sum(s * __expf(m - row_max), red);
}

// grid (N), block kThreads. Shared: 32 floats for the block max and sum.
__global__ void cross_entropy_forward_kernel(float* row_loss, float* lse, const bf16* __restrict__ logits,
                                             const int64_t* __restrict__ targets, int64_t V, int64_t* bad_target) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const bf16* x = logits + n * V;  // (V)
  float row_max, row_sum;
  row_max_sumexp(x, V, red, row_max, row_sum);
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

// grid (N), block kThreads. Shared: 32 floats. stats: (3, N); logits: (N, V_local), ids [begin, begin + V_local).
// Targets are not checked here: a bad or ignored target is never held (begin >= 0), and combine reports bad ones.
__global__ void cross_entropy_partial_kernel(float* stats, const bf16* __restrict__ logits,
                                             const int64_t* __restrict__ targets, int64_t N, int64_t V_local,
                                             int64_t begin) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const bf16* x = logits + n * V_local;  // (V_local)
  float row_max, row_sum;
  row_max_sumexp(x, V_local, red, row_max, row_sum);
  if (threadIdx.x == 0) {
    const int64_t t = targets[n];
    stats[n] = row_max;
    stats[N + n] = row_sum;
    // Compared before subtracting, so that no target (however negative) overflows.
    stats[2 * N + n] = t >= begin && t - begin < V_local ? to_f32(x[t - begin]) : 0.0f;
  }
}

// One thread per row (grid-stride). stats: (P, 3, N) of the P ranks in rank order; double math as the CPU reference
// (P terms per row: the cost is the loads, not the arithmetic).
__global__ void cross_entropy_combine_kernel(float* row_loss, float* lse, const float* __restrict__ stats, int64_t P,
                                             const int64_t* __restrict__ targets, int64_t N, int64_t V_full,
                                             int64_t* bad_target) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    double m = stats[n];
    for (int64_t r = 1; r < P; ++r) {
      const double mr = stats[r * 3 * N + n];
      m = m < mr ? mr : m;  // std::max's order, as the CPU
    }
    double s = 0.0, target_logit = 0.0;
    for (int64_t r = 0; r < P; ++r) {
      const float* st = stats + r * 3 * N;
      s += double(st[N + n]) * exp(double(st[n]) - m);
      target_logit += st[2 * N + n];  // nonzero on the one rank that holds the target
    }
    const double l = m + log(s);
    lse[n] = float(l);
    const int64_t t = targets[n];
    double loss = 0.0;
    if (t >= 0 && t < V_full) {
      loss = l - target_logit;
    } else if (t != kIgnoreIndex && bad_target != nullptr) {
      // The largest bad row wins whatever the thread order: the flag is deterministic.
      atomicMax(reinterpret_cast<long long*>(bad_target), static_cast<long long>(n + 1));
    }
    if (row_loss != nullptr) row_loss[n] = float(loss);
  }
}

// grid (N), block kThreads; no shared memory. logits, dlogits: (N, V) of the columns [begin, begin + V) of a
// vocabulary of V_full. dlogits may equal logits: every element is read and then written by the same thread (the
// same split of the row in both), so in-place is safe.
__global__ void cross_entropy_backward_kernel(bf16* dlogits, const bf16* logits, const float* __restrict__ lse,
                                              const int64_t* __restrict__ targets, float scale, int64_t V,
                                              int64_t begin, int64_t V_full) {
  const int64_t n = blockIdx.x;
  const bf16* x = logits + n * V;  // (V)
  bf16* dx = dlogits + n * V;      // (V)
  const int64_t target = targets[n];
  // 16-byte vectors need the input and output rows at the same offset from a 16-byte boundary.
  const bool vec = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(dx)) & 15) == 0;
  const RowSplit r = split_row(dx, V, vec);

  if (!(target >= 0 && target < V_full)) {  // ignored (or bad) target: a zero gradient row, without reading logits
    const bf16 zero = to_bf16(0.0f);
    for (int64_t v = threadIdx.x; v < r.head; v += blockDim.x) dx[v] = zero;
    const float fz[kVec] = {};
    for (int64_t k = threadIdx.x; k < r.nvec; k += blockDim.x) store8(dx + r.head + k * kVec, fz);
    for (int64_t v = r.tail + threadIdx.x; v < V; v += blockDim.x) dx[v] = zero;
    return;
  }

  // The target's local column: outside [0, V) when another rank holds it, so that no column gets the -1.
  const int64_t t = target - begin;
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

void cross_entropy_partial(float* stats, const bf16* logits, const int64_t* targets, int64_t N, int64_t V_local,
                           int64_t vocab_begin, cudaStream_t stream) {
  check_shape(N, V_local, "cross_entropy_partial");
  NEXTRON_CHECK(vocab_begin >= 0, "cross_entropy_partial: vocab_begin = ", vocab_begin, " is negative");
  if (N == 0) return;
  cross_entropy_partial_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(stats, logits, targets, N, V_local,
                                                                                  vocab_begin);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void cross_entropy_combine(float* row_loss, float* lse, const float* stats, int64_t P, const int64_t* targets,
                           int64_t N, int64_t V_full, int64_t* bad_target, cudaStream_t stream) {
  NEXTRON_CHECK(N >= 0 && P >= 1 && V_full >= 1,
                "cross_entropy_combine: need N >= 0, P >= 1 and V_full >= 1, got N = ", N, ", P = ", P,
                ", V_full = ", V_full);
  if (N == 0) return;
  cross_entropy_combine_kernel<<<grid_stride_blocks(N), kElementwiseThreads, 0, stream>>>(
      row_loss, lse, stats, P, targets, N, V_full, bad_target);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void cross_entropy_backward(bf16* dlogits, const bf16* logits, const float* lse, const int64_t* targets, float scale,
                            int64_t N, int64_t V_local, int64_t vocab_begin, int64_t V_full, cudaStream_t stream) {
  check_shape(N, V_local, "cross_entropy_backward");
  NEXTRON_CHECK(vocab_begin >= 0 && vocab_begin + V_local <= V_full, "cross_entropy_backward: columns [", vocab_begin,
                ", ", vocab_begin + V_local, ") are not inside the vocabulary [0, ", V_full, ")");
  if (N == 0) return;
  cross_entropy_backward_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream>>>(dlogits, logits, lse, targets, scale,
                                                                                   V_local, vocab_begin, V_full);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
