// The Qwen3-Next causal LM on one device: embedding, hybrid decoder layers, final norm, untied lm_head,
// next-token cross-entropy (shifted inside, as transformers does) and the MoE load-balancing loss.
// Parameters and gradients live in two flat f32 buffers laid out by the ParamTable.
#pragma once

#include <memory>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/moe.h"
#include "model/param_table.h"

namespace nextron {

struct LossValues {
  double lm_loss = 0;   // mean cross-entropy over scored tokens
  double aux_loss = 0;  // load-balancing loss (0 without MoE layers)
  double loss = 0;      // lm_loss + router_aux_loss_coef * aux_loss: what backward() differentiates
  int64_t tokens = 0;   // scored (non-ignored) tokens
};

class Model {
 public:
  explicit Model(const ModelConfig& config);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  const ParamTable& table() const { return table_; }
  Tensor& params() { return params_; }
  Tensor& grads() { return grads_; }
  void zero_grad() { grads_.zero_(); }

  // ids, labels: (B, S) row-major. Position t of a sequence is scored against labels[t + 1] (transformers'
  // shift); label -100 is ignored. labels == nullptr computes logits only.
  LossValues forward(const int64_t* ids, const int64_t* labels, int64_t B, int64_t S);
  // The same with targets already aligned: position t is scored against targets[t] (-100 ignored). Training
  // samples of S + 1 tokens use ids = tokens[0, S), targets = tokens[1, S + 1), so every position is scored.
  LossValues forward_targets(const int64_t* ids, const int64_t* targets, int64_t B, int64_t S);
  const Tensor& logits() const { return logits_; }  // (B, S, V) of the last forward
  // Mean cross-entropy of each sequence of the last forward (NaN for a sequence with no scored token).
  std::vector<double> per_sequence_loss() const;
  // Accumulates loss_scale * d(loss)/d(parameter) of the last forward into grads() (loss_scale = 1 / number of
  // micro-batches averages the gradient over gradient-accumulation steps).
  void backward(float loss_scale = 1.0f);

 private:
  ModelConfig config_;
  ParamTable table_;
  Tensor params_, grads_;
  std::vector<std::unique_ptr<DecoderLayer>> layers_;
  int64_t B_ = 0, S_ = 0;
  std::vector<int64_t> ids_, targets_;
  std::vector<Tensor> hidden_;  // layer inputs (L + 1 tensors of (N, H))
  Tensor final_h_, final_rstd_, logits_, row_loss_, lse_;
  Tensor dlogits_, dfinal_h_, dhidden_a_, dhidden_b_;
  MoeAuxStats aux_;
  LossValues loss_;

  void forward_body(const int64_t* ids, int64_t B, int64_t S);
  LossValues score();
};

}  // namespace nextron
