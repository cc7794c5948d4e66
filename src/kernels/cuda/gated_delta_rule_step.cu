// One decoding step of the gated delta rule (CPU reference: cpu::gated_delta_rule_recurrent_forward with S = 1).
// Per value head h (key head h / (Hv / Hk)), with the cached state St (dk x dv, fp32):
//   a = exp(g);  p = a St^T k;  u = beta (v - p);  St' = a St + k u^T;  o = scale St'^T q
// Column j of the output needs only column j of the state, and
//   o_j = scale (a sum_i q_i St_ij + u_j sum_i q_i k_i),
// so one thread per column reads its column once (p and q.St together), then writes a St_ij + k_i u_j back: two
// passes over the state, which is the whole of the step's HBM traffic (the tokens are dk + dv numbers).
// One block per (sequence, value head); q and k are staged in shared memory as fp32. Adjacent threads own adjacent
// columns, so every pass over a row of the state is one coalesced access.
#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/gated_delta_rule.h"

namespace nextron::cuda {

namespace {

constexpr int kStepThreads = 128;
constexpr int kMaxHeadDim = 256;

// q, k: (B, Hk, dk) bf16; v, o: (B, Hv, dv) bf16; g, beta: (B, Hv) fp32; state: (B, Hv, dk, dv) fp32 in place.
__global__ void gated_delta_rule_step_kernel(bf16* o, float* state, const bf16* q, const bf16* k, const bf16* v,
                                             const float* g, const float* beta, int Hk, int Hv, int dk, int dv,
                                             float scale) {
  __shared__ float sq[kMaxHeadDim];
  __shared__ float sk[kMaxHeadDim];
  const int bh = blockIdx.x, b = bh / Hv, h = bh % Hv, kh = h / (Hv / Hk);
  const bf16* qh = q + (int64_t(b) * Hk + kh) * dk;
  const bf16* kk = k + (int64_t(b) * Hk + kh) * dk;
  for (int i = threadIdx.x; i < dk; i += blockDim.x) {
    sq[i] = to_f32(qh[i]);
    sk[i] = to_f32(kk[i]);
  }
  __syncthreads();
  float qk = 0.0f;  // every thread sums the same dk products in the same order: identical values
  for (int i = 0; i < dk; ++i) qk += sq[i] * sk[i];
  const float a = expf(g[bh]), bt = beta[bh];
  float* St = state + int64_t(bh) * dk * dv;
  const bf16* vh = v + int64_t(bh) * dv;
  bf16* oh = o + int64_t(bh) * dv;
  for (int j = threadIdx.x; j < dv; j += blockDim.x) {
    float p = 0.0f, qs = 0.0f;
    for (int i = 0; i < dk; ++i) {
      const float s = St[int64_t(i) * dv + j];
      p += sk[i] * s;
      qs += sq[i] * s;
    }
    const float u = bt * (to_f32(vh[j]) - a * p);
    for (int i = 0; i < dk; ++i) {
      float* s = St + int64_t(i) * dv + j;
      *s = a * *s + sk[i] * u;
    }
    oh[j] = to_bf16(scale * (a * qs + u * qk));
  }
}

}  // namespace

void gated_delta_rule_step(bf16* o, float* state, const bf16* q, const bf16* k, const bf16* v, const float* g,
                           const float* beta, int64_t B, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, float scale,
                           cudaStream_t stream) {
  NEXTRON_CHECK(dk >= 1 && dk <= kMaxHeadDim && dv >= 1, "gated_delta_rule_step: head dims dk ", dk, ", dv ", dv,
                " are outside [1, ", kMaxHeadDim, "]");
  NEXTRON_CHECK(Hk >= 1 && Hv % Hk == 0, "gated_delta_rule_step: Hv ", Hv, " is not a multiple of Hk ", Hk);
  if (B * Hv == 0) return;
  gated_delta_rule_step_kernel<<<unsigned(B * Hv), kStepThreads, 0, stream>>>(o, state, q, k, v, g, beta, int(Hk),
                                                                              int(Hv), int(dk), int(dv), scale);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
