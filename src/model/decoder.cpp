#include "model/decoder.h"

#include "core/error.h"

namespace nextron {

DecoderLayer::DecoderLayer(const ModelConfig& config, int64_t layer, const ParamTable& table, const FlatBuffers& flat,
                           Ops& ops, const TensorParallel& tp, const ExpertParallel& ep, const ContextParallel* cp,
                           std::shared_ptr<Scratch> scratch)
    : c_(config),
      wt_(table, flat, "layers." + std::to_string(layer) + "."),
      ops_(ops),
      tp_(tp),
      sc_(scratch ? std::move(scratch) : std::make_shared<Scratch>()) {
  // Both mixers see this rank's slice of every sequence under context parallelism (cp: nullptr or CP 1 otherwise).
  if (config.layer_types[layer] == MixerType::full_attention) {
    attention_ = std::make_unique<GatedAttention>(config, wt_.sub("self_attn."), ops_, sc_->attention);
    attention_->set_context_parallel(cp);
  } else {
    deltanet_ = std::make_unique<GatedDeltaNet>(config, wt_.sub("linear_attn."), ops_, sc_->deltanet);
    deltanet_->set_context_parallel(cp);
  }
  if (config.mlp_type(layer) == MlpType::sparse_moe)
    moe_ = std::make_unique<SparseMoe>(config, wt_.sub("mlp."), ops_, tp_, ep, sc_->moe);
  else
    dense_ =
        std::make_unique<SwiGluMlp>(wt_.sub("mlp."), config.hidden_size, config.intermediate_size, ops_, sc_->dense);
}

void DecoderLayer::forward(Saved& s, const Tensor& x_in, Tensor& x_out, int64_t B, int64_t S, MoeAuxStats& aux) {
  const int64_t N = B * S, Nl = tp_.local_rows(N), H = c_.hidden_size;
  s.B = B;
  s.S = S;
  s.x_in = x_in;
  // With the norms recomputed, their outputs (and SP gathers) live in this layer's scratch, which the mixer's and
  // the MLP's records view; backward writes the same values into the same storage again before those read them.
  Tensor& h1 = ops_.act(recompute_norm_ ? rc_h1_ : s.h1, {Nl, H});
  ops_.rmsnorm_forward(h1, ops_.f32(s.rstd1, {Nl}), x_in, wt_.p("input_layernorm"), c_.rms_norm_eps);
  s.h1_region = tp_.enter_forward(ops_, h1, recompute_norm_ ? rc_h1_full_ : s.h1_full, N, H);
  Tensor& mix_region = ops_.act(mix_region_, {N, H});
  if (attention_)
    attention_->forward(s.attention, s.h1_region, mix_region, B, S);
  else
    deltanet_->forward(s.deltanet, s.h1_region, mix_region, B, S);
  Tensor& mix = tp_.active() ? ops_.act(mix_, {Nl, H}) : mix_region;
  tp_.exit_forward(mix_region, mix, N, H);
  Tensor& x_mid = ops_.act(s.x_mid, {Nl, H});
  ops_.add(x_mid, x_in, mix);
  Tensor& h2 = ops_.act(recompute_norm_ ? rc_h2_ : s.h2, {Nl, H});
  ops_.rmsnorm_forward(h2, ops_.f32(s.rstd2, {Nl}), x_mid, wt_.p("post_attention_layernorm"), c_.rms_norm_eps);
  s.h2_region = tp_.enter_forward(ops_, h2, recompute_norm_ ? rc_h2_full_ : s.h2_full, N, H);
  Tensor& mlp_region = ops_.act(mlp_region_, {N, H});
  if (folded()) {
    // The routed experts on this rank's own rows; the shared expert through the TP region.
    Tensor& routed = ops_.act(routed_, {Nl, H});
    moe_->forward_folded(recompute_mlp_ ? rc_moe_ : s.moe, h2, routed, s.h2_region, mlp_region, aux);
    Tensor& mlp = ops_.act(mlp_, {Nl, H});
    tp_.exit_forward(mlp_region, mlp, N, H);
    ops_.add(mlp, mlp, routed);
    ops_.add(x_out, x_mid, mlp);
    return;
  }
  if (moe_)
    moe_->forward(recompute_mlp_ ? rc_moe_ : s.moe, s.h2_region, mlp_region, aux);
  else
    dense_->forward(recompute_mlp_ ? rc_dense_ : s.dense, s.h2_region, mlp_region);
  Tensor& mlp = tp_.active() ? ops_.act(mlp_, {Nl, H}) : mlp_region;
  tp_.exit_forward(mlp_region, mlp, N, H);
  ops_.add(x_out, x_mid, mlp);
}

void DecoderLayer::forward_cached(LayerCache& cache, const std::vector<int64_t>& lengths, const Tensor& x_in,
                                  Tensor& x_out, int64_t B, int64_t S) {
  NEXTRON_CHECK(!tp_.active(), "generation runs on one process (tensor parallelism 1)");
  const int64_t N = B * S, H = c_.hidden_size;
  Saved& s = cached_;
  Tensor& h1 = ops_.act(s.h1, {N, H});
  ops_.rmsnorm_forward(h1, ops_.f32(s.rstd1, {N}), x_in, wt_.p("input_layernorm"), c_.rms_norm_eps);
  Tensor& mix = ops_.act(mix_region_, {N, H});
  if (attention_)
    attention_->forward_cached(cache, lengths, h1, mix, B, S);
  else
    deltanet_->forward_cached(cache, h1, mix, B, S);
  Tensor& x_mid = ops_.act(s.x_mid, {N, H});
  ops_.add(x_mid, x_in, mix);
  Tensor& h2 = ops_.act(s.h2, {N, H});
  ops_.rmsnorm_forward(h2, ops_.f32(s.rstd2, {N}), x_mid, wt_.p("post_attention_layernorm"), c_.rms_norm_eps);
  Tensor& mlp = ops_.act(mlp_region_, {N, H});
  if (moe_) {
    cached_aux_.reset(ops_, c_.num_experts);
    cached_aux_.counts_load = false;  // not a training micro-batch: the per-layer expert load does not count it
    moe_->forward(s.moe, h2, mlp, cached_aux_);
  } else {
    dense_->forward(s.dense, h2, mlp);
  }
  ops_.add(x_out, x_mid, mlp);
}

void DecoderLayer::set_recompute(const RecomputeOptions& options) {
  recompute_mlp_ = options.recomputes_module(moe_ ? "moe" : "mlp");
  recompute_norm_ = options.recomputes_module("layernorm");
  const bool core = options.recomputes_module("core_attn");
  if (attention_) attention_->set_recompute_core(core);
  if (deltanet_) {
    deltanet_->set_recompute_core(core);
    deltanet_->set_recompute_states(options.recomputes_module("delta_rule_states"));
  }
  if (moe_) moe_->set_recompute(options.recomputes_module("moe_act"), options.recomputes_module("shared_experts"));
}

void DecoderLayer::rerun_norm(const Tensor& x, const char* weight, Tensor& h, Tensor& full, const Tensor& region,
                              int64_t N) {
  const int64_t Nl = tp_.local_rows(N), H = c_.hidden_size;
  Tensor& out = ops_.act(h, {Nl, H});
  ops_.rmsnorm_forward(out, ops_.f32(rc_rstd_, {Nl}), x, wt_.p(weight), c_.rms_norm_eps);
  const Tensor& again = tp_.enter_forward(ops_, out, full, N, H);
  // The records view this storage: it must be the one the forward wrote (same shapes, so never reallocated).
  NEXTRON_ASSERT(again.raw() == region.raw());
}

const Tensor& DecoderLayer::region_grad_to_local(Tensor& d_region, Tensor& local, int64_t N) {
  if (!tp_.active()) return d_region;
  const int64_t H = c_.hidden_size;
  Tensor& out = ops_.act_zeroed(local, {tp_.local_rows(N), H});
  tp_.enter_backward(ops_, d_region, out, dscratch_, N, H);
  return out;
}

void DecoderLayer::backward(const Saved& s, const Tensor& dx_out, Tensor& dx_in, const MoeAuxStats& aux, float d_aux) {
  const int64_t N = s.B * s.S, Nl = tp_.local_rows(N), H = c_.hidden_size;
  // The residual carries dx_out straight to x_mid; the MLP branch adds through the post-attention norm.
  const Tensor& dmlp = tp_.exit_backward(ops_, dx_out, dregion_full_, N, H);
  if (recompute_norm_) rerun_norm(s.x_mid, "post_attention_layernorm", rc_h2_, rc_h2_full_, s.h2_region, N);
  if (recompute_mlp_) {
    // Rerun the MLP block on its saved input (its router statistics are not counted again).
    Tensor& out = ops_.act(rc_mlp_region_, {N, H});
    if (moe_) {
      rc_aux_.reset(ops_, c_.num_experts);
      rc_aux_.counts_load = false;
      if (folded())
        moe_->forward_folded(rc_moe_, recompute_norm_ ? rc_h2_ : s.h2, ops_.act(routed_, {Nl, H}), s.h2_region, out,
                             rc_aux_);
      else
        moe_->forward(rc_moe_, s.h2_region, out, rc_aux_);
    } else {
      dense_->forward(rc_dense_, s.h2_region, out);
    }
  }
  Tensor& dh2 = ops_.act_zeroed(dh2_, {N, H});
  if (folded()) {
    // Routed part: this rank's rows (dx_out is their gradient); shared expert: the region (dmlp), its gate replicated.
    Tensor& dh2_rep = ops_.act_zeroed(dh2_replicated_, {N, H});
    Tensor& dh2_routed = ops_.act_zeroed(dh2_routed_, {Nl, H});
    moe_->backward_folded(recompute_mlp_ ? rc_moe_ : s.moe, dx_out, dh2_routed, dmlp, dh2, dh2_rep, aux, d_aux);
  } else if (moe_) {
    Tensor& dh2_rep = tp_.active() ? ops_.act_zeroed(dh2_replicated_, {N, H}) : dh2;
    moe_->backward(recompute_mlp_ ? rc_moe_ : s.moe, dmlp, dh2, dh2_rep, aux, d_aux);
  } else {
    dense_->backward(recompute_mlp_ ? rc_dense_ : s.dense, dmlp, dh2);
  }
  const Tensor& dh2_local = region_grad_to_local(dh2, dh2_local_, N);
  if (moe_ && tp_.active()) {
    // The router's and shared-expert gate's input gradient is the same on every TP rank: add it once, after the
    // reduction, for this rank's rows (folded: only the shared gate's; the router's is this rank's own).
    Tensor rep = dh2_replicated_.slice0(tp_.local_row_begin(N), tp_.local_row_begin(N) + Nl);
    ops_.add(dh2_local_, dh2_local_, rep);
    if (folded()) ops_.add(dh2_local_, dh2_local_, dh2_routed_);
  }
  Tensor& dx_mid = ops_.act(dx_mid_, {Nl, H});
  dx_mid.copy_from(dx_out);
  ops_.rmsnorm_backward(&dx_mid, wt_.p("post_attention_layernorm"), dh2_local, s.x_mid, s.rstd2);
  const Tensor& dmix = tp_.exit_backward(ops_, dx_mid, dregion_full_, N, H);
  if (recompute_norm_) rerun_norm(s.x_in, "input_layernorm", rc_h1_, rc_h1_full_, s.h1_region, N);
  Tensor& dh1 = ops_.act_zeroed(dh1_, {N, H});
  if (attention_)
    attention_->backward(s.attention, dmix, dh1);
  else
    deltanet_->backward(s.deltanet, dmix, dh1);
  const Tensor& dh1_local = region_grad_to_local(dh1, dh1_local_, N);
  ops_.add(dx_in, dx_in, dx_mid);
  ops_.rmsnorm_backward(&dx_in, wt_.p("input_layernorm"), dh1_local, s.x_in, s.rstd1);
}

}  // namespace nextron
