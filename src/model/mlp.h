// Dense SwiGLU MLP (Qwen3NextMLP): down_proj(silu(gate_proj x) * up_proj x), with [gate_proj; up_proj] packed
// into one (2I, H) parameter so a single GEMM feeds the SwiGLU. Also the shared expert of the MoE block.
#pragma once

#include "model/config.h"
#include "model/module.h"

namespace nextron {

class SwiGluMlp {
 public:
  // `prefix` selects the parameters inside `weights` ("mlp." or "mlp.shared_expert.").
  SwiGluMlp(ModuleWeights weights, int64_t hidden, int64_t intermediate);
  // x: (N, H) kept by the caller until backward; y: (N, H) overwritten.
  void forward(const float* x, float* y, int64_t N);
  // Accumulates into dx (N, H) and the parameter gradients.
  void backward(const float* dy, float* dx);

 private:
  ModuleWeights wt_;
  int64_t H_, I_, N_ = 0;
  const float* x_ = nullptr;
  Tensor gu_, h_, dh_, dgu_;
};

}  // namespace nextron
