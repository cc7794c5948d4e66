#include "model/moe_dispatcher.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace nextron {

AllToAllDispatcher::AllToAllDispatcher(const ModelConfig& config, Ops& ops, const ExpertParallel& ep,
                                       std::shared_ptr<Scratch> scratch)
    : c_(config), ops_(ops), ep_(ep), sc_(scratch ? std::move(scratch) : std::make_shared<Scratch>()) {
  NEXTRON_CHECK(c_.num_local_experts() * ep_.size() == c_.num_experts, "MoE dispatcher: ", c_.num_local_experts(),
                " local experts x EP ", ep_.size(), " != ", c_.num_experts, " experts");
}

int64_t AllToAllDispatcher::capacity(int64_t NK) const {
  if (c_.expert_capacity_factor <= 0) return NK;
  return static_cast<int64_t>(
      std::ceil(c_.expert_capacity_factor * static_cast<double>(NK) / static_cast<double>(c_.num_experts)));
}

std::vector<char> AllToAllDispatcher::kept_slots(const std::vector<int32_t>& choice, const Tensor& topw) const {
  const int64_t NK = static_cast<int64_t>(choice.size()), E = c_.num_experts, cap = capacity(NK);
  std::vector<char> kept(static_cast<size_t>(NK), 1);
  if (c_.expert_capacity_factor <= 0) return kept;
  std::vector<float> weight;
  if (!c_.drop_by_position) {
    weight.resize(static_cast<size_t>(NK));
    ops_.download(weight.data(), topw, weight.size() * sizeof(float));
  }
  // Each expert's slots in slot order (= token position, then k): position keeps the first `cap`, probs the `cap`
  // of highest routing weight (ties: the earlier slot).
  std::vector<std::vector<int64_t>> slots(static_cast<size_t>(E));
  for (int64_t s = 0; s < NK; ++s) slots[choice[s]].push_back(s);
  for (std::vector<int64_t>& list : slots) {
    if (static_cast<int64_t>(list.size()) <= cap) continue;
    if (!c_.drop_by_position)
      std::stable_sort(list.begin(), list.end(), [&weight](int64_t a, int64_t b) { return weight[a] > weight[b]; });
    for (size_t i = static_cast<size_t>(cap); i < list.size(); ++i) kept[list[i]] = 0;
  }
  return kept;
}

void AllToAllDispatcher::forward(Tensor& y, Saved& s, MoeExpertsState& experts, const Tensor& x, const Tensor& topw,
                                 const Tensor& topi, const ParamRef& w_gate_up, const ParamRef& w_down) {
  const int64_t N = topi.dim(0), K = topi.dim(1), H = c_.hidden_size, E = c_.num_experts, El = c_.num_local_experts(),
                NK = N * K;
  const int P = ep_.size();
  const bool pad = c_.pad_to_capacity && c_.expert_capacity_factor > 0;
  // dispatch_preprocess: every slot's destination (expert / El) and whether it fits its expert's capacity; the kept
  // slots in destination order (stable), then under padding each expert's zero rows up to its capacity.
  std::vector<int32_t> choice(static_cast<size_t>(NK));
  ops_.download(choice.data(), topi, choice.size() * sizeof(int32_t));
  for (int32_t e : choice)
    NEXTRON_CHECK(e >= 0 && e < E, "MoE router produced an expert index ", e, " outside [0, ", E, ")");
  const std::vector<char> kept = kept_slots(choice, topw);
  s.dropped = std::count(kept.begin(), kept.end(), char{0});
  std::vector<int64_t> per_expert(static_cast<size_t>(E), 0);
  for (int64_t slot = 0; slot < NK; ++slot) per_expert[choice[slot]] += kept[slot];
  const int64_t cap = capacity(NK);
  std::vector<int64_t> send_rows(P, 0);
  for (int64_t e = 0; e < E; ++e) send_rows[e / El] += pad ? cap : per_expert[e];
  std::vector<int64_t> next(P, 0);
  for (int p = 1; p < P; ++p) next[p] = next[p - 1] + send_rows[p - 1];
  const int64_t sent = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
  // A dropped slot points at row `sent`: a zero row past the sent ones (its output and gradients are zero).
  std::vector<int32_t> slot_row(static_cast<size_t>(NK)), send_token(static_cast<size_t>(sent)),
      send_ids(static_cast<size_t>(sent));
  for (int64_t slot = 0; slot < NK; ++slot) {
    if (!kept[slot]) {
      slot_row[slot] = static_cast<int32_t>(sent);
      continue;
    }
    const int32_t e = choice[slot];
    const int64_t row = next[e / El]++;
    slot_row[slot] = static_cast<int32_t>(row);
    send_token[row] = static_cast<int32_t>(slot / K);
    send_ids[row] = static_cast<int32_t>(e % El);
  }
  if (pad)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = per_expert[e]; i < cap; ++i) {
        const int64_t row = next[e / El]++;
        send_token[row] = static_cast<int32_t>(N);  // the zero row appended to x
        send_ids[row] = static_cast<int32_t>(e % El);
      }
  ops_.upload(ops_.i32(s.slot_row, {NK}), slot_row.data(), slot_row.size() * sizeof(int32_t));
  ops_.upload(ops_.i32(send_token_, {sent}), send_token.data(), send_token.size() * sizeof(int32_t));
  const Tensor* source = &x;
  if (pad) {
    Tensor& padded = ops_.act_zeroed(x_padded_, {N + 1, H});
    Tensor::view_of(padded, 0, {N, H}).copy_from(x);
    source = &padded;
  }
  ops_.moe_permute(ops_.act(send_, {sent, H}), *source, send_token_);
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
  // token_combine into the first `sent` rows of `returned` (its last row stays zero), combine_postprocess.
  Tensor& returned = ops_.act_zeroed(s.returned, {sent + 1, H});
  Tensor head = Tensor::view_of(returned, 0, {sent, H});
  ep_.token_combine(ops_, out, head, s.plan);
  ops_.moe_unpermute(y, returned, topw, s.slot_row);
}

void AllToAllDispatcher::backward(Tensor& dx, Tensor& dtopw, const Saved& s, MoeExpertsState& experts, const Tensor& dy,
                                  const Tensor& topw, const ParamRef& w_gate_up, const ParamRef& w_down) {
  const int64_t H = c_.hidden_size, R = s.plan.received(), sent = s.plan.sent();
  // Rows no slot reads (padding) keep a zero gradient; a dropped slot's gradient lands in the unsent last row.
  Tensor& d_returned = ops_.act_zeroed(d_returned_, {sent + 1, H});
  ops_.moe_unpermute_backward(d_returned, dtopw, dy, s.returned, topw, s.slot_row);
  ep_.token_combine_backward(ops_, Tensor::view_of(d_returned, 0, {sent, H}), d_expert_out_, s.plan);
  Tensor& d_received = ops_.act_zeroed(d_received_, {R, H});
  if (R > 0) {
    Tensor& d_ones = ops_.f32_zeroed(d_ones_, {R, 1});
    ops_.moe_experts_backward(d_received, d_ones, experts, d_expert_out_, w_gate_up, w_down);
  }
  Tensor& d_send = ops_.act_zeroed(d_send_, {sent + 1, H});
  Tensor d_head = Tensor::view_of(d_send, 0, {sent, H});
  ep_.token_dispatch_backward(ops_, d_received, d_head, s.plan);
  ops_.moe_permute_backward(dx, d_send, s.slot_row);
}

}  // namespace nextron
