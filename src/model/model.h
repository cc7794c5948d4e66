// The Qwen3-Next causal LM on one device: embedding, hybrid decoder layers, final norm, untied lm_head,
// next-token cross-entropy (shifted inside, as transformers does) and the MoE load-balancing loss.
// Parameters and gradients live in two flat f32 buffers laid out by the ParamTable.
//
// Parallel runs (src/parallel) give the model its communicators through ModelComms: under tensor parallelism the
// model is one TP rank's slice (table() and the flat buffers are the local shard, see parallel/tp_shard.h), and
// under data parallelism the loss normaliser (scored tokens) and the MoE load-balancing statistics are summed over
// the data-parallel group, so loss and gradients equal those of one process running the whole global micro-batch.
#pragma once

#include <memory>
#include <vector>

#include "core/tensor.h"
#include "kernels/ops.h"
#include "kernels/vocab_shard.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/moe.h"
#include "model/param_table.h"
#include "parallel/communicator.h"
#include "parallel/tensor_parallel.h"

namespace nextron {

struct LossValues {
  double lm_loss = 0;   // mean cross-entropy over scored tokens
  double aux_loss = 0;  // load-balancing loss (0 without MoE layers)
  double loss = 0;      // lm_loss + router_aux_loss_coef * aux_loss: what backward() differentiates
  int64_t tokens = 0;   // scored (non-ignored) tokens
};

struct ModelComms {
  TensorParallel tp;                      // the tensor-parallel group (identity by default)
  Communicator* data_parallel = nullptr;  // the data-parallel group, nullptr for one replica
};

class Model {
 public:
  // ops: the backend the model runs on (nullptr: the CPU backend). Its parameters, gradients and activations live
  // on ops->device().
  explicit Model(const ModelConfig& config, const ModelComms& comms = {}, std::shared_ptr<Ops> ops = nullptr);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }              // the whole model's config
  const ModelConfig& local_config() const { return local_config_; }  // this TP rank's slice
  const ParamTable& table() const { return table_; }                 // laid out for local_config()
  Ops& ops() { return *ops_; }
  // Flat fp32 buffers on the backend's device, laid out by table().
  Tensor& params() { return flat_.params; }
  Tensor& params_act() { return flat_.params_act; }
  Tensor& grads() { return flat_.grads; }
  void zero_grad() { flat_.grads.zero_(); }
  // After params() changed (optimizer step, checkpoint load): refresh the activation-dtype copy the GEMMs read
  // (the CUDA backend's bf16 shadow; nothing to do on the CPU, where it is params() itself).
  void params_changed();

  // ids, labels: (B, S) row-major. Position t of a sequence is scored against labels[t + 1] (transformers'
  // shift); label -100 is ignored. labels == nullptr computes logits only.
  LossValues forward(const int64_t* ids, const int64_t* labels, int64_t B, int64_t S);
  // The same with targets already aligned: position t is scored against targets[t] (-100 ignored). Training
  // samples of S + 1 tokens use ids = tokens[0, S), targets = tokens[1, S + 1), so every position is scored.
  LossValues forward_targets(const int64_t* ids, const int64_t* targets, int64_t B, int64_t S);
  // (B, S, V / TP) of the last forward, this rank's vocab columns, as f32 on the host (copied from the device once
  // per call on CUDA).
  Tensor logits() const;
  // Mean cross-entropy of each sequence of the last forward (NaN for a sequence with no scored token).
  std::vector<double> per_sequence_loss() const;
  // Accumulates loss_scale * d(loss)/d(parameter) of the last forward into grads() (loss_scale = 1 / number of
  // micro-batches averages the gradient over gradient-accumulation steps).
  void backward(float loss_scale = 1.0f);
  // Routing replay for every MoE layer (nullptr: off). The replay outlives the forwards that use it; layer i of
  // this model is entry i of the replay.
  void set_routing_replay(RoutingReplay* replay);

 private:
  ModelConfig config_, local_config_;
  ModelComms comms_;
  std::shared_ptr<Ops> ops_;
  ParamTable table_;
  FlatBuffers flat_;
  std::vector<std::unique_ptr<DecoderLayer>> layers_;
  int64_t B_ = 0, S_ = 0;
  std::vector<int64_t> ids_, targets_;  // host copies
  Tensor ids_dev_, targets_dev_;        // (N) i64 on the backend's device
  std::vector<Tensor> hidden_;          // layer inputs (L + 1 tensors of (N, H))
  Tensor embed_region_, final_h_, final_rstd_, final_h_full_, logits_, row_loss_, lse_;
  Tensor ce_stats_, ce_stats_all_;  // vocab-parallel cross-entropy: (3, N) of this rank, (TP, 3, N) of all
  Tensor final_h_region_;           // lm_head's input (N, H): final_h_ or its all-gather
  Tensor dlogits_, dfinal_h_, dfinal_h_local_, dhidden_a_, dhidden_b_, dembed_full_, dscratch_;
  MoeAuxStats aux_;
  LossValues loss_;

  void forward_body(const int64_t* ids, int64_t B, int64_t S);
  LossValues score();
  VocabShard vocab_shard() const;
};

}  // namespace nextron
