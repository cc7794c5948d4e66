// The chunked gated delta rule on the GPU (kernels/cuda/gated_delta_rule.h) against the per-token recurrence on
// the CPU (cpu::gated_delta_rule_recurrent_forward/backward<float>, the ground truth), forward (o, final state) and
// backward (dq, dk, dv, dg, dbeta, d_initial_state), on the same bf16-rounded inputs: q and k L2-normalised on the
// host and rounded again, beta in (0, 1), g in [-2, 0) unless a case says otherwise.
//
// Sweeps: S = 1, 63, 64, 65, 130, 200 (partial last chunks, one and several chunks), B = 1 and 2, Hv = Hk, 2 Hk and
// 4 Hk, dk = dv = 16 .. 256 and dk != dv (also widths that are not multiples of 64, and widths that are not multiples
// of 16, which run zero-padded), with and without the initial state and the final-state gradient, decays from ~1 (g
// near 0) to ~0 (g strongly negative), and the Qwen3-Next shape (Hk = 16, Hv = 32, dk = dv = 128), and the model's
// sequence length S = 4096 (64 chained chunks) under strong and weak decay. Also: gradients accumulate into prefilled
// buffers, two runs are bit-identical, S = 0 passes the state through, unsupported head dims throw.
//
// Tolerances (tensor-scale, close_to: worst |got - want| against the tensor's largest |want|). The kernels round
// their tensor-core operands to bf16 (W, U, T, h_c, Vn, the decayed P and dP, the state gradients, dVl (stored in
// bf16), dVn, dW): run on a CPU emulation of the kernels, the worst errors over these cases were 0.3 - 0.8 % for o, the
// final state, dq, dk, dv and d_initial_state (one bf16 output rounding plus operand roundings), 1.3 % for dbeta
// and 3.3 % for dg, and the same kernels with fp32 operands agree with the reference to 1e-5. dg and dbeta are sums
// over dk * dv products of states and state gradients that cancel (the dg of the last token with a random
// d_final_state, or under strong decay where dg is 1000 times smaller than the other gradients), so their operand
// rounding shows more. The limits below leave a factor of 2.5 - 3; indexing or algebra mistakes show up as errors of
// order 100 %.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda_test_util.h"
#include "kernels/cpu/delta_state_scan.h"
#include "kernels/cpu/gated_delta_rule.h"
#include "kernels/cuda/delta_state.h"
#include "kernels/cuda/gated_delta_rule.h"
#include "kernels/ops.h"

namespace nextron::test {

namespace {

constexpr double kGdrRtol = 2e-2;      // o, final_state, dq, dk, dv, d_initial_state
constexpr double kGdrBetaRtol = 4e-2;  // dbeta
constexpr double kGdrGateRtol = 8e-2;  // dg

struct GdrCase {
  int64_t B, S, Hk, Hv, dk, dv;
  bool initial_state = true;        // pass initial_state (else nullptr = zero)
  bool d_final_state = true;        // pass d_final_state (else nullptr = zero)
  float g_lo = -2.0f, g_hi = 0.0f;  // g uniform in [g_lo, g_hi)
};

std::string describe(const GdrCase& c) {
  return "B=" + std::to_string(c.B) + " S=" + std::to_string(c.S) + " Hk=" + std::to_string(c.Hk) +
         " Hv=" + std::to_string(c.Hv) + " dk=" + std::to_string(c.dk) + " dv=" + std::to_string(c.dv) +
         (c.initial_state ? " h0" : "") + (c.d_final_state ? " dht" : "") + " g in [" + std::to_string(c.g_lo) + ", " +
         std::to_string(c.g_hi) + ")";
}

cpu::GdrShape shape_of(const GdrCase& c) { return {c.B, c.S, c.Hk, c.Hv, c.dk, c.dv}; }

float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// Every row of d values divided by its L2 norm, then rounded to bf16 (the kernels take normalised q and k).
void l2_normalise_rows(std::vector<float>& x, int64_t d) {
  for (size_t r = 0; r < x.size() / size_t(d); ++r) {
    float* row = x.data() + r * size_t(d);
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(row[i]) * row[i];
    const float inv = ss > 0 ? float(1.0 / std::sqrt(ss)) : 0.0f;
    for (int64_t i = 0; i < d; ++i) row[i] = round_bf16(row[i] * inv);
  }
}

struct Inputs {
  std::vector<float> q, k, v, g, beta, h0, d_o, dht;  // h0 / dht empty when the case leaves them out
};

Inputs make_inputs(const GdrCase& c, uint64_t seed) {
  const size_t nqk = size_t(c.B * c.S * c.Hk * c.dk), nv = size_t(c.B * c.S * c.Hv * c.dv);
  const size_t ng = size_t(c.B * c.S * c.Hv), ns = size_t(c.B * c.Hv * c.dk * c.dv);
  Inputs in;
  in.q = random_bf16(nqk, seed);  // (B, S, Hk, dk)
  in.k = random_bf16(nqk, seed + 1);
  l2_normalise_rows(in.q, c.dk);
  l2_normalise_rows(in.k, c.dk);
  in.v = random_bf16(nv, seed + 2);                       // (B, S, Hv, dv)
  in.g = random_f32(ng, seed + 3, c.g_lo, c.g_hi);        // (B, S, Hv), <= 0
  in.beta = random_f32(ng, seed + 4, 0.0f, 1.0f);         // (B, S, Hv)
  if (c.initial_state) in.h0 = random_f32(ns, seed + 5);  // (B, Hv, dk, dv)
  in.d_o = random_bf16(nv, seed + 6);
  if (c.d_final_state) in.dht = random_f32(ns, seed + 7);
  return in;
}

struct Outputs {
  std::vector<float> o, ht, dq, dk, dv, dg, dbeta, dh0;
};

// Gradient buffers start from `prefill` (same sizes as the outputs; empty vectors = zeros).
Outputs run_cpu(const GdrCase& c, const Inputs& in, float scale, const Outputs& prefill) {
  const cpu::GdrShape s = shape_of(c);
  auto or_null = [](const std::vector<float>& x) { return x.empty() ? nullptr : x.data(); };
  Outputs out;
  out.o.resize(in.v.size());
  out.ht.resize(size_t(c.B * c.Hv * c.dk * c.dv));
  cpu::gated_delta_rule_recurrent_forward<float>(out.o.data(), out.ht.data(), in.q.data(), in.k.data(), in.v.data(),
                                                 in.g.data(), in.beta.data(), or_null(in.h0), s, scale);
  auto init = [](const std::vector<float>& pre, size_t n) { return pre.empty() ? std::vector<float>(n, 0.0f) : pre; };
  out.dq = init(prefill.dq, in.q.size());
  out.dk = init(prefill.dk, in.k.size());
  out.dv = init(prefill.dv, in.v.size());
  out.dg = init(prefill.dg, in.g.size());
  out.dbeta = init(prefill.dbeta, in.beta.size());
  out.dh0 = init(prefill.dh0, out.ht.size());
  cpu::gated_delta_rule_recurrent_backward<float>(
      out.dq.data(), out.dk.data(), out.dv.data(), out.dg.data(), out.dbeta.data(), out.dh0.data(), in.d_o.data(),
      or_null(in.dht), in.q.data(), in.k.data(), in.v.data(), in.g.data(), in.beta.data(), or_null(in.h0), s, scale);
  return out;
}

// The forward keeps its intermediates (`save`) and the backward reads them (`saved`), as the model's training runs
// by default. With `recomputed`, a second backward from the same prefill without them (recomputing them, as with
// --recompute-modules delta_rule_states) is stored there: the same kernels compute the intermediates both ways, so
// its gradients must be the same bits.
Outputs run_gpu(const GdrCase& c, const Inputs& in, float scale, const Outputs& prefill,
                Outputs* recomputed = nullptr) {
  const cpu::GdrShape s = shape_of(c);
  const size_t ns = size_t(c.B * c.Hv * c.dk * c.dv);
  auto init = [](const std::vector<float>& pre, size_t n) { return pre.empty() ? std::vector<float>(n, 0.0f) : pre; };
  DeviceBf16 q(in.q), k(in.k), v(in.v), d_o(in.d_o);
  DeviceArray<float> g(in.g), beta(in.beta), h0(in.h0), dht(in.dht);
  DeviceBf16 o(in.v.size());
  DeviceArray<float> ht(ns);
  DeviceBf16 dq(init(prefill.dq, in.q.size())), dk(init(prefill.dk, in.k.size())), dv(init(prefill.dv, in.v.size()));
  DeviceArray<float> dg(init(prefill.dg, in.g.size())), dbeta(init(prefill.dbeta, in.beta.size()));
  DeviceArray<float> dh0(init(prefill.dh0, ns));
  // The workspace and the saved intermediates start as all-ones bytes (NaN as fp32 and bf16): a kernel that reads
  // workspace nobody wrote poisons its results. The kept path's workspace is the smaller one
  // (caller_keeps_intermediates); the recomputing backward gets the full size.
  DeviceArray<uint8_t> ws(cuda::gated_delta_rule_workspace_bytes(s, /*caller_keeps_intermediates=*/true));
  DeviceArray<uint8_t> saved(cuda::gated_delta_rule_saved_bytes(s));
  NEXTRON_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws.bytes()));
  NEXTRON_CUDA_CHECK(cudaMemset(saved.get(), 0xff, saved.bytes()));
  const float* h0p = c.initial_state ? h0.get() : nullptr;
  cuda::gated_delta_rule_forward(o.get(), ht.get(), q.get(), k.get(), v.get(), g.get(), beta.get(), h0p, s, scale,
                                 saved.get(), ws.get(), nullptr);
  NEXTRON_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws.bytes()));
  cuda::gated_delta_rule_backward(dq.get(), dk.get(), dv.get(), dg.get(), dbeta.get(), dh0.get(), d_o.get(),
                                  c.d_final_state ? dht.get() : nullptr, q.get(), k.get(), v.get(), g.get(), beta.get(),
                                  h0p, s, scale, saved.get(), ws.get(), nullptr);
  if (recomputed) {
    DeviceArray<uint8_t> full(cuda::gated_delta_rule_workspace_bytes(s));
    NEXTRON_CUDA_CHECK(cudaMemset(full.get(), 0xff, full.bytes()));
    DeviceBf16 rq(init(prefill.dq, in.q.size())), rk(init(prefill.dk, in.k.size())), rv(init(prefill.dv, in.v.size()));
    DeviceArray<float> rg(init(prefill.dg, in.g.size())), rbeta(init(prefill.dbeta, in.beta.size())),
        rh0(init(prefill.dh0, ns));
    cuda::gated_delta_rule_backward(rq.get(), rk.get(), rv.get(), rg.get(), rbeta.get(), rh0.get(), d_o.get(),
                                    c.d_final_state ? dht.get() : nullptr, q.get(), k.get(), v.get(), g.get(),
                                    beta.get(), h0p, s, scale, nullptr, full.get(), nullptr);
    recomputed->dq = rq.download();
    recomputed->dk = rk.download();
    recomputed->dv = rv.download();
    recomputed->dg = rg.download();
    recomputed->dbeta = rbeta.download();
    recomputed->dh0 = rh0.download();
  }
  Outputs out;
  out.o = o.download();
  out.ht = ht.download();
  out.dq = dq.download();
  out.dk = dk.download();
  out.dv = dv.download();
  out.dg = dg.download();
  out.dbeta = dbeta.download();
  out.dh0 = dh0.download();
  return out;
}

void expect_close(const Outputs& got, const Outputs& want) {
  EXPECT_TRUE(close_to(got.o, want.o, kGdrRtol)) << "o";
  EXPECT_TRUE(close_to(got.ht, want.ht, kGdrRtol)) << "final_state";
  EXPECT_TRUE(close_to(got.dq, want.dq, kGdrRtol)) << "dq";
  EXPECT_TRUE(close_to(got.dk, want.dk, kGdrRtol)) << "dk";
  EXPECT_TRUE(close_to(got.dv, want.dv, kGdrRtol)) << "dv";
  EXPECT_TRUE(close_to(got.dg, want.dg, kGdrGateRtol)) << "dg";
  EXPECT_TRUE(close_to(got.dbeta, want.dbeta, kGdrBetaRtol)) << "dbeta";
  EXPECT_TRUE(close_to(got.dh0, want.dh0, kGdrRtol)) << "d_initial_state";
}

// Worst |got - want| over max|want| (the quantity close_to holds against its rtol); inf when got has a NaN.
double worst_relative(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 0.0, worst = 0.0;
  for (float w : want) scale = std::max(scale, std::fabs(double(w)));
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double err = std::fabs(double(got[i]) - double(want[i]));
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  return scale > 0 ? worst / scale : worst;
}

// One line per case with every tensor's worst relative error, so that a GPU run records the figures.
void print_worst(const std::string& label, const Outputs& got, const Outputs& want) {
  std::printf(
      "[gdr errors] %s: o %.2e final_state %.2e dq %.2e dk %.2e dv %.2e dg %.2e dbeta %.2e "
      "d_initial_state %.2e (of each tensor's max)\n",
      label.c_str(), worst_relative(got.o, want.o), worst_relative(got.ht, want.ht), worst_relative(got.dq, want.dq),
      worst_relative(got.dk, want.dk), worst_relative(got.dv, want.dv), worst_relative(got.dg, want.dg),
      worst_relative(got.dbeta, want.dbeta), worst_relative(got.dh0, want.dh0));
  std::fflush(stdout);
}

void check_case(const GdrCase& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const Inputs in = make_inputs(c, seed);
  const float scale = 1.0f / std::sqrt(float(c.dk));
  const Outputs want = run_cpu(c, in, scale, {});
  Outputs recomputed;
  const Outputs got = run_gpu(c, in, scale, {}, &recomputed);
  expect_close(got, want);
  print_worst(describe(c), got, want);
  // Kept or recomputed intermediates: the same bits.
  EXPECT_EQ(recomputed.dq, got.dq);
  EXPECT_EQ(recomputed.dk, got.dk);
  EXPECT_EQ(recomputed.dv, got.dv);
  EXPECT_EQ(recomputed.dg, got.dg);
  EXPECT_EQ(recomputed.dbeta, got.dbeta);
  EXPECT_EQ(recomputed.dh0, got.dh0);
}

}  // namespace

TEST(GatedDeltaRuleCuda, SequenceLengths) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 100;
  for (int64_t S : {1, 63, 64, 65, 130, 200}) check_case({2, S, 1, 2, 32, 32}, seed++);
}

TEST(GatedDeltaRuleCuda, HeadGroups) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 200;
  for (int64_t B : {1, 2}) {
    check_case({B, 130, 2, 2, 32, 32}, seed++);  // Hv = Hk
    check_case({B, 130, 2, 4, 32, 32}, seed++);  // Hv = 2 Hk
    check_case({B, 130, 1, 4, 32, 32}, seed++);  // Hv = 4 Hk
  }
}

TEST(GatedDeltaRuleCuda, HeadDims) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 300;
  for (int64_t d : {16, 32, 64, 128, 256}) check_case({1, 130, 1, 2, d, d}, seed++);
  check_case({1, 130, 1, 2, 32, 64}, seed++);
  check_case({1, 130, 1, 2, 64, 32}, seed++);
  check_case({1, 100, 1, 2, 48, 80}, seed++);    // tiles narrower than 64 and 32 columns
  check_case({1, 100, 1, 2, 144, 112}, seed++);  // a full and a partial 64-column tile
  // Not multiples of 16: run zero-padded (the small test models have dk = dv = 8).
  check_case({2, 130, 1, 2, 8, 8}, seed++);
  check_case({1, 70, 2, 4, 8, 16}, seed++);
  check_case({1, 65, 1, 2, 24, 8}, seed++);
  check_case({1, 100, 1, 1, 100, 37}, seed++);
  GdrCase no_states{2, 130, 1, 2, 8, 24};
  no_states.initial_state = no_states.d_final_state = false;
  check_case(no_states, seed++);
}

TEST(GatedDeltaRuleCuda, StatesAndDecays) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 400;
  for (bool h0 : {false, true})
    for (bool dht : {false, true}) {
      GdrCase c{2, 130, 1, 2, 32, 32};
      c.initial_state = h0;
      c.d_final_state = dht;
      check_case(c, seed++);
    }
  GdrCase strong{1, 200, 1, 2, 64, 64};  // decays to ~0 within a few tokens, e^G underflows within a chunk
  strong.g_lo = -20.0f;
  strong.g_hi = -4.0f;
  check_case(strong, seed++);
  GdrCase weak{1, 200, 1, 2, 64, 64};  // almost no decay: the state keeps everything
  weak.g_lo = -1e-3f;
  check_case(weak, seed++);
}

TEST(GatedDeltaRuleCuda, ModelShape) {
  NEXTRON_REQUIRE_GPU();
  check_case({2, 200, 16, 32, 128, 128}, 500);
}

// The model's sequence length with its head dims: B = 1, S = 4096, Hk = 2, Hv = 4 (two value heads per key head, as
// Qwen3-Next's 16 / 32), dk = dv = 128: 64 full chunks per head whose fp32 state is chained through the sequence
// (forward: the state handed to the next chunk; backward: the per-chunk states and the state gradient carried back
// from chunk 63 to d_initial_state), with h0 and d_final_state given. Two regimes:
//   strong decay, g in [-5, -2): a chunk's cumulative G is about -224 (-128 .. -320), far below fp32's smallest
//     exp (e^-103), so exp(G_i) underflows to 0 from about the 30th token of every chunk on; the entering state reaches
//     only a chunk's first few tokens (measured on the reference: 9 % of max|o|, 0.8 % rms). A decay formed as exp(G_i)
//     / exp(G_j) or exp(G_i - G_j) with i < j gives 0 / 0 or inf here.
//   weak decay, g in [-1e-2, -1e-3): the carried state makes up 80 % (rms) of o over the sequence and up to 81 % of
//     max|o| in the last chunk, so a dropped, repeated or mis-indexed carry in any of the 64 chunks is an error of
//     order 100 %.
// Reference: the fp32 per-token recurrence, as in every other case: it costs O(S dk dv), not O(S^2) (forward plus
// backward take about 1.3 s per regime on 2 cores). At this size the fp32 chunked CPU form agrees with it to 4e-6
// of the max for dg and 1e-6 for the rest, so the reference's own rounding over 4096 steps is negligible.
//
// Tolerances: the short cases' kGdrRtol / kGdrBetaRtol / kGdrGateRtol, unchanged: the longer chain does not
// accumulate more error. The chain itself is fp32 (the kernels keep S' = exp(G_L) S + Kd^T Vn and the backward's dS
// in fp32; only the copies h_c, dS' used as tensor-core operands are bf16), so each chunk injects the same error as
// in the short cases (~2^-9 relative per bf16 operand of W h_c, Kd^T Vn and the intra-chunk products, summed in
// fp32). Later chunks do not amplify it: the per-token map S -> exp(g) (I - beta k k^T) S has 2-norm <= 1 (|k| = 1,
// beta in (0, 1), g < 0), and its transpose carries dS back with the same norm. Measured on the reference with
// inputs drawn like these, a perturbation of the state shrinks by a factor 0.6 per chunk under weak decay and to 0
// under strong decay, so the error in any chunk is at most sum_m 0.6^m = 2.5 chunk injections if they all add
// coherently (1 / sqrt(1 - 0.6^2) = 1.25 if independent), reached after ~5 chunks and flat from there on. The short
// weak case (StatesAndDecays: dk = 64, g in [-1e-3, 0), 0.69 per chunk) sums 1 + 0.69 + 0.69^2 + 0.69^3 = 2.5 over its
// 3 - 4 chunks, the same. The worst element is a maximum over 2.1 M values here against 1.6 M in ModelShape, which
// moves the maximum of random rounding errors by ~1 %. So the limits of 2 / 4 / 8 % (measured on the short cases: 0.3 -
// 0.8 % for o, the state and dq / dk / dv / dh0, 1.3 % dbeta, 3.3 % dg) keep their factor 2.5 - 3. Run on the CPU
// emulation of the kernels (tools/cuda_emu, about 6 minutes), this test's worst errors were 0.18 - 0.70 % for every
// tensor in both regimes (strong / weak, in %: o 0.70 / 0.36, final state 0.21 / 0.30, dk 0.28 / 0.46, dg 0.18 / 0.30,
// dbeta 0.36 / 0.27), inside the short cases' range. By the same contraction, a state rounded to bf16 between chunks
// would cost only ~2.5 * 2^-9 = 0.5 % and pass: the printed figures, set against the short cases', are what would show
// such a drift.
TEST(GatedDeltaRuleCuda, LongSequenceMatchesCpu) {
  NEXTRON_REQUIRE_GPU();
  struct Regime {
    const char* name;
    float g_lo, g_hi;
  };
  const Regime regimes[] = {{"strong decay", -5.0f, -2.0f}, {"weak decay", -1e-2f, -1e-3f}};
  uint64_t seed = 900;
  for (const Regime& r : regimes) {
    GdrCase c{1, 4096, 2, 4, 128, 128};
    c.g_lo = r.g_lo;
    c.g_hi = r.g_hi;
    const std::string label = std::string(r.name) + ", " + describe(c);
    SCOPED_TRACE(label);
    const Inputs in = make_inputs(c, seed);
    seed += 10;
    const float scale = 1.0f / std::sqrt(float(c.dk));
    const Outputs want = run_cpu(c, in, scale, {});
    const Outputs got = run_gpu(c, in, scale, {});
    expect_close(got, want);
    print_worst(label, got, want);
  }
}

TEST(GatedDeltaRuleCuda, AccumulatesIntoGradients) {
  NEXTRON_REQUIRE_GPU();
  const GdrCase c{2, 100, 1, 2, 32, 64};
  const Inputs in = make_inputs(c, 600);
  const float scale = 1.0f / std::sqrt(float(c.dk));
  Outputs pre;
  pre.dq = random_bf16(in.q.size(), 601);
  pre.dk = random_bf16(in.k.size(), 602);
  pre.dv = random_bf16(in.v.size(), 603);
  pre.dg = random_f32(in.g.size(), 604);
  pre.dbeta = random_f32(in.beta.size(), 605);
  pre.dh0 = random_f32(size_t(c.B * c.Hv * c.dk * c.dv), 606);
  const Outputs want = run_cpu(c, in, scale, pre);  // prefill + the gradient
  const Outputs got = run_gpu(c, in, scale, pre);
  expect_close(got, want);
  // The prefill really is kept: without it the result would be off by about the prefill's magnitude.
  const Outputs fresh = run_gpu(c, in, scale, {});
  EXPECT_FALSE(close_to(fresh.dq, want.dq, kGdrRtol));
  EXPECT_FALSE(close_to(fresh.dg, want.dg, kGdrGateRtol));
}

TEST(GatedDeltaRuleCuda, Deterministic) {
  NEXTRON_REQUIRE_GPU();
  const GdrCase c{2, 200, 2, 4, 64, 64};
  const Inputs in = make_inputs(c, 700);
  const float scale = 1.0f / std::sqrt(float(c.dk));
  const Outputs a = run_gpu(c, in, scale, {});
  const Outputs b = run_gpu(c, in, scale, {});
  auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(a.o, b.o));
  EXPECT_TRUE(same(a.ht, b.ht));
  EXPECT_TRUE(same(a.dq, b.dq));
  EXPECT_TRUE(same(a.dk, b.dk));
  EXPECT_TRUE(same(a.dv, b.dv));
  EXPECT_TRUE(same(a.dg, b.dg));
  EXPECT_TRUE(same(a.dbeta, b.dbeta));
  EXPECT_TRUE(same(a.dh0, b.dh0));
}

// The HBM traffic account (gated_delta_rule.h) at the shape of the benchmark (B = 2, S = 4096, Hk = 16,
// Hv = 32, dk = dv = 128), printed per kernel in units of one (B, S, Hv, dv) bf16 tensor (64 MiB here) and pinned:
// a change to the kernels that adds traffic has to raise these limits knowingly. Two measures: block loads (every
// block's reads, L2 hits or not) and distinct bytes (each tensor region a kernel touches counted once). Host-only
// (no GPU needed). History (block loads, forward / backward): 24.27 / 80.64 before the traffic work; 24.27 / 67.14
// with dq and dk summed over the head group inside the dqk / wy kernels (no fp32 dq partials, no reduce kernel, dk
// written once); 20.23 / 57.08 with 64-column dv tiles in the state kernels; 16.72 / 53.56 with prepare, output and
// dvlocal run per key head (k, q read and K K^T, Q K^T formed once for the group's value heads); 16.72 / 51.56 with
// dVl in bf16; 16.72 / 49.56 with dKp summed over the head group by dqk (one fp32 tile per key head, not per value
// head); 16.72 / 46.52 with dqk looping over the tiles of dk (dO, Vn, dVn read once per head, one dG partial).
// Distinct bytes: 14.20 / 44.02 at 24.27 / 67.14, unchanged by the state tiles and the per-key-head kernels (they
// remove re-reads only); 14.20 / 42.02 with dVl in bf16; 14.20 / 40.02 with dKp per key head; 14.20 / 39.98 with
// one dG partial per head. With the forward's intermediates kept (GdrStates::saved, the model's default), the
// backward runs no prepare and no state forward: 34.88 block loads, 30.85 distinct.
TEST(GatedDeltaRuleCuda, HbmTrafficAccount) {
  const cpu::GdrShape s{2, 4096, 16, 32, 128, 128};
  const double unit = 2.0 * double(s.B * s.S * s.Hv * s.dv);
  struct Totals {
    double blocks, distinct;
  };
  auto print = [&](const char* what, const std::vector<cuda::GdrKernelTraffic>& rows) {
    Totals t{0, 0};
    for (const cuda::GdrKernelTraffic& r : rows) {
      std::printf("[gdr hbm] %s %-15s block loads: read %6.2f write %6.2f | distinct: read %6.2f write %6.2f\n", what,
                  r.kernel, double(r.read_bytes) / unit, double(r.write_bytes) / unit,
                  double(r.distinct_read_bytes) / unit, double(r.distinct_write_bytes) / unit);
      EXPECT_LE(r.distinct_read_bytes, r.read_bytes) << r.kernel;
      EXPECT_LE(r.distinct_write_bytes, r.write_bytes) << r.kernel;
      t.blocks += double(r.read_bytes + r.write_bytes);
      t.distinct += double(r.distinct_read_bytes + r.distinct_write_bytes);
    }
    t.blocks /= unit;
    t.distinct /= unit;
    std::printf("[gdr hbm] %s total %.3f units of (B, S, Hv, dv) bf16 in block loads, %.3f distinct\n", what, t.blocks,
                t.distinct);
    return t;
  };
  const Totals fwd_t = print("forward", cuda::gated_delta_rule_forward_hbm_account(s));
  const Totals bwd_t = print("backward", cuda::gated_delta_rule_backward_hbm_account(s));
  const Totals kept_t = print("backward (kept)", cuda::gated_delta_rule_backward_hbm_account(s, /*saved=*/true));
  const double fwd = fwd_t.blocks, bwd = bwd_t.blocks;
  EXPECT_DOUBLE_EQ(fwd, double(cuda::gated_delta_rule_forward_hbm_bytes(s)) / unit);
  EXPECT_DOUBLE_EQ(bwd, double(cuda::gated_delta_rule_backward_hbm_bytes(s)) / unit);
  EXPECT_DOUBLE_EQ(kept_t.blocks, double(cuda::gated_delta_rule_backward_hbm_bytes(s, true)) / unit);
  EXPECT_LE(fwd, 16.72);
  EXPECT_LE(bwd, 46.52);
  EXPECT_LE(fwd_t.distinct, 14.21);
  EXPECT_LE(bwd_t.distinct, 39.99);
  // The "<= 40 tensor-sizes" for the backward, in both measures, as the model runs it.
  EXPECT_LE(kept_t.blocks, 34.89);
  EXPECT_LE(kept_t.distinct, 30.86);
  // Keeping them costs memory, not traffic: the forward writes them to HBM either way (for its own output kernel).
  const double saved_units = double(cuda::gated_delta_rule_saved_bytes(s)) / unit;
  std::printf("[gdr hbm] kept intermediates: %.3f units of memory per layer\n", saved_units);
  EXPECT_NEAR(saved_units, 5.0, 0.02);
  // An independent floor: each tensor of the op's contract moved once (inputs read, outputs written, accumulated
  // gradients read and written; the account assumes every optional state is given). An account below it has
  // left a kernel's traffic out.
  const double tok = double(s.B * s.S), state = double(s.B * s.Hv * s.dk * s.dv) * 4;
  const double qk = tok * s.Hk * s.dk * 2, vo = tok * s.Hv * s.dv * 2, gate = tok * s.Hv * 4;
  const double fwd_floor = (2 * qk + vo + 2 * gate + vo + 2 * state) / unit;  // q k v g beta, o; h0, ht
  const double bwd_floor = (2 * qk + vo + 2 * gate + vo + 2 * state           // q k v g beta d_o; h0 dht
                            + 2 * (2 * qk + vo + 2 * gate) + 2 * state) /
                           unit;  // dq dk dv dg dbeta dh0 (+=)
  std::printf("[gdr hbm] floors: forward %.2f, backward %.2f units\n", fwd_floor, bwd_floor);
  EXPECT_GE(fwd_t.distinct, fwd_floor);
  EXPECT_GE(bwd_t.distinct, bwd_floor);
  std::fflush(stdout);
}

// The model sizes the kept intermediates with kernels/ops.h's closed form (it runs without the CUDA build too, in
// activation_memory's formula): it must be the kernels' carve, padded head dims included. Host-only.
TEST(GatedDeltaRuleCuda, SavedBytesMatchTheOpsFormula) {
  for (const cpu::GdrShape& s : std::vector<cpu::GdrShape>{{2, 4096, 16, 32, 128, 128},
                                                           {1, 130, 1, 2, 8, 8},
                                                           {3, 65, 2, 4, 24, 40},
                                                           {1, 1, 1, 1, 256, 256},
                                                           {2, 64, 1, 3, 100, 37}}) {
    SCOPED_TRACE(std::to_string(s.S) + " " + std::to_string(s.dk) + " " + std::to_string(s.dv));
    EXPECT_EQ(cuda::gated_delta_rule_saved_bytes(s),
              4 * size_t(gated_delta_rule_saved_elements(Device::cuda, s.B, s.S, s.Hk, s.Hv, s.dk, s.dv)));
    EXPECT_LT(cuda::gated_delta_rule_workspace_bytes(s, true), cuda::gated_delta_rule_workspace_bytes(s));
  }
}

TEST(GatedDeltaRuleCuda, EmptySequenceAndBadShapes) {
  NEXTRON_REQUIRE_GPU();
  // S = 0: final_state = initial_state, d_initial_state += d_final_state.
  const cpu::GdrShape s{2, 0, 1, 2, 16, 32};
  const size_t ns = size_t(s.B * s.Hv * s.dk * s.dv);
  const std::vector<float> h0 = random_f32(ns, 800), dht = random_f32(ns, 801), pre = random_f32(ns, 802);
  DeviceArray<float> h0_d(h0), dht_d(dht), ht_d(ns), dh0_d(pre);
  DeviceArray<uint8_t> ws(cuda::gated_delta_rule_workspace_bytes(s));
  cuda::gated_delta_rule_forward(nullptr, ht_d.get(), nullptr, nullptr, nullptr, nullptr, nullptr, h0_d.get(), s, 0.25f,
                                 nullptr, ws.get(), nullptr);
  EXPECT_EQ(ht_d.download(), h0);
  cuda::gated_delta_rule_backward(nullptr, nullptr, nullptr, nullptr, nullptr, dh0_d.get(), nullptr, dht_d.get(),
                                  nullptr, nullptr, nullptr, nullptr, nullptr, h0_d.get(), s, 0.25f, nullptr, ws.get(),
                                  nullptr);
  std::vector<float> want(ns);
  for (size_t i = 0; i < ns; ++i) want[i] = pre[i] + dht[i];
  EXPECT_EQ(dh0_d.download(), want);
  // The same with padded head dims.
  const cpu::GdrShape sp{2, 0, 1, 2, 8, 24};
  const size_t nsp = size_t(sp.B * sp.Hv * sp.dk * sp.dv);
  const std::vector<float> h0p = random_f32(nsp, 803), dhtp = random_f32(nsp, 804), prep = random_f32(nsp, 805);
  DeviceArray<float> h0p_d(h0p), dhtp_d(dhtp), htp_d(nsp), dh0p_d(prep);
  DeviceArray<uint8_t> wsp(cuda::gated_delta_rule_workspace_bytes(sp));
  cuda::gated_delta_rule_forward(nullptr, htp_d.get(), nullptr, nullptr, nullptr, nullptr, nullptr, h0p_d.get(), sp,
                                 0.25f, nullptr, wsp.get(), nullptr);
  EXPECT_EQ(htp_d.download(), h0p);
  cuda::gated_delta_rule_backward(nullptr, nullptr, nullptr, nullptr, nullptr, dh0p_d.get(), nullptr, dhtp_d.get(),
                                  nullptr, nullptr, nullptr, nullptr, nullptr, h0p_d.get(), sp, 0.25f, nullptr,
                                  wsp.get(), nullptr);
  std::vector<float> wantp(nsp);
  for (size_t i = 0; i < nsp; ++i) wantp[i] = prep[i] + dhtp[i];
  EXPECT_EQ(dh0p_d.download(), wantp);
  // Head dims must be in [1, 256]; Hv a multiple of Hk.
  EXPECT_THROW(cuda::gated_delta_rule_workspace_bytes({1, 64, 1, 2, 0, 128}), Error);
  EXPECT_THROW(cuda::gated_delta_rule_workspace_bytes({1, 64, 1, 2, 128, 512}), Error);
  EXPECT_THROW(cuda::gated_delta_rule_workspace_bytes({1, 64, 2, 3, 128, 128}), Error);
}

}  // namespace nextron::test

namespace nextron::test {

// Context parallelism's slice transition M (S_out = M S_in + L) on the GPU against cpu::slice_transition<float>:
// the same chunked forward with v = 0 and the identity as initial state, so the tolerance is the forward's. M is a
// product of contractions (exp(g) <= 1, ||k|| = 1, beta in (0, 1)): its entries are at most 1 and what an error costs
// is measured against 1, so an absolute 1e-4 is allowed on top (under the usual decay a 65-token product is ~1e-30,
// where bf16 operand rounding leaves relative errors of several percent of nothing). The weak-decay cases keep M of
// order 1, where the relative tolerance decides.
TEST(GatedDeltaRuleCuda, SliceTransition) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 900;
  GdrCase weak{2, 130, 1, 2, 32, 32}, weak_padded{1, 65, 1, 1, 8, 8};
  weak.g_lo = weak_padded.g_lo = -0.02f;
  for (const GdrCase& c : {GdrCase{2, 130, 1, 2, 32, 32}, GdrCase{1, 200, 2, 4, 128, 128}, GdrCase{1, 65, 1, 1, 8, 8},
                           GdrCase{1, 1, 2, 2, 16, 16}, weak, weak_padded}) {
    SCOPED_TRACE(describe(c));
    const Inputs in = make_inputs(c, seed++);
    const cpu::GdrShape s = shape_of(c);
    std::vector<float> want(size_t(c.B * c.Hv * c.dk * c.dk));
    cpu::slice_transition<float>(want.data(), in.k.data(), in.g.data(), in.beta.data(), s);
    DeviceBf16 k(in.k);
    DeviceArray<float> g(in.g), beta(in.beta), m(want.size());
    DeviceArray<uint8_t> ws(cuda::gated_delta_rule_transition_workspace_bytes(s));
    NEXTRON_CUDA_CHECK(cudaMemset(ws.get(), 0xff, ws.bytes()));  // unwritten workspace poisons the result
    cuda::gated_delta_rule_transition(m.get(), k.get(), g.get(), beta.get(), s, ws.get(), nullptr);
    EXPECT_TRUE(close_to(m.download(), want, kGdrRtol, 1e-4)) << "transition";
  }
}

// Generation's decoding step (cuda::gated_delta_rule_step, one token per call on the cached state) against the
// recurrence over the same T tokens from the same initial state. Both read the same bf16-rounded inputs and keep the
// state in fp32, so the state agrees to fp32 rounding (1e-5) and o to its bf16 output rounding (kGdrRtol). Shapes:
// the small models', the Qwen3-Next heads (dk = dv = 128), widths that are not multiples of 16, dv wider than the
// block (columns looped) and dk != dv.
TEST(GatedDeltaRuleCuda, DecodeStepMatchesRecurrence) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 1300;
  constexpr int64_t T = 5;
  for (const GdrCase& c : {GdrCase{2, T, 2, 4, 16, 16}, GdrCase{1, T, 16, 32, 128, 128}, GdrCase{2, T, 1, 1, 8, 8},
                           GdrCase{1, T, 2, 2, 200, 136}, GdrCase{3, T, 1, 2, 32, 48}}) {
    SCOPED_TRACE(describe(c));
    const Inputs in = make_inputs(c, seed++);
    const float scale = 1.0f / std::sqrt(float(c.dk));
    const Outputs want = run_cpu(c, in, scale, {});
    const int64_t nqk = c.Hk * c.dk, nv = c.Hv * c.dv, ng = c.Hv;
    DeviceArray<float> state(in.h0);
    DeviceBf16 q(size_t(c.B * nqk)), k(size_t(c.B * nqk)), v(size_t(c.B * nv)), o(size_t(c.B * nv));
    DeviceArray<float> g(size_t(c.B * ng)), beta(size_t(c.B * ng));
    std::vector<float> got_o(in.v.size());
    for (int64_t t = 0; t < T; ++t) {
      // Token t of every sequence as (B, 1, ...) rows.
      auto token = [&](const std::vector<float>& x, int64_t width) {
        std::vector<float> rows(size_t(c.B * width));
        for (int64_t b = 0; b < c.B; ++b) std::copy_n(x.begin() + (b * T + t) * width, width, rows.begin() + b * width);
        return rows;
      };
      q.upload(token(in.q, nqk));
      k.upload(token(in.k, nqk));
      v.upload(token(in.v, nv));
      g.upload(token(in.g, ng));
      beta.upload(token(in.beta, ng));
      cuda::gated_delta_rule_step(o.get(), state.get(), q.get(), k.get(), v.get(), g.get(), beta.get(), c.B, c.Hk, c.Hv,
                                  c.dk, c.dv, scale, nullptr);
      const std::vector<float> ot = o.download();
      for (int64_t b = 0; b < c.B; ++b) std::copy_n(ot.begin() + b * nv, nv, got_o.begin() + (b * T + t) * nv);
    }
    EXPECT_TRUE(close_to(got_o, want.o, kGdrRtol)) << "o";
    EXPECT_TRUE(close_to(state.download(), want.ht, 1e-5)) << "state";
  }
}

}  // namespace nextron::test
