#include "model/moe_dispatcher.h"

#include "core/error.h"

namespace nextron {

AllToAllDispatcher::AllToAllDispatcher(const ModelConfig& config, Ops& ops, const ExpertParallel& ep)
    : c_(config), ops_(ops), ep_(ep) {
  NEXTRON_CHECK(c_.num_local_experts() * ep_.size() == c_.num_experts, "MoE dispatcher: ", c_.num_local_experts(),
                " local experts x EP ", ep_.size(), " != ", c_.num_experts, " experts");
}

void AllToAllDispatcher::forward(Tensor& y, Saved& s, MoeExpertsState& experts, const Tensor& x, const Tensor& topw,
                                 const Tensor& topi, const ParamRef& w_gate_up, const ParamRef& w_down) {
  const int64_t N = topi.dim(0), K = topi.dim(1), H = c_.hidden_size, E = c_.num_experts, El = c_.num_local_experts(),
                NK = N * K;
  const int P = ep_.size();
  // dispatch_preprocess: every slot's destination (expert / El), stable in slot order within a destination.
  std::vector<int32_t> choice(static_cast<size_t>(NK));
  ops_.download(choice.data(), topi, choice.size() * sizeof(int32_t));
  std::vector<int64_t> send_rows(P, 0);
  for (int32_t e : choice) {
    NEXTRON_CHECK(e >= 0 && e < E, "MoE router produced an expert index ", e, " outside [0, ", E, ")");
    ++send_rows[e / El];
  }
  std::vector<int64_t> next(P, 0);
  for (int p = 1; p < P; ++p) next[p] = next[p - 1] + send_rows[p - 1];
  std::vector<int32_t> slot_row(static_cast<size_t>(NK)), send_token(static_cast<size_t>(NK)),
      send_ids(static_cast<size_t>(NK));
  for (int64_t slot = 0; slot < NK; ++slot) {
    const int32_t e = choice[slot];
    const int64_t row = next[e / El]++;
    slot_row[slot] = static_cast<int32_t>(row);
    send_token[row] = static_cast<int32_t>(slot / K);
    send_ids[row] = static_cast<int32_t>(e % El);
  }
  ops_.upload(ops_.i32(s.slot_row, {NK}), slot_row.data(), slot_row.size() * sizeof(int32_t));
  ops_.upload(ops_.i32(send_token_, {NK}), send_token.data(), send_token.size() * sizeof(int32_t));
  ops_.moe_permute(ops_.act(send_, {NK, H}), x, send_token_);
  // token_dispatch: counts and local experts (host), then the rows.
  const std::vector<int32_t> local_ids = ep_.plan(s.plan, send_rows, send_ids);
  const int64_t R = s.plan.received();
  ep_.token_dispatch(ops_, send_, received_, s.plan);
  // dispatch_postprocess + experts: each received row goes to its local expert with weight 1.
  Tensor& out = ops_.act(expert_out_, {R, H});
  if (R > 0) {
    const std::vector<float> ones(static_cast<size_t>(R), 1.0f);
    ops_.upload(ops_.f32(s.ones, {R, 1}), ones.data(), ones.size() * sizeof(float));
    ops_.upload(ops_.i32(s.local_ids, {R, 1}), local_ids.data(), local_ids.size() * sizeof(int32_t));
    ops_.moe_experts_forward(out, experts, received_, s.ones, s.local_ids, w_gate_up, w_down);
  }
  // token_combine, combine_postprocess.
  ep_.token_combine(ops_, out, s.returned, s.plan);
  ops_.moe_unpermute(y, s.returned, topw, s.slot_row);
}

void AllToAllDispatcher::backward(Tensor& dx, Tensor& dtopw, const Saved& s, MoeExpertsState& experts, const Tensor& dy,
                                  const Tensor& topw, const ParamRef& w_gate_up, const ParamRef& w_down) {
  const int64_t NK = s.slot_row.numel(), H = c_.hidden_size, R = s.plan.received();
  ops_.moe_unpermute_backward(ops_.act(d_returned_, {NK, H}), dtopw, dy, s.returned, topw, s.slot_row);
  ep_.token_combine_backward(ops_, d_returned_, d_expert_out_, s.plan);
  Tensor& d_received = ops_.act_zeroed(d_received_, {R, H});
  if (R > 0) {
    Tensor& d_ones = ops_.f32_zeroed(d_ones_, {R, 1});
    ops_.moe_experts_backward(d_received, d_ones, experts, d_expert_out_, w_gate_up, w_down);
  }
  ep_.token_dispatch_backward(ops_, d_received, d_send_, s.plan);
  ops_.moe_permute_backward(dx, d_send_, s.slot_row);
}

}  // namespace nextron
