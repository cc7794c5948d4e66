// Everything a training run is configured by (nextron-train's options; see apps/train.cpp for the flags).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "data/sampler.h"
#include "model/recompute.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "parallel/layout.h"

namespace nextron {

// Default parallel sizes of a run: all 1, with ETP 0 (resolved to TP).
inline ParallelSizes follow_tp_sizes() {
  ParallelSizes s;
  s.etp = 0;
  return s;
}

struct TrainOptions {
  // Model: an HF config.json to start from random weights, or an HF checkpoint directory to start from.
  std::string model_config;
  std::string init_from;
  uint64_t init_seed = 1234;
  double initializer_range = 0.02;

  // Data.
  std::vector<DatasetSpec> data;
  int64_t seq_len = 512;
  double valid_fraction = 0.01;
  uint64_t data_seed = 1234;

  // Parallel layout (mpirun -np world): TP, PP, CP, EP, ETP sizes; DP is derived. etp 0 follows TP.
  ParallelSizes parallel = follow_tp_sizes();  // etp 0: experts follow TP (Megatron's default)
  bool sequence_parallel = false;
  // --moe-router-force-load-balancing: every token's K experts are assigned round-robin ((n K + k) mod E), so each
  // expert (and each EP rank) receives the same number of rows. For throughput and communication studies only: the
  // model does not learn a router.
  bool force_load_balancing = false;
  // --moe-per-layer-logging: each step, every MoE layer's tokens per expert (over the global batch) go to
  // metrics.jsonl ("kind": "expert_load") with their max/mean imbalance; costs one all-reduce of layers x E floats.
  bool moe_per_layer_logging = false;
  // --log-step-stats: every step's time split (forward/backward compute, each process group's communication, the
  // optimizer), the bytes this rank sent per group and every rank's peak memory, in metrics.jsonl ("breakdown").
  bool log_step_stats = false;
  // Token dropping (model/config.h): --moe-expert-capacity-factor (NaN: unset, dropless), --moe-token-drop-policy
  // probs|position, --moe-pad-expert-input-to-capacity.
  double expert_capacity_factor = std::numeric_limits<double>::quiet_NaN();
  std::string token_drop_policy = "probs";
  bool pad_to_capacity = false;
  int64_t vocab_divisible_by = 128;  // --make-vocab-size-divisible-by: pad the vocabulary to a multiple of this x TP
  RecomputeOptions recompute;        // --recompute-granularity / -method / -num-layers / -modules
  int64_t layers_per_virtual_stage = 0;  // --num-layers-per-virtual-pipeline-stage: sets parallel.vpp (0: unset)

  // Batches and length: global_batch = micro_batch x DP x gradient-accumulation steps (sequences per optimizer
  // step); micro_batch is per data-parallel rank.
  int64_t micro_batch = 4;
  int64_t global_batch = 4;
  int64_t train_steps = 100;

  // Optimizer.
  AdamWHyper adam;
  LrScheduleConfig lr;     // lr.decay_steps 0 means train_steps
  double clip_grad = 1.0;  // 0 disables clipping

  // Checkpoints.
  std::string save_dir;
  int64_t save_interval = 0;  // 0: only at exit
  int keep_last = 3;
  bool async_save = false;      // interval checkpoints: shards written by a background thread while training goes on
  std::string resume = "auto";  // auto | none | a checkpoint directory
  bool overwrite_save = false;  // delete save_dir's checkpoints (and its metrics.jsonl) at start-up: start over
  std::string export_hf;        // HF directory written at the end of training

  // Logging and evaluation.
  int64_t log_interval = 1;
  int64_t eval_interval = 0;  // 0: no periodic validation
  int64_t eval_iters = 4;     // micro-batches per validation
  std::string metrics_path;   // default: <save_dir>/metrics.jsonl
  double peak_tflops = 0;     // MFU denominator; 0: measure the CPU's fp32 GEMM rate at start-up
  int threads = 0;
  std::string device = "cpu";  // cpu | cuda (the backend is built by the caller: TrainBackend)
  bool deterministic = false;  // cuda: bitwise reproducible attention backward (the CPU backend always is)
  bool progress = true;

  // Samples during training (one process holding the whole model per rank: TP = PP = CP = EP = 1; the first rank
  // generates greedily and appends to SAVE/samples.jsonl every sample_interval steps and at the end).
  int64_t sample_interval = 0;            // 0: no samples
  std::string sample_prompts;             // prompt file (generate/prompts.h)
  std::string sample_tokenizer = "byte";  // byte or an HF tokenizer.json: the data's tokenizer
  int64_t sample_max_new_tokens = 64;

  // Checks every value and combination; throws nextron::Error naming the option and the fix.
  // need_data: whether --data must be given (false when a caller supplies the samples itself).
  void validate(bool need_data = true) const;
};

}  // namespace nextron
