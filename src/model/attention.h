// Gated full attention (Qwen3NextAttention): q/k/v projections, per-head zero-centred q_norm/k_norm, partial
// RoPE, causal GQA softmax attention, sigmoid output gate, o_proj.
#pragma once

#include "model/config.h"
#include "model/module.h"

namespace nextron {

class GatedAttention {
 public:
  GatedAttention(const ModelConfig& config, ModuleWeights weights);
  // x: (B, S, H) normalised input, kept by the caller until backward. y: (B, S, H) overwritten.
  void forward(const float* x, float* y, int64_t B, int64_t S);
  // dy: (B, S, H). Accumulates into dx (B, S, H) and the parameter gradients.
  void backward(const float* dy, float* dx);

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  int64_t B_ = 0, S_ = 0;
  const float* x_ = nullptr;
  Tensor qg_, q_raw_, gate_, q_rstd_, k_raw_, k_rstd_, q_, k_, v_, o_, lse_, og_;  // saved activations
  Tensor cos_, sin_;                                                               // RoPE tables (S, rotary_dim)
  Tensor dog_, do_, dgate_, dq_, dk_, dv_, dqn_, dkn_, dq_raw_, dk_raw_, dqg_;     // backward scratch
};

}  // namespace nextron
