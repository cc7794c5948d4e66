// Full-attention ops: partial RoPE, causal GQA softmax attention, sigmoid output gate. Forwards against direct
// formulas and explicit softmax loops, gradients against finite differences in double, accumulating on top of
// nonzero gradient buffers.
#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "gradcheck.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/sigmoid_gate.h"

namespace nextron::test {

namespace {
std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

// Causal GQA attention written out per (b, h, i): scores, max-subtracted softmax, weighted sum of values.
void naive_attention(std::vector<double>& o, std::vector<double>& lse, const std::vector<double>& q,
                     const std::vector<double>& k, const std::vector<double>& v, int64_t B, int64_t S, int64_t NH,
                     int64_t NKV, int64_t D, double scale) {
  o.assign(B * S * NH * D, 0.0);
  lse.assign(B * NH * S, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t g = h / (NH / NKV);
      for (int64_t i = 0; i < S; ++i) {
        std::vector<double> s(i + 1);
        for (int64_t j = 0; j <= i; ++j) {
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += q[((b * S + i) * NH + h) * D + d] * k[((b * S + j) * NKV + g) * D + d];
          s[j] = scale * acc;
        }
        const double m = *std::max_element(s.begin(), s.end());
        double z = 0;
        for (double e : s) z += std::exp(e - m);
        lse[(b * NH + h) * S + i] = m + std::log(z);
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t d = 0; d < D; ++d)
            o[((b * S + i) * NH + h) * D + d] += std::exp(s[j] - m) / z * v[((b * S + j) * NKV + g) * D + d];
      }
    }
}
}  // namespace

TEST(Rope, TablesFollowTransformersFloat32Arithmetic) {
  // transformers 5.23 / torch 2.15 (CPU) values for rope_theta 1e7, rotary_dim 8, positions 123456 and 123457.
  const double torch_cos[2][4] = {{-0.6722948551177979, -0.836086094379425, 0.22767549753189087, 0.7685375213623047},
                                  {0.25968456268310547, -0.8457300662994385, 0.22736717760562897, 0.7685339450836182}};
  const double torch_sin[2][4] = {{-0.7402834296226501, 0.5485982298851013, 0.9737370610237122, 0.6398047208786011},
                                  {-0.965693473815918, 0.5336109399795532, 0.9738091230392456, 0.6398090124130249}};
  const int64_t S = 2, rd = 8;
  std::vector<double> c(S * rd), s(S * rd);
  cpu::rope_tables(c.data(), s.data(), S, rd, 1e7, 123456);
  double max_double_formula_gap = 0;
  for (int64_t t = 0; t < S; ++t)
    for (int64_t i = 0; i < rd; ++i) {
      // Equal up to the last bit of torch's vectorised cos/sin against libm's.
      EXPECT_NEAR(c[t * rd + i], torch_cos[t][i % 4], 2e-7) << t << " " << i;
      EXPECT_NEAR(s[t * rd + i], torch_sin[t][i % 4], 2e-7) << t << " " << i;
      const double angle = double(123456 + t) * std::pow(1e7, -2.0 * double(i % 4) / double(rd));
      max_double_formula_gap = std::max(max_double_formula_gap, std::abs(std::cos(angle) - c[t * rd + i]));
    }
  // At this position float32 frequencies are measurably off the exact angles; the tables must keep that.
  EXPECT_GT(max_double_formula_gap, 1e-5);
}

TEST(Rope, ForwardMatchesDirectFormulaAndGradientsMatchFiniteDifferences) {
  const int64_t B = 2, S = 3, NH = 2, D = 8, offset = 5;
  const double theta = 1e4;
  for (double factor : {0.25, 1.0}) {
    const int64_t rd = static_cast<int64_t>(D * factor), half = rd / 2;
    SCOPED_TRACE("partial_rotary_factor " + std::to_string(factor));
    std::vector<double> c(S * rd), s(S * rd);
    cpu::rope_tables(c.data(), s.data(), S, rd, theta, offset);
    const auto x = randn(B * S * NH * D, 31), r = randn(B * S * NH * D, 32);
    std::vector<double> y(x.size());
    cpu::rope_forward(y.data(), x.data(), c.data(), s.data(), B, S, NH, D, rd);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < S; ++t)
        for (int64_t h = 0; h < NH; ++h) {
          const double* xr = x.data() + ((b * S + t) * NH + h) * D;
          const double* yr = y.data() + ((b * S + t) * NH + h) * D;
          for (int64_t i = 0; i < half; ++i) {
            const double a = double(offset + t) / std::pow(theta, 2.0 * double(i) / double(rd));
            EXPECT_NEAR(yr[i], xr[i] * std::cos(a) - xr[i + half] * std::sin(a), 1e-5);
            EXPECT_NEAR(yr[i + half], xr[i + half] * std::cos(a) + xr[i] * std::sin(a), 1e-5);
          }
          for (int64_t i = rd; i < D; ++i) EXPECT_EQ(yr[i], xr[i]);
        }
    auto xi = x;  // in place gives the same result
    cpu::rope_forward(xi.data(), xi.data(), c.data(), s.data(), B, S, NH, D, rd);
    EXPECT_EQ(xi, y);

    const auto dx0 = randn(x.size(), 33);
    auto dx = dx0;
    cpu::rope_backward(dx.data(), r.data(), c.data(), s.data(), B, S, NH, D, rd);
    expect_gradient(
        [&](const std::vector<double>& v) {
          std::vector<double> yy(v.size());
          cpu::rope_forward(yy.data(), v.data(), c.data(), s.data(), B, S, NH, D, rd);
          return dot(yy, r);
        },
        x, minus(dx, dx0), "dx");
  }
}

TEST(Attention, ForwardMatchesExplicitSoftmax) {
  const int64_t B = 2, S = 5, D = 3;
  const double scale = 1 / std::sqrt(double(D));
  for (auto [NH, NKV] : {std::pair<int64_t, int64_t>{4, 2}, {4, 4}, {4, 1}})
    for (int64_t block : {2, 64}) {
      SCOPED_TRACE("NH " + std::to_string(NH) + " NKV " + std::to_string(NKV) + " block " + std::to_string(block));
      const auto q = randn(B * S * NH * D, 41), k = randn(B * S * NKV * D, 42), v = randn(B * S * NKV * D, 43);
      std::vector<double> o(q.size()), lse(B * NH * S), o_ref, lse_ref;
      cpu::attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, S, NH, NKV, D, scale, block);
      naive_attention(o_ref, lse_ref, q, k, v, B, S, NH, NKV, D, scale);
      for (size_t i = 0; i < o.size(); ++i) EXPECT_NEAR(o[i], o_ref[i], 1e-12) << i;
      for (size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(lse[i], lse_ref[i], 1e-12) << i;
    }
}

TEST(Attention, GqaGradientsMatchFiniteDifferences) {
  const int64_t B = 2, S = 5, NH = 4, NKV = 2, D = 3, block = 2;
  const double scale = 1 / std::sqrt(double(D));
  const auto q = randn(B * S * NH * D, 51), k = randn(B * S * NKV * D, 52), v = randn(B * S * NKV * D, 53),
             r = randn(B * S * NH * D, 54);
  std::vector<double> o(q.size()), lse(B * NH * S);
  cpu::attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, S, NH, NKV, D, scale, block);
  const auto dq0 = randn(q.size(), 55), dk0 = randn(k.size(), 56), dv0 = randn(v.size(), 57);
  auto dq = dq0, dk = dk0, dv = dv0;
  cpu::attention_backward(dq.data(), dk.data(), dv.data(), r.data(), q.data(), k.data(), v.data(), o.data(), lse.data(),
                          B, S, NH, NKV, D, scale, block);
  auto loss = [&](const std::vector<double>& qq, const std::vector<double>& kk, const std::vector<double>& vv) {
    std::vector<double> oo(qq.size()), ll(B * NH * S);
    cpu::attention_forward(oo.data(), ll.data(), qq.data(), kk.data(), vv.data(), B, S, NH, NKV, D, scale, block);
    return dot(oo, r);
  };
  expect_gradient([&](const std::vector<double>& x) { return loss(x, k, v); }, q, minus(dq, dq0), "dq");
  expect_gradient([&](const std::vector<double>& x) { return loss(q, x, v); }, k, minus(dk, dk0), "dk");
  expect_gradient([&](const std::vector<double>& x) { return loss(q, k, x); }, v, minus(dv, dv0), "dv");

  // Each gradient alone (the others nullptr) and another block size give the same values.
  for (int64_t blk : {3, 64}) {
    std::vector<double> gq(q.size()), gk(k.size()), gv(v.size());
    cpu::attention_backward<double>(gq.data(), nullptr, nullptr, r.data(), q.data(), k.data(), v.data(), o.data(),
                                    lse.data(), B, S, NH, NKV, D, scale, blk);
    cpu::attention_backward<double>(nullptr, gk.data(), nullptr, r.data(), q.data(), k.data(), v.data(), o.data(),
                                    lse.data(), B, S, NH, NKV, D, scale, blk);
    cpu::attention_backward<double>(nullptr, nullptr, gv.data(), r.data(), q.data(), k.data(), v.data(), o.data(),
                                    lse.data(), B, S, NH, NKV, D, scale, blk);
    for (size_t i = 0; i < q.size(); ++i) EXPECT_NEAR(gq[i], dq[i] - dq0[i], 1e-12);
    for (size_t i = 0; i < k.size(); ++i) EXPECT_NEAR(gk[i], dk[i] - dk0[i], 1e-12);
    for (size_t i = 0; i < v.size(); ++i) EXPECT_NEAR(gv[i], dv[i] - dv0[i], 1e-12);
  }
}

TEST(Attention, FloatMatchesDoubleOnLongerSequence) {
  const int64_t B = 1, S = 37, NH = 4, NKV = 2, D = 8, block = 8;
  const double scale = 1 / std::sqrt(double(D));
  const auto q = randn(B * S * NH * D, 61, 2.0), k = randn(B * S * NKV * D, 62, 2.0), v = randn(B * S * NKV * D, 63),
             r = randn(B * S * NH * D, 64);
  std::vector<double> o(q.size()), lse(B * NH * S), dq(q.size()), dk(k.size()), dv(v.size());
  cpu::attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, S, NH, NKV, D, scale, block);
  cpu::attention_backward(dq.data(), dk.data(), dv.data(), r.data(), q.data(), k.data(), v.data(), o.data(), lse.data(),
                          B, S, NH, NKV, D, scale, block);
  const auto qf = to_float(q), kf = to_float(k), vf = to_float(v), rf = to_float(r);
  std::vector<float> of(q.size()), lf(B * NH * S), dqf(q.size()), dkf(k.size()), dvf(v.size());
  cpu::attention_forward(of.data(), lf.data(), qf.data(), kf.data(), vf.data(), B, S, NH, NKV, D, scale, block);
  cpu::attention_backward(dqf.data(), dkf.data(), dvf.data(), rf.data(), qf.data(), kf.data(), vf.data(), of.data(),
                          lf.data(), B, S, NH, NKV, D, scale, block);
  auto expect_close = [](const std::vector<float>& a, const std::vector<double>& b, const char* what) {
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-4 * std::max(1.0, std::abs(b[i]))) << what << i;
  };
  expect_close(of, o, "o");
  expect_close(lf, lse, "lse");
  expect_close(dqf, dq, "dq");
  expect_close(dkf, dk, "dk");
  expect_close(dvf, dv, "dv");
}

// Queries that are the last Sq of Sk positions (a context-parallel slice against the keys gathered up to its end):
// the whole sequence's attention restricted to those rows, forward and backward (d_o zero on the other rows), across
// block boundaries and with GQA.
TEST(Attention, LastQueriesAgainstAllKeysEqualTheWholeSequencesRows) {
  const int64_t B = 2, NH = 4, NKV = 2, D = 8, block = 16;
  for (const auto& [Sq, Sk] : {std::pair<int64_t, int64_t>{37, 37}, {37, 100}, {1, 53}, {16, 64}, {50, 51}}) {
    SCOPED_TRACE("Sq " + std::to_string(Sq) + " Sk " + std::to_string(Sk));
    const int64_t off = Sk - Sq;
    const auto q = randn(B * Sk * NH * D, 1), k = randn(B * Sk * NKV * D, 2), v = randn(B * Sk * NKV * D, 3),
               g = randn(B * Sk * NH * D, 4);
    std::vector<double> o(q.size()), lse(B * NH * Sk), dq(q.size(), 0), dk(k.size(), 0), dv(v.size(), 0);
    std::vector<double> d_o(q.size(), 0);  // the whole sequence's d_o: zero on the rows the slice does not hold
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(g.begin() + (b * Sk + off) * NH * D, Sq * NH * D, d_o.begin() + (b * Sk + off) * NH * D);
    cpu::attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, Sk, NH, NKV, D, 0.3, block);
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), d_o.data(), q.data(), k.data(), v.data(), o.data(),
                            lse.data(), B, Sk, NH, NKV, D, 0.3, block);
    // The slice: its queries and d_o rows; all keys.
    auto rows = [&](const std::vector<double>& x, int64_t W) {
      std::vector<double> out(B * Sq * W);
      for (int64_t b = 0; b < B; ++b) std::copy_n(x.begin() + (b * Sk + off) * W, Sq * W, out.begin() + b * Sq * W);
      return out;
    };
    const auto qs = rows(q, NH * D), dos = rows(d_o, NH * D);
    std::vector<double> os(qs.size()), lses(B * NH * Sq), dqs(qs.size(), 0), dks(k.size(), 0), dvs(v.size(), 0);
    cpu::causal_attention_forward(os.data(), lses.data(), qs.data(), k.data(), v.data(), B, Sq, Sk, NH, NKV, D, 0.3,
                                  block);
    cpu::causal_attention_backward(dqs.data(), dks.data(), dvs.data(), dos.data(), qs.data(), k.data(), v.data(),
                                   os.data(), lses.data(), B, Sq, Sk, NH, NKV, D, 0.3, block);
    std::vector<double> lse_rows(B * NH * Sq);
    for (int64_t bh = 0; bh < B * NH; ++bh) std::copy_n(lse.begin() + bh * Sk + off, Sq, lse_rows.begin() + bh * Sq);
    auto max_err = [](const std::vector<double>& a, const std::vector<double>& b) {
      double e = 0;
      for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::abs(a[i] - b[i]));
      return e;
    };
    EXPECT_LT(max_err(os, rows(o, NH * D)), 1e-12);
    EXPECT_LT(max_err(lses, lse_rows), 1e-12);
    EXPECT_LT(max_err(dqs, rows(dq, NH * D)), 1e-12);
    EXPECT_LT(max_err(dks, dk), 1e-12);
    EXPECT_LT(max_err(dvs, dv), 1e-12);
  }
  std::vector<double> x(8);
  EXPECT_THROW(cpu::causal_attention_forward(x.data(), x.data(), x.data(), x.data(), x.data(), 1, 2, 1, 1, 1, 1, 1.0),
               Error);  // more queries than keys
}

TEST(SigmoidGate, ForwardMatchesNaiveAndGradientsMatchFiniteDifferences) {
  const int64_t N = 3, D = 6;
  for (int64_t G : {D, int64_t{2}, int64_t{1}}) {
    SCOPED_TRACE("G " + std::to_string(G));
    const auto x = randn(N * D, 71), gate = randn(N * G, 72, 2.0), r = randn(N * D, 73);
    std::vector<double> y(N * D);
    cpu::sigmoid_gate_forward(y.data(), x.data(), gate.data(), N, D, G);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < D; ++c)
        EXPECT_NEAR(y[n * D + c], x[n * D + c] / (1 + std::exp(-gate[n * G + c / (D / G)])), 1e-14);
    const auto dx0 = randn(N * D, 74), dg0 = randn(N * G, 75);
    auto dx = dx0, dg = dg0;
    cpu::sigmoid_gate_backward(dx.data(), dg.data(), r.data(), x.data(), gate.data(), N, D, G);
    auto loss = [&](const std::vector<double>& xx, const std::vector<double>& gg) {
      std::vector<double> yy(N * D);
      cpu::sigmoid_gate_forward(yy.data(), xx.data(), gg.data(), N, D, G);
      return dot(yy, r);
    };
    expect_gradient([&](const std::vector<double>& v) { return loss(v, gate); }, x, minus(dx, dx0), "dx");
    expect_gradient([&](const std::vector<double>& v) { return loss(x, v); }, gate, minus(dg, dg0), "dgate");
  }
  std::vector<double> x(4), g(3), y(4);
  EXPECT_THROW(cpu::sigmoid_gate_forward(y.data(), x.data(), g.data(), 1, 4, 3), Error);
}

}  // namespace nextron::test
