#include "model/moe.h"

#include <algorithm>

#include "core/error.h"

namespace nextron {

void MoeAuxStats::reset(const Ops& ops, int64_t E) {
  ops.f32_zeroed(count_sum, {std::max<int64_t>(E, 1)});
  ops.f32_zeroed(prob_sum, {std::max<int64_t>(E, 1)});
  total_rows = 0;
}

SparseMoe::SparseMoe(const ModelConfig& config, ModuleWeights weights, Ops& ops, const TensorParallel& tp,
                     const ExpertParallel& ep, std::shared_ptr<Scratch> scratch)
    : c_(config),
      wt_(std::move(weights)),
      ops_(ops),
      tp_(tp),
      sc_(scratch ? std::move(scratch) : std::make_shared<Scratch>()) {
  // Expert parallelism and token dropping take the phased dispatcher; otherwise the fused experts kernel.
  if (ep.active() || c_.expert_capacity_factor > 0)
    dispatcher_ = std::make_unique<AllToAllDispatcher>(c_, ops_, ep, sc_->dispatcher);
  if (c_.shared_expert_intermediate_size > 0)
    shared_ = std::make_unique<SwiGluMlp>(wt_.sub("shared_expert."), c_.hidden_size, c_.shared_expert_intermediate_size,
                                          ops_, sc_->shared_expert);
}

void SparseMoe::forward(Saved& s, const Tensor& x, Tensor& y, MoeAuxStats& aux) {
  forward_routed(s, x, y, aux);
  if (shared_) forward_shared(s, x, y, /*accumulate=*/true);
}

void SparseMoe::forward_folded(Saved& s, const Tensor& x_local, Tensor& y_local, const Tensor& x_region,
                               Tensor& y_region, MoeAuxStats& aux) {
  forward_routed(s, x_local, y_local, aux);
  if (shared_) forward_shared(s, x_region, y_region, /*accumulate=*/false);
}

void SparseMoe::forward_routed(Saved& s, const Tensor& x, Tensor& y, MoeAuxStats& aux) {
  const int64_t H = c_.hidden_size, E = c_.num_experts, K = c_.num_experts_per_tok, N = x.numel() / H;
  s.x = x;
  if (!s.experts) s.experts = ops_.new_moe_state();
  s.experts->recompute_act = recompute_act_;
  Tensor& logits = ops_.f32(logits_, {N, E});
  ops_.linear_forward_f32(logits, x, wt_.p("gate"));
  Tensor& probs = ops_.f32(s.probs, {N, E});
  Tensor& topw = ops_.f32(s.topw, {N, K});
  Tensor& topi = ops_.i32(s.topi, {N, K});
  ops_.router_forward(probs, topi, topw, logits, c_.norm_topk_prob);
  if (c_.force_load_balancing) force_balance(probs, topi, topw);
  if (replay_) apply_routing_replay(probs, topi, topw);
  ops_.aux_stats_accumulate(aux.count_sum, aux.prob_sum, probs, topi);
  if (log_load_ && aux.counts_load) {
    if (!load_tokens_.defined()) reset_load();
    ops_.aux_stats_accumulate(load_tokens_, load_probs_, probs, topi);
  }
  aux.total_rows += static_cast<double>(N);

  if (dispatcher_) {
    dispatcher_->forward(y, s.dispatch, *s.experts, x, topw, topi, wt_.p("experts.gate_up_proj"),
                         wt_.p("experts.down_proj"));
    if (log_load_ && aux.counts_load) load_dropped_ += static_cast<double>(s.dispatch.dropped);
  } else {
    ops_.moe_experts_forward(y, *s.experts, x, topw, topi, wt_.p("experts.gate_up_proj"), wt_.p("experts.down_proj"));
  }
}

void SparseMoe::forward_shared(Saved& s, const Tensor& x, Tensor& y, bool accumulate) {
  const int64_t H = c_.hidden_size, N = x.numel() / H;
  s.x_shared = x;
  Tensor& so = ops_.act(recompute_shared_ ? rc_shared_out_ : s.shared_out, {N, H});
  shared_->forward(recompute_shared_ ? rc_shared_ : s.shared, x, so);
  Tensor& sg = ops_.act(s.shared_gate, {N, 1});
  ops_.linear_forward(sg, x, wt_.p("shared_expert_gate"), nullptr);
  if (!accumulate) {
    ops_.sigmoid_gate_forward(y, so, sg, 1, 1);  // y = sigmoid(sg) * so
    return;
  }
  // y += sigmoid(sg) * so, through a scratch so the gate kernel keeps its overwrite convention.
  Tensor& gated = ops_.act(shared_gated_, {N, H});
  ops_.sigmoid_gate_forward(gated, so, sg, 1, 1);
  ops_.add(y, y, gated);
}

void SparseMoe::reset_load() {
  ops_.f32_zeroed(load_tokens_, {c_.num_experts});
  ops_.f32_zeroed(load_probs_, {c_.num_experts});
  load_dropped_ = 0;
}

void SparseMoe::force_balance(const Tensor& probs, Tensor& topi, Tensor& topw) {
  const int64_t N = topi.dim(0), K = topi.dim(1), E = c_.num_experts;
  NEXTRON_CHECK(K <= E, "--moe-router-force-load-balancing: top-k ", K, " exceeds the ", E, " experts");
  std::vector<int32_t> choice(static_cast<size_t>(N * K));
  for (int64_t s = 0; s < N * K; ++s) choice[s] = static_cast<int32_t>(s % E);
  ops_.upload(topi, choice.data(), choice.size() * sizeof(int32_t));
  ops_.router_weights_from_indices(topw, probs, topi, c_.norm_topk_prob);
}

void SparseMoe::apply_routing_replay(const Tensor& probs, Tensor& topi, Tensor& topw) {
  const int64_t N = topi.dim(0), K = topi.dim(1), E = c_.num_experts;
  const size_t bytes = static_cast<size_t>(N * K) * sizeof(int32_t);
  if (replay_->mode() == RoutingReplay::Mode::record) {
    std::vector<int32_t> host(static_cast<size_t>(N * K));
    ops_.download(host.data(), topi, bytes);
    replay_->record(replay_layer_, std::move(host), N, K);
    return;
  }
  ops_.upload(topi, replay_->choice(replay_layer_, N, K, E).data(), bytes);
  ops_.router_weights_from_indices(topw, probs, topi, c_.norm_topk_prob);
}

void SparseMoe::backward(const Saved& s, const Tensor& dy, Tensor& dx, Tensor& dx_replicated, const MoeAuxStats& aux,
                         float d_aux) {
  backward_routed(s, dy, dx, dx_replicated, aux, d_aux);
  if (shared_) backward_shared(s, dy, dx, dx_replicated);
}

void SparseMoe::backward_folded(const Saved& s, const Tensor& dy_local, Tensor& dx_local, const Tensor& dy_region,
                                Tensor& dx_region, Tensor& dx_region_replicated, const MoeAuxStats& aux, float d_aux) {
  // The router ran on this rank's own rows: its input gradient is this rank's, not a replicated one.
  backward_routed(s, dy_local, dx_local, dx_local, aux, d_aux);
  if (shared_) backward_shared(s, dy_region, dx_region, dx_region_replicated);
}

void SparseMoe::backward_routed(const Saved& s, const Tensor& dy, Tensor& dx, Tensor& dx_router, const MoeAuxStats& aux,
                                float d_aux) {
  const int64_t H = c_.hidden_size, E = c_.num_experts, K = c_.num_experts_per_tok, N = s.x.numel() / H;
  NEXTRON_CHECK(s.experts, "SparseMoe::backward: the record holds no forward");
  Tensor& dtopw = ops_.f32_zeroed(dtopw_, {N, K});
  if (dispatcher_)
    dispatcher_->backward(dx, dtopw, s.dispatch, *s.experts, dy, s.topw, wt_.p("experts.gate_up_proj"),
                          wt_.p("experts.down_proj"));
  else
    ops_.moe_experts_backward(dx, dtopw, *s.experts, dy, wt_.p("experts.gate_up_proj"), wt_.p("experts.down_proj"));
  // Experts split over TP (ETP = TP): each rank saw 1/TP of every expert's channels. Folded experts are whole.
  if (tp_.active() && !c_.experts_folded) tp_.sum(dtopw);
  Tensor& dprobs = ops_.f32_zeroed(dprobs_, {N, E});
  ops_.aux_loss_backward(dprobs, aux.count_sum, aux.total_rows, d_aux);
  Tensor& dlogits = ops_.f32_zeroed(dlogits_, {N, E});
  ops_.router_backward(dlogits, &dprobs, &dtopw, s.probs, s.topi, c_.norm_topk_prob);
  ops_.linear_backward(&dx_router, wt_.p("gate"), nullptr, dlogits, s.x);
}

void SparseMoe::backward_shared(const Saved& s, const Tensor& dy, Tensor& dx, Tensor& dx_replicated) {
  const int64_t H = c_.hidden_size, N = s.x_shared.numel() / H;
  if (recompute_shared_) shared_->forward(rc_shared_, s.x_shared, ops_.act(rc_shared_out_, {N, H}));
  const SwiGluMlp::Saved& shared = recompute_shared_ ? rc_shared_ : s.shared;
  const Tensor& shared_out = recompute_shared_ ? rc_shared_out_ : s.shared_out;
  Tensor& ds = ops_.act_zeroed(dshared_, {N, H});
  Tensor& dsg = ops_.act_zeroed(dshared_gate_, {N, 1});
  ops_.sigmoid_gate_backward(&ds, &dsg, dy, shared_out, s.shared_gate, 1, 1);
  // The gate multiplies the shared expert's output, of which each rank holds a partial sum.
  if (tp_.active()) tp_.sum(dsg);
  ops_.linear_backward(&dx_replicated, wt_.p("shared_expert_gate"), nullptr, dsg, s.x_shared);
  shared_->backward(shared, ds, dx);
}

}  // namespace nextron
