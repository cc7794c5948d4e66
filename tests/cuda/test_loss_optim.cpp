// The loss and optimizer kernels of the CUDA backend (kernels/cuda/loss_optim.h) against their CPU references:
// fused cross-entropy vs cpu::cross_entropy_forward/backward on bf16-rounded logits (odd and model-sized V,
// unaligned rows, in place, ignored and bad targets), vocab-parallel cross-entropy (partial on every slice of one
// logits matrix, combine, the sliced backward) vs the CPU's whole-vocabulary forward and sliced backward, the
// deterministic fp64 sums vs host double sums (bit-identical across runs), scale_inplace, and AdamW vs
// optim/adamw.h over three steps with decay ranges and the bf16 shadow.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cuda/loss_optim.h"
#include "kernels/vocab_shard.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"

namespace nextron::test {

namespace {

// ---- cross-entropy ----

// The forward's per-row outputs against the CPU: lse and the row losses are fp32 sums of exp over V terms
// (kF32Rtol of the largest, about log V + 8), no bad-target flag, and their fp64 sum (sum_f64).
void expect_loss_rows(const DeviceArray<float>& d_row, const DeviceArray<float>& d_lse,
                      const DeviceArray<int64_t>& d_bad, const std::vector<float>& want_row,
                      const std::vector<float>& want_lse, double want_sum) {
  EXPECT_TRUE(close_to(d_lse.download(), want_lse, kF32Rtol));
  EXPECT_TRUE(close_to(d_row.download(), want_row, kF32Rtol));
  EXPECT_EQ(d_bad.download()[0], 0);
  DeviceArray<double> d_sum(1);
  DeviceArray<uint8_t> scratch(cuda::sum_scratch_bytes(static_cast<int64_t>(want_row.size())));
  cuda::sum_f64(d_sum.get(), d_row.get(), static_cast<int64_t>(want_row.size()), scratch.get(), nullptr);
  EXPECT_NEAR(d_sum.download()[0], want_sum, kF32Rtol * (std::fabs(want_sum) + 1.0));
}

// Row-by-row check of the logits gradient: |got - want| <= rtol |want| per element, so that the tiny
// probabilities of a 151936-wide row are checked too (a tensor-scale tolerance would only see the target column).
// The target column also gets an absolute 1e-5 |scale|: there scale * (p - 1) cancels when p is near 1, and p
// carries a relative error of about 1e-5 from the fp32 lse. V: the columns of the rows, ids [begin, begin + V).
::testing::AssertionResult grad_close(const std::vector<float>& got, const std::vector<float>& want,
                                      const std::vector<int64_t>& targets, int64_t V, float scale, double rtol,
                                      int64_t begin = 0) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const int64_t n = static_cast<int64_t>(i) / V, v = static_cast<int64_t>(i) % V;
    const double tol =
        rtol * std::fabs(double(want[i])) + (v + begin == targets[n] ? 1e-5 * std::fabs(double(scale)) : 0.0);
    const double err = std::fabs(double(got[i]) - double(want[i]));
    if (!(err <= tol))
      return ::testing::AssertionFailure() << "row " << n << " column " << v << ": got " << got[i] << ", want "
                                           << want[i] << " (error " << err << ", tolerance " << tol << ")";
  }
  return ::testing::AssertionSuccess();
}

// Targets in [0, V) with the first row at V - 1 and the second at 0 (the last and first columns: the row's
// unaligned tail and head), and every fourth row from the third on ignored.
std::vector<int64_t> make_targets(int64_t N, int64_t V, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> dist(0, V - 1);
  std::vector<int64_t> t(N);
  for (int64_t n = 0; n < N; ++n) t[n] = n % 4 == 2 ? cpu::kIgnoreIndex : dist(gen);
  if (N > 0) t[0] = V - 1;
  if (N > 1) t[1] = 0;
  return t;
}

struct CeCase {
  int64_t N, V;
  int64_t logits_offset = 0;   // the logits start this many elements into their buffer (unaligned rows)
  int64_t dlogits_offset = 0;  // likewise the gradient; a different offset forces the scalar (unvectorised) path
  bool in_place = false;       // dlogits == logits
};

// Forward (lse, row losses, their sum through sum_f64) and backward against the CPU on the same bf16 logits.
void check_cross_entropy(const CeCase& c, uint64_t seed) {
  SCOPED_TRACE("N = " + std::to_string(c.N) + ", V = " + std::to_string(c.V) + ", logits offset " +
               std::to_string(c.logits_offset) + ", dlogits offset " + std::to_string(c.dlogits_offset) +
               (c.in_place ? ", in place" : ""));
  const int64_t N = c.N, V = c.V;
  const size_t NV = static_cast<size_t>(N * V);
  // [-8, 8]: probabilities spread over about 7 orders of magnitude within a row.
  const std::vector<float> logits = random_bf16(NV, seed, -8.0f, 8.0f);  // (N, V)
  const std::vector<int64_t> targets = make_targets(N, V, seed + 1);     // (N)

  double want_sum = 0;
  int64_t count = 0;
  std::vector<float> want_row(N), want_lse(N), want_dl(NV, 0.0f);
  cpu::cross_entropy_forward<float>(&want_sum, &count, want_row.data(), want_lse.data(), logits.data(), targets.data(),
                                    N, V);
  const float scale = count > 0 ? 1.0f / static_cast<float>(count) : 1.0f;
  cpu::cross_entropy_backward<float>(want_dl.data(), logits.data(), want_lse.data(), targets.data(), scale, N, V);

  std::vector<float> padded(c.logits_offset, 0.0f);
  padded.insert(padded.end(), logits.begin(), logits.end());
  DeviceBf16 d_logits(padded);
  cuda::bf16* lg = d_logits.get() + c.logits_offset;
  DeviceArray<int64_t> d_targets(targets), d_bad(1);
  DeviceArray<float> d_row(N), d_lse(N);
  cuda::cross_entropy_forward(d_row.get(), d_lse.get(), lg, d_targets.get(), N, V, d_bad.get(), nullptr);
  expect_loss_rows(d_row, d_lse, d_bad, want_row, want_lse, want_sum);

  std::vector<float> got_dl;
  if (c.in_place) {
    cuda::cross_entropy_backward(lg, lg, d_lse.get(), d_targets.get(), scale, N, V, 0, V, nullptr);
    got_dl = d_logits.download();
    got_dl.erase(got_dl.begin(), got_dl.begin() + c.logits_offset);
  } else {
    // Pre-filled with garbage: the backward overwrites every row, ignored rows with zeros.
    DeviceBf16 d_dl(std::vector<float>(NV + c.dlogits_offset, 7.0f));
    cuda::cross_entropy_backward(d_dl.get() + c.dlogits_offset, lg, d_lse.get(), d_targets.get(), scale, N, V, 0, V,
                                 nullptr);
    got_dl = d_dl.download();
    got_dl.erase(got_dl.begin(), got_dl.begin() + c.dlogits_offset);
  }
  // One bf16 rounding (at most 2^-8 relative) plus the fp32 differences: one bf16 ulp, 2^-7, per element.
  EXPECT_TRUE(grad_close(got_dl, want_dl, targets, V, scale, 1.0 / 128));
}

// ---- vocab-parallel cross-entropy ----

struct VpCase {
  int64_t N, V;               // rows; the whole vocabulary
  std::vector<int64_t> cuts;  // the first id of every slice after the first (none: one slice, the whole vocabulary)
  int64_t logits_offset = 0;  // every slice's logits start this many elements into their buffer (unaligned rows)
};

std::vector<VocabShard> split_vocab(int64_t V, const std::vector<int64_t>& cuts) {
  std::vector<VocabShard> shards;
  int64_t begin = 0;
  for (size_t r = 0; r <= cuts.size(); ++r) {
    const int64_t end = r < cuts.size() ? cuts[r] : V;
    shards.push_back({begin, end - begin, V});
    begin = end;
  }
  return shards;
}

// The columns of slice s of the rows of x (N, V): (N, s.size).
std::vector<float> slice_columns(const std::vector<float>& x, int64_t N, int64_t V, const VocabShard& s) {
  std::vector<float> out(static_cast<size_t>(N * s.size));
  for (int64_t n = 0; n < N; ++n) std::copy_n(x.begin() + n * V + s.begin, s.size, out.begin() + n * s.size);
  return out;
}

// Partial on every slice of one bf16 logits matrix (each against cpu::cross_entropy_partial), combine (lse, row
// losses and their sum against the CPU's whole-vocabulary forward), and each slice's backward from combine's lse
// (against the CPU's sliced backward from its own lse).
void check_vocab_parallel(const VpCase& c, uint64_t seed) {
  const int64_t N = c.N, V = c.V;
  const std::vector<VocabShard> shards = split_vocab(V, c.cuts);
  const int64_t P = static_cast<int64_t>(shards.size());
  ::testing::Message trace;
  trace << "N = " << N << ", V = " << V << ", cuts";
  for (int64_t cut : c.cuts) trace << " " << cut;
  trace << ", logits offset " << c.logits_offset;
  SCOPED_TRACE(trace);
  const std::vector<float> logits = random_bf16(static_cast<size_t>(N * V), seed, -8.0f, 8.0f);  // (N, V)
  // make_targets' (the vocabulary's first and last ids, every fourth row ignored), then the first and last ids of
  // every slice on the next rows that are not ignored: targets at each slice's edges, held by one slice only.
  std::vector<int64_t> targets = make_targets(N, V, seed + 1);
  int64_t row = 3;
  for (const VocabShard& s : shards)
    for (int64_t id : {s.begin, s.begin + s.size - 1}) {
      if (row < N && targets[row] == cpu::kIgnoreIndex) ++row;
      if (row < N) targets[row++] = id;
    }

  double want_sum = 0;
  int64_t count = 0;
  std::vector<float> want_row(N), want_lse(N);
  cpu::cross_entropy_forward<float>(&want_sum, &count, want_row.data(), want_lse.data(), logits.data(), targets.data(),
                                    N, V);
  const float scale = count > 0 ? 1.0f / static_cast<float>(count) : 1.0f;

  DeviceArray<int64_t> d_targets(targets), d_bad(1);
  DeviceArray<float> d_stats(static_cast<size_t>(P * 3 * N)), d_row(N), d_lse(N);
  std::vector<std::unique_ptr<DeviceBf16>> d_local(P);  // each slice's logits, kept for the backward
  for (int64_t r = 0; r < P; ++r) {
    SCOPED_TRACE("slice " + std::to_string(r));
    const VocabShard& s = shards[r];
    const std::vector<float> local = slice_columns(logits, N, V, s);
    std::vector<float> want(3 * N);
    cpu::cross_entropy_partial(want.data(), local.data(), targets.data(), N, s);
    std::vector<float> padded(c.logits_offset, 0.0f);
    padded.insert(padded.end(), local.begin(), local.end());
    d_local[r] = std::make_unique<DeviceBf16>(padded);
    cuda::cross_entropy_partial(d_stats.get() + r * 3 * N, d_local[r]->get() + c.logits_offset, d_targets.get(), N,
                                s.size, s.begin, nullptr);
    const std::vector<float> all = d_stats.download();
    const std::vector<float> got(all.begin() + r * 3 * N, all.begin() + (r + 1) * 3 * N);
    for (int64_t n = 0; n < N; ++n) {
      // The max and the target's logit are bf16 values picked, not computed: exact. The sum of exp is fp32 (the
      // CPU sums in double): kF32Rtol relative per row.
      ASSERT_EQ(got[n], want[n]) << "max of row " << n;
      ASSERT_NEAR(got[N + n], want[N + n], kF32Rtol * want[N + n]) << "sum of exp of row " << n;
      ASSERT_EQ(got[2 * N + n], want[2 * N + n]) << "target logit of row " << n << " (target " << targets[n] << ")";
    }
  }

  cuda::cross_entropy_combine(d_row.get(), d_lse.get(), d_stats.get(), P, d_targets.get(), N, V, d_bad.get(), nullptr);
  expect_loss_rows(d_row, d_lse, d_bad, want_row, want_lse, want_sum);  // as the whole-vocabulary forward

  for (int64_t r = 0; r < P; ++r) {
    SCOPED_TRACE("backward of slice " + std::to_string(r));
    const VocabShard& s = shards[r];
    const std::vector<float> local = slice_columns(logits, N, V, s);
    std::vector<float> want(local.size(), 0.0f);
    cpu::cross_entropy_backward<float>(want.data(), local.data(), want_lse.data(), targets.data(), scale, N, s);
    DeviceBf16 d_dl(std::vector<float>(local.size(), 7.0f));  // garbage: every row is overwritten
    cuda::cross_entropy_backward(d_dl.get(), d_local[r]->get() + c.logits_offset, d_lse.get(), d_targets.get(), scale,
                                 N, s.size, s.begin, V, nullptr);
    EXPECT_TRUE(grad_close(d_dl.download(), want, targets, s.size, scale, 1.0 / 128, s.begin));
  }
}

// ---- sums ----

// The bits of a double (determinism checks compare bit patterns, not values).
uint64_t bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

double device_sum(const std::vector<float>& x) {
  DeviceArray<float> d_x(x);
  DeviceArray<double> d_out(std::vector<double>{123.0});  // garbage: overwritten
  DeviceArray<uint8_t> scratch(cuda::sum_scratch_bytes(static_cast<int64_t>(x.size())));
  cuda::sum_f64(d_out.get(), d_x.get(), static_cast<int64_t>(x.size()), scratch.get(), nullptr);
  return d_out.download()[0];
}

double device_sum_squares(const DeviceArray<float>& d_x, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  int64_t total = 0;
  for (const auto& [b, e] : ranges) total += e - b;
  DeviceArray<double> d_out(std::vector<double>{123.0});
  DeviceArray<uint8_t> scratch(cuda::sum_scratch_bytes(total));
  cuda::sum_squares_f64(d_out.get(), d_x.get(), ranges, scratch.get(), nullptr);
  return d_out.download()[0];
}

// ---- AdamW ----

// |got - want| <= rel * max(|want|, a tenth of the tensor's largest |want|): relative per element, with elements
// that cancel towards zero held to a tenth of the tensor scale (as tests/unit/test_optim.cpp does).
::testing::AssertionResult near_rel(const std::vector<float>& got, const std::vector<float>& want, double rel) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  double scale = 0;
  for (float w : want) scale = std::max(scale, std::fabs(double(w)));
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = rel * std::max(std::fabs(double(want[i])), 0.1 * scale);
    const double err = std::fabs(double(got[i]) - double(want[i]));
    if (!(err <= tol))
      return ::testing::AssertionFailure() << "element " << i << ": got " << got[i] << ", want " << want[i]
                                           << " (error " << err << ", tolerance " << tol << ")";
  }
  return ::testing::AssertionSuccess();
}

// The same fp32 operations in the same order on both sides, neither contracting to FMA (the CPU build targets
// x86-64 without -mfma; the kernel uses __fmul_rn/__fadd_rn), so the results are expected bit-identical. The test
// allows 2^-21 relative (4 to 8 ulp) so that a CPU build with FMA contraction still passes.
constexpr double kAdamWRel = 1.0 / (1 << 21);

struct AdamWCase {
  int64_t begin, n;              // the updated flat range [begin, begin + n) (a ZeRO shard when begin > 0)
  std::vector<FlatRange> decay;  // absolute flat ranges, as optim::decay_ranges returns
  double beta1, beta2, eps, wd;
  bool shadow;        // write the bf16 shadow
  int64_t shift = 0;  // the kernel's buffers start `shift` elements into their allocations (1: not 16-byte aligned)
};

void check_adamw(const AdamWCase& c, uint64_t seed) {
  const int64_t n = c.n;
  // The kernel takes the decay ranges relative to its buffers: clip to the shard and shift.
  std::vector<int64_t> rel;
  for (const FlatRange& r : c.decay) {
    const int64_t b = std::max(r.begin, c.begin), e = std::min(r.end, c.begin + n);
    if (e > b) {
      rel.push_back(b - c.begin);
      rel.push_back(e - c.begin);
    }
  }
  std::vector<float> p = random_f32(n, seed, -1.0f, 1.0f), m(n, 0.0f), v(n, 0.0f);
  const int64_t sh = c.shift;
  std::vector<float> p_shifted(static_cast<size_t>(sh), 9.0f);
  p_shifted.insert(p_shifted.end(), p.begin(), p.end());
  DeviceArray<float> d_p(p_shifted), d_g(n + sh), d_m(n + sh), d_v(n + sh);
  DeviceBf16 d_shadow(std::vector<float>(n + sh, 5.0f));
  DeviceArray<int64_t> d_ranges(rel);
  // The n elements the kernel updates, from a download of a whole (shifted) buffer.
  auto tail = [sh](std::vector<float> all) { return std::vector<float>(all.begin() + sh, all.end()); };

  const double lrs[3] = {1e-3, 3e-3, 2e-3};  // a schedule: a different lr every step
  for (int64_t step = 1; step <= 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    std::vector<float> g = random_f32(n, seed + 10 * step, -0.1f, 0.1f);
    for (int64_t i = 0; i < n; i += 97) g[i] = 0.0f;  // zero gradients: v decays, the update is m's alone
    AdamWHyper h;
    h.lr = lrs[step - 1];
    h.beta1 = c.beta1;
    h.beta2 = c.beta2;
    h.eps = c.eps;
    h.weight_decay = c.wd;
    adamw_step(p.data(), g.data(), m.data(), v.data(), FlatRange{c.begin, c.begin + n}, c.decay, h, step);

    std::vector<float> g_shifted(static_cast<size_t>(sh), 9.0f);
    g_shifted.insert(g_shifted.end(), g.begin(), g.end());
    d_g.upload(g_shifted);
    const cuda::AdamWStep hs{h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step};
    cuda::adamw_step(d_p.get() + sh, d_g.get() + sh, d_m.get() + sh, d_v.get() + sh,
                     c.shadow ? d_shadow.get() + sh : nullptr, n, d_ranges.get(), static_cast<int64_t>(rel.size() / 2),
                     hs, nullptr);
    const std::vector<float> all_p = d_p.download(), got_p = tail(all_p);
    for (int64_t i = 0; i < sh; ++i) ASSERT_EQ(all_p[i], 9.0f) << "element " << i << " before the buffer";
    EXPECT_TRUE(near_rel(got_p, p, kAdamWRel)) << "params";
    EXPECT_TRUE(near_rel(tail(d_m.download()), m, kAdamWRel)) << "exp_avg";
    EXPECT_TRUE(near_rel(tail(d_v.download()), v, kAdamWRel)) << "exp_avg_sq";
    if (c.shadow) {
      // The shadow is exactly the bf16 rounding of the kernel's own fp32 result.
      const std::vector<float> got_s = tail(d_shadow.download());
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got_s[i], bf16_to_f32(f32_to_bf16(got_p[i]))) << "shadow element " << i;
    }
  }
  if (!c.shadow) {  // untouched without a shadow pointer
    for (float s : d_shadow.download()) ASSERT_EQ(s, 5.0f);
  }
}

}  // namespace

TEST(CrossEntropyCuda, ForwardBackwardMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 100;
  for (int64_t N : {1, 5, 300})
    for (int64_t V : {7, 1000, 1001}) check_cross_entropy({N, V}, seed++);
}

TEST(CrossEntropyCuda, LargeVocab) {
  NEXTRON_REQUIRE_GPU();
  // Qwen3-Next's vocabulary; with the logits one element into their buffer every row has an unaligned head and
  // tail around the vectorised body.
  check_cross_entropy({1, 151936}, 200);
  check_cross_entropy({5, 151936}, 201);
  check_cross_entropy({3, 151936, 1, 1}, 202);
}

TEST(CrossEntropyCuda, InPlaceAndMisalignedOutput) {
  NEXTRON_REQUIRE_GPU();
  check_cross_entropy({5, 1000, 0, 1}, 300);         // output 2 bytes off the logits' alignment: scalar path
  check_cross_entropy({17, 1001, 0, 0, true}, 301);  // in place, odd V
  check_cross_entropy({3, 151936, 3, 0, true}, 302);
}

TEST(CrossEntropyCuda, BadTargetFlagsLargestRowAndIsIgnored) {
  NEXTRON_REQUIRE_GPU();
  const int64_t N = 5, V = 100;
  const std::vector<float> logits = random_bf16(N * V, 400, -4.0f, 4.0f);
  const std::vector<int64_t> targets = {3, V, 7, -1, cpu::kIgnoreIndex};  // rows 1 and 3 are bad
  DeviceBf16 d_logits(logits);
  DeviceArray<int64_t> d_targets(targets), d_bad(1);
  DeviceArray<float> d_row(N), d_lse(N);
  cuda::cross_entropy_forward(d_row.get(), d_lse.get(), d_logits.get(), d_targets.get(), N, V, d_bad.get(), nullptr);
  EXPECT_EQ(d_bad.download()[0], 4);  // the largest bad row (3) + 1
  const std::vector<float> row = d_row.download();
  EXPECT_EQ(row[1], 0.0f);
  EXPECT_EQ(row[3], 0.0f);
  EXPECT_EQ(row[4], 0.0f);
  EXPECT_GT(row[0], 0.0f);
  // Without a flag pointer a bad target is still harmless.
  cuda::cross_entropy_forward(d_row.get(), d_lse.get(), d_logits.get(), d_targets.get(), N, V, nullptr, nullptr);
  // The backward writes zero rows for bad and ignored targets (no out-of-range write).
  DeviceBf16 d_dl(std::vector<float>(N * V, 7.0f));
  cuda::cross_entropy_backward(d_dl.get(), d_logits.get(), d_lse.get(), d_targets.get(), 0.5f, N, V, 0, V, nullptr);
  const std::vector<float> dl = d_dl.download();
  for (int64_t n : {1, 3, 4})
    for (int64_t v = 0; v < V; ++v) ASSERT_EQ(dl[n * V + v], 0.0f) << "row " << n;
  // N = 0: nothing launched, nothing written.
  cuda::cross_entropy_forward(d_row.get(), d_lse.get(), d_logits.get(), d_targets.get(), 0, V, d_bad.get(), nullptr);
  cuda::cross_entropy_backward(d_dl.get(), d_logits.get(), d_lse.get(), d_targets.get(), 0.5f, 0, V, 0, V, nullptr);
  NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST(CrossEntropyCuda, VocabParallelMatchesWholeVocabulary) {
  NEXTRON_REQUIRE_GPU();
  uint64_t seed = 1000;
  // Three slices of odd and even sizes (one of a single id), one slice (the whole vocabulary through partial and
  // combine), unaligned slice rows, and Qwen3-Next's vocabulary in three.
  for (const VpCase& c : std::vector<VpCase>{{5, 7, {3, 4}},
                                             {300, 1001, {333, 667}},
                                             {17, 1000, {1, 999}},
                                             {33, 1001, {500, 501}, 1},
                                             {9, 1001, {}},
                                             {4, 151936, {50645, 101291}, 3}})
    check_vocab_parallel(c, seed++);
}

TEST(CrossEntropyCuda, VocabParallelBadTargetFlaggedByCombine) {
  NEXTRON_REQUIRE_GPU();
  const int64_t N = 5, V = 100;
  const std::vector<VocabShard> shards = split_vocab(V, {41});
  const std::vector<float> logits = random_bf16(N * V, 1100, -4.0f, 4.0f);
  const std::vector<int64_t> targets = {3, V, 57, -1, cpu::kIgnoreIndex};  // rows 1 and 3 are bad
  DeviceArray<int64_t> d_targets(targets), d_bad(1);
  DeviceArray<float> d_stats(2 * 3 * N), d_row(N), d_lse(N);
  std::vector<std::unique_ptr<DeviceBf16>> d_local;
  for (size_t r = 0; r < shards.size(); ++r) {
    d_local.push_back(std::make_unique<DeviceBf16>(slice_columns(logits, N, V, shards[r])));
    cuda::cross_entropy_partial(d_stats.get() + r * 3 * N, d_local[r]->get(), d_targets.get(), N, shards[r].size,
                                shards[r].begin, nullptr);
  }
  cuda::cross_entropy_combine(d_row.get(), d_lse.get(), d_stats.get(), 2, d_targets.get(), N, V, d_bad.get(), nullptr);
  EXPECT_EQ(d_bad.download()[0], 4);  // the largest bad row (3) + 1
  const std::vector<float> row = d_row.download();
  EXPECT_EQ(row[1], 0.0f);
  EXPECT_EQ(row[3], 0.0f);
  EXPECT_EQ(row[4], 0.0f);
  EXPECT_GT(row[0], 0.0f);
  EXPECT_GT(row[2], 0.0f);
  // Without a flag pointer, or without row losses, a bad target is still harmless.
  cuda::cross_entropy_combine(d_row.get(), d_lse.get(), d_stats.get(), 2, d_targets.get(), N, V, nullptr, nullptr);
  cuda::cross_entropy_combine(nullptr, d_lse.get(), d_stats.get(), 2, d_targets.get(), N, V, nullptr, nullptr);
  // Every slice's backward writes zero rows for bad and ignored targets (no out-of-range write).
  for (size_t r = 0; r < shards.size(); ++r) {
    const int64_t W = shards[r].size;
    DeviceBf16 d_dl(std::vector<float>(N * W, 7.0f));
    cuda::cross_entropy_backward(d_dl.get(), d_local[r]->get(), d_lse.get(), d_targets.get(), 0.5f, N, W,
                                 shards[r].begin, V, nullptr);
    const std::vector<float> dl = d_dl.download();
    for (int64_t n : {1, 3, 4})
      for (int64_t v = 0; v < W; ++v) ASSERT_EQ(dl[n * W + v], 0.0f) << "slice " << r << " row " << n;
  }
  // Bad arguments throw on the host; N = 0 launches nothing.
  EXPECT_THROW(cuda::cross_entropy_partial(d_stats.get(), d_local[0]->get(), d_targets.get(), N, 41, -1, nullptr),
               Error);
  EXPECT_THROW(
      cuda::cross_entropy_combine(d_row.get(), d_lse.get(), d_stats.get(), 0, d_targets.get(), N, V, nullptr, nullptr),
      Error);
  EXPECT_THROW(cuda::cross_entropy_backward(nullptr, d_local[1]->get(), d_lse.get(), d_targets.get(), 0.5f, N, 59, 42,
                                            V, nullptr),
               Error);
  cuda::cross_entropy_partial(d_stats.get(), d_local[0]->get(), d_targets.get(), 0, 41, 0, nullptr);
  cuda::cross_entropy_combine(d_row.get(), d_lse.get(), d_stats.get(), 2, d_targets.get(), 0, V, d_bad.get(), nullptr);
  NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST(SumCuda, MatchesHostAndIsDeterministic) {
  NEXTRON_REQUIRE_GPU();
  for (int64_t n : {0, 1, 1000, 10000000}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const std::vector<float> x = random_f32(n, 500 + n, -1.0f, 1.0f);
    double want = 0, abs_sum = 0;
    for (float xi : x) {
      want += xi;
      abs_sum += std::fabs(xi);
    }
    const double got = device_sum(x);
    // Both in double, in different orders: far inside 1e-12 of the sum of magnitudes.
    EXPECT_NEAR(got, want, 1e-12 * abs_sum);
    EXPECT_EQ(bits(device_sum(x)), bits(got)) << "two runs differ";
  }
}

TEST(SumCuda, SquaresOverRanges) {
  NEXTRON_REQUIRE_GPU();
  const int64_t n = 2000000;
  const std::vector<float> x = random_f32(n, 600, -2.0f, 2.0f);
  const DeviceArray<float> d_x(x);
  auto host = [&](const std::vector<std::pair<int64_t, int64_t>>& ranges) {
    double s = 0;
    for (const auto& [b, e] : ranges)
      for (int64_t i = b; i < e; ++i) s += double(x[i]) * double(x[i]);
    return s;
  };
  // Unsorted, one empty, two adjacent, single elements at both ends.
  const std::vector<std::pair<int64_t, int64_t>> few = {{300000, 1999999}, {0, 1},       {5, 5},
                                                        {17, 1000},        {1000, 1024}, {1999999, 2000000}};
  // More ranges than one launch takes (several batches adding into the same partials).
  std::vector<std::pair<int64_t, int64_t>> many;
  for (int64_t r = 0; r < 300; ++r) many.emplace_back(r * 6000 + r % 7, r * 6000 + 3000 + r % 13);
  for (const auto& ranges : {few, many}) {
    const double got = device_sum_squares(d_x, ranges), want = host(ranges);
    EXPECT_NEAR(got, want, 1e-12 * want);  // positive terms: a relative bound
    EXPECT_EQ(bits(device_sum_squares(d_x, ranges)), bits(got)) << "two runs differ";
  }
  // The whole buffer against the CPU gradient-norm reduction.
  const double whole = device_sum_squares(d_x, {{0, n}});
  EXPECT_NEAR(whole, grad_sq_sum(x.data(), FlatRange{0, n}), 1e-12 * whole);
  EXPECT_EQ(device_sum_squares(d_x, {}), 0.0);
  EXPECT_EQ(device_sum_squares(d_x, {{7, 7}}), 0.0);
}

TEST(ScaleCuda, InplaceMatchesHost) {
  NEXTRON_REQUIRE_GPU();
  const int64_t n = 1000003;
  std::vector<float> x = random_f32(n, 700, -3.0f, 3.0f);
  DeviceArray<float> d_x(x);
  cuda::scale_inplace(d_x.get(), n, 0.37f, nullptr);
  for (float& xi : x) xi *= 0.37f;  // one fp32 rounding on both sides: exact
  EXPECT_EQ(d_x.download(), x);
  cuda::scale_inplace(d_x.get(), 0, 2.0f, nullptr);  // n = 0: no launch
  EXPECT_EQ(d_x.download(), x);
}

TEST(AdamWCuda, MatchesCpuOverThreeStepsWithShadow) {
  NEXTRON_REQUIRE_GPU();
  // Range boundaries inside the kernel's 256-thread blocks (37, 100, 4099, 5000, 77777, 99990), two adjacent
  // ranges (as decay_ranges would have merged them, still valid), and a range reaching the end.
  const int64_t n = 100003;
  check_adamw({0, n, {{0, 37}, {100, 1000}, {1000, 4099}, {5000, 77777}, {99990, n}}, 0.9, 0.95, 1e-8, 0.1, true}, 800);
}

TEST(AdamWCuda, ShardWithOtherLerpBranchNoShadow) {
  NEXTRON_REQUIRE_GPU();
  // A ZeRO-style shard [12345, 12345 + 50001) of a larger flat layout, decay ranges given in flat coordinates
  // (one straddling the shard's start); beta1 = 0.3 takes torch's other lerp branch (weight 0.7 >= 0.5).
  check_adamw({12345, 50001, {{0, 20000}, {30000, 30001}, {40000, 200000}}, 0.3, 0.999, 1e-6, 0.05, false}, 900);
}

TEST(AdamWCuda, UnalignedBuffersTakeTheScalarPath) {
  NEXTRON_REQUIRE_GPU();
  // Buffers one element into their allocations (4 bytes: no 16-byte access is possible) and a length that is not a
  // multiple of the 4 elements a thread updates: the scalar path gives the same results.
  const int64_t n = 10007;
  check_adamw({0, n, {{3, 2050}, {2051, 2052}, {9000, n}}, 0.9, 0.95, 1e-8, 0.1, true, 1}, 1000);
}

TEST(AdamWCuda, RejectsStepZeroAndSkipsEmpty) {
  NEXTRON_REQUIRE_GPU();
  DeviceArray<float> d(4);
  const cuda::AdamWStep h0{1e-3, 0.9, 0.999, 1e-8, 0.01, 0};
  EXPECT_THROW(cuda::adamw_step(d.get(), d.get(), d.get(), d.get(), nullptr, 4, nullptr, 0, h0, nullptr), Error);
  const cuda::AdamWStep h1{1e-3, 0.9, 0.999, 1e-8, 0.01, 1};
  cuda::adamw_step(nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr, 0, h1, nullptr);  // n = 0: no launch
  NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace nextron::test
