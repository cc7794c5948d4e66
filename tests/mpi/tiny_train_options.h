// One optimizer step of the tiny model (tiny_model.h) on one thread, no checkpoint to resume, no progress line: the
// options the communication-volume tests (test_comm_volume.cpp, test_planner_volume.cpp) start from before they set
// their layout, so both count the bytes of the same step.
#pragma once

#include <cstdint>

#include "tiny_model.h"
#include "train/trainer.h"

namespace nextron::test {

inline TrainOptions tiny_step_options(int64_t seq_len, int64_t global_batch, int64_t micro_batch) {
  TrainOptions o;
  o.model_config = tiny_config_path();
  o.seq_len = seq_len;
  o.micro_batch = micro_batch;
  o.global_batch = global_batch;
  o.train_steps = 1;
  o.lr.lr = 1e-3;
  o.lr.warmup_steps = 1;
  o.clip_grad = 1.0;
  o.resume = "none";
  o.progress = false;
  o.threads = 1;
  return o;
}

}  // namespace nextron::test
