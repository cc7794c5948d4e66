// Gated DeltaNet linear attention (Qwen3NextGatedDeltaNet): grouped qkvz/ba projections, depthwise causal conv1d
// + SiLU over [q | k | v], L2-normalised q/k, gates beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias),
// the chunked gated delta rule, gated RMSNorm with z, out_proj.
#pragma once

#include "model/config.h"
#include "model/module.h"

namespace nextron {

class GatedDeltaNet {
 public:
  GatedDeltaNet(const ModelConfig& config, ModuleWeights weights);
  // x: (B, S, H) normalised input, kept by the caller until backward. y: (B, S, H) overwritten.
  void forward(const float* x, float* y, int64_t B, int64_t S);
  // Accumulates into dx (B, S, H) and the parameter gradients.
  void backward(const float* dy, float* dx);

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  int64_t B_ = 0, S_ = 0;
  const float* x_ = nullptr;
  // Saved activations.
  Tensor qkvz_, ba_, mixed_, z_, b_, a_, conv_, q_, k_, v_, qn_, kn_, beta_, g_, o_, o_rstd_, on_;
  // Backward scratch.
  Tensor don_, do_, dz_, dqn_, dkn_, dq_, dk_, dv_, dbeta_, dg_, db_, da_, dconv_, dmixed_, dqkvz_, dba_;
};

}  // namespace nextron
