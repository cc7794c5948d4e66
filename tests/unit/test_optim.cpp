// AdamW against torch.optim.AdamW (tools/make_optim_fixtures.py), closed-form AdamW steps, the decay mask from the
// parameter table, gradient-norm clipping and the LR schedules.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "gradcheck.h"
#include "model/config.h"
#include "model/param_table.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"

namespace nextron::test {

namespace {

// |a - b| <= rel * max(|b|, 0.1 * max|b|): relative per element, except that elements which cancel to below a
// tenth of the tensor's largest magnitude are held to that tenth (torch's fp32 kernels round differently: FMA in
// lerp/addcmul, a not correctly rounded sqrt, an fp32 norm, so results differ by a few ulp of the inputs).
void expect_close(const float* a, const float* b, int64_t n, double rel, const std::string& what) {
  double scale = 0;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  for (int64_t i = 0; i < n; ++i) {
    const double tol = rel * std::max(std::abs(static_cast<double>(b[i])), 0.1 * scale);
    ASSERT_NEAR(a[i], b[i], tol) << what << " element " << i;
  }
}

template <typename Fn>
void expect_error_containing(Fn&& fn, const std::string& needle) {
  try {
    fn();
    FAIL() << "expected a nextron::Error mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Mirrors tools/make_optim_fixtures.py (PARAMS, hyperparameters, schedule).
struct FixtureParam {
  std::string name;
  int64_t numel;
  bool decay;
};
const std::vector<FixtureParam> kFixtureParams = {
    {"w1", 24, true}, {"norm", 6, false}, {"w2", 12, true}, {"bias", 3, false}};
constexpr int kFixtureSteps = 5;
constexpr double kFixtureMaxNorm = 1.0;

AdamWHyper fixture_hyper() {
  AdamWHyper h;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  return h;
}

LrScheduleConfig fixture_schedule() {
  LrScheduleConfig c;
  c.style = LrDecayStyle::cosine;
  c.lr = 1e-2;
  c.min_lr = 1e-3;
  c.warmup_steps = 2;
  c.decay_steps = 5;
  return c;
}

// Concatenates fixture tensors `prefix + name` in the flat layout.
std::vector<float> read_flat(const SafetensorsReader& r, const std::string& prefix) {
  std::vector<float> out;
  for (const auto& p : kFixtureParams) {
    Tensor t = r.read_f32(prefix + p.name);
    EXPECT_EQ(t.numel(), p.numel) << prefix + p.name;
    out.insert(out.end(), t.f32(), t.f32() + t.numel());
  }
  return out;
}

std::vector<FlatRange> fixture_decay_ranges() {
  std::vector<FlatRange> d;
  int64_t off = 0;
  for (const auto& p : kFixtureParams) {
    if (p.decay) d.push_back({off, off + p.numel});
    off += p.numel;
  }
  return d;
}

}  // namespace

// Five steps of clip_grad_norm_ + AdamW with a warmup/cosine LR, two parameter groups (decay / no decay), against
// torch; then the same run split into two ZeRO-like shards with shard-local moments must be bit-identical.
TEST(AdamW, MatchesTorchAdamWWithClippingAndSchedule) {
  SafetensorsReader r(std::string(NEXTRON_FIXTURES_DIR) + "/optim/adamw.safetensors");
  const std::vector<float> init = read_flat(r, "init.");
  const int64_t n = static_cast<int64_t>(init.size());
  const Tensor lr_ref = r.read_f32("lr"), norm_ref = r.read_f32("grad_norm");
  ASSERT_EQ(lr_ref.numel(), kFixtureSteps);
  const LrSchedule sched(fixture_schedule());
  const std::vector<FlatRange> decay = fixture_decay_ranges();
  const AdamWHyper h = fixture_hyper();

  // Full range.
  std::vector<float> p = init, m(n, 0.0f), v(n, 0.0f);
  // Two shards [0, k) and [k, n) with their own moments; k splits the decayed w1.
  const int64_t k = 10;
  std::vector<float> ps = init, m0(k, 0.0f), v0(k, 0.0f), m1(n - k, 0.0f), v1(n - k, 0.0f);
  for (int step = 0; step < kFixtureSteps; ++step) {
    std::vector<float> g = read_flat(r, "grad." + std::to_string(step) + ".");
    std::vector<float> gs = g;
    const double norm = clip_grad_norm(g.data(), {0, n}, kFixtureMaxNorm);
    EXPECT_NEAR(norm, norm_ref.f32()[step], 1e-6 * norm_ref.f32()[step]) << "grad norm, step " << step;
    const double lr = sched.lr_at(step);
    EXPECT_EQ(static_cast<float>(lr), lr_ref.f32()[step]) << "lr, step " << step;
    AdamWHyper hs = h;
    hs.lr = lr;
    adamw_step(p.data(), g.data(), m.data(), v.data(), {0, n}, decay, hs, step + 1);

    // Sharded: partial sums of squares reduced before the square root, then per-shard clip and update.
    const double sq = grad_sq_sum(gs.data(), {0, k}) + grad_sq_sum(gs.data() + k, {k, n});
    const double coef = clip_coefficient(std::sqrt(sq), kFixtureMaxNorm);
    if (coef < 1) {
      scale_grads(gs.data(), {0, k}, static_cast<float>(coef));
      scale_grads(gs.data() + k, {k, n}, static_cast<float>(coef));
    }
    adamw_step(ps.data(), gs.data(), m0.data(), v0.data(), {0, k}, decay, hs, step + 1);
    adamw_step(ps.data() + k, gs.data() + k, m1.data(), v1.data(), {k, n}, decay, hs, step + 1);
  }
  const std::vector<float> p_ref = read_flat(r, "final."), m_ref = read_flat(r, "exp_avg."),
                           v_ref = read_flat(r, "exp_avg_sq.");
  expect_close(p.data(), p_ref.data(), n, 1e-6, "params");
  expect_close(m.data(), m_ref.data(), n, 1e-6, "exp_avg");
  expect_close(v.data(), v_ref.data(), n, 1e-6, "exp_avg_sq");
  // The sharded run is bit-identical to the full one.
  EXPECT_EQ(ps, p);
  m0.insert(m0.end(), m1.begin(), m1.end());
  v0.insert(v0.end(), v1.begin(), v1.end());
  EXPECT_EQ(m0, m);
  EXPECT_EQ(v0, v);
}

// From zero state the first step is p -= lr * g / (|g| + eps): m/bc1 = g and sqrt(v)/sqrt(bc2) = |g|.
TEST(AdamW, ClosedFormFirstStepFromZeroState) {
  const std::vector<float> g = {0.5f, -2.0f, 1e-3f, -3e-7f, 0.0f, 7.0f};
  const int64_t n = static_cast<int64_t>(g.size());
  std::vector<float> p(n, 1.0f), m(n, 0.0f), v(n, 0.0f);
  AdamWHyper h;
  h.lr = 0.01;
  h.beta1 = 0.8;
  h.beta2 = 0.99;
  h.eps = 1e-6;
  h.weight_decay = 0.0;
  adamw_step(p.data(), g.data(), m.data(), v.data(), {0, n}, {{0, n}}, h, 1);
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[i];
    const double expect = 1.0 - h.lr * gi / (std::abs(gi) + h.eps);  // = 1 - lr * sign(g) / (1 + eps/|g|)
    EXPECT_NEAR(p[i], expect, 1e-7) << i;
    EXPECT_NEAR(m[i], (1 - h.beta1) * gi, 1e-7 * std::abs(gi)) << i;
    EXPECT_NEAR(v[i], (1 - h.beta2) * gi * gi, 1e-6 * gi * gi) << i;
  }
  // Bias corrections at a later step from zero state: step t gives m/bc1 = (1-b1) g / (1 - b1^t).
  std::vector<float> p2(n, 1.0f), m2(n, 0.0f), v2(n, 0.0f);
  adamw_step(p2.data(), g.data(), m2.data(), v2.data(), {0, n}, {}, h, 3);
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[i];
    const double mh = (1 - h.beta1) * gi / (1 - std::pow(h.beta1, 3));
    const double vh = std::sqrt((1 - h.beta2) * gi * gi) / std::sqrt(1 - std::pow(h.beta2, 3));
    EXPECT_NEAR(p2[i], 1.0 - h.lr * mh / (vh + h.eps), 1e-7) << i;
  }
}

// With zero gradient and zero state only the decoupled decay acts, and only inside the decay ranges.
TEST(AdamW, DecayOnlyStepWithZeroGradient) {
  const int64_t n = 10;
  std::vector<float> p(n), g(n, 0.0f), m(n, 0.0f), v(n, 0.0f);
  for (int64_t i = 0; i < n; ++i) p[i] = 0.5f + static_cast<float>(i);
  const std::vector<float> p0 = p;
  AdamWHyper h;
  h.lr = 0.1;
  h.weight_decay = 0.5;
  const std::vector<FlatRange> decay = {{2, 5}, {7, 8}};
  adamw_step(p.data(), g.data(), m.data(), v.data(), {0, n}, decay, h, 1);
  for (int64_t i = 0; i < n; ++i) {
    const bool decayed = (i >= 2 && i < 5) || i == 7;
    EXPECT_EQ(p[i], decayed ? p0[i] * static_cast<float>(1 - h.lr * h.weight_decay) : p0[i]) << i;
    EXPECT_EQ(m[i], 0.0f);
    EXPECT_EQ(v[i], 0.0f);
  }
}

// The decay mask applies per element however the range is cut into blocks and shards: a large range with decay
// ranges crossing the internal block boundaries equals an all-decay / no-decay pair selected per element.
TEST(AdamW, DecayRangesAcrossBlocksAndShards) {
  const int64_t n = 40000;
  const auto p0 = to_float(randn(n, 11)), g = to_float(randn(n, 12)), m0 = to_float(randn(n, 13, 0.1));
  std::vector<float> v0 = to_float(randn(n, 14, 0.1));
  for (auto& x : v0) x = x * x;
  const std::vector<FlatRange> decay = {{0, 3}, {100, 16390}, {16400, 16401}, {20000, 32768}, {39999, 40000}};
  AdamWHyper h;
  h.lr = 0.05;
  h.weight_decay = 0.3;
  auto run = [&](const std::vector<FlatRange>& d, std::vector<FlatRange> shards) {
    std::vector<float> p = p0, m = m0, v = v0;
    for (const FlatRange s : shards)
      adamw_step(p.data() + s.begin, g.data() + s.begin, m.data() + s.begin, v.data() + s.begin, s, d, h, 4);
    return p;
  };
  const auto all = run({{0, n}}, {{0, n}}), none = run({}, {{0, n}});
  const auto masked = run(decay, {{0, n}}), sharded = run(decay, {{0, 16395}, {16395, 16400}, {16400, n}});
  for (int64_t i = 0; i < n; ++i) {
    const bool d = std::any_of(decay.begin(), decay.end(), [&](FlatRange r) { return i >= r.begin && i < r.end; });
    ASSERT_EQ(masked[i], d ? all[i] : none[i]) << i;
    ASSERT_EQ(sharded[i], masked[i]) << i;
  }
}

// The decay ranges cover exactly the parameters whose ParamSpec::weight_decay is true; decay_all covers all.
TEST(AdamW, DecayRangesFollowTheParamTable) {
  const ModelConfig c = ModelConfig::from_file(std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe/config.json");
  const ParamTable t(c);
  const std::vector<FlatRange> d = decay_ranges(t);
  ASSERT_FALSE(d.empty());
  for (size_t i = 1; i < d.size(); ++i) EXPECT_LT(d[i - 1].end, d[i].begin) << "ranges sorted, disjoint, merged";
  int64_t nodecay = 0;
  for (const ParamSpec& s : t.specs()) {
    const bool inside = std::any_of(d.begin(), d.end(),
                                    [&](FlatRange r) { return s.offset >= r.begin && s.offset + s.numel() <= r.end; });
    const bool touches = std::any_of(d.begin(), d.end(),
                                     [&](FlatRange r) { return s.offset < r.end && s.offset + s.numel() > r.begin; });
    EXPECT_EQ(inside, s.weight_decay) << s.name;
    EXPECT_EQ(touches, s.weight_decay) << s.name;
    if (!s.weight_decay) ++nodecay;
  }
  EXPECT_GT(nodecay, 0);
  const std::vector<FlatRange> all = decay_ranges(t, true);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].begin, 0);
  EXPECT_EQ(all[0].end, t.total_numel());
}

// The AdamW class (state for one range) matches the free function and counts steps; bad settings are errors.
TEST(AdamW, ClassMatchesFreeFunctionAndRejectsBadSettings) {
  const ModelConfig c = ModelConfig::from_file(std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe/config.json");
  const ParamTable t(c);
  const int64_t n = t.total_numel();
  const FlatRange shard{n / 3, n - 5};
  AdamWHyper h;
  h.weight_decay = 0.2;
  AdamW opt(t, shard, h);
  EXPECT_EQ(opt.exp_avg().numel(), shard.size());
  std::vector<float> p = to_float(randn(n, 21)), g = to_float(randn(n, 22));
  std::vector<float> p2 = p, m(shard.size(), 0.0f), v(shard.size(), 0.0f);
  const std::vector<FlatRange> d = decay_ranges(t);
  for (int s = 1; s <= 2; ++s) {
    opt.step(p.data(), g.data(), 1e-3 * s);
    AdamWHyper hs = h;
    hs.lr = 1e-3 * s;
    adamw_step(p2.data() + shard.begin, g.data() + shard.begin, m.data(), v.data(), shard, d, hs, s);
  }
  EXPECT_EQ(opt.steps_taken(), 2);
  EXPECT_EQ(p, p2);
  EXPECT_TRUE(std::equal(m.begin(), m.end(), opt.exp_avg().f32()));
  EXPECT_TRUE(std::equal(v.begin(), v.end(), opt.exp_avg_sq().f32()));

  expect_error_containing([&] { AdamW(t, {0, n + 1}, h); }, "outside");
  AdamWHyper bad = h;
  bad.beta1 = 1.0;
  expect_error_containing([&] { AdamW(t, {0, n}, bad); }, "beta1");
  bad = h;
  bad.eps = 0;
  expect_error_containing([&] { validate(bad); }, "eps");
  bad = h;
  bad.weight_decay = -1;
  expect_error_containing([&] { validate(bad); }, "weight_decay");
  float x = 1, gx = 1, mx = 0, vx = 0;
  expect_error_containing([&] { adamw_step(&x, &gx, &mx, &vx, {0, 1}, {}, h, 0); }, "1-based");
  expect_error_containing([&] { adamw_step(&x, &gx, &mx, &vx, {0, 1}, {{0, 1}, {0, 1}}, h, 1); }, "overlap");
  opt.exp_avg() = Tensor::zeros({3});
  expect_error_containing([&] { opt.step(p.data(), g.data(), 1e-3); }, "moments");
}

TEST(GradClip, NormOfKnownVectors) {
  const std::vector<float> g = {9.0f, 3.0f, -4.0f, 9.0f};
  // Flat elements [1, 3) = {3, -4}: sum of squares 25, norm 5.
  EXPECT_EQ(grad_sq_sum(g.data() + 1, {1, 3}), 25.0);
  EXPECT_EQ(grad_sq_sum(g.data(), {0, 0}), 0.0);
  // Many blocks: exact in double.
  const int64_t n = 100003;
  std::vector<float> ones(n, 0.5f);
  EXPECT_EQ(grad_sq_sum(ones.data(), {0, n}), 0.25 * n);
  // Partial sums over shards add up to the whole.
  const auto r = to_float(randn(n, 31));
  const double whole = grad_sq_sum(r.data(), {0, n});
  const double parts = grad_sq_sum(r.data(), {0, 50000}) + grad_sq_sum(r.data() + 50000, {50000, n});
  EXPECT_NEAR(parts, whole, 1e-12 * whole);
}

TEST(GradClip, ClipsToMaxNormOnlyWhenAbove) {
  std::vector<float> g = {3.0f, -4.0f};
  EXPECT_DOUBLE_EQ(clip_grad_norm(g.data(), {0, 2}, 1.0), 5.0);
  // clip_coef = max_norm / (norm + 1e-6).
  const double coef = 1.0 / (5.0 + 1e-6);
  EXPECT_FLOAT_EQ(g[0], static_cast<float>(3.0 * coef));
  EXPECT_FLOAT_EQ(g[1], static_cast<float>(-4.0 * coef));
  EXPECT_NEAR(std::sqrt(grad_sq_sum(g.data(), {0, 2})), 1.0, 1e-6);

  auto r = to_float(randn(1000, 41));
  const double before = clip_grad_norm(r.data(), {0, 1000}, 2.5);
  EXPECT_GT(before, 2.5);
  EXPECT_NEAR(std::sqrt(grad_sq_sum(r.data(), {0, 1000})), 2.5, 1e-6 * 2.5);

  // Below max_norm: untouched.
  const auto small0 = to_float(randn(100, 42, 0.01));
  auto small = small0;
  EXPECT_LT(clip_grad_norm(small.data(), {0, 100}, 1.0), 1.0);
  EXPECT_EQ(small, small0);
  EXPECT_EQ(clip_coefficient(0.5, 1.0), 1.0);

  std::vector<float> s = {1.0f, -2.0f, 4.0f};
  scale_grads(s.data() + 1, {1, 3}, 0.25f);
  EXPECT_EQ(s, (std::vector<float>{1.0f, -0.5f, 1.0f}));

  expect_error_containing([] { clip_coefficient(1.0, 0.0); }, "max_norm");
  EXPECT_TRUE(std::isnan(clip_coefficient(std::nan(""), 1.0)));
  EXPECT_EQ(clip_coefficient(INFINITY, 1.0), 0.0);
}

// Megatron's warmup: lr(s) = lr * s / warmup for s <= warmup (s = steps already taken), so s = 0 gives 0.
TEST(LrSchedule, LinearWarmupFromZeroMegatronConvention) {
  LrScheduleConfig c;
  c.lr = 1e-3;
  c.min_lr = 1e-4;
  c.warmup_steps = 4;
  c.decay_steps = 14;
  const LrSchedule s(c);
  EXPECT_EQ(s.lr_at(0), 0.0);
  EXPECT_DOUBLE_EQ(s.lr_at(1), 0.25e-3);
  EXPECT_DOUBLE_EQ(s.lr_at(2), 0.5e-3);
  EXPECT_DOUBLE_EQ(s.lr_at(4), 1e-3);  // warmup end: the peak
  // No warmup: the first step uses the peak.
  c.warmup_steps = 0;
  EXPECT_EQ(LrSchedule(c).lr_at(0), 1e-3);
}

TEST(LrSchedule, CosineDecayClosedForm) {
  LrScheduleConfig c;
  c.style = parse_lr_decay_style("cosine");
  c.lr = 1e-3;
  c.min_lr = 1e-4;
  c.warmup_steps = 4;
  c.decay_steps = 14;
  const LrSchedule s(c);
  for (int64_t t = 4; t <= 14; ++t) {
    const double r = (t - 4) / 10.0;
    EXPECT_NEAR(s.lr_at(t), 1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(std::numbers::pi * r)), 1e-18) << t;
  }
  EXPECT_NEAR(s.lr_at(9), 1e-4 + 0.5 * 0.9e-3, 1e-18);  // halfway: the mean of lr and min_lr
  EXPECT_NEAR(s.lr_at(14), 1e-4, 1e-18);                // end of decay
  EXPECT_EQ(s.lr_at(15), 1e-4);                         // after the end: constant min_lr
  EXPECT_EQ(s.lr_at(1000000), 1e-4);
  // The fixture's schedule (tools/make_optim_fixtures.py).
  const LrSchedule f(fixture_schedule());
  EXPECT_DOUBLE_EQ(f.lr_at(3), 1e-3 + 0.5 * (std::cos(std::numbers::pi / 3) + 1) * 9e-3);
}

TEST(LrSchedule, LinearDecayAndConstant) {
  LrScheduleConfig c;
  c.style = parse_lr_decay_style("linear");
  c.lr = 2.0;
  c.min_lr = 1.0;
  c.warmup_steps = 2;
  c.decay_steps = 6;
  const LrSchedule s(c);
  EXPECT_DOUBLE_EQ(s.lr_at(1), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_at(2), 2.0);
  EXPECT_DOUBLE_EQ(s.lr_at(3), 1.75);
  EXPECT_DOUBLE_EQ(s.lr_at(4), 1.5);
  EXPECT_DOUBLE_EQ(s.lr_at(6), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_at(7), 1.0);
  c.style = parse_lr_decay_style("constant");
  const LrSchedule k(c);
  EXPECT_DOUBLE_EQ(k.lr_at(1), 1.0);  // constant still warms up
  EXPECT_DOUBLE_EQ(k.lr_at(2), 2.0);
  EXPECT_DOUBLE_EQ(k.lr_at(5), 2.0);
  EXPECT_DOUBLE_EQ(k.lr_at(100), 2.0);
  c.warmup_steps = 0;
  c.decay_steps = 0;
  EXPECT_DOUBLE_EQ(LrSchedule(c).lr_at(0), 2.0);
  EXPECT_STREQ(lr_decay_style_name(LrDecayStyle::linear), "linear");
}

TEST(LrSchedule, InvalidSettingsAreErrors) {
  LrScheduleConfig ok;
  ok.lr = 1e-3;
  ok.min_lr = 1e-4;
  ok.warmup_steps = 10;
  ok.decay_steps = 100;
  EXPECT_NO_THROW(LrSchedule{ok});
  auto with = [&](auto edit) {
    LrScheduleConfig c = ok;
    edit(c);
    return c;
  };
  expect_error_containing([&] { LrSchedule(with([](auto& c) { c.warmup_steps = -1; })); }, "warmup_steps");
  expect_error_containing([&] { LrSchedule(with([](auto& c) { c.decay_steps = -5; })); }, "decay_steps");
  expect_error_containing([&] { LrSchedule(with([](auto& c) { c.min_lr = 1e-2; })); }, "min_lr");
  expect_error_containing([&] { LrSchedule(with([](auto& c) { c.lr = -1; })); }, "lr");
  expect_error_containing([&] { LrSchedule(with([](auto& c) { c.warmup_steps = 101; })); }, "exceeds");
  expect_error_containing([&] { LrSchedule(with([](auto& c) { c.warmup_steps = c.decay_steps = 0; })); },
                          "decay_steps");
  expect_error_containing([] { parse_lr_decay_style("cosin"); }, "constant, linear, cosine");
  expect_error_containing([&] { LrSchedule(ok).lr_at(-1); }, "step");
}

}  // namespace nextron::test
