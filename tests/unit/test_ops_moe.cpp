// MoE ops: softmax top-k router, expert dispatch, grouped SwiGLU experts and the load-balancing loss. Forwards
// against plain references (sorting, explicit token x top-k loops, transformers' value), gradients against finite
// differences in double (logits well separated so the top-k choice is stable under the step), accumulating on top
// of nonzero gradient buffers.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/error.h"
#include "core/parallel_for.h"
#include "gradcheck.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu/moe_experts.h"
#include "kernels/cpu/router.h"

namespace nextron::test {

namespace {
std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

// Rows of E logits: a random permutation of 0, 0.5, 1, ... plus small noise, so no two probs are within the FD step.
std::vector<double> separated_logits(int64_t N, int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto noise = randn(N * E, seed + 1, 0.05);
  std::vector<double> l(N * E);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int> p(E);
    std::iota(p.begin(), p.end(), 0);
    std::shuffle(p.begin(), p.end(), rng);
    for (int64_t e = 0; e < E; ++e) l[n * E + e] = 0.5 * p[e] + noise[n * E + e];
  }
  return l;
}

// K distinct experts per token drawn from [0, used) (experts >= used get no tokens).
std::vector<int32_t> random_indices(int64_t N, int64_t K, int64_t used, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> idx(N * K);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<int32_t> p(used);
    std::iota(p.begin(), p.end(), 0);
    std::shuffle(p.begin(), p.end(), rng);
    std::copy_n(p.begin(), K, idx.begin() + n * K);
  }
  return idx;
}

double silu(double v) { return v / (1 + std::exp(-v)); }
}  // namespace

TEST(Router, ForwardMatchesSortedSoftmax) {
  const int64_t N = 6, E = 8, K = 3;
  const auto logits = randn(N * E, 11, 1.5);
  for (bool norm : {false, true}) {
    std::vector<double> probs(N * E), w(N * K);
    std::vector<int32_t> idx(N * K);
    cpu::router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, norm);
    for (int64_t n = 0; n < N; ++n) {
      double z = 0;
      for (int64_t e = 0; e < E; ++e) z += std::exp(logits[n * E + e]);
      std::vector<std::pair<double, int>> sorted;
      for (int64_t e = 0; e < E; ++e) {
        const double p = std::exp(logits[n * E + e]) / z;
        EXPECT_NEAR(probs[n * E + e], p, 1e-14);
        sorted.push_back({-p, int(e)});
      }
      std::sort(sorted.begin(), sorted.end());
      double top = 0;
      for (int64_t k = 0; k < K; ++k) top += -sorted[k].first;
      for (int64_t k = 0; k < K; ++k) {
        EXPECT_EQ(idx[n * K + k], sorted[k].second);
        EXPECT_NEAR(w[n * K + k], -sorted[k].first / (norm ? top : 1.0), 1e-14);
      }
    }
  }
}

TEST(Router, TiesPickLowerIndexFirst) {
  const int64_t N = 2, E = 5, K = 3;
  const std::vector<float> logits = {0, 0, 0, 0, 0, 1, 2, 0, 2, 2};
  std::vector<float> probs(N * E), w(N * K);
  std::vector<int32_t> idx(N * K);
  cpu::router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, true);
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 1, 2, 1, 3, 4}));
  for (float v : w) EXPECT_NEAR(v, 1.0 / 3, 1e-6);
}

TEST(Router, TopKLargerThanExpertsThrows) {
  std::vector<double> l(4), p(4), w(5);
  std::vector<int32_t> i(5);
  EXPECT_THROW(cpu::router_forward(p.data(), i.data(), w.data(), l.data(), 1, 4, 5, true), Error);
}

TEST(Router, GradientsMatchFiniteDifferences) {
  const int64_t N = 4, E = 6, K = 2;
  const auto logits = separated_logits(N, E, 21);
  const auto rp = randn(N * E, 22), rw = randn(N * K, 23), g0 = randn(N * E, 24);
  for (bool norm : {false, true})
    for (int use : {0, 1, 2}) {  // both upstream gradients, dweights only, dprobs only
      const bool with_p = use != 1, with_w = use != 2;
      std::vector<double> probs(N * E), w(N * K);
      std::vector<int32_t> idx(N * K);
      cpu::router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, norm);
      auto dlogits = g0;
      cpu::router_backward(dlogits.data(), with_p ? rp.data() : nullptr, with_w ? rw.data() : nullptr, probs.data(),
                           idx.data(), N, E, K, norm);
      auto loss = [&](const std::vector<double>& l) {
        std::vector<double> pp(N * E), ww(N * K);
        std::vector<int32_t> ii(N * K);
        cpu::router_forward(pp.data(), ii.data(), ww.data(), l.data(), N, E, K, norm);
        EXPECT_EQ(ii, idx);  // the selection must not move under the step
        return (with_p ? dot(pp, rp) : 0.0) + (with_w ? dot(ww, rw) : 0.0);
      };
      SCOPED_TRACE(testing::Message() << "norm " << norm << " use " << use);
      expect_gradient(loss, logits, minus(dlogits, g0), "dlogits");
    }
}

// Routing replay: with the router's own choice the weights are router_forward's to the bit; with any other choice
// they are probs[i] (over their sum when normalised), and router_backward with that choice is the exact gradient
// of the replayed weights (finite differences with the indices held fixed).
TEST(Router, WeightsFromReplayedIndices) {
  const int64_t N = 5, E = 7, K = 3;
  const auto logits = separated_logits(N, E, 31);
  const auto rp = randn(N * E, 32), rw = randn(N * K, 33);
  for (bool norm : {false, true}) {
    SCOPED_TRACE(testing::Message() << "norm " << norm);
    std::vector<double> probs(N * E), w(N * K), w2(N * K);
    std::vector<int32_t> idx(N * K);
    cpu::router_forward(probs.data(), idx.data(), w.data(), logits.data(), N, E, K, norm);
    cpu::router_weights_from_indices(w2.data(), probs.data(), idx.data(), N, E, K, norm);
    EXPECT_EQ(w2, w);
    // Another choice: experts (n + k) % E, mostly not the top-k.
    std::vector<int32_t> other(N * K);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) other[n * K + k] = int32_t((n + 2 * k) % E);
    cpu::router_weights_from_indices(w2.data(), probs.data(), other.data(), N, E, K, norm);
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += probs[n * E + other[n * K + k]];
      for (int64_t k = 0; k < K; ++k)
        EXPECT_NEAR(w2[n * K + k], probs[n * E + other[n * K + k]] / (norm ? sum : 1.0), 1e-15);
    }
    std::vector<double> dlogits(N * E, 0.0);
    cpu::router_backward(dlogits.data(), rp.data(), rw.data(), probs.data(), other.data(), N, E, K, norm);
    auto loss = [&](const std::vector<double>& l) {
      std::vector<double> pp(N * E), ww(N * K);
      std::vector<int32_t> ii(N * K);
      cpu::router_forward(pp.data(), ii.data(), ww.data(), l.data(), N, E, K, norm);
      cpu::router_weights_from_indices(ww.data(), pp.data(), other.data(), N, E, K, norm);
      return dot(pp, rp) + dot(ww, rw);
    };
    expect_gradient(loss, logits, dlogits, "dlogits");
    other[4] = int32_t(E);
    EXPECT_THROW(cpu::router_weights_from_indices(w2.data(), probs.data(), other.data(), N, E, K, norm), Error);
  }
}

TEST(MoeDispatch, StableCountingSortByExpert) {
  const int64_t N = 4, K = 2, E = 4;
  const std::vector<int32_t> idx = {2, 0, 0, 2, 2, 1, 0, 2};
  cpu::MoeDispatch d;
  cpu::moe_dispatch_build(d, idx.data(), N, K, E);
  EXPECT_EQ(d.expert_offsets, (std::vector<int64_t>{0, 3, 4, 8, 8}));
  EXPECT_EQ(d.slot_token, (std::vector<int64_t>{0, 1, 3, 2, 0, 1, 2, 3}));
  EXPECT_EQ(d.slot_k, (std::vector<int32_t>{1, 0, 0, 1, 0, 1, 0, 1}));
  for (int64_t s = 0; s < N * K; ++s) EXPECT_EQ(d.slot_of[d.slot_token[s] * K + d.slot_k[s]], s);
  EXPECT_EQ(d.active, (std::vector<int32_t>{2, 0, 1}));
  // Rebuilding into the same struct with another routing replaces everything.
  const std::vector<int32_t> idx2 = {3, 1};
  cpu::moe_dispatch_build(d, idx2.data(), 1, 2, E);
  EXPECT_EQ(d.expert_offsets, (std::vector<int64_t>{0, 0, 1, 1, 2}));
  EXPECT_EQ(d.slot_token, (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(d.active, (std::vector<int32_t>{1, 3}));
}

TEST(MoeDispatch, OutOfRangeExpertThrows) {
  cpu::MoeDispatch d;
  for (int32_t bad : {4, -1}) {
    const std::vector<int32_t> idx = {0, bad};
    try {
      cpu::moe_dispatch_build(d, idx.data(), 1, 2, 4);
      FAIL() << "expected nextron::Error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::to_string(bad)), std::string::npos) << e.what();
    }
  }
}

namespace {
struct MoeCase {
  int64_t N = 7, H = 5, I = 3, E = 5, K = 2;
  std::vector<double> x = randn(N * H, 31), w = randn(N * K, 32), wgu = randn(E * 2 * I * H, 33, 0.6),
                      wd = randn(E * H * I, 34, 0.6), r = randn(N * H, 35);
  std::vector<int32_t> idx = random_indices(N, K, E - 1, 36);  // expert E-1 gets no tokens

  std::vector<double> forward(const cpu::MoeDispatch& d, cpu::MoeExpertsCache<double>& c, const std::vector<double>& xx,
                              const std::vector<double>& ww, const std::vector<double>& gu,
                              const std::vector<double>& dn) const {
    std::vector<double> y(N * H, 99.0);  // overwritten
    cpu::moe_experts_forward(y.data(), c, d, xx.data(), ww.data(), gu.data(), dn.data(), N, H, I, E, K);
    return y;
  }
};
}  // namespace

TEST(MoeExperts, ForwardMatchesTokenByTopKLoop) {
  MoeCase m;
  cpu::MoeDispatch d;
  cpu::moe_dispatch_build(d, m.idx.data(), m.N, m.K, m.E);
  cpu::MoeExpertsCache<double> cache;
  const auto y = m.forward(d, cache, m.x, m.w, m.wgu, m.wd);
  const int64_t H = m.H, I = m.I;
  for (int64_t n = 0; n < m.N; ++n) {
    std::vector<double> want(H, 0.0);
    for (int64_t k = 0; k < m.K; ++k) {
      const int64_t e = m.idx[n * m.K + k];
      std::vector<double> h(I);
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t j = 0; j < H; ++j) {
          g += m.wgu[(e * 2 * I + i) * H + j] * m.x[n * H + j];
          u += m.wgu[(e * 2 * I + I + i) * H + j] * m.x[n * H + j];
        }
        h[i] = silu(g) * u;
      }
      for (int64_t j = 0; j < H; ++j) {
        double o = 0;
        for (int64_t i = 0; i < I; ++i) o += m.wd[(e * H + j) * I + i] * h[i];
        want[j] += m.w[n * m.K + k] * o;
      }
    }
    for (int64_t j = 0; j < H; ++j) EXPECT_NEAR(y[n * H + j], want[j], 1e-12) << "token " << n << " dim " << j;
  }

  // Float instantiation agrees.
  cpu::MoeExpertsCache<float> cf;
  std::vector<float> yf(m.N * H);
  const auto xf = to_float(m.x), wf = to_float(m.w), guf = to_float(m.wgu), df = to_float(m.wd);
  cpu::moe_experts_forward(yf.data(), cf, d, xf.data(), wf.data(), guf.data(), df.data(), m.N, H, I, m.E, m.K);
  for (int64_t i = 0; i < m.N * H; ++i) EXPECT_NEAR(yf[i], y[i], 1e-5);
}

TEST(MoeExperts, GradientsMatchFiniteDifferences) {
  MoeCase m;
  cpu::MoeDispatch d;
  cpu::moe_dispatch_build(d, m.idx.data(), m.N, m.K, m.E);
  cpu::MoeExpertsCache<double> cache;
  m.forward(d, cache, m.x, m.w, m.wgu, m.wd);
  const auto gx = randn(m.x.size(), 41), gw = randn(m.w.size(), 42), ggu = randn(m.wgu.size(), 43),
             gd = randn(m.wd.size(), 44);
  auto dx = gx, dw = gw, dgu = ggu, dd = gd;
  cpu::moe_experts_backward(dx.data(), dw.data(), dgu.data(), dd.data(), cache, d, m.r.data(), m.w.data(), m.wgu.data(),
                            m.wd.data(), m.N, m.H, m.I, m.E, m.K);
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& ww, const std::vector<double>& gu,
                  const std::vector<double>& dn) {
    cpu::MoeExpertsCache<double> c;
    return dot(m.forward(d, c, xx, ww, gu, dn), m.r);
  };
  expect_gradient([&](const std::vector<double>& v) { return loss(v, m.w, m.wgu, m.wd); }, m.x, minus(dx, gx), "dx");
  expect_gradient([&](const std::vector<double>& v) { return loss(m.x, v, m.wgu, m.wd); }, m.w, minus(dw, gw),
                  "dweights");
  expect_gradient([&](const std::vector<double>& v) { return loss(m.x, m.w, v, m.wd); }, m.wgu, minus(dgu, ggu),
                  "dw_gate_up");
  expect_gradient([&](const std::vector<double>& v) { return loss(m.x, m.w, m.wgu, v); }, m.wd, minus(dd, gd),
                  "dw_down");
  // The unused expert's weight gradients stay untouched.
  const int64_t e = m.E - 1, GU = 2 * m.I * m.H, D = m.H * m.I;
  for (int64_t i = 0; i < GU; ++i) EXPECT_EQ(dgu[e * GU + i], ggu[e * GU + i]);
  for (int64_t i = 0; i < D; ++i) EXPECT_EQ(dd[e * D + i], gd[e * D + i]);
}

TEST(MoeExperts, SubsetsOfGradientsAndBothSchedulesAgree) {
  // Threads >= busy experts runs experts one after another with threaded gemms; 1 thread runs the per-expert
  // parallel loop. Both, and any subset of requested gradients, must give the same numbers.
  MoeCase m;
  cpu::MoeDispatch d;
  cpu::moe_dispatch_build(d, m.idx.data(), m.N, m.K, m.E);
  const int saved = cpu_threads();
  std::vector<std::vector<double>> ref;
  for (int threads : {8, 1, 2}) {
    set_cpu_threads(threads);
    for (int mask = 0; mask < 16; ++mask) {
      cpu::MoeExpertsCache<double> cache;
      const auto y = m.forward(d, cache, m.x, m.w, m.wgu, m.wd);
      std::vector<double> dx(m.x.size()), dw(m.w.size()), dgu(m.wgu.size()), dd(m.wd.size());
      cpu::moe_experts_backward(mask & 1 ? dx.data() : nullptr, mask & 2 ? dw.data() : nullptr,
                                mask & 4 ? dgu.data() : nullptr, mask & 8 ? dd.data() : nullptr, cache, d, m.r.data(),
                                m.w.data(), m.wgu.data(), m.wd.data(), m.N, m.H, m.I, m.E, m.K);
      if (ref.empty()) {
        ASSERT_EQ(mask, 0);
        ref = {y, {}, {}, {}, {}};
        continue;
      }
      const std::vector<double>* got[] = {&dx, &dw, &dgu, &dd};
      for (int i = 0; i < 4; ++i) {
        if (!(mask & (1 << i))) {
          for (double v : *got[i]) ASSERT_EQ(v, 0.0) << "gradient " << i << " not requested, mask " << mask;
          continue;
        }
        if (ref[i + 1].empty()) ref[i + 1] = *got[i];
        ASSERT_EQ(got[i]->size(), ref[i + 1].size());
        for (size_t j = 0; j < got[i]->size(); ++j)
          ASSERT_NEAR((*got[i])[j], ref[i + 1][j], 1e-12) << "gradient " << i << " threads " << threads;
      }
      for (size_t j = 0; j < y.size(); ++j) ASSERT_NEAR(y[j], ref[0][j], 1e-12);
    }
  }
  set_cpu_threads(saved);
}

namespace {
// transformers' example: two MoE layers with 3 and 2 token rows, E = 4, K = 2.
const std::vector<double> kLayer1 = {0.3, -1.2, 2.0, 0.5, 1.5, 0.1, -0.7, 0.9, -0.4, 0.8, 0.2, -1.6};
const std::vector<double> kLayer2 = {2.2, 0.0, -0.5, 1.1, -1.0, 0.6, 1.3, 0.4};
// load_balancing_loss_func((l1, l2), num_experts=4, top_k=2) with transformers 5.x (float32 internally).
constexpr double kTransformersAux = 1.9980775117874146;
}  // namespace

TEST(LoadBalancing, MatchesTransformersAndDirectFormulaOnTwoLayers) {
  const int64_t E = 4, K = 2;
  std::vector<double> count(E, 0.0), psum(E, 0.0), all_probs;
  std::vector<int32_t> all_idx;
  for (const auto* l : {&kLayer1, &kLayer2}) {
    const int64_t N = int64_t(l->size()) / E;
    std::vector<double> p(N * E), w(N * K);
    std::vector<int32_t> idx(N * K);
    cpu::router_forward(p.data(), idx.data(), w.data(), l->data(), N, E, K, true);
    cpu::aux_stats_accumulate(count.data(), psum.data(), p.data(), idx.data(), N, E, K);
    all_probs.insert(all_probs.end(), p.begin(), p.end());
    all_idx.insert(all_idx.end(), idx.begin(), idx.end());
  }
  const double rows = 5;
  const double aux = cpu::aux_loss_value(count.data(), psum.data(), rows, E);
  EXPECT_NEAR(aux, kTransformersAux, 1e-6);

  // Direct: E * sum_e (fraction of top-k slots on e, over rows) * (mean prob of e).
  double want = 0;
  for (int64_t e = 0; e < E; ++e) {
    double slots = 0, prob = 0;
    for (int32_t i : all_idx) slots += i == e;
    for (int64_t n = 0; n < 5; ++n) prob += all_probs[n * E + e];
    want += (slots / rows) * (prob / rows);
  }
  EXPECT_NEAR(aux, E * want, 1e-14);

  // Perfect balance gives K: uniform probs and every expert taking the same number of slots.
  const std::vector<double> c2 = {2, 2, 2, 2}, p2 = {1, 1, 1, 1};
  EXPECT_NEAR(cpu::aux_loss_value(c2.data(), p2.data(), 4.0, E), double(K), 1e-14);
}

TEST(LoadBalancing, GradientThroughRoutersMatchesFiniteDifferences) {
  const int64_t E = 4, K = 2, N1 = 3, N2 = 2;
  const double daux = 0.37, rows = double(N1 + N2);
  struct Layer {
    std::vector<double> probs, w;
    std::vector<int32_t> idx;
  };
  auto run = [&](const std::vector<double>& l1, const std::vector<double>& l2, Layer& a, Layer& b,
                 std::vector<double>& count) {
    std::vector<double> psum(E, 0.0);
    count.assign(E, 0.0);
    for (auto [l, L, N] : {std::tuple{&l1, &a, N1}, std::tuple{&l2, &b, N2}}) {
      L->probs.resize(N * E);
      L->w.resize(N * K);
      L->idx.resize(N * K);
      cpu::router_forward(L->probs.data(), L->idx.data(), L->w.data(), l->data(), N, E, K, true);
      cpu::aux_stats_accumulate(count.data(), psum.data(), L->probs.data(), L->idx.data(), N, E, K);
    }
    return daux * cpu::aux_loss_value(count.data(), psum.data(), rows, E);
  };
  Layer a, b;
  std::vector<double> count;
  run(kLayer1, kLayer2, a, b, count);
  const auto g1 = randn(N1 * E, 51), g2 = randn(N2 * E, 52);
  auto d1 = g1, d2 = g2;
  for (auto [L, d, N] : {std::tuple{&a, &d1, N1}, std::tuple{&b, &d2, N2}}) {
    std::vector<double> dprobs(N * E, 0.0);
    cpu::aux_loss_backward(dprobs.data(), count.data(), rows, daux, N, E);
    cpu::router_backward(d->data(), dprobs.data(), static_cast<const double*>(nullptr), L->probs.data(), L->idx.data(),
                         N, E, K, true);
  }
  auto f = [&](const std::vector<double>& l1, const std::vector<double>& l2) {
    Layer aa, bb;
    std::vector<double> c;
    const double v = run(l1, l2, aa, bb, c);
    EXPECT_EQ(c, count);  // top-k stable under the step
    return v;
  };
  expect_gradient([&](const std::vector<double>& v) { return f(v, kLayer2); }, kLayer1, minus(d1, g1), "dlogits1");
  expect_gradient([&](const std::vector<double>& v) { return f(kLayer1, v); }, kLayer2, minus(d2, g2), "dlogits2");
}

TEST(LoadBalancing, OutOfRangeExpertThrows) {
  std::vector<double> c(4), p(4), probs(4);
  const std::vector<int32_t> idx = {4};
  EXPECT_THROW(cpu::aux_stats_accumulate(c.data(), p.data(), probs.data(), idx.data(), 1, 4, 1), Error);
}

}  // namespace nextron::test
