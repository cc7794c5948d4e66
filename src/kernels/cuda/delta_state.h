// Context parallelism's slice transition on the GPU (CPU reference: cpu::slice_transition,
// kernels/cpu/delta_state_scan.h). k: (B, S, Hk, dk) bf16 (L2-normalised); g, beta: (B, S, Hv) fp32;
// m: (B, Hv, dk, dk) fp32, overwritten. Head dims as the gated delta rule's (dk <= 256).
#pragma once

#include "kernels/cuda/gated_delta_rule.h"

namespace nextron::cuda {

size_t gated_delta_rule_transition_workspace_bytes(const GdrShape& s);
void gated_delta_rule_transition(float* m, const bf16* k, const float* g, const float* beta, const GdrShape& s,
                                 void* workspace, cudaStream_t stream);

}  // namespace nextron::cuda
