// CUDA elementwise and small fused kernels (kernels/cuda/elementwise.h: casts, rope, conv1d + SiLU, DeltaNet gates,
// sigmoid gate, SwiGLU, embedding of the whole vocabulary and of one vocab-parallel slice) against their CPU
// references (kernels/cpu), run in fp32 on the same bf16-rounded inputs. Backwards accumulate: every gradient is
// pre-filled with random values of the magnitude of its delta (so an overwrite would fail), and nullptr gradients
// must skip exactly. Shapes include odd sizes (1, 3, 17, 1000; widths 48, 100) and model sizes (head dim 128 / 256
// with rotary 64, hidden 2048).
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "kernels/cpu/conv1d.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/gdn_gates.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/sigmoid_gate.h"
#include "kernels/cpu/swiglu.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/glue.h"
#include "kernels/vocab_shard.h"

namespace nextron::test {

namespace {
float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

template <typename T>
using DeviceOf = std::conditional_t<std::is_same_v<T, float>, DeviceArray<float>, DeviceBf16>;

// A device copy of `host` placed `off` elements into its allocation (off = 1: a pointer not 16-byte aligned).
template <typename T>
struct Placed {
  Placed(const std::vector<float>& host, int64_t off_) : off(off_), dev(padded(host, off_)) {}
  static std::vector<float> padded(const std::vector<float>& h, int64_t off) {
    std::vector<float> p(off, 0.0f);
    p.insert(p.end(), h.begin(), h.end());
    return p;
  }
  T* get() const { return reinterpret_cast<T*>(dev.get()) + off; }
  std::vector<float> download() const {
    const std::vector<float> h = dev.download();
    return std::vector<float>(h.begin() + off, h.end());
  }
  int64_t off;
  DeviceOf<T> dev;
};
}  // namespace

// ---------------------------------------------------------------------------------------------------------- casts

TEST(CastCuda, F32ToBf16RoundsToNearestEvenAndBackIsExact) {
  NEXTRON_REQUIRE_GPU();
  // off 0: 16-byte aligned pointers (the vector path, with a tail of n % 8 elements); off 1: the scalar path.
  for (int64_t off : {0, 1})
    for (int64_t n : {int64_t(1), int64_t(3), int64_t(17), int64_t(1000), int64_t(100003)}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " off=" << off);
      auto v = random_f32(n, 31, -100.0f, 100.0f);
      // Ties (1 + 2^-8 lies halfway between two bf16 values: even wins), zero signs, a subnormal, overflow to inf.
      const std::vector<float> special = {
          1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -0.0f, 0.0f, 1e-40f, 3.4e38f, -std::numeric_limits<float>::infinity()};
      for (size_t i = 0; i < special.size() && i < v.size(); ++i) v[i] = special[i];
      std::vector<float> want(n);
      for (int64_t i = 0; i < n; ++i) want[i] = round_bf16(v[i]);

      Placed<float> in(v, off), back(std::vector<float>(n), off);
      Placed<cuda::bf16> out(std::vector<float>(n), off);
      cuda::cast_f32_to_bf16(out.get(), in.get(), n, nullptr);
      cuda::cast_bf16_to_f32(back.get(), out.get(), n, nullptr);
      EXPECT_EQ(out.download(), want);
      EXPECT_EQ(back.download(), want);
    }
}

// ----------------------------------------------------------------------------------------------------------- rope

TEST(RopeCuda, ForwardBackwardMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  struct Shape {
    int64_t B, S, NH, D, rot;
  };
  // Partial (Qwen3-Next: D = 256, rotary 64), full rotation, odd sizes, a long sequence.
  const std::vector<Shape> shapes = {{1, 1, 1, 48, 24},  {2, 5, 3, 48, 48},   {1, 17, 4, 128, 64},
                                     {2, 9, 2, 256, 64}, {1, 3, 5, 100, 100}, {1, 1000, 2, 256, 64}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << sh.B << " S=" << sh.S << " NH=" << sh.NH << " D=" << sh.D
                                      << " rotary=" << sh.rot);
    const int64_t n = sh.B * sh.S * sh.NH * sh.D;
    std::vector<float> cos(sh.S * sh.rot), sin(sh.S * sh.rot);
    cpu::rope_tables<float>(cos.data(), sin.data(), sh.S, sh.rot, 1e7, 0);
    const auto x = random_bf16(n, 32, -2.0f, 2.0f), dy = random_bf16(n, 33), dx0 = random_bf16(n, 34);
    std::vector<float> y_ref(n), dx_ref = dx0;
    cpu::rope_forward<float>(y_ref.data(), x.data(), cos.data(), sin.data(), sh.B, sh.S, sh.NH, sh.D, sh.rot);
    cpu::rope_backward<float>(dx_ref.data(), dy.data(), cos.data(), sin.data(), sh.B, sh.S, sh.NH, sh.D, sh.rot);

    // off 0: aligned pointers (the vector path when rotary % 16 == 0 and D % 8 == 0); off 1: the scalar path.
    std::vector<float> y_path[2], dx_path[2];
    for (int64_t off : {0, 1}) {
      DeviceArray<float> gcos(cos), gsin(sin);
      Placed<cuda::bf16> gx(x, off), gy(std::vector<float>(n), off), gdy(dy, off), gdx(dx0, off);
      cuda::rope_forward(gy.get(), gx.get(), gcos.get(), gsin.get(), sh.B, sh.S, sh.NH, sh.D, sh.rot, nullptr);
      y_path[off] = gy.download();
      EXPECT_TRUE(close_to(y_path[off], y_ref, kBf16Rtol));
      cuda::rope_forward(gx.get(), gx.get(), gcos.get(), gsin.get(), sh.B, sh.S, sh.NH, sh.D, sh.rot,
                         nullptr);  // y == x
      EXPECT_EQ(gx.download(), y_path[off]);

      cuda::rope_backward(gdx.get(), gdy.get(), gcos.get(), gsin.get(), sh.B, sh.S, sh.NH, sh.D, sh.rot, nullptr);
      dx_path[off] = gdx.download();
      EXPECT_TRUE(close_to(dx_path[off], dx_ref, kBf16Rtol));
    }
    EXPECT_EQ(y_path[0], y_path[1]);
    EXPECT_EQ(dx_path[0], dx_path[1]);
  }
}

// --------------------------------------------------------------------------------------------------------- conv1d

TEST(Conv1dCuda, ForwardBackwardMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  struct Shape {
    int64_t B, S, C, KC, c1 = -1, c2 = -1;  // c1, c2: the output's channel split (-1: plain rows)
  };
  // S < KC (every output sees the zero padding), odd channel counts, long sequences, KC = 4 as the model; outputs
  // split into three channel blocks as the DeltaNet's q | k | v (widths 32, 32, 64 and odd ones, an empty block).
  const std::vector<Shape> shapes = {{1, 1, 48, 4},           {2, 3, 48, 4},         {1, 17, 100, 4},
                                     {2, 1000, 128, 4},       {3, 17, 48, 2},        {1, 9, 33, 1},
                                     {2, 70, 128, 4, 32, 64}, {1, 17, 33, 4, 5, 19}, {2, 5, 48, 3, 16, 16}};
  for (Shape sh : shapes) {
    if (sh.c1 < 0) sh.c1 = sh.c2 = sh.C;
    SCOPED_TRACE(::testing::Message() << "B=" << sh.B << " S=" << sh.S << " C=" << sh.C << " KC=" << sh.KC << " split "
                                      << sh.c1 << ", " << sh.c2);
    const int64_t n = sh.B * sh.S * sh.C;
    const auto x = random_bf16(n, 41, -2.0f, 2.0f), dy = random_bf16(n, 42), dx0 = random_bf16(n, 43);
    const auto w = random_f32(sh.C * sh.KC, 44, -0.7f, 0.7f), dw0 = random_f32(sh.C * sh.KC, 45);
    std::vector<float> y_ref(n), dx_ref = dx0, dw_ref = dw0;
    cpu::conv1d_forward<float>(y_ref.data(), x.data(), w.data(), sh.B, sh.S, sh.C, sh.KC, sh.c1, sh.c2);
    cpu::conv1d_backward<float>(dx_ref.data(), dw_ref.data(), dy.data(), x.data(), w.data(), sh.B, sh.S, sh.C, sh.KC,
                                sh.c1, sh.c2);

    DeviceBf16 gx(x), gy(n), gdy(dy), gdx(dx0), gdx_only(dx0);
    DeviceArray<float> gw(w), gdw(dw0), gdw_only(dw0);
    cuda::conv1d_silu_forward(gy.get(), gx.get(), gw.get(), sh.B, sh.S, sh.C, sh.KC, sh.c1, sh.c2, nullptr);
    EXPECT_TRUE(close_to(gy.download(), y_ref, kBf16Rtol));

    cuda::conv1d_silu_backward(gdx.get(), gdw.get(), gdy.get(), gx.get(), gw.get(), sh.B, sh.S, sh.C, sh.KC, sh.c1,
                               sh.c2, nullptr);
    const auto dx = gdx.download();
    const auto dw = gdw.download();
    EXPECT_TRUE(close_to(dx, dx_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(dw, dw_ref, kF32Rtol));

    cuda::conv1d_silu_backward(gdx_only.get(), nullptr, gdy.get(), gx.get(), gw.get(), sh.B, sh.S, sh.C, sh.KC, sh.c1,
                               sh.c2, nullptr);
    cuda::conv1d_silu_backward(nullptr, gdw_only.get(), gdy.get(), gx.get(), gw.get(), sh.B, sh.S, sh.C, sh.KC, sh.c1,
                               sh.c2, nullptr);
    EXPECT_EQ(gdx_only.download(), dx);
    EXPECT_EQ(gdw_only.download(), dw);
  }
}

// ------------------------------------------------------------------------------------------------------ gdn gates

TEST(GdnGatesCuda, ForwardBackwardMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  struct Shape {
    int64_t N, Hv;
  };
  const std::vector<Shape> shapes = {{1, 1}, {3, 32}, {17, 5}, {1000, 32}, {1000, 48}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " Hv=" << sh.Hv);
    const int64_t N = sh.N, Hv = sh.Hv, n = N * Hv;
    // a + dt_bias spans both sides of softplus's threshold 20.
    const auto b = random_bf16(n, 51, -6.0f, 6.0f), a = random_bf16(n, 52, -30.0f, 30.0f);
    const auto A_log = random_f32(Hv, 53, -2.0f, 1.0f), dt_bias = random_f32(Hv, 54);
    const auto dbeta = random_f32(n, 55), dg = random_f32(n, 56);
    const auto db0 = random_bf16(n, 57, -0.25f, 0.25f), da0 = random_bf16(n, 58), dA0 = random_f32(Hv, 59),
               ddt0 = random_f32(Hv, 60);
    std::vector<float> beta_ref(n), g_ref(n), db_ref = db0, da_ref = da0, dA_ref = dA0, ddt_ref = ddt0;
    cpu::gdn_gates_forward<float>(beta_ref.data(), g_ref.data(), b.data(), a.data(), A_log.data(), dt_bias.data(), N,
                                  Hv);
    cpu::gdn_gates_backward<float>(db_ref.data(), da_ref.data(), dA_ref.data(), ddt_ref.data(), dbeta.data(), dg.data(),
                                   b.data(), a.data(), A_log.data(), dt_bias.data(), N, Hv);

    DeviceBf16 gb(b), ga(a), gdb(db0), gda(da0);
    DeviceArray<float> gA(A_log), gdt(dt_bias), gbeta(n), gg(n), gdbeta(dbeta), gdg(dg), gdA(dA0), gddt(ddt0);
    cuda::gdn_gates_forward(gbeta.get(), gg.get(), gb.get(), ga.get(), gA.get(), gdt.get(), N, Hv, nullptr);
    EXPECT_TRUE(close_to(gbeta.download(), beta_ref, kF32Rtol));
    EXPECT_TRUE(close_to(gg.download(), g_ref, kF32Rtol));

    cuda::gdn_gates_backward(gdb.get(), gda.get(), gdA.get(), gddt.get(), gdbeta.get(), gdg.get(), gb.get(), ga.get(),
                             gA.get(), gdt.get(), N, Hv, nullptr);
    const auto db = gdb.download(), da = gda.download();
    const auto dA = gdA.download(), ddt = gddt.download();
    EXPECT_TRUE(close_to(db, db_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(da, da_ref, kBf16Rtol));
    EXPECT_TRUE(close_to(dA, dA_ref, kF32Rtol));
    EXPECT_TRUE(close_to(ddt, ddt_ref, kF32Rtol));

    // A missing upstream gradient (nullptr = zero) leaves the gradients it feeds untouched; each output alone is
    // bit-identical to the full call.
    DeviceBf16 gdb2(db0), gda2(da0);
    DeviceArray<float> gdA2(dA0), gddt2(ddt0);
    cuda::gdn_gates_backward(gdb2.get(), gda2.get(), gdA2.get(), gddt2.get(), nullptr, gdg.get(), gb.get(), ga.get(),
                             gA.get(), gdt.get(), N, Hv, nullptr);
    EXPECT_EQ(gdb2.download(), db0);
    EXPECT_EQ(gda2.download(), da);
    EXPECT_EQ(gdA2.download(), dA);
    EXPECT_EQ(gddt2.download(), ddt);
    DeviceBf16 gdb3(db0), gda3(da0);
    DeviceArray<float> gdA3(dA0), gddt3(ddt0);
    cuda::gdn_gates_backward(gdb3.get(), gda3.get(), gdA3.get(), gddt3.get(), gdbeta.get(), nullptr, gb.get(), ga.get(),
                             gA.get(), gdt.get(), N, Hv, nullptr);
    EXPECT_EQ(gdb3.download(), db);
    EXPECT_EQ(gda3.download(), da0);
    EXPECT_EQ(gdA3.download(), dA0);
    EXPECT_EQ(gddt3.download(), ddt0);
    DeviceArray<float> gdA4(dA0);
    cuda::gdn_gates_backward(nullptr, nullptr, gdA4.get(), nullptr, gdbeta.get(), gdg.get(), gb.get(), ga.get(),
                             gA.get(), gdt.get(), N, Hv, nullptr);
    EXPECT_EQ(gdA4.download(), dA);
  }
}

// --------------------------------------------------------------------------------------------------- sigmoid gate

TEST(SigmoidGateCuda, ForwardBackwardMatchCpuWithStridedGate) {
  NEXTRON_REQUIRE_GPU();
  struct Shape {
    int64_t N, D, G, ld;
  };
  // G = D (attention gate, W = 1; also read with a larger row stride as from the q projection), G = 1 (shared
  // expert, W = D), and group widths on both sides of the 32 that switches thread-per-group to warp-per-group.
  const std::vector<Shape> shapes = {{1, 48, 48, 48},  {17, 48, 48, 149}, {3, 100, 1, 1},  {1000, 128, 4, 4},
                                     {17, 96, 12, 12}, {5, 2048, 1, 3},   {17, 256, 8, 8}, {1000, 48, 48, 100},
                                     {3, 62, 2, 2},    {33, 64, 64, 128}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " D=" << sh.D << " G=" << sh.G << " ld_gate=" << sh.ld);
    const int64_t N = sh.N, D = sh.D, G = sh.G, ld = sh.ld, W = D / G;
    const auto x = random_bf16(N * D, 61, -2.0f, 2.0f), dy = random_bf16(N * D, 62), dx0 = random_bf16(N * D, 63);
    const auto gate_full = random_bf16(N * ld, 64, -4.0f, 4.0f);
    // dgate is a sum over W products: pre-fill at that scale.
    const float dscale = 0.25f * std::sqrt(float(W));
    const auto dgate_full0 = random_bf16(N * ld, 65, -dscale, dscale);
    std::vector<float> gate(N * G), dgate_ref(N * G);
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < G; ++j) {
        gate[r * G + j] = gate_full[r * ld + j];
        dgate_ref[r * G + j] = dgate_full0[r * ld + j];
      }
    std::vector<float> y_ref(N * D), dx_ref = dx0;
    cpu::sigmoid_gate_forward<float>(y_ref.data(), x.data(), gate.data(), N, D, G);
    cpu::sigmoid_gate_backward<float>(dx_ref.data(), dgate_ref.data(), dy.data(), x.data(), gate.data(), N, D, G);
    // The strided reference: only columns [0, G) of each gate row change.
    std::vector<float> dgate_full_ref = dgate_full0;
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < G; ++j) dgate_full_ref[r * ld + j] = dgate_ref[r * G + j];

    // off 0: aligned pointers (the vector paths where D, ld_gate and W allow); off 1: the scalar paths. Both
    // bit-identical.
    std::vector<float> y_path[2], dx_path[2], dgate_path[2];
    for (int64_t off : {0, 1}) {
      Placed<cuda::bf16> gx(x, off), gy(std::vector<float>(N * D), off), ggate(gate_full, off), gdy(dy, off),
          gdx(dx0, off), gdgate(dgate_full0, off);
      cuda::sigmoid_gate_forward(gy.get(), gx.get(), ggate.get(), N, D, G, ld, nullptr);
      const auto y = gy.download();
      EXPECT_TRUE(close_to(y, y_ref, kBf16Rtol));

      cuda::sigmoid_gate_backward(gdx.get(), gdgate.get(), gdy.get(), gx.get(), ggate.get(), N, D, G, ld, nullptr);
      const auto dx = gdx.download(), dgate = gdgate.download();
      EXPECT_TRUE(close_to(dx, dx_ref, kBf16Rtol));
      EXPECT_TRUE(close_to(dgate, dgate_full_ref, kBf16Rtol));
      for (int64_t r = 0; r < N; ++r)
        for (int64_t j = G; j < ld; ++j)
          ASSERT_EQ(dgate[r * ld + j], dgate_full0[r * ld + j]) << "row " << r << " col " << j;

      Placed<cuda::bf16> gdx_only(dx0, off), gdgate_only(dgate_full0, off);
      cuda::sigmoid_gate_backward(gdx_only.get(), nullptr, gdy.get(), gx.get(), ggate.get(), N, D, G, ld, nullptr);
      cuda::sigmoid_gate_backward(nullptr, gdgate_only.get(), gdy.get(), gx.get(), ggate.get(), N, D, G, ld, nullptr);
      EXPECT_EQ(gdx_only.download(), dx);
      EXPECT_EQ(gdgate_only.download(), dgate);

      cuda::sigmoid_gate_forward(gx.get(), gx.get(), ggate.get(), N, D, G, ld, nullptr);  // y == x
      EXPECT_EQ(gx.download(), y);
      y_path[off] = y, dx_path[off] = dx, dgate_path[off] = dgate;
    }
    EXPECT_EQ(y_path[0], y_path[1]);
    EXPECT_EQ(dx_path[0], dx_path[1]);
    EXPECT_EQ(dgate_path[0], dgate_path[1]);
  }
}

// --------------------------------------------------------------------------------------------------------- swiglu

TEST(SwigluCuda, ForwardBackwardMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  struct Shape {
    int64_t N, I;
  };
  const std::vector<Shape> shapes = {{1, 48}, {3, 100}, {17, 512}, {1000, 64}, {64, 2048}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " I=" << sh.I);
    const int64_t N = sh.N, I = sh.I;
    const auto gu = random_bf16(N * 2 * I, 71, -4.0f, 4.0f), dh = random_bf16(N * I, 72);
    const auto dgu0 = random_bf16(N * 2 * I, 73, -2.0f, 2.0f);
    std::vector<float> h_ref(N * I), dgu_ref = dgu0;
    cpu::swiglu_forward<float>(h_ref.data(), gu.data(), N, I);
    cpu::swiglu_backward<float>(dgu_ref.data(), dh.data(), gu.data(), N, I);

    // off 0: aligned pointers (the vector path when I % 8 == 0); off 1: the scalar path. Both bit-identical.
    std::vector<float> h_path[2], dgu_path[2];
    for (int64_t off : {0, 1}) {
      Placed<cuda::bf16> ggu(gu, off), gh(std::vector<float>(N * I), off), gdh(dh, off), gdgu(dgu0, off);
      cuda::swiglu_forward(gh.get(), ggu.get(), N, I, nullptr);
      h_path[off] = gh.download();
      EXPECT_TRUE(close_to(h_path[off], h_ref, kBf16Rtol));
      cuda::swiglu_backward(gdgu.get(), gdh.get(), ggu.get(), N, I, nullptr);
      dgu_path[off] = gdgu.download();
      EXPECT_TRUE(close_to(dgu_path[off], dgu_ref, kBf16Rtol));
    }
    EXPECT_EQ(h_path[0], h_path[1]);
    EXPECT_EQ(dgu_path[0], dgu_path[1]);
    // accumulate false (the MoE experts' backward): dgu, full of other values, comes out exactly as accumulating
    // into zeros would leave it, on both paths.
    for (int64_t off : {0, 1}) {
      Placed<cuda::bf16> ggu(gu, off), gdh(dh, off), zeros(std::vector<float>(N * 2 * I, 0.0f), off),
          garbage(dgu0, off);
      cuda::swiglu_backward(zeros.get(), gdh.get(), ggu.get(), N, I, nullptr);
      cuda::swiglu_backward(garbage.get(), gdh.get(), ggu.get(), N, I, nullptr, /*accumulate=*/false);
      EXPECT_EQ(garbage.download(), zeros.download()) << "offset " << off;
    }
  }
}

// ------------------------------------------------------------------------------------------------------ embedding

namespace {
std::vector<int64_t> random_ids(int64_t N, int64_t V, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> dist(0, V - 1);
  std::vector<int64_t> ids(N);
  for (int64_t& id : ids) id = dist(gen);
  return ids;
}
struct EmbShape {
  int64_t N, H, V;
};
// Long runs of one id (V = 7), mostly distinct ids (V = 5000), one id only (V = 1), the model width.
const std::vector<EmbShape> kEmbShapes = {{1, 48, 50}, {1000, 100, 7}, {17, 48, 5000}, {333, 2048, 50}, {3, 3, 1}};
}  // namespace

TEST(EmbeddingCuda, ForwardGathersRoundedRows) {
  NEXTRON_REQUIRE_GPU();
  for (const EmbShape& sh : kEmbShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " H=" << sh.H << " V=" << sh.V);
    const auto table = random_f32(sh.V * sh.H, 81);  // fp32 master rows, not bf16-representable
    const auto ids = random_ids(sh.N, sh.V, 82);
    std::vector<float> want(sh.N * sh.H);
    cpu::embedding_forward<float>(want.data(), table.data(), ids.data(), sh.N, sh.H, sh.V);
    for (float& v : want) v = round_bf16(v);

    DeviceArray<float> gtable(table);
    DeviceArray<int64_t> gids(ids), bad(1);
    DeviceBf16 gout(sh.N * sh.H);
    cuda::embedding_forward(gout.get(), gtable.get(), gids.get(), sh.N, sh.H, sh.V, 0, sh.V, bad.get(), nullptr);
    EXPECT_EQ(gout.download(), want);
    EXPECT_EQ(bad.download()[0], 0);
  }
}

TEST(EmbeddingCuda, ForwardFlagsBadIdsAndWritesZeros) {
  NEXTRON_REQUIRE_GPU();
  const int64_t H = 48, V = 10;
  const auto table = random_f32(V * H, 83);
  DeviceArray<float> gtable(table);
  DeviceArray<int64_t> bad(1);
  DeviceBf16 gout(3 * H);

  // An id >= V reads as id + 1; its row is zeros, the others are still gathered.
  DeviceArray<int64_t> ids_high(std::vector<int64_t>{3, V + 2, 1});
  cuda::embedding_forward(gout.get(), gtable.get(), ids_high.get(), 3, H, V, 0, V, bad.get(), nullptr);
  EXPECT_EQ(bad.download()[0], V + 3);
  const auto out = gout.download();
  for (int64_t h = 0; h < H; ++h) {
    EXPECT_EQ(out[h], round_bf16(table[3 * H + h]));
    EXPECT_EQ(out[H + h], 0.0f);
    EXPECT_EQ(out[2 * H + h], round_bf16(table[1 * H + h]));
  }

  // A set flag is not overwritten by a later error.
  DeviceArray<int64_t> ids_neg(std::vector<int64_t>{-1, 2, 0});
  cuda::embedding_forward(gout.get(), gtable.get(), ids_neg.get(), 3, H, V, 0, V, bad.get(), nullptr);
  EXPECT_EQ(bad.download()[0], V + 3);

  // Cleared by the caller, a negative id reads as itself (so -1 is not mistaken for 0 = all fine).
  bad.upload({0});
  cuda::embedding_forward(gout.get(), gtable.get(), ids_neg.get(), 3, H, V, 0, V, bad.get(), nullptr);
  EXPECT_EQ(bad.download()[0], -1);
  const auto out_neg = gout.download();
  for (int64_t h = 0; h < H; ++h) EXPECT_EQ(out_neg[h], 0.0f);

  // No flag given: bad rows are still zeros and nothing faults.
  cuda::embedding_forward(gout.get(), gtable.get(), ids_high.get(), 3, H, V, 0, V, nullptr, nullptr);
  const auto out_unflagged = gout.download();
  for (int64_t h = 0; h < H; ++h) EXPECT_EQ(out_unflagged[H + h], 0.0f);
}

TEST(EmbeddingCuda, BackwardSumsRepeatedIdsInTokenOrderExactly) {
  NEXTRON_REQUIRE_GPU();
  for (const EmbShape& sh : kEmbShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " H=" << sh.H << " V=" << sh.V);
    const auto ids = random_ids(sh.N, sh.V, 84);
    const auto dout = random_bf16(sh.N * sh.H, 85);
    const auto dtable0 = random_f32(sh.V * sh.H, 86);
    // The CUDA kernel adds each id's rows onto dtable in token order in fp32, exactly the CPU's additions, so the
    // result is bit-identical (this is what pins down "deterministic, in token order").
    std::vector<float> want = dtable0;
    cpu::embedding_backward<float>(want.data(), dout.data(), ids.data(), sh.N, sh.H, sh.V);

    DeviceArray<float> gdtable(dtable0);
    DeviceArray<int64_t> gids(ids), sorted(sh.N), offsets(sh.V + 1);
    DeviceBf16 gdout(dout);
    cuda::embedding_backward(gdtable.get(), gdout.get(), gids.get(), sh.N, sh.H, sh.V, 0, sorted.get(), offsets.get(),
                             nullptr);
    EXPECT_EQ(gdtable.download(), want);
  }
}

TEST(EmbeddingCuda, BackwardSkipsBadIds) {
  NEXTRON_REQUIRE_GPU();
  const int64_t H = 100, V = 13, N = 40;
  auto ids = random_ids(N, V, 87);
  ids[5] = V;
  ids[17] = -3;
  ids[39] = V + 100;
  const auto dout = random_bf16(N * H, 88);
  const auto dtable0 = random_f32(V * H, 89);
  // Reference: the valid tokens only.
  std::vector<int64_t> ids_ok;
  std::vector<float> dout_ok;
  for (int64_t n = 0; n < N; ++n)
    if (ids[n] >= 0 && ids[n] < V) {
      ids_ok.push_back(ids[n]);
      dout_ok.insert(dout_ok.end(), dout.begin() + n * H, dout.begin() + (n + 1) * H);
    }
  std::vector<float> want = dtable0;
  cpu::embedding_backward<float>(want.data(), dout_ok.data(), ids_ok.data(), int64_t(ids_ok.size()), H, V);

  DeviceArray<float> gdtable(dtable0);
  DeviceArray<int64_t> gids(ids), sorted(N), offsets(V + 1);
  DeviceBf16 gdout(dout);
  cuda::embedding_backward(gdtable.get(), gdout.get(), gids.get(), N, H, V, 0, sorted.get(), offsets.get(), nullptr);
  EXPECT_EQ(gdtable.download(), want);
}

// Vocab-parallel embedding: a table holding one slice [begin, begin + V_local) of a vocabulary of V_full ids, at the
// start, in the middle and at the end of the vocabulary, with odd slice sizes (a single id too).
namespace {
struct ShardCase {
  int64_t N, H, V_full;
  VocabShard shard;
};
std::vector<ShardCase> shard_cases() {
  std::vector<ShardCase> cases;
  // Long runs of one id (V_full = 7), mostly distinct ids (V_full = 5001), the model width.
  for (const auto& [N, H, V] : std::vector<std::array<int64_t, 3>>{{1000, 100, 7}, {17, 48, 5001}, {333, 2048, 50}}) {
    const int64_t third = V / 3 | 1;                          // odd
    cases.push_back({N, H, V, {0, third, V}});                // the start
    cases.push_back({N, H, V, {(V - third) / 2, third, V}});  // the middle
    cases.push_back({N, H, V, {V - third, third, V}});        // the end
  }
  cases.push_back({40, 3, 9, {4, 1, 9}});  // one id held
  return cases;
}
// Half the ids from the shard (repeated ids within it when it is small), the others anywhere in the vocabulary.
std::vector<int64_t> shard_ids(int64_t N, const VocabShard& s, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> held(s.begin, s.begin + s.size - 1), any(0, s.full - 1);
  std::vector<int64_t> ids(N);
  for (int64_t n = 0; n < N; ++n) ids[n] = n % 2 == 0 ? held(gen) : any(gen);
  return ids;
}
std::string describe(const ShardCase& c) {
  return "N=" + std::to_string(c.N) + " H=" + std::to_string(c.H) + " shard [" + std::to_string(c.shard.begin) + ", " +
         std::to_string(c.shard.begin + c.shard.size) + ") of " + std::to_string(c.V_full);
}
}  // namespace

TEST(EmbeddingCuda, ShardedForwardGathersHeldRowsAndZerosOthers) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 90;
  for (const ShardCase& c : shard_cases()) {
    SCOPED_TRACE(describe(c));
    const VocabShard& s = c.shard;
    const auto table = random_f32(s.size * c.H, seed++);  // (V_local, H)
    const auto ids = shard_ids(c.N, s, seed++);
    std::vector<float> want(c.N * c.H);
    cpu::embedding_forward<float>(want.data(), table.data(), ids.data(), c.N, c.H, s);
    for (float& v : want) v = round_bf16(v);

    DeviceArray<float> gtable(table);
    DeviceArray<int64_t> gids(ids), bad(1);
    DeviceBf16 gout(std::vector<float>(c.N * c.H, 7.0f));  // garbage: every row is written
    cuda::embedding_forward(gout.get(), gtable.get(), gids.get(), c.N, c.H, s.size, s.begin, s.full, bad.get(),
                            nullptr);
    EXPECT_EQ(gout.download(), want);
    EXPECT_EQ(bad.download()[0], 0);  // ids of other shards are valid
  }
}

TEST(EmbeddingCuda, ShardedForwardFlagsIdsOutsideTheWholeVocabulary) {
  NEXTRON_REQUIRE_GPU();
  const int64_t H = 48, V_full = 30;
  const VocabShard s{10, 11, V_full};
  const auto table = random_f32(s.size * H, 95);
  DeviceArray<float> gtable(table);
  DeviceArray<int64_t> bad(1);
  DeviceBf16 gout(4 * H);
  // 25 is another shard's (a zero row, no flag); V_full is bad and reads as V_full + 1.
  DeviceArray<int64_t> ids(std::vector<int64_t>{12, 25, V_full, 20});
  cuda::embedding_forward(gout.get(), gtable.get(), ids.get(), 4, H, s.size, s.begin, s.full, bad.get(), nullptr);
  EXPECT_EQ(bad.download()[0], V_full + 1);
  const auto out = gout.download();
  for (int64_t h = 0; h < H; ++h) {
    EXPECT_EQ(out[h], round_bf16(table[2 * H + h]));
    EXPECT_EQ(out[H + h], 0.0f);
    EXPECT_EQ(out[2 * H + h], 0.0f);
    EXPECT_EQ(out[3 * H + h], round_bf16(table[10 * H + h]));
  }
  // A negative id reads as itself.
  bad.upload({0});
  ids.upload({12, -7, 25, 0});
  cuda::embedding_forward(gout.get(), gtable.get(), ids.get(), 4, H, s.size, s.begin, s.full, bad.get(), nullptr);
  EXPECT_EQ(bad.download()[0], -7);
}

TEST(EmbeddingCuda, ShardedBackwardSumsHeldIdsInTokenOrderExactly) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 96;
  for (const ShardCase& c : shard_cases()) {
    SCOPED_TRACE(describe(c));
    const VocabShard& s = c.shard;
    auto ids = shard_ids(c.N, s, seed++);
    ids[c.N - 1] = s.full + 3;  // a bad id is skipped like another shard's
    ids[c.N / 2] = -1;
    const auto dout = random_bf16(c.N * c.H, seed++);
    const auto dtable0 = random_f32(s.size * c.H, seed++);
    // The CPU reference skips the ids it does not hold; it rejects bad ids, so it gets the valid tokens only.
    std::vector<int64_t> ids_ok;
    std::vector<float> dout_ok;
    for (int64_t n = 0; n < c.N; ++n)
      if (ids[n] >= 0 && ids[n] < s.full) {
        ids_ok.push_back(ids[n]);
        dout_ok.insert(dout_ok.end(), dout.begin() + n * c.H, dout.begin() + (n + 1) * c.H);
      }
    std::vector<float> want = dtable0;
    cpu::embedding_backward<float>(want.data(), dout_ok.data(), ids_ok.data(), int64_t(ids_ok.size()), c.H, s);

    DeviceArray<float> gdtable(dtable0);
    DeviceArray<int64_t> gids(ids), sorted(c.N), offsets(s.size + 1);
    DeviceBf16 gdout(dout);
    cuda::embedding_backward(gdtable.get(), gdout.get(), gids.get(), c.N, c.H, s.size, s.begin, sorted.get(),
                             offsets.get(), nullptr);
    EXPECT_EQ(gdtable.download(), want);  // the same fp32 additions in the same order: bit-identical
  }
}

// ------------------------------------------------------------------------------------- column gathers / scatters

namespace {
// Columns [h width + offset, + width) for each h of `order`, in that order (the DeltaNet tables: whole heads).
std::vector<int32_t> head_cols(const std::vector<int>& order, int width, int offset = 0) {
  std::vector<int32_t> idx;
  for (int h : order)
    for (int d = 0; d < width; ++d) idx.push_back(h * width + d + offset);
  return idx;
}

// idx (W) into the indexed side's rows of Wi columns; dense_off / indexed_off shift the two device pointers.
struct ColCase {
  const char* what;
  int64_t N, Wi;
  std::vector<int32_t> idx;
  int64_t dense_off = 0, indexed_off = 0;
};

std::vector<ColCase> col_cases() {
  std::vector<int32_t> reversed(64), sparse;
  for (int j = 0; j < 64; ++j) reversed[j] = 63 - j;
  for (int j = 0; j < 37; ++j) sparse.push_back((j * 7) % 100);  // 37 distinct columns of 100
  return {
      {"whole heads (vector runs)", 37, 4 * 128 + 32, head_cols({2, 0, 3}, 128)},
      {"whole heads, indexed side unaligned", 37, 4 * 128 + 32, head_cols({2, 0, 3}, 128), 0, 1},
      {"whole heads, dense side unaligned (general path)", 37, 4 * 128 + 32, head_cols({2, 0, 3}, 128), 1, 0},
      {"indexed row width not a multiple of 8", 19, 4 * 128 + 3, head_cols({3, 1}, 128)},
      {"runs starting off a multiple of 8", 23, 2 * 64 + 3, head_cols({1, 0}, 64, 3)},
      {"reversed columns", 17, 64, reversed},
      {"odd W (general path)", 29, 100, sparse},
      {"many rows, one group (row loop)", 33000, 16, head_cols({1}, 8)},
  };
}

template <typename T>
void check_gather_scatter(const ColCase& c) {
  const int64_t N = c.N, W = int64_t(c.idx.size()), Wi = c.Wi;
  const bool is_bf16 = std::is_same_v<T, cuda::bf16>;
  DeviceArray<int32_t> gidx(c.idx);
  const auto indexed = random_bf16(N * Wi, 201), dense = random_bf16(N * W, 202);

  // gather: dense (N, W) = indexed (N, Wi)[:, idx] (CpuOps::gather_cols' loop)
  std::vector<float> want(N * W);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < W; ++j) want[n * W + j] = indexed[n * Wi + c.idx[j]];
  Placed<T> gsrc(indexed, c.indexed_off), gdst(std::vector<float>(N * W, 0.0f), c.dense_off);
  cuda::gather_cols(gdst.get(), gsrc.get(), gidx.get(), N, W, Wi, nullptr);
  EXPECT_EQ(gdst.download(), want) << "gather";

  // scatter: indexed (N, Wi)[:, idx] (+)= dense (N, W); the other columns keep their values.
  for (bool accumulate : {false, true}) {
    std::vector<float> want_s = indexed;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < W; ++j) {
        float& out = want_s[n * Wi + c.idx[j]];
        const float v = accumulate ? out + dense[n * W + j] : dense[n * W + j];
        out = is_bf16 ? round_bf16(v) : v;
      }
    Placed<T> sdst(indexed, c.indexed_off), ssrc(dense, c.dense_off);
    cuda::scatter_cols(sdst.get(), ssrc.get(), gidx.get(), N, W, Wi, accumulate, nullptr);
    EXPECT_EQ(sdst.download(), want_s) << "scatter, accumulate " << accumulate;
  }
}
}  // namespace

// Every path (see glue.cu: 16-byte runs, vector kernel with element-wise indexed side, general path) moves exactly
// the reference's values: results are compared bit for bit.
TEST(GlueCuda, GatherScatterColsMatchCpuOnEveryPath) {
  NEXTRON_REQUIRE_GPU();
  for (const ColCase& c : col_cases()) {
    SCOPED_TRACE(::testing::Message() << c.what << ": N=" << c.N << " W=" << c.idx.size() << " Wi=" << c.Wi);
    {
      SCOPED_TRACE("bf16");
      check_gather_scatter<cuda::bf16>(c);
    }
    {
      SCOPED_TRACE("fp32");
      check_gather_scatter<float>(c);
    }
  }
}

// ------------------------------------------------------------------------------------------------- empty inputs

TEST(ElementwiseCuda, EmptyInputsLaunchNothing) {
  NEXTRON_REQUIRE_GPU();
  EXPECT_NO_THROW(cuda::cast_f32_to_bf16(nullptr, nullptr, 0, nullptr));
  EXPECT_NO_THROW(cuda::cast_bf16_to_f32(nullptr, nullptr, 0, nullptr));
  EXPECT_NO_THROW(cuda::rope_forward(nullptr, nullptr, nullptr, nullptr, 0, 5, 2, 128, 64, nullptr));
  EXPECT_NO_THROW(cuda::rope_backward(nullptr, nullptr, nullptr, nullptr, 2, 0, 2, 128, 64, nullptr));
  EXPECT_NO_THROW(cuda::conv1d_silu_forward(nullptr, nullptr, nullptr, 0, 5, 48, 4, 48, 48, nullptr));
  EXPECT_NO_THROW(
      cuda::conv1d_silu_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 0, 48, 4, 48, 48, nullptr));
  EXPECT_NO_THROW(cuda::gdn_gates_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 32, nullptr));
  EXPECT_NO_THROW(cuda::gdn_gates_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                           nullptr, nullptr, 0, 32, nullptr));
  EXPECT_NO_THROW(cuda::sigmoid_gate_forward(nullptr, nullptr, nullptr, 0, 48, 48, 48, nullptr));
  EXPECT_NO_THROW(cuda::sigmoid_gate_backward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 48, 1, 1, nullptr));
  EXPECT_NO_THROW(cuda::swiglu_forward(nullptr, nullptr, 0, 64, nullptr));
  EXPECT_NO_THROW(cuda::swiglu_backward(nullptr, nullptr, nullptr, 0, 64, nullptr));
  EXPECT_NO_THROW(cuda::embedding_forward(nullptr, nullptr, nullptr, 0, 48, 10, 0, 10, nullptr, nullptr));
  EXPECT_NO_THROW(cuda::embedding_backward(nullptr, nullptr, nullptr, 0, 48, 10, 0, nullptr, nullptr, nullptr));
  NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST(ElementwiseCuda, BadShapesThrow) {
  NEXTRON_REQUIRE_GPU();
  EXPECT_THROW(cuda::rope_forward(nullptr, nullptr, nullptr, nullptr, 1, 1, 1, 64, 65, nullptr), Error);
  EXPECT_THROW(cuda::rope_forward(nullptr, nullptr, nullptr, nullptr, 1, 1, 1, 64, 128, nullptr), Error);
  EXPECT_THROW(cuda::sigmoid_gate_forward(nullptr, nullptr, nullptr, 1, 48, 5, 5, nullptr), Error);
  EXPECT_THROW(cuda::sigmoid_gate_forward(nullptr, nullptr, nullptr, 1, 48, 4, 3, nullptr), Error);
}

}  // namespace nextron::test
