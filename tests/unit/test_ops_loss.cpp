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

}  // namespace nextron::test
