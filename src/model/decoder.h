// One hybrid decoder layer: x = x + mixer(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x)),
// with the mixer (gated attention or Gated DeltaNet) and the MLP (dense or sparse MoE) chosen by the config.
#pragma once

#include <memory>

#include "model/attention.h"
#include "model/config.h"
#include "model/gated_deltanet.h"
#include "model/mlp.h"
#include "model/moe.h"

namespace nextron {

class DecoderLayer {
 public:
  DecoderLayer(const ModelConfig& config, int64_t layer, const ParamTable& table, const Tensor& params,
               const Tensor& grads);
  // x_in: (B, S, H) kept by the caller until backward; x_out: (B, S, H) overwritten.
  void forward(const float* x_in, float* x_out, int64_t B, int64_t S, MoeAuxStats& aux);
  // Accumulates the gradient w.r.t. x_in into dx_in.
  void backward(const float* dx_out, float* dx_in, const MoeAuxStats& aux, float d_aux);

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  std::unique_ptr<GatedAttention> attention_;
  std::unique_ptr<GatedDeltaNet> deltanet_;
  std::unique_ptr<SwiGluMlp> dense_;
  std::unique_ptr<SparseMoe> moe_;
  int64_t N_ = 0;
  const float* x_in_ = nullptr;
  Tensor h1_, rstd1_, mix_, x_mid_, h2_, rstd2_, mlp_;
  Tensor dh1_, dx_mid_, dh2_;
};

}  // namespace nextron
