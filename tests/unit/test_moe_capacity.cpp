// Token dropping (Megatron's --moe-expert-capacity-factor, --moe-token-drop-policy, --moe-pad-expert-input-to-capacity)
// in the MoE layer's dispatcher, on the CPU backend, one process:
// - with a capacity no expert reaches, the dispatcher path gives the fused path's output and every gradient;
// - with drops, the output equals the fused experts kernel run with the dropped slots' weights set to zero, where
//   which slots are dropped is Megatron's policy re-implemented here (per expert, capacity ceil(f N K / E); probs:
//   the highest routing weights, ties to the earlier slot; position: the earliest slots);
// - the gradients with drops match finite differences of the layer's loss (a dropped slot passes no gradient to its
//   routing weight, its expert or its token), and padding to capacity changes no number.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "kernels/cpu_ops.h"
#include "model/init.h"
#include "model/moe.h"

namespace nextron::test {

namespace {

struct Layer {
  ModelConfig config;
  ParamTable table;
  FlatBuffers flat;
  CpuOps ops;
  std::unique_ptr<SparseMoe> moe;
  int64_t layer = 0;

  // The moe_unnormed fixture without its shared expert (so the layer's output is the routed experts' alone).
  Layer(double capacity, bool by_position, bool pad)
      : config(fixture_config(capacity, by_position, pad)), table(config) {
    flat.params = Tensor::zeros({table.total_numel()});
    flat.grads = Tensor::zeros({table.total_numel()});
    flat.params_act = flat.params;
    init_parameters(table, flat.params.f32(), 7, 0.5);
    while (config.mlp_type(layer) != MlpType::sparse_moe) ++layer;
    moe = std::make_unique<SparseMoe>(config, ModuleWeights(table, flat, "layers." + std::to_string(layer) + ".mlp."),
                                      ops);
  }
  static ModelConfig fixture_config(double capacity, bool by_position, bool pad) {
    ModelConfig c = read_hf_config(std::string(NEXTRON_FIXTURES_DIR) + "/moe_unnormed");
    c.shared_expert_intermediate_size = 0;
    c.expert_capacity_factor = capacity;
    c.drop_by_position = by_position;
    c.pad_to_capacity = pad;
    return c;
  }
  // y = moe(x) and sum(g . y); with `grads`, also backward of that loss into flat.grads and dx.
  double run(const std::vector<float>& x, const std::vector<float>& g, SparseMoe::Saved& s, Tensor* dx = nullptr) {
    const int64_t H = config.hidden_size, N = static_cast<int64_t>(x.size()) / H;
    Tensor xt = Tensor::zeros({N, H}), y = Tensor::zeros({N, H});
    std::copy(x.begin(), x.end(), xt.f32());
    MoeAuxStats aux;
    aux.reset(ops, config.num_experts);
    moe->forward(s, xt, y, aux);
    double loss = 0;
    for (int64_t i = 0; i < N * H; ++i) loss += double(g[i]) * y.f32()[i];
    if (dx) {
      Tensor dy = Tensor::zeros({N, H});
      std::copy(g.begin(), g.end(), dy.f32());
      *dx = Tensor::zeros({N, H});
      flat.grads.zero_();
      moe->backward(s, dy, *dx, *dx, aux, 0.0f);  // no aux-loss gradient: the routed path only
    }
    last_y.assign(y.f32(), y.f32() + N * H);
    return loss;
  }
  std::vector<float> last_y;
};

std::vector<float> random_vec(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// Megatron's policy, written out: the kept flag of every (n, k) slot.
std::vector<char> reference_kept(const std::vector<int32_t>& topi, const std::vector<float>& topw, int64_t E,
                                 double factor, bool by_position) {
  const int64_t NK = static_cast<int64_t>(topi.size());
  const int64_t cap = static_cast<int64_t>(std::ceil(factor * double(NK) / double(E)));
  std::vector<char> kept(NK, 0);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> slots;
    for (int64_t s = 0; s < NK; ++s)
      if (topi[s] == e) slots.push_back(s);
    if (!by_position)
      std::sort(slots.begin(), slots.end(),
                [&](int64_t a, int64_t b) { return topw[a] != topw[b] ? topw[a] > topw[b] : a < b; });
    for (size_t i = 0; i < slots.size() && static_cast<int64_t>(i) < cap; ++i) kept[slots[i]] = 1;
  }
  return kept;
}

}  // namespace

TEST(MoeCapacity, NoDropsEqualsTheFusedPath) {
  Layer fused(0, false, false), dispatcher(100, false, false);
  const int64_t N = 24, H = fused.config.hidden_size;
  const auto x = random_vec(N * H, 1), g = random_vec(N * H, 2);
  SparseMoe::Saved s1, s2;
  Tensor dx1, dx2;
  fused.run(x, g, s1, &dx1);
  dispatcher.run(x, g, s2, &dx2);
  EXPECT_EQ(s2.dispatch.dropped, 0);
  for (int64_t i = 0; i < N * H; ++i) {
    EXPECT_NEAR(dispatcher.last_y[i], fused.last_y[i], 1e-6) << i;
    EXPECT_NEAR(dx2.f32()[i], dx1.f32()[i], 1e-5) << i;
  }
  for (int64_t i = 0; i < fused.table.total_numel(); ++i)
    EXPECT_NEAR(dispatcher.flat.grads.f32()[i], fused.flat.grads.f32()[i], 1e-5) << i;
}

TEST(MoeCapacity, DropsFollowMegatronsPolicy) {
  for (const bool by_position : {false, true})
    for (const bool pad : {false, true}) {
      SCOPED_TRACE(std::string(by_position ? "position" : "probs") + (pad ? " padded" : ""));
      const double factor = 0.6;
      Layer capped(factor, by_position, pad), fused(0, false, false);
      const int64_t N = 24, H = capped.config.hidden_size, K = capped.config.num_experts_per_tok,
                    E = capped.config.num_experts;
      const auto x = random_vec(N * H, 3), g = random_vec(N * H, 4);
      SparseMoe::Saved s, ref;
      capped.run(x, g, s);
      fused.run(x, g, ref);  // the same routing: the weights are the same
      const std::vector<int32_t> topi(ref.topi.data<int32_t>(), ref.topi.data<int32_t>() + N * K);
      const std::vector<float> topw(ref.topw.f32(), ref.topw.f32() + N * K);
      const std::vector<char> kept = reference_kept(topi, topw, E, factor, by_position);
      const int64_t dropped = std::count(kept.begin(), kept.end(), char{0});
      EXPECT_GT(dropped, 0) << "the test must drop slots";
      EXPECT_EQ(s.dispatch.dropped, dropped);
      // The fused kernel with the dropped slots' weights at zero.
      Tensor xt = Tensor::zeros({N, H}), y = Tensor::zeros({N, H}), w = Tensor::zeros({N, K});
      std::copy(x.begin(), x.end(), xt.f32());
      for (int64_t i = 0; i < N * K; ++i) w.f32()[i] = kept[i] ? topw[i] : 0.0f;
      auto state = fused.ops.new_moe_state();
      const ModuleWeights wt(fused.table, fused.flat, "layers." + std::to_string(fused.layer) + ".mlp.");
      fused.ops.moe_experts_forward(y, *state, xt, w, ref.topi, wt.p("experts.gate_up_proj"),
                                    wt.p("experts.down_proj"));
      // fp32 rounding only: the experts' GEMMs see the kept rows in other blocks than the fused kernel's.
      double scale = 1;
      for (int64_t i = 0; i < N * H; ++i) scale = std::max(scale, double(std::abs(y.f32()[i])));
      for (int64_t i = 0; i < N * H; ++i) EXPECT_NEAR(capped.last_y[i], y.f32()[i], 1e-6 * scale) << i;
    }
}

TEST(MoeCapacity, GradientsWithDropsMatchFiniteDifferences) {
  Layer capped(0.6, false, true);
  const int64_t N = 24, H = capped.config.hidden_size;
  auto x = random_vec(N * H, 5);
  const auto g = random_vec(N * H, 6);
  SparseMoe::Saved s;
  Tensor dx;
  capped.run(x, g, s, &dx);
  ASSERT_GT(s.dispatch.dropped, 0);
  const std::vector<float> grads(capped.flat.grads.f32(), capped.flat.grads.f32() + capped.table.total_numel());
  // Central differences in fp32 with step 1e-2: the truncation and round-off errors stay below 2e-3 absolute for x
  // and 1e-3 of a tensor's largest gradient for the weights (the router's reach ~1e2 at this init), far below what a
  // dropped slot that wrongly passed (or lost) its gradient would change, as long as no perturbation changes the
  // routing or the drops (checked: the dropped count is the same at both ends).
  auto loss_at = [&](const std::vector<float>& xs) {
    SparseMoe::Saved t;
    const double l = capped.run(xs, g, t);
    EXPECT_EQ(t.dispatch.dropped, s.dispatch.dropped);
    return l;
  };
  const float h = 1e-2f;
  double worst = 0;
  for (int64_t i = 0; i < N * H; i += 7) {
    auto xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    const double fd = (loss_at(xp) - loss_at(xm)) / (2 * h);
    worst = std::max(worst, std::abs(fd - dx.f32()[i]));
  }
  EXPECT_LT(worst, 2e-3) << "d x";
  // Expert and router weights of the layer.
  const std::string prefix = "layers." + std::to_string(capped.layer) + ".mlp.";
  for (const std::string name : {"experts.gate_up_proj", "experts.down_proj", "gate"}) {
    const ParamSpec& spec = capped.table.get(prefix + name);
    double worst_w = 0;
    for (int64_t j = 0; j < spec.numel(); j += 5) {
      float* p = capped.flat.params.f32() + spec.offset + j;
      const float p0 = *p;
      *p = p0 + h;
      const double lp = loss_at(x);
      *p = p0 - h;
      const double lm = loss_at(x);
      *p = p0;
      worst_w = std::max(worst_w, std::abs((lp - lm) / (2 * h) - grads[spec.offset + j]));
    }
    double largest = 0;
    for (int64_t j = 0; j < spec.numel(); ++j) largest = std::max(largest, double(std::abs(grads[spec.offset + j])));
    EXPECT_LT(worst_w, 1e-3 * std::max(1.0, largest)) << name << " (largest gradient " << largest << ")";
  }
}

}  // namespace nextron::test
