// cuDNN fused causal GQA attention (kernels/cuda/attention.h) against the CPU reference (kernels/cpu/attention.h)
// on bf16-rounded inputs: forward (o, lse) and backward (dq, dk, dv) over a sweep of batch sizes, sequence lengths
// (1, odd, one tile, several tiles with a ragged tail), head layouts (MHA and the model's 16 query heads on 2 kv
// heads) and head dims (48, 64, 128, the model's 256); the backward's overwrite semantics and bitwise
// reproducibility, the graph cache (a repeated shape builds nothing), and the errors for unsupported input.
#include <cudnn.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda_test_util.h"
#include "kernels/cpu/attention.h"
#include "kernels/cuda/attention.h"

namespace nextron::test {

namespace {

using cuda::AttentionShape;

// dq / dk / dv tolerance (relative to the tensor's max, as kBf16Rtol): cuDNN's backward rounds the recomputed
// probabilities P (for dv = P^T do) and dS = P * (dP - rowsum(do * o)) (for dq = dS k and dk = dS^T q) to bf16
// before its tensor-core products, so every term of those sums over up to S rows carries a 2^-9 relative error on
// top of the output's own rounding; and the rows of dS sum to zero, so dq / dk are small next to the terms they
// are summed from, which inflates that error relative to the result. 2e-2 leaves headroom over the ~5e-3 seen in
// such kernels while still catching any indexing or masking error (those are O(1) relative to the max).
constexpr double kGradRtol = 2e-2;

std::string describe(const AttentionShape& s) {
  return "B=" + std::to_string(s.B) + " S=" + std::to_string(s.S) + " NH=" + std::to_string(s.NH) +
         " NKV=" + std::to_string(s.NKV) + " D=" + std::to_string(s.D);
}

float default_scale(const AttentionShape& s) { return static_cast<float>(1.0 / std::sqrt(double(s.D))); }

size_t q_size(const AttentionShape& s) { return size_t(s.B * s.S * s.NH * s.D); }
size_t kv_size(const AttentionShape& s) { return size_t(s.B * s.S * s.NKV * s.D); }
size_t lse_size(const AttentionShape& s) { return size_t(s.B * s.NH * s.S); }

std::vector<float> round_bf16(std::vector<float> x) {
  for (float& e : x) e = bf16_to_f32(f32_to_bf16(e));
  return x;
}

// Random bf16 inputs; q spans [-2, 2] so that some rows of the softmax are peaked rather than near uniform.
struct Inputs {
  std::vector<float> q, k, v, d_o;
};
Inputs make_inputs(const AttentionShape& s, uint64_t seed) {
  return {random_bf16(q_size(s), seed, -2.0f, 2.0f), random_bf16(kv_size(s), seed + 1),
          random_bf16(kv_size(s), seed + 2), random_bf16(q_size(s), seed + 3)};
}

// CPU forward: o (fp32) and lse.
void cpu_forward(std::vector<float>& o, std::vector<float>& lse, const Inputs& in, const AttentionShape& s,
                 float scale) {
  o.assign(q_size(s), 0.0f);
  lse.assign(lse_size(s), 0.0f);
  cpu::attention_forward<float>(o.data(), lse.data(), in.q.data(), in.k.data(), in.v.data(), s.B, s.S, s.NH, s.NKV, s.D,
                                scale);
}

// The sweep: every S in {1, 17, 128, 300} with every D in {64, 128, 256}, rotating the head layout (4/4, 8/2,
// 16/2) and B (1, 2) so that each S and each D meets every layout and both batch sizes; then D = 48 (a multiple of
// 16, not of 32) and the model's layout (16/2, D = 256) at S = 1000.
std::vector<AttentionShape> sweep() {
  const int64_t heads[3][2] = {{4, 4}, {8, 2}, {16, 2}};
  const int64_t seqs[4] = {1, 17, 128, 300};
  const int64_t dims[3] = {64, 128, 256};
  std::vector<AttentionShape> out;
  for (int di = 0; di < 3; ++di)
    for (int si = 0; si < 4; ++si) {
      const int64_t* h = heads[(di + si) % 3];
      out.push_back({1 + (di + si) % 2, seqs[si], h[0], h[1], dims[di]});
    }
  out.push_back({2, 17, 8, 2, 48});
  out.push_back({1, 1000, 16, 2, 256});
  return out;
}

// Runs the GPU backward into dq / dk / dv, whose buffers are first filled with `prefill`.
struct Grads {
  std::vector<float> dq, dk, dv;
};
Grads gpu_backward(cuda::FusedAttention& attn, const Inputs& in, const std::vector<float>& o_bf16,
                   const std::vector<float>& lse, const AttentionShape& s, float scale, float prefill) {
  DeviceBf16 q(in.q), k(in.k), v(in.v), d_o(in.d_o), o(o_bf16);
  DeviceArray<float> lse_d(lse);
  DeviceBf16 dq(std::vector<float>(q_size(s), prefill)), dk(std::vector<float>(kv_size(s), prefill)),
      dv(std::vector<float>(kv_size(s), prefill));
  attn.backward(dq.get(), dk.get(), dv.get(), d_o.get(), q.get(), k.get(), v.get(), o.get(), lse_d.get(), s, scale);
  return {dq.download(), dk.download(), dv.download()};
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

// Shapes some cuDNN builds have no engine for (a head dim that is not a multiple of 32, a one-token sequence) are
// expected skips naming cuDNN's reason; for every other shape of the sweep (the model's head dims and layouts) "not
// supported" is a failure.
bool may_be_unsupported(const AttentionShape& s) { return s.D % 32 != 0 || s.S == 1; }

#define NEXTRON_SKIP_IF_UNSUPPORTED(s, call)                                                                   \
  do {                                                                                                         \
    try {                                                                                                      \
      call;                                                                                                    \
    } catch (const cuda::AttentionUnsupported& e) {                                                            \
      if (!may_be_unsupported(s)) throw;                                                                       \
      GTEST_SKIP() << "cuDNN " << cudnnGetVersion() << " has no engine for " << describe(s) << " on this GPU " \
                   << "(an expected gap for D % 32 != 0 or S = 1, not a nextron bug): " << e.what();           \
    }                                                                                                          \
  } while (0)

class AttentionSweep : public ::testing::TestWithParam<AttentionShape> {};

TEST_P(AttentionSweep, ForwardMatchesCpu) {
  NEXTRON_REQUIRE_GPU();
  cuda::FusedAttention attn(nullptr);
  const AttentionShape s = GetParam();
  const float scale = default_scale(s);
  const Inputs in = make_inputs(s, 100 + 10 * uint64_t(s.S + s.D + s.NH));
  std::vector<float> o_ref, lse_ref;
  cpu_forward(o_ref, lse_ref, in, s, scale);

  DeviceBf16 q(in.q), k(in.k), v(in.v), o(q_size(s));
  DeviceArray<float> lse(lse_size(s));
  NEXTRON_SKIP_IF_UNSUPPORTED(s, attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), s, scale));
  EXPECT_TRUE(close_to(o.download(), o_ref, kBf16Rtol)) << "o";
  // lse is fp32 from fp32 scores of exact bf16 inputs: only accumulation order and exp/log rounding differ.
  EXPECT_TRUE(close_to(lse.download(), lse_ref, kF32Rtol, 1e-5)) << "lse";
}

// The default (fastest, non-deterministic) backward and, on the same inputs, the deterministic one.
TEST_P(AttentionSweep, BackwardMatchesCpu) {
  NEXTRON_REQUIRE_GPU();
  const AttentionShape s = GetParam();
  const float scale = default_scale(s);
  const Inputs in = make_inputs(s, 500 + 10 * uint64_t(s.S + s.D + s.NH));
  std::vector<float> o_ref, lse;
  cpu_forward(o_ref, lse, in, s, scale);
  // Both backwards get the same o: the forward's output rounded to bf16, as the GPU forward stores it.
  const std::vector<float> o = round_bf16(o_ref);

  // The CPU backward accumulates, so into zeroed buffers.
  std::vector<float> dq_ref(q_size(s), 0.0f), dk_ref(kv_size(s), 0.0f), dv_ref(kv_size(s), 0.0f);
  cpu::attention_backward<float>(dq_ref.data(), dk_ref.data(), dv_ref.data(), in.d_o.data(), in.q.data(), in.k.data(),
                                 in.v.data(), o.data(), lse.data(), s.B, s.S, s.NH, s.NKV, s.D, scale);

  for (bool deterministic : {false, true}) {
    SCOPED_TRACE(deterministic ? "deterministic backward" : "default backward");
    cuda::FusedAttention attn(nullptr, {.deterministic_backward = deterministic});
    Grads g;
    NEXTRON_SKIP_IF_UNSUPPORTED(s, g = gpu_backward(attn, in, o, lse, s, scale, 0.0f));
    EXPECT_TRUE(close_to(g.dq, dq_ref, kGradRtol)) << "dq";
    EXPECT_TRUE(close_to(g.dk, dk_ref, kGradRtol)) << "dk";
    EXPECT_TRUE(close_to(g.dv, dv_ref, kGradRtol)) << "dv";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionSweep, ::testing::ValuesIn(sweep()),
                         [](const ::testing::TestParamInfo<AttentionShape>& i) {
                           const AttentionShape& s = i.param;
                           return "B" + std::to_string(s.B) + "_S" + std::to_string(s.S) + "_NH" +
                                  std::to_string(s.NH) + "_NKV" + std::to_string(s.NKV) + "_D" + std::to_string(s.D);
                         });

// The backward overwrites dq / dk / dv (the header's contract; the caller adds where it accumulates), and with
// deterministic_backward (nextron-train --deterministic) two runs agree bit for bit. The model's layout (16/2,
// D = 256), where dk / dv sum over a group of 8 query heads.
TEST(AttentionCuda, DeterministicBackwardOverwritesAndIsReproducible) {
  NEXTRON_REQUIRE_GPU();
  cuda::FusedAttention attn(nullptr, {.deterministic_backward = true});
  const AttentionShape s{2, 300, 16, 2, 256};
  const float scale = default_scale(s);
  const Inputs in = make_inputs(s, 7);
  std::vector<float> o_ref, lse;
  cpu_forward(o_ref, lse, in, s, scale);
  const std::vector<float> o = round_bf16(o_ref);

  const Grads first = gpu_backward(attn, in, o, lse, s, scale, 0.0f);
  const Grads again = gpu_backward(attn, in, o, lse, s, scale, 1000.0f);  // garbage in the gradient buffers
  // An accumulating kernel would be off by 1000 everywhere.
  EXPECT_TRUE(close_to(again.dq, first.dq, kBf16Rtol)) << "dq depends on the buffer's previous contents";
  EXPECT_TRUE(close_to(again.dk, first.dk, kBf16Rtol)) << "dk depends on the buffer's previous contents";
  EXPECT_TRUE(close_to(again.dv, first.dv, kBf16Rtol)) << "dv depends on the buffer's previous contents";
  const char* why =
      " differs between two identical runs: cuDNN's backward was not deterministic (see stderr: did "
      "FusedAttention fall back to the default algorithm for this shape?)";
  EXPECT_TRUE(bitwise_equal(again.dq, first.dq)) << "dq" << why;
  EXPECT_TRUE(bitwise_equal(again.dk, first.dk)) << "dk" << why;
  EXPECT_TRUE(bitwise_equal(again.dv, first.dv)) << "dv" << why;
}

// Graphs are cached per (shape, scale): a second call with the same shape builds nothing and gives the same result;
// a new scale or shape builds one graph; an empty batch builds none. Runs on a non-default stream.
TEST(AttentionCuda, RepeatedShapeBuildsNoNewGraph) {
  NEXTRON_REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  NEXTRON_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    cuda::FusedAttention attn(stream);
    const AttentionShape s{2, 64, 8, 2, 64};
    const float scale = default_scale(s);
    const Inputs in = make_inputs(s, 11);
    DeviceBf16 q(in.q), k(in.k), v(in.v), d_o(in.d_o), o(q_size(s)), dq(q_size(s)), dk(kv_size(s)), dv(kv_size(s));
    DeviceArray<float> lse(lse_size(s));
    EXPECT_EQ(attn.graphs_built(), 0u);

    attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), s, scale);
    attn.backward(dq.get(), dk.get(), dv.get(), d_o.get(), q.get(), k.get(), v.get(), o.get(), lse.get(), s, scale);
    NEXTRON_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_EQ(attn.graphs_built(), 2u);  // one forward, one backward
    const std::vector<float> o1 = o.download(), dq1 = dq.download();

    attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), s, scale);
    attn.backward(dq.get(), dk.get(), dv.get(), d_o.get(), q.get(), k.get(), v.get(), o.get(), lse.get(), s, scale);
    NEXTRON_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_EQ(attn.graphs_built(), 2u) << "a repeated shape built a new graph";
    EXPECT_TRUE(bitwise_equal(o.download(), o1));
    EXPECT_TRUE(bitwise_equal(dq.download(), dq1));

    attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), s, 0.5f * scale);  // another scale
    EXPECT_EQ(attn.graphs_built(), 3u);
    const AttentionShape shorter{2, 32, 8, 2, 64};  // another shape, fits in the same buffers
    attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), shorter, scale);
    EXPECT_EQ(attn.graphs_built(), 4u);
    attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), AttentionShape{0, 64, 8, 2, 64}, scale);  // empty
    EXPECT_EQ(attn.graphs_built(), 4u);
    NEXTRON_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  NEXTRON_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The runtime cuDNN is checked against the headers: another major version is an error naming the fix; an older
// minor only warns. (Host code: runs without a GPU.)
TEST(AttentionVersion, AnotherMajorVersionIsAnErrorNamingTheFix) {
  EXPECT_EQ(cuda::cudnn_version_string(91900), "9.19.0");
  EXPECT_NO_THROW(cuda::check_cudnn_version(91900, 91900));
  EXPECT_NO_THROW(cuda::check_cudnn_version(92001, 91900));
  EXPECT_NO_THROW(cuda::check_cudnn_version(91500, 91900));  // older minor: a warning on stderr
  try {
    cuda::check_cudnn_version(80907, 91900);
    ADD_FAILURE() << "cuDNN 8 accepted by a build against cuDNN 9";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("compiled against cuDNN 9.19.0 but loaded 8.9.7"), std::string::npos) << msg;
    EXPECT_NE(msg.find("LD_LIBRARY_PATH"), std::string::npos) << msg;
  }
}

// Unsupported input fails with a nextron::Error that says what is wrong, not with a cuDNN status code.
TEST(AttentionCuda, UnsupportedInputThrowsClearErrors) {
  NEXTRON_REQUIRE_GPU();
  cuda::FusedAttention attn(nullptr);
  auto message_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };

  // D = 100: not a multiple of 8, which cuDNN's attention needs; the message names the shape and the GPU.
  const AttentionShape odd_d{1, 16, 4, 4, 100};
  DeviceBf16 q(q_size(odd_d)), k(kv_size(odd_d)), v(kv_size(odd_d)), o(q_size(odd_d));
  DeviceArray<float> lse(lse_size(odd_d));
  std::string msg = message_of([&] { attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), odd_d, 0.1f); });
  EXPECT_NE(msg.find("D=100"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cuDNN"), std::string::npos) << msg;
  EXPECT_NE(msg.find(cuda::device_description(0).substr(0, 8)), std::string::npos) << msg;

  // NH not a multiple of NKV.
  const AttentionShape bad_groups{1, 16, 6, 4, 64};
  msg = message_of([&] { attn.forward(o.get(), lse.get(), q.get(), k.get(), v.get(), bad_groups, 0.125f); });
  EXPECT_NE(msg.find("multiple of NKV"), std::string::npos) << msg;

  // A pointer that is not 16-byte aligned (cuDNN's vector loads need it).
  const AttentionShape small{1, 4, 4, 4, 64};
  msg = message_of([&] { attn.forward(o.get() + 1, lse.get(), q.get(), k.get(), v.get(), small, 0.125f); });
  EXPECT_NE(msg.find("16-byte aligned"), std::string::npos) << msg;
  EXPECT_EQ(attn.graphs_built(), 0u);
}

}  // namespace nextron::test

namespace nextron::test {

// Queries that are the last Sq of Sk key positions (a context-parallel slice against the keys gathered up to its end:
// cuDNN's bottom-right causal mask) against the CPU reference's causal_attention_*, forward and backward.
TEST(AttentionCuda, LastQueriesAgainstMoreKeysMatchCpu) {
  NEXTRON_REQUIRE_GPU();
  for (const AttentionShape& s : {AttentionShape{2, 50, 8, 2, 64, 130}, AttentionShape{1, 128, 16, 2, 128, 300}}) {
    SCOPED_TRACE(describe(s) + " Sk=" + std::to_string(s.Sk));
    const float scale = default_scale(s);
    const size_t nq = size_t(s.B * s.S * s.NH * s.D), nkv = size_t(s.B * s.Sk * s.NKV * s.D),
                 nl = size_t(s.B * s.NH * s.S);
    const auto q = random_bf16(nq, 700, -2.0f, 2.0f), k = random_bf16(nkv, 701), v = random_bf16(nkv, 702),
               d_o = random_bf16(nq, 703);
    std::vector<float> o_ref(nq), lse_ref(nl), dq_ref(nq, 0.0f), dk_ref(nkv, 0.0f), dv_ref(nkv, 0.0f);
    cpu::causal_attention_forward<float>(o_ref.data(), lse_ref.data(), q.data(), k.data(), v.data(), s.B, s.S, s.Sk,
                                         s.NH, s.NKV, s.D, scale);
    const std::vector<float> o_bf16 = round_bf16(o_ref);
    cpu::causal_attention_backward<float>(dq_ref.data(), dk_ref.data(), dv_ref.data(), d_o.data(), q.data(), k.data(),
                                          v.data(), o_bf16.data(), lse_ref.data(), s.B, s.S, s.Sk, s.NH, s.NKV, s.D,
                                          scale);
    cuda::FusedAttention attn(nullptr);
    DeviceBf16 qd(q), kd(k), vd(v), od(nq), dod(d_o), ob(o_bf16), dq(nq), dk(nkv), dv(nkv);
    DeviceArray<float> lse(nl), lse_in(lse_ref);
    attn.forward(od.get(), lse.get(), qd.get(), kd.get(), vd.get(), s, scale);
    EXPECT_TRUE(close_to(od.download(), o_ref, kBf16Rtol)) << "o";
    EXPECT_TRUE(close_to(lse.download(), lse_ref, kF32Rtol, 1e-5)) << "lse";
    attn.backward(dq.get(), dk.get(), dv.get(), dod.get(), qd.get(), kd.get(), vd.get(), ob.get(), lse_in.get(), s,
                  scale);
    EXPECT_TRUE(close_to(dq.download(), dq_ref, kGradRtol)) << "dq";
    EXPECT_TRUE(close_to(dk.download(), dk_ref, kGradRtol)) << "dk";
    EXPECT_TRUE(close_to(dv.download(), dv_ref, kGradRtol)) << "dv";
  }
}

}  // namespace nextron::test
