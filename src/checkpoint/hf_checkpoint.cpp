#include "checkpoint/hf_checkpoint.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "checkpoint/safetensors.h"

namespace nextron {

namespace fs = std::filesystem;

ModelConfig read_hf_config(const std::string& dir) {
  // Say which of the three things is wrong: a missing path and a file given for the directory are typos that a bare
  // "has no config.json" would hide.
  NEXTRON_CHECK(fs::exists(dir), "HF checkpoint directory '", dir,
                "' does not exist (expected a directory with config.json and safetensors weights)");
  NEXTRON_CHECK(fs::is_directory(dir), "'", dir,
                "' is a file, not an HF checkpoint directory (expected a directory with config.json and safetensors "
                "weights)");
  const fs::path p = fs::path(dir) / "config.json";
  NEXTRON_CHECK(fs::exists(p), "'", dir, "' is not an HF checkpoint directory: it has no config.json");
  return ModelConfig::from_file(p.string());
}

namespace {

// A shard named by model.safetensors.index.json must be a file next to the index. A path ("../x", "/x", "sub/x")
// would let a downloaded checkpoint make us read any file on the machine, and transformers' own writer never emits
// one, so nothing legitimate is lost by refusing them.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

// name -> file, for single-file and sharded checkpoints.
std::map<std::string, std::string> weight_files(const std::string& dir) {
  std::map<std::string, std::string> files;
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index)) {
    std::ifstream f(index);
    nlohmann::json j;
    std::map<std::string, std::string> entries;
    try {
      j = nlohmann::json::parse(f);
      NEXTRON_CHECK(j.at("weight_map").is_object(), "'", index.string(),
                    "' is not a valid safetensors index: weight_map is not an object");
      for (auto it = j.at("weight_map").begin(); it != j.at("weight_map").end(); ++it)
        entries[it.key()] = it->get<std::string>();
    } catch (const nlohmann::json::exception& e) {
      NEXTRON_CHECK(false, "'", index.string(), "' is not a valid safetensors index: ", e.what());
    }
    std::set<std::string> present;  // shards already checked: released checkpoints map ~10^5 tensors to few files
    for (const auto& [name, file] : entries) {
      NEXTRON_CHECK(is_plain_file_name(file), "'", index.string(), "' maps tensor '", name, "' to '", file,
                    "', which is not a plain file name in the checkpoint directory; an index may only name shard "
                    "files next to it (e.g. model-00001-of-00002.safetensors), never paths such as '../x' or '/x'");
      const fs::path shard = fs::path(dir) / file;
      if (!present.count(file)) {
        NEXTRON_CHECK(fs::is_regular_file(shard), "'", index.string(), "' maps tensor '", name, "' to '", file,
                      "', but '", dir, "' has no such file");
        present.insert(file);
      }
      files[name] = shard.string();
    }
  } else {
    NEXTRON_CHECK(fs::exists(single), "'", dir, "' has neither model.safetensors nor model.safetensors.index.json");
    SafetensorsReader r(single.string());
    for (const auto& n : r.names()) files[n] = single.string();
  }
  return files;
}

}  // namespace

HfSliceReader::HfSliceReader(const std::string& dir, const ParamTable& table) : dir_(dir), files_(weight_files(dir)) {
  std::set<std::string> expected;
  for (const ParamSpec& s : table.specs())
    for (const HfPiece& piece : s.hf) {
      expected.insert(piece.hf_name);
      auto it = files_.find(piece.hf_name);
      NEXTRON_CHECK(it != files_.end(), "HF checkpoint '", dir, "' has no tensor '", piece.hf_name,
                    "' that config.json implies; the weights and config.json do not belong together");
      // Shapes from the headers, before anything is read (the first mismatch names the tensor).
      auto& reader = readers_[it->second];
      if (!reader) reader = std::make_unique<SafetensorsReader>(it->second);
      const SafetensorsEntry& e = reader->entry(piece.hf_name);
      NEXTRON_CHECK(e.shape == piece.shape, "'", it->second, "': tensor '", piece.hf_name, "' has shape ",
                    shape_str(e.shape), " but the model expects ", shape_str(piece.shape),
                    "; the checkpoint does not match config.json");
    }
  for (const auto& [name, file] : files_) {
    if (name.rfind("mtp.", 0) == 0) continue;
    NEXTRON_CHECK(expected.count(name), "HF checkpoint '", dir, "' has tensor '", name,
                  "' that the model described by its config.json does not use; the weights and config.json do "
                  "not belong together");
  }
}

HfSliceReader::~HfSliceReader() = default;

void HfSliceReader::read(const ParamSpec& spec, int64_t first, int64_t count, float* out) const {
  // The parameter's HF pieces are contiguous runs of it; read each piece's overlap with [first, first + count).
  for (const HfPiece& piece : spec.hf) {
    const int64_t begin = std::max(first, piece.offset),
                  end = std::min(first + count, piece.offset + shape_numel(piece.shape));
    if (begin >= end) continue;
    const std::string& file = files_.at(piece.hf_name);
    auto& reader = readers_[file];
    if (!reader) reader = std::make_unique<SafetensorsReader>(file);
    // Each run contiguous in both orders is one read (one per row part for a regrouped DeltaNet projection).
    for_each_hf_run(piece, begin - piece.offset, end - piece.offset, [&](int64_t ours, int64_t hf, int64_t n) {
      reader->read_f32_range(piece.hf_name, piece.shape, hf, n, out + (piece.offset + ours - first));
    });
  }
}

void load_hf_weights(const std::string& dir, const ParamTable& table, float* params) {
  const HfSliceReader reader(dir, table);
  for (const ParamSpec& s : table.specs()) reader.read(s, 0, s.numel(), params + s.offset);
}

void save_hf_checkpoint(const std::string& dir, const ModelConfig& config, const ParamTable& table, const float* params,
                        const HfWriteOptions& options) {
  const std::string error = stream_hf_checkpoint(
      dir, config, table,
      [params](const ParamSpec& s, const HfPiece& piece, float* out) {
        std::copy_n(params + s.offset + piece.offset, shape_numel(piece.shape), out);
      },
      options, true);
  NEXTRON_CHECK(error.empty(), error);
}

std::string stream_hf_checkpoint(const std::string& dir, const ModelConfig& config, const ParamTable& table,
                                 const HfPieceSource& source, const HfWriteOptions& options, bool writer) {
  NEXTRON_CHECK(options.dtype == DType::f32 || options.dtype == DType::bf16,
                "HF export supports f32 and bf16 storage, not ", dtype_name(options.dtype));
  NEXTRON_CHECK(options.max_shard_bytes > 0, "max shard size must be positive");
  // The shards, in table order, each at most max_shard_bytes (a single larger tensor gets its own shard).
  const size_t elem = dtype_size(options.dtype);
  struct Item {
    const ParamSpec* spec;
    const HfPiece* piece;
  };
  std::vector<std::vector<Item>> shards(1);
  std::vector<uint64_t> shard_bytes(1, 0);
  uint64_t total = 0;
  for (const ParamSpec& s : table.specs())
    for (const HfPiece& piece : s.hf) {
      const uint64_t bytes = static_cast<uint64_t>(shape_numel(piece.shape)) * elem;
      if (!shards.back().empty() && shard_bytes.back() + bytes > options.max_shard_bytes) {
        shards.emplace_back();
        shard_bytes.push_back(0);
      }
      shards.back().push_back({&s, &piece});
      shard_bytes.back() += bytes;
      total += bytes;
    }
  // "out/" names the directory "out": without dropping the trailing separator the temporary sibling below would be
  // "out/.partial", i.e. inside the target, and the final rename would fail.
  fs::path target = fs::path(dir).lexically_normal();
  if (!target.has_filename() && target.has_parent_path()) target = target.parent_path();
  const fs::path tmp = target.string() + ".partial";
  std::string error;
  auto attempt = [&](const std::function<void()>& io) {
    if (!writer || !error.empty()) return;
    try {
      io();
    } catch (const std::exception& e) {
      error = e.what();
    }
  };
  // Everything goes into a temporary sibling first and is renamed into place, so a failed write leaves nothing.
  attempt([&] {
    NEXTRON_CHECK(!fs::exists(target) || (fs::is_directory(target) && fs::is_empty(target)), "output directory '", dir,
                  "' already exists and is not empty; choose a new directory or remove it");
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  });
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  const size_t n = shards.size();
  auto shard_name = [n](size_t i) {
    if (n == 1) return std::string("model.safetensors");
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    return std::string(name);
  };
  std::vector<float> buf, hf_order;
  for (size_t i = 0; i < n; ++i) {
    std::unique_ptr<SafetensorsStreamWriter> out;
    attempt([&] {
      std::vector<SafetensorsStreamWriter::Entry> entries;
      for (const Item& it : shards[i]) entries.push_back({it.piece->hf_name, it.piece->shape});
      out = std::make_unique<SafetensorsStreamWriter>((tmp / shard_name(i)).string(), std::move(entries), options.dtype,
                                                      meta);
    });
    for (const Item& it : shards[i]) {
      buf.assign(static_cast<size_t>(shape_numel(it.piece->shape)), 0.0f);
      source(*it.spec, *it.piece, buf.data());
      const float* values = buf.data();
      if (it.piece->regroup.groups > 0) {  // nextron's row order -> HF's
        hf_order.resize(buf.size());
        hf_reorder(*it.piece, buf.data(), hf_order.data(), true);
        values = hf_order.data();
      }
      attempt([&] { out->write_next(values); });
    }
    attempt([&] { out->finish(); });
  }
  attempt([&] {
    if (n > 1) {
      nlohmann::ordered_json index;
      index["metadata"] = {{"total_size", total}};
      nlohmann::ordered_json map;
      for (size_t i = 0; i < n; ++i)
        for (const Item& it : shards[i]) map[it.piece->hf_name] = shard_name(i);
      index["weight_map"] = map;
      std::ofstream f(tmp / "model.safetensors.index.json");
      f << index.dump(2) << "\n";
      NEXTRON_CHECK(f.good(), "writing the safetensors index failed");
    }
    nlohmann::json cj = config.to_json();
    cj["torch_dtype"] = options.dtype == DType::bf16 ? "bfloat16" : "float32";
    {
      std::ofstream f(tmp / "config.json");
      f << cj.dump(2) << "\n";
      NEXTRON_CHECK(f.good(), "writing config.json failed");
    }
    if (fs::exists(target)) fs::remove(target);  // empty directory, checked above
    fs::rename(tmp, target);
  });
  if (writer && !error.empty()) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
  }
  return error;
}

}  // namespace nextron
