// cuBLASLt matrix products (kernels/cuda/blas.h) against the CPU fp32 reference (kernels/cpu/linear.h, blas.h) on
// bf16-rounded inputs: linear forward (bf16 and fp32 outputs, with and without bias), linear backward accumulating
// into prefilled dx (bf16), dw and dbias (fp32), the generic gemm with every transpose pair and padded row strides,
// and the grouped (per-expert) products including experts without rows. Then the degenerate problems the model
// produces (the shared-expert gate with OUT = 1, IN = 1, gemm with K = 1 or N = 1 and row strides 1), which must
// match whether cuBLASLt has an algorithm for them or they take the cublasGemmEx fallback, and the fallback itself,
// forced on every problem with force_fallback_for_testing. Then the CUTLASS grouped GEMM of the MoE experts
// (kernels/cuda/grouped_gemm.h): its argument layouts against CUTLASS's types (host only, runs without a GPU), its
// forward / dx / dw against the CPU per expert (experts without rows, row counts not multiples of the 128-row tile,
// more experts than the scheduler's 32-group lookahead, dx and y overwritten, dw accumulated onto a nonzero gradient
// and left bit-identical for experts without rows), and CudaOps' MoE experts with moe_gemm = cutlass vs
// cublaslt_loop.
//
// Tolerances (relative to the tensor's max |want|, see close_to):
//   bf16 outputs: kBf16Rtol (one bf16 rounding is 2^-9 relative; a bias or a beta = 1 accumulate adds one more).
//   fp32 outputs: products of bf16 values are exact in fp32, so only the summation differs (order, split-K, and
//   tensor-core accumulators that may truncate): the error grows like sqrt(K) ulps of the partial sums, hence
//   f32_rtol(K) = kF32Rtol * max(1, sqrt(K / 64)) (4e-4 at K = 1000, 5.7e-4 at K = 2048). A wrong element (a
//   missed row, a wrong transpose, a dropped accumulate) is off by O(1) relative and fails by orders of magnitude.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/linear.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/grouped_gemm.h"

namespace nextron::test {

namespace {

double f32_rtol(int64_t K) { return kF32Rtol * std::max(1.0, std::sqrt(double(K) / 64.0)); }

struct LinearShape {
  int64_t N, IN, OUT;
};

std::vector<LinearShape> linear_shapes() {
  std::vector<LinearShape> shapes;
  for (int64_t N : {1, 7, 128, 1000})
    for (auto [IN, OUT] : {std::pair<int64_t, int64_t>{48, 100}, {100, 48}, {256, 512}, {2048, 2048}})
      shapes.push_back({N, IN, OUT});
  shapes.push_back({3, 2048, 256});  // head-dim sized outputs
  shapes.push_back({17, 128, 2048});
  return shapes;
}

// The degenerate linear layers of the model: the shared-expert gate (OUT = 1: a matrix-vector product whose weight
// is one row, output row stride 1) and IN = 1 (an outer product, K = 1 with row strides 1).
std::vector<LinearShape> degenerate_linear_shapes() {
  std::vector<LinearShape> shapes;
  for (int64_t N : {1, 7, 1000}) {
    for (int64_t IN : {48, 2048}) shapes.push_back({N, IN, 1});
    for (int64_t OUT : {48, 2048}) shapes.push_back({N, 1, OUT});
  }
  return shapes;
}

std::string describe(const LinearShape& s, bool bias) {
  return "N=" + std::to_string(s.N) + " IN=" + std::to_string(s.IN) + " OUT=" + std::to_string(s.OUT) +
         (bias ? " bias" : " no bias");
}

// y (N, OUT) = x W^T (+ bias) in bf16 and in fp32 vs the CPU linear.
void check_linear_forward(cuda::Blas& blas, const LinearShape& s, bool with_bias, uint64_t& seed) {
  SCOPED_TRACE(describe(s, with_bias));
  const auto x = random_bf16(s.N * s.IN, seed++);
  const auto w = random_bf16(s.OUT * s.IN, seed++);
  const auto b = random_f32(s.OUT, seed++);
  std::vector<float> want(s.N * s.OUT);
  cpu::linear_forward<float>(want.data(), x.data(), w.data(), with_bias ? b.data() : nullptr, s.N, s.IN, s.OUT);

  DeviceBf16 dx(x), dw(w), y(s.N * s.OUT);
  DeviceArray<float> db(b), y32(s.N * s.OUT);
  const float* bias = with_bias ? db.get() : nullptr;
  blas.linear_forward(y.get(), dx.get(), dw.get(), bias, s.N, s.IN, s.OUT);
  EXPECT_TRUE(close_to(y.download(), want, kBf16Rtol)) << "bf16 output";
  blas.linear_forward(y32.get(), dx.get(), dw.get(), bias, s.N, s.IN, s.OUT);
  EXPECT_TRUE(close_to(y32.download(), want, f32_rtol(s.IN))) << "fp32 output";
}

// dx += dy W (bf16), dw += dy^T x and dbias += column sums of dy (fp32) on nonzero prefills vs the CPU linear.
void check_linear_backward(cuda::Blas& blas, const LinearShape& s, bool with_bias, uint64_t& seed) {
  SCOPED_TRACE(describe(s, with_bias));
  const auto x = random_bf16(s.N * s.IN, seed++);
  const auto w = random_bf16(s.OUT * s.IN, seed++);
  const auto dy = random_bf16(s.N * s.OUT, seed++);
  // Nonzero prefills: the backward must add to them (got = prefill + delta).
  auto want_dx = random_bf16(s.N * s.IN, seed++);
  auto want_dw = random_f32(s.OUT * s.IN, seed++);
  auto want_db = random_f32(s.OUT, seed++);
  DeviceBf16 d_dx(want_dx);
  DeviceArray<float> d_dw(want_dw), d_db(want_db);
  cpu::linear_backward<float>(want_dx.data(), want_dw.data(), with_bias ? want_db.data() : nullptr, dy.data(), x.data(),
                              w.data(), s.N, s.IN, s.OUT);

  DeviceBf16 d_x(x), d_w(w), d_dy(dy);
  blas.linear_backward(d_dx.get(), d_dw.get(), with_bias ? d_db.get() : nullptr, d_dy.get(), d_x.get(), d_w.get(), s.N,
                       s.IN, s.OUT);
  EXPECT_TRUE(close_to(d_dx.download(), want_dx, kBf16Rtol)) << "dx";
  EXPECT_TRUE(close_to(d_dw.download(), want_dw, f32_rtol(s.N))) << "dw";
  EXPECT_TRUE(close_to(d_db.download(), want_db, f32_rtol(s.N))) << "dbias";
}

// One generic problem: row-major C (M, N) = alpha op(A) op(B) + beta C, lda/ldb/ldc the row strides.
struct GemmCase {
  bool ta, tb;
  int64_t M, N, K, lda, ldb, ldc;
};

std::string describe(const GemmCase& g, float beta, bool f32_out) {
  return std::string("ta=") + (g.ta ? "T" : "N") + " tb=" + (g.tb ? "T" : "N") + " M=" + std::to_string(g.M) +
         " N=" + std::to_string(g.N) + " K=" + std::to_string(g.K) + " lda/ldb/ldc=" + std::to_string(g.lda) + "/" +
         std::to_string(g.ldb) + "/" + std::to_string(g.ldc) + " beta=" + std::to_string(beta) +
         (f32_out ? " fp32" : " bf16");
}

// The case with the smallest row strides gemm accepts (1 for a one-column operand) or padded ones.
GemmCase gemm_case(bool ta, bool tb, int64_t M, int64_t N, int64_t K, bool padded) {
  const int64_t pad = padded ? 1 : 0;
  return {ta, tb, M, N, K, (ta ? M : K) + 3 * pad, (tb ? K : N) + 5 * pad, N + 2 * pad};
}

// The degenerate generic problems: K = 1 (an outer product, one-column A or transposed B with row stride 1), N = 1
// (a matrix-vector product: B and C of one column, row stride 1, as in the gate's forward), and both.
std::vector<GemmCase> degenerate_gemms() {
  std::vector<GemmCase> cases;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (auto [N, K] : {std::pair<int64_t, int64_t>{53, 1}, {1, 29}, {1, 1}})
        cases.push_back(gemm_case(ta, tb, 37, N, K, false));
  return cases;
}

// Runs the problem on the GPU from a nonzero prefill of C (bf16-exact, so the same in either output type; with
// beta = 0 it must be ignored, and padding past N in each row must stay as it was) and compares it with cpu::gemm.
// Returns what the GPU computed.
std::vector<float> check_gemm(cuda::Blas& blas, const GemmCase& g, float beta, bool f32_out, uint64_t& seed) {
  SCOPED_TRACE(describe(g, beta, f32_out));
  const int64_t a_rows = g.ta ? g.K : g.M, b_rows = g.tb ? g.N : g.K;
  const float alpha = 0.5f;
  const auto A = random_bf16(a_rows * g.lda, seed++);
  const auto B = random_bf16(b_rows * g.ldb, seed++);
  auto want = random_bf16(g.M * g.ldc, seed++);
  DeviceBf16 dA(A), dB(B), dC16(want);
  DeviceArray<float> dC32(want);
  cpu::gemm<float>(g.ta, g.tb, g.M, g.N, g.K, alpha, A.data(), B.data(), beta, want.data(), g.lda, g.ldb, g.ldc);
  std::vector<float> got;
  if (f32_out) {
    blas.gemm(g.ta, g.tb, g.M, g.N, g.K, alpha, dA.get(), g.lda, dB.get(), g.ldb, beta, dC32.get(), CUDA_R_32F, g.ldc);
    got = dC32.download();
    EXPECT_TRUE(close_to(got, want, f32_rtol(g.K)));
  } else {
    blas.gemm(g.ta, g.tb, g.M, g.N, g.K, alpha, dA.get(), g.lda, dB.get(), g.ldb, beta, dC16.get(), CUDA_R_16BF, g.ldc);
    got = dC16.download();
    EXPECT_TRUE(close_to(got, want, kBf16Rtol));
  }
  return got;
}

}  // namespace

TEST(LinearCuda, ForwardMatchesCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  uint64_t seed = 1;
  for (const LinearShape& s : linear_shapes())
    for (bool with_bias : {false, true}) check_linear_forward(blas, s, with_bias, seed);
}

TEST(LinearCuda, BackwardAccumulatesLikeCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  uint64_t seed = 100;
  for (const LinearShape& s : linear_shapes())
    for (bool with_bias : {false, true}) check_linear_backward(blas, s, with_bias, seed);
}

TEST(LinearCuda, NullGradientsAreSkipped) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  const int64_t N = 7, IN = 48, OUT = 100;
  const auto x = random_bf16(N * IN, 1), w = random_bf16(OUT * IN, 2), dy = random_bf16(N * OUT, 3);
  auto want_dw = random_f32(OUT * IN, 4);
  DeviceArray<float> d_dw(want_dw);
  cpu::linear_backward<float>(nullptr, want_dw.data(), nullptr, dy.data(), x.data(), w.data(), N, IN, OUT);
  DeviceBf16 d_x(x), d_w(w), d_dy(dy);
  blas.linear_backward(nullptr, d_dw.get(), nullptr, d_dy.get(), d_x.get(), d_w.get(), N, IN, OUT);
  EXPECT_TRUE(close_to(d_dw.download(), want_dw, f32_rtol(N)));
}

TEST(LinearCuda, RepeatedCallsAreBitIdentical) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);  // the second call of each shape runs the cached plan
  const int64_t N = 128, IN = 256, OUT = 512;
  const auto x = random_bf16(N * IN, 5), w = random_bf16(OUT * IN, 6), dy = random_bf16(N * OUT, 7);
  DeviceBf16 d_x(x), d_w(w), d_dy(dy), y1(N * OUT), y2(N * OUT);
  blas.linear_forward(y1.get(), d_x.get(), d_w.get(), nullptr, N, IN, OUT);
  blas.linear_forward(y2.get(), d_x.get(), d_w.get(), nullptr, N, IN, OUT);
  EXPECT_EQ(y1.download(), y2.download());
  DeviceArray<float> dw1(OUT * IN), dw2(OUT * IN);
  blas.linear_backward(nullptr, dw1.get(), nullptr, d_dy.get(), d_x.get(), d_w.get(), N, IN, OUT);
  blas.linear_backward(nullptr, dw2.get(), nullptr, d_dy.get(), d_x.get(), d_w.get(), N, IN, OUT);
  EXPECT_EQ(dw1.download(), dw2.download());
  EXPECT_EQ(blas.fallback_plans(), 0u) << "cuBLASLt has algorithms for ordinary shapes";
}

// Row-major C (M, N) = alpha op(A) op(B) + beta C with row strides larger than the rows (padding must stay as it
// was), every transpose pair, both output types, beta 0 (C's old values ignored) and beta != 0.
TEST(GemmCuda, TransposesAndStridesMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  uint64_t seed = 200;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (float beta : {0.0f, 1.5f})
        for (bool f32_out : {false, true}) check_gemm(blas, gemm_case(ta, tb, 37, 53, 29, true), beta, f32_out, seed);
}

TEST(GemmCuda, EmptyReductionAndBadType) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  const int64_t M = 5, N = 6;
  const auto c = random_f32(M * N, 1);
  DeviceArray<float> dC(c);
  blas.gemm(false, false, M, N, 0, 1.0f, nullptr, 1, nullptr, N, 1.0f, dC.get(), CUDA_R_32F, N);  // C unchanged
  EXPECT_EQ(dC.download(), c);
  blas.gemm(false, false, M, N, 0, 1.0f, nullptr, 1, nullptr, N, 0.0f, dC.get(), CUDA_R_32F, N);  // C = 0
  EXPECT_EQ(dC.download(), std::vector<float>(M * N, 0.0f));
  EXPECT_THROW(blas.gemm(false, false, M, N, 4, 1.0f, nullptr, 4, nullptr, N, 0.0f, dC.get(), CUDA_R_64F, N),
               nextron::Error);
}

// Grouped products vs one CPU linear per expert, with experts that own no rows (first, middle and last).
TEST(GroupedGemmCuda, ForwardBackwardMatchPerExpertCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  const std::vector<int64_t> rows = {0, 5, 17, 0, 1, 64, 3, 0};
  const int64_t E = int64_t(rows.size());
  std::vector<int64_t> offsets(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + rows[e];
  const int64_t R = offsets[E];
  uint64_t seed = 300;
  for (auto [IN, OUT] : {std::pair<int64_t, int64_t>{48, 100}, {100, 48}, {256, 512}, {2048, 512}}) {
    SCOPED_TRACE("IN=" + std::to_string(IN) + " OUT=" + std::to_string(OUT));
    const auto x = random_bf16(R * IN, seed++);
    const auto w = random_bf16(E * OUT * IN, seed++);
    const auto dy = random_bf16(R * OUT, seed++);
    auto want_dx = random_bf16(R * IN, seed++);
    auto want_dw = random_f32(E * OUT * IN, seed++);
    DeviceBf16 d_x(x), d_w(w), d_dy(dy), d_y(R * OUT), d_dx(want_dx);
    DeviceArray<float> d_dw(want_dw);

    std::vector<float> want_y(R * OUT);
    for (int64_t e = 0; e < E; ++e) {
      if (rows[e] == 0) continue;  // its dw stays as prefilled
      const int64_t r0 = offsets[e];
      const float* we = w.data() + e * OUT * IN;
      cpu::linear_forward<float>(want_y.data() + r0 * OUT, x.data() + r0 * IN, we, nullptr, rows[e], IN, OUT);
      cpu::linear_backward<float>(want_dx.data() + r0 * IN, want_dw.data() + e * OUT * IN, nullptr,
                                  dy.data() + r0 * OUT, x.data() + r0 * IN, we, rows[e], IN, OUT);
    }
    blas.grouped_forward(d_y.get(), d_x.get(), d_w.get(), offsets.data(), E, IN, OUT);
    blas.grouped_backward(d_dx.get(), d_dw.get(), d_dy.get(), d_x.get(), d_w.get(), offsets.data(), E, IN, OUT);
    EXPECT_TRUE(close_to(d_y.download(), want_y, kBf16Rtol)) << "y";
    EXPECT_TRUE(close_to(d_dx.download(), want_dx, kBf16Rtol)) << "dx";
    EXPECT_TRUE(close_to(d_dw.download(), want_dw, f32_rtol(64))) << "dw";
  }
}

// The degenerate problems the model produces, whichever path each takes (cuBLASLt, or cublasGemmEx where its
// heuristic has no algorithm): the same tolerances as above, since both paths multiply bf16 exactly and sum in fp32.
// With K = 1 there is no sum at all: alpha a b + beta c is within an fp32 ulp or two, then rounded once to bf16.
TEST(BlasCuda, DegenerateShapesMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  uint64_t seed = 400;
  for (const LinearShape& s : degenerate_linear_shapes())
    for (bool with_bias : {false, true}) {
      check_linear_forward(blas, s, with_bias, seed);
      check_linear_backward(blas, s, with_bias, seed);
    }
  for (const GemmCase& g : degenerate_gemms())
    for (float beta : {0.0f, 1.0f})
      for (bool f32_out : {false, true}) check_gemm(blas, g, beta, f32_out, seed);
  RecordProperty("fallback_plans", std::to_string(blas.fallback_plans()));  // which path this GPU took, for the log
}

// The cublasGemmEx fallback forced on every problem, so it is checked on any GPU: every transpose pair with padded
// row strides, both output types, beta 0 and 1, the degenerate problems, and linear layers (forward with bias in
// both output types, backward); fallback_plans() proves it ran, and a repeated call (the cached plan) is
// bit-identical.
TEST(BlasCuda, GemmExFallbackMatchesCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  blas.force_fallback_for_testing(true);
  uint64_t seed = 600;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (float beta : {0.0f, 1.0f})
        for (bool f32_out : {false, true}) check_gemm(blas, gemm_case(ta, tb, 37, 53, 29, true), beta, f32_out, seed);
  // 16 distinct problems (transposes, strides, output type, beta != 0; every buffer 256-byte aligned): 16 plans.
  EXPECT_EQ(blas.fallback_plans(), 16u);
  for (const GemmCase& g : degenerate_gemms())
    for (float beta : {0.0f, 1.0f})
      for (bool f32_out : {false, true}) check_gemm(blas, g, beta, f32_out, seed);
  for (const LinearShape& s : {LinearShape{7, 48, 100}, LinearShape{128, 256, 512}, LinearShape{1000, 2048, 1}}) {
    check_linear_forward(blas, s, true, seed);
    check_linear_backward(blas, s, true, seed);
  }
  EXPECT_GT(blas.fallback_plans(), 16u);

  // Repeated calls: the second of each runs the cached fallback plan (no new plan) and gives the same bits.
  const int64_t N = 128, IN = 256, OUT = 512;
  const auto x = random_bf16(N * IN, seed++), w = random_bf16(OUT * IN, seed++), dy = random_bf16(N * OUT, seed++);
  DeviceBf16 d_x(x), d_w(w), d_dy(dy), y1(N * OUT), y2(N * OUT);
  DeviceArray<float> dw1(OUT * IN), dw2(OUT * IN);
  blas.linear_forward(y1.get(), d_x.get(), d_w.get(), nullptr, N, IN, OUT);
  blas.linear_backward(nullptr, dw1.get(), nullptr, d_dy.get(), d_x.get(), d_w.get(), N, IN, OUT);
  const size_t plans = blas.fallback_plans();
  blas.linear_forward(y2.get(), d_x.get(), d_w.get(), nullptr, N, IN, OUT);
  blas.linear_backward(nullptr, dw2.get(), nullptr, d_dy.get(), d_x.get(), d_w.get(), N, IN, OUT);
  EXPECT_EQ(y1.download(), y2.download());
  EXPECT_EQ(dw1.download(), dw2.download());
  EXPECT_EQ(blas.fallback_plans(), plans) << "the repeated calls built new plans";
  for (const GemmCase& g : {gemm_case(true, false, 37, 53, 29, true), gemm_case(false, false, 37, 1, 29, false)}) {
    uint64_t seed1 = seed, seed2 = seed;  // the same inputs twice
    EXPECT_EQ(check_gemm(blas, g, 1.0f, true, seed1), check_gemm(blas, g, 1.0f, true, seed2));
    EXPECT_EQ(check_gemm(blas, g, 0.0f, false, seed1), check_gemm(blas, g, 0.0f, false, seed2));
  }
  EXPECT_EQ(blas.fallback_plans(), plans) << "the repeated calls built new plans";

  // Switched off, a new problem is planned through cuBLASLt again, which has an algorithm for an ordinary shape.
  blas.force_fallback_for_testing(false);
  check_gemm(blas, gemm_case(false, true, 64, 96, 128, false), 0.0f, false, seed);
  EXPECT_EQ(blas.fallback_plans(), plans);
}

// --- The CUTLASS grouped GEMM (kernels/cuda/grouped_gemm.h).

// GroupedProblem and the int64 leading dimensions written by grouped_gemm_args.cu are what the CUTLASS
// instantiations read (cute::Shape<int, int, int>, each operand's stride type): a host-only check, no GPU needed.
TEST(GroupedGemmCutlass, ArgumentLayoutsMatchCute) { EXPECT_STREQ(cuda::grouped_gemm_layout_mismatch(), ""); }

TEST(GroupedGemmCutlass, ShapeSupport) {
  alignas(16) static char buffer[64];
  EXPECT_TRUE(cuda::grouped_gemm_shapes_supported(2048, 512, {buffer, nullptr, buffer + 16}));
  EXPECT_FALSE(cuda::grouped_gemm_shapes_supported(2048, 12, {buffer}));  // I = 12: rows of 24 bytes
  EXPECT_FALSE(cuda::grouped_gemm_shapes_supported(100, 48, {buffer}));
  EXPECT_FALSE(cuda::grouped_gemm_shapes_supported(48, 48, {buffer + 8}));  // 8-byte aligned operand
}

namespace {

#define NEXTRON_REQUIRE_SM90()                                                                                     \
  do {                                                                                                             \
    NEXTRON_REQUIRE_GPU();                                                                                         \
    if (!cuda::grouped_gemm_device_supported())                                                                    \
      GTEST_SKIP() << "the CUTLASS grouped GEMM is built for sm_90a only: this GPU is not compute capability 9.0"; \
  } while (0)

// One expert layout (rows per expert) and product size: y = x W^T, dx = dy W (both overwritten: prefilled with
// values that must disappear) and dw += dy^T x (prefilled) through the CUTLASS grouped GEMM vs the CPU per expert.
void check_cutlass_grouped(const std::vector<int64_t>& rows, int64_t IN, int64_t OUT, uint64_t& seed) {
  const int64_t E = int64_t(rows.size());
  SCOPED_TRACE("E=" + std::to_string(E) + " IN=" + std::to_string(IN) + " OUT=" + std::to_string(OUT));
  std::vector<int64_t> offsets(E + 1, 0);
  int64_t max_rows = 1;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e + 1] = offsets[e] + rows[e];
    max_rows = std::max(max_rows, rows[e]);
  }
  const int64_t R = offsets[E];
  const auto x = random_bf16(R * IN, seed++);
  const auto w = random_bf16(E * OUT * IN, seed++);
  const auto dy = random_bf16(R * OUT, seed++);
  const auto dw0 = random_f32(E * OUT * IN, seed++);
  std::vector<float> want_y(R * OUT, 0.0f), want_dx(R * IN, 0.0f), want_dw = dw0;
  for (int64_t e = 0; e < E; ++e) {
    if (rows[e] == 0) continue;
    const int64_t r0 = offsets[e];
    const float* we = w.data() + e * OUT * IN;
    cpu::linear_forward<float>(want_y.data() + r0 * OUT, x.data() + r0 * IN, we, nullptr, rows[e], IN, OUT);
    cpu::linear_backward<float>(want_dx.data() + r0 * IN, want_dw.data() + e * OUT * IN, nullptr, dy.data() + r0 * OUT,
                                x.data() + r0 * IN, we, rows[e], IN, OUT);
  }
  DeviceBf16 d_x(x), d_w(w), d_dy(dy), d_y(random_bf16(R * OUT, seed++, 5.0f, 9.0f)),
      d_dx(random_bf16(R * IN, seed++, 5.0f, 9.0f));
  DeviceArray<float> d_dw(dw0);
  DeviceArray<int64_t> d_offsets(offsets);
  DeviceArray<uint8_t> ws(size_t(cuda::grouped_gemm_workspace_bytes(E)));
  const auto ws_bytes = int64_t(ws.size());
  cuda::grouped_gemm_forward(d_y.get(), d_x.get(), d_w.get(), d_offsets.get(), E, IN, OUT, ws.get(), ws_bytes, nullptr);
  cuda::grouped_gemm_backward(d_dx.get(), d_dw.get(), d_dy.get(), d_x.get(), d_w.get(), d_offsets.get(), E, IN, OUT,
                              ws.get(), ws_bytes, nullptr);
  NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(close_to(d_y.download(), want_y, kBf16Rtol)) << "y";
  EXPECT_TRUE(close_to(d_dx.download(), want_dx, kBf16Rtol)) << "dx";
  const std::vector<float> got_dw = d_dw.download();
  EXPECT_TRUE(close_to(got_dw, want_dw, f32_rtol(max_rows))) << "dw";
  for (int64_t e = 0; e < E; ++e) {
    if (rows[e] != 0) continue;
    const auto begin = got_dw.begin() + e * OUT * IN;
    EXPECT_TRUE(std::equal(begin, begin + OUT * IN, dw0.begin() + e * OUT * IN))
        << "dw of expert " << e << " (no rows) changed";
  }
}

}  // namespace

TEST(GroupedGemmCutlass, ForwardBackwardMatchPerExpertCpu) {
  NEXTRON_REQUIRE_SM90();
  uint64_t seed = 700;
  // Experts without rows first, in the middle and last; row counts around the 128-row tile.
  const std::vector<int64_t> rows = {0, 5, 17, 0, 1, 64, 3, 0, 127, 128, 129, 257, 0};
  for (auto [IN, OUT] : {std::pair<int64_t, int64_t>{48, 96}, {96, 48}, {8, 8}, {256, 512}, {2048, 512}, {512, 2048}})
    check_cutlass_grouped(rows, IN, OUT, seed);
  // One expert; every row in one expert; no rows at all (nothing may be written).
  check_cutlass_grouped({300}, 64, 136, seed);
  check_cutlass_grouped({0, 0, 300, 0}, 136, 64, seed);
  check_cutlass_grouped({0, 0, 0}, 64, 64, seed);
  // Many experts (more than the group scheduler's 32-group lookahead), about a quarter without rows.
  std::mt19937_64 rng(9);
  std::uniform_int_distribution<int64_t> dist(-3, 12);
  std::vector<int64_t> many(200);
  for (int64_t& r : many) r = std::max<int64_t>(dist(rng), 0);
  check_cutlass_grouped(many, 128, 256, seed);
}

TEST(GroupedGemmCutlass, RepeatedCallsAreBitIdentical) {
  NEXTRON_REQUIRE_SM90();
  const std::vector<int64_t> offsets = {0, 40, 40, 170};
  const int64_t E = 3, R = 170, IN = 256, OUT = 128;
  const auto x = random_bf16(R * IN, 1), w = random_bf16(E * OUT * IN, 2), dy = random_bf16(R * OUT, 3);
  DeviceBf16 d_x(x), d_w(w), d_dy(dy), y1(R * OUT), y2(R * OUT);
  DeviceArray<float> dw1(E * OUT * IN), dw2(E * OUT * IN);
  DeviceArray<int64_t> d_offsets(offsets);
  DeviceArray<uint8_t> ws(size_t(cuda::grouped_gemm_workspace_bytes(E)));
  const auto b = int64_t(ws.size());
  cuda::grouped_gemm_forward(y1.get(), d_x.get(), d_w.get(), d_offsets.get(), E, IN, OUT, ws.get(), b, nullptr);
  cuda::grouped_gemm_forward(y2.get(), d_x.get(), d_w.get(), d_offsets.get(), E, IN, OUT, ws.get(), b, nullptr);
  cuda::grouped_gemm_backward(nullptr, dw1.get(), d_dy.get(), d_x.get(), d_w.get(), d_offsets.get(), E, IN, OUT,
                              ws.get(), b, nullptr);
  cuda::grouped_gemm_backward(nullptr, dw2.get(), d_dy.get(), d_x.get(), d_w.get(), d_offsets.get(), E, IN, OUT,
                              ws.get(), b, nullptr);
  EXPECT_EQ(y1.download(), y2.download());
  EXPECT_EQ(dw1.download(), dw2.download());
}

namespace {

// What one CudaOps' MoE experts computed: y, then dx, dweights and both weight gradients (prefilled) after the
// backward.
struct MoeResult {
  std::vector<float> y, dx, dweights, g_gate_up, g_down;
};

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = f32_to_bf16(v[i]);
  return h;
}
std::vector<float> from_bf16(const std::vector<uint16_t>& h) {
  std::vector<float> v(h.size());
  for (size_t i = 0; i < h.size(); ++i) v[i] = bf16_to_f32(h[i]);
  return v;
}

MoeResult run_moe_experts(CudaOpsOptions::MoeGemm gemm, int64_t N, int64_t K, int64_t E, int64_t H, int64_t I,
                          const std::vector<int32_t>& indices) {
  CudaOps ops(0, CudaOpsOptions{.moe_gemm = gemm});
  const auto x = random_bf16(N * H, 11), dy = random_bf16(N * H, 12), weights = random_f32(N * K, 13, 0.1f, 1.0f);
  const auto w_gu = random_bf16(E * 2 * I * H, 14, -0.3f, 0.3f), w_dn = random_bf16(E * H * I, 15, -0.3f, 0.3f);
  const auto g_gu = random_f32(E * 2 * I * H, 16), g_dn = random_f32(E * H * I, 17);
  Tensor tx, tdy, tw, tidx, ty, tdx, tdw;
  ParamRef gate_up, down;
  auto up_bf16 = [&](Tensor& t, const std::vector<float>& v, const Shape& shape) {
    const auto h = to_bf16(v);
    ops.upload(ops.act(t, shape), h.data(), h.size() * sizeof(uint16_t));
  };
  auto up_f32 = [&](Tensor& t, const std::vector<float>& v, const Shape& shape) {
    ops.upload(ops.f32(t, shape), v.data(), v.size() * sizeof(float));
  };
  up_bf16(tx, x, {N, H});
  up_bf16(tdy, dy, {N, H});
  up_f32(tw, weights, {N, K});
  ops.upload(ops.i32(tidx, {N, K}), indices.data(), indices.size() * sizeof(int32_t));
  up_f32(gate_up.w, w_gu, {E, 2 * I, H});
  up_bf16(gate_up.w_act, w_gu, {E, 2 * I, H});
  up_f32(gate_up.g, g_gu, {E, 2 * I, H});
  up_f32(down.w, w_dn, {E, H, I});
  up_bf16(down.w_act, w_dn, {E, H, I});
  up_f32(down.g, g_dn, {E, H, I});
  auto state = ops.new_moe_state();
  ops.moe_experts_forward(ops.act(ty, {N, H}), *state, tx, tw, tidx, gate_up, down);
  ops.moe_experts_backward(ops.act_zeroed(tdx, {N, H}), ops.f32_zeroed(tdw, {N, K}), *state, tdy, gate_up, down);
  MoeResult r;
  std::vector<uint16_t> h(N * H);
  ops.download(h.data(), ty, h.size() * sizeof(uint16_t));
  r.y = from_bf16(h);
  ops.download(h.data(), tdx, h.size() * sizeof(uint16_t));
  r.dx = from_bf16(h);
  r.dweights.resize(N * K);
  ops.download(r.dweights.data(), tdw, r.dweights.size() * sizeof(float));
  r.g_gate_up.resize(g_gu.size());
  ops.download(r.g_gate_up.data(), gate_up.g, r.g_gate_up.size() * sizeof(float));
  r.g_down.resize(g_dn.size());
  ops.download(r.g_down.data(), down.g, r.g_down.size() * sizeof(float));
  return r;
}

}  // namespace

// CudaOps' MoE experts with the CUTLASS grouped GEMM (moe_gemm = cutlass) and with the cuBLASLt loop agree: the
// same bf16 products summed in another order (bf16 tolerances: the activations between the GEMMs are rounded to bf16
// on both paths, so a rounding flip propagates). Experts 0, 3 and E - 1 get no token: their weight gradients must stay
// exactly as prefilled on both paths. The cutlass option must not have fallen back (nothing on stderr).
TEST(MoeGemmCuda, CutlassAndCublasLtLoopAgree) {
  NEXTRON_REQUIRE_SM90();
  const int64_t N = 301, K = 4, E = 12, H = 64, I = 40;
  std::mt19937_64 rng(5);
  std::vector<int32_t> used;
  for (int32_t e = 0; e < E; ++e)
    if (e != 0 && e != 3 && e != E - 1) used.push_back(e);
  std::vector<int32_t> indices(N * K);
  for (int64_t n = 0; n < N; ++n) {  // K distinct experts per token
    std::shuffle(used.begin(), used.end(), rng);
    for (int64_t k = 0; k < K; ++k) indices[n * K + k] = used[k];
  }
  ::testing::internal::CaptureStderr();
  const MoeResult a = run_moe_experts(CudaOpsOptions::MoeGemm::cutlass, N, K, E, H, I, indices);
  const std::string notes = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(notes.find("grouped GEMM"), std::string::npos) << "the cutlass option fell back: " << notes;
  const MoeResult b = run_moe_experts(CudaOpsOptions::MoeGemm::cublaslt_loop, N, K, E, H, I, indices);
  EXPECT_TRUE(close_to(a.y, b.y, kBf16Rtol)) << "y";
  EXPECT_TRUE(close_to(a.dx, b.dx, kBf16Rtol)) << "dx";
  EXPECT_TRUE(close_to(a.dweights, b.dweights, kBf16Rtol)) << "dweights";
  EXPECT_TRUE(close_to(a.g_gate_up, b.g_gate_up, kBf16Rtol)) << "gate_up gradient";
  EXPECT_TRUE(close_to(a.g_down, b.g_down, kBf16Rtol)) << "down gradient";
  for (int64_t e : {int64_t(0), int64_t(3), E - 1}) {
    const int64_t gu = 2 * I * H, dn = H * I;
    EXPECT_TRUE(
        std::equal(a.g_gate_up.begin() + e * gu, a.g_gate_up.begin() + (e + 1) * gu, b.g_gate_up.begin() + e * gu))
        << "gate_up gradient of unused expert " << e;
    EXPECT_TRUE(std::equal(a.g_down.begin() + e * dn, a.g_down.begin() + (e + 1) * dn, b.g_down.begin() + e * dn))
        << "down gradient of unused expert " << e;
  }
}

}  // namespace nextron::test
