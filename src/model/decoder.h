// One hybrid decoder layer: x = x + mixer(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x)),
// with the mixer (gated attention or Gated DeltaNet) and the MLP (dense or sparse MoE) chosen by the config.
// Under tensor parallelism the mixer and the MLP are the TP regions (config is the rank's local config); the norms
// and the residual stream hold this rank's rows outside them (all rows, or a sequence shard with SP).
#pragma once

#include <memory>

#include "model/attention.h"
#include "model/config.h"
#include "model/gated_deltanet.h"
#include "model/mlp.h"
#include "model/moe.h"
#include "parallel/tensor_parallel.h"

namespace nextron {

class DecoderLayer {
 public:
  DecoderLayer(const ModelConfig& config, int64_t layer, const ParamTable& table, const FlatBuffers& flat, Ops& ops,
               const TensorParallel& tp = {});
  // x_in: (local rows of B*S, H) kept by the caller until backward; x_out: the same shape, overwritten.
  void forward(const Tensor& x_in, Tensor& x_out, int64_t B, int64_t S, MoeAuxStats& aux);
  // Accumulates the gradient w.r.t. x_in into dx_in.
  void backward(const Tensor& dx_out, Tensor& dx_in, const MoeAuxStats& aux, float d_aux);
  // The sparse MoE block of this layer, nullptr where the MLP is dense.
  SparseMoe* moe() { return moe_.get(); }

 private:
  // The gradient of a region's input (N, H; partial over TP ranks) as local rows (see TensorParallel).
  const Tensor& region_grad_to_local(Tensor& d_region, Tensor& local, int64_t N);

  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  TensorParallel tp_;
  std::unique_ptr<GatedAttention> attention_;
  std::unique_ptr<GatedDeltaNet> deltanet_;
  std::unique_ptr<SwiGluMlp> dense_;
  std::unique_ptr<SparseMoe> moe_;
  int64_t B_ = 0, S_ = 0;
  Tensor x_in_;
  Tensor h1_region_;  // the mixer's input (N, H): h1_ itself or its all-gather
  Tensor h2_region_;
  Tensor h1_, rstd1_, h1_full_, mix_region_, mix_, x_mid_, h2_, rstd2_, h2_full_, mlp_region_, mlp_;
  Tensor dh1_, dh1_local_, dx_mid_, dh2_, dh2_replicated_, dh2_local_, dregion_full_, dscratch_;
};

}  // namespace nextron
