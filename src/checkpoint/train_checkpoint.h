// Training checkpoints: everything a run needs to resume bit-identically (flat parameters, AdamW moments, step,
// data position, RNG state, schedule and arguments), one directory per step:
//
//   <root>/step_<8-digit step>/  model.h5  optimizer.h5  state.json  manifest.json
//
// A save writes into the sibling `step_<N>.tmp-<pid>`, fsyncs every file, writes manifest.json (each file's size
// and XXH64 checksum) last, and only then renames the directory into place, so a crash at any moment leaves the
// previous checkpoints untouched. A checkpoint is complete only if its manifest parses and every listed file has
// the listed size and checksum; nothing else is ever resumed from. The format is in docs/formats.md ("Training
// checkpoints").
//
// The optimizer state is stored per owned range of the flat layout (the whole model for one process, a ZeRO shard
// per rank later) and loading reads any range covered by the stored files, so a run may resume with a different
// sharding. The parameter table (names, shapes, offsets) is stored with the weights for the same reason.
//
// The serial HDF5 library is not thread-safe: do not save or load while another thread uses HDF5 (e.g. a data
// loader thread reading a TokenDataset); pause it around the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "model/config.h"
#include "model/param_table.h"
#include "optim/adamw.h"

namespace nextron {

inline constexpr int64_t kTrainCheckpointFormatVersion = 1;

// What the trainer carries besides the weights and the optimizer.
struct TrainState {
  int64_t step = 0;             // optimizer steps completed
  int64_t data_position = 0;    // next global training sample (SampleStream::position())
  int64_t consumed_tokens = 0;  // training tokens consumed so far
  std::string rng_state;        // opaque to the checkpoint; must be UTF-8 text (e.g. a std::mt19937_64 written with <<)
  nlohmann::json scheduler;     // the LR schedule's configuration
  nlohmann::json args;          // the run's training arguments
};

// The optimizer state one writer owns: flat elements [range.begin, range.end), moments indexed from range.begin
// (as AdamW holds them: pass adam.exp_avg().f32()).
struct OptimizerShard {
  FlatRange range;
  const float* exp_avg = nullptr;
  const float* exp_avg_sq = nullptr;
  int64_t steps_taken = 0;
  AdamWHyper hyper;
};

// "<root>/step_<8-digit step>" (more digits past 99,999,999).
std::string train_checkpoint_dir(const std::string& root, int64_t step);

// Writes the checkpoint of `state.step` under `root` (created if needed) and returns its directory. A checkpoint of
// the same step already there is replaced (atomically where the file system supports it). Afterwards, when
// keep_last > 0, complete checkpoints of earlier steps beyond the keep_last newest (this one included) are deleted;
// keep_last == 0 keeps every checkpoint. If the save fails, its temporary directory is removed and the existing
// checkpoints are left as they were.
std::string save_train_checkpoint(const std::string& root, const ModelConfig& config, const ParamTable& table,
                                  const float* params, const OptimizerShard& optimizer, const TrainState& state,
                                  int keep_last);

// Throws a nextron::Error naming the checkpoint, the file and the problem unless `dir` is complete: manifest.json
// parses and lists model.h5, state.json and at least one optimizer file, each present with the listed size and
// checksum. Reads every byte of the checkpoint.
void verify_train_checkpoint(const std::string& dir);

// The newest complete checkpoint (by step) under `root`, or nothing (also when root does not exist). Temporary
// `.tmp-*` directories and incomplete or corrupt checkpoints newer than it are skipped with a warning on stderr.
std::optional<std::string> find_latest_checkpoint(const std::string& root);

struct LoadedCheckpoint {
  TrainState state;
  int64_t steps_taken = 0;  // AdamW's step count (AdamW::set_steps_taken)
  AdamWHyper hyper;         // the hyperparameters the run was saved with (lr: the last one used)
};

// Verifies `dir` (as verify_train_checkpoint), checks that it was written for `expect_config` (an error names the
// first differing field: "checkpoint ... was trained with hidden_size 64, the model config says 128") and for
// `table`'s layout (names, shapes, offsets), then fills `params` (table.total_numel() elements) and the moments of
// flat range `range` (`exp_avg` and `exp_avg_sq` indexed from range.begin; the stored optimizer files must cover the
// range). Every problem is a nextron::Error naming the file; the outputs are only written once all checks passed.
LoadedCheckpoint load_train_checkpoint(const std::string& dir, const ModelConfig& expect_config,
                                       const ParamTable& table, float* params, FlatRange range, float* exp_avg,
                                       float* exp_avg_sq);

// The model config a verified checkpoint was trained with (its model.h5's model_config attribute).
ModelConfig read_train_checkpoint_config(const std::string& dir);

// XXH64 (seed 0) of `size` bytes: the manifest's checksum, the same value as Python's xxhash.xxh64_intdigest.
uint64_t xxh64(const void* data, size_t size);

namespace detail {
// Tests only: called by save_train_checkpoint after each stage ("model.h5", "optimizer.h5", "state.json",
// "manifest.json", all inside the temporary directory, then "renamed"); an empty function removes the hook.
void set_train_checkpoint_hook(std::function<void(const std::string& stage)> hook);
}  // namespace detail

}  // namespace nextron
