// 1F1B (PipeDream-flush, Megatron's forward_backward_pipelining_without_interleaving) on rank r of p with M
// micro-batches: W = min(p - r - 1, M) warmup forwards fill the pipeline, then M - W steady iterations of one
// forward and one backward, then W cooldown backwards. At most p - r micro-batches are in flight on rank r.
//
// Between two compute actions there is one exchange: the sends of the compute just done and the receive the next
// one needs. That yields exactly Megatron's calls: recv_forward / send_forward in warmup,
// send_forward_recv_backward and send_backward_recv_forward in the steady state, recv_backward / send_backward in
// cooldown, and neighbours' exchanges pair up so that none waits on another (check_schedule proves it).
#include <algorithm>

#include "parallel/schedule.h"

namespace nextron {

ScheduleTable schedule_table_1f1b(const ScheduleSpec& spec) {
  const int p = spec.pp, M = spec.microbatches;
  ScheduleTable table(p);
  for (int r = 0; r < p; ++r) {
    const int warmup = std::min(p - r - 1, M);
    std::vector<Action> compute;
    for (int m = 0; m < warmup; ++m) compute.push_back(forward_action(spec, m));
    for (int i = 0; i < M - warmup; ++i) {
      compute.push_back(forward_action(spec, warmup + i));
      compute.push_back(backward_action(spec, i));
    }
    for (int m = M - warmup; m < M; ++m) compute.push_back(backward_action(spec, m));
    std::vector<Action>& out = table[r];
    std::vector<Transfer> pending;  // the sends of the previous compute action
    for (const Action& a : compute) {
      Action exchange{ActionKind::communicate, 0, 0, pending};
      for (const Transfer& t : receives_of(spec, r, a)) exchange.transfers.push_back(t);
      if (!exchange.transfers.empty()) out.push_back(exchange);
      out.push_back(a);
      pending = sends_of(spec, r, a);
    }
    if (!pending.empty()) out.push_back({ActionKind::communicate, 0, 0, pending});
  }
  return table;
}

}  // namespace nextron
