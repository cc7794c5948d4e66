// Norm ops: zero-centred RMSNorm, gated RMSNorm, L2 norm. Forwards against the formulas written out directly,
// gradients against finite differences in double, accumulating on top of nonzero gradient buffers.
#include <cmath>

#include "gradcheck.h"
#include "kernels/cpu/l2norm.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rmsnorm_gated.h"

namespace nextron::test {

namespace {
std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

double silu(double v) { return v / (1 + std::exp(-v)); }

constexpr double kEps = 1e-6;
}  // namespace

TEST(RmsNorm, ForwardMatchesNaiveAndGradientsMatchFiniteDifferences) {
  const int64_t N = 4, D = 5;
  auto x = randn(N * D, 1), w = randn(D, 2, 0.5), r = randn(N * D, 3);
  std::vector<double> y(N * D), rstd(N);
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, kEps);
  for (int64_t n = 0; n < N; ++n) {
    double ms = 0;
    for (int64_t d = 0; d < D; ++d) ms += x[n * D + d] * x[n * D + d] / D;
    EXPECT_NEAR(rstd[n], 1 / std::sqrt(ms + kEps), 1e-12);
    for (int64_t d = 0; d < D; ++d) EXPECT_NEAR(y[n * D + d], x[n * D + d] / std::sqrt(ms + kEps) * (1 + w[d]), 1e-12);
  }
  const auto dx0 = randn(N * D, 4), dw0 = randn(D, 5);
  auto dx = dx0, dw = dw0;
  cpu::rmsnorm_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), rstd.data(), N, D);
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww) {
    std::vector<double> yy(N * D), rr(N);
    cpu::rmsnorm_forward(yy.data(), rr.data(), xx.data(), ww.data(), N, D, kEps);
    return dot(yy, r);
  };
  expect_gradient([&](const std::vector<double>& v) { return loss(v, w); }, x, minus(dx, dx0), "dx");
  expect_gradient([&](const std::vector<double>& v) { return loss(x, v); }, w, minus(dw, dw0), "dw");

  // nullptr skips; float agrees with double; in place.
  std::vector<double> dw_only(D);
  cpu::rmsnorm_backward<double>(nullptr, dw_only.data(), r.data(), x.data(), w.data(), rstd.data(), N, D);
  for (int64_t d = 0; d < D; ++d) EXPECT_NEAR(dw_only[d], dw[d] - dw0[d], 1e-12);
  auto xf = to_float(x), wf = to_float(w);
  std::vector<float> rf(N);
  cpu::rmsnorm_forward(xf.data(), rf.data(), xf.data(), wf.data(), N, D, kEps);
  for (int64_t i = 0; i < N * D; ++i) EXPECT_NEAR(xf[i], y[i], 1e-5);
}

TEST(RmsNorm, WeightGradientOverManyRowsMatchesColumnSum) {
  const int64_t N = 131, D = 3;  // more rows than the backward's 64 row blocks, split unevenly
  auto x = randn(N * D, 6), w = randn(D, 7), g = randn(N * D, 8);
  std::vector<double> y(N * D), rstd(N), dw(D, 1.0);
  cpu::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, D, kEps);
  cpu::rmsnorm_backward<double>(nullptr, dw.data(), g.data(), x.data(), w.data(), rstd.data(), N, D);
  for (int64_t d = 0; d < D; ++d) {
    double s = 1.0;
    for (int64_t n = 0; n < N; ++n) s += g[n * D + d] * x[n * D + d] * rstd[n];
    EXPECT_NEAR(dw[d], s, 1e-11);
  }
}

TEST(RmsNormGated, ForwardMatchesNaiveAndGradientsMatchFiniteDifferences) {
  const int64_t N = 4, D = 6;
  auto x = randn(N * D, 11), z = randn(N * D, 12), w = randn(D, 13), r = randn(N * D, 14);
  std::vector<double> y(N * D), rstd(N);
  cpu::rmsnorm_gated_forward(y.data(), rstd.data(), x.data(), z.data(), w.data(), N, D, kEps);
  for (int64_t n = 0; n < N; ++n) {
    double ms = 0;
    for (int64_t d = 0; d < D; ++d) ms += x[n * D + d] * x[n * D + d] / D;
    EXPECT_NEAR(rstd[n], 1 / std::sqrt(ms + kEps), 1e-12);
    for (int64_t d = 0; d < D; ++d)
      EXPECT_NEAR(y[n * D + d], w[d] * x[n * D + d] / std::sqrt(ms + kEps) * silu(z[n * D + d]), 1e-12);
  }
  const auto dx0 = randn(N * D, 15), dz0 = randn(N * D, 16), dw0 = randn(D, 17);
  auto dx = dx0, dz = dz0, dw = dw0;
  cpu::rmsnorm_gated_backward(dx.data(), dz.data(), dw.data(), r.data(), x.data(), z.data(), w.data(), rstd.data(), N,
                              D);
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& zz, const std::vector<double>& ww) {
    std::vector<double> yy(N * D), rr(N);
    cpu::rmsnorm_gated_forward(yy.data(), rr.data(), xx.data(), zz.data(), ww.data(), N, D, kEps);
    return dot(yy, r);
  };
  expect_gradient([&](const std::vector<double>& v) { return loss(v, z, w); }, x, minus(dx, dx0), "dx");
  expect_gradient([&](const std::vector<double>& v) { return loss(x, v, w); }, z, minus(dz, dz0), "dz");
  expect_gradient([&](const std::vector<double>& v) { return loss(x, z, v); }, w, minus(dw, dw0), "dw");

  std::vector<double> dz_only(N * D);
  cpu::rmsnorm_gated_backward<double>(nullptr, dz_only.data(), nullptr, r.data(), x.data(), z.data(), w.data(),
                                      rstd.data(), N, D);
  for (int64_t i = 0; i < N * D; ++i) EXPECT_NEAR(dz_only[i], dz[i] - dz0[i], 1e-12);
  auto xf = to_float(x), zf = to_float(z), wf = to_float(w);
  std::vector<float> yf(N * D), rf(N);
  cpu::rmsnorm_gated_forward(yf.data(), rf.data(), xf.data(), zf.data(), wf.data(), N, D, kEps);
  for (int64_t i = 0; i < N * D; ++i) EXPECT_NEAR(yf[i], y[i], 1e-5);
}

TEST(L2Norm, ForwardMatchesNaiveAndGradientsMatchFiniteDifferences) {
  const int64_t N = 4, D = 5;
  auto x = randn(N * D, 21), r = randn(N * D, 22);
  std::vector<double> y(N * D);
  cpu::l2norm_forward(y.data(), x.data(), N, D);
  for (int64_t n = 0; n < N; ++n) {
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += x[n * D + d] * x[n * D + d];
    for (int64_t d = 0; d < D; ++d) EXPECT_NEAR(y[n * D + d], x[n * D + d] / std::sqrt(ss + 1e-6), 1e-12);
  }
  const auto dx0 = randn(N * D, 23);
  auto dx = dx0;
  cpu::l2norm_backward(dx.data(), r.data(), x.data(), N, D);
  expect_gradient(
      [&](const std::vector<double>& v) {
        std::vector<double> yy(N * D);
        cpu::l2norm_forward(yy.data(), v.data(), N, D);
        return dot(yy, r);
      },
      x, minus(dx, dx0), "dx");

  // A tiny row is dominated by eps rather than blowing up; in-place float agrees with double.
  std::vector<double> tiny(D, 1e-5), ty(D);
  cpu::l2norm_forward(ty.data(), tiny.data(), 1, D);
  EXPECT_NEAR(ty[0], 1e-5 / std::sqrt(D * 1e-10 + 1e-6), 1e-15);
  auto xf = to_float(x);
  cpu::l2norm_forward(xf.data(), xf.data(), N, D);
  for (int64_t i = 0; i < N * D; ++i) EXPECT_NEAR(xf[i], y[i], 1e-6);
}

}  // namespace nextron::test
