#include "model/model.h"

#include <cmath>
#include <limits>

#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu/rmsnorm.h"

namespace nextron {

using namespace cpu;

Model::Model(const ModelConfig& config) : config_(config), table_(config_) {
  config_.validate();
  params_ = Tensor::zeros({table_.total_numel()});
  grads_ = Tensor::zeros({table_.total_numel()});
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i)
    layers_.push_back(std::make_unique<DecoderLayer>(config_, i, table_, params_, grads_));
}

void Model::forward_body(const int64_t* ids, int64_t B, int64_t S) {
  NEXTRON_CHECK(B > 0 && S > 0, "forward: batch and sequence length must be positive, got B=", B, " S=", S);
  const int64_t N = B * S, H = config_.hidden_size, V = config_.vocab_size, L = config_.num_hidden_layers;
  B_ = B;
  S_ = S;
  ids_.assign(ids, ids + N);
  hidden_.resize(L + 1);
  embedding_forward(buffer(hidden_[0], {N, H}), table_.view(params_, "embed_tokens").f32(), ids, N, H, V);
  aux_.reset(config_.num_experts);
  for (int64_t i = 0; i < L; ++i) layers_[i]->forward(hidden_[i].f32(), buffer(hidden_[i + 1], {N, H}), B, S, aux_);
  float* fh = buffer(final_h_, {N, H});
  rmsnorm_forward(fh, buffer(final_rstd_, {N}), hidden_[L].f32(), table_.view(params_, "norm").f32(), N, H,
                  config_.rms_norm_eps);
  linear_forward<float>(buffer(logits_, {B, S, V}), fh, table_.view(params_, "lm_head").f32(), nullptr, N, H, V);
}

LossValues Model::score() {
  const int64_t N = B_ * S_, V = config_.vocab_size;
  double sum = 0;
  int64_t count = 0;
  cross_entropy_forward(&sum, &count, buffer(row_loss_, {N}), buffer(lse_, {N}), logits_.f32(), targets_.data(), N, V);
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
  const int64_t N = B_ * S_, H = config_.hidden_size, V = config_.vocab_size, L = config_.num_hidden_layers;
  float* dlogits = zeroed(dlogits_, {N, V});
  if (loss_.tokens > 0)
    cross_entropy_backward(dlogits, logits_.f32(), lse_.f32(), targets_.data(),
                           loss_scale / static_cast<float>(loss_.tokens), N, V);
  float* dfh = zeroed(dfinal_h_, {N, H});
  linear_backward<float>(dfh, table_.view(grads_, "lm_head").f32(), nullptr, dlogits, final_h_.f32(),
                         table_.view(params_, "lm_head").f32(), N, H, V);
  float* dcur = zeroed(dhidden_a_, {N, H});
  rmsnorm_backward(dcur, table_.view(grads_, "norm").f32(), dfh, hidden_[L].f32(), table_.view(params_, "norm").f32(),
                   final_rstd_.f32(), N, H);
  const float d_aux = loss_scale * static_cast<float>(config_.router_aux_loss_coef);
  for (int64_t i = L - 1; i >= 0; --i) {
    float* dprev = zeroed(dhidden_b_, {N, H});
    layers_[i]->backward(dcur, dprev, aux_, d_aux);
    std::swap(dhidden_a_, dhidden_b_);
    dcur = dhidden_a_.f32();
  }
  embedding_backward(table_.view(grads_, "embed_tokens").f32(), dcur, ids_.data(), N, H, V);
}

}  // namespace nextron
