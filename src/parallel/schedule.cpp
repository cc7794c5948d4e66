#include "parallel/schedule.h"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include "core/error.h"

namespace nextron {

void ScheduleSpec::validate() const {
  NEXTRON_CHECK(pp >= 1, "pipeline-model-parallel-size ", pp, " must be >= 1");
  NEXTRON_CHECK(vpp >= 1, "virtual-pipeline-model-parallel-size ", vpp, " must be >= 1 (1: no interleaving)");
  NEXTRON_CHECK(microbatches >= 1, "a step needs at least one micro-batch, got ", microbatches,
                ": --global-batch-size must be at least --micro-batch-size x data-parallel size");
  if (vpp > 1) {
    NEXTRON_CHECK(pp >= 2, "the interleaved schedule (VPP ", vpp,
                  ") needs at least 2 pipeline ranks: raise --pipeline-model-parallel-size or unset VPP");
    NEXTRON_CHECK(microbatches % pp == 0, "--global-batch-size / (micro-batch x DP) = ", microbatches,
                  " micro-batches per step must be a multiple of the pipeline size ", pp,
                  " for the interleaved schedule (it runs them in groups of PP per chunk): choose a global batch of a "
                  "multiple of ",
                  pp, " micro-batches, or VPP 1");
  }
}

namespace {

const char* kind_word(TransferKind k) { return k == TransferKind::activation ? "activation" : "gradient"; }

std::string describe(const Transfer& t) {
  return detail::concat(t.send ? "send " : "receive ", kind_word(t.kind), " m", t.microbatch, " c", t.chunk,
                        t.send ? " to rank " : " from rank ", t.peer);
}

}  // namespace

std::string Action::name() const {
  if (kind == ActionKind::forward) return detail::concat("forward m", microbatch, " c", chunk);
  if (kind == ActionKind::backward) return detail::concat("backward m", microbatch, " c", chunk);
  bool send_fwd = false, send_bwd = false, recv_fwd = false, recv_bwd = false;
  for (const Transfer& t : transfers) {
    const bool act = t.kind == TransferKind::activation;
    (t.send ? (act ? send_fwd : send_bwd) : (act ? recv_fwd : recv_bwd)) = true;
  }
  // Megatron's word order: sends before receives, forward before backward ("send_forward_backward_recv_forward").
  std::string send = send_fwd && send_bwd ? "forward_backward" : send_fwd ? "forward" : send_bwd ? "backward" : "";
  std::string recv = recv_fwd && recv_bwd ? "forward_backward" : recv_fwd ? "forward" : recv_bwd ? "backward" : "";
  if (send.empty() && recv.empty()) return "communicate (nothing)";
  if (recv.empty()) return "send_" + send;
  if (send.empty()) return "recv_" + recv;
  return "send_" + send + "_recv_" + recv;
}

Action forward_action(const ScheduleSpec& spec, int k) {
  const int p = spec.pp, v = spec.vpp, group = k % (p * v);
  return {ActionKind::forward, (k / (p * v)) * p + group % p, group / p, {}};
}

Action backward_action(const ScheduleSpec& spec, int k) {
  Action a = forward_action(spec, k);
  a.kind = ActionKind::backward;
  a.chunk = spec.vpp - 1 - a.chunk;
  return a;
}

std::vector<Transfer> receives_of(const ScheduleSpec& spec, int rank, const Action& a) {
  const int p = spec.pp, last = p * spec.vpp - 1, stage = a.chunk * p + rank;
  if (a.kind == ActionKind::forward && stage > 0)
    return {{false, TransferKind::activation, (rank + p - 1) % p, a.microbatch, a.chunk}};
  if (a.kind == ActionKind::backward && stage < last)
    return {{false, TransferKind::gradient, (rank + 1) % p, a.microbatch, a.chunk}};
  return {};
}

std::vector<Transfer> sends_of(const ScheduleSpec& spec, int rank, const Action& a) {
  const int p = spec.pp, last = p * spec.vpp - 1, stage = a.chunk * p + rank;
  if (a.kind == ActionKind::forward && stage < last)
    return {{true, TransferKind::activation, (rank + 1) % p, a.microbatch, a.chunk}};
  if (a.kind == ActionKind::backward && stage > 0)
    return {{true, TransferKind::gradient, (rank + p - 1) % p, a.microbatch, a.chunk}};
  return {};
}

ScheduleTable schedule_table(const ScheduleSpec& spec) {
  spec.validate();
  return spec.vpp == 1 ? schedule_table_1f1b(spec) : schedule_table_interleaved(spec);
}

void check_schedule(const ScheduleSpec& spec, const ScheduleTable& table) {
  spec.validate();
  const int p = spec.pp, v = spec.vpp, M = spec.microbatches, last = p * v - 1;
  NEXTRON_CHECK(static_cast<int>(table.size()) == p, "schedule: ", table.size(), " ranks in a table for PP ", p);
  // Channel (sender, receiver, kind) -> the messages in posting order, as (microbatch, chunk, rank, action index).
  using Posted = std::vector<std::tuple<int, int, int, size_t>>;
  std::map<std::tuple<int, int, int>, Posted> sent, received;
  for (int r = 0; r < p; ++r) {
    std::set<std::pair<int, int>> forwarded, backwarded, got_input, got_grad, sent_act, sent_grad;
    for (size_t i = 0; i < table[r].size(); ++i) {
      const Action& a = table[r][i];
      const std::string where = detail::concat("schedule: rank ", r, " action ", i, " (", a.name(), "): ");
      if (a.kind != ActionKind::communicate) {
        NEXTRON_CHECK(a.microbatch >= 0 && a.microbatch < M && a.chunk >= 0 && a.chunk < v, where,
                      "micro-batch or chunk out of range");
        const std::pair<int, int> key{a.microbatch, a.chunk};
        const int stage = a.chunk * p + r;
        if (a.kind == ActionKind::forward) {
          NEXTRON_CHECK(!forwarded.count(key), where, "forwarded twice");
          NEXTRON_CHECK(stage == 0 || got_input.count(key), where, "its input activation was not received before it");
          forwarded.insert(key);
        } else {
          NEXTRON_CHECK(forwarded.count(key), where, "backward before its forward");
          NEXTRON_CHECK(!backwarded.count(key), where, "backwarded twice");
          NEXTRON_CHECK(stage == last || got_grad.count(key), where,
                        "the gradient of its output was not received before it");
          backwarded.insert(key);
        }
        continue;
      }
      for (const Transfer& t : a.transfers) {
        const std::string what = where + describe(t) + ": ";
        NEXTRON_CHECK(t.microbatch >= 0 && t.microbatch < M && t.chunk >= 0 && t.chunk < v, what,
                      "micro-batch or chunk out of range");
        const std::pair<int, int> key{t.microbatch, t.chunk};
        const int stage = t.chunk * p + r;
        const bool act = t.kind == TransferKind::activation;
        // Activations flow to the next virtual stage, gradients to the previous one.
        const bool to_next = act == t.send;
        NEXTRON_CHECK(to_next ? stage < last : stage > 0, what, "virtual stage ", stage, " has no ",
                      to_next ? "next" : "previous", " stage");
        NEXTRON_CHECK(t.peer == (to_next ? (r + 1) % p : (r + p - 1) % p), what, "the wrong peer (the ",
                      to_next ? "next" : "previous", " rank is ", to_next ? (r + 1) % p : (r + p - 1) % p, ")");
        if (t.send) {
          NEXTRON_CHECK(act ? forwarded.count(key) : backwarded.count(key), what, "sent before it was computed");
          NEXTRON_CHECK((act ? sent_act : sent_grad).insert(key).second, what, "sent twice");
        } else {
          NEXTRON_CHECK((act ? got_input : got_grad).insert(key).second, what, "received twice");
        }
        // The chunk as the peer names it (crossing from rank p-1 to rank 0 moves to the next chunk).
        int chunk_on_sender = t.chunk;
        if (!t.send && act && r == 0) chunk_on_sender = t.chunk - 1;
        if (!t.send && !act && r == p - 1) chunk_on_sender = t.chunk + 1;
        const int sender = t.send ? r : t.peer, receiver = t.send ? t.peer : r;
        auto& list = (t.send ? sent : received)[{sender, receiver, static_cast<int>(t.kind)}];
        list.emplace_back(t.microbatch, chunk_on_sender, r, i);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < v; ++c) {
        const std::pair<int, int> key{m, c};
        const int stage = c * p + r;
        const std::string mb = detail::concat("schedule: rank ", r, " micro-batch ", m, " chunk ", c, ": ");
        NEXTRON_CHECK(forwarded.count(key) && backwarded.count(key), mb, "not forwarded and backwarded");
        NEXTRON_CHECK(stage == last || sent_act.count(key), mb, "its output activation is never sent");
        NEXTRON_CHECK(stage == 0 || sent_grad.count(key), mb, "the gradient of its input is never sent");
      }
  }
  // Every send meets its receive: the same number per channel, matched in posting order.
  std::map<std::tuple<int, size_t, int>, std::pair<int, size_t>> partner;       // (rank, action, slot) -> peer action
  std::map<std::pair<int, size_t>, std::vector<std::pair<int, size_t>>> needs;  // action -> the peer actions
  for (const auto& [channel, sends] : sent) {
    const auto& [src, dst, kind] = channel;
    const Posted& recvs = received[channel];
    const std::string ch = detail::concat("schedule: ", kind_word(static_cast<TransferKind>(kind)), "s from rank ", src,
                                          " to rank ", dst, ": ");
    NEXTRON_CHECK(sends.size() == recvs.size(), ch, sends.size(), " sent but ", recvs.size(), " received");
    for (size_t k = 0; k < sends.size(); ++k) {
      const auto& [sm, sc, sr, si] = sends[k];
      const auto& [rm, rc, rr, ri] = recvs[k];
      NEXTRON_CHECK(sm == rm && sc == rc, ch, "message ", k, " is sent as micro-batch ", sm, " chunk ", sc,
                    " but received as micro-batch ", rm, " chunk ", rc, " (the ranks post them in different orders)");
      needs[{sr, si}].push_back({rr, ri});
      needs[{rr, ri}].push_back({sr, si});
    }
  }
  for (const auto& [channel, recvs] : received)
    NEXTRON_CHECK(sent.count(channel) || recvs.empty(), "schedule: rank ", std::get<1>(channel), " receives ",
                  recvs.size(), " messages that rank ", std::get<0>(channel), " never sends");
  // Rendezvous: an exchange completes once every peer action it pairs with has been reached (posted or done).
  std::vector<size_t> pos(p, 0);
  for (bool progress = true; progress;) {
    progress = false;
    for (int r = 0; r < p; ++r) {
      while (pos[r] < table[r].size()) {
        const auto it = needs.find({r, pos[r]});
        bool ready = true;
        if (it != needs.end())
          for (const auto& [peer, index] : it->second) ready = ready && pos[peer] >= index;
        if (!ready) break;
        ++pos[r];
        progress = true;
      }
    }
  }
  std::string blocked;
  for (int r = 0; r < p; ++r)
    if (pos[r] < table[r].size())
      blocked += detail::concat(blocked.empty() ? "" : "; ", "rank ", r, " in action ", pos[r], " (",
                                table[r][pos[r]].name(), ")");
  NEXTRON_CHECK(blocked.empty(), "schedule: deadlock under rendezvous semantics: ", blocked);
}

namespace {
int most_in_flight(const ScheduleTable& table, int rank, int chunk) {
  int live = 0, most = 0;
  for (const Action& a : table.at(rank)) {
    if (chunk >= 0 && a.chunk != chunk) continue;
    if (a.kind == ActionKind::forward) most = std::max(most, ++live);
    if (a.kind == ActionKind::backward) --live;
  }
  return most;
}
}  // namespace

int max_in_flight(const ScheduleTable& table, int rank) { return most_in_flight(table, rank, -1); }
int max_in_flight(const ScheduleTable& table, int rank, int chunk) { return most_in_flight(table, rank, chunk); }

int max_gradients_unsent(const ScheduleTable& table, int rank) {
  int unsent = 0, most = 0;
  for (const Action& a : table.at(static_cast<size_t>(rank))) {
    if (a.kind == ActionKind::backward && !(rank == 0 && a.chunk == 0))
      most = std::max(most, ++unsent);
    else if (a.kind == ActionKind::communicate)
      for (const Transfer& t : a.transfers) unsent -= t.send && t.kind == TransferKind::gradient;
  }
  return most;
}

int in_flight_bound(const ScheduleSpec& spec, int rank) {
  const int p = spec.pp, v = spec.vpp, M = spec.microbatches, total = M * v;
  if (v == 1) return std::min(p - rank, M);
  if (M == p) return total;
  return std::min((p - rank - 1) * 2 + (v - 1) * p + 1, total);
}

double ideal_bubble_fraction(const ScheduleSpec& spec) {
  return static_cast<double>(spec.pp - 1) / static_cast<double>(spec.vpp * spec.microbatches + spec.pp - 1);
}

double simulated_bubble_fraction(const ScheduleSpec& spec, const ScheduleTable& table, double fwd, double bwd) {
  const int p = spec.pp, v = spec.vpp, last = p * v - 1;
  // Finish times of (forward?, micro-batch, virtual stage).
  std::map<std::tuple<bool, int, int>, double> finished;
  std::vector<size_t> pos(p, 0);
  std::vector<double> free_at(p, 0.0);
  double makespan = 0;
  for (bool progress = true; progress;) {
    progress = false;
    for (int r = 0; r < p; ++r) {
      while (pos[r] < table[r].size()) {
        const Action& a = table[r][pos[r]];
        if (a.kind == ActionKind::communicate) {
          ++pos[r];
          continue;
        }
        const bool is_fwd = a.kind == ActionKind::forward;
        const int stage = a.chunk * p + r;
        // A forward needs the previous stage's forward; a backward the next stage's backward (the last stage: its own
        // forward).
        std::tuple<bool, int, int> dep{is_fwd, a.microbatch, is_fwd ? stage - 1 : stage + 1};
        if (!is_fwd && stage == last) dep = {true, a.microbatch, stage};
        double ready = 0;
        if (is_fwd ? stage > 0 : true) {
          const auto it = finished.find(dep);
          if (it == finished.end()) break;
          ready = it->second;
        }
        const double start = std::max(free_at[r], ready), end = start + (is_fwd ? fwd : bwd) / v;
        finished[{is_fwd, a.microbatch, stage}] = end;
        free_at[r] = end;
        makespan = std::max(makespan, end);
        ++pos[r];
        progress = true;
      }
    }
  }
  for (int r = 0; r < p; ++r)
    NEXTRON_CHECK(pos[r] == table[r].size(), "schedule: rank ", r, " waits for an input that is never computed");
  return 1.0 - spec.microbatches * (fwd + bwd) / makespan;
}

}  // namespace nextron
