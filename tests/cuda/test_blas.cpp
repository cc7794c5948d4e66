// cuBLASLt matrix products (kernels/cuda/blas.h) against the CPU fp32 reference (kernels/cpu/linear.h, blas.h) on
// bf16-rounded inputs: linear forward (bf16 and fp32 outputs, with and without bias), linear backward accumulating
// into prefilled dx (bf16), dw and dbias (fp32), the generic gemm with every transpose pair and padded row strides,
// and the grouped (per-expert) products including experts without rows.
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
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/linear.h"
#include "kernels/cuda/blas.h"

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

std::string describe(const LinearShape& s, bool bias) {
  return "N=" + std::to_string(s.N) + " IN=" + std::to_string(s.IN) + " OUT=" + std::to_string(s.OUT) +
         (bias ? " bias" : " no bias");
}

}  // namespace

TEST(LinearCuda, ForwardMatchesCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  uint64_t seed = 1;
  for (const LinearShape& s : linear_shapes())
    for (bool with_bias : {false, true}) {
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
}

TEST(LinearCuda, BackwardAccumulatesLikeCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  uint64_t seed = 100;
  for (const LinearShape& s : linear_shapes())
    for (bool with_bias : {false, true}) {
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
      cpu::linear_backward<float>(want_dx.data(), want_dw.data(), with_bias ? want_db.data() : nullptr, dy.data(),
                                  x.data(), w.data(), s.N, s.IN, s.OUT);

      DeviceBf16 d_x(x), d_w(w), d_dy(dy);
      blas.linear_backward(d_dx.get(), d_dw.get(), with_bias ? d_db.get() : nullptr, d_dy.get(), d_x.get(), d_w.get(),
                           s.N, s.IN, s.OUT);
      EXPECT_TRUE(close_to(d_dx.download(), want_dx, kBf16Rtol)) << "dx";
      EXPECT_TRUE(close_to(d_dw.download(), want_dw, f32_rtol(s.N))) << "dw";
      EXPECT_TRUE(close_to(d_db.download(), want_db, f32_rtol(s.N))) << "dbias";
    }
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
}

// Row-major C (M, N) = alpha op(A) op(B) + beta C with row strides larger than the rows (padding must stay as it
// was), every transpose pair, both output types, beta 0 (C's old values ignored) and beta != 0.
TEST(GemmCuda, TransposesAndStridesMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::Blas blas(nullptr);
  const int64_t M = 37, N = 53, K = 29;
  uint64_t seed = 200;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (float beta : {0.0f, 1.5f})
        for (bool f32_out : {false, true}) {
          SCOPED_TRACE(std::string("ta=") + (ta ? "T" : "N") + " tb=" + (tb ? "T" : "N") +
                       " beta=" + std::to_string(beta) + (f32_out ? " fp32" : " bf16"));
          const int64_t a_rows = ta ? K : M, a_cols = ta ? M : K, b_rows = tb ? N : K, b_cols = tb ? K : N;
          const int64_t lda = a_cols + 3, ldb = b_cols + 5, ldc = N + 2;
          const float alpha = 0.5f;
          const auto A = random_bf16(a_rows * lda, seed++);
          const auto B = random_bf16(b_rows * ldb, seed++);
          auto want = random_bf16(M * ldc, seed++);  // bf16-exact, so it is the same in either output type
          DeviceBf16 dA(A), dB(B), dC16(want);
          DeviceArray<float> dC32(want);
          cpu::gemm<float>(ta, tb, M, N, K, alpha, A.data(), B.data(), beta, want.data(), lda, ldb, ldc);
          if (f32_out) {
            blas.gemm(ta, tb, M, N, K, alpha, dA.get(), lda, dB.get(), ldb, beta, dC32.get(), CUDA_R_32F, ldc);
            EXPECT_TRUE(close_to(dC32.download(), want, f32_rtol(K)));
          } else {
            blas.gemm(ta, tb, M, N, K, alpha, dA.get(), lda, dB.get(), ldb, beta, dC16.get(), CUDA_R_16BF, ldc);
            EXPECT_TRUE(close_to(dC16.download(), want, kBf16Rtol));
          }
        }
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

}  // namespace nextron::test
