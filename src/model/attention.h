// Gated full attention (Qwen3NextAttention): q/k/v projections, per-head zero-centred q_norm/k_norm, partial
// RoPE, causal GQA softmax attention, sigmoid output gate, o_proj.
#pragma once

#include "kernels/ops.h"
#include "model/config.h"
#include "model/module.h"

namespace nextron {

class GatedAttention {
 public:
  GatedAttention(const ModelConfig& config, ModuleWeights weights, Ops& ops);
  // x: (B, S, H) normalised input, kept by the caller until backward. y: (B, S, H) overwritten.
  void forward(const Tensor& x, Tensor& y, int64_t B, int64_t S);
  // dy: (B, S, H). Accumulates into dx (B, S, H) and the parameter gradients.
  void backward(const Tensor& dy, Tensor& dx);

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  int64_t B_ = 0, S_ = 0;
  Tensor x_;
  Tensor q_cols_, gate_cols_;                                               // column tables of q_proj's output
  Tensor qg_, q_raw_, q_rstd_, k_raw_, k_rstd_, q_, k_, v_, o_, lse_, og_;  // saved activations
  Tensor cos_, sin_;                                                        // RoPE tables (S, rotary_dim)
  Tensor dog_, do_, dq_, dk_, dv_, dqn_, dkn_, dq_raw_, dk_raw_, dqg_;      // backward scratch
};

}  // namespace nextron
