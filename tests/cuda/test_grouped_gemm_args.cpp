// The grouped GEMM's per-expert arguments built on the device (kernels/cuda/grouped_gemm_args.h) against their CPU
// reference and against the closed form of each MoE product (the derivation at the top of grouped_gemm.cu): for
// expert e with r0 = offsets[e] and rows_e rows,
//   forward  (rows_e, OUT, IN), A = x + r0 IN, B = w + e OUT IN, no C, D = y + r0 OUT, ld (IN, IN, 0, OUT)
//   dx       (rows_e, IN, OUT), A = dy + r0 OUT, B = w + e OUT IN, no C, D = dx + r0 IN, ld (OUT, IN, 0, IN)
//   dw       (OUT, IN, rows_e), A = dy + r0 OUT, B = x + r0 IN, C = D = dw + e OUT IN (fp32), ld (OUT, IN, IN, IN)
// and an expert without rows gets the empty problem (0, 0, k) (k = rows_e = 0 for dw). Only pointer arithmetic is
// checked, so the operands are made-up addresses, never dereferenced. Integers and pointers: exact. Runs on the
// block emulator (tools/cuda_emu/run.sh grouped_gemm_args) as well as on a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/cuda/grouped_gemm_args.h"

namespace nextron::test {

namespace {

using cuda::GroupedProblem;

// The argument arrays of E groups as the device wrote them (downloaded) or as a host function writes them.
struct Args {
  std::vector<GroupedProblem> problems;
  std::vector<const void*> a, b, c;
  std::vector<void*> d;
  std::vector<int64_t> lda, ldb, ldc, ldd;
  explicit Args(int64_t E) : problems(E), a(E), b(E), c(E), d(E), lda(E), ldb(E), ldc(E), ldd(E) {}
};

template <typename T>
std::vector<T> download_array(const T* device, int64_t n) {
  std::vector<T> host(n);
  if (n > 0) {
    NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
    NEXTRON_CUDA_CHECK(cudaMemcpy(host.data(), device, size_t(n) * sizeof(T), cudaMemcpyDeviceToHost));
  }
  return host;
}

Args build_on_device(const cuda::GroupedGemmSpec& spec, const std::vector<int64_t>& offsets) {
  const int64_t E = int64_t(offsets.size()) - 1;
  DeviceArray<int64_t> d_offsets(offsets);
  // Poisoned first (0xff bytes), so an entry the kernel does not write shows up.
  std::vector<uint8_t> poison(size_t(cuda::grouped_gemm_args_bytes(E)), 0xff);
  DeviceArray<uint8_t> buffer(poison);
  const cuda::GroupedGemmArrays arr = cuda::grouped_gemm_args_carve(buffer.get(), E);
  cuda::grouped_gemm_build_args(arr, spec, d_offsets.get(), E, nullptr);
  Args out(E);
  out.problems = download_array(arr.problems, E);
  out.a = download_array(arr.ptr_a, E);
  out.b = download_array(arr.ptr_b, E);
  out.c = download_array(arr.ptr_c, E);
  out.d = download_array(arr.ptr_d, E);
  out.lda = download_array(arr.ld_a, E);
  out.ldb = download_array(arr.ld_b, E);
  out.ldc = download_array(arr.ld_c, E);
  out.ldd = download_array(arr.ld_d, E);
  return out;
}

Args build_reference(const cuda::GroupedGemmSpec& spec, const std::vector<int64_t>& offsets) {
  const int64_t E = int64_t(offsets.size()) - 1;
  Args out(E);
  cuda::grouped_gemm_build_args_reference(out.problems.data(), out.a.data(), out.b.data(), out.c.data(), out.d.data(),
                                          out.lda.data(), out.ldb.data(), out.ldc.data(), out.ldd.data(), spec,
                                          offsets.data(), E);
  return out;
}

enum class Product { forward, dx, dw };
const char* name(Product p) { return p == Product::forward ? "forward" : p == Product::dx ? "dx" : "dw"; }

// Made-up, distinct operand addresses (16-byte aligned, far apart).
const uintptr_t kX = uintptr_t(1) << 40, kW = uintptr_t(2) << 40, kY = uintptr_t(3) << 40, kG = uintptr_t(4) << 40;
template <typename T>
T* at(uintptr_t base) {
  return reinterpret_cast<T*>(base);
}
const void* addr(uintptr_t base, int64_t elems, int64_t elem_bytes) {
  return reinterpret_cast<const void*>(base + uintptr_t(elems * elem_bytes));
}

cuda::GroupedGemmSpec spec_of(Product p, int64_t IN, int64_t OUT) {
  using cuda::bf16;
  switch (p) {
    case Product::forward:  // y = x W^T: x at kX, W at kW, y at kY
      return cuda::grouped_forward_spec(at<bf16>(kY), at<bf16>(kX), at<bf16>(kW), IN, OUT);
    case Product::dx:  // dx = dy W: dy at kY, W at kW, dx at kX
      return cuda::grouped_dx_spec(at<bf16>(kX), at<bf16>(kY), at<bf16>(kW), IN, OUT);
    case Product::dw:  // dw += dy^T x: dy at kY, x at kX, dw at kG
      return cuda::grouped_dw_spec(at<float>(kG), at<bf16>(kY), at<bf16>(kX), IN, OUT);
  }
  return {};
}

// The closed form of the header, written out per product.
Args closed_form(Product p, const std::vector<int64_t>& offsets, int64_t IN, int64_t OUT) {
  const int64_t E = int64_t(offsets.size()) - 1;
  Args out(E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - offsets[e];
    auto problem = [&](int64_t m, int64_t n, int64_t k) {
      return rows == 0 ? GroupedProblem{0, 0, int32_t(k)} : GroupedProblem{int32_t(m), int32_t(n), int32_t(k)};
    };
    switch (p) {
      case Product::forward:
        out.problems[e] = problem(rows, OUT, IN);
        out.a[e] = addr(kX, r0 * IN, 2);
        out.b[e] = addr(kW, e * OUT * IN, 2);
        out.c[e] = nullptr;
        out.d[e] = const_cast<void*>(addr(kY, r0 * OUT, 2));
        out.lda[e] = IN, out.ldb[e] = IN, out.ldc[e] = 0, out.ldd[e] = OUT;
        break;
      case Product::dx:
        out.problems[e] = problem(rows, IN, OUT);
        out.a[e] = addr(kY, r0 * OUT, 2);
        out.b[e] = addr(kW, e * OUT * IN, 2);
        out.c[e] = nullptr;
        out.d[e] = const_cast<void*>(addr(kX, r0 * IN, 2));
        out.lda[e] = OUT, out.ldb[e] = IN, out.ldc[e] = 0, out.ldd[e] = IN;
        break;
      case Product::dw:
        out.problems[e] = problem(OUT, IN, rows);
        out.a[e] = addr(kY, r0 * OUT, 2);
        out.b[e] = addr(kX, r0 * IN, 2);
        out.c[e] = addr(kG, e * OUT * IN, 4);
        out.d[e] = const_cast<void*>(out.c[e]);
        out.lda[e] = OUT, out.ldb[e] = IN, out.ldc[e] = IN, out.ldd[e] = IN;
        break;
    }
  }
  return out;
}

::testing::AssertionResult same(const Args& got, const Args& want) {
  const size_t E = want.problems.size();
  for (size_t e = 0; e < E; ++e) {
    const GroupedProblem &g = got.problems[e], &w = want.problems[e];
    if (g.m != w.m || g.n != w.n || g.k != w.k)
      return ::testing::AssertionFailure() << "group " << e << ": problem (" << g.m << ", " << g.n << ", " << g.k
                                           << "), want (" << w.m << ", " << w.n << ", " << w.k << ")";
    if (got.a[e] != want.a[e] || got.b[e] != want.b[e] || got.c[e] != want.c[e] || got.d[e] != want.d[e])
      return ::testing::AssertionFailure()
             << "group " << e << ": pointers A/B/C/D " << got.a[e] << " " << got.b[e] << " " << got.c[e] << " "
             << got.d[e] << ", want " << want.a[e] << " " << want.b[e] << " " << want.c[e] << " " << want.d[e];
    if (got.lda[e] != want.lda[e] || got.ldb[e] != want.ldb[e] || got.ldc[e] != want.ldc[e] ||
        got.ldd[e] != want.ldd[e])
      return ::testing::AssertionFailure()
             << "group " << e << ": leading dimensions " << got.lda[e] << " " << got.ldb[e] << " " << got.ldc[e] << " "
             << got.ldd[e] << ", want " << want.lda[e] << " " << want.ldb[e] << " " << want.ldc[e] << " "
             << want.ldd[e];
  }
  return ::testing::AssertionSuccess();
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& rows) {
  std::vector<int64_t> offsets(rows.size() + 1, 0);
  for (size_t e = 0; e < rows.size(); ++e) offsets[e + 1] = offsets[e] + rows[e];
  return offsets;
}

// Per-expert row counts: hand-made edge cases (no rows first, middle, last; one expert; every row in one expert;
// no rows at all), and random ones over more experts than one block of the builder (128) and than the GEMM
// scheduler's 32-group lookahead, with many empty experts.
std::vector<std::vector<int64_t>> row_cases() {
  std::vector<std::vector<int64_t>> cases = {{0, 5, 17, 0, 1, 64, 3, 0}, {7}, {0}, {0, 0, 300, 0}, {0, 0, 0},
                                             {129, 1, 255, 128, 0, 2}};
  std::mt19937_64 rng(7);
  for (int64_t E : {33, 130, 512}) {
    std::uniform_int_distribution<int64_t> dist(-3, 9);  // about a quarter of the experts without rows
    std::vector<int64_t> rows(E);
    for (int64_t& r : rows) r = std::max<int64_t>(dist(rng), 0);
    cases.push_back(rows);
  }
  return cases;
}

}  // namespace

TEST(GroupedGemmArgsCuda, MatchReferenceAndClosedForm) {
  NEXTRON_REQUIRE_GPU();
  for (const auto& rows : row_cases())
    for (auto [IN, OUT] : {std::pair<int64_t, int64_t>{48, 96}, {2048, 512}, {24, 8}})
      for (Product p : {Product::forward, Product::dx, Product::dw}) {
        SCOPED_TRACE(std::string(name(p)) + " E=" + std::to_string(rows.size()) + " IN=" + std::to_string(IN) +
                     " OUT=" + std::to_string(OUT));
        const std::vector<int64_t> offsets = offsets_of(rows);
        const cuda::GroupedGemmSpec spec = spec_of(p, IN, OUT);
        const Args want = closed_form(p, offsets, IN, OUT);
        EXPECT_TRUE(same(build_reference(spec, offsets), want)) << "CPU reference";
        EXPECT_TRUE(same(build_on_device(spec, offsets), want)) << "device";
      }
}

// The argument arrays do not overlap and each starts 16-byte aligned, whatever E.
TEST(GroupedGemmArgsCuda, CarvedArraysAreAlignedAndDisjoint) {
  for (int64_t E : {1, 3, 8, 33, 512, 2048}) {
    SCOPED_TRACE("E=" + std::to_string(E));
    alignas(256) static uint8_t storage[1 << 18];
    ASSERT_LE(cuda::grouped_gemm_args_bytes(E), int64_t(sizeof(storage)));
    const cuda::GroupedGemmArrays a = cuda::grouped_gemm_args_carve(storage, E);
    const std::vector<std::pair<const void*, int64_t>> arrays = {{a.problems, E * int64_t(sizeof(GroupedProblem))},
                                                                 {a.ptr_a, E * 8},
                                                                 {a.ptr_b, E * 8},
                                                                 {a.ptr_c, E * 8},
                                                                 {a.ptr_d, E * 8},
                                                                 {a.ld_a, E * 8},
                                                                 {a.ld_b, E * 8},
                                                                 {a.ld_c, E * 8},
                                                                 {a.ld_d, E * 8}};
    const auto begin = reinterpret_cast<uintptr_t>(storage);
    for (size_t i = 0; i < arrays.size(); ++i) {
      const auto p = reinterpret_cast<uintptr_t>(arrays[i].first);
      EXPECT_EQ(p % 16, 0u) << "array " << i;
      EXPECT_LE(p + uintptr_t(arrays[i].second), begin + uintptr_t(cuda::grouped_gemm_args_bytes(E))) << i;
      if (i + 1 < arrays.size()) {
        EXPECT_LE(p + uintptr_t(arrays[i].second), uintptr_t(arrays[i + 1].first)) << i;
      }
    }
  }
}

}  // namespace nextron::test
