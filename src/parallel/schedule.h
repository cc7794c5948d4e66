// Pipeline schedules as data: one function produces, for every pipeline rank, the list of actions it runs in one
// optimizer step (forward or backward of micro-batch m on model chunk c, and the batched exchanges of activations
// and gradients with its neighbours), and the runner (parallel/pipeline_runner.h) executes the list. Because the
// table is data, it is checked without any process: every micro-batch's forward precedes its backward, every send
// has its receive, the exchanges complete under rendezvous semantics (no deadlock), and the activation records in
// flight never exceed the schedule's bound (tests/unit/test_schedules.cpp; check_schedule also runs at start-up).
//
// Virtual stages: the model's layers are cut into p * v virtual stages; rank r holds chunks c = 0..v-1, chunk c
// being virtual stage c * p + r (Megatron's assignment). An activation goes from virtual stage s to s + 1: from
// rank r's chunk c to rank r + 1's chunk c, and from rank p - 1's chunk c to rank 0's chunk c + 1; gradients go back.
//
// Schedules (Megatron-LM's, Narayanan et al. 2021):
//   1F1B (v = 1, schedule_1f1b.cpp): warmup forwards, then one forward one backward, then cooldown backwards.
//   Interleaved 1F1B (v > 1, schedule_interleaved.cpp): the same over p * v virtual stages, micro-batches in groups
//   of p per chunk, so the bubble shrinks by v.
#pragma once

#include <string>
#include <vector>

namespace nextron {

// What a pipeline schedule is asked to run.
struct ScheduleSpec {
  int pp = 1;            // pipeline ranks p
  int vpp = 1;           // model chunks per rank v (virtual pipeline stages); 1 = plain 1F1B
  int microbatches = 1;  // M micro-batches per optimizer step (gradient accumulation)
  // Throws nextron::Error naming the problem and the fix: sizes below 1; for v > 1, PP < 2 or M not a multiple of p
  // (Megatron's rule for the interleaved schedule).
  void validate() const;
};

enum class TransferKind { activation, gradient };  // forward activation (to the next virtual stage) / its gradient

// One point-to-point message as seen by one side.
struct Transfer {
  bool send = true;
  TransferKind kind = TransferKind::activation;
  int peer = 0;  // the other pipeline rank
  int microbatch = 0;
  // The chunk ON THIS RANK the tensor belongs to: a sent activation is that chunk's output, a received one its
  // input; a sent gradient is the gradient of the chunk's input, a received one of its output.
  int chunk = 0;
  bool operator==(const Transfer&) const = default;
};

enum class ActionKind { forward, backward, communicate };

struct Action {
  ActionKind kind = ActionKind::forward;
  int microbatch = 0;               // forward / backward
  int chunk = 0;                    // forward / backward
  std::vector<Transfer> transfers;  // communicate: posted together and completed together (one batched exchange)
  // Megatron's name of a communicate action from what it holds ("send_forward_recv_backward", ...); "forward m3 c1"
  // / "backward m3 c1" for compute.
  std::string name() const;
};

using ScheduleTable = std::vector<std::vector<Action>>;  // [pipeline rank] -> its actions, in order

// The table of `spec` (validated first): 1F1B when vpp == 1, interleaved when vpp > 1. At pp == 1: forward m,
// backward m for each micro-batch, no communication (plain gradient accumulation).
ScheduleTable schedule_table(const ScheduleSpec& spec);
ScheduleTable schedule_table_1f1b(const ScheduleSpec& spec);
ScheduleTable schedule_table_interleaved(const ScheduleSpec& spec);

// Forward k of Megatron's interleaved order on any rank: micro-batch (k / (p v)) p + k % p on chunk (k % (p v)) / p;
// backward k runs the same micro-batch on chunk v - 1 - (k % (p v)) / p. At v = 1: micro-batch k on chunk 0.
Action forward_action(const ScheduleSpec& spec, int k);
Action backward_action(const ScheduleSpec& spec, int k);
// The messages compute action `a` of `rank` needs before it (receives) or produces after it (sends).
std::vector<Transfer> receives_of(const ScheduleSpec& spec, int rank, const Action& a);
std::vector<Transfer> sends_of(const ScheduleSpec& spec, int rank, const Action& a);

// Throws nextron::Error with the first violation: a (micro-batch, chunk) not forwarded and backwarded exactly once
// (forward first); a compute action whose input was not received before it; a transfer to the wrong peer or chunk;
// a send without its receive (matched per ordered pair of ranks and kind, in posting order); or a deadlock when
// the exchanges run with rendezvous semantics (an exchange completes only when each of its messages' peers has
// posted the matching one), naming the blocked ranks and actions.
void check_schedule(const ScheduleSpec& spec, const ScheduleTable& table);

// The most (micro-batch, chunk) activation records alive at once on `rank` (forwarded, not yet backwarded).
int max_in_flight(const ScheduleTable& table, int rank);
// The same for the records of one chunk (the runner keeps one pool of records per chunk).
int max_in_flight(const ScheduleTable& table, int rank, int chunk);
// The most input gradients `rank` holds at once waiting to be sent back (the pipeline runner's send buffers): each
// backward of a chunk after the first virtual stage (all but rank 0's chunk 0) produces one, the exchange that sends
// it frees it.
int max_gradients_unsent(const ScheduleTable& table, int rank);
// The schedule's bound: 1F1B min(p - r, M); interleaved min(warmup + 1, M v) with Megatron's warmup
// (p - r - 1) 2 + (v - 1) p, or all M v forwards first when M == p.
int in_flight_bound(const ScheduleSpec& spec, int rank);

// The ideal bubble fraction (idle time over step time, equal stages, free communication): (p - 1) / (M + p - 1)
// for 1F1B, (p - 1) / (v M + p - 1) interleaved.
double ideal_bubble_fraction(const ScheduleSpec& spec);
// The bubble fraction of the table itself: every rank runs its compute actions in order, a forward of one chunk
// taking fwd / v and a backward bwd / v, each starting when its rank is free and its input has been produced
// (communication free); the result is 1 - M (fwd + bwd) / makespan (every rank is busy M (fwd + bwd)).
double simulated_bubble_fraction(const ScheduleSpec& spec, const ScheduleTable& table, double fwd, double bwd);

}  // namespace nextron
