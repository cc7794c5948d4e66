// Dense SwiGLU MLP (Qwen3NextMLP): down_proj(silu(gate_proj x) * up_proj x), with [gate_proj; up_proj] packed
// into one (2I, H) parameter so a single GEMM feeds the SwiGLU. Also the shared expert of the MoE block.
#pragma once

#include "kernels/ops.h"
#include "model/module.h"

namespace nextron {

class SwiGluMlp {
 public:
  // `weights` selects the parameters ("mlp." or "mlp.shared_expert.").
  SwiGluMlp(ModuleWeights weights, int64_t hidden, int64_t intermediate, Ops& ops);
  // x: (N, H) kept by the caller until backward; y: (N, H) overwritten.
  void forward(const Tensor& x, Tensor& y);
  // Accumulates into dx (N, H) and the parameter gradients.
  void backward(const Tensor& dy, Tensor& dx);

 private:
  ModuleWeights wt_;
  int64_t H_, I_;
  Ops& ops_;
  Tensor x_, gu_, h_, dh_, dgu_;
};

}  // namespace nextron
