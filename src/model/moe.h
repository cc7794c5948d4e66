// Sparse MoE block (Qwen3NextSparseMoeBlock): softmax top-k router, routed SwiGLU experts computed grouped by
// expert, and a shared SwiGLU expert scaled by sigmoid(shared_expert_gate x).
#pragma once

#include <memory>
#include <vector>

#include "kernels/cpu/moe_experts.h"
#include "model/config.h"
#include "model/mlp.h"
#include "model/module.h"
#include "parallel/tensor_parallel.h"

namespace nextron {

// Load-balancing statistics summed over every MoE layer of a step (transformers' load_balancing_loss_func
// concatenates all layers' router outputs). Kept apart from the layers so a parallel run can all-reduce them.
struct MoeAuxStats {
  Tensor count_sum;       // (E) top-k assignments per expert
  Tensor prob_sum;        // (E) summed router probabilities per expert
  double total_rows = 0;  // token rows summed over MoE layers
  void reset(int64_t E);
};

class SparseMoe {
 public:
  // Under tensor parallelism (`tp`), each rank holds 1/TP of every expert's and of the shared expert's
  // intermediate channels (config is the rank's local config) and sees all token rows: the output is a partial sum
  // over the TP group; the router and the shared-expert gate run whole on every rank.
  SparseMoe(const ModelConfig& config, ModuleWeights weights, const TensorParallel& tp = {});
  // x: (N, H) kept by the caller until backward; y: (N, H) overwritten; adds this layer's router statistics.
  void forward(const float* x, float* y, int64_t N, MoeAuxStats& aux);
  // d_aux: gradient of the total loss w.r.t. the aux loss value (router_aux_loss_coef for training).
  // Accumulates into dx (N, H) the gradient through the experts (partial over TP ranks) and into dx_replicated
  // (N, H) the gradient through the router and the shared-expert gate (the same on every TP rank, so it must be
  // counted once, not summed over the group); both may be the same buffer on one device.
  void backward(const float* dy, float* dx, float* dx_replicated, const MoeAuxStats& aux, float d_aux);

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  TensorParallel tp_;
  std::unique_ptr<SwiGluMlp> shared_;
  int64_t N_ = 0;
  const float* x_ = nullptr;
  Tensor logits_, probs_, topw_, shared_out_, shared_gate_, shared_gated_;
  std::vector<int32_t> topi_;
  cpu::MoeDispatch dispatch_;
  cpu::MoeExpertsCache<float> cache_;
  Tensor dprobs_, dtopw_, dlogits_, dshared_, dshared_gate_;
};

}  // namespace nextron
