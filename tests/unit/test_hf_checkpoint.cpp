// HF checkpoint reader/writer: a sharded re-export reads back bit-identical, and checkpoints that do not match
// their config.json (missing, extra or mis-shaped tensors), a non-empty output directory, a missing or non-directory
// checkpoint path and safetensors index entries that point outside the checkpoint are clear errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"

namespace nextron::test {

namespace fs = std::filesystem;

namespace {
const std::string kFixture = std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe";

fs::path fresh_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("nextron_ckpt_" + name);
  fs::remove_all(p);
  return p;
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    FAIL() << "expected an error mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(HfCheckpoint, ShardedExportReadsBackBitIdentical) {
  const ModelConfig config = read_hf_config(kFixture);
  const ParamTable table(config);
  std::vector<float> a(table.total_numel()), b(table.total_numel());
  load_hf_weights(kFixture, table, a.data());
  // Every value came from the file (the fixture randomises every parameter, so none stays exactly 0).
  int64_t zeros = 0;
  for (float v : a) zeros += v == 0.0f;
  EXPECT_LT(zeros, table.total_numel() / 1000);

  const fs::path out = fresh_dir("sharded");
  HfWriteOptions w;
  w.max_shard_bytes = 50000;
  save_hf_checkpoint(out.string(), config, table, a.data(), w);
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  int shards = 0;
  for (const auto& e : fs::directory_iterator(out)) shards += e.path().extension() == ".safetensors";
  EXPECT_GT(shards, 2);
  EXPECT_FALSE(fs::exists(out.string() + ".partial"));
  const ModelConfig back = read_hf_config(out.string());
  EXPECT_EQ(back.to_json(), config.to_json());
  load_hf_weights(out.string(), table, b.data());
  EXPECT_EQ(a, b);
  // Writing into a non-empty directory is refused and leaves it untouched.
  expect_error([&] { save_hf_checkpoint(out.string(), config, table, a.data(), w); }, "not empty");
  fs::remove_all(out);
}

// nextron keeps the DeltaNet input projections' rows per part ([q | k | v | z] of all heads, [b | a]) where the HF
// tensor keeps them per key-head group: row j of part p of group g is HF row g * sum(parts) + sum(parts[< p]) + j
// and nextron row Hk * sum(parts[< p]) + g * parts[p] + j (checked here by those loops, not through the table's
// run iterator); slices read by HfSliceReader (what each tensor-parallel rank reads) equal the whole load's elements,
// wherever they start and end; and the export writes HF's order back (the file's tensor, bit for bit).
TEST(HfCheckpoint, DeltaNetProjectionsArePerPartInsideAndPerGroupInTheFile) {
  const ModelConfig config = read_hf_config(kFixture);
  const ParamTable table(config);
  std::vector<float> params(table.total_numel());
  load_hf_weights(kFixture, table, params.data());
  const int64_t H = config.hidden_size, Hk = config.linear_num_key_heads, dk = config.linear_key_head_dim,
                r = config.linear_num_value_heads / Hk, rdv = r * config.linear_value_head_dim;
  int64_t layer = 0;
  while (config.layer_types[layer] != MixerType::linear_attention) ++layer;
  const std::string prefix = "layers." + std::to_string(layer) + ".linear_attn.";
  const fs::path out = fresh_dir("regrouped");
  save_hf_checkpoint(out.string(), config, table, params.data());
  const HfSliceReader slices(kFixture, table);
  for (const auto& [name, parts] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {"in_proj_qkvz", {dk, dk, rdv, rdv}}, {"in_proj_ba", {r, r}}}) {
    const ParamSpec& spec = table.get(prefix + name);
    const std::string hf_name = "model." + prefix + name + ".weight";
    const Tensor file = SafetensorsReader(kFixture + "/model.safetensors").read_f32(hf_name);
    const float* ours = params.data() + spec.offset;
    int64_t group = 0;
    for (int64_t p : parts) group += p;
    int64_t mismatched = 0, before = 0;
    for (size_t p = 0; p < parts.size(); ++p) {
      for (int64_t g = 0; g < Hk; ++g)
        for (int64_t j = 0; j < parts[p]; ++j)
          for (int64_t c = 0; c < H; ++c)
            mismatched +=
                ours[(Hk * before + g * parts[p] + j) * H + c] != file.f32()[(g * group + before + j) * H + c];
      before += parts[p];
    }
    EXPECT_EQ(mismatched, 0) << name;
    EXPECT_EQ(file.numel(), spec.numel());
    for (auto [first, count] : std::vector<std::pair<int64_t, int64_t>>{
             {0, spec.numel()}, {3 * H + 5, dk * H + 7}, {spec.numel() / 2 - 1, spec.numel() / 3}, {H - 1, 2}}) {
      count = std::min(count, spec.numel() - first);  // in_proj_ba is small
      std::vector<float> slice(static_cast<size_t>(count));
      slices.read(spec, first, count, slice.data());
      EXPECT_TRUE(std::equal(slice.begin(), slice.end(), ours + first))
          << name << " [" << first << ", +" << count << ")";
    }
    const Tensor written = SafetensorsReader((out / "model.safetensors").string()).read_f32(hf_name);
    EXPECT_TRUE(std::equal(written.f32(), written.f32() + written.numel(), file.f32())) << name;
  }
  fs::remove_all(out);
}

TEST(HfCheckpoint, MismatchedConfigIsAClearError) {
  ModelConfig config = read_hf_config(kFixture);
  std::vector<float> p;
  {
    ModelConfig c = config;  // a wider expert MLP than the weights have
    c.moe_intermediate_size += 1;
    const ParamTable t(c);
    p.resize(t.total_numel());
    expect_error([&] { load_hf_weights(kFixture, t, p.data()); }, "does not match config.json");
  }
  {
    ModelConfig c = config;  // one expert fewer: the router's shape disagrees
    c.num_experts -= 1;
    const ParamTable t(c);
    p.resize(t.total_numel());
    expect_error([&] { load_hf_weights(kFixture, t, p.data()); }, "mlp.gate.weight");
  }
  {
    ModelConfig c = config;  // a layer fewer: layer 3's tensors are left over
    c.num_hidden_layers -= 1;
    c.layer_types.pop_back();
    const ParamTable t(c);
    p.resize(t.total_numel());
    expect_error([&] { load_hf_weights(kFixture, t, p.data()); }, "model.layers.3.");
  }
  {
    ModelConfig c = config;  // layer 0 made dense: its dense MLP tensors are missing
    c.mlp_only_layers.push_back(0);
    const ParamTable t(c);
    p.resize(t.total_numel());
    expect_error([&] { load_hf_weights(kFixture, t, p.data()); },
                 "has no tensor 'model.layers.0.mlp.gate_proj.weight'");
  }
  expect_error([&] { read_hf_config("/nonexistent/dir"); }, "config.json");
  expect_error([&] { read_hf_config("/nonexistent/dir"); }, "does not exist");
  expect_error([&] { read_hf_config(kFixture + "/config.json"); }, "is a file, not an HF checkpoint directory");
}

// model.safetensors.index.json may only name shard files next to it: an entry such as "../x/model.safetensors" or
// an absolute path would otherwise be read from wherever it points.
TEST(HfCheckpoint, IndexEntriesMustBePlainFileNamesInTheCheckpoint) {
  const ModelConfig config = read_hf_config(kFixture);
  const ParamTable table(config);
  std::vector<float> p(table.total_numel());
  const fs::path root = fresh_dir("index_paths");
  const fs::path ckpt = root / "ckpt", outside = root / "x";
  fs::create_directories(ckpt / "sub");
  fs::create_directories(outside);
  fs::copy_file(fs::path(kFixture) / "config.json", ckpt / "config.json");
  fs::copy_file(fs::path(kFixture) / "model.safetensors", outside / "model.safetensors");
  fs::copy_file(fs::path(kFixture) / "model.safetensors", ckpt / "sub" / "model.safetensors");
  fs::copy_file(fs::path(kFixture) / "model.safetensors", ckpt / "shard.safetensors");
  const std::vector<std::string> names = SafetensorsReader(kFixture + "/model.safetensors").names();
  const fs::path index = ckpt / "model.safetensors.index.json";
  auto write_index = [&](const std::string& file) {
    nlohmann::json map;
    for (const auto& n : names) map[n] = file;
    std::ofstream(index) << nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", map}}.dump();
  };

  // Every target exists and holds the right tensors, so only the path check can refuse them.
  const std::string absolute = fs::absolute(outside / "model.safetensors").string();
  for (const std::string& bad : {std::string("../x/model.safetensors"), absolute, std::string("sub/model.safetensors"),
                                 std::string("./shard.safetensors"), std::string(".."), std::string("")}) {
    SCOPED_TRACE("entry '" + bad + "'");
    write_index(bad);
    expect_error([&] { load_hf_weights(ckpt.string(), table, p.data()); }, "to '" + bad + "', which is not a plain");
    expect_error([&] { load_hf_weights(ckpt.string(), table, p.data()); }, index.string());
  }
  write_index("model-00002-of-00002.safetensors");
  expect_error([&] { load_hf_weights(ckpt.string(), table, p.data()); }, "has no such file");
  std::ofstream(index) << R"({"weight_map": {"model.embed_tokens.weight": 5}})";
  expect_error([&] { load_hf_weights(ckpt.string(), table, p.data()); }, "is not a valid safetensors index");
  std::ofstream(index) << R"({"weight_map": ["model.safetensors"]})";
  expect_error([&] { load_hf_weights(ckpt.string(), table, p.data()); }, "weight_map is not an object");

  // A plain name next to the index loads, bit-identical to the fixture.
  write_index("shard.safetensors");
  std::vector<float> want(table.total_numel());
  load_hf_weights(kFixture, table, want.data());
  load_hf_weights(ckpt.string(), table, p.data());
  EXPECT_EQ(p, want);
  fs::remove_all(root);
}

// "out/" means the directory "out": the temporary sibling must be "out.partial", not "out/.partial".
TEST(HfCheckpoint, SaveToPathWithTrailingSlash) {
  const ModelConfig config = read_hf_config(kFixture);
  const ParamTable table(config);
  std::vector<float> a(table.total_numel()), b(table.total_numel());
  load_hf_weights(kFixture, table, a.data());
  const fs::path out = fresh_dir("trailing_slash");
  save_hf_checkpoint(out.string() + "/", config, table, a.data());
  EXPECT_TRUE(fs::exists(out / "config.json"));
  EXPECT_FALSE(fs::exists(out / ".partial"));
  EXPECT_FALSE(fs::exists(out.string() + ".partial"));
  load_hf_weights(out.string(), table, b.data());
  EXPECT_EQ(a, b);
  fs::remove_all(out);
}

}  // namespace nextron::test
