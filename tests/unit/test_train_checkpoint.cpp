// Training checkpoints: bit-identical round trips (whole model and ZeRO-style ranges), keep_last, and crash safety:
// unfinished, incomplete, truncated and modified checkpoints are never resumed from, and a save killed at any
// moment (SIGKILL in a forked child, at each stage and at random times) leaves the previous checkpoint in place.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>
#include <vector>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/train_checkpoint.h"
#include "core/error.h"

namespace nextron::test {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kFixture = std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe";

fs::path fresh_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("nextron_train_ckpt_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    FAIL() << "expected an error mentioning '" << needles.at(0) << "'";
  } catch (const Error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

// The fixture's config with one field changed.
ModelConfig config_with(const std::string& key, int64_t value) {
  json j = read_hf_config(kFixture).to_json();
  j[key] = value;
  return ModelConfig::from_json(j);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The name of the parameter holding flat element x.
std::string param_at(const ParamTable& table, int64_t x) {
  for (const ParamSpec& s : table.specs())
    if (s.offset <= x && x < s.offset + s.numel()) return s.name;
  return "(none)";
}

std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A model's whole training state, filled with random values.
struct TrainRun {
  ModelConfig config;
  ParamTable table;
  std::vector<float> params, exp_avg, exp_avg_sq;
  int64_t steps_taken = 0;
  AdamWHyper hyper;
  TrainState state;

  TrainRun(const ModelConfig& c, uint32_t seed, int64_t step) : config(c), table(c) {
    const int64_t n = table.total_numel();
    uint64_t x = seed;
    auto uniform = [&x] {  // splitmix64 -> [-1, 1): fast enough for millions of values
      uint64_t z = (x += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      return static_cast<float>(static_cast<double>((z ^ (z >> 31)) >> 40) * 0x1p-23 - 1.0);
    };
    params.resize(n);
    exp_avg.resize(n);
    exp_avg_sq.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      params[i] = uniform();
      exp_avg[i] = 1e-3f * uniform();
      exp_avg_sq[i] = 1e-6f * std::abs(uniform());
    }
    // The alignment gaps between entries (ParamTable::kAlign) hold nothing, in training too (zero from the start,
    // zero gradients keep them zero): a checkpoint does not store them and a load leaves them as they are.
    int64_t end = 0;
    auto clear = [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) params[i] = exp_avg[i] = exp_avg_sq[i] = 0.0f;
    };
    for (const ParamSpec& s : table.specs()) {
      clear(end, s.offset);
      end = s.offset + s.numel();
    }
    clear(end, n);
    steps_taken = step;
    hyper.lr = 1.25e-4 + 1e-6 * seed;
    hyper.beta2 = 0.95;
    hyper.weight_decay = 0.1;
    hyper.decay_all = true;
    state.step = step;
    state.data_position = 8 * step + seed;
    state.consumed_tokens = 512 * step;
    std::mt19937_64 rng(seed);
    rng.discard(step);
    std::ostringstream os;
    os << rng;
    state.rng_state = os.str();
    state.scheduler = {{"style", "cosine"}, {"lr", 3e-4}, {"min_lr", 3e-5}, {"warmup_steps", 10}};
    state.args = {{"seq_len", 64}, {"data", {"a.h5", "b.h5"}}, {"seed", seed}};
  }

  OptimizerShard shard() const {
    return OptimizerShard{FlatRange{0, table.total_numel()}, exp_avg.data(), exp_avg_sq.data(), steps_taken, hyper};
  }
  std::string save(const fs::path& root, int keep_last = 0) const {
    return save_train_checkpoint(root.string(), config, table, params.data(), shard(), state, keep_last);
  }
  // Loads `dir` into a fresh buffer set and checks it is bit-identical to this run.
  void expect_loads_identically(const std::string& dir) const {
    std::vector<float> p(params.size()), m(params.size()), v(params.size());
    const LoadedCheckpoint c =
        load_train_checkpoint(dir, config, table, p.data(), FlatRange{0, table.total_numel()}, m.data(), v.data());
    EXPECT_TRUE(same_bits(p, params)) << dir;
    EXPECT_TRUE(same_bits(m, exp_avg)) << dir;
    EXPECT_TRUE(same_bits(v, exp_avg_sq)) << dir;
    EXPECT_EQ(c.steps_taken, steps_taken);
    EXPECT_EQ(c.hyper.lr, hyper.lr);
    EXPECT_EQ(c.hyper.beta1, hyper.beta1);
    EXPECT_EQ(c.hyper.beta2, hyper.beta2);
    EXPECT_EQ(c.hyper.eps, hyper.eps);
    EXPECT_EQ(c.hyper.weight_decay, hyper.weight_decay);
    EXPECT_EQ(c.hyper.decay_all, hyper.decay_all);
    EXPECT_EQ(c.state.step, state.step);
    EXPECT_EQ(c.state.data_position, state.data_position);
    EXPECT_EQ(c.state.consumed_tokens, state.consumed_tokens);
    EXPECT_EQ(c.state.rng_state, state.rng_state);
    EXPECT_EQ(c.state.scheduler, state.scheduler);
    EXPECT_EQ(c.state.args, state.args);
  }
};

// Removes the save hook when the test ends, whatever happens.
struct HookGuard {
  ~HookGuard() { detail::set_train_checkpoint_hook({}); }
};

// find_latest_checkpoint with its warnings captured.
std::optional<std::string> latest(const fs::path& root, std::string* warnings = nullptr) {
  testing::internal::CaptureStderr();
  auto dir = find_latest_checkpoint(root.string());
  const std::string err = testing::internal::GetCapturedStderr();
  if (warnings != nullptr) *warnings = err;
  return dir;
}

// Runs `child` in a forked process and returns its wait status.
int run_in_child(const std::function<void()>& child) {
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    try {
      child();
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

}  // namespace

TEST(TrainCheckpoint, Xxh64MatchesTheReference) {
  // Values from the reference implementation (libxxhash, XXH64 with seed 0).
  EXPECT_EQ(xxh64("", 0), 0xef46db3751d8e999ull);
  EXPECT_EQ(xxh64("a", 1), 0xd24ec4f1a98c6e5bull);
  EXPECT_EQ(xxh64("abc", 3), 0x44bc2cf5ad770999ull);
  EXPECT_EQ(xxh64("nextron", 7), 0x2d5ac7e2065b42f3ull);
  std::string s100, s1000;
  for (int i = 0; i < 100; ++i) s100.push_back(static_cast<char>(i % 251));
  for (int i = 0; i < 1000; ++i) s1000.push_back(static_cast<char>((i * 7 + 3) % 256));
  EXPECT_EQ(xxh64(s100.data(), s100.size()), 0x6ac1e58032166597ull);
  EXPECT_EQ(xxh64(s1000.data(), s1000.size()), 0x5f235fa033f1a3fbull);
}

TEST(TrainCheckpoint, RoundTripIsBitIdentical) {
  const fs::path root = fresh_dir("round_trip");
  const TrainRun run(read_hf_config(kFixture), 1, 7);
  const std::string dir = run.save(root);
  EXPECT_EQ(dir, (root / "step_00000007").string());
  EXPECT_EQ(dir, train_checkpoint_dir(root.string(), 7));
  EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000007"}));
  EXPECT_EQ(entries(dir), (std::set<std::string>{"metadata.h5", "shard_00000.bin", "state.json", "manifest.json"}));

  // The manifest lists every other file with its size and the XXH64 of its bytes, and the number of shards.
  const json manifest = json::parse(read_bytes(fs::path(dir) / "manifest.json"));
  EXPECT_EQ(manifest.at("step"), 7);
  EXPECT_EQ(manifest.at("format_version"), kTrainCheckpointFormatVersion);
  EXPECT_EQ(manifest.at("shards"), 1);
  EXPECT_EQ(manifest.at("files").size(), 3u);
  std::set<std::string> listed;
  for (const json& f : manifest.at("files")) {
    listed.insert(f.at("name").get<std::string>());
    const std::string bytes = read_bytes(fs::path(dir) / f.at("name").get<std::string>());
    EXPECT_EQ(f.at("bytes").get<uint64_t>(), bytes.size());
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(xxh64(bytes.data(), bytes.size())));
    EXPECT_EQ(f.at("xxh64").get<std::string>(), hex);
  }
  EXPECT_EQ(listed, (std::set<std::string>{"metadata.h5", "shard_00000.bin", "state.json"}));
  EXPECT_EQ(json::parse(read_bytes(fs::path(dir) / "state.json")).at("data_position"), run.state.data_position);

  run.expect_loads_identically(dir);
  EXPECT_EQ(latest(root), dir);
  fs::remove_all(root);
}

TEST(TrainCheckpoint, LoadsAnyRangeItsShardsCover) {
  const fs::path root = fresh_dir("ranges");
  const TrainRun run(read_hf_config(kFixture), 2, 3);
  const int64_t n = run.table.total_numel();
  const std::string dir = run.save(root);
  // A ZeRO rank's slice of a whole-model checkpoint.
  const FlatRange r{n / 3, n / 3 + 1001};
  std::vector<float> p(n), m(r.size()), v(r.size());
  load_train_checkpoint(dir, run.config, run.table, p.data(), r, m.data(), v.data());
  EXPECT_TRUE(same_bits(p, run.params));
  EXPECT_TRUE(same_bits(m, std::vector<float>(run.exp_avg.begin() + r.begin, run.exp_avg.begin() + r.end)));
  EXPECT_TRUE(same_bits(v, std::vector<float>(run.exp_avg_sq.begin() + r.begin, run.exp_avg_sq.begin() + r.end)));

  // A checkpoint written by the owner of a shard holds only that shard's moments.
  const fs::path root2 = fresh_dir("ranges_shard");
  OptimizerShard shard = run.shard();
  shard.range = FlatRange{1000, 3000};
  shard.exp_avg = run.exp_avg.data() + 1000;
  shard.exp_avg_sq = run.exp_avg_sq.data() + 1000;
  const std::string dir2 =
      save_train_checkpoint(root2.string(), run.config, run.table, run.params.data(), shard, run.state, 0);
  const FlatRange inside{1500, 2500};
  std::vector<float> m2(inside.size()), v2(inside.size());
  load_train_checkpoint(dir2, run.config, run.table, p.data(), inside, m2.data(), v2.data());
  EXPECT_TRUE(same_bits(m2, std::vector<float>(run.exp_avg.begin() + 1500, run.exp_avg.begin() + 2500)));
  EXPECT_TRUE(same_bits(v2, std::vector<float>(run.exp_avg_sq.begin() + 1500, run.exp_avg_sq.begin() + 2500)));
  // A range reaching past what it holds, before or after: the error names the first parameter with a missing
  // element.
  std::vector<float> big(2000);
  expect_error(
      [&] {
        load_train_checkpoint(dir2, run.config, run.table, p.data(), {0, 2000}, big.data(), big.data());
      },
      {dir2, "holds no optimizer state for elements of '" + param_at(run.table, 0) + "'"});
  expect_error(
      [&] {
        load_train_checkpoint(dir2, run.config, run.table, p.data(), {2500, 3500}, big.data(), big.data());
      },
      {dir2, "holds no optimizer state for elements of '" + param_at(run.table, 3000) + "'"});
  expect_error(
      [&] {
        load_train_checkpoint(dir, run.config, run.table, p.data(), {0, n + 1}, big.data(), big.data());
      },
      {"not inside the model"});
  fs::remove_all(root);
  fs::remove_all(root2);
}

// A shard whose runs are strided (each 2-D tensor stored as two column halves, row by row, as a TP rank holds a
// dim-1 slice) and whose moments are stored in another order (the flat range cut at random points and shuffled, as
// ZeRO ranges): the whole model loads bit-identically, the index holds a few groups per tensor (not one run per
// row), and a reader gives back any runs, including rows of column slices and runs across parameters.
TEST(TrainCheckpoint, AShardOfStridedRunsReadsBackUnderAnyRuns) {
  const fs::path root = fresh_dir("strided");
  const TrainRun run(read_hf_config(kFixture), 15, 4);
  const int64_t n = run.table.total_numel();
  CheckpointShard shard;
  std::vector<float> params, exp_avg, exp_avg_sq;
  int64_t two_d = 0, other = 0;
  for (auto it = run.table.specs().rbegin(); it != run.table.specs().rend(); ++it) {
    const ParamSpec& s = *it;
    if (s.shape.size() == 2 && s.shape[1] >= 2) {
      ++two_d;
      const int64_t rows = s.shape[0], cols = s.shape[1], half = cols / 2;
      for (const auto& [c0, c1] : {std::pair<int64_t, int64_t>{half, cols}, {0, half}})
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t at = s.offset + r * cols + c0;
          shard.param_runs.push_back(FlatRun{at, static_cast<int64_t>(params.size()), c1 - c0});
          params.insert(params.end(), run.params.begin() + at, run.params.begin() + at + (c1 - c0));
        }
    } else {
      ++other;
      shard.param_runs.push_back(FlatRun{s.offset, static_cast<int64_t>(params.size()), s.numel()});
      params.insert(params.end(), run.params.begin() + s.offset, run.params.begin() + s.offset + s.numel());
    }
  }
  std::mt19937_64 rng(15);
  std::vector<int64_t> cuts{0, n};
  for (int i = 0; i < 36; ++i) cuts.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(n)));
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::pair<int64_t, int64_t>> pieces;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) pieces.emplace_back(cuts[i], cuts[i + 1]);
  std::shuffle(pieces.begin(), pieces.end(), rng);
  for (const auto& [a, b] : pieces) {
    shard.moment_runs.push_back(FlatRun{a, static_cast<int64_t>(exp_avg.size()), b - a});
    exp_avg.insert(exp_avg.end(), run.exp_avg.begin() + a, run.exp_avg.begin() + b);
    exp_avg_sq.insert(exp_avg_sq.end(), run.exp_avg_sq.begin() + a, run.exp_avg_sq.begin() + b);
  }
  ASSERT_EQ(static_cast<int64_t>(params.size()), run.table.parameters());  // the entries, not the alignment gaps
  shard.params = params.data();
  shard.exp_avg = exp_avg.data();
  shard.exp_avg_sq = exp_avg_sq.data();
  shard.steps_taken = run.steps_taken;
  shard.hyper = run.hyper;
  const std::string dir = save_train_checkpoint(nullptr, root.string(), run.config, run.table, shard, run.state, 0);
  run.expect_loads_identically(dir);

  // The index: every element once per kind, and at most one group per column half of a 2-D tensor.
  {
    const hid_t f = H5Fopen((fs::path(dir) / "metadata.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hid_t ds = H5Dopen2(f, "index", H5P_DEFAULT);
    ASSERT_GE(ds, 0);
    const hid_t space = H5Dget_space(ds);
    hsize_t len = 0;
    H5Sget_simple_extent_dims(space, &len, nullptr);
    std::vector<int64_t> index(static_cast<size_t>(len));
    ASSERT_GE(H5Dread(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, index.data()), 0);
    H5Sclose(space);
    H5Dclose(ds);
    H5Fclose(f);
    ASSERT_EQ(index.size() % 7, 0u);
    int64_t groups[2] = {0, 0}, numel[2] = {0, 0};
    for (size_t i = 0; i < index.size(); i += 7) {
      EXPECT_EQ(index[i], 0);  // the shard
      const auto kind = static_cast<size_t>(index[i + 1]);
      ASSERT_LT(kind, 2u);
      ++groups[kind];
      numel[kind] += index[i + 3] * index[i + 5];
    }
    EXPECT_EQ(numel[0], run.table.parameters());  // the parameters' runs skip the alignment gaps
    EXPECT_EQ(numel[1], n);                       // the moments' ZeRO-style ranges hold them (zeros)
    EXPECT_LE(groups[0], 2 * two_d + other);
    EXPECT_LE(groups[1], static_cast<int64_t>(pieces.size()));
  }

  const TrainCheckpointReader reader(dir);
  EXPECT_EQ(reader.loaded().steps_taken, run.steps_taken);
  const auto& specs = run.table.specs();
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<FlatRun> runs;
    int64_t at = 0;
    if (trial % 2 == 0) {  // rows of a column slice of a 2-D tensor, then a run across parameter boundaries
      const ParamSpec* s = nullptr;
      while (s == nullptr || s->shape.size() != 2 || s->shape[1] < 2) s = &specs[rng() % specs.size()];
      const int64_t cols = s->shape[1], c0 = static_cast<int64_t>(rng() % static_cast<uint64_t>(cols));
      const int64_t c1 = c0 + 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(cols - c0));
      for (int64_t r = 0; r < s->shape[0]; ++r, at += c1 - c0)
        runs.push_back(FlatRun{s->offset + r * cols + c0, at, c1 - c0});
    }
    for (int k = static_cast<int>(rng() % 4); k >= 0; --k) {
      const int64_t count = 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(n / 8));
      const int64_t first = static_cast<int64_t>(rng() % static_cast<uint64_t>(n - count + 1));
      runs.push_back(FlatRun{first, at, count});
      at += count;
    }
    std::shuffle(runs.begin(), runs.end(), rng);  // the buffer positions stay as assigned
    std::vector<float> want_p(static_cast<size_t>(at)), want_m(want_p.size()), want_v(want_p.size());
    for (const FlatRun& r : runs)
      for (int64_t i = 0; i < r.count; ++i) {
        if (param_at(run.table, r.full_offset + i) == "(none)") {  // an alignment gap: belongs to no parameter,
          want_p[static_cast<size_t>(r.local_offset + i)] = -7.f;  // so nothing is read into it
          want_m[static_cast<size_t>(r.local_offset + i)] = want_v[static_cast<size_t>(r.local_offset + i)] = -7.f;
          continue;
        }
        want_p[static_cast<size_t>(r.local_offset + i)] = run.params[static_cast<size_t>(r.full_offset + i)];
        want_m[static_cast<size_t>(r.local_offset + i)] = run.exp_avg[static_cast<size_t>(r.full_offset + i)];
        want_v[static_cast<size_t>(r.local_offset + i)] = run.exp_avg_sq[static_cast<size_t>(r.full_offset + i)];
      }
    std::vector<float> p(want_p.size(), -7.f), m(want_p.size(), -7.f), v(want_p.size(), -7.f);
    reader.read_params(runs, p.data());
    reader.read_moments(runs, m.data(), v.data());
    EXPECT_TRUE(same_bits(p, want_p)) << "trial " << trial;
    EXPECT_TRUE(same_bits(m, want_m)) << "trial " << trial;
    EXPECT_TRUE(same_bits(v, want_v)) << "trial " << trial;
  }
  reader.read_params({}, nullptr);  // nothing asked: nothing read
  fs::remove_all(root);
}

TEST(TrainCheckpoint, KeepLastDeletesOlderCheckpoints) {
  const fs::path root = fresh_dir("keep_last");
  TrainRun run(read_hf_config(kFixture), 3, 0);
  fs::create_directories(root / "step_00000001.tmp-999999");  // another process's save: never touched
  for (int64_t step = 1; step <= 5; ++step) {
    run.state.step = step;
    run.save(root, /*keep_last=*/2);
  }
  EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000001.tmp-999999", "step_00000004", "step_00000005"}));
  // keep_last 0 keeps everything; incomplete checkpoints are never deleted (nor counted).
  fs::create_directories(root / "step_00000006");
  for (int64_t step : {7, 8}) {
    run.state.step = step;
    run.save(root, /*keep_last=*/0);
  }
  EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000001.tmp-999999", "step_00000004", "step_00000005",
                                                  "step_00000006", "step_00000007", "step_00000008"}));
  run.state.step = 9;
  run.save(root, /*keep_last=*/2);
  EXPECT_EQ(entries(root),
            (std::set<std::string>{"step_00000001.tmp-999999", "step_00000006", "step_00000008", "step_00000009"}));
  run.state.step = 10;
  run.save(root, /*keep_last=*/1);
  EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000001.tmp-999999", "step_00000006", "step_00000010"}));
  EXPECT_EQ(latest(root), (root / "step_00000010").string());
  fs::remove_all(root);
}

TEST(TrainCheckpoint, FindLatestSkipsUnfinishedAndDamagedCheckpoints) {
  const fs::path root = fresh_dir("find_latest");
  EXPECT_EQ(latest(root), std::nullopt);  // no directory
  fs::create_directories(root);
  EXPECT_EQ(latest(root), std::nullopt);  // empty
  const TrainRun one(read_hf_config(kFixture), 4, 1);
  const TrainRun two(read_hf_config(kFixture), 5, 2);
  one.save(root);
  const std::string good = two.save(root);
  EXPECT_EQ(latest(root), good);

  // Newer directories, each broken in one way (copies of step 2 under a newer name).
  auto copy_as = [&](const std::string& name) {
    fs::copy(good, root / name, fs::copy_options::recursive);
    return root / name;
  };
  copy_as("step_00000009.tmp-12345");  // an unfinished save, complete-looking inside
  fs::remove(copy_as("step_00000008") / "manifest.json");
  const fs::path truncated = copy_as("step_00000007") / "metadata.h5";
  fs::resize_file(truncated, fs::file_size(truncated) - 100);
  const fs::path modified = copy_as("step_00000006") / "shard_00000.bin";
  {
    std::fstream f(modified, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(fs::file_size(modified) / 2));
    const char c = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(fs::file_size(modified) / 2));
    f.put(static_cast<char>(c ^ 0x5a));
  }
  const fs::path bad_manifest = copy_as("step_00000005") / "manifest.json";
  fs::remove(bad_manifest);
  std::ofstream(bad_manifest) << "{\"format\": \"nextron-train-checkpoint\", \"files\": [";
  fs::remove(copy_as("step_00000004") / "state.json");
  fs::remove(copy_as("step_00000011") / "shard_00000.bin");
  fs::create_directories(root / "step_00000010.del-1");  // a deletion in progress: not a checkpoint at all
  fs::create_directories(root / "unrelated");

  std::string warnings;
  EXPECT_EQ(latest(root, &warnings), good);
  for (const char* name : {"step_00000011", "step_00000009.tmp-12345", "step_00000008", "step_00000007",
                           "step_00000006", "step_00000005", "step_00000004"})
    EXPECT_NE(warnings.find(name), std::string::npos) << name << " not warned about:\n" << warnings;
  EXPECT_EQ(warnings.find("step_00000010"), std::string::npos) << warnings;
  EXPECT_NE(warnings.find("no manifest.json"), std::string::npos) << warnings;

  // Loading one of them explicitly is an error naming the file.
  std::vector<float> p(two.params.size()), m(p.size()), v(p.size());
  const FlatRange all{0, two.table.total_numel()};
  auto load = [&](const std::string& name) {
    load_train_checkpoint((root / name).string(), two.config, two.table, p.data(), all, m.data(), v.data());
  };
  expect_error([&] { load("step_00000008"); }, {"step_00000008", "incomplete", "manifest.json"});
  expect_error([&] { load("step_00000011"); }, {"step_00000011", "incomplete", "shard_00000.bin is missing"});
  expect_error([&] { load("step_00000007"); }, {"step_00000007", "metadata.h5", "truncated"});
  expect_error([&] { load("step_00000006"); }, {"step_00000006", "checksum of shard_00000.bin"});
  expect_error([&] { load("step_00000005"); }, {"step_00000005", "manifest.json is not a valid manifest"});
  expect_error([&] { load("step_00000004"); }, {"step_00000004", "state.json is missing"});
  expect_error([&] { load("step_00000003"); }, {"step_00000003", "does not exist"});
  // A checkpoint of the earlier whole-model format (its manifest's format_version 1) names what to do instead.
  const fs::path old_format = copy_as("step_00000012") / "manifest.json";
  nlohmann::json j = nlohmann::json::parse(read_bytes(old_format));
  j["format_version"] = 1;
  fs::remove(old_format);
  std::ofstream(old_format) << j.dump();
  expect_error([&] { load("step_00000012"); }, {"step_00000012", "format 1", "nextron-convert", "--init-from"});
  // Format 2 kept the DeltaNet projections in HF's per-key-head row order: refused the same way, naming why.
  j["format_version"] = 2;
  fs::remove(old_format);
  std::ofstream(old_format) << j.dump();
  expect_error([&] { load("step_00000012"); }, {"step_00000012", "format 2", "in_proj_qkvz", "nextron-convert"});
  two.expect_loads_identically(good);
  fs::remove_all(root);
}

TEST(TrainCheckpoint, SaveKilledAtEveryStageLeavesThePreviousCheckpoint) {
  const fs::path root = fresh_dir("killed_stage");
  const TrainRun one(read_hf_config(kFixture), 6, 1);
  const TrainRun two(read_hf_config(kFixture), 7, 2);
  const std::string first = one.save(root, /*keep_last=*/1);
  for (const std::string stage : {"shard", "metadata.h5", "state.json", "manifest.json"}) {
    const int status = run_in_child([&] {
      detail::set_train_checkpoint_hook([&](const std::string& s) {
        if (s == stage) ::kill(::getpid(), SIGKILL);
      });
      two.save(root, /*keep_last=*/1);
    });
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "child did not die at " << stage;
    EXPECT_FALSE(fs::exists(root / "step_00000002")) << stage;
    EXPECT_EQ(latest(root), first) << stage;
    one.expect_loads_identically(first);
  }
  // Killed right after the rename: the new checkpoint is complete and is the one found.
  const int status = run_in_child([&] {
    detail::set_train_checkpoint_hook([&](const std::string& s) {
      if (s == "renamed") ::kill(::getpid(), SIGKILL);
    });
    two.save(root, /*keep_last=*/1);
  });
  ASSERT_TRUE(WIFSIGNALED(status));
  const std::string second = (root / "step_00000002").string();
  EXPECT_EQ(latest(root), second);
  two.expect_loads_identically(second);
  one.expect_loads_identically(first);  // its keep_last pruning never ran
  fs::remove_all(root);
}

TEST(TrainCheckpoint, FailedSaveRemovesItsTemporaryDirectory) {
  const fs::path root = fresh_dir("failed");
  const TrainRun one(read_hf_config(kFixture), 8, 1);
  TrainRun two(read_hf_config(kFixture), 9, 2);
  const std::string first = one.save(root);
  for (const std::string stage : {"shard", "metadata.h5", "state.json", "manifest.json"}) {
    HookGuard guard;
    detail::set_train_checkpoint_hook([&](const std::string& s) {
      if (s == stage) throw Error("simulated disk failure");
    });
    expect_error([&] { two.save(root); }, {"simulated disk failure"});
    EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000001"})) << stage;
  }
  EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000001"}));
  // Bad inputs fail before anything is written.
  two.state.rng_state = "\xff\xfe";
  expect_error([&] { two.save(root); }, {"UTF-8"});
  two.state.rng_state = "ok";
  expect_error([&] { two.save(root, -1); }, {"keep_last is -1"});
  OptimizerShard bad = two.shard();
  bad.range.end = two.table.total_numel() + 1;
  expect_error(
      [&] { save_train_checkpoint(root.string(), two.config, two.table, two.params.data(), bad, two.state, 0); },
      {"not inside the model"});
  EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000001"}));
  EXPECT_EQ(latest(root), first);
  fs::remove_all(root);
}

TEST(TrainCheckpoint, SaveKilledAtRandomMomentsNeverLeavesAPartialCheckpoint) {
  // A larger model (vocab 40000: ~2.6M parameters, 31 MB of checkpoint), so a save takes long enough to be
  // interrupted in the middle of a file.
  const fs::path root = fresh_dir("killed_random");
  const TrainRun one(config_with("vocab_size", 40000), 10, 1);
  const TrainRun two(config_with("vocab_size", 40000), 11, 2);
  const std::string first = one.save(root);
  int interrupted = 0;
  for (int delay_ms : {1, 4, 12, 30}) {
    int pipe_fds[2];
    ASSERT_EQ(::pipe(pipe_fds), 0);
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(pipe_fds[0]);
      const char go = 1;
      if (::write(pipe_fds[1], &go, 1) != 1) ::_exit(3);
      try {
        two.save(root, /*keep_last=*/0);
      } catch (...) {
        ::_exit(2);
      }
      ::_exit(0);
    }
    ::close(pipe_fds[1]);
    char go = 0;
    ASSERT_EQ(::read(pipe_fds[0], &go, 1), 1);
    ::close(pipe_fds[0]);
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    const std::string second = (root / "step_00000002").string();
    const auto found = latest(root);
    ASSERT_TRUE(found.has_value());
    if (fs::exists(second)) {  // the save finished before the kill: it must be complete
      EXPECT_EQ(*found, second);
      two.expect_loads_identically(second);
      fs::remove_all(second);
    } else {
      ++interrupted;
      EXPECT_EQ(*found, first);
    }
    one.expect_loads_identically(first);
  }
  EXPECT_GE(interrupted, 1) << "no save was interrupted; the kill timing assumptions no longer hold";
  fs::remove_all(root);
}

TEST(TrainCheckpoint, SavingTheSameStepAgainReplacesIt) {
  const fs::path root = fresh_dir("same_step");
  const TrainRun one(read_hf_config(kFixture), 12, 3);
  const TrainRun two(read_hf_config(kFixture), 13, 3);
  const std::string a = one.save(root, 2);
  const std::string b = two.save(root, 2);
  EXPECT_EQ(a, b);
  EXPECT_EQ(entries(root), (std::set<std::string>{"step_00000003"}));
  two.expect_loads_identically(b);
  fs::remove_all(root);
}

TEST(TrainCheckpoint, MismatchedConfigIsAClearError) {
  const fs::path root = fresh_dir("mismatch");
  const TrainRun run(read_hf_config(kFixture), 14, 1);
  const std::string dir = run.save(root);
  for (const auto& [key, value, message] : std::vector<std::tuple<std::string, int64_t, std::string>>{
           {"hidden_size", 64, "was trained with hidden_size 32, the model config says 64"},
           {"num_experts", 4, "was trained with num_experts 8, the model config says 4"}}) {
    const ModelConfig other = config_with(key, value);
    const ParamTable table(other);
    std::vector<float> p(table.total_numel()), m(p.size()), v(p.size());
    expect_error(
        [&] {
          load_train_checkpoint(dir, other, table, p.data(), {0, table.total_numel()}, m.data(), v.data());
        },
        {dir, message});
  }
  fs::remove_all(root);
}

}  // namespace nextron::test
