// The single-process training loop: micro-batches with gradient accumulation, global-norm clipping, AdamW with
// a warmup + decay schedule, periodic validation, metrics, and atomic checkpoints that resume bit-identically.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>

#include "data/sampler.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "train/options.h"

namespace nextron {

struct StepRecord {
  int64_t step = 0;                            // optimizer steps completed after this one
  double loss = 0, lm_loss = 0, aux_loss = 0;  // means over the step's micro-batches
  double grad_norm = 0;                        // before clipping
  double lr = 0;
  int64_t tokens = 0;
  double seconds = 0;
};

class Trainer {
 public:
  // Training sample `index` of the global stream: seq_len + 1 tokens.
  using SampleFn = std::function<void(int64_t index, int64_t* out)>;

  // Builds the model (random init or HF weights), the data stream and the optimizer, and resumes from a
  // checkpoint when options.resume says so. `source` replaces options.data as the training stream (tests feed
  // fixed batches that way); validation is then unavailable.
  explicit Trainer(const TrainOptions& options, SampleFn source = {});
  ~Trainer();

  StepRecord step();              // one optimizer step
  double validate();              // mean loss over eval_iters validation micro-batches
  std::string save_checkpoint();  // returns the checkpoint directory
  void export_hf(const std::string& dir) const;
  void run();  // the whole loop with logging, validation, checkpoints and export; stops cleanly on SIGINT/SIGTERM

  Model& model() { return *model_; }
  const TrainOptions& options() const { return opt_; }
  int64_t steps_done() const { return step_; }
  int64_t data_position() const { return position_; }

 private:
  void resume_from(const std::string& dir);

  TrainOptions opt_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<SampleStream> stream_;
  SampleFn sample_;
  std::unique_ptr<AdamW> adam_;
  std::unique_ptr<LrSchedule> schedule_;
  int64_t step_ = 0;
  int64_t position_ = 0;  // next global training sample
  int64_t consumed_tokens_ = 0;
  std::vector<int64_t> rows_, ids_, targets_;
};

}  // namespace nextron
