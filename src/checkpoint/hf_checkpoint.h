// HF-format checkpoint directories: config.json plus model.safetensors, or sharded
// model-0000K-of-0000N.safetensors files with a model.safetensors.index.json weight map.
// Tensor names and layouts come from the ParamTable's HfPiece entries.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "checkpoint/safetensors.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/param_table.h"

namespace nextron {

ModelConfig read_hf_config(const std::string& dir);

// Fills `params` (flat, table layout, f32) from the checkpoint in `dir` (f32, bf16 or f16 tensors). Every tensor
// the table names must be present with its exact shape; tensors the model does not use are an error, except the
// multi-token-prediction head (mtp.*) of the released checkpoints, which transformers ignores too.
void load_hf_weights(const std::string& dir, const ParamTable& table, float* params);

// Reads slices of an HF checkpoint's parameters without the whole model: read(spec, first, count, out) fills
// elements [first, first + count) of parameter `spec` (of `table`, the single-device table) from just their bytes in
// the safetensors files. The constructor checks, from the headers alone, that the checkpoint holds exactly the
// tensors `table` implies.
class HfSliceReader {
 public:
  HfSliceReader(const std::string& dir, const ParamTable& table);
  ~HfSliceReader();
  void read(const ParamSpec& spec, int64_t first, int64_t count, float* out) const;

 private:
  std::string dir_;
  std::map<std::string, std::string> files_;  // HF tensor -> its file
  mutable std::map<std::string, std::unique_ptr<SafetensorsReader>> readers_;
};

struct HfWriteOptions {
  DType dtype = DType::f32;               // f32 or bf16 storage
  uint64_t max_shard_bytes = 5ull << 30;  // above this, tensors go to further shards
};

// Writes config.json and the weights to `dir`, which must not exist or be empty. Everything is written into a
// temporary sibling directory first and renamed into place, so a failed write never leaves a partial checkpoint.
void save_hf_checkpoint(const std::string& dir, const ModelConfig& config, const ParamTable& table, const float* params,
                        const HfWriteOptions& options = {});

// One HF tensor's values: piece `piece` of parameter `spec` (of the single-device table), numel(piece.shape) floats,
// in the parameter's (nextron's) element order: the writer puts regrouped rows (HfPiece::regroup) into HF's order.
using HfPieceSource = std::function<void(const ParamSpec& spec, const HfPiece& piece, float* out)>;
// The same checkpoint streamed piece by piece, one HF tensor in memory at a time: source() may be collective (every
// process calls this the same way; the sources run in the same order everywhere) and only where `writer` is true are
// files written. A writer's error is returned ("" when none) after every source has run, so no process is left
// waiting in a collective.
std::string stream_hf_checkpoint(const std::string& dir, const ModelConfig& config, const ParamTable& table,
                                 const HfPieceSource& source, const HfWriteOptions& options, bool writer);

}  // namespace nextron
