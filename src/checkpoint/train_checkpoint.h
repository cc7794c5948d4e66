// Training checkpoints: everything a run needs to resume bit-identically (parameters, AdamW moments, step, data
// position, RNG state, schedule and arguments), one directory per step, written by every rank in parallel:
//
//   <root>/step_<8-digit step>/  metadata.h5  shard_<rank, 5 digits>.h5 (one per rank)  state.json  manifest.json
//
// Each parameter and each AdamW moment is one logical tensor of the whole model (the single-device flat layout, every
// tensor row-major in its HF shape). Every rank writes only the elements it owns (its TP slice of its pipeline
// stage's tensors and its experts, from one data-parallel replica; for the moments, its ZeRO shard) into its own
// shard file, so nothing is written twice and no rank holds more than its shard. Rank 0 writes metadata.h5: the model
// config, the parameter table and the index of every shard's run groups (checkpoint/flat_runs.h). A run loading the
// checkpoint under any layout reads from each shard just the groups that intersect what it holds.
//
// A save writes into the sibling `step_<N>.tmp-<pid of rank 0>`, fsyncs every file, writes manifest.json (each file's
// size and XXH64 checksum) last, and only then renames the directory into place, so a crash at any moment leaves the
// previous checkpoints untouched. A checkpoint is complete only if its manifest parses and every listed file has the
// listed size and checksum; nothing else is ever resumed from. A reader verifies the checksum of every file it reads.
// The format is in docs/formats.md ("Training checkpoints").
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
#include <vector>

#include "checkpoint/flat_runs.h"
#include "comm/communicator.h"
#include "model/config.h"
#include "model/param_table.h"
#include "optim/adamw.h"

namespace nextron {

// 3: the Gated DeltaNet input projections keep their rows per part ([q | k | v | z], [b | a]: HfRowGroups) where
// version 2 kept HF's per-key-head groups; version 2 is refused with what to do instead (export to HF).
inline constexpr int64_t kTrainCheckpointFormatVersion = 3;

// What the trainer carries besides the weights and the optimizer.
struct TrainState {
  int64_t step = 0;             // optimizer steps completed
  int64_t data_position = 0;    // next global training sample (SampleStream::position())
  int64_t consumed_tokens = 0;  // training tokens consumed so far
  std::string rng_state;        // opaque to the checkpoint; must be UTF-8 text (e.g. a std::mt19937_64 written with <<)
  nlohmann::json scheduler;     // the LR schedule's configuration
  nlohmann::json args;          // the run's training arguments
};

// What one rank writes: the elements it owns, as runs of the whole model's flat layout into its host buffers. Over
// all ranks the param runs cover every element of the model exactly once, and so do the moment runs (or the part
// of the model that has optimizer state).
struct CheckpointShard {
  const float* params = nullptr;
  std::vector<FlatRun> param_runs;
  const float* exp_avg = nullptr;  // the moments, both laid out as moment_runs say
  const float* exp_avg_sq = nullptr;
  std::vector<FlatRun> moment_runs;
  int64_t steps_taken = 0;  // AdamW's step count (the same on every rank)
  AdamWHyper hyper;
};

// "<root>/step_<8-digit step>" (more digits past 99,999,999).
std::string train_checkpoint_dir(const std::string& root, int64_t step);

// Collective over `world` (nullptr: one process): writes the checkpoint of `state.step` under `root` (created if
// needed; a shared file system when several processes write) and returns its directory on every rank. `table` is the
// whole model's; config, table, state and keep_last are rank 0's (the others pass the same). A checkpoint of the same
// step already there is replaced (atomically where the file system supports it). Afterwards, when keep_last > 0,
// complete checkpoints of earlier steps beyond the keep_last newest (this one included) are deleted; keep_last == 0
// keeps every checkpoint. If any rank fails, the temporary directory is removed, the existing checkpoints are left
// as they were and every rank throws (the failing ranks with their own message).
std::string save_train_checkpoint(Communicator* world, const std::string& root, const ModelConfig& config,
                                  const ParamTable& table, const CheckpointShard& shard, const TrainState& state,
                                  int keep_last);

// The same save in three parts, so that --async-save can write the shard on a background thread:
//   the constructor (collective: checks on every rank; rank 0 creates the temporary directory),
//   write_shard() (this rank's file; no MPI and no HDF5, so one other thread may run it while training goes on),
//   finish() (collective: rank 0 collects the shards' sizes, checksums and run groups, writes metadata.h5,
//   state.json and the manifest, installs the checkpoint and applies keep_last; returns its directory).
// `shard`'s buffers must stay valid until write_shard() returns. Errors of the constructor and of finish() are thrown
// on every rank (the failing ranks with their own message); write_shard() keeps its error for finish(). A save
// destroyed unfinished removes its temporary directory.
class CheckpointSave {
 public:
  CheckpointSave(Communicator* world, const std::string& root, const ModelConfig& config, const ParamTable& table,
                 const CheckpointShard& shard, const TrainState& state, int keep_last);
  ~CheckpointSave();
  CheckpointSave(const CheckpointSave&) = delete;
  CheckpointSave& operator=(const CheckpointSave&) = delete;

  void write_shard();
  std::string finish();
  const std::string& dir() const;  // the checkpoint's directory once finished

 private:
  Communicator* world_;
  int rank_, shards_;
  const ParamTable& table_;
  CheckpointShard shard_;
  std::string root_, final_dir_, tmp_, elsewhere_, state_json_, config_json_, write_error_;
  int64_t step_;
  int keep_last_;
  uint64_t digest_bytes_ = 0, digest_hash_ = 0;
  bool finished_ = false;
};

// One process holding the whole model: params (table.total_numel() elements) and the moments of flat range `range`
// (indexed from range.begin).
struct OptimizerShard {
  FlatRange range;
  const float* exp_avg = nullptr;
  const float* exp_avg_sq = nullptr;
  int64_t steps_taken = 0;
  AdamWHyper hyper;
};
std::string save_train_checkpoint(const std::string& root, const ModelConfig& config, const ParamTable& table,
                                  const float* params, const OptimizerShard& optimizer, const TrainState& state,
                                  int keep_last);

// Throws a nextron::Error naming the checkpoint, the file and the problem unless `dir` is complete: manifest.json
// parses and lists metadata.h5, state.json and every shard, each present with the listed size and, for the files
// f with f's index % parts == part, the listed checksum (reading every byte of those). parts > 1 spreads the
// reading over the ranks of a job.
void verify_train_checkpoint(const std::string& dir, int part = 0, int parts = 1);

// The newest complete checkpoint (by step) under `root`, or nothing (also when root does not exist). Temporary
// `.tmp-*` directories and incomplete or corrupt checkpoints newer than it are skipped with a warning on stderr.
// Collective over `world` when given: the checksums are verified by all ranks, each reading its share of the files,
// and every rank gets the same answer.
std::optional<std::string> find_latest_checkpoint(const std::string& root, Communicator* world = nullptr);

struct LoadedCheckpoint {
  TrainState state;
  int64_t steps_taken = 0;  // AdamW's step count (AdamW::set_steps_taken)
  AdamWHyper hyper;         // the hyperparameters the run was saved with (lr: the last one used)
};

// A checkpoint opened for reading by one process: the manifest's sizes checked, metadata.h5 and state.json verified
// (checksums) and parsed; a shard's checksum is verified when it is first read. Reads any elements of the whole
// model's parameters and moments, whatever layout wrote them, holding at most one parameter's worth of stored data
// at a time. Every problem is a nextron::Error naming the checkpoint and the file.
class TrainCheckpointReader {
 public:
  explicit TrainCheckpointReader(const std::string& dir);
  ~TrainCheckpointReader();
  TrainCheckpointReader(const TrainCheckpointReader&) = delete;
  TrainCheckpointReader& operator=(const TrainCheckpointReader&) = delete;

  const std::string& dir() const;
  const ModelConfig& config() const;  // the model config it was trained with
  const ParamTable& table() const;    // its whole-model parameter table
  const LoadedCheckpoint& loaded() const;
  // Checks that it was written for `expect` (an error names the first differing field: "checkpoint ... was trained
  // with hidden_size 64, the model config says 128") and for `table`'s layout (names, shapes, offsets).
  void check_model(const ModelConfig& expect, const ParamTable& table) const;

  // dst[run.local_offset + i] = full element run.full_offset + i, for every run. Throws naming the first parameter
  // with a requested element the checkpoint does not hold (nothing useful is left in dst then).
  void read_params(const std::vector<FlatRun>& runs, float* dst) const;
  void read_moments(const std::vector<FlatRun>& runs, float* exp_avg, float* exp_avg_sq) const;

 private:
  struct Impl;
  Impl* impl_;
};

// One process, the whole model: verifies `dir` (as verify_train_checkpoint), checks it against `expect_config` and
// `table` (TrainCheckpointReader::check_model), then fills `params` (table.total_numel() elements) and the moments of
// flat range `range` (`exp_avg` and `exp_avg_sq` indexed from range.begin; the checkpoint must hold them).
LoadedCheckpoint load_train_checkpoint(const std::string& dir, const ModelConfig& expect_config,
                                       const ParamTable& table, float* params, FlatRange range, float* exp_avg,
                                       float* exp_avg_sq);

// The model config a checkpoint was trained with (its metadata.h5's model_config attribute).
ModelConfig read_train_checkpoint_config(const std::string& dir);

// XXH64 (seed 0) of `size` bytes: the manifest's checksum, the same value as Python's xxhash.xxh64_intdigest.
uint64_t xxh64(const void* data, size_t size);

namespace detail {
// Tests only: called by save_train_checkpoint after each stage ("shard" on every rank, then on rank 0
// "metadata.h5", "state.json", "manifest.json", all inside the temporary directory, then "renamed"); an empty
// function removes the hook.
void set_train_checkpoint_hook(std::function<void(const std::string& stage)> hook);
}  // namespace detail

}  // namespace nextron
