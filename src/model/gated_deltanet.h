// Gated DeltaNet linear attention (Qwen3NextGatedDeltaNet): grouped qkvz/ba projections, depthwise causal conv1d
// + SiLU over [q | k | v], L2-normalised q/k, gates beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias),
// the chunked gated delta rule, gated RMSNorm with z, out_proj.
#pragma once

#include "kernels/ops.h"
#include "model/config.h"
#include "model/module.h"

namespace nextron {

class GatedDeltaNet {
 public:
  GatedDeltaNet(const ModelConfig& config, ModuleWeights weights, Ops& ops);
  // x: (B, S, H) normalised input, kept by the caller until backward. y: (B, S, H) overwritten.
  void forward(const Tensor& x, Tensor& y, int64_t B, int64_t S);
  // Accumulates into dx (B, S, H) and the parameter gradients.
  void backward(const Tensor& dy, Tensor& dx);

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  int64_t B_ = 0, S_ = 0;
  Tensor x_;
  // Column tables (device i32) that regroup the projections: in_proj_qkvz's per-key-head groups into the conv input
  // [q | k | v] and z, in_proj_ba's groups into b and a; and the q / k / v columns of the conv output.
  Tensor mixed_cols_, z_cols_, b_cols_, a_cols_, q_cols_, k_cols_, v_cols_;
  // Saved activations.
  Tensor qkvz_, ba_, mixed_, z_, b_, a_, conv_, q_, k_, v_, qn_, kn_, beta_, g_, o_, o_rstd_, on_;
  // Backward scratch.
  Tensor don_, do_, dz_, dqn_, dkn_, dq_, dk_, dv_, dbeta_, dg_, db_, da_, dconv_, dmixed_, dqkvz_, dba_;
};

}  // namespace nextron
