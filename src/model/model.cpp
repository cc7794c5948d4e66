#include "model/model.h"

#include <cmath>
#include <limits>

#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu/rmsnorm.h"
#include "parallel/tp_shard.h"

namespace nextron {

using namespace cpu;

Model::Model(const ModelConfig& config, const ModelComms& comms)
    : config_(config), local_config_(tp_local_config(config, comms.tp.size())), comms_(comms), table_(local_config_) {
  config_.validate();
  params_ = Tensor::zeros({table_.total_numel()});
  grads_ = Tensor::zeros({table_.total_numel()});
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i)
    layers_.push_back(std::make_unique<DecoderLayer>(local_config_, i, table_, params_, grads_, comms_.tp));
}

VocabShard Model::vocab_shard() const {
  return {comms_.tp.rank() * local_config_.vocab_size, local_config_.vocab_size, config_.vocab_size};
}

void Model::forward_body(const int64_t* ids, int64_t B, int64_t S) {
  NEXTRON_CHECK(B > 0 && S > 0, "forward: batch and sequence length must be positive, got B=", B, " S=", S);
  const TensorParallel& tp = comms_.tp;
  const int64_t N = B * S, H = config_.hidden_size, V = local_config_.vocab_size, L = config_.num_hidden_layers;
  NEXTRON_CHECK(!tp.sequence_parallel() || N % tp.size() == 0, "sequence parallelism splits the ", N,
                " tokens of a micro-batch over TP ", tp.size(), ": choose a sequence length divisible by TP");
  const int64_t Nl = tp.local_rows(N);
  B_ = B;
  S_ = S;
  ids_.assign(ids, ids + N);
  hidden_.resize(L + 1);
  float* h0 = buffer(hidden_[0], {Nl, H});
  if (tp.active()) {
    // Each rank looks up the ids of its vocab rows; the region exit sums (or reduce-scatters) the partial rows.
    float* e = buffer(embed_region_, {N, H});
    vocab_parallel_embedding_forward(e, table_.view(params_, "embed_tokens").f32(), ids, N, H, vocab_shard());
    tp.exit_forward(e, h0, N, H);
  } else {
    embedding_forward(h0, table_.view(params_, "embed_tokens").f32(), ids, N, H, V);
  }
  aux_.reset(config_.num_experts);
  for (int64_t i = 0; i < L; ++i) layers_[i]->forward(hidden_[i].f32(), buffer(hidden_[i + 1], {Nl, H}), B, S, aux_);
  if (comms_.data_parallel && aux_.total_rows > 0) {
    // The load-balancing loss of the global micro-batch: sum the statistics of every data-parallel replica.
    const int64_t E = config_.num_experts;
    std::vector<double> stats(2 * E + 1);
    for (int64_t e = 0; e < E; ++e) {
      stats[e] = aux_.count_sum.f32()[e];
      stats[E + e] = aux_.prob_sum.f32()[e];
    }
    stats[2 * E] = aux_.total_rows;
    comms_.data_parallel->all_reduce_sum(stats.data(), 2 * E + 1);
    for (int64_t e = 0; e < E; ++e) {
      aux_.count_sum.f32()[e] = static_cast<float>(stats[e]);
      aux_.prob_sum.f32()[e] = static_cast<float>(stats[E + e]);
    }
    aux_.total_rows = stats[2 * E];
  }
  float* fh = buffer(final_h_, {Nl, H});
  rmsnorm_forward(fh, buffer(final_rstd_, {Nl}), hidden_[L].f32(), table_.view(params_, "norm").f32(), Nl, H,
                  config_.rms_norm_eps);
  final_h_region_ = tp.enter_forward(fh, final_h_full_, N, H);
  linear_forward<float>(buffer(logits_, {B, S, V}), final_h_region_, table_.view(params_, "lm_head").f32(), nullptr, N,
                        H, V);
}

LossValues Model::score() {
  const int64_t N = B_ * S_, V = local_config_.vocab_size;
  double sum = 0;
  int64_t count = 0;
  if (comms_.tp.active())
    vocab_parallel_cross_entropy_forward(&sum, &count, buffer(row_loss_, {N}), buffer(lse_, {N}), logits_.f32(),
                                         targets_.data(), N, vocab_shard(), comms_.tp);
  else
    cross_entropy_forward(&sum, &count, buffer(row_loss_, {N}), buffer(lse_, {N}), logits_.f32(), targets_.data(), N,
                          V);
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
  if (aux_.total_rows > 0)
    loss_.aux_loss = aux_loss_value(aux_.count_sum.f32(), aux_.prob_sum.f32(), aux_.total_rows, config_.num_experts);
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
  const float* rl = row_loss_.f32();
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

void Model::backward(float loss_scale) {
  NEXTRON_CHECK(!targets_.empty(), "backward() needs a forward() with labels first");
  const TensorParallel& tp = comms_.tp;
  const int64_t N = B_ * S_, Nl = tp.local_rows(N), H = config_.hidden_size, V = local_config_.vocab_size,
                L = config_.num_hidden_layers;
  float* dlogits = zeroed(dlogits_, {N, V});
  if (loss_.tokens > 0) {
    const float scale = loss_scale / static_cast<float>(loss_.tokens);
    if (tp.active())
      vocab_parallel_cross_entropy_backward(dlogits, logits_.f32(), lse_.f32(), targets_.data(), scale, N,
                                            vocab_shard());
    else
      cross_entropy_backward(dlogits, logits_.f32(), lse_.f32(), targets_.data(), scale, N, V);
  }
  float* dfh = zeroed(dfinal_h_, {N, H});
  linear_backward<float>(dfh, table_.view(grads_, "lm_head").f32(), nullptr, dlogits, final_h_region_,
                         table_.view(params_, "lm_head").f32(), N, H, V);
  const float* dfh_local = dfh;
  if (tp.active()) {
    float* d = zeroed(dfinal_h_local_, {Nl, H});
    tp.enter_backward(dfh, d, dscratch_, N, H);
    dfh_local = d;
  }
  float* dcur = zeroed(dhidden_a_, {Nl, H});
  rmsnorm_backward(dcur, table_.view(grads_, "norm").f32(), dfh_local, hidden_[L].f32(),
                   table_.view(params_, "norm").f32(), final_rstd_.f32(), Nl, H);
  const float d_aux = loss_scale * static_cast<float>(config_.router_aux_loss_coef);
  for (int64_t i = L - 1; i >= 0; --i) {
    float* dprev = zeroed(dhidden_b_, {Nl, H});
    layers_[i]->backward(dcur, dprev, aux_, d_aux);
    std::swap(dhidden_a_, dhidden_b_);
    dcur = dhidden_a_.f32();
  }
  if (tp.active()) {
    const float* d = tp.exit_backward(dcur, dembed_full_, N, H);
    vocab_parallel_embedding_backward(table_.view(grads_, "embed_tokens").f32(), d, ids_.data(), N, H, vocab_shard());
  } else {
    embedding_backward(table_.view(grads_, "embed_tokens").f32(), dcur, ids_.data(), N, H, V);
  }
}

}  // namespace nextron
