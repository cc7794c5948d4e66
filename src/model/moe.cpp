#include "model/moe.h"

#include <algorithm>

#include "kernels/cpu/linear.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu/router.h"
#include "kernels/cpu/sigmoid_gate.h"

namespace nextron {

using namespace cpu;

void MoeAuxStats::reset(int64_t E) {
  buffer(count_sum, {std::max<int64_t>(E, 1)});
  buffer(prob_sum, {std::max<int64_t>(E, 1)});
  count_sum.zero_();
  prob_sum.zero_();
  total_rows = 0;
}

SparseMoe::SparseMoe(const ModelConfig& config, ModuleWeights weights, const TensorParallel& tp)
    : c_(config), wt_(std::move(weights)), tp_(tp) {
  if (c_.shared_expert_intermediate_size > 0)
    shared_ =
        std::make_unique<SwiGluMlp>(wt_.sub("shared_expert."), c_.hidden_size, c_.shared_expert_intermediate_size);
}

void SparseMoe::forward(const float* x, float* y, int64_t N, MoeAuxStats& aux) {
  const int64_t H = c_.hidden_size, E = c_.num_experts, K = c_.num_experts_per_tok, I = c_.moe_intermediate_size;
  N_ = N;
  x_ = x;
  float* logits = buffer(logits_, {N, E});
  linear_forward<float>(logits, x, wt_.w("gate"), nullptr, N, H, E);
  float* probs = buffer(probs_, {N, E});
  float* topw = buffer(topw_, {N, K});
  topi_.resize(N * K);
  router_forward(probs, topi_.data(), topw, logits, N, E, K, c_.norm_topk_prob);
  aux_stats_accumulate(aux.count_sum.f32(), aux.prob_sum.f32(), probs, topi_.data(), N, E, K);
  aux.total_rows += static_cast<double>(N);

  moe_dispatch_build(dispatch_, topi_.data(), N, K, E);
  moe_experts_forward(y, cache_, dispatch_, x, topw, wt_.w("experts.gate_up_proj"), wt_.w("experts.down_proj"), N, H, I,
                      E, K);
  if (shared_) {
    float* s = buffer(shared_out_, {N, H});
    shared_->forward(x, s, N);
    float* sg = buffer(shared_gate_, {N, 1});
    linear_forward<float>(sg, x, wt_.w("shared_expert_gate"), nullptr, N, H, 1);
    // y += sigmoid(sg) * s, through a scratch so the gate kernel keeps its overwrite convention.
    float* gated = buffer(shared_gated_, {N, H});
    sigmoid_gate_forward(gated, s, sg, N, H, 1);
    for (int64_t i = 0; i < N * H; ++i) y[i] += gated[i];
  }
}

void SparseMoe::backward(const float* dy, float* dx, float* dx_replicated, const MoeAuxStats& aux, float d_aux) {
  const int64_t N = N_, H = c_.hidden_size, E = c_.num_experts, K = c_.num_experts_per_tok,
                I = c_.moe_intermediate_size;
  float* dtopw = zeroed(dtopw_, {N, K});
  moe_experts_backward(dx, dtopw, wt_.g("experts.gate_up_proj"), wt_.g("experts.down_proj"), cache_, dispatch_, dy,
                       topw_.f32(), wt_.w("experts.gate_up_proj"), wt_.w("experts.down_proj"), N, H, I, E, K);
  tp_.sum(dtopw, N * K);  // each rank saw 1/TP of every expert's channels
  float* dprobs = zeroed(dprobs_, {N, E});
  aux_loss_backward(dprobs, aux.count_sum.f32(), static_cast<float>(aux.total_rows), d_aux, N, E);
  float* dlogits = zeroed(dlogits_, {N, E});
  router_backward(dlogits, dprobs, dtopw, probs_.f32(), topi_.data(), N, E, K, c_.norm_topk_prob);
  linear_backward<float>(dx_replicated, wt_.g("gate"), nullptr, dlogits, x_, wt_.w("gate"), N, H, E);
  if (shared_) {
    float* ds = zeroed(dshared_, {N, H});
    float* dsg = zeroed(dshared_gate_, {N, 1});
    sigmoid_gate_backward(ds, dsg, dy, shared_out_.f32(), shared_gate_.f32(), N, H, 1);
    tp_.sum(dsg, N);  // the gate multiplies the shared expert's output, of which each rank holds a partial sum
    linear_backward<float>(dx_replicated, wt_.g("shared_expert_gate"), nullptr, dsg, x_, wt_.w("shared_expert_gate"), N,
                           H, 1);
    shared_->backward(ds, dx);
  }
}

}  // namespace nextron
