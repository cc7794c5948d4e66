// DeltaNet-side ops and SwiGLU: causal depthwise conv1d + SiLU, the beta / g gates, the packed SwiGLU. Forwards
// against direct loops, gradients against finite differences in double, accumulating on top of nonzero gradient
// buffers.
#include <cmath>
#include <string>

#include "gradcheck.h"
#include "kernels/cpu/conv1d.h"
#include "kernels/cpu/gdn_gates.h"
#include "kernels/cpu/swiglu.h"

namespace nextron::test {

namespace {
std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }
double silu(double v) { return v * sigmoid(v); }
}  // namespace

TEST(Conv1d, ForwardMatchesZeroPaddedConvolutionAndGradientsMatchFiniteDifferences) {
  const int64_t B = 2, C = 3, KC = 4;
  for (int64_t S : {2, 6}) {  // shorter than the kernel (only padding on the left) and longer
    SCOPED_TRACE("S " + std::to_string(S));
    const auto x = randn(B * S * C, 81), w = randn(C * KC, 82), r = randn(B * S * C, 83);
    std::vector<double> y(B * S * C);
    cpu::conv1d_forward(y.data(), x.data(), w.data(), B, S, C, KC, C, C);
    // As F.conv1d(x^T, w, padding=KC-1, groups=C)[..., :S]: output s sees inputs s-KC+1 .. s (zero before 0).
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = 0; c < C; ++c) {
          double pre = 0;
          for (int64_t j = 0; j < KC; ++j) {
            const int64_t t = s - (KC - 1) + j;
            if (t >= 0) pre += w[c * KC + j] * x[(b * S + t) * C + c];
          }
          EXPECT_NEAR(y[(b * S + s) * C + c], silu(pre), 1e-14);
        }
    const auto dx0 = randn(x.size(), 84), dw0 = randn(w.size(), 85);
    auto dx = dx0, dw = dw0;
    cpu::conv1d_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), B, S, C, KC, C, C);
    auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww) {
      std::vector<double> yy(B * S * C);
      cpu::conv1d_forward(yy.data(), xx.data(), ww.data(), B, S, C, KC, C, C);
      return dot(yy, r);
    };
    expect_gradient([&](const std::vector<double>& v) { return loss(v, w); }, x, minus(dx, dx0), "dx");
    expect_gradient([&](const std::vector<double>& v) { return loss(x, v); }, w, minus(dw, dw0), "dw");
  }
}

TEST(Conv1d, ManyChannelsFloatMatchesDouble) {
  const int64_t B = 1, S = 9, C = 70, KC = 4;  // more channels than one weight-gradient chunk
  const auto x = randn(B * S * C, 86), w = randn(C * KC, 87), r = randn(B * S * C, 88);
  std::vector<double> y(x.size()), dx(x.size()), dw(w.size());
  cpu::conv1d_forward(y.data(), x.data(), w.data(), B, S, C, KC, C, C);
  cpu::conv1d_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), B, S, C, KC, C, C);
  const auto xf = to_float(x), wf = to_float(w), rf = to_float(r);
  std::vector<float> yf(x.size()), dxf(x.size()), dwf(w.size());
  cpu::conv1d_forward(yf.data(), xf.data(), wf.data(), B, S, C, KC, C, C);
  cpu::conv1d_backward(dxf.data(), dwf.data(), rf.data(), xf.data(), wf.data(), B, S, C, KC, C, C);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(yf[i], y[i], 1e-5);
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_NEAR(dxf[i], dx[i], 1e-5);
  for (size_t i = 0; i < dw.size(); ++i) EXPECT_NEAR(dwf[i], dw[i], 1e-4);
}

// The output split into three row-major channel blocks (the DeltaNet's q | k | v as contiguous tensors): block p's
// element (row r, channel j) is the plain output's (r, start_p + j), and a gradient given in that layout gives the
// plain backward's dx and dw bit for bit (the same arithmetic, only the addresses move).
TEST(Conv1d, SplitOutputIsThePlainOutputsChannelBlocks) {
  const int64_t B = 2, S = 5, C = 11, KC = 4, N = B * S, c1 = 3, c2 = 6;
  const auto x = randn(N * C, 71), w = randn(C * KC, 72), r = randn(N * C, 73);
  std::vector<double> plain(N * C), split(N * C);
  cpu::conv1d_forward(plain.data(), x.data(), w.data(), B, S, C, KC, C, C);
  cpu::conv1d_forward(split.data(), x.data(), w.data(), B, S, C, KC, c1, c2);
  // r in the split layout, built block by block.
  std::vector<double> r_split;
  const int64_t starts[] = {0, c1, c2}, widths[] = {c1, c2 - c1, C - c2};
  int64_t at = 0;
  for (int p = 0; p < 3; ++p)
    for (int64_t row = 0; row < N; ++row)
      for (int64_t j = 0; j < widths[p]; ++j, ++at) {
        EXPECT_EQ(split[at], plain[row * C + starts[p] + j]) << "block " << p << " row " << row << " channel " << j;
        r_split.push_back(r[row * C + starts[p] + j]);
      }
  std::vector<double> dx_plain(N * C), dw_plain(C * KC), dx_split(N * C), dw_split(C * KC);
  cpu::conv1d_backward(dx_plain.data(), dw_plain.data(), r.data(), x.data(), w.data(), B, S, C, KC, C, C);
  cpu::conv1d_backward(dx_split.data(), dw_split.data(), r_split.data(), x.data(), w.data(), B, S, C, KC, c1, c2);
  EXPECT_EQ(dx_split, dx_plain);
  EXPECT_EQ(dw_split, dw_plain);
}

TEST(GdnGates, ForwardMatchesFormulaAndGradientsMatchFiniteDifferences) {
  const int64_t N = 4, Hv = 3;
  auto b = randn(N * Hv, 91), a = randn(N * Hv, 92, 2.0), A_log = randn(Hv, 93, 0.5), dt_bias = randn(Hv, 94);
  a[1] = 25.0;  // a + dt_bias above softplus's threshold 20: softplus(x) = x, derivative exactly 1
  const auto rb = randn(N * Hv, 95), rg = randn(N * Hv, 96);
  std::vector<double> beta(N * Hv), g(N * Hv);
  cpu::gdn_gates_forward(beta.data(), g.data(), b.data(), a.data(), A_log.data(), dt_bias.data(), N, Hv);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Hv; ++h) {
      const int64_t i = n * Hv + h;
      const double v = a[i] + dt_bias[h];
      EXPECT_NEAR(beta[i], sigmoid(b[i]), 1e-15);
      EXPECT_NEAR(g[i], -std::exp(A_log[h]) * (v > 20 ? v : std::log(1 + std::exp(v))), 1e-12);
      EXPECT_LT(g[i], 0.0);
    }
  const auto db0 = randn(N * Hv, 97), da0 = randn(N * Hv, 98), dA0 = randn(Hv, 99), ddt0 = randn(Hv, 100);
  auto db = db0, da = da0, dA = dA0, ddt = ddt0;
  cpu::gdn_gates_backward(db.data(), da.data(), dA.data(), ddt.data(), rb.data(), rg.data(), b.data(), a.data(),
                          A_log.data(), dt_bias.data(), N, Hv);
  auto loss = [&](const std::vector<double>& bb, const std::vector<double>& aa, const std::vector<double>& AA,
                  const std::vector<double>& dd) {
    std::vector<double> be(N * Hv), gg(N * Hv);
    cpu::gdn_gates_forward(be.data(), gg.data(), bb.data(), aa.data(), AA.data(), dd.data(), N, Hv);
    return dot(be, rb) + dot(gg, rg);
  };
  expect_gradient([&](const std::vector<double>& v) { return loss(v, a, A_log, dt_bias); }, b, minus(db, db0), "db");
  expect_gradient([&](const std::vector<double>& v) { return loss(b, v, A_log, dt_bias); }, a, minus(da, da0), "da");
  expect_gradient([&](const std::vector<double>& v) { return loss(b, a, v, dt_bias); }, A_log, minus(dA, dA0),
                  "dA_log");
  expect_gradient([&](const std::vector<double>& v) { return loss(b, a, A_log, v); }, dt_bias, minus(ddt, ddt0),
                  "ddt_bias");

  // A missing dbeta or dg is a zero gradient; nullptr outputs are skipped.
  std::vector<double> da_only(N * Hv);
  cpu::gdn_gates_backward<double>(nullptr, da_only.data(), nullptr, nullptr, nullptr, rg.data(), b.data(), a.data(),
                                  A_log.data(), dt_bias.data(), N, Hv);
  for (int64_t i = 0; i < N * Hv; ++i) EXPECT_NEAR(da_only[i], da[i] - da0[i], 1e-14);
}

TEST(SwiGlu, ForwardMatchesNaiveAndGradientMatchesFiniteDifferences) {
  const int64_t N = 3, I = 4;
  const auto gu = randn(N * 2 * I, 101, 2.0), r = randn(N * I, 102);
  std::vector<double> h(N * I);
  cpu::swiglu_forward(h.data(), gu.data(), N, I);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < I; ++i) EXPECT_NEAR(h[n * I + i], silu(gu[n * 2 * I + i]) * gu[n * 2 * I + I + i], 1e-14);
  const auto dgu0 = randn(gu.size(), 103);
  auto dgu = dgu0;
  cpu::swiglu_backward(dgu.data(), r.data(), gu.data(), N, I);
  expect_gradient(
      [&](const std::vector<double>& v) {
        std::vector<double> hh(N * I);
        cpu::swiglu_forward(hh.data(), v.data(), N, I);
        return dot(hh, r);
      },
      gu, minus(dgu, dgu0), "dgu");

  // Extreme gates stay finite in float.
  const std::vector<float> big = {-200.f, 200.f, 3.f, 3.f};
  std::vector<float> hb(2), dbig(4);
  const std::vector<float> ones = {1.f, 1.f};
  cpu::swiglu_forward(hb.data(), big.data(), 1, 2);
  cpu::swiglu_backward(dbig.data(), ones.data(), big.data(), 1, 2);
  EXPECT_EQ(hb[0], 0.f);
  EXPECT_FLOAT_EQ(hb[1], 600.f);
  for (float d : dbig) EXPECT_TRUE(std::isfinite(d));
}

}  // namespace nextron::test
