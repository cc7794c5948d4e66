// CUDA norms (kernels/cuda/norms.h: rmsnorm, rmsnorm_gated, l2norm) against their CPU references (kernels/cpu),
// run in fp32 on the same bf16-rounded inputs. Forward outputs, saved rstd, in-place forwards, and backwards that
// accumulate: every gradient is pre-filled with random values of the same magnitude as its delta, so a kernel that
// overwrote instead of adding would miss by far more than the tolerance. nullptr gradients are checked to skip
// exactly (the other gradients come out bit-identical).
//
// Shapes cover odd sizes (N = 1, 3, 17, 1000; D = 48, 100, not multiples of 32) and the model's row widths: head
// dims 128 / 256 (q_norm, k_norm, DeltaNet norms) and hidden 2048. The RMSNorms' dw is a two-stage column sum over
// row chunks (kernels/cuda/norm_dw.cuh); the larger shapes give it many chunks with a short last one:
// N = 64 * 37 + 5, D = 128: 38 chunks of 63 rows, the last of 42; N = 4099, D = 100: 65 chunks of 64 rows, the last
// of 3 (fewer rows than row groups per block). NormsCuda.DwIsBitIdenticalAndAccumulatesExactly adds a shape where
// the chunk count reaches its cap, and checks determinism and the exact dw += sum.
// NormsCuda.VectorAndScalarPathsAreBitIdentical runs every kernel on its 16-byte vector path and, on pointers shifted
// by one element, its scalar path, and compares the two bit for bit (D = 100 above takes the scalar path only).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/cpu/l2norm.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rmsnorm_gated.h"
#include "kernels/cuda/norms.h"

namespace nextron::test {

namespace {

struct Shape {
  int64_t N, D;
};
const std::vector<Shape> kShapes = {{1, 48},    {3, 100},    {17, 128},          {1000, 48}, {1000, 256},
                                    {17, 2048}, {200, 2048}, {64 * 37 + 5, 128}, {4099, 100}};
constexpr float kEps = 1e-6f;

::testing::Message describe(const Shape& s) { return ::testing::Message() << "N=" << s.N << " D=" << s.D; }

}  // namespace

TEST(RmsnormCuda, ForwardMatchesCpuAndRunsInPlace) {
  NEXTRON_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(describe(sh));
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 1, -2.0f, 2.0f);
    const auto w = random_f32(D, 2, -0.5f, 0.5f);
    std::vector<float> y_ref(N * D), rstd_ref(N);
    cpu::rmsnorm_forward<float>(y_ref.data(), rstd_ref.data(), x.data(), w.data(), N, D, kEps);

    DeviceBf16 gx(x), gy(N * D);
    DeviceArray<float> gw(w), grstd(N);
    cuda::rmsnorm_forward(gy.get(), grstd.get(), gx.get(), gw.get(), N, D, kEps, nullptr);
    const auto y = gy.download();
    EXPECT_TRUE(close_to(y, y_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(grstd.download(), rstd_ref, kF32Rtol));

    cuda::rmsnorm_forward(gx.get(), grstd.get(), gx.get(), gw.get(), N, D, kEps, nullptr);  // y == x
    EXPECT_EQ(gx.download(), y);
  }
}

TEST(RmsnormCuda, BackwardAccumulatesIntoDxAndDw) {
  NEXTRON_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(describe(sh));
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 3, -2.0f, 2.0f), dy = random_bf16(N * D, 4);
    const auto w = random_f32(D, 5, -0.5f, 0.5f);
    const auto dx0 = random_bf16(N * D, 6), dw0 = random_f32(D, 7);
    std::vector<float> y_ref(N * D), rstd_ref(N), dx_ref = dx0, dw_ref = dw0;
    cpu::rmsnorm_forward<float>(y_ref.data(), rstd_ref.data(), x.data(), w.data(), N, D, kEps);
    cpu::rmsnorm_backward<float>(dx_ref.data(), dw_ref.data(), dy.data(), x.data(), w.data(), rstd_ref.data(), N, D);

    DeviceBf16 gx(x), gy(N * D), gdy(dy), gdx(dx0);
    DeviceArray<float> gw(w), grstd(N), gdw(dw0), gscratch(cuda::norm_dw_scratch_floats(N, D));
    cuda::rmsnorm_forward(gy.get(), grstd.get(), gx.get(), gw.get(), N, D, kEps, nullptr);
    cuda::rmsnorm_backward(gdx.get(), gdw.get(), gscratch.get(), gdy.get(), gx.get(), gw.get(), grstd.get(), N, D,
                           nullptr);
    const auto dx = gdx.download();
    const auto dw = gdw.download();
    EXPECT_TRUE(close_to(dx, dx_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(dw, dw_ref, kF32Rtol));

    // nullptr skips that gradient; the other one is unchanged bit for bit.
    DeviceBf16 gdx_only(dx0);
    DeviceArray<float> gdw_only(dw0);
    cuda::rmsnorm_backward(gdx_only.get(), nullptr, nullptr, gdy.get(), gx.get(), gw.get(), grstd.get(), N, D, nullptr);
    cuda::rmsnorm_backward(nullptr, gdw_only.get(), gscratch.get(), gdy.get(), gx.get(), gw.get(), grstd.get(), N, D,
                           nullptr);
    EXPECT_EQ(gdx_only.download(), dx);
    EXPECT_EQ(gdw_only.download(), dw);
  }
}

TEST(RmsnormGatedCuda, ForwardMatchesCpu) {
  NEXTRON_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(describe(sh));
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 11, -2.0f, 2.0f), z = random_bf16(N * D, 12, -4.0f, 4.0f);
    const auto w = random_f32(D, 13, 0.5f, 1.5f);
    std::vector<float> y_ref(N * D), rstd_ref(N);
    cpu::rmsnorm_gated_forward<float>(y_ref.data(), rstd_ref.data(), x.data(), z.data(), w.data(), N, D, kEps);

    DeviceBf16 gx(x), gz(z), gy(N * D);
    DeviceArray<float> gw(w), grstd(N);
    cuda::rmsnorm_gated_forward(gy.get(), grstd.get(), gx.get(), gz.get(), gw.get(), N, D, kEps, nullptr);
    EXPECT_TRUE(close_to(gy.download(), y_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(grstd.download(), rstd_ref, kF32Rtol));
  }
}

TEST(RmsnormGatedCuda, BackwardAccumulatesIntoDxDzAndDw) {
  NEXTRON_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(describe(sh));
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 14, -2.0f, 2.0f), z = random_bf16(N * D, 15, -4.0f, 4.0f);
    const auto dy = random_bf16(N * D, 16);
    const auto w = random_f32(D, 17, 0.5f, 1.5f);
    const auto dx0 = random_bf16(N * D, 18), dz0 = random_bf16(N * D, 19), dw0 = random_f32(D, 20);
    std::vector<float> y_ref(N * D), rstd_ref(N), dx_ref = dx0, dz_ref = dz0, dw_ref = dw0;
    cpu::rmsnorm_gated_forward<float>(y_ref.data(), rstd_ref.data(), x.data(), z.data(), w.data(), N, D, kEps);
    cpu::rmsnorm_gated_backward<float>(dx_ref.data(), dz_ref.data(), dw_ref.data(), dy.data(), x.data(), z.data(),
                                       w.data(), rstd_ref.data(), N, D);

    DeviceBf16 gx(x), gz(z), gy(N * D), gdy(dy), gdx(dx0), gdz(dz0);
    DeviceArray<float> gw(w), grstd(N), gdw(dw0), gscratch(cuda::norm_dw_scratch_floats(N, D));
    cuda::rmsnorm_gated_forward(gy.get(), grstd.get(), gx.get(), gz.get(), gw.get(), N, D, kEps, nullptr);
    cuda::rmsnorm_gated_backward(gdx.get(), gdz.get(), gdw.get(), gscratch.get(), gdy.get(), gx.get(), gz.get(),
                                 gw.get(), grstd.get(), N, D, nullptr);
    const auto dx = gdx.download(), dz = gdz.download();
    const auto dw = gdw.download();
    EXPECT_TRUE(close_to(dx, dx_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(dz, dz_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(dw, dw_ref, kF32Rtol));

    // Each gradient alone comes out bit-identical to the full call.
    DeviceBf16 gdx_only(dx0), gdz_only(dz0);
    DeviceArray<float> gdw_only(dw0);
    cuda::rmsnorm_gated_backward(gdx_only.get(), nullptr, nullptr, nullptr, gdy.get(), gx.get(), gz.get(), gw.get(),
                                 grstd.get(), N, D, nullptr);
    cuda::rmsnorm_gated_backward(nullptr, gdz_only.get(), nullptr, nullptr, gdy.get(), gx.get(), gz.get(), gw.get(),
                                 grstd.get(), N, D, nullptr);
    cuda::rmsnorm_gated_backward(nullptr, nullptr, gdw_only.get(), gscratch.get(), gdy.get(), gx.get(), gz.get(),
                                 gw.get(), grstd.get(), N, D, nullptr);
    EXPECT_EQ(gdx_only.download(), dx);
    EXPECT_EQ(gdz_only.download(), dz);
    EXPECT_EQ(gdw_only.download(), dw);
  }
}

// The dw scratch follows norm_dw.cuh's chunking (chunks = ceil(N / R), R = ceil(N / want),
// want = clamp(ceil(1024 / ceil(D / 32)), 1, ceil(N / 64))) and stays small whatever N. Host only: no GPU needed.
TEST(NormsCuda, DwScratchFollowsTheChunkingRule) {
  EXPECT_EQ(cuda::norm_dw_scratch_floats(0, 128), 0);
  EXPECT_EQ(cuda::norm_dw_scratch_floats(5, 0), 0);
  EXPECT_EQ(cuda::norm_dw_scratch_floats(1, 48), 48);                         // one chunk
  EXPECT_EQ(cuda::norm_dw_scratch_floats(64 * 37 + 5, 128), 38 * 128);        // 38 chunks of 63 rows
  EXPECT_EQ(cuda::norm_dw_scratch_floats(4099, 100), 65 * 100);               // 65 chunks of 64 rows, the last of 3
  EXPECT_EQ(cuda::norm_dw_scratch_floats(19207, 100), 253 * 100);             // capped at 256, R = 76: 253 chunks
  EXPECT_EQ(cuda::norm_dw_scratch_floats(1100, 2048), 16 * 2048);             // capped at 16
  EXPECT_EQ(cuda::norm_dw_scratch_floats(int64_t(1) << 19, 128), 256 * 128);  // the DeltaNet norm: 256 x 4 blocks
  for (int64_t N : {int64_t(1), int64_t(63), int64_t(65), int64_t(100000), int64_t(1) << 30})
    for (int64_t D : {int64_t(1), int64_t(31), int64_t(33), int64_t(128), int64_t(2048), int64_t(100000)}) {
      const int64_t floats = cuda::norm_dw_scratch_floats(N, D);
      EXPECT_EQ(floats % D, 0) << "N=" << N << " D=" << D;
      EXPECT_GE(floats, D) << "N=" << N << " D=" << D;
      EXPECT_LE(floats, 32 * 1024 + D) << "N=" << N << " D=" << D;
    }
}

// dw from the same inputs twice is bit-identical (no atomics: the order of every addition is fixed by the shape), and
// each call adds exactly the sum s it produces into a zero dw (dw = fl(dw + s), one fp32 add per column), also when
// called again on the same buffer. The scratch is refilled with NaN before every call, so a partial sum read before
// it is written shows up. The shapes reach the chunk cap: 19207 x 100 has 253 chunks of 76 rows (fewer than the
// 256 asked for), 1100 x 2048 16 chunks of 69 (the last of 65).
TEST(NormsCuda, DwIsBitIdenticalAndAccumulatesExactly) {
  NEXTRON_REQUIRE_GPU();
  for (const Shape& sh : std::vector<Shape>{{19207, 100}, {1100, 2048}}) {
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 31, -2.0f, 2.0f), z = random_bf16(N * D, 32, -4.0f, 4.0f);
    const auto dy = random_bf16(N * D, 33);
    const auto w = random_f32(D, 34, 0.5f, 1.5f), dw0 = random_f32(D, 35);
    // Both norms use the same rstd = 1 / sqrt(mean(x^2) + eps): take it from the CPU forward.
    std::vector<float> y(N * D), rstd(N);
    cpu::rmsnorm_forward<float>(y.data(), rstd.data(), x.data(), w.data(), N, D, kEps);
    DeviceBf16 gx(x), gz(z), gdy(dy);
    DeviceArray<float> gw(w), grstd(rstd), gscratch(cuda::norm_dw_scratch_floats(N, D));
    for (const bool gated : {false, true}) {
      SCOPED_TRACE(describe(sh) << (gated ? " rmsnorm_gated" : " rmsnorm"));
      std::vector<float> want(D, 0.0f);
      if (gated)
        cpu::rmsnorm_gated_backward<float>(nullptr, nullptr, want.data(), dy.data(), x.data(), z.data(), w.data(),
                                           rstd.data(), N, D);
      else
        cpu::rmsnorm_backward<float>(nullptr, want.data(), dy.data(), x.data(), w.data(), rstd.data(), N, D);
      auto run = [&](float* dw) {
        NEXTRON_CUDA_CHECK(cudaMemset(gscratch.get(), 0xff, gscratch.bytes()));  // NaN
        if (gated)
          cuda::rmsnorm_gated_backward(nullptr, nullptr, dw, gscratch.get(), gdy.get(), gx.get(), gz.get(), gw.get(),
                                       grstd.get(), N, D, nullptr);
        else
          cuda::rmsnorm_backward(nullptr, dw, gscratch.get(), gdy.get(), gx.get(), gw.get(), grstd.get(), N, D,
                                 nullptr);
      };
      DeviceArray<float> gsum(D), ga(dw0), gb(dw0);
      run(gsum.get());
      run(ga.get());
      run(gb.get());
      const auto sum = gsum.download();
      EXPECT_TRUE(close_to(sum, want, kF32Rtol));
      std::vector<float> once(D), twice(D);
      for (int64_t d = 0; d < D; ++d) once[d] = dw0[d] + sum[d];
      for (int64_t d = 0; d < D; ++d) twice[d] = once[d] + sum[d];
      EXPECT_EQ(ga.download(), once);
      EXPECT_EQ(gb.download(), once);
      run(ga.get());
      EXPECT_EQ(ga.download(), twice);
    }
  }
}

TEST(L2normCuda, ForwardMatchesCpuAndRunsInPlace) {
  NEXTRON_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(describe(sh));
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 21, -2.0f, 2.0f);
    std::vector<float> y_ref(N * D);
    cpu::l2norm_forward<float>(y_ref.data(), x.data(), N, D, kEps);

    DeviceBf16 gx(x), gy(N * D);
    cuda::l2norm_forward(gy.get(), gx.get(), N, D, kEps, nullptr);
    const auto y = gy.download();
    EXPECT_TRUE(close_to(y, y_ref, kBf16Rtol));

    cuda::l2norm_forward(gx.get(), gx.get(), N, D, kEps, nullptr);  // y == x
    EXPECT_EQ(gx.download(), y);
  }
}

TEST(L2normCuda, BackwardAccumulatesIntoDx) {
  NEXTRON_REQUIRE_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(describe(sh));
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 22, -2.0f, 2.0f), dy = random_bf16(N * D, 23);
    // dx = r dy - r^3 (x . dy) x is about |dy| / |x| = 1 / sqrt(D) per element: pre-fill at that scale so the
    // accumulation is visible.
    const float scale = 1.0f / std::sqrt(float(D));
    const auto dx0 = random_bf16(N * D, 24, -scale, scale);
    std::vector<float> dx_ref = dx0;
    cpu::l2norm_backward<float>(dx_ref.data(), dy.data(), x.data(), N, D, kEps);

    DeviceBf16 gx(x), gdy(dy), gdx(dx0);
    cuda::l2norm_backward(gdx.get(), gdy.get(), gx.get(), N, D, kEps, nullptr);
    EXPECT_TRUE(close_to(gdx.download(), dx_ref, kBf16Rtol));
  }
}

// Each norm kernel has a vector path (D % 8 == 0, 16-byte aligned pointers) and a scalar path; the vector path keeps
// the scalar path's per-lane summation order and per-element arithmetic, so the two agree bit for bit. Pointers
// shifted by one element (off 1) force the scalar path on the same data.
TEST(NormsCuda, VectorAndScalarPathsAreBitIdentical) {
  NEXTRON_REQUIRE_GPU();
  // 48: a partial chunk (6 lanes load); 264: a chunk and one vector; 2048: eight chunks.
  const std::vector<Shape> shapes = {{5, 48}, {33, 128}, {7, 264}, {9, 2048}};
  struct Outputs {
    std::vector<float> y, rstd, dx, dw, gy, grstd, gdx, gdz, gdw, ly, ldx;
  };
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(describe(sh));
    const int64_t N = sh.N, D = sh.D;
    const auto x = random_bf16(N * D, 31, -2.0f, 2.0f), z = random_bf16(N * D, 32, -4.0f, 4.0f);
    const auto dy = random_bf16(N * D, 33), dx0 = random_bf16(N * D, 34), dz0 = random_bf16(N * D, 35);
    const auto w = random_f32(D, 36, -0.5f, 0.5f), dw0 = random_f32(D, 37);
    Outputs out[2];
    for (int64_t off : {0, 1}) {
      const auto placed = [&](const std::vector<float>& h) {
        std::vector<float> p(off, 0.0f);
        p.insert(p.end(), h.begin(), h.end());
        return p;
      };
      const auto unplaced = [&](const DeviceBf16& d) {
        const auto h = d.download();
        return std::vector<float>(h.begin() + off, h.end());
      };
      DeviceBf16 gx(placed(x)), gz(placed(z)), gdy(placed(dy)), gy(placed(std::vector<float>(N * D)));
      DeviceBf16 gdx(placed(dx0)), gdz(placed(dz0)), gdx2(placed(dx0)), gdx3(placed(dx0));
      DeviceArray<float> gw(w), grstd(N), gdw(dw0), gdw2(dw0), gscratch(cuda::norm_dw_scratch_floats(N, D));
      Outputs& o = out[off];
      cuda::rmsnorm_forward(gy.get() + off, grstd.get(), gx.get() + off, gw.get(), N, D, kEps, nullptr);
      o.y = unplaced(gy), o.rstd = grstd.download();
      cuda::rmsnorm_backward(gdx.get() + off, gdw.get(), gscratch.get(), gdy.get() + off, gx.get() + off, gw.get(),
                             grstd.get(), N, D, nullptr);
      o.dx = unplaced(gdx), o.dw = gdw.download();
      cuda::rmsnorm_gated_forward(gy.get() + off, grstd.get(), gx.get() + off, gz.get() + off, gw.get(), N, D, kEps,
                                  nullptr);
      o.gy = unplaced(gy), o.grstd = grstd.download();
      cuda::rmsnorm_gated_backward(gdx2.get() + off, gdz.get() + off, gdw2.get(), gscratch.get(), gdy.get() + off,
                                   gx.get() + off, gz.get() + off, gw.get(), grstd.get(), N, D, nullptr);
      o.gdx = unplaced(gdx2), o.gdz = unplaced(gdz), o.gdw = gdw2.download();
      cuda::l2norm_forward(gy.get() + off, gx.get() + off, N, D, kEps, nullptr);
      o.ly = unplaced(gy);
      cuda::l2norm_backward(gdx3.get() + off, gdy.get() + off, gx.get() + off, N, D, kEps, nullptr);
      o.ldx = unplaced(gdx3);
    }
    EXPECT_EQ(out[0].y, out[1].y) << "rmsnorm y";
    EXPECT_EQ(out[0].rstd, out[1].rstd) << "rmsnorm rstd";
    EXPECT_EQ(out[0].dx, out[1].dx) << "rmsnorm dx";
    EXPECT_EQ(out[0].dw, out[1].dw) << "rmsnorm dw";
    EXPECT_EQ(out[0].gy, out[1].gy) << "gated y";
    EXPECT_EQ(out[0].grstd, out[1].grstd) << "gated rstd";
    EXPECT_EQ(out[0].gdx, out[1].gdx) << "gated dx";
    EXPECT_EQ(out[0].gdz, out[1].gdz) << "gated dz";
    EXPECT_EQ(out[0].gdw, out[1].gdw) << "gated dw";
    EXPECT_EQ(out[0].ly, out[1].ly) << "l2norm y";
    EXPECT_EQ(out[0].ldx, out[1].ldx) << "l2norm dx";
  }
}

TEST(NormsCuda, EmptyInputsAndNullGradientsLaunchNothing) {
  NEXTRON_REQUIRE_GPU();
  EXPECT_NO_THROW(cuda::rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, 0, 128, kEps, nullptr));
  EXPECT_NO_THROW(
      cuda::rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 128, nullptr));
  EXPECT_NO_THROW(cuda::rmsnorm_gated_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 128, kEps, nullptr));
  EXPECT_NO_THROW(cuda::rmsnorm_gated_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                               nullptr, 0, 128, nullptr));
  EXPECT_NO_THROW(cuda::l2norm_forward(nullptr, nullptr, 0, 128, kEps, nullptr));
  EXPECT_NO_THROW(cuda::l2norm_backward(nullptr, nullptr, nullptr, 0, 128, kEps, nullptr));
  // All gradients nullptr with real rows: nothing to do, nothing read.
  EXPECT_NO_THROW(
      cuda::rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 5, 128, nullptr));
  EXPECT_NO_THROW(cuda::l2norm_backward(nullptr, nullptr, nullptr, 5, 128, kEps, nullptr));
  NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace nextron::test
