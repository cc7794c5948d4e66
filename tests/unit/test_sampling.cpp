// The generation sampler (generate/generator.h sample_token) against closed forms: greedy is the first maximum;
// temperature sampling draws softmax(logits / T); top-k and top-p renormalise over the tokens they keep, as
// transformers' TopKLogitsWarper and TopPLogitsWarper do. Frequencies over 200,000 draws are compared with the
// probabilities within 5 standard deviations of a binomial count (a wrong temperature or a kept token too many moves
// a frequency by tens of deviations).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/error.h"
#include "generate/generator.h"

namespace nextron::test {
namespace {

constexpr int kDraws = 200000;

std::vector<double> frequencies(const std::vector<float>& logits, const SamplingOptions& o) {
  std::mt19937_64 rng(o.seed);
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < kDraws; ++i) f[size_t(sample_token(logits.data(), int64_t(logits.size()), o, rng))] += 1;
  for (double& x : f) x /= kDraws;
  return f;
}

// p: the expected probabilities (0 for tokens that must never be drawn).
void expect_distribution(const std::vector<double>& got, const std::vector<double>& p) {
  for (size_t j = 0; j < p.size(); ++j) {
    if (p[j] == 0) {
      EXPECT_EQ(got[j], 0.0) << "token " << j << " must not be drawn";
      continue;
    }
    const double sigma = std::sqrt(p[j] * (1 - p[j]) / kDraws);
    EXPECT_NEAR(got[j], p[j], 5 * sigma) << "token " << j;
  }
}

std::vector<double> softmax(const std::vector<float>& l, double T, const std::vector<bool>& keep) {
  std::vector<double> p(l.size(), 0.0);
  double sum = 0;
  for (size_t j = 0; j < l.size(); ++j)
    if (keep[j]) sum += p[j] = std::exp(l[j] / T);
  for (double& x : p) x /= sum;
  return p;
}

TEST(Sampling, GreedyIsTheFirstMaximum) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  std::mt19937_64 rng(0);
  EXPECT_EQ(sample_token(logits.data(), 4, SamplingOptions{}, rng), 1);
}

TEST(Sampling, TemperatureDrawsTheScaledSoftmax) {
  const std::vector<float> logits = {1.0f, 0.0f, -0.5f, 0.7f, -2.0f};
  for (double T : {0.5, 1.0, 2.0}) {
    SamplingOptions o;
    o.temperature = T;
    o.seed = 7;
    expect_distribution(frequencies(logits, o), softmax(logits, T, std::vector<bool>(5, true)));
  }
}

TEST(Sampling, TopKAndTopPKeepTheirTokens) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1 (in a shuffled order).
  const std::vector<float> logits = {float(std::log(0.15)), float(std::log(0.5)), float(std::log(0.05)),
                                     float(std::log(0.3))};
  SamplingOptions o;
  o.temperature = 1;
  o.seed = 11;
  o.top_k = 2;
  expect_distribution(frequencies(logits, o), softmax(logits, 1, {false, true, false, true}));
  o.top_k = 0;
  o.top_p = 0.7;  // 0.5 < 0.7 <= 0.5 + 0.3: the two most likely
  expect_distribution(frequencies(logits, o), softmax(logits, 1, {false, true, false, true}));
  o.top_p = 0.9;  // 0.8 < 0.9 <= 0.95: three
  expect_distribution(frequencies(logits, o), softmax(logits, 1, {true, true, false, true}));
  o.top_p = 0.2;  // fewer than the most likely token's probability: it alone
  expect_distribution(frequencies(logits, o), {0, 1, 0, 0});
  o.top_p = 1.0;
  o.top_k = 3;
  o.temperature = 0.5;  // temperature first, then the filters
  expect_distribution(frequencies(logits, o), softmax(logits, 0.5, {true, true, false, true}));
}

// Top-k orders only the tokens it keeps (selection of the k-th best, then a sort of those): the draws are those of
// the reference below, which sorts the whole vocabulary stably by logit, draw for draw with one seed, on a
// vocabulary with many ties (at the k-th value too: tied tokens stay, as TopKLogitsWarper keeps them).
TEST(Sampling, TopKSelectionDrawsAsTheFullSort) {
  auto reference = [](const std::vector<float>& l, const SamplingOptions& o, std::mt19937_64& rng) {
    std::vector<int64_t> order(l.size());
    for (size_t i = 0; i < l.size(); ++i) order[i] = int64_t(i);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[size_t(a)] > l[size_t(b)]; });
    size_t keep = std::min(order.size(), size_t(o.top_k));
    const float kth = l[size_t(order[keep - 1])];
    while (keep < order.size() && l[size_t(order[keep])] >= kth) ++keep;  // ties with the k-th stay
    std::vector<double> p(keep);
    const double top = double(l[size_t(order[0])]) / o.temperature;
    double sum = 0;
    for (size_t i = 0; i < keep; ++i) sum += p[i] = std::exp(double(l[size_t(order[i])]) / o.temperature - top);
    for (double& x : p) x /= sum;
    if (o.top_p < 1) {
      double cum = 0;
      size_t n = 0;
      while (n < keep && cum < o.top_p) cum += p[n++];
      p.resize(std::max<size_t>(n, 1));
    }
    std::discrete_distribution<size_t> pick(p.begin(), p.end());
    return order[pick(rng)];
  };
  std::mt19937_64 gen(5);
  std::vector<float> logits(3000);
  for (float& x : logits) x = float(int(gen() % 400)) / 40.0f;  // 400 distinct values: ties everywhere
  for (int top_k : {1, 7, 40, 2999}) {
    for (double top_p : {1.0, 0.6}) {
      SamplingOptions o;
      o.temperature = 0.8;
      o.top_k = top_k;
      o.top_p = top_p;
      std::mt19937_64 a(21), b(21);
      for (int i = 0; i < 200; ++i)
        ASSERT_EQ(sample_token(logits.data(), int64_t(logits.size()), o, a), reference(logits, o, b))
            << "top_k " << top_k << " top_p " << top_p << " draw " << i;
    }
  }
}

TEST(Sampling, OptionsOutsideTheirRangesAreErrors) {
  auto message = [](const SamplingOptions& o) {
    try {
      o.validate();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  SamplingOptions o;
  o.temperature = -1;
  EXPECT_NE(message(o).find("--temperature must be >= 0"), std::string::npos);
  o = {};
  o.top_p = 0;
  EXPECT_NE(message(o).find("--top-p must be in (0, 1]"), std::string::npos);
  o = {};
  o.top_k = -2;
  EXPECT_NE(message(o).find("--top-k must be >= 0"), std::string::npos);
}

}  // namespace
}  // namespace nextron::test
