// The expert-parallel path of the routed experts (Megatron's all-to-all token dispatcher), in its phases:
//
//   dispatch_preprocess   each (token, k) slot's destination rank (expert / El) and local expert; the slots in
//                         destination order (stable), their rows gathered (Ops::moe_permute)
//   token_dispatch        counts and local expert ids over the host group, then the rows (ExpertParallel)
//   dispatch_postprocess  the received rows with their local expert (the grouped experts sort them by expert)
//   experts               Ops::moe_experts_forward over the received rows, each with routing weight 1 (exact)
//   combine_preprocess    the expert outputs in receive order (the experts' own unpermute)
//   token_combine         the outputs back to the senders, in send order
//   combine_postprocess   y[n] = sum_k w[n, k] out[slot (n, k)] in k order (Ops::moe_unpermute)
//
// and backward through the same phases in reverse. With a capacity factor (config.expert_capacity_factor) the same
// path drops the slots over an expert's capacity before they are sent (a dropped slot reads a zero row: its output,
// its routing-weight gradient and its input gradient are zero) and, under pad_to_capacity, sends zero rows up to
// every expert's capacity; it then also serves EP 1. The only host synchronisation of a dispatch is downloading the
// expert choice (N K ints) to build the plan; the counts ride with the ids in one host exchange.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "comm/expert_parallel.h"
#include "kernels/ops.h"
#include "model/config.h"

namespace nextron {

class AllToAllDispatcher {
 public:
  // Buffers that live within one call only, so the dispatchers of every layer of one kind share them
  // (model/decoder.h). R: rows received, sent: rows sent.
  struct Scratch {
    Tensor send_token, send, received, expert_out;        // forward (sent), (sent, H), (R, H), (R, H)
    Tensor x_padded;                                      // (N + 1, H) x and a zero row (padding to capacity)
    Tensor d_returned, d_expert_out, d_received, d_send;  // backward
    Tensor d_ones;                                        // (R, 1): the experts' routing-weight gradient (unused)
  };
  // config: the rank's local config (El = num_local_experts() experts from first_local_expert()); scratch: shared
  // buffers (nullptr: its own).
  AllToAllDispatcher(const ModelConfig& config, Ops& ops, const ExpertParallel& ep,
                     std::shared_ptr<Scratch> scratch = nullptr);

  // What backward needs from one forward: part of the MoE layer's record.
  struct Saved {
    AllToAllPlan plan;
    Tensor slot_row;         // (N K) i32: where slot n K + k sits in send order
    Tensor returned;         // (sent + 1, H) the expert outputs back at this rank, send order; the last row zero
    Tensor ones, local_ids;  // (R, 1) f32 routing weights 1 and (R, 1) i32 local experts of the received rows
    int64_t dropped = 0;     // slots over their expert's capacity
  };
  // An expert's capacity for NK routed slots of a micro-batch on this rank: ceil(factor N K / E) (NK when dropless).
  int64_t capacity(int64_t NK) const;
  // y (N, H) = the routed experts' weighted sum for x (N, H), by topw (N, K) f32 and topi (N, K) i32 (global ids).
  void forward(Tensor& y, Saved& s, MoeExpertsState& experts, const Tensor& x, const Tensor& topw, const Tensor& topi,
               const ParamRef& w_gate_up, const ParamRef& w_down);
  // Accumulates into dx (N, H) and dtopw (N, K) f32, and into the local experts' weight gradients.
  void backward(Tensor& dx, Tensor& dtopw, const Saved& s, MoeExpertsState& experts, const Tensor& dy,
                const Tensor& topw, const ParamRef& w_gate_up, const ParamRef& w_down);

 private:
  // 1 for the slots that fit their expert's capacity (all without a capacity factor).
  std::vector<char> kept_slots(const std::vector<int32_t>& choice, const Tensor& topw) const;
  const ModelConfig& c_;
  Ops& ops_;
  ExpertParallel ep_;
  std::shared_ptr<Scratch> sc_;
  Tensor &send_token_ = sc_->send_token, &send_ = sc_->send, &received_ = sc_->received, &expert_out_ = sc_->expert_out,
         &x_padded_ = sc_->x_padded, &d_returned_ = sc_->d_returned, &d_expert_out_ = sc_->d_expert_out,
         &d_received_ = sc_->d_received, &d_send_ = sc_->d_send, &d_ones_ = sc_->d_ones;
};

}  // namespace nextron
