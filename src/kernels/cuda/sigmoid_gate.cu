// Sigmoid gating on the GPU, y = x * sigmoid(gate) (CPU reference: kernels/cpu/sigmoid_gate.cpp): the attention
// output gate (G = D, one gate per channel, read in place from the q projection with row stride ld_gate) and the MoE
// shared-expert gate (G = 1, one gate per token). Gate column j scales the W = D / G x columns [j W, (j + 1) W).
//
// Forward: one thread per x element (grid-stride, 64-bit indices); each thread reads and writes its own element, so
// y may alias x. Backward: dgate needs the group sum sum_c dy x over the W columns of a gate, so the work unit is a
// gate group (n, j): one thread per group when W < 32 (the attention gate has W = 1), one warp per group with a
// warp_sum otherwise (the shared-expert gate has W = H). dx is written by the same thread / warp.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int kGroupWarps = 4;  // groups (warps) per block in the warp-per-group backward

// x, y: (N, D); gate: (N, ld_gate), columns [0, G) used.
__global__ void sigmoid_gate_forward_kernel(bf16* y, const bf16* x, const bf16* gate, int64_t N, int64_t D, int64_t W,
                                            int64_t ld_gate) {
  const int64_t total = N * D;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / D, c = i % D;
    const float sg = sigmoid(to_f32(gate[n * ld_gate + c / W]));
    y[i] = to_bf16(to_f32(x[i]) * sg);
  }
}

// dx[n, c] += dy sg; dgate[n, j] += (sum_c dy x) sg (1 - sg). One thread per group (n, j), W small.
__global__ void sigmoid_gate_backward_thread_kernel(bf16* dx, bf16* dgate, const bf16* dy, const bf16* x,
                                                    const bf16* gate, int64_t N, int64_t D, int64_t G, int64_t W,
                                                    int64_t ld_gate) {
  const int64_t total = N * G;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = t / G, j = t % G;
    const float sg = sigmoid(to_f32(gate[n * ld_gate + j]));
    float acc = 0.0f;
    for (int64_t c = j * W; c < (j + 1) * W; ++c) {
      const int64_t i = n * D + c;
      const float g = to_f32(dy[i]);
      if (dx) add_to(dx + i, g * sg);
      acc += g * to_f32(x[i]);
    }
    if (dgate) add_to(dgate + n * ld_gate + j, acc * sg * (1.0f - sg));
  }
}

// As above with one warp per group (n, j), W >= 32. Block (32, kGroupWarps); group blockIdx.x * kGroupWarps + y.
__global__ void sigmoid_gate_backward_warp_kernel(bf16* dx, bf16* dgate, const bf16* dy, const bf16* x,
                                                  const bf16* gate, int64_t N, int64_t D, int64_t G, int64_t W,
                                                  int64_t ld_gate) {
  const int64_t t = int64_t(blockIdx.x) * kGroupWarps + threadIdx.y;
  if (t >= N * G) return;  // whole warp leaves together
  const int64_t n = t / G, j = t % G;
  const float sg = sigmoid(to_f32(gate[n * ld_gate + j]));
  float acc = 0.0f;
  for (int64_t c = j * W + threadIdx.x; c < (j + 1) * W; c += 32) {
    const int64_t i = n * D + c;
    const float g = to_f32(dy[i]);
    if (dx) add_to(dx + i, g * sg);
    acc += g * to_f32(x[i]);
  }
  acc = warp_sum(acc);
  if (dgate && threadIdx.x == 0) add_to(dgate + n * ld_gate + j, acc * sg * (1.0f - sg));
}

void check_dims(int64_t D, int64_t G, int64_t ld_gate) {
  NEXTRON_CHECK(G > 0 && D % G == 0, "sigmoid_gate: width ", D, " must be a multiple of the gate width ", G);
  NEXTRON_CHECK(ld_gate >= G, "sigmoid_gate: gate row stride ", ld_gate, " is smaller than the gate width ", G);
}

}  // namespace

void sigmoid_gate_forward(bf16* y, const bf16* x, const bf16* gate, int64_t N, int64_t D, int64_t G, int64_t ld_gate,
                          cudaStream_t stream) {
  check_dims(D, G, ld_gate);
  if (N <= 0 || D <= 0) return;
  sigmoid_gate_forward_kernel<<<grid_stride_blocks(N * D), kThreads, 0, stream>>>(y, x, gate, N, D, D / G, ld_gate);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void sigmoid_gate_backward(bf16* dx, bf16* dgate, const bf16* dy, const bf16* x, const bf16* gate, int64_t N, int64_t D,
                           int64_t G, int64_t ld_gate, cudaStream_t stream) {
  if (!dx && !dgate) return;
  check_dims(D, G, ld_gate);
  if (N <= 0 || D <= 0) return;
  const int64_t W = D / G;
  if (W < 32) {
    sigmoid_gate_backward_thread_kernel<<<grid_stride_blocks(N * G), kThreads, 0, stream>>>(dx, dgate, dy, x, gate, N,
                                                                                            D, G, W, ld_gate);
  } else {
    sigmoid_gate_backward_warp_kernel<<<unsigned(ceil_div(N * G, kGroupWarps)), dim3(32, kGroupWarps), 0, stream>>>(
        dx, dgate, dy, x, gate, N, D, G, W, ld_gate);
  }
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
