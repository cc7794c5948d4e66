// Absurd sizes in config.json fail at parse time with the field's name, quickly and without allocating; the
// parameter count is exact (equal to the table's) and overflow-checked; the memory check names the fields that make
// a model too large and the bytes needed vs available; every real config still parses.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <new>

#include "core/error.h"
#include "model/config.h"
#include "model/param_table.h"

namespace nextron::test {

namespace {
std::string source(const std::string& rel) { return std::string(NEXTRON_SOURCE_DIR) + "/" + rel; }

nlohmann::json load(const std::string& rel) {
  std::ifstream f(source(rel));
  return nlohmann::json::parse(f);
}
nlohmann::json official() { return load("configs/models/qwen3-next-80b-a3b.json"); }

// The error of from_json(j), or "" when it parsed.
std::string parse_error(const nlohmann::json& j) {
  try {
    ModelConfig::from_json(j);
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

constexpr int64_t kHuge = int64_t{1} << 40;

// {field, value, text the error must contain}: each is one absurd size.
struct Absurd {
  const char* field;
  nlohmann::json value;
  const char* needle;
};
std::vector<Absurd> absurd_cases() {
  const int64_t max64 = std::numeric_limits<int64_t>::max();
  return {
      {"num_experts", int64_t{1} << 31, "'num_experts' is 2147483648, above nextron's limit of 4096"},
      {"num_hidden_layers", 1000000000, "'num_hidden_layers' is 1000000000, above nextron's limit of 1024"},
      {"num_hidden_layers", 1e9, "'num_hidden_layers' must be an integer"},
      {"num_hidden_layers", max64, "'num_hidden_layers'"},
      {"hidden_size", kHuge, "'hidden_size' is 1099511627776"},
      {"vocab_size", kHuge, "'vocab_size' is 1099511627776"},
      {"intermediate_size", kHuge, "'intermediate_size'"},
      {"moe_intermediate_size", kHuge, "'moe_intermediate_size'"},
      {"shared_expert_intermediate_size", kHuge, "'shared_expert_intermediate_size'"},
      {"num_attention_heads", kHuge, "'num_attention_heads'"},
      {"num_key_value_heads", kHuge, "'num_key_value_heads'"},
      {"head_dim", kHuge, "'head_dim'"},
      {"linear_num_key_heads", kHuge, "'linear_num_key_heads'"},
      {"linear_num_value_heads", kHuge, "'linear_num_value_heads'"},
      {"linear_key_head_dim", kHuge, "'linear_key_head_dim'"},
      {"linear_value_head_dim", kHuge, "'linear_value_head_dim'"},
      {"linear_conv_kernel_dim", kHuge, "'linear_conv_kernel_dim'"},
      {"num_experts_per_tok", kHuge, "'num_experts_per_tok'"},
      {"max_position_embeddings", max64, "'max_position_embeddings'"},
      {"num_experts", -1, "'num_experts' must not be negative"},
      {"moe_intermediate_size", -5, "'moe_intermediate_size' must not be negative"},
      {"hidden_size", -1, "'hidden_size' must be positive"},
      {"num_hidden_layers", 0, "'num_hidden_layers' must be positive"},
  };
}

// Every size field at its limit: each passes on its own, together the routed experts hold 3 x 2^59 parameters.
nlohmann::json all_at_limits() {
  auto j = official();
  j["hidden_size"] = ConfigLimits::hidden_size;
  j["num_experts"] = ConfigLimits::num_experts;
  j["moe_intermediate_size"] = ConfigLimits::intermediate_size;
  j["num_hidden_layers"] = ConfigLimits::num_hidden_layers;
  return j;
}

// The sum of the HF tensors the table maps (what ParamCount::hf_tensors estimates bookkeeping from).
int64_t table_hf_tensors(const ParamTable& t) {
  int64_t n = 0;
  for (const auto& s : t.specs()) n += static_cast<int64_t>(s.hf.size());
  return n;
}
}  // namespace

TEST(ConfigLimits, AbsurdSizesNameTheFieldQuickly) {
  for (const Absurd& a : absurd_cases()) {
    auto j = official();
    j[a.field] = a.value;
    const auto t0 = std::chrono::steady_clock::now();
    const std::string err = parse_error(j);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_NE(err.find(a.needle), std::string::npos) << a.field << "=" << a.value.dump() << ": " << err;
    EXPECT_LT(ms, 50.0) << a.field << "=" << a.value.dump();
  }
}

// The same cases in a child whose address space is capped at its current size + 256 MiB: a parse that allocated
// per layer or per expert (a billion layer-plan entries, 2^31 experts) would die of bad_alloc there.
TEST(ConfigLimits, AbsurdSizesDoNotAllocate) {
  const auto cases = absurd_cases();
  std::vector<nlohmann::json> configs;
  for (const Absurd& a : cases) {
    configs.push_back(official());
    configs.back()[a.field] = a.value;
  }
  configs.push_back(all_at_limits());
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int64_t vm_kb = 0;
    std::ifstream status("/proc/self/status");
    for (std::string key; status >> key;)
      if (key == "VmSize:") status >> vm_kb;
    const rlim_t cap = static_cast<rlim_t>(vm_kb + 256 * 1024) * 1024;
    const rlimit lim{cap, cap};
    if (vm_kb <= 0 || setrlimit(RLIMIT_AS, &lim) != 0) _exit(3);
    int code = 0;
    for (const auto& j : configs) {
      try {
        ModelConfig::from_json(j);
        code = 1;  // parsed: not refused
      } catch (const Error&) {
      } catch (const std::bad_alloc&) {
        _exit(2);
      }
    }
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died of signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: an absurd config parsed, 2: parsing ran out of a 256 MiB budget, "
                                       "3: could not set RLIMIT_AS";
}

TEST(ConfigLimits, ProductOfFieldsAtTheirLimitsIsRefusedNamingThePart) {
  const std::string err = parse_error(all_at_limits());
  EXPECT_NE(err.find("routed experts"), std::string::npos) << err;
  EXPECT_NE(err.find("num_experts x moe_intermediate_size x hidden_size x num_hidden_layers"), std::string::npos)
      << err;
  EXPECT_NE(err.find("overflow a 64-bit byte count"), std::string::npos) << err;
}

// parameter_count() without validate() (a config built in code) meets products beyond int64: checked, not wrapped.
TEST(ConfigLimits, ParameterCountOverflowIsAnError) {
  ModelConfig c = ModelConfig::from_json(official());
  c.hidden_size = kHuge;
  c.num_experts = int64_t{1} << 31;
  try {
    c.parameter_count();
    FAIL() << "expected an overflow error";
  } catch (const Error& e) {
    const std::string err = e.what();
    EXPECT_NE(err.find("overflows a 64-bit integer"), std::string::npos) << err;
    EXPECT_NE(err.find("hidden_size"), std::string::npos) << err;
  }
  EXPECT_THROW(c.validate(), Error);  // and validate() refuses the fields themselves
  c = ModelConfig::from_json(official());
  c.vocab_size = std::numeric_limits<int64_t>::max() / 2;
  try {
    c.parameter_count();
    FAIL() << "expected an overflow error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("vocab_size x hidden_size"), std::string::npos) << e.what();
  }
}

// Every config in configs/models (the 80B-A3B with 512 experts included) and the test fixtures parses, and its
// count equals the table's, tensor for tensor; so do variants exercising each kind of layer.
TEST(ConfigLimits, RealConfigsParseAndCountsMatchTheTable) {
  std::vector<ModelConfig> configs;
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(source("configs/models"))) {
    configs.push_back(ModelConfig::from_file(e.path().string()));
    ++files;
  }
  EXPECT_GE(files, 6);
  for (const char* f : {"dense", "hybrid_moe", "moe_unnormed"}) {
    const std::string path = source("tests/fixtures/") + f + "/config.json";
    if (std::filesystem::exists(path)) configs.push_back(ModelConfig::from_file(path));
  }
  auto small = load("configs/models/qwen3-next-tiny.json");
  small["attention_bias"] = true;
  configs.push_back(ModelConfig::from_json(small));
  small["mlp_only_layers"] = {0, 2};
  small["decoder_sparse_step"] = 2;
  configs.push_back(ModelConfig::from_json(small));
  small["num_experts"] = 0;
  small["intermediate_size"] = 64;
  configs.push_back(ModelConfig::from_json(small));
  for (const ModelConfig& c : configs) {
    const ParamCount pc = c.parameter_count();
    if (pc.total > int64_t{2'000'000'000}) continue;  // the 80B tables: counted in the next test, not built twice
    const ParamTable t(c);
    EXPECT_EQ(pc.total, t.parameters());
    EXPECT_EQ(pc.hf_tensors, table_hf_tensors(t));
  }
}

TEST(ConfigLimits, OfficialCountMatchesTheTable) {
  const ModelConfig c = ModelConfig::from_json(official());
  const ParamCount pc = c.parameter_count();
  const ParamTable t(c);  // metadata only: the table allocates no buffers
  EXPECT_EQ(pc.total, t.parameters());
  EXPECT_EQ(pc.hf_tensors, table_hf_tensors(t));
  EXPECT_EQ(pc.largest().name, "routed experts");
}

TEST(ConfigLimits, MemoryCheckNamesFieldsAndBytes) {
  const ModelConfig big = ModelConfig::from_json(official());
  const MemoryLimit small_machine{24.0 * (1 << 30), "test limit"};
  try {
    check_fits_in_memory(big, MemoryNeed{}, small_machine);
    FAIL() << "80B parameters x 16 bytes fit in 24 GiB?";
  } catch (const Error& e) {
    const std::string err = e.what();
    for (const char* needle : {"does not fit in memory", "routed experts", "num_experts x moe_intermediate_size",
                               "bytes of fp32 parameters, gradients and AdamW moments", "24.0 GiB", "test limit"})
      EXPECT_NE(err.find(needle), std::string::npos) << needle << " in: " << err;
  }
  // 80B x 16 bytes = 1.3 TB: fits a 2 TiB machine; so does its 4-byte copy in 400 GiB.
  EXPECT_NO_THROW(check_fits_in_memory(big, MemoryNeed{}, MemoryLimit{2.0 * (1LL << 40), "test"}));
  EXPECT_NO_THROW(check_fits_in_memory(big, MemoryNeed{kWeightsBytesPerParam, "fp32 weights", 0},
                                       MemoryLimit{400.0 * (1 << 30), "test"}));

  // Absurd activations (B x S x vocab beyond int64) are a plain large double, refused with the options to reduce.
  const ModelConfig tiny = ModelConfig::from_file(source("configs/models/qwen3-next-tiny.json"));
  const double act = activation_bytes_lower_bound(tiny, int64_t{1} << 40, int64_t{1} << 40);
  EXPECT_TRUE(std::isfinite(act));
  EXPECT_GT(act, 1e24);
  try {
    check_fits_in_memory(tiny, MemoryNeed{kTrainBytesPerParam, "fp32 training buffers", act}, small_machine);
    FAIL() << "expected the activations to be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--micro-batch-size"), std::string::npos) << e.what();
  }
  // The tiny model with a small micro-batch fits this machine.
  const MemoryLimit here = host_memory_limit();
  EXPECT_TRUE(std::isfinite(here.bytes) && here.bytes > 0) << here.source;
  EXPECT_FALSE(here.source.empty());
  EXPECT_NO_THROW(check_fits_in_memory(
      tiny, MemoryNeed{kTrainBytesPerParam, "fp32 training buffers", activation_bytes_lower_bound(tiny, 2, 64)}));
}

}  // namespace nextron::test
