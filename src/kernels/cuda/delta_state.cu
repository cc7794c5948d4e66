// A sequence slice's transition for context parallelism (CPU reference: cpu::slice_transition in
// kernels/cpu/delta_state_scan.h): the chunked forward with v = 0, dv = dk and the identity as initial state, so the
// final state is M = A_T ... A_1. Only the identity needs a kernel of its own.
#include "kernels/cuda/delta_state.h"
#include "kernels/cuda/device_utils.cuh"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;

// m (BH, dk, dk) = I per head.
__global__ void identity_kernel(float* m, int64_t BH, int64_t dk) {
  const int64_t total = BH * dk * dk;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i % (dk * dk);
    m[i] = (e / dk == e % dk) ? 1.0f : 0.0f;
  }
}

// The pieces of the workspace, 256-byte aligned: zero q (B, S, Hk, dk), zero v and the discarded o (B, S, Hv, dk)
// bf16, the identity (B, Hv, dk, dk) fp32, then the forward's own workspace.
struct Layout {
  size_t q, v, o, identity, forward, total;
};

size_t align(size_t n) { return (n + 255) / 256 * 256; }

Layout layout(const GdrShape& s) {
  const GdrShape t{s.B, s.S, s.Hk, s.Hv, s.dk, s.dk};
  Layout l{};
  l.q = 0;
  l.v = l.q + align(sizeof(bf16) * s.B * s.S * s.Hk * s.dk);
  l.o = l.v + align(sizeof(bf16) * s.B * s.S * s.Hv * s.dk);
  l.identity = l.o + align(sizeof(bf16) * s.B * s.S * s.Hv * s.dk);
  l.forward = l.identity + align(sizeof(float) * s.B * s.Hv * s.dk * s.dk);
  l.total = l.forward + align(gated_delta_rule_workspace_bytes(t));
  return l;
}

}  // namespace

size_t gated_delta_rule_transition_workspace_bytes(const GdrShape& s) { return layout(s).total; }

void gated_delta_rule_transition(float* m, const bf16* k, const float* g, const float* beta, const GdrShape& s,
                                 void* workspace, cudaStream_t stream) {
  const Layout l = layout(s);
  char* w = static_cast<char*>(workspace);
  auto* q = reinterpret_cast<bf16*>(w + l.q);
  auto* v = reinterpret_cast<bf16*>(w + l.v);
  auto* o = reinterpret_cast<bf16*>(w + l.o);
  auto* identity = reinterpret_cast<float*>(w + l.identity);
  NEXTRON_CUDA_CHECK(cudaMemsetAsync(q, 0, sizeof(bf16) * s.B * s.S * s.Hk * s.dk, stream));
  NEXTRON_CUDA_CHECK(cudaMemsetAsync(v, 0, sizeof(bf16) * s.B * s.S * s.Hv * s.dk, stream));
  const int64_t n = s.B * s.Hv * s.dk * s.dk;
  if (n > 0) {
    identity_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(identity, s.B * s.Hv, s.dk);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  const GdrShape t{s.B, s.S, s.Hk, s.Hv, s.dk, s.dk};
  gated_delta_rule_forward(o, m, q, k, v, g, beta, identity, t, 1.0f, nullptr, w + l.forward, stream);
}

}  // namespace nextron::cuda
