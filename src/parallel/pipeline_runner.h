// Runs one optimizer step's forward and backward passes on this pipeline rank's model chunks by a schedule table
// (parallel/schedule.h): the table says which micro-batch runs forward or backward on which chunk and which
// activations and gradients cross to the neighbours at each point; the runner keeps one activation record per
// micro-batch in flight (ModelActivations, reused across steps, one pool per chunk so a record always holds one
// chunk's shapes: its bytes are model/activation_memory.h's formula), fills the received tensors into them and sends
// from them. At PP 1 the table is forward m, backward m for each micro-batch: today's gradient accumulation loop.
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
  // is called when micro-batch m enters the first virtual stage or is scored on the last. The losses are read
  // later (losses()), so that the step waits for the device once.
  void run(const ScheduleSpec& spec, const std::function<MicroBatchTokens(int m)>& tokens, int64_t B, int64_t S,
           float loss_scale);
  // The losses of the last run(), every micro-batch in order, where this rank holds the last virtual stage; empty
  // elsewhere. Resolves the backend's deferred reads first (no wait when they are resolved already, as after the
  // gradient norm); on a data-parallel model a collective of its data-parallel group.
  std::vector<LossValues> losses();
  // Forward only (validation): the micro-batches one after another through the virtual stages in model order (no
  // activation is kept). Returns the losses as run() does.
  std::vector<LossValues> evaluate(int microbatches, const std::function<MicroBatchTokens(int m)>& tokens, int64_t B,
                                   int64_t S);
  // Seconds of the last run() spent in exchanges (waiting for the neighbours and moving data) and in all.
  double exchange_seconds() const { return exchange_seconds_; }
  double run_seconds() const { return run_seconds_; }
  // The most activation records alive at once during the last run(), on all chunks together and on chunk c.
  int peak_records() const { return peak_; }
  int peak_records(int c) const { return chunk_peak_.at(c); }
  // Records of chunk c allocated so far (kept for reuse): its activation memory is this times one record's bytes.
  int records_allocated(int c) const { return static_cast<int>(pools_.at(c).size()); }
  // Host memory the pools' records hold outside Tensors (model/activation_memory.h record_host_bytes).
  int64_t records_host_bytes() const;
  // Send buffers allocated so far for input gradients (with their router statistics) waiting to go to the previous
  // stage: (Nl, H) + 2 (E) each. A record is free at the end of its backward; its input gradient waits here.
  int grad_buffers_allocated() const { return grad_buffers_; }

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
  std::vector<ScoreReadout> readouts_;  // (M) the last run's scores on the last virtual stage (deferred reads)
  PipelineP2P& p2p_;
  int dp_size_;
  ScheduleSpec spec_;
  ScheduleTable table_;
  std::vector<std::vector<std::unique_ptr<ModelActivations>>> pools_;  // per chunk
  std::vector<std::vector<ModelActivations*>> free_;                   // per chunk
  std::map<std::pair<int, int>, ModelActivations*> live_;              // (micro-batch, chunk) -> its record
  int peak_ = 0;
  std::vector<int> chunk_peak_, chunk_live_;
  struct GradientOut {
    Tensor grad;                 // (Nl, H) the stage input's gradient
    Tensor count_sum, prob_sum;  // (E) the final router statistics that travel with it
  };
  std::map<std::pair<int, int>, GradientOut> outbox_;  // (micro-batch, chunk) -> what its gradient send carries
  std::vector<GradientOut> spare_;                     // sent buffers, reused
  int grad_buffers_ = 0;
  double exchange_seconds_ = 0, run_seconds_ = 0;
};

}  // namespace nextron
