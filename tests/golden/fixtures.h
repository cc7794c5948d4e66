// The HF golden fixtures (tests/fixtures, made by tools/make_fixtures.py and tools/make_train_fixture.py) as the
// golden tests read them, shared by the CPU tests (tests/golden) and the GPU tests (tests/cuda).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "train/options.h"

namespace nextron::test {

// tests/fixtures of the source tree, or $NEXTRON_FIXTURES_DIR: a test binary run away from its source tree (the GPU
// bundle of tools/gpu_check.sh) is told where the fixtures are.
inline std::string fixtures_dir() {
  const char* env = std::getenv("NEXTRON_FIXTURES_DIR");
  return env && *env ? env : NEXTRON_FIXTURES_DIR;
}

// The model fixtures: every directory with a golden.safetensors (HF checkpoint + transformers' outputs).
inline std::vector<std::string> fixture_names() {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(fixtures_dir()))
    if (e.is_directory() && std::filesystem::exists(e.path() / "golden.safetensors"))
      names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

// The training-curve fixture: fixed batches, transformers + torch.optim.AdamW's losses, grad norms, lrs and final
// weights, and the settings that produced them.
struct TrainCurveFixture {
  std::string dir = fixtures_dir() + "/train_curve";
  SafetensorsReader batches{dir + "/batches.safetensors"};
  SafetensorsReader expected{dir + "/expected.safetensors"};
  std::vector<int64_t> tokens = batches.read_i64("tokens");
  Shape shape = batches.entry("tokens").shape;  // (steps, accum, micro, S + 1)
  int64_t steps = shape[0], accum = shape[1], micro = shape[2], S = shape[3] - 1;

  // The fixture's run as TrainOptions (start from its HF checkpoint, its schedule and AdamW settings).
  TrainOptions options() const {
    const auto st = nlohmann::json::parse(expected.metadata().at("settings"));
    TrainOptions o;
    o.init_from = dir + "/hf";
    o.seq_len = S;
    o.micro_batch = micro;
    o.global_batch = micro * accum;
    o.train_steps = steps;
    o.lr.style = LrDecayStyle::cosine;
    o.lr.lr = st["lr"];
    o.lr.min_lr = st["min_lr"];
    o.lr.warmup_steps = st["warmup"];
    o.adam.beta1 = st["beta1"];
    o.adam.beta2 = st["beta2"];
    o.adam.eps = st["eps"];
    o.adam.weight_decay = st["weight_decay"];
    o.clip_grad = st["clip"];
    o.resume = "none";
    return o;
  }
  // Training sample `index` (S + 1 tokens) of the fixture's stream.
  void sample(int64_t index, int64_t* out) const {
    std::memcpy(out, tokens.data() + index * (S + 1), (S + 1) * sizeof(int64_t));
  }
};

}  // namespace nextron::test
