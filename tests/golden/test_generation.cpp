// Generation's cached forward (Model::forward_cached, model/inference_cache.h) against the whole-sequence forward
// that the golden tests match to transformers: on every fixture model, for two sequences in one cache at different
// lengths, the logits of every position reached by prefill (one call over a prompt, and a prompt continued in a
// second call from the cached state) and by decoding (one token per call for both sequences together: the
// recurrent step and the KV cache) equal the full forward's logits at that position.
//
// Tolerance: fp32 on both sides, but the cached path sums differently (the recurrence token by token against the
// chunked form's blocks; attention over a cache of varying length), so the logits differ by rounding: observed
// up to 5e-6 of the logits' scale (hybrid_moe); 1e-4 leaves margin, while a position off by one, a stale conv window or
// state, or a RoPE row of the wrong position moves logits by 1e-2 or more.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "checkpoint/hf_checkpoint.h"
#include "core/error.h"
#include "fixtures.h"
#include "model/model.h"

namespace nextron::test {
namespace {

constexpr double kCachedRtol = 1e-4;

std::vector<int64_t> random_ids(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = pick(rng);
  return ids;
}

// The whole-sequence forward's logits of one sequence: (S, V).
std::vector<float> full_logits(Model& model, const std::vector<int64_t>& ids) {
  const int64_t S = static_cast<int64_t>(ids.size());
  model.forward(ids.data(), nullptr, 1, S);
  const Tensor logits = model.logits();
  return std::vector<float>(logits.f32(), logits.f32() + logits.numel());
}

// Worst |got - want| over one position's logits, relative to the largest |want|.
double rel_error(const float* got, const float* want, int64_t V) {
  double err = 0, scale = 0;
  for (int64_t j = 0; j < V; ++j) {
    err = std::max(err, std::abs(double(got[j]) - want[j]));
    scale = std::max(scale, std::abs(double(want[j])));
  }
  return err / scale;
}

TEST(Generation, CachedForwardEqualsFullForward) {
  for (const std::string& name : fixture_names()) {
    SCOPED_TRACE(name);
    const std::string dir = fixtures_dir() + "/" + name;
    const ModelConfig config = read_hf_config(dir);
    Model model(config);
    load_hf_weights(dir, model.table(), model.params().f32());
    model.params_changed();
    const int64_t V = config.vocab_size;
    // Sequence 0: a 70-token prompt (past the 64-token chunk) then 12 decoded tokens. Sequence 1: a 5-token prompt
    // given as 3 + 2 tokens (the second call continues from the cached state) then the same 12 steps.
    const std::vector<int64_t> seq0 = random_ids(82, V, 1), seq1 = random_ids(17, V, 2);
    const std::vector<float> want0 = full_logits(model, seq0), want1 = full_logits(model, seq1);
    InferenceCache cache = model.new_inference_cache(2, 90);
    double worst = 0;
    auto check = [&](const float* got, const std::vector<float>& want, int64_t pos, const char* what) {
      const double e = rel_error(got, want.data() + pos * V, V);
      worst = std::max(worst, e);
      EXPECT_LT(e, kCachedRtol) << what << " position " << pos;
    };
    std::vector<float> got = model.forward_cached(cache, 0, seq0.data(), 1, 70);
    check(got.data(), want0, 69, "prefill");
    got = model.forward_cached(cache, 1, seq1.data(), 1, 3);
    check(got.data(), want1, 2, "prefill");
    got = model.forward_cached(cache, 1, seq1.data() + 3, 1, 2);
    check(got.data(), want1, 4, "continued prefill");
    EXPECT_EQ(cache.length, (std::vector<int64_t>{70, 5}));
    for (int64_t t = 0; t < 12; ++t) {
      const int64_t ids[2] = {seq0[static_cast<size_t>(70 + t)], seq1[static_cast<size_t>(5 + t)]};
      got = model.forward_cached(cache, 0, ids, 2, 1);
      check(got.data(), want0, 70 + t, "decode, sequence 0");
      check(got.data() + V, want1, 5 + t, "decode, sequence 1");
    }
    std::printf("%s: worst relative logit error of the cached forward %.2e\n", name.c_str(), worst);

    // A reset slot starts a new sequence: its logits are the new sequence's, not a continuation of the old one.
    cache.reset_slot(1);
    got = model.forward_cached(cache, 1, seq0.data(), 1, 9);
    check(got.data(), want0, 8, "prefill after reset");
  }
}

TEST(Generation, CacheOverflowAndBadSlotsAreErrors) {
  const std::string dir = fixtures_dir() + "/" + fixture_names().front();
  const ModelConfig config = read_hf_config(dir);
  Model model(config);
  InferenceCache cache = model.new_inference_cache(1, 8);
  const std::vector<int64_t> ids(9, 1);
  auto message = [&](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { model.forward_cached(cache, 0, ids.data(), 1, 9); }).find("more than the cache's capacity 8"),
            std::string::npos);
  EXPECT_NE(message([&] { model.forward_cached(cache, 1, ids.data(), 1, 1); }).find("outside the cache's 1"),
            std::string::npos);
  EXPECT_EQ(cache.length[0], 0);  // a refused call leaves the cache as it was
}

}  // namespace
}  // namespace nextron::test
