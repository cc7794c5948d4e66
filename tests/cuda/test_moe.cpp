// MoE routing and token movement on the GPU (kernels/cuda/moe.h) against the CPU references (kernels/cpu/router.h,
// moe_experts.h, load_balancing.h) or plain host loops: router forward/backward (E up to 1024, K up to 10,
// norm_topk_prob on and off, exact ties), the dispatch (identical integers to cpu::moe_dispatch_build, up to 1M
// slots), permute/unpermute and their backwards, and the load-balancing statistics.
//
// Tolerances: integer outputs (indices, offsets, slots, counts) and pure copies must match exactly. fp32 outputs of
// fp32 math (probs, weights, dlogits, prob sums, dweights) use kF32Rtol: only the reduction order and expf's last
// ulp differ. bf16 outputs use kBf16Rtol. The top-k choice depends on the last ulp of the probabilities, so the
// exact index comparison with the CPU uses logits whose probabilities are well separated (or exactly tied);
// random logits are checked for self-consistency (the GPU's indices are the top-k of the GPU's own probs).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu/moe_experts.h"
#include "kernels/cpu/router.h"
#include "kernels/cuda/moe.h"

namespace nextron::test {

namespace {

struct RouterCase {
  int64_t E, K;
};
const std::vector<RouterCase> kRouterCases = {{8, 1},    {8, 2},   {8, 8},   {64, 2},   {64, 8},   {64, 10},
                                              {100, 10}, {512, 1}, {512, 8}, {512, 10}, {1024, 10}};

std::string describe(int64_t N, int64_t E, int64_t K, bool norm) {
  return "N=" + std::to_string(N) + " E=" + std::to_string(E) + " K=" + std::to_string(K) +
         (norm ? " norm_topk_prob" : "");
}

// Rows of a random permutation of 0, 4/E, 8/E, ... plus a per-row offset: adjacent probabilities differ by a
// factor exp(4/E) >= 1.004, far beyond fp32 rounding, so the top-k is the same on any device.
std::vector<float> separated_logits(int64_t N, int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto offset = random_f32(N, seed + 1, -2.0f, 2.0f);
  std::vector<float> l(N * E);
  std::vector<int> perm(E);
  for (int64_t n = 0; n < N; ++n) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t e = 0; e < E; ++e) l[n * E + e] = offset[n] + 4.0f / float(E) * float(perm[e]);
  }
  return l;
}

// Logits from {0, 0.5, 1}: many exact ties (equal logits give bit-equal probs on both devices), distinct values
// far apart.
std::vector<float> tied_logits(int64_t N, int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> level(0, 2);
  std::vector<float> l(N * E);
  for (float& v : l) v = 0.5f * float(level(rng));
  return l;
}

// K distinct experts per token drawn from [0, used) (experts >= used get no slots), or, with distinct = false,
// K independent draws (a token may repeat an expert: the dispatch must still be a stable sort).
std::vector<int32_t> random_indices(int64_t N, int64_t K, int64_t used, uint64_t seed, bool distinct = true) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> idx(N * K);
  std::vector<int32_t> p(distinct ? used : 0);
  std::uniform_int_distribution<int32_t> any(0, int32_t(used - 1));
  for (int64_t n = 0; n < N; ++n) {
    if (distinct) {
      std::iota(p.begin(), p.end(), 0);
      // A partial Fisher-Yates shuffle: the first K entries are a uniform K-subset in random order.
      for (int64_t k = 0; k < K; ++k) std::swap(p[k], p[k + int64_t(rng() % uint64_t(used - k))]);
      std::copy_n(p.begin(), K, idx.begin() + n * K);
    } else {
      for (int64_t k = 0; k < K; ++k) idx[n * K + k] = any(rng);
    }
  }
  return idx;
}

std::vector<float> to_float(const std::vector<int32_t>& v) { return std::vector<float>(v.begin(), v.end()); }

// Runs the GPU router forward; returns probs, indices, weights.
struct RouterOut {
  std::vector<float> probs;
  std::vector<int32_t> indices;
  std::vector<float> weights;
};
RouterOut gpu_router_forward(const std::vector<float>& logits, int64_t N, int64_t E, int64_t K, bool norm) {
  DeviceArray<float> d_logits(logits), probs(N * E), weights(N * K);
  DeviceArray<int32_t> indices(N * K);
  cuda::router_forward(probs.get(), indices.get(), weights.get(), d_logits.get(), N, E, K, norm, nullptr);
  return {probs.download(), indices.download(), weights.download()};
}

}  // namespace

TEST(RouterCuda, ForwardMatchesCpuOnSeparatedLogits) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 1;
  for (int64_t N : {1, 17, 1000})
    for (const RouterCase& c : kRouterCases)
      for (bool norm : {false, true}) {
        SCOPED_TRACE(describe(N, c.E, c.K, norm));
        const auto logits = separated_logits(N, c.E, seed++);
        std::vector<float> probs(N * c.E), weights(N * c.K);
        std::vector<int32_t> indices(N * c.K);
        cpu::router_forward<float>(probs.data(), indices.data(), weights.data(), logits.data(), N, c.E, c.K, norm);
        const RouterOut got = gpu_router_forward(logits, N, c.E, c.K, norm);
        EXPECT_EQ(got.indices, indices);
        EXPECT_TRUE(close_to(got.probs, probs, kF32Rtol)) << "probs";
        EXPECT_TRUE(close_to(got.weights, weights, kF32Rtol)) << "weights";
      }
}

// Routing replay: weights from given (arbitrary, repeated-free) indices match the CPU reference bit for bit (same
// gathers, same summation order).
TEST(RouterCuda, WeightsFromReplayedIndicesMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 900;
  for (int64_t N : {1, 17, 1000})
    for (const RouterCase& c : kRouterCases)
      for (bool norm : {false, true}) {
        SCOPED_TRACE(describe(N, c.E, c.K, norm));
        const auto logits = separated_logits(N, c.E, seed++);
        std::vector<float> probs(N * c.E), weights(N * c.K);
        std::vector<int32_t> indices(N * c.K);
        cpu::router_forward<float>(probs.data(), indices.data(), weights.data(), logits.data(), N, c.E, c.K, norm);
        std::vector<int32_t> other(N * c.K);  // experts n + 3k (mod E): distinct within a row while 3K <= E
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < c.K; ++k) other[n * c.K + k] = int32_t((n + (3 * k) % c.E) % c.E);
        std::vector<float> want(N * c.K);
        cpu::router_weights_from_indices<float>(want.data(), probs.data(), other.data(), N, c.E, c.K, norm);
        DeviceArray<float> d_probs(probs), d_w(N * c.K);
        DeviceArray<int32_t> d_idx(other);
        cuda::router_weights_from_indices(d_w.get(), d_probs.get(), d_idx.get(), N, c.E, c.K, norm, nullptr);
        EXPECT_EQ(d_w.download(), want);
      }
}

TEST(RouterCuda, TiesGoToTheLowerExpert) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 50;
  for (const RouterCase& c : kRouterCases)
    for (bool norm : {false, true}) {
      const int64_t N = 64;
      SCOPED_TRACE(describe(N, c.E, c.K, norm));
      const auto logits = tied_logits(N, c.E, seed++);
      std::vector<float> probs(N * c.E), weights(N * c.K);
      std::vector<int32_t> indices(N * c.K);
      cpu::router_forward<float>(probs.data(), indices.data(), weights.data(), logits.data(), N, c.E, c.K, norm);
      const RouterOut got = gpu_router_forward(logits, N, c.E, c.K, norm);
      EXPECT_EQ(got.indices, indices);
      EXPECT_TRUE(close_to(got.weights, weights, kF32Rtol)) << "weights";
    }
}

// Random logits: near-ties may order differently from the CPU in the last ulp, so the indices are checked against
// the top-k of the GPU's own probs (ties to the lower expert), and the probs against the CPU.
TEST(RouterCuda, ForwardOnRandomLogitsIsConsistent) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 100;
  for (const RouterCase& c : kRouterCases)
    for (bool norm : {false, true}) {
      const int64_t N = 300;
      SCOPED_TRACE(describe(N, c.E, c.K, norm));
      const auto logits = random_f32(N * c.E, seed++, -4.0f, 4.0f);
      std::vector<float> probs(N * c.E), weights(N * c.K);
      std::vector<int32_t> indices(N * c.K);
      cpu::router_forward<float>(probs.data(), indices.data(), weights.data(), logits.data(), N, c.E, c.K, norm);
      const RouterOut got = gpu_router_forward(logits, N, c.E, c.K, norm);
      EXPECT_TRUE(close_to(got.probs, probs, kF32Rtol)) << "probs";

      std::vector<int32_t> want_idx(N * c.K);
      std::vector<float> want_w(N * c.K);
      std::vector<int32_t> order(c.E);
      for (int64_t n = 0; n < N; ++n) {
        const float* p = got.probs.data() + n * c.E;
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + c.K, order.end(),
                          [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
        float top = 0.0f;
        for (int64_t k = 0; k < c.K; ++k) top += p[order[k]];
        for (int64_t k = 0; k < c.K; ++k) {
          want_idx[n * c.K + k] = order[k];
          want_w[n * c.K + k] = norm ? p[order[k]] / top : p[order[k]];
        }
      }
      EXPECT_EQ(got.indices, want_idx);
      EXPECT_TRUE(close_to(got.weights, want_w, kF32Rtol)) << "weights";
    }
}

// Backward on the CPU forward's probs and indices (so both sides differentiate the same selection), accumulating
// into prefilled dlogits, with dprobs and/or dweights.
TEST(RouterCuda, BackwardAccumulatesLikeCpu) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 200;
  for (int64_t N : {1, 17, 300})
    for (const RouterCase& c : kRouterCases)
      for (bool norm : {false, true})
        for (int which = 0; which < 3; ++which) {  // 0: dprobs only, 1: dweights only, 2: both
          SCOPED_TRACE(describe(N, c.E, c.K, norm) + " grads=" + std::to_string(which));
          const auto logits = random_f32(N * c.E, seed++, -4.0f, 4.0f);
          std::vector<float> probs(N * c.E), weights(N * c.K);
          std::vector<int32_t> indices(N * c.K);
          cpu::router_forward<float>(probs.data(), indices.data(), weights.data(), logits.data(), N, c.E, c.K, norm);
          const auto dprobs = random_f32(N * c.E, seed++);
          const auto dweights = random_f32(N * c.K, seed++);
          auto want = random_f32(N * c.E, seed++);
          DeviceArray<float> d_dl(want), d_dp(dprobs), d_dw(dweights), d_p(probs);
          DeviceArray<int32_t> d_idx(indices);
          const bool use_dp = which != 1, use_dw = which != 0;
          cpu::router_backward<float>(want.data(), use_dp ? dprobs.data() : nullptr, use_dw ? dweights.data() : nullptr,
                                      probs.data(), indices.data(), N, c.E, c.K, norm);
          cuda::router_backward(d_dl.get(), use_dp ? d_dp.get() : nullptr, use_dw ? d_dw.get() : nullptr, d_p.get(),
                                d_idx.get(), N, c.E, c.K, norm, nullptr);
          EXPECT_TRUE(close_to(d_dl.download(), want, kF32Rtol));
        }
}

struct DispatchCase {
  int64_t N, K, E, used;
  bool distinct;
};

TEST(MoeDispatchCuda, MatchesCpuDispatch) {
  NEXTRON_REQUIRE_GPU();
  // One chunk and many; experts without slots (used < E); repeated experts within a token; 1M slots with E = 8
  // (4096 chunks) and E = 512; E up to the 2048 limit.
  const std::vector<DispatchCase> cases = {
      {1, 1, 8, 8, true},          {3, 2, 8, 8, true},           {17, 2, 8, 5, true},
      {1000, 8, 64, 64, true},     {1000, 10, 512, 300, true},   {1000, 10, 512, 512, false},
      {4096, 10, 512, 512, true},  {100000, 10, 512, 512, true}, {131072, 8, 8, 8, true},
      {5000, 1, 1024, 1024, true}, {3000, 4, 2048, 1500, true},  {777, 3, 100, 100, false}};
  uint64_t seed = 300;
  for (const DispatchCase& c : cases) {
    SCOPED_TRACE("N=" + std::to_string(c.N) + " K=" + std::to_string(c.K) + " E=" + std::to_string(c.E) +
                 " used=" + std::to_string(c.used) + (c.distinct ? "" : " repeats"));
    const auto indices = random_indices(c.N, c.K, c.used, seed++, c.distinct);
    cpu::MoeDispatch want;
    cpu::moe_dispatch_build(want, indices.data(), c.N, c.K, c.E);

    DeviceArray<int32_t> d_idx(indices), slot_token(c.N * c.K), slot_of(c.N * c.K), bad(1);
    DeviceArray<int64_t> offsets(c.E + 1);
    cuda::moe_dispatch_build(offsets.get(), slot_token.get(), slot_of.get(), d_idx.get(), c.N, c.K, c.E, bad.get(),
                             nullptr);
    EXPECT_EQ(offsets.download(), want.expert_offsets);
    const auto got_token = slot_token.download(), got_of = slot_of.download();
    EXPECT_EQ(std::vector<int64_t>(got_token.begin(), got_token.end()), want.slot_token);
    EXPECT_EQ(std::vector<int64_t>(got_of.begin(), got_of.end()), want.slot_of);
    EXPECT_EQ(bad.download()[0], 0);
  }
}

TEST(MoeDispatchCuda, FlagsBadIndicesAndHandlesNoTokens) {
  NEXTRON_REQUIRE_GPU();
  const int64_t N = 5, K = 2, E = 8;
  for (int32_t badv : {-1, 8, 1000}) {
    std::vector<int32_t> indices = random_indices(N, K, E, 7);
    indices[3] = badv;
    DeviceArray<int32_t> d_idx(indices), slot_token(N * K), slot_of(N * K), bad(1);
    DeviceArray<int64_t> offsets(E + 1);
    cuda::moe_dispatch_build(offsets.get(), slot_token.get(), slot_of.get(), d_idx.get(), N, K, E, bad.get(), nullptr);
    EXPECT_EQ(bad.download()[0], 1) << "index " << badv;
  }
  DeviceArray<int64_t> offsets(std::vector<int64_t>(E + 1, 7));
  cuda::moe_dispatch_build(offsets.get(), nullptr, nullptr, nullptr, 0, K, E, nullptr, nullptr);
  EXPECT_EQ(offsets.download(), std::vector<int64_t>(E + 1, 0));
}

struct MoveCase {
  int64_t N, K, E, H;
};

// permute / unpermute and their backwards vs host loops over a CPU-built dispatch. H = 48 and 2048 take the
// 16-byte path, H = 100 the scalar one.
TEST(MoePermuteCuda, ForwardBackwardMatchHostLoops) {
  NEXTRON_REQUIRE_GPU();
  const std::vector<MoveCase> cases = {{1, 1, 8, 48},      {17, 2, 8, 100},      {1000, 10, 64, 48},
                                       {300, 2, 64, 2048}, {1000, 8, 512, 2048}, {3, 10, 512, 100}};
  uint64_t seed = 400;
  for (const MoveCase& c : cases) {
    SCOPED_TRACE("N=" + std::to_string(c.N) + " K=" + std::to_string(c.K) + " E=" + std::to_string(c.E) +
                 " H=" + std::to_string(c.H));
    const int64_t N = c.N, K = c.K, H = c.H, NK = N * K;
    const auto indices = random_indices(N, K, c.E, seed++);
    cpu::MoeDispatch d;
    cpu::moe_dispatch_build(d, indices.data(), N, K, c.E);
    const std::vector<int32_t> slot_token(d.slot_token.begin(), d.slot_token.end());
    const std::vector<int32_t> slot_of(d.slot_of.begin(), d.slot_of.end());
    DeviceArray<int32_t> d_token(slot_token), d_of(slot_of);

    // permute: an exact gather.
    const auto x = random_bf16(N * H, seed++);
    std::vector<float> want_xs(NK * H);
    for (int64_t s = 0; s < NK; ++s) std::copy_n(x.begin() + slot_token[s] * H, H, want_xs.begin() + s * H);
    DeviceBf16 d_x(x), d_xs(NK * H);
    cuda::moe_permute(d_xs.get(), d_x.get(), d_token.get(), NK, H, nullptr);
    EXPECT_EQ(d_xs.download(), want_xs) << "permute";

    // permute backward: dx[n] += sum_k dxs[slot_of[n K + k]].
    const auto dxs = random_bf16(NK * H, seed++);
    auto want_dx = random_bf16(N * H, seed++);
    DeviceBf16 d_dxs(dxs), d_dx(want_dx);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t h = 0; h < H; ++h) {
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) s += dxs[slot_of[n * K + k] * H + h];
        want_dx[n * H + h] += s;
      }
    cuda::moe_permute_backward(d_dx.get(), d_dxs.get(), d_of.get(), N, K, H, nullptr);
    EXPECT_TRUE(close_to(d_dx.download(), want_dx, kBf16Rtol)) << "permute backward";

    // unpermute: y[n] = sum_k w[n, k] ys[slot_of[n K + k]].
    const auto ys = random_bf16(NK * H, seed++);
    const auto w = random_f32(N * K, seed++, 0.0f, 1.0f);
    std::vector<float> want_y(N * H, 0.0f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t h = 0; h < H; ++h) want_y[n * H + h] += w[n * K + k] * ys[slot_of[n * K + k] * H + h];
    DeviceBf16 d_ys(ys), d_y(N * H);
    DeviceArray<float> d_w(w);
    cuda::moe_unpermute(d_y.get(), d_ys.get(), d_w.get(), d_of.get(), N, K, H, nullptr);
    EXPECT_TRUE(close_to(d_y.download(), want_y, kBf16Rtol)) << "unpermute";

    // unpermute backward: dys[slot] = w dy[n] (overwritten), dweights[n, k] += dy[n] . ys[slot].
    const auto dy = random_bf16(N * H, seed++);
    std::vector<float> want_dys(NK * H), dots(N * K);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t slot = slot_of[n * K + k];
        float dot = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          want_dys[slot * H + h] = w[n * K + k] * dy[n * H + h];
          dot += dy[n * H + h] * ys[slot * H + h];
        }
        dots[n * K + k] = dot;
      }
    for (bool with_dw : {true, false}) {
      const auto prefill = random_f32(N * K, seed++);
      std::vector<float> want_dwt = prefill;
      if (with_dw)
        for (int64_t i = 0; i < N * K; ++i) want_dwt[i] += dots[i];
      DeviceBf16 d_dy(dy), d_dys(random_bf16(NK * H, seed++));  // stale values, to be overwritten
      DeviceArray<float> d_dwt(prefill);
      cuda::moe_unpermute_backward(d_dys.get(), with_dw ? d_dwt.get() : nullptr, d_dy.get(), d_ys.get(), d_w.get(),
                                   d_of.get(), N, K, H, nullptr);
      EXPECT_TRUE(close_to(d_dys.download(), want_dys, kBf16Rtol)) << "dys";
      EXPECT_TRUE(close_to(d_dwt.download(), want_dwt, kF32Rtol)) << "dweights";
    }
  }
}

TEST(AuxLossCuda, StatsAndBackwardMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 500;
  for (int64_t N : {1, 17, 1000})
    for (const RouterCase& c : kRouterCases) {
      SCOPED_TRACE(describe(N, c.E, c.K, false));
      const auto logits = random_f32(N * c.E, seed++, -4.0f, 4.0f);
      std::vector<float> probs(N * c.E), weights(N * c.K);
      std::vector<int32_t> indices(N * c.K);
      cpu::router_forward<float>(probs.data(), indices.data(), weights.data(), logits.data(), N, c.E, c.K, false);

      // Prefilled statistics (as after an earlier layer): integer counts, arbitrary prob sums.
      auto want_count = to_float(random_indices(1, c.E, 1 << 20, seed++, false));
      auto want_prob = random_f32(c.E, seed++, 0.0f, 10.0f);
      DeviceArray<float> d_count(want_count), d_prob(want_prob), d_probs(probs);
      DeviceArray<int32_t> d_idx(indices);
      cpu::aux_stats_accumulate<float>(want_count.data(), want_prob.data(), probs.data(), indices.data(), N, c.E, c.K);
      cuda::aux_stats_accumulate(d_count.get(), d_prob.get(), d_probs.get(), d_idx.get(), N, c.E, c.K, nullptr);
      EXPECT_EQ(d_count.download(), want_count) << "count_sum";
      EXPECT_TRUE(close_to(d_prob.download(), want_prob, kF32Rtol)) << "prob_sum";

      const float total_rows = float(3 * N), daux = 0.01f;
      auto want_dprobs = random_f32(N * c.E, seed++);
      DeviceArray<float> d_dprobs(want_dprobs);
      cpu::aux_loss_backward<float>(want_dprobs.data(), want_count.data(), total_rows, daux, N, c.E);
      cuda::aux_loss_backward(d_dprobs.get(), d_count.get(), total_rows, daux, N, c.E, nullptr);
      EXPECT_TRUE(close_to(d_dprobs.download(), want_dprobs, kF32Rtol)) << "dprobs";
    }
}

}  // namespace nextron::test
