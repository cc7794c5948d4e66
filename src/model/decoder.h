// One hybrid decoder layer: x = x + mixer(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x)),
// with the mixer (gated attention or Gated DeltaNet) and the MLP (dense or sparse MoE) chosen by the config.
// Under tensor parallelism the mixer and the MLP are the TP regions (config is the rank's local config); the norms
// and the residual stream hold this rank's rows outside them (all rows, or a sequence shard with SP).
#pragma once

#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "comm/expert_parallel.h"
#include "comm/tensor_parallel.h"
#include "model/attention.h"
#include "model/config.h"
#include "model/gated_deltanet.h"
#include "model/mlp.h"
#include "model/moe.h"
#include "model/recompute.h"

namespace nextron {

class DecoderLayer {
 public:
  struct Scratch;
  // scratch: the buffers this layer shares with the other layers of its kind (nullptr: its own; see Scratch).
  DecoderLayer(const ModelConfig& config, int64_t layer, const ParamTable& table, const FlatBuffers& flat, Ops& ops,
               const TensorParallel& tp = {}, const ExpertParallel& ep = {}, const ContextParallel* cp = nullptr,
               std::shared_ptr<Scratch> scratch = nullptr);
  // What backward needs from one forward: one record per micro-batch in flight, owned by the caller. Nl: this
  // rank's rows of the N = B S tokens (N / TP under sequence parallelism, else N).
  struct Saved {
    int64_t B = 0, S = 0;
    Tensor x_in;                           // (Nl, H) the layer input (a view: the caller keeps it alive until backward)
    Tensor h1, rstd1;                      // (Nl, H) input_layernorm's output, (Nl) its rstd
    Tensor h1_full, h1_region;             // (N, H) its all-gather under SP; the mixer's input (h1 or h1_full)
    Tensor x_mid;                          // (Nl, H) after the mixer's residual add
    Tensor h2, rstd2, h2_full, h2_region;  // the same for post_attention_layernorm and the MLP
    GatedAttention::Saved attention;
    GatedDeltaNet::Saved deltanet;
    SwiGluMlp::Saved dense;
    SparseMoe::Saved moe;
  };
  // The buffers a layer keeps outside its records. Layers run one at a time and each of these either lives within
  // one call (the branch outputs, every gradient buffer, generation's) or is rewritten by the backward before it
  // reads it (the recomputed norms and MLP block: a record that views them gets the same values back in the same
  // storage), so all layers of one kind (mixer x MLP: the same shapes) share one Scratch, as Megatron shares its
  // buffers: a stage holds one or two copies instead of one per layer. The modules' own are inside.
  struct Scratch {
    Tensor mix_region, mix, mlp_region, mlp;               // forward: the branch outputs (N, H) and their local rows
    Tensor rc_h1, rc_h1_full, rc_h2, rc_h2_full, rc_rstd;  // recomputed norms: outputs, SP gathers, rstd
    SwiGluMlp::Saved rc_dense;  // the MLP block's record when it is recomputed (forward, then again in backward)
    SparseMoe::Saved rc_moe;
    MoeAuxStats rc_aux;
    Tensor rc_mlp_region;  // (N, H) the rerun's output (discarded)
    Tensor dh1, dh1_local, dx_mid, dh2, dh2_replicated, dh2_local, dregion_full, dscratch;  // backward
    Tensor routed, dh2_routed;  // folded experts: the routed output and its input gradient, (Nl, H)
    Saved cached;               // generation (forward_cached) and its router statistics (discarded)
    MoeAuxStats cached_aux;
    std::shared_ptr<GatedAttention::Scratch> attention = std::make_shared<GatedAttention::Scratch>();
    std::shared_ptr<GatedDeltaNet::Scratch> deltanet = std::make_shared<GatedDeltaNet::Scratch>();
    std::shared_ptr<SwiGluMlp::Scratch> dense = std::make_shared<SwiGluMlp::Scratch>();
    std::shared_ptr<SparseMoe::Scratch> moe = std::make_shared<SparseMoe::Scratch>();
  };
  // x_in: (Nl, H); x_out: the same shape, overwritten.
  void forward(Saved& s, const Tensor& x_in, Tensor& x_out, int64_t B, int64_t S, MoeAuxStats& aux);
  // Generation (one process: no TP, CP or EP): x_in (B S, H) holds S new tokens of B sequences, sequence b at
  // positions [lengths[b], lengths[b] + S), with this layer's cache entry for those B slots; x_out is overwritten.
  // Nothing is recorded for a backward.
  void forward_cached(LayerCache& cache, const std::vector<int64_t>& lengths, const Tensor& x_in, Tensor& x_out,
                      int64_t B, int64_t S);
  // Accumulates the gradient w.r.t. x_in into dx_in.
  void backward(const Saved& s, const Tensor& dx_out, Tensor& dx_in, const MoeAuxStats& aux, float d_aux);
  // Selective recomputation (model/recompute.h) of this layer's modules named in `options`:
  //   mlp / moe       the MLP block keeps only its input in the record; backward reruns it first (into a scratch
  //                   record of this layer; the rerun's router statistics are discarded)
  //   layernorm       both norms' outputs (and SP gathers) live in this layer's scratch, not the record; backward
  //                   recomputes them before the branches read them
  //   core_attn       the mixer's core (attention's softmax(q k^T) v, or the delta rule with its q/k L2 norms)
  //   moe_act, shared_experts   inside the MoE block (SparseMoe::set_recompute)
  //   delta_rule_states         the delta rule's intermediates (GatedDeltaNet::set_recompute_states)
  void set_recompute(const RecomputeOptions& options);
  // The sparse MoE block of this layer, nullptr where the MLP is dense.
  SparseMoe* moe() { return moe_.get(); }
  const SparseMoe* moe() const { return moe_.get(); }

 private:
  // Folded experts (ETP 1 under TP): the MoE block's routed part runs on this rank's rows, outside the TP region.
  bool folded() const { return moe_ && c_.experts_folded && tp_.active(); }
  void rerun_norm(const Tensor& x, const char* weight, Tensor& h, Tensor& full, const Tensor& region, int64_t N);
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
  bool recompute_mlp_ = false, recompute_norm_ = false;
  std::shared_ptr<Scratch> sc_;
  Saved& cached_ = sc_->cached;
  MoeAuxStats &cached_aux_ = sc_->cached_aux, &rc_aux_ = sc_->rc_aux;
  SwiGluMlp::Saved& rc_dense_ = sc_->rc_dense;
  SparseMoe::Saved& rc_moe_ = sc_->rc_moe;
  Tensor &mix_region_ = sc_->mix_region, &mix_ = sc_->mix, &mlp_region_ = sc_->mlp_region, &mlp_ = sc_->mlp,
         &rc_h1_ = sc_->rc_h1, &rc_h1_full_ = sc_->rc_h1_full, &rc_h2_ = sc_->rc_h2, &rc_h2_full_ = sc_->rc_h2_full,
         &rc_rstd_ = sc_->rc_rstd, &rc_mlp_region_ = sc_->rc_mlp_region, &dh1_ = sc_->dh1, &dh1_local_ = sc_->dh1_local,
         &dx_mid_ = sc_->dx_mid, &dh2_ = sc_->dh2, &dh2_replicated_ = sc_->dh2_replicated, &dh2_local_ = sc_->dh2_local,
         &dregion_full_ = sc_->dregion_full, &dscratch_ = sc_->dscratch, &routed_ = sc_->routed,
         &dh2_routed_ = sc_->dh2_routed;
};

// What the layers of a rank share, for all its pipeline chunks (model/model.h), which run one at a time: each layer
// kind's (mixer x MLP) Scratch, and full recomputation's group scratch (the records and inner inputs a recomputed
// group's forward writes, in forward and again in backward), sized for the widest group of any chunk.
using LayerKind = std::pair<MixerType, MlpType>;
struct LayerScratchPool {
  std::map<LayerKind, std::shared_ptr<DecoderLayer::Scratch>> kinds;
  std::vector<DecoderLayer::Saved> group_records;  // one group's layer records
  std::vector<Tensor> group_inputs;                // its inner layer inputs, (Nl, H) each
  Tensor group_out;                                // (Nl, H) its output in the backward's rerun (discarded)
  MoeAuxStats group_aux;                           // the rerun's router statistics (discarded)
};

}  // namespace nextron
