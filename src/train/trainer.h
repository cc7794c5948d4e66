// The training loop: micro-batches with gradient accumulation, global-norm clipping, AdamW with a warmup + decay
// schedule, periodic validation, metrics, and atomic checkpoints that resume bit-identically. On one process, or
// on every rank of an MPI job with tensor (+ sequence) and ZeRO-1 data parallelism (src/parallel): each DP rank
// reads its micro_batch rows of every global micro-batch, rank 0 logs and writes checkpoints and exports.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>

#include "comm/counting_communicator.h"
#include "data/sampler.h"
#include "generate/tokenizer.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "parallel/context.h"
#include "parallel/distributed_optimizer.h"
#include "parallel/grad_sync.h"
#include "parallel/pipeline_runner.h"
#include "parallel/schedule.h"
#include "train/options.h"

namespace nextron {

class SaveDirLock;

// --log-step-stats: where one step's time went and what it sent, on this rank, and every rank's peak memory.
struct StepStats {
  double forward_backward = 0, optimizer = 0;  // seconds of the step's two phases (the optimizer: gradient sync,
                                               // norm, clipping, AdamW, parameter all-gather)
  struct Group {
    std::string name;                     // tp, cp, dp, dp_cp, pp, ep, edp, world (host and device together)
    double bytes = 0, seconds = 0;        // sent by this rank (ring accounting), spent in the calls
    double forward_backward_seconds = 0;  // of which in the forward/backward phase
  };
  std::vector<Group> groups;              // the groups with more than one rank
  std::vector<double> peak_tensor_bytes;  // per world rank: the most tensor bytes live on its backend's device
  std::vector<double> max_rss_bytes;      // per world rank: the process's peak resident memory
};

// The metrics.jsonl "breakdown" of a step.
nlohmann::json to_json(const StepStats& st);

struct StepRecord {
  int64_t step = 0;                            // optimizer steps completed after this one
  double loss = 0, lm_loss = 0, aux_loss = 0;  // means over the step's micro-batches
  double grad_norm = 0;                        // before clipping
  double lr = 0;
  int64_t tokens = 0;
  double seconds = 0;
  double pipeline_bubble = -1;  // PP > 1: this rank's exchange time over its forward/backward time in the step
  // --moe-per-layer-logging: per MoE layer of the whole model (global index), its top-k assignments per expert
  // over the step's global batch (the same on every rank).
  std::vector<ExpertLoad> expert_load;
  std::optional<StepStats> stats;  // --log-step-stats
};

// The compute backend of a run (nextron-train --device): the Ops the model runs on, and for a multi-rank run on a
// device, how to make a device communicator (NCCL) from an MPI one. Empty: the CPU backend over MPI.
struct TrainBackend {
  std::shared_ptr<Ops> ops;
  std::function<std::unique_ptr<Communicator>(Communicator& mpi)> device_comm;
};

class Trainer {
 public:
  // Training sample `index` of the global stream: seq_len + 1 tokens.
  using SampleFn = std::function<void(int64_t index, int64_t* out)>;

  // Builds the model (random init or HF weights), the data stream and the optimizer, and resumes from a
  // checkpoint when options.resume says so. `source` replaces options.data as the training stream (tests feed
  // fixed batches that way); validation is then unavailable. `world`: the job's communicator for a parallel run
  // (collective: every rank constructs its Trainer), nullptr for one process.
  explicit Trainer(const TrainOptions& options, SampleFn source = {}, Communicator* world = nullptr,
                   TrainBackend backend = {});
  ~Trainer();

  StepRecord step();  // one optimizer step
  double validate();  // mean loss over eval_iters validation micro-batches
  // Saves a checkpoint of the current step (collective) and returns its directory. background: only the host copies
  // are made and the directory set up now; a background thread writes this rank's shard while training goes on, and
  // finish_background_save completes the checkpoint later. A pending background save is completed first.
  std::string save_checkpoint(bool background = false);
  // Completes a pending background save (collective): with `wait`, once this rank's writer is done; otherwise only if
  // every rank's writer is already done. Returns the checkpoint's directory, or "" when nothing was completed.
  std::string finish_background_save(bool wait);
  void export_hf(const std::string& dir);  // collective; rank 0 writes
  void run();  // collective; the whole loop with logging, validation, checkpoints and export; stops cleanly on
               // SIGINT/SIGTERM/SIGUSR1
  // Whether run() was stopped by SIGINT/SIGTERM/SIGUSR1 before --train-steps (it saved, and skipped --export-hf).
  bool stopped_early() const { return stopped_early_; }

  // This rank's first model chunk (the whole model on one process; a pipeline stage under PP).
  Model& model() { return *chunks_.front().model; }
  const ModelConfig& config() const { return chunks_.front().model->config(); }
  // Whole-model (single-device layout) parameters and the gradients of the last step as AdamW used them (summed
  // over DP, clipped), gathered from every rank; collective in a parallel run.
  std::vector<float> full_params();
  std::vector<float> full_grads();
  bool is_logger() const { return !ctx_ || ctx_->rank() == 0; }
  const ParallelContext* parallel() const { return ctx_.get(); }
  // The first chunk's optimizer of the dense parameters (of the routed experts: group 1 under EP).
  const DistributedOptimizer& optimizer(int group = 0) const { return *chunks_.front().opts.at(group); }
  // The runner of the steps' forward and backward passes (its activation records: model/activation_memory.h), and
  // this rank's model chunks (virtual stages c * PP + pp_rank).
  PipelineRunner& pipeline_runner() { return *runner_; }
  int num_chunks() const { return static_cast<int>(chunks_.size()); }
  Model& chunk_model(int c) { return *chunks_.at(c).model; }
  const TrainOptions& options() const { return opt_; }
  int64_t steps_done() const { return step_; }
  int64_t data_position() const { return position_; }

 private:
  void resume_from(const std::string& dir);
  // Rank 0, at start-up: checks every output path, locks --save, removes dead runs' leftovers and refuses to mix
  // a new run into a directory holding an old one's checkpoints (or clears them: --overwrite-save).
  void prepare_outputs();
  // --sample-interval: the first rank generates greedily from the sample prompts and appends one JSON line per prompt
  // to SAVE/samples.jsonl.
  void write_samples();
  std::unique_ptr<Tokenizer> sample_tokenizer_;   // rank 0
  std::vector<std::vector<int64_t>> sample_ids_;  // rank 0: the prompts' ids
  std::vector<std::string> sample_texts_;         // rank 0: the prompts as given (empty for id prompts)
  // The whole model's parameter table (the layout of checkpoints, HF export and full_params()).
  const ParamTable& full_table() const;
  // The whole model's flat buffer from one local buffer per chunk (one process: the buffer itself); collective.
  std::vector<float> gather_chunks(const std::vector<std::vector<float>>& locals) const;
  // Chunk c's map between the whole (unpadded) model and its local buffers.
  const TpShardMap& shard_map(int c) const;
  int dp_size() const { return ctx_ ? ctx_->layout().dp() : 1; }
  int dp_rank() const { return ctx_ ? ctx_->dp_rank() : 0; }
  int cp_size() const { return ctx_ ? ctx_->layout().cp() : 1; }
  int cp_rank() const { return ctx_ ? ctx_->cp_rank() : 0; }
  // --log-step-stats: the world wrapped so that every group counts and times its calls; their tallies so far.
  std::unique_ptr<CountingCommunicator> counting_world_;
  std::vector<StepStats::Group> group_tallies() const;
  // The step's StepStats from the tallies at its start and after its forward/backward phase.
  StepStats step_stats(const std::vector<StepStats::Group>& before, const std::vector<StepStats::Group>& mid,
                       double forward_backward, double optimizer, Device device);
  // This rank's tokens (ids_, targets_: (M, S / CP)) of the M sampled rows in rows_ ((M, S + 1)).
  MicroBatchTokens take_local_tokens(int64_t M, int64_t S);
  // Runs `body` on rank 0 only; every rank learns whether it failed and throws the same error (no rank hangs).
  void on_rank0(const std::function<void()>& body);
  // Every MoE layer's expert load of the step just run, summed over the data-parallel replicas and gathered from the
  // pipeline stages (collective).
  std::vector<ExpertLoad> gather_expert_load();

  TrainOptions opt_;
  std::unique_ptr<ParallelContext> ctx_;
  std::unique_ptr<SaveDirLock> save_lock_;  // rank 0 with --save: held for the Trainer's life
  // One model chunk of this rank (the whole model, a pipeline stage, or one of an interleaved rank's chunks) with
  // what completes its gradients and updates it.
  struct Chunk {
    std::unique_ptr<Model> model;
    std::unique_ptr<TpGradSync> tp_sync;  // TP gradient completion (parallel runs)
    // ZeRO-1 AdamW over the chunk's flat buffers: one per reduction group (the dense parameters over DP; under expert
    // parallelism a second for the routed experts over EDP).
    std::vector<std::unique_ptr<DistributedOptimizer>> opts;
  };
  std::vector<Chunk> chunks_;
  std::unique_ptr<TpShardMap> solo_map_;  // one process: the identity map but for the vocabulary padding
  ScheduleSpec schedule_spec_;
  std::unique_ptr<PipelineP2P> p2p_;
  std::unique_ptr<PipelineRunner> runner_;
  std::unique_ptr<SampleStream> stream_;
  SampleFn sample_;
  std::unique_ptr<LrSchedule> schedule_;
  int64_t step_ = 0;
  int64_t position_ = 0;  // next global training sample
  int64_t consumed_tokens_ = 0;
  double last_grad_norm_ = 0;  // of the previous step: the usual cause when a step's loss is not finite
  bool stopped_early_ = false;
  std::vector<int64_t> rows_, ids_, targets_;
  struct PendingSave;
  std::unique_ptr<PendingSave> pending_save_;  // a background save not completed yet
};

}  // namespace nextron
