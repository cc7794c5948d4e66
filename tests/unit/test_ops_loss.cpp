// Embedding lookup and token cross-entropy: forwards against direct formulas, gradients against finite differences
// (accumulating on top of nonzero gradient buffers), and bad ids / targets rejected with a message.
#include <cmath>
#include <string>

#include "core/error.h"
#include "gradcheck.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"

namespace nextron::test {

namespace {
std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

template <typename F>
void expect_error_mentioning(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    FAIL() << "expected nextron::Error";
  } catch (const Error& e) {
    for (const auto& s : needles) EXPECT_NE(std::string(e.what()).find(s), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(Embedding, ForwardGathersRowsAndBackwardScattersRepeatedIds) {
  const int64_t V = 6, H = 3, N = 5;
  const std::vector<int64_t> ids = {4, 0, 4, 5, 2};
  auto table = randn(V * H, 1), r = randn(N * H, 2);
  std::vector<double> out(N * H);
  cpu::embedding_forward(out.data(), table.data(), ids.data(), N, H, V);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) EXPECT_EQ(out[n * H + h], table[ids[n] * H + h]);

  const auto g0 = randn(V * H, 3);
  auto dtable = g0;
  cpu::embedding_backward(dtable.data(), r.data(), ids.data(), N, H, V);
  auto loss = [&](const std::vector<double>& t) {
    std::vector<double> o(N * H);
    cpu::embedding_forward(o.data(), t.data(), ids.data(), N, H, V);
    return dot(o, r);
  };
  expect_gradient(loss, table, minus(dtable, g0), "dtable");
}

TEST(Embedding, WideRowsAcrossColumnBlocks) {
  // H spans several of the backward's column blocks; float instantiation.
  const int64_t V = 4, H = 150, N = 7;
  const std::vector<int64_t> ids = {1, 3, 1, 1, 0, 3, 2};
  const auto r = to_float(randn(N * H, 4));
  std::vector<float> dtable(V * H, 0.5f);
  cpu::embedding_backward(dtable.data(), r.data(), ids.data(), N, H, V);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t h = 0; h < H; ++h) {
      float want = 0.5f;
      for (int64_t n = 0; n < N; ++n)
        if (ids[n] == v) want += r[n * H + h];
      EXPECT_FLOAT_EQ(dtable[v * H + h], want);
    }
}

TEST(Embedding, OutOfRangeIdThrows) {
  const int64_t V = 6, H = 2;
  std::vector<double> table(V * H), out(2 * H);
  for (int64_t bad : {int64_t(6), int64_t(-1), int64_t(1000)}) {
    const std::vector<int64_t> ids = {1, bad};
    expect_error_mentioning([&] { cpu::embedding_forward(out.data(), table.data(), ids.data(), 2, H, V); },
                            {std::to_string(bad), "6"});
    expect_error_mentioning([&] { cpu::embedding_backward(table.data(), out.data(), ids.data(), 2, H, V); },
                            {std::to_string(bad), "6"});
  }
}

TEST(CrossEntropy, ForwardMatchesLogSoftmaxAndGradientMatchesFiniteDifferences) {
  const int64_t N = 5, V = 7;
  const std::vector<int64_t> targets = {3, cpu::kIgnoreIndex, 0, 6, 3};
  auto logits = randn(N * V, 5, 2.0);
  std::vector<double> lse(N), row(N);
  double sum = 0;
  int64_t count = 0;
  cpu::cross_entropy_forward(&sum, &count, row.data(), lse.data(), logits.data(), targets.data(), N, V);
  EXPECT_EQ(count, 4);
  double want_sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    double z = 0;
    for (int64_t v = 0; v < V; ++v) z += std::exp(logits[n * V + v]);
    EXPECT_NEAR(lse[n], std::log(z), 1e-12);
    const double want = targets[n] < 0 ? 0.0 : -std::log(std::exp(logits[n * V + targets[n]]) / z);
    EXPECT_NEAR(row[n], want, 1e-12);
    want_sum += want;
  }
  EXPECT_NEAR(sum, want_sum, 1e-12);

  // Mean loss: scale = 1 / count. Ignored row 1 must get no gradient.
  const auto g0 = randn(N * V, 6);
  auto dlogits = g0;
  cpu::cross_entropy_backward(dlogits.data(), logits.data(), lse.data(), targets.data(), 1.0 / count, N, V);
  for (int64_t v = 0; v < V; ++v) EXPECT_EQ(dlogits[V + v], g0[V + v]);
  auto mean_loss = [&](const std::vector<double>& l) {
    std::vector<double> ls(N);
    double s = 0;
    int64_t c = 0;
    cpu::cross_entropy_forward(&s, &c, static_cast<double*>(nullptr), ls.data(), l.data(), targets.data(), N, V);
    return s / double(c);
  };
  expect_gradient(mean_loss, logits, minus(dlogits, g0), "dlogits");
}

TEST(CrossEntropy, StableForHugeLogitsInFloat) {
  const int64_t N = 2, V = 3;
  const std::vector<float> logits = {1000.f, 999.f, 998.f, -1000.f, -1000.f, -1000.f};
  const std::vector<int64_t> targets = {1, 2};
  std::vector<float> lse(N), row(N);
  double sum = 0;
  int64_t count = 0;
  cpu::cross_entropy_forward(&sum, &count, row.data(), lse.data(), logits.data(), targets.data(), N, V);
  const double l0 = 1.0 + std::log(1.0 + std::exp(-1.0) + std::exp(-2.0));
  EXPECT_NEAR(row[0], l0, 1e-5);
  EXPECT_NEAR(row[1], std::log(3.0), 1e-5);
  EXPECT_NEAR(sum, l0 + std::log(3.0), 1e-5);
  std::vector<float> d(N * V, 0.f);
  cpu::cross_entropy_backward(d.data(), logits.data(), lse.data(), targets.data(), 1.f, N, V);
  // The saved float lse near 1000 is exact only to its ulp (6e-5), which bounds the softmax's relative error.
  for (float v : d) EXPECT_TRUE(std::isfinite(v));
  EXPECT_NEAR(d[1], std::exp(-1.0) / (1.0 + std::exp(-1.0) + std::exp(-2.0)) - 1, 1e-4);
  EXPECT_NEAR(d[4], 1.0 / 3, 1e-4);
  EXPECT_NEAR(d[5], 1.0 / 3 - 1, 1e-4);
}

TEST(CrossEntropy, AllIgnoredGivesZeroCount) {
  const int64_t N = 2, V = 3;
  const std::vector<double> logits = randn(N * V, 7);
  const std::vector<int64_t> targets = {cpu::kIgnoreIndex, cpu::kIgnoreIndex};
  std::vector<double> lse(N), d(N * V, 0.0);
  double sum = 1;
  int64_t count = 1;
  cpu::cross_entropy_forward(&sum, &count, static_cast<double*>(nullptr), lse.data(), logits.data(), targets.data(), N,
                             V);
  EXPECT_EQ(sum, 0.0);
  EXPECT_EQ(count, 0);
  cpu::cross_entropy_backward(d.data(), logits.data(), lse.data(), targets.data(), 1.0, N, V);
  for (double v : d) EXPECT_EQ(v, 0.0);
}

TEST(CrossEntropy, OutOfRangeTargetThrows) {
  const int64_t N = 2, V = 5;
  std::vector<double> logits(N * V), lse(N), d(N * V);
  double sum = 0;
  int64_t count = 0;
  for (int64_t bad : {int64_t(5), int64_t(-1), int64_t(-99)}) {
    const std::vector<int64_t> targets = {0, bad};
    expect_error_mentioning(
        [&] {
          cpu::cross_entropy_forward(&sum, &count, static_cast<double*>(nullptr), lse.data(), logits.data(),
                                     targets.data(), N, V);
        },
        {std::to_string(bad), "5"});
    expect_error_mentioning(
        [&] { cpu::cross_entropy_backward(d.data(), logits.data(), lse.data(), targets.data(), 1.0, N, V); },
        {std::to_string(bad), "5"});
  }
}

// --- Vocab-parallel pieces: P shards of one vocabulary must reproduce the whole-vocabulary kernels.

namespace {

// Columns [s.begin, s.begin + s.size) of a row-major (N, V) matrix.
std::vector<float> columns(const std::vector<float>& x, int64_t N, int64_t V, const VocabShard& s) {
  std::vector<float> out(N * s.size);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < s.size; ++v) out[n * s.size + v] = x[n * V + s.begin + v];
  return out;
}

// Uneven shards on purpose (the kernels take any begin / size): {0..4}, {5..5}, {6..12}.
std::vector<VocabShard> shards_of_13() { return {{0, 5, 13}, {5, 1, 13}, {6, 7, 13}}; }

}  // namespace

TEST(VocabParallel, EmbeddingShardsSumToTheWholeLookupAndGradient) {
  const int64_t V = 13, H = 70, N = 9;  // H spans two of the backward's column blocks
  const std::vector<int64_t> ids = {12, 0, 5, 5, 7, 0, 4, 6, 12};
  const auto table = to_float(randn(V * H, 11)), dout = to_float(randn(N * H, 12));
  std::vector<float> whole(N * H), dwhole(V * H, 0.25f);
  cpu::embedding_forward(whole.data(), table.data(), ids.data(), N, H, V);
  cpu::embedding_backward(dwhole.data(), dout.data(), ids.data(), N, H, V);
  std::vector<float> sum(N * H, 0.0f);
  for (const VocabShard& s : shards_of_13()) {
    const std::vector<float> rows(table.begin() + s.begin * H, table.begin() + (s.begin + s.size) * H);
    std::vector<float> out(N * H, 99.0f), drows(s.size * H, 0.25f);
    cpu::embedding_forward(out.data(), rows.data(), ids.data(), N, H, s);
    cpu::embedding_backward(drows.data(), dout.data(), ids.data(), N, H, s);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h) {
        // Ids held: the row itself; the others: exact zeros (the TP sum must not pick up anything else).
        EXPECT_EQ(out[n * H + h], s.holds(ids[n]) ? whole[n * H + h] : 0.0f);
        sum[n * H + h] += out[n * H + h];
      }
    for (int64_t i = 0; i < s.size * H; ++i) EXPECT_EQ(drows[i], dwhole[s.begin * H + i]) << "shard " << s.begin;
  }
  EXPECT_EQ(sum, whole);
  std::vector<float> out(N * H);
  const std::vector<int64_t> bad = {3, 13};
  expect_error_mentioning(
      [&] { cpu::embedding_forward(out.data(), table.data(), bad.data(), 2, H, shards_of_13()[0]); }, {"13"});
}

TEST(VocabParallel, CrossEntropyFromShardStatsMatchesTheWholeVocabulary) {
  const int64_t N = 6, V = 13;
  // Row 3 has its max in the single-column shard; row 4 is ignored; targets in every shard.
  const std::vector<int64_t> targets = {0, 5, 12, 7, cpu::kIgnoreIndex, 4};
  auto logits = to_float(randn(N * V, 13, 3.0));
  logits[3 * V + 5] = 20.0f;
  std::vector<float> lse(N), row(N);
  double sum = 0;
  int64_t count = 0;
  cpu::cross_entropy_forward(&sum, &count, row.data(), lse.data(), logits.data(), targets.data(), N, V);
  const auto shards = shards_of_13();
  const int64_t P = static_cast<int64_t>(shards.size());
  std::vector<float> stats(P * 3 * N);
  for (int64_t r = 0; r < P; ++r)
    cpu::cross_entropy_partial(stats.data() + r * 3 * N, columns(logits, N, V, shards[r]).data(), targets.data(), N,
                               shards[r]);
  std::vector<float> lse_p(N), row_p(N);
  double sum_p = 0;
  cpu::cross_entropy_combine(&sum_p, row_p.data(), lse_p.data(), stats.data(), P, targets.data(), N, V);
  for (int64_t n = 0; n < N; ++n) {
    EXPECT_NEAR(lse_p[n], lse[n], 2e-6 * std::fabs(lse[n])) << n;
    EXPECT_NEAR(row_p[n], row[n], 2e-6 * std::max(1.0f, std::fabs(row[n]))) << n;
  }
  EXPECT_NEAR(sum_p, sum, 1e-5 * std::fabs(sum));

  // Backward: each shard's columns of the whole-vocabulary gradient.
  const float scale = 1.0f / static_cast<float>(count);
  std::vector<float> dwhole(N * V, 0.0f);
  cpu::cross_entropy_backward(dwhole.data(), logits.data(), lse.data(), targets.data(), scale, N, V);
  for (const VocabShard& s : shards) {
    const auto local = columns(logits, N, V, s);
    std::vector<float> d(N * s.size, 0.0f);
    cpu::cross_entropy_backward(d.data(), local.data(), lse.data(), targets.data(), scale, N, s);
    const auto want = columns(dwhole, N, V, s);
    for (int64_t i = 0; i < N * s.size; ++i) EXPECT_NEAR(d[i], want[i], 1e-7) << "shard " << s.begin << " at " << i;
  }
  const std::vector<int64_t> bad = {0, 13, 1, 2, 3, 4};
  expect_error_mentioning(
      [&] { cpu::cross_entropy_combine(&sum_p, row_p.data(), lse_p.data(), stats.data(), P, bad.data(), N, V); },
      {"13"});
}

}  // namespace nextron::test
