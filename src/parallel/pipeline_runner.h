// Runs one optimizer step's forward and backward passes on this pipeline rank's model chunks by a schedule table
// (parallel/schedule.h): the table says which micro-batch runs forward or backward on which chunk and which
// activations and gradients cross to the neighbours at each point; the runner keeps one activation record per
// micro-batch in flight (ModelActivations, reused across steps), fills the received tensors into them and sends from
// them. At PP 1 the table is forward m, backward m for each micro-batch: today's gradient accumulation loop.
//
// The router statistics travel with the tensors (see comm/pipeline_p2p.h); their row count needs no message: a
// stage's input has passed (MoE layers before it) x B x S rows, and the final count is (MoE layers) x B x S x DP
// (the last stage sums the statistics over the data-parallel group).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "comm/pipeline_p2p.h"
#include "model/model.h"
#include "parallel/schedule.h"

namespace nextron {

// Micro-batch m's tokens: (B, S) ids and aligned targets, valid until the call that asked for them returns.
struct MicroBatchTokens {
  const int64_t* ids = nullptr;
  const int64_t* targets = nullptr;
};

class PipelineRunner {
 public:
  // chunks[c]: the model of chunk c, virtual stage c * PP + pp_rank (not owned). p2p: the pipeline group over the
  // models' memory. dp_size: the data-parallel size of the models' loss (comms.data_parallel).
  PipelineRunner(std::vector<Model*> chunks, PipelineP2P& p2p, int dp_size);

  // One step of spec.microbatches micro-batches of B x S tokens; every gradient is scaled by loss_scale. tokens(m)
  // is called when micro-batch m enters the first virtual stage or is scored on the last. Returns the losses of
  // every micro-batch, in order, where this rank holds the last virtual stage; empty elsewhere.
  std::vector<LossValues> run(const ScheduleSpec& spec, const std::function<MicroBatchTokens(int m)>& tokens, int64_t B,
                              int64_t S, float loss_scale);
  // Forward only (validation): the micro-batches one after another through the virtual stages in model order (no
  // activation is kept). Returns the losses as run() does.
  std::vector<LossValues> evaluate(int microbatches, const std::function<MicroBatchTokens(int m)>& tokens, int64_t B,
                                   int64_t S);
  // Seconds of the last run() spent in exchanges (waiting for the neighbours and moving data) and in all.
  double exchange_seconds() const { return exchange_seconds_; }
  double run_seconds() const { return run_seconds_; }
  // The most activation records alive at once during the last run() (the schedule's in-flight bound).
  int peak_records() const { return peak_; }
  // Records allocated so far (kept for reuse).
  int records_allocated() const { return static_cast<int>(pool_.size()); }

 private:
  ModelActivations& acquire(int m, int c);
  ModelActivations& record(int m, int c);
  void release(int m, int c);
  void communicate(const Action& action, int64_t B, int64_t S);
  // The messages of one activation or gradient transfer (with the router statistics), filling the record's
  // received tensors' shapes first.
  void add_messages(const Transfer& t, int64_t B, int64_t S, std::vector<PipeMessage>& out);
  // Rows of the router statistics at chunk c's input, and at the end of the model (summed over DP).
  double rows_before(int c, int64_t N) const;
  double final_rows(int64_t N) const;

  std::vector<Model*> chunks_;
  PipelineP2P& p2p_;
  int dp_size_;
  ScheduleSpec spec_;
  ScheduleTable table_;
  std::vector<std::unique_ptr<ModelActivations>> pool_;
  std::vector<ModelActivations*> free_;
  std::map<std::pair<int, int>, ModelActivations*> live_;  // (micro-batch, chunk) -> its record
  int peak_ = 0;
  double exchange_seconds_ = 0, run_seconds_ = 0;
};

}  // namespace nextron
