// Sparse MoE block (Qwen3NextSparseMoeBlock): softmax top-k router, routed SwiGLU experts computed grouped by
// expert, and a shared SwiGLU expert scaled by sigmoid(shared_expert_gate x).
#pragma once

#include <memory>
#include <vector>

#include "comm/tensor_parallel.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/mlp.h"
#include "model/module.h"
#include "model/moe_dispatcher.h"
#include "model/routing_replay.h"

namespace nextron {

// Load-balancing statistics summed over every MoE layer of a step (transformers' load_balancing_loss_func
// concatenates all layers' router outputs). Kept apart from the layers so a parallel run can all-reduce them.
struct MoeAuxStats {
  Tensor count_sum;       // (E) f32 on the backend's device: top-k assignments per expert
  Tensor prob_sum;        // (E) f32 on the backend's device: summed router probabilities per expert
  double total_rows = 0;  // token rows summed over MoE layers
  // False for the scratch statistics of a recomputation rerun: the rerun is not another micro-batch, so the
  // per-layer expert load (SparseMoe::load) does not count it.
  bool counts_load = true;
  void reset(const Ops& ops, int64_t E);
};

// One MoE layer's load over some micro-batches (--moe-per-layer-logging).
struct ExpertLoad {
  int64_t layer = 0;          // global layer index
  std::vector<float> tokens;  // (E) top-k assignments per expert (as routed, before any dropping)
  double dropped = 0;         // slots over their expert's capacity
  bool operator==(const ExpertLoad&) const = default;
};

class SparseMoe {
 public:
  // Under tensor parallelism (`tp`), each rank holds 1/TP of every expert's and of the shared expert's
  // intermediate channels (config is the rank's local config) and sees all token rows: the output is a partial sum
  // over the TP group; the router and the shared-expert gate run whole on every rank.
  // Under expert parallelism (`ep` active) the rank holds config.num_local_experts() of the routed experts and the
  // all-to-all dispatcher (model/moe_dispatcher.h) carries each token's rows to the ranks holding their experts.
  // Buffers outside the records, shared by the MoE blocks of every layer of one kind (model/decoder.h): they live
  // within one call, or (the recomputed shared expert) are rewritten by the backward before it reads them.
  struct Scratch {
    SwiGluMlp::Saved rc_shared;  // the shared expert's record and output (N, H) when it is recomputed
    Tensor rc_shared_out;
    Tensor logits, shared_gated;                           // forward (N, E) f32, (N, H)
    Tensor dprobs, dtopw, dlogits, dshared, dshared_gate;  // backward
    std::shared_ptr<SwiGluMlp::Scratch> shared_expert = std::make_shared<SwiGluMlp::Scratch>();
    std::shared_ptr<AllToAllDispatcher::Scratch> dispatcher = std::make_shared<AllToAllDispatcher::Scratch>();
  };
  // scratch: shared buffers (nullptr: its own).
  SparseMoe(const ModelConfig& config, ModuleWeights weights, Ops& ops, const TensorParallel& tp = {},
            const ExpertParallel& ep = {}, std::shared_ptr<Scratch> scratch = nullptr);
  // What backward needs from one forward: one record per micro-batch in flight, owned by the caller.
  struct Saved {
    Tensor x;                                  // (N, H) the router's and experts' input (a view)
    Tensor x_shared;                           // the shared expert's input (x, or the region rows when folded)
    Tensor probs, topw, topi;                  // (N, E) f32 router probabilities, (N, K) f32 weights, (N, K) i32
    std::unique_ptr<MoeExpertsState> experts;  // the backend's dispatch and expert-ordered activations
    AllToAllDispatcher::Saved dispatch;        // under expert parallelism: the plan and the returned outputs
    SwiGluMlp::Saved shared;                   // the shared expert's
    Tensor shared_out, shared_gate;            // (N, H) its output, (N, 1) its gate logit
  };
  // x: (N, H); y: (N, H) overwritten; adds this layer's router statistics.
  void forward(Saved& s, const Tensor& x, Tensor& y, MoeAuxStats& aux);
  // Folded experts (config.experts_folded, ETP 1 under TP + SP): the router and routed experts run on this rank's
  // rows x_local (Nl, H) into y_local (overwritten), the shared expert (split over TP like the dense MLP) on the
  // region rows x_region (N, H) into y_region (overwritten; a partial sum over TP).
  void forward_folded(Saved& s, const Tensor& x_local, Tensor& y_local, const Tensor& x_region, Tensor& y_region,
                      MoeAuxStats& aux);
  // Its backward: the routed part (router included) accumulates into dx_local, the shared expert into dx_region
  // (partial over TP) and its gate into dx_region_replicated (the same on every TP rank).
  void backward_folded(const Saved& s, const Tensor& dy_local, Tensor& dx_local, const Tensor& dy_region,
                       Tensor& dx_region, Tensor& dx_region_replicated, const MoeAuxStats& aux, float d_aux);
  // d_aux: gradient of the total loss w.r.t. the aux loss value (router_aux_loss_coef for training).
  // Accumulates into dx (N, H) the gradient through the experts (partial over TP ranks) and into dx_replicated
  // (N, H) the gradient through the router and the shared-expert gate (the same on every TP rank, so it must be
  // counted once, not summed over the group); both may be the same buffer on one device.
  void backward(const Saved& s, const Tensor& dy, Tensor& dx, Tensor& dx_replicated, const MoeAuxStats& aux,
                float d_aux);
  // Selective recomputation (model/recompute.h): moe_act, the routed experts' SwiGLU output; shared_experts, the
  // shared expert (its record and output live in this layer's scratch and backward reruns it on the kept input).
  void set_recompute(bool act, bool shared) {
    recompute_act_ = act;
    recompute_shared_ = shared;
  }
  // Per-layer expert load (Megatron's --moe-per-layer-logging): while on, every forward of a micro-batch adds its
  // top-k assignments per expert to load() ((E) f32 on the device), until reset_load().
  void set_load_logging(bool on) { log_load_ = on; }
  void reset_load();
  const Tensor& load() const { return load_tokens_; }
  double dropped() const { return load_dropped_; }
  // Records this layer's expert choice into `replay`, or replays it from there (its mode decides); nullptr: off.
  // `layer` names the layer in the replay.
  void set_routing_replay(RoutingReplay* replay, int64_t layer) {
    replay_ = replay;
    replay_layer_ = layer;
  }

 private:
  // The routed part (router, experts; y overwritten) and the shared expert (y += or = its gated output).
  void forward_routed(Saved& s, const Tensor& x, Tensor& y, MoeAuxStats& aux);
  void forward_shared(Saved& s, const Tensor& x, Tensor& y, bool accumulate);
  void backward_routed(const Saved& s, const Tensor& dy, Tensor& dx, Tensor& dx_router, const MoeAuxStats& aux,
                       float d_aux);
  void backward_shared(const Saved& s, const Tensor& dy, Tensor& dx, Tensor& dx_replicated);
  // --moe-router-force-load-balancing: overwrites topi with slot s = n K + k -> expert s mod E and topw with the
  // router's weights there.
  void force_balance(const Tensor& probs, Tensor& topi, Tensor& topw);
  // Record: copies topi (N, K) to the replay; replay: overwrites topi with the recorded choice and topw with its
  // weights from probs (N, E).
  void apply_routing_replay(const Tensor& probs, Tensor& topi, Tensor& topw);

  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  TensorParallel tp_;
  std::unique_ptr<SwiGluMlp> shared_;
  std::unique_ptr<AllToAllDispatcher> dispatcher_;  // expert parallelism only
  RoutingReplay* replay_ = nullptr;
  int64_t replay_layer_ = 0;
  bool recompute_act_ = false, recompute_shared_ = false, log_load_ = false;
  Tensor load_tokens_, load_probs_;  // (E) f32: assignments and summed probabilities since reset_load()
  double load_dropped_ = 0;          // dropped slots since reset_load()
  std::shared_ptr<Scratch> sc_;
  SwiGluMlp::Saved& rc_shared_ = sc_->rc_shared;
  Tensor &rc_shared_out_ = sc_->rc_shared_out, &logits_ = sc_->logits, &shared_gated_ = sc_->shared_gated,
         &dprobs_ = sc_->dprobs, &dtopw_ = sc_->dtopw, &dlogits_ = sc_->dlogits, &dshared_ = sc_->dshared,
         &dshared_gate_ = sc_->dshared_gate;
};

}  // namespace nextron
