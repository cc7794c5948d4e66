// AdamW on flat fp32 buffers (parameters, gradients and both moments share the ParamTable's flat layout), with
// exactly torch.optim.AdamW's arithmetic. ZeRO-1 updates only a slice of the flat buffers, so every entry point
// takes a FlatRange.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace nextron {

class ParamTable;
class Ops;

struct AdamWHyper {
  double lr = 1e-3;  // the learning rate of the next step (the trainer sets it from the LR schedule)
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  // Decay every parameter; by default those whose ParamSpec::weight_decay is false (norms, biases, A_log,
  // dt_bias) are not decayed.
  bool decay_all = false;
};

// Throws a nextron::Error naming the bad field (lr < 0, betas outside [0, 1), eps <= 0, weight_decay < 0).
void validate(const AdamWHyper& h);

// The sorted, disjoint, maximal ranges of the flat layout whose parameters are decayed (adjacent decayed
// parameters merged); with decay_all, the single range [0, total_numel).
std::vector<FlatRange> decay_ranges(const ParamTable& table, bool decay_all = false);

// One AdamW update of flat elements [range.begin, range.end), torch.optim.AdamW's single-tensor path in fp32:
//   p *= 1 - lr * wd                              (only inside `decay`; decoupled weight decay first)
//   m = lerp(m, g, 1 - beta1);  v = v * beta2 + (1 - beta2) * g * g
//   p += -(lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// `step` is the 1-based number of this update (torch's state["step"] after its increment). Every pointer
// addresses flat element range.begin at index 0: pass `flat + range.begin` for a full-size buffer, or a
// shard-local buffer as is. `decay` holds flat (absolute) ranges, sorted and disjoint, as decay_ranges returns.
// Parallel over elements (OpenMP); each element's result does not depend on the thread count.
// Same operations and fp32 roundings as torch except that torch's CPU kernels fuse multiply-adds (lerp, addcmul)
// and use a sqrt that is not correctly rounded: results agree to a few ulp (tests/unit/test_optim.cpp).
void adamw_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, FlatRange range,
                const std::vector<FlatRange>& decay, const AdamWHyper& h, int64_t step);

// AdamW state for one range of the flat layout (the whole model, or a ZeRO-1 shard): both moments (fp32, range
// sized, zero-initialised), the decay ranges and the number of steps taken.
class AdamW {
 public:
  // ops: where the moments live and the update runs (nullptr: the host, through adamw_step above).
  AdamW(const ParamTable& table, FlatRange range, const AdamWHyper& h, Ops* ops = nullptr);
  // Updates params[range] from grads[range] with learning rate `lr`; both point at flat element 0 (host moments).
  void step(float* flat_params, const float* flat_grads, double lr);
  // The same through the Ops the optimizer was built with, on flat buffers of its device; params_act (may be
  // nullptr) receives the updated range in the activation dtype.
  void step(Tensor& flat_params, const Tensor& flat_grads, double lr, Tensor* params_act);

  const AdamWHyper& hyper() const { return hyper_; }
  FlatRange range() const { return range_; }
  int64_t steps_taken() const { return steps_; }
  // Optimizer state (for checkpoints): moments indexed from range.begin, and the step count.
  const Tensor& exp_avg() const { return exp_avg_; }
  const Tensor& exp_avg_sq() const { return exp_avg_sq_; }
  Tensor& exp_avg() { return exp_avg_; }
  Tensor& exp_avg_sq() { return exp_avg_sq_; }
  void set_steps_taken(int64_t steps);

 private:
  AdamWHyper hyper_;
  Ops* ops_ = nullptr;
  FlatRange range_;
  std::vector<FlatRange> decay_;
  Tensor exp_avg_, exp_avg_sq_;
  int64_t steps_ = 0;
};

}  // namespace nextron
