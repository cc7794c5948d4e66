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

#include "comm/communicator.h"
#include "comm/context_parallel.h"
#include "comm/tensor_parallel.h"
#include "core/tensor.h"
#include "kernels/ops.h"
#include "kernels/vocab_shard.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/inference_cache.h"
#include "model/moe.h"
#include "model/param_table.h"
#include "model/recompute.h"
#include "model/stage.h"

namespace nextron {

struct LossValues {
  double lm_loss = 0;   // mean cross-entropy over scored tokens
  double aux_loss = 0;  // load-balancing loss (0 without MoE layers)
  double loss = 0;      // lm_loss + router_aux_loss_coef * aux_loss: what backward() differentiates
  int64_t tokens = 0;   // scored (non-ignored) tokens
};

// What scoring one micro-batch leaves for the host: the device's values arrive by deferred reads (Ops::read_later),
// so they are valid after the backend's next resolve_reads() (the training step's one wait: the gradient norm);
// Model::loss_values turns them into LossValues. The scored-token count is known on the host at once (already
// summed over data-parallel replicas: the backward's normaliser).
struct ScoreReadout {
  double loss_sum = 0;                       // this rank's summed cross-entropy (deferred)
  int64_t tokens = 0;                        // scored tokens, summed over data-parallel replicas
  std::vector<float> aux_counts, aux_probs;  // (E) router statistics summed over MoE layers (deferred)
  double aux_rows = 0;                       // the rows behind them (0: no MoE layer)
};

// Everything one forward leaves for its backward: one record per micro-batch in flight (a pipeline schedule keeps
// several), owned by the caller and reused across steps (its buffers keep their allocations). The Model methods
// without a record use the model's own. Nl: this rank's rows of the N = B S tokens (N / TP under sequence
// parallelism, else N); V: this rank's vocabulary columns.
struct ModelActivations {
  int64_t B = 0, S = 0;
  std::vector<int64_t> targets;             // (N) host copy of the aligned targets; empty after a logits-only forward
  Tensor ids_dev, targets_dev;              // (N) i64 on the backend's device
  std::vector<Tensor> hidden;               // L + 1 layer inputs, (Nl, H) each
  std::vector<DecoderLayer::Saved> layers;  // L
  Tensor final_h, final_rstd;               // (Nl, H) the final norm's output, (Nl) its rstd
  Tensor final_h_full, final_h_region;      // (N, H) its all-gather under SP; lm_head's input (one of the two)
  Tensor logits;                            // (B, S, V)
  Tensor row_loss, lse;                     // (N) f32 per-token loss and log-sum-exp
  MoeAuxStats aux;                          // this micro-batch's router statistics, summed over MoE layers
  LossValues loss;                          // loss.tokens is set by the forward; the values by forward_targets
  ScoreReadout readout;                     // the deferred reads of forward_targets (forward_scored takes its own)
  Tensor d_output, d_input;  // pipeline stages: the gradients of the stage's output and input, (Nl, H) each
};

struct ModelComms {
  TensorParallel tp;   // the tensor-parallel group (identity by default)
  ExpertParallel ep;   // the expert-parallel group (EP 1 by default)
  ContextParallel cp;  // the context-parallel group (CP 1 by default: whole sequences)
  // The ranks holding other tokens of the global micro-batch (DP x CP; nullptr for one replica): the loss and the
  // router statistics are means over all of them.
  Communicator* data_parallel = nullptr;
};

class Model {
 public:
  // ops: the backend the model runs on (nullptr: the CPU backend). Its parameters, gradients and activations live
  // on ops->device().
  // stage: the layers this model holds (model/stage.h; the whole model by default). Parameters, table() and the
  // flat buffers are the stage's.
  // scratch: the per-kind layer scratch this model shares with the other models (pipeline chunks) of its rank
  // (model/decoder.h; nullptr: its own).
  explicit Model(const ModelConfig& config, const ModelComms& comms = {}, std::shared_ptr<Ops> ops = nullptr,
                 const StageRange& stage = {}, std::shared_ptr<LayerScratchPool> scratch = nullptr);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }              // the whole model's config
  const ModelConfig& local_config() const { return local_config_; }  // this TP rank's slice
  const ParamTable& table() const { return table_; }                 // laid out for local_config()
  const StageRange& stage() const { return stage_; }
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
  LossValues forward(const int64_t* ids, const int64_t* labels, int64_t B, int64_t S) {
    return forward(own_, ids, labels, B, S);
  }
  LossValues forward(ModelActivations& a, const int64_t* ids, const int64_t* labels, int64_t B, int64_t S);
  // The same with targets already aligned: position t is scored against targets[t] (-100 ignored). Training
  // samples of S + 1 tokens use ids = tokens[0, S), targets = tokens[1, S + 1), so every position is scored.
  LossValues forward_targets(const int64_t* ids, const int64_t* targets, int64_t B, int64_t S) {
    return forward_targets(own_, ids, targets, B, S);
  }
  LossValues forward_targets(ModelActivations& a, const int64_t* ids, const int64_t* targets, int64_t B, int64_t S);
  // The same without waiting for the device: the loss's statistics go to `out` by deferred reads (a no-op on a
  // stage without the loss); call loss_values(out) after ops().resolve_reads(). What a training step uses, so that
  // it waits once (CUDA), not once per micro-batch. `out` must outlive the resolve.
  void forward_scored(ModelActivations& a, const int64_t* ids, const int64_t* targets, int64_t B, int64_t S,
                      ScoreReadout& out);
  // The loss values of resolved readouts (one per micro-batch): their loss sums are summed over data-parallel
  // replicas here, in one all-reduce of the model's data-parallel group (every replica calls it for the same
  // micro-batches).
  std::vector<LossValues> loss_values(const std::vector<ScoreReadout>& readouts) const;
  LossValues loss_values(const ScoreReadout& r) const { return loss_values(std::vector<ScoreReadout>{r}).front(); }
  // (B, S, V / TP) of the last forward, this rank's vocab columns, as f32 on the host (copied from the device once
  // per call on CUDA).
  Tensor logits() const { return logits(own_); }
  Tensor logits(const ModelActivations& a) const;
  // Mean cross-entropy of each sequence of the last forward (NaN for a sequence with no scored token).
  std::vector<double> per_sequence_loss() const { return per_sequence_loss(own_); }
  std::vector<double> per_sequence_loss(const ModelActivations& a) const;
  // Accumulates loss_scale * d(loss)/d(parameter) of the last forward into grads() (loss_scale = 1 / number of
  // micro-batches averages the gradient over gradient-accumulation steps).
  void backward(float loss_scale = 1.0f) { backward(own_, loss_scale); }
  // The backward of the forward that filled `a` (any number of other forwards may have run since).
  void backward(const ModelActivations& a, float loss_scale = 1.0f);

  // ---- Generation (model/inference_cache.h; the whole model on one process: no TP, PP, CP or EP) ----
  // A cache of `batch` empty sequence slots of `capacity` positions each, on the backend's device.
  InferenceCache new_inference_cache(int64_t batch, int64_t capacity) const;
  // Runs S new tokens ids (B, S) of the B slots [first_slot, first_slot + B) of `cache` (each at its own length,
  // which grows by S) and returns the next-token logits of each sequence's last new token: (B, vocab_size) f32 on
  // the host (padded vocabulary columns dropped). A prompt is one call with its S tokens (the chunked kernels);
  // decoding is one call per token with S = 1 (the recurrent step and the KV cache).
  std::vector<float> forward_cached(InferenceCache& cache, int64_t first_slot, const int64_t* ids, int64_t B,
                                    int64_t S);

  // ---- Pipeline stages (a model built over a StageRange that is not the whole model) ----
  // A stage after the first: the (Nl, H) buffer of `a` to fill with the previous stage's output before forward
  // (ids are then ignored), and the router statistics that came with it (set a.aux: count_sum, prob_sum (E) and
  // total_rows). A stage before the last: forward computes no loss; its output is stage_output(a), and the aux
  // statistics it passes on are a.aux.
  Tensor& stage_input(ModelActivations& a, int64_t B, int64_t S);
  const Tensor& stage_output(const ModelActivations& a) const;
  // Backward of any stage: the last one starts from the loss (as backward()); the others from the gradient of their
  // output, written into stage_output_grad(a) first. Before it, a.aux must hold the final statistics of the whole
  // model (the last stage's, which the load-balancing gradient of every MoE layer needs). A stage after the first
  // leaves the gradient of its input in stage_input_grad(a), or in *input_grad ((Nl, H), resized) where given: a
  // pipeline sends it after the record is free again (so a record lives from its forward to its backward only).
  Tensor& stage_output_grad(ModelActivations& a);
  void backward_stage(ModelActivations& a, float loss_scale = 1.0f, Tensor* input_grad = nullptr);
  const Tensor& stage_input_grad(const ModelActivations& a) const;
  // Routing replay for every MoE layer (nullptr: off). The replay outlives the forwards that use it; layer i of
  // the model (its global index, whichever stage holds it) is entry i of the replay.
  void set_routing_replay(RoutingReplay* replay);
  // Activation recomputation (model/recompute.h; validated first). Applies to the forwards that follow; a record
  // must be backwarded under the setting it was forwarded with.
  void set_recompute(const RecomputeOptions& options);
  // Per-layer expert load (--moe-per-layer-logging): while on, each MoE layer counts its top-k assignments per
  // expert over the micro-batches since reset_expert_load(); expert_load() returns them per MoE layer of this
  // stage as (global layer index, (E) counts).
  void set_expert_load_logging(bool on);
  // Token rows each MoE layer of this rank routes per micro-batch of N tokens: N, or its sequence shard when the
  // experts are folded (ETP 1 under TP + SP).
  int64_t routed_rows(int64_t N) const { return local_config_.experts_folded ? comms_.tp.local_rows(N) : N; }
  void reset_expert_load();
  std::vector<ExpertLoad> expert_load() const;

 private:
  ModelConfig config_, local_config_;
  ModelComms comms_;
  std::shared_ptr<Ops> ops_;
  StageRange stage_;  // layer_end resolved
  ParamTable table_;
  FlatBuffers flat_;
  std::vector<std::unique_ptr<DecoderLayer>> layers_;
  ModelActivations own_;            // the record of the methods without one
  Tensor embed_region_;             // forward scratch (N, H): the vocab-parallel embedding's partial rows
  Tensor ce_stats_, ce_stats_all_;  // vocab-parallel cross-entropy: (3, N) of this rank, (TP, 3, N) of all
  // Vocabulary padding: lm_head's bias for this rank's columns, 0 for real ids and -1e30 for padded ones (whose
  // exp() is then exactly 0 in the softmax and its gradient), present only when this rank holds padded columns.
  ParamRef vocab_mask_;
  Tensor dlogits_, dfinal_h_, dfinal_h_local_, dhidden_a_, dhidden_b_, dembed_full_, dscratch_;  // backward scratch
  // Full recomputation: the layer groups, and the scratch a recomputed group's forward writes into (in forward and
  // again in backward), in the pool the rank's chunks share: one group's layer records, its inner layer inputs
  // ((Nl, H) each), its output and the router statistics of the rerun (discarded).
  std::vector<RecomputeGroup> groups_;
  std::shared_ptr<LayerScratchPool> pool_;
  std::vector<DecoderLayer::Saved>& rc_saved_ = pool_->group_records;
  std::vector<Tensor>& rc_hidden_ = pool_->group_inputs;
  Tensor& rc_out_ = pool_->group_out;
  MoeAuxStats& rc_aux_ = pool_->group_aux;
  // Runs group g's layers from input `x`, with the records and inner inputs in the scratch; the group's output goes
  // to `out`.
  void forward_group(const RecomputeGroup& g, const Tensor& x, Tensor& out, int64_t B, int64_t S, MoeAuxStats& aux);

  void forward_body(ModelActivations& a, const int64_t* ids, int64_t B, int64_t S);
  // Enqueues the loss of the forward's logits against a.targets; its values go to `out` (deferred reads).
  void score(ModelActivations& a, ScoreReadout& out);
  // The layers' backward from the loss (d_output null) or from the gradient of the stage's output; leaves the
  // gradient of the stage input in dhidden_a_.
  void backward_from(const ModelActivations& a, const Tensor* d_output, float loss_scale);
  VocabShard vocab_shard() const;
  // Generation scratch: the ids (N) on the device, two (N, H) hidden buffers, the last rows (B, H), their norm and
  // logits (B, V), and the logits in f32 when the activations are not.
  Tensor gen_ids_, gen_a_, gen_b_, gen_last_, gen_norm_, gen_rstd_, gen_logits_, gen_logits_f32_;
};

}  // namespace nextron
