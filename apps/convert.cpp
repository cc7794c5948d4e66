// nextron-convert: read an HF-format Qwen3-Next checkpoint, or a nextron training checkpoint, into nextron's
// parameter layout and write it as an HF checkpoint (f32 or bf16, single file or sharded). Exercises exactly the reader
// and writer that training uses to start from HF weights and to export.
#include <boost/program_options.hpp>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/train_checkpoint.h"
#include "cli.h"
#include "core/error.h"
#include "model/param_table.h"

namespace po = boost::program_options;
using namespace nextron;

namespace {

int run(int argc, char** argv) {
  std::string in, out, dtype;
  uint64_t max_shard = 0;
  po::options_description opts(
      "nextron-convert: write an HF-format Qwen3-Next checkpoint from an HF checkpoint or a nextron training "
      "checkpoint\n\nOptions");
  opts.add_options()("help,h", "show this help")("in", po::value(&in)->required(),
                                                 "input: an HF checkpoint directory, or a training checkpoint "
                                                 "(nextron-train's SAVE/step_N directory)")(
      "out", po::value(&out)->required(),
      "output directory; must not exist yet (it is written as OUT.partial and renamed into place)")(
      "dtype", po::value(&dtype)->default_value("f32"), "stored dtype: f32 or bf16")(
      "max-shard-bytes", po::value(&max_shard)->default_value(5ull << 30),
      "largest safetensors shard; bigger checkpoints are split with model.safetensors.index.json");
  po::variables_map vm;
  if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
  HfWriteOptions w;
  NEXTRON_CHECK(dtype == "f32" || dtype == "bf16", "--dtype must be f32 or bf16, got '", dtype, "'");
  w.dtype = dtype == "bf16" ? DType::bf16 : DType::f32;
  NEXTRON_CHECK(max_shard > 0, "--max-shard-bytes must be positive");
  w.max_shard_bytes = max_shard;
  // Refuse any existing --out, even an empty directory: the checkpoint is built as OUT.partial and renamed over OUT,
  // which would silently drop a directory the user prepared (its permissions, a symlink to elsewhere, a mount point
  // the rename cannot replace). Checked before the read, which can take minutes for a large checkpoint.
  NEXTRON_CHECK(!std::filesystem::exists(out) && !std::filesystem::is_symlink(out), "--out '", out,
                "' already exists; nextron-convert writes a new directory: give a path that does not exist yet, or "
                "remove '",
                out, "' first");

  // Both kinds of input are streamed one HF tensor at a time, so memory stays near the largest tensor, whatever
  // the model's size: a training checkpoint (nextron-train --save: it has a manifest.json) from the shards of
  // whatever layout wrote it, an HF directory from the tensors' bytes in its safetensors files.
  HfPieceSource source;
  std::unique_ptr<TrainCheckpointReader> training;
  std::unique_ptr<HfSliceReader> hf;
  ModelConfig config;
  std::unique_ptr<ParamTable> hf_table;
  if (std::filesystem::exists(std::filesystem::path(in) / "manifest.json")) {
    training = std::make_unique<TrainCheckpointReader>(in);
    config = training->config();
    source = [&](const ParamSpec& spec, const HfPiece& piece, float* values) {
      training->read_params({FlatRun{spec.offset + piece.offset, 0, shape_numel(piece.shape)}}, values);
    };
  } else {
    config = read_hf_config(in);
    hf_table = std::make_unique<ParamTable>(config);
    hf = std::make_unique<HfSliceReader>(in, *hf_table);
    source = [&](const ParamSpec& spec, const HfPiece& piece, float* values) {
      hf->read(spec, piece.offset, shape_numel(piece.shape), values);
    };
  }
  const ParamTable& table = training ? training->table() : *hf_table;
  const std::string error = stream_hf_checkpoint(out, config, table, source, w, /*writer=*/true);
  NEXTRON_CHECK(error.empty(), error);
  std::printf("wrote %s (%lld parameters, %s)\n", out.c_str(), static_cast<long long>(table.parameters()),
              dtype.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return nextron::cli::run_main("nextron-convert", [&] { return run(argc, argv); });
}
