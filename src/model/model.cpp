#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu_ops.h"
#include "parallel/tp_shard.h"

namespace nextron {

namespace {

// The host copy of a small f32 device tensor (statistics, per-row losses).
std::vector<float> to_host(const Ops& ops, const Tensor& t) {
  std::vector<float> v(t.numel());
  ops.download(v.data(), t, v.size() * sizeof(float));
  return v;
}

}  // namespace

Model::Model(const ModelConfig& config, const ModelComms& comms, std::shared_ptr<Ops> ops)
    : config_(config),
      local_config_(tp_local_config(config, comms.tp.size())),
      comms_(comms),
      ops_(ops ? std::move(ops) : std::make_shared<CpuOps>()),
      table_(local_config_) {
  config_.validate();
  ops_->f32(flat_.params, {table_.total_numel()});
  ops_->f32(flat_.grads, {table_.total_numel()});
  if (ops_->act_dtype() == DType::f32)
    flat_.params_act = flat_.params;
  else
    ops_->act(flat_.params_act, {table_.total_numel()});
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i)
    layers_.push_back(std::make_unique<DecoderLayer>(local_config_, i, table_, flat_, *ops_, comms_.tp));
}

void Model::params_changed() {
  if (flat_.params_act.raw() != flat_.params.raw()) ops_->cast(flat_.params_act, flat_.params);
}

Tensor Model::logits() const {
  if (logits_.device() == Device::cpu && logits_.dtype() == DType::f32) return logits_;
  Tensor act_host = Tensor::zeros(logits_.shape(), logits_.dtype());
  act_host.copy_from(logits_);
  if (act_host.dtype() == DType::f32) return act_host;
  NEXTRON_ASSERT(act_host.dtype() == DType::bf16);
  Tensor out = Tensor::zeros(logits_.shape());
  const uint16_t* src = act_host.data<uint16_t>();
  float* dst = out.f32();
  for (int64_t i = 0; i < out.numel(); ++i) dst[i] = bf16_to_f32(src[i]);
  return out;
}

VocabShard Model::vocab_shard() const {
  return {comms_.tp.rank() * local_config_.vocab_size, local_config_.vocab_size, config_.vocab_size};
}

void Model::forward_body(const int64_t* ids, int64_t B, int64_t S) {
  NEXTRON_CHECK(B > 0 && S > 0, "forward: batch and sequence length must be positive, got B=", B, " S=", S);
  const TensorParallel& tp = comms_.tp;
  Ops& ops = *ops_;
  const int64_t N = B * S, H = config_.hidden_size, V = local_config_.vocab_size, L = config_.num_hidden_layers;
  NEXTRON_CHECK(!tp.sequence_parallel() || N % tp.size() == 0, "sequence parallelism splits the ", N,
                " tokens of a micro-batch over TP ", tp.size(), ": choose a sequence length divisible by TP");
  const int64_t Nl = tp.local_rows(N);
  B_ = B;
  S_ = S;
  ids_.assign(ids, ids + N);
  ops.upload(ops.i64(ids_dev_, {N}), ids, N * sizeof(int64_t));
  hidden_.resize(L + 1);
  Tensor& h0 = ops.act(hidden_[0], {Nl, H});
  const ParamRef embed = ModuleWeights(table_, flat_, "").p("embed_tokens");
  if (tp.active()) {
    // Each rank looks up the ids of its vocab rows; the region exit sums (or reduce-scatters) the partial rows.
    Tensor& e = ops.act(embed_region_, {N, H});
    ops.embedding_forward(e, embed, ids_dev_, vocab_shard());
    tp.exit_forward(e, h0, N, H);
  } else {
    ops.embedding_forward(h0, embed, ids_dev_, vocab_shard());
  }
  aux_.reset(ops, config_.num_experts);
  for (int64_t i = 0; i < L; ++i) layers_[i]->forward(hidden_[i], ops.act(hidden_[i + 1], {Nl, H}), B, S, aux_);
  if (comms_.data_parallel && aux_.total_rows > 0) {
    // The load-balancing loss of the global micro-batch: sum the statistics of every data-parallel replica.
    const int64_t E = config_.num_experts;
    std::vector<float> counts = to_host(ops, aux_.count_sum), probs = to_host(ops, aux_.prob_sum);
    std::vector<double> stats(2 * E + 1);
    for (int64_t e = 0; e < E; ++e) {
      stats[e] = counts[e];
      stats[E + e] = probs[e];
    }
    stats[2 * E] = aux_.total_rows;
    comms_.data_parallel->all_reduce_sum(stats.data(), 2 * E + 1);
    for (int64_t e = 0; e < E; ++e) {
      counts[e] = static_cast<float>(stats[e]);
      probs[e] = static_cast<float>(stats[E + e]);
    }
    ops.upload(aux_.count_sum, counts.data(), E * sizeof(float));
    ops.upload(aux_.prob_sum, probs.data(), E * sizeof(float));
    aux_.total_rows = stats[2 * E];
  }
  const ModuleWeights top(table_, flat_, "");
  Tensor& fh = ops.act(final_h_, {Nl, H});
  ops.rmsnorm_forward(fh, ops.f32(final_rstd_, {Nl}), hidden_[L], top.p("norm"), config_.rms_norm_eps);
  final_h_region_ = tp.enter_forward(ops, fh, final_h_full_, N, H);
  ops.linear_forward(ops.act(logits_, {B, S, V}), final_h_region_, top.p("lm_head"), nullptr);
}

LossValues Model::score() {
  Ops& ops = *ops_;
  const int64_t N = B_ * S_;
  double sum = 0;
  int64_t count = 0;
  ops.f32(row_loss_, {N});
  ops.f32(lse_, {N});
  ops.upload(ops.i64(targets_dev_, {N}), targets_.data(), N * sizeof(int64_t));
  const TensorParallel& tp = comms_.tp;
  if (tp.active()) {
    // Vocab-parallel: three numbers per row and rank cross the TP group instead of the (N, V) logits.
    ops.cross_entropy_partial(ops.f32(ce_stats_, {3, N}), logits_, targets_dev_, vocab_shard());
    tp.all_gather(ce_stats_, ops.f32(ce_stats_all_, {tp.size(), 3, N}));
    ops.cross_entropy_combine(&sum, row_loss_, lse_, ce_stats_all_, targets_dev_, config_.vocab_size);
  } else {
    ops.cross_entropy_forward(&sum, row_loss_, lse_, logits_, targets_dev_);
  }
  count = std::count_if(targets_.begin(), targets_.end(), [](int64_t t) { return t != cpu::kIgnoreIndex; });
  if (comms_.data_parallel) {
    // The mean over the global micro-batch's scored tokens (the gradient is then a plain sum over replicas).
    double both[2] = {sum, static_cast<double>(count)};
    comms_.data_parallel->all_reduce_sum(both, 2);
    sum = both[0];
    count = static_cast<int64_t>(both[1]);
  }
  loss_ = LossValues{};
  loss_.tokens = count;
  loss_.lm_loss = count > 0 ? sum / static_cast<double>(count) : 0.0;
  if (aux_.total_rows > 0) {
    const std::vector<float> counts = to_host(ops, aux_.count_sum), probs = to_host(ops, aux_.prob_sum);
    loss_.aux_loss = cpu::aux_loss_value(counts.data(), probs.data(), aux_.total_rows, config_.num_experts);
  }
  loss_.loss = loss_.lm_loss + config_.router_aux_loss_coef * loss_.aux_loss;
  return loss_;
}

LossValues Model::forward(const int64_t* ids, const int64_t* labels, int64_t B, int64_t S) {
  forward_body(ids, B, S);
  targets_.clear();
  loss_ = LossValues{};
  if (!labels) return loss_;
  // transformers' shift: position s is scored against labels[s + 1]; the last position of a row has no target.
  targets_.assign(B * S, -100);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s + 1 < S; ++s) targets_[b * S + s] = labels[b * S + s + 1];
  return score();
}

LossValues Model::forward_targets(const int64_t* ids, const int64_t* targets, int64_t B, int64_t S) {
  forward_body(ids, B, S);
  targets_.assign(targets, targets + B * S);
  return score();
}

std::vector<double> Model::per_sequence_loss() const {
  std::vector<double> out(B_, std::numeric_limits<double>::quiet_NaN());
  if (targets_.empty()) return out;
  const std::vector<float> row_loss = to_host(*ops_, row_loss_);
  const float* rl = row_loss.data();
  for (int64_t b = 0; b < B_; ++b) {
    double s = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < S_; ++t)
      if (targets_[b * S_ + t] != -100) {
        s += rl[b * S_ + t];
        ++n;
      }
    if (n > 0) out[b] = s / static_cast<double>(n);
  }
  return out;
}

void Model::set_routing_replay(RoutingReplay* replay) {
  for (size_t i = 0; i < layers_.size(); ++i)
    if (SparseMoe* moe = layers_[i]->moe()) moe->set_routing_replay(replay, static_cast<int64_t>(i));
}

void Model::backward(float loss_scale) {
  NEXTRON_CHECK(!targets_.empty(), "backward() needs a forward() with labels first");
  const TensorParallel& tp = comms_.tp;
  Ops& ops = *ops_;
  const int64_t N = B_ * S_, Nl = tp.local_rows(N), H = config_.hidden_size, V = local_config_.vocab_size,
                L = config_.num_hidden_layers;
  const ModuleWeights top(table_, flat_, "");
  Tensor& dlogits = ops.act(dlogits_, {N, V});
  if (loss_.tokens > 0) {
    const double scale = loss_scale / static_cast<double>(loss_.tokens);
    ops.cross_entropy_backward(dlogits, logits_, lse_, targets_dev_, scale, vocab_shard());
  } else {
    ops.zero(dlogits);
  }
  Tensor& dfh = ops.act_zeroed(dfinal_h_, {N, H});
  ops.linear_backward(&dfh, top.p("lm_head"), nullptr, dlogits, final_h_region_);
  Tensor* dfh_local = &dfh;
  if (tp.active()) {
    Tensor& d = ops.act_zeroed(dfinal_h_local_, {Nl, H});
    tp.enter_backward(ops, dfh, d, dscratch_, N, H);
    dfh_local = &d;
  }
  ops.act_zeroed(dhidden_a_, {Nl, H});
  ops.rmsnorm_backward(&dhidden_a_, top.p("norm"), *dfh_local, hidden_[L], final_rstd_);
  const float d_aux = loss_scale * static_cast<float>(config_.router_aux_loss_coef);
  for (int64_t i = L - 1; i >= 0; --i) {
    ops.act_zeroed(dhidden_b_, {Nl, H});
    layers_[i]->backward(dhidden_a_, dhidden_b_, aux_, d_aux);
    std::swap(dhidden_a_, dhidden_b_);
  }
  const ParamRef embed = top.p("embed_tokens");
  // Under TP every rank needs the gradient of all N rows for its vocab rows (a gather under SP).
  ops.embedding_backward(embed, tp.exit_backward(ops, dhidden_a_, dembed_full_, N, H), ids_dev_, vocab_shard());
}

}  // namespace nextron
