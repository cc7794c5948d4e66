// Sigmoid gating on the GPU, y = x * sigmoid(gate) (CPU reference: kernels/cpu/sigmoid_gate.cpp): the attention
// output gate (G = D, one gate per channel, read in place from the q projection with row stride ld_gate) and the MoE
// shared-expert gate (G = 1, one gate per token). Gate column j scales the W = D / G x columns [j W, (j + 1) W).
//
// Forward: one thread per x element (grid-stride, 64-bit indices); each thread reads and writes its own element, so
// y may alias x. Backward: dgate needs the group sum sum_c dy x over the W columns of a gate, so the work unit is a
// gate group (n, j): one thread per group when W < 32 (the attention gate has W = 1), one warp per group with a
// warp_sum otherwise (the shared-expert gate has W = H). dx is written by the same thread / warp.
//
// Vector paths (16-byte accesses, 8 consecutive columns of a row per thread, grid-stride with 32-bit indices; the
// per-element arithmetic is the scalar path's, so results are bit-identical):
//   forward: when D % 8 == 0, x and y are 16-byte aligned and N D / 8 < 2^31; the gate is read as one 16-byte load
//     too when W = 1, ld_gate % 8 == 0 and gate is aligned, element by element otherwise;
//   backward: for W = 1 (the attention gate) when D % 8 == 0, ld_gate % 8 == 0, N D / 8 < 2^31 and dx, dgate, dy,
//     x, gate are 16-byte aligned (a null gradient counts as aligned); W > 1 keeps the scalar kernels.
#include <algorithm>
#include <climits>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/vec_io.cuh"

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

constexpr int kVec = vec::kBf16;

// Forward vector path: total = N G8 groups of 8 columns, G8 = D / 8. gate_vec: W = 1 and the gate rows aligned.
__global__ void sigmoid_gate_forward_vec_kernel(bf16* y, const bf16* x, const bf16* gate, uint32_t total, uint32_t G8,
                                                uint32_t W, int64_t ld_gate, bool gate_vec) {
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const uint32_t n = t / G8, c0 = (t - n * G8) * kVec;
    const bf16* gr = gate + int64_t(n) * ld_gate;
    float xv[kVec], gv[kVec], o[kVec];
    vec::load8(xv, x + int64_t(t) * kVec);
    if (gate_vec) {
      vec::load8(gv, gr + c0);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) gv[e] = to_f32(gr[(c0 + e) / W]);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) o[e] = xv[e] * sigmoid(gv[e]);
    vec::store8(y + int64_t(t) * kVec, o);
  }
}

// Backward vector path for W = 1 (gate column c scales x column c): as the thread kernel with groups of one column.
__global__ void sigmoid_gate_backward_w1_vec_kernel(bf16* dx, bf16* dgate, const bf16* dy, const bf16* x,
                                                    const bf16* gate, uint32_t total, uint32_t G8, int64_t ld_gate) {
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
    const uint32_t n = t / G8, c0 = (t - n * G8) * kVec;
    const int64_t ig = int64_t(n) * ld_gate + c0;
    float gv[kVec], dv[kVec], xv[kVec], ddx[kVec] = {}, dg[kVec] = {};
    vec::load8(gv, gate + ig);
    vec::load8(dv, dy + int64_t(t) * kVec);
    vec::load8(xv, x + int64_t(t) * kVec);
    if (dx) vec::load8(ddx, dx + int64_t(t) * kVec);
    if (dgate) vec::load8(dg, dgate + ig);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float sg = sigmoid(gv[e]);
      ddx[e] = ddx[e] + dv[e] * sg;
      float acc = 0.0f;
      acc += dv[e] * xv[e];
      dg[e] = dg[e] + acc * sg * (1.0f - sg);
    }
    if (dx) vec::store8(dx + int64_t(t) * kVec, ddx);
    if (dgate) vec::store8(dgate + ig, dg);
  }
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
  if (D % kVec == 0 && N * (D / kVec) <= INT32_MAX && vec::aligned16(y) && vec::aligned16(x)) {
    const int64_t W = D / G, groups = N * (D / kVec);
    const bool gate_vec = W == 1 && ld_gate % kVec == 0 && vec::aligned16(gate);
    sigmoid_gate_forward_vec_kernel<<<grid_stride_blocks(groups), kThreads, 0, stream>>>(
        y, x, gate, uint32_t(groups), uint32_t(D / kVec), uint32_t(W), ld_gate, gate_vec);
    NEXTRON_CUDA_LAUNCH_CHECK();
    return;
  }
  sigmoid_gate_forward_kernel<<<grid_stride_blocks(N * D), kThreads, 0, stream>>>(y, x, gate, N, D, D / G, ld_gate);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void sigmoid_gate_backward(bf16* dx, bf16* dgate, const bf16* dy, const bf16* x, const bf16* gate, int64_t N, int64_t D,
                           int64_t G, int64_t ld_gate, cudaStream_t stream) {
  if (!dx && !dgate) return;
  check_dims(D, G, ld_gate);
  if (N <= 0 || D <= 0) return;
  const int64_t W = D / G;
  if (W == 1 && D % kVec == 0 && ld_gate % kVec == 0 && N * (D / kVec) <= INT32_MAX && vec::aligned16(dx) &&
      vec::aligned16(dgate) && vec::aligned16(dy) && vec::aligned16(x) && vec::aligned16(gate)) {
    const int64_t groups = N * (D / kVec);
    sigmoid_gate_backward_w1_vec_kernel<<<grid_stride_blocks(groups), kThreads, 0, stream>>>(
        dx, dgate, dy, x, gate, uint32_t(groups), uint32_t(D / kVec), ld_gate);
  } else if (W < 32) {
    sigmoid_gate_backward_thread_kernel<<<grid_stride_blocks(N * G), kThreads, 0, stream>>>(dx, dgate, dy, x, gate, N,
                                                                                            D, G, W, ld_gate);
  } else {
    sigmoid_gate_backward_warp_kernel<<<unsigned(ceil_div(N * G, kGroupWarps)), dim3(32, kGroupWarps), 0, stream>>>(
        dx, dgate, dy, x, gate, N, D, G, W, ld_gate);
  }
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
