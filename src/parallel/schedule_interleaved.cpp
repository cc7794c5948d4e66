// Interleaved 1F1B (Megatron's forward_backward_pipelining_with_interleaving): rank r runs the M v virtual
// micro-batches in Megatron's order (forward_action / backward_action: groups of p micro-batches per chunk), with
// W = (p - r - 1) 2 + (v - 1) p warmup forwards (all M v when M == p, as Megatron), then one forward and one
// backward per steady iteration, then the cooldown backwards.
//
// Exchanges: the simple rule of 1F1B (the sends of the compute just done plus the receive the next one needs)
// deadlocks here under rendezvous semantics (e.g. p 2, v 2, M 4: rank 0 waits to send a gradient that rank 1 only
// receives after rank 0's next activation). Megatron's prefetching rule does not: one exchange per iteration, after
// its compute, holding the sends of that iteration and the receives of the NEXT forward and the NEXT backward, so a
// rank always has its next inputs in flight while its neighbours send them:
//   before the first forward          recv_forward
//   warmup forward k                  send its output + recv the input of forward k + 1
//                                     (+ the output gradient of backward 0 after the last warmup forward)
//   steady forward W + i, backward i  send both + recv forward W + i + 1's input and backward i + 1's gradient
//   cooldown backward k               send its gradient + recv backward k + 1's
// check_schedule proves every table of p 2..8, v 2..4, M up to 4p deadlock-free (tests/unit/test_schedules.cpp).
#include "parallel/schedule.h"

namespace nextron {

ScheduleTable schedule_table_interleaved(const ScheduleSpec& spec) {
  const int p = spec.pp, v = spec.vpp, total = spec.microbatches * v;
  ScheduleTable table(p);
  for (int r = 0; r < p; ++r) {
    const int warmup = spec.microbatches == p ? total : std::min((p - r - 1) * 2 + (v - 1) * p, total);
    std::vector<Action>& out = table[r];
    auto exchange = [&](std::vector<Transfer> transfers) {
      if (!transfers.empty()) out.push_back({ActionKind::communicate, 0, 0, std::move(transfers)});
    };
    auto add = [&](std::vector<Transfer>& into, const std::vector<Transfer>& more) {
      into.insert(into.end(), more.begin(), more.end());
    };
    exchange(receives_of(spec, r, forward_action(spec, 0)));
    for (int k = 0; k < warmup; ++k) {
      const Action f = forward_action(spec, k);
      out.push_back(f);
      std::vector<Transfer> t = sends_of(spec, r, f);
      if (k + 1 < total) add(t, receives_of(spec, r, forward_action(spec, k + 1)));
      if (k + 1 == warmup) add(t, receives_of(spec, r, backward_action(spec, 0)));
      exchange(std::move(t));
    }
    for (int i = 0; i < total - warmup; ++i) {
      const Action f = forward_action(spec, warmup + i), b = backward_action(spec, i);
      out.push_back(f);
      out.push_back(b);
      std::vector<Transfer> t = sends_of(spec, r, f);
      add(t, sends_of(spec, r, b));
      if (warmup + i + 1 < total) add(t, receives_of(spec, r, forward_action(spec, warmup + i + 1)));
      if (i + 1 < total) add(t, receives_of(spec, r, backward_action(spec, i + 1)));
      exchange(std::move(t));
    }
    for (int k = total - warmup; k < total; ++k) {
      const Action b = backward_action(spec, k);
      out.push_back(b);
      std::vector<Transfer> t = sends_of(spec, r, b);
      if (k + 1 < total) add(t, receives_of(spec, r, backward_action(spec, k + 1)));
      exchange(std::move(t));
    }
  }
  return table;
}

}  // namespace nextron
