#include "gradcheck.h"
#include "kernels/cpu/linear.h"

namespace nextron::test {

TEST(Linear, ForwardMatchesNaiveAndGradientsMatchFiniteDifferences) {
  const int64_t N = 5, IN = 4, OUT = 3;
  auto x = randn(N * IN, 1), w = randn(OUT * IN, 2), b = randn(OUT, 3), r = randn(N * OUT, 4);
  std::vector<double> y(N * OUT);
  cpu::linear_forward(y.data(), x.data(), w.data(), b.data(), N, IN, OUT);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OUT; ++o) {
      double s = b[o];
      for (int64_t i = 0; i < IN; ++i) s += x[n * IN + i] * w[o * IN + i];
      EXPECT_NEAR(y[n * OUT + o], s, 1e-12);
    }
  std::vector<double> dx(N * IN), dw(OUT * IN), db(OUT);
  cpu::linear_backward(dx.data(), dw.data(), db.data(), r.data(), x.data(), w.data(), N, IN, OUT);
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww, const std::vector<double>& bb) {
    std::vector<double> yy(N * OUT);
    cpu::linear_forward(yy.data(), xx.data(), ww.data(), bb.data(), N, IN, OUT);
    return dot(yy, r);
  };
  expect_gradient([&](const std::vector<double>& v) { return loss(v, w, b); }, x, dx, "dx");
  expect_gradient([&](const std::vector<double>& v) { return loss(x, v, b); }, w, dw, "dw");
  expect_gradient([&](const std::vector<double>& v) { return loss(x, w, v); }, b, db, "db");
}

}  // namespace nextron::test
