// HF checkpoint reader/writer: a sharded re-export reads back bit-identical, and checkpoints that do not match
// their config.json (missing, extra or mis-shaped tensors) or a non-empty output directory are clear errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>

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
}

}  // namespace nextron::test
