// nextron-bench-cuda: GPU benchmarks of the CUDA backend (kernels/cuda/cuda_ops.h), each the building block of a
// comparison that tools/bench_gpu_peers.py makes in the same run against the peer libraries on the same GPU:
//   gemm       the measured bf16 GEMM peak through cuda::Blas (cuBLASLt) on square products: the MFU denominator;
//   gdr        the chunked gated delta rule alone (vs flash-linear-attention's chunk_gated_delta_rule);
//   attention  causal GQA attention alone (vs torch's scaled_dot_product_attention);
//   layers     one decoder layer of each (mixer, MLP) type of --config, forward and forward + backward;
//   step       a full training step (forward, backward, AdamW) of --config: tokens/s and MFU
//              (vs transformers' Qwen3NextForCausalLM + torch.optim.AdamW); with --roofline the model runs on
//              CountingOps over CudaOps and one more step is counted: launches, host syncs, FLOPs, HBM bytes and the
//              H100 / H200 roofline per op (kernels/counting_ops.h);
//   params     the parameter count (total and active) and FLOPs per token of --config; needs no GPU;
//   all        every one of the above, as one JSON object (what the peer script runs).
// Times are CUDA events on CudaOps' stream around each iteration after --warmup untimed ones; we report the
// median (and min) of --iters. Inputs are random; the weights follow model/init.h. FLOPs follow model/flops.h
// (forward + backward = 3 x forward for every component, attention and delta-rule cores included).
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "../apps/cli.h"
#include "core/cuda/check.h"
#include "core/cuda/device.h"
#include "core/error.h"
#include "kernels/counting_ops.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/flops.h"
#include "model/init.h"
#include "model/model.h"
#include "model/module.h"
#include "model/param_table.h"
#include "optim/adamw.h"

namespace po = boost::program_options;
using json = nlohmann::json;
using namespace nextron;

namespace {

struct Options {
  std::string what = "all", config_path;
  int64_t batch = 2, seq = 4096;
  int64_t hk = 16, hv = 32, dk = 128, dv = 128;  // Gated DeltaNet heads (Qwen3-Next)
  int64_t nh = 16, nkv = 2, head_dim = 256;      // gated attention heads (Qwen3-Next)
  int64_t gemm_size = 8192;
  int iters = 20, warmup = 5, step_iters = 10, step_warmup = 3, device = 0;
  double peak_tflops = 0;  // 0: measure (gemm)
  bool json_out = false;
  bool roofline = false;             // step: count one step through CountingOps
  std::string moe_gemm = "cutlass";  // CudaOpsOptions::moe_gemm: cutlass | cublaslt_loop
};

// ------------------------------------------------------------------------------------------------------------
// Timing
// ------------------------------------------------------------------------------------------------------------

struct Timing {
  double median_ms = 0, min_ms = 0;
  json to_json() const { return {{"median_ms", median_ms}, {"min_ms", min_ms}}; }
};

// Runs f `warmup` times, then `iters` times each between two events on `stream`; the events bracket everything f
// enqueues (and any wait on the host inside it, which the GPU sees as idle time inside the interval).
template <typename F>
Timing time_on_stream(cudaStream_t stream, int warmup, int iters, F&& f) {
  cudaEvent_t start, stop;
  NEXTRON_CUDA_CHECK(cudaEventCreate(&start));
  NEXTRON_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < warmup; ++i) f();
  NEXTRON_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    NEXTRON_CUDA_CHECK(cudaEventRecord(start, stream));
    f();
    NEXTRON_CUDA_CHECK(cudaEventRecord(stop, stream));
    NEXTRON_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    NEXTRON_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  NEXTRON_CUDA_CHECK(cudaEventDestroy(start));
  NEXTRON_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  return {n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]), ms.front()};
}

double tflops(double flops, double ms) { return ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0; }

double gpu_mem_used_gib() {
  size_t free_b = 0, total_b = 0;
  NEXTRON_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<double>(total_b - free_b) / (1u << 30);
}

// ------------------------------------------------------------------------------------------------------------
// Random inputs on the device
// ------------------------------------------------------------------------------------------------------------

std::vector<float> randn(int64_t n, uint64_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Rows of `width` scaled to unit L2 norm (the delta rule's q and k arrive normalised).
void l2_normalise_rows(std::vector<float>& v, int64_t width) {
  for (size_t r = 0; r < v.size(); r += width) {
    double s = 0;
    for (int64_t i = 0; i < width; ++i) s += static_cast<double>(v[r + i]) * v[r + i];
    const float inv = static_cast<float>(1.0 / std::sqrt(s + 1e-12));
    for (int64_t i = 0; i < width; ++i) v[r + i] *= inv;
  }
}

// An activation-dtype (bf16) device tensor of `shape` holding `host`.
Tensor& upload_act(Ops& ops, Tensor& t, const Shape& shape, const std::vector<float>& host) {
  NEXTRON_ASSERT(static_cast<int64_t>(host.size()) == shape_numel(shape) && ops.act_dtype() == DType::bf16);
  std::vector<uint16_t> h(host.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(host[i]);
  ops.act(t, shape);
  ops.upload(t, h.data(), h.size() * sizeof(uint16_t));
  return t;
}

Tensor& upload_f32(Ops& ops, Tensor& t, const Shape& shape, const std::vector<float>& host) {
  NEXTRON_ASSERT(static_cast<int64_t>(host.size()) == shape_numel(shape));
  ops.f32(t, shape);
  ops.upload(t, host.data(), host.size() * sizeof(float));
  return t;
}

void require_gpu(const Options& o) {
  const int n = cuda::device_count();
  NEXTRON_CHECK(n > 0, "--what ", o.what,
                " needs a CUDA GPU and none is visible (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it); only "
                "--what params runs without one");
  NEXTRON_CHECK(o.device >= 0 && o.device < n, "--device ", o.device, ": only ", n, " CUDA device(s) visible");
}

ModelConfig load_config(const Options& o) {
  NEXTRON_CHECK(!o.config_path.empty(), "--what ", o.what, " needs --config (an HF config.json of a qwen3_next model)");
  return ModelConfig::from_file(o.config_path);
}

// ------------------------------------------------------------------------------------------------------------
// params: parameter counts and FLOPs (host only)
// ------------------------------------------------------------------------------------------------------------

json bench_params(const ModelConfig& c, int64_t seq) {
  const ParamTable table(c);
  int64_t experts = 0, embed = 0;
  for (const ParamSpec& s : table.specs()) {
    if (s.kind == ParamKind::expert) experts += s.numel();
    if (s.name == "embed_tokens" || s.name == "lm_head") embed += s.numel();
  }
  const int64_t total = table.total_numel();
  // Active per token: every parameter except the routed experts a token does not use (K of E per MoE layer).
  const int64_t active = c.num_experts > 0 ? total - experts + experts / c.num_experts * c.num_experts_per_tok : total;
  const FlopsBreakdown f = model_flops_breakdown(c, seq);
  return {{"total_params", total},
          {"active_params", active},
          {"routed_expert_params", experts},
          {"embedding_and_lm_head_params", embed},
          {"seq_len", seq},
          {"forward_flops_per_token", f.total()},
          {"training_flops_per_token", training_flops_per_token(c, seq)},
          {"forward_flops_breakdown",
           {{"attention_proj", f.attention_proj},
            {"attention_core", f.attention_core},
            {"deltanet_proj", f.deltanet_proj},
            {"deltanet_conv", f.deltanet_conv},
            {"deltanet_core", f.deltanet_core},
            {"dense_mlp", f.dense_mlp},
            {"moe_router", f.moe_router},
            {"moe_experts", f.moe_experts},
            {"moe_shared", f.moe_shared},
            {"lm_head", f.lm_head}}}};
}

// ------------------------------------------------------------------------------------------------------------
// gemm: the bf16 GEMM peak (MFU denominator)
// ------------------------------------------------------------------------------------------------------------

json bench_gemm(CudaOps& ops, const Options& o) {
  const int64_t n = o.gemm_size;
  NEXTRON_CHECK(n >= 256, "--gemm-size must be at least 256, got ", n);
  cuda::Blas blas(ops.stream());
  Tensor a, b, c;
  upload_act(ops, a, {n, n}, randn(n * n, 11));
  upload_act(ops, b, {n, n}, randn(n * n, 12));
  ops.act(c, {n, n});
  const auto* A = static_cast<const cuda::bf16*>(a.raw());
  const auto* B = static_cast<const cuda::bf16*>(b.raw());
  // C = A B^T, the layout of linear_forward (weights (OUT, IN) row-major), bf16 out, fp32 accumulate.
  const Timing t = time_on_stream(ops.stream(), o.warmup, o.iters, [&] {
    blas.gemm(false, true, n, n, n, 1.0f, A, n, B, n, 0.0f, c.raw(), CUDA_R_16BF, n);
  });
  const double flops = 2.0 * static_cast<double>(n) * n * n;
  return {{"m", n},
          {"n", n},
          {"k", n},
          {"time", t.to_json()},
          {"tflops_median", tflops(flops, t.median_ms)},
          {"tflops_best", tflops(flops, t.min_ms)}};
}

// The MFU denominator in FLOP/s: --peak-tflops when given, else the best measured GEMM rate (the conservative
// choice: the fastest our own GEMM path goes on this GPU).
double peak_flops(CudaOps& ops, const Options& o, json& gemm) {
  if (o.peak_tflops > 0) return o.peak_tflops * 1e12;
  if (gemm.is_null()) gemm = bench_gemm(ops, o);
  return gemm["tflops_best"].get<double>() * 1e12;
}

// ------------------------------------------------------------------------------------------------------------
// gdr: the chunked gated delta rule
// ------------------------------------------------------------------------------------------------------------

json bench_gdr(CudaOps& ops, const Options& o) {
  const int64_t B = o.batch, S = o.seq, Hk = o.hk, Hv = o.hv, dk = o.dk, dv = o.dv;
  NEXTRON_CHECK(Hv % Hk == 0, "--hv (", Hv, ") must be a multiple of --hk (", Hk, ")");
  Tensor q, k, v, g, beta, out, d_o, dq, dkk, dvv, dg, dbeta;
  std::vector<float> hq = randn(B * S * Hk * dk, 1), hk = randn(B * S * Hk * dk, 2);
  l2_normalise_rows(hq, dk);
  l2_normalise_rows(hk, dk);
  upload_act(ops, q, {B, S, Hk, dk}, hq);
  upload_act(ops, k, {B, S, Hk, dk}, hk);
  upload_act(ops, v, {B, S, Hv, dv}, randn(B * S * Hv * dv, 3));
  // g = logsigmoid(x), beta = sigmoid(x): the distributions flash-linear-attention's own benchmarks use.
  std::vector<float> hg = randn(B * S * Hv, 4), hb = randn(B * S * Hv, 5);
  for (auto& x : hg) x = -std::log1p(std::exp(-x));
  for (auto& x : hb) x = 1.0f / (1.0f + std::exp(-x));
  upload_f32(ops, g, {B, S, Hv}, hg);
  upload_f32(ops, beta, {B, S, Hv}, hb);
  upload_act(ops, d_o, {B, S, Hv, dv}, randn(B * S * Hv * dv, 6));
  ops.act(out, {B, S, Hv, dv});
  ops.act_zeroed(dq, {B, S, Hk, dk});
  ops.act_zeroed(dkk, {B, S, Hk, dk});
  ops.act_zeroed(dvv, {B, S, Hv, dv});
  ops.f32_zeroed(dg, {B, S, Hv});
  ops.f32_zeroed(dbeta, {B, S, Hv});
  const double scale = 1.0 / std::sqrt(static_cast<double>(dk));
  // As the model trains by default: the forward keeps its intermediates for the backward (GdrStates::save / saved).
  // fla's chunk_gated_delta_rule recomputes them in its backward instead; "fwd_bwd_recomputed" times that way here
  // too (--recompute-modules delta_rule_states).
  Tensor kept;
  ops.f32(kept, {gated_delta_rule_saved_elements(Device::cuda, B, S, Hk, Hv, dk, dv)});
  GdrStates save, saved;
  save.save = &kept;
  saved.saved = &kept;
  auto fwd = [&] { ops.gated_delta_rule_forward(out, q, k, v, g, beta, scale, save); };
  const Timing tf = time_on_stream(ops.stream(), o.warmup, o.iters, fwd);
  // The backward accumulates into the gradients; values stay small over a few dozen iterations.
  const Timing tfb = time_on_stream(ops.stream(), o.warmup, o.iters, [&] {
    fwd();
    ops.gated_delta_rule_backward(dq, dkk, dvv, dg, dbeta, d_o, q, k, v, g, beta, scale, saved);
  });
  const Timing tfb_recomputed = time_on_stream(ops.stream(), o.warmup, o.iters, [&] {
    ops.gated_delta_rule_forward(out, q, k, v, g, beta, scale, {});
    ops.gated_delta_rule_backward(dq, dkk, dvv, dg, dbeta, d_o, q, k, v, g, beta, scale, {});
  });
  const double C = static_cast<double>(std::min(kGdnChunk, S));
  const double fwd_flops =
      static_cast<double>(B * S * Hv) * (6 * C * static_cast<double>(dk) + 4 * C * static_cast<double>(dv) +
                                         6 * static_cast<double>(dk) * static_cast<double>(dv));
  return {{"shape", {{"B", B}, {"S", S}, {"Hk", Hk}, {"Hv", Hv}, {"dk", dk}, {"dv", dv}}},
          {"fwd", tf.to_json()},
          {"fwd_bwd", tfb.to_json()},
          {"fwd_bwd_recomputed", tfb_recomputed.to_json()},
          {"kept_bytes", 4 * kept.numel()},
          {"fwd_tflops", tflops(fwd_flops, tf.median_ms)},
          {"fwd_bwd_tflops", tflops(3 * fwd_flops, tfb.median_ms)}};
}

// ------------------------------------------------------------------------------------------------------------
// attention: causal GQA attention (cuDNN fused)
// ------------------------------------------------------------------------------------------------------------

json bench_attention(CudaOps& ops, const Options& o) {
  const int64_t B = o.batch, S = o.seq, NH = o.nh, NKV = o.nkv, D = o.head_dim;
  NEXTRON_CHECK(NH % NKV == 0, "--nh (", NH, ") must be a multiple of --nkv (", NKV, ")");
  Tensor q, k, v, out, lse, d_o, dq, dkk, dvv;
  upload_act(ops, q, {B, S, NH, D}, randn(B * S * NH * D, 21));
  upload_act(ops, k, {B, S, NKV, D}, randn(B * S * NKV * D, 22));
  upload_act(ops, v, {B, S, NKV, D}, randn(B * S * NKV * D, 23));
  upload_act(ops, d_o, {B, S, NH, D}, randn(B * S * NH * D, 24));
  ops.act(out, {B, S, NH, D});
  ops.f32(lse, {B, NH, S});
  ops.act(dq, {B, S, NH, D});
  ops.act(dkk, {B, S, NKV, D});
  ops.act(dvv, {B, S, NKV, D});
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto fwd = [&] { ops.attention_forward(out, lse, q, k, v, scale); };
  const Timing tf = time_on_stream(ops.stream(), o.warmup, o.iters, fwd);
  const Timing tfb = time_on_stream(ops.stream(), o.warmup, o.iters, [&] {
    fwd();
    ops.attention_backward(dq, dkk, dvv, d_o, q, k, v, out, lse, scale);
  });
  // Q K^T and P V over the mean causal context (S + 1) / 2, as model/flops.h counts them.
  const double fwd_flops = 4.0 * static_cast<double>(B * NH * D) * static_cast<double>(S) * (S + 1) / 2.0;
  return {{"shape", {{"B", B}, {"S", S}, {"NH", NH}, {"NKV", NKV}, {"D", D}}},
          {"fwd", tf.to_json()},
          {"fwd_bwd", tfb.to_json()},
          {"fwd_tflops", tflops(fwd_flops, tf.median_ms)},
          {"fwd_bwd_tflops", tflops(3 * fwd_flops, tfb.median_ms)}};
}

// ------------------------------------------------------------------------------------------------------------
// layers: one decoder layer of each (mixer, MLP) type of the config
// ------------------------------------------------------------------------------------------------------------

json bench_one_layer(CudaOps& ops, const Options& o, const ModelConfig& base, MixerType mixer, MlpType mlp) {
  // A one-layer config of the same sizes whose only layer has the requested types.
  ModelConfig c = base;
  c.num_hidden_layers = 1;
  c.layer_types = {mixer};
  c.decoder_sparse_step = 1;
  c.mlp_only_layers.clear();
  if (mlp == MlpType::dense) c.mlp_only_layers = {0};
  c.vocab_size = 16;  // the embedding and lm_head are not timed: keep them small
  c.validate();
  const int64_t B = o.batch, S = o.seq, N = B * S, H = c.hidden_size;
  const ParamTable table(c);
  FlatBuffers flat;
  {
    std::vector<float> host(table.total_numel());
    init_parameters(table, host.data(), 1234);
    upload_f32(ops, flat.params, {table.total_numel()}, host);
  }
  ops.f32_zeroed(flat.grads, {table.total_numel()});
  ops.act(flat.params_act, {table.total_numel()});
  ops.cast(flat.params_act, flat.params);
  DecoderLayer layer(c, 0, table, flat, ops);
  Tensor x_in, x_out, dx_out, dx_in;
  upload_act(ops, x_in, {N, H}, randn(N * H, 31));
  upload_act(ops, dx_out, {N, H}, randn(N * H, 32, 1e-3f));
  ops.act(x_out, {N, H});
  ops.act_zeroed(dx_in, {N, H});
  MoeAuxStats aux;
  DecoderLayer::Saved saved;
  const float d_aux = static_cast<float>(c.router_aux_loss_coef);
  auto fwd = [&] {
    aux.reset(ops, c.num_experts);
    layer.forward(saved, x_in, x_out, B, S, aux);
  };
  const Timing tf = time_on_stream(ops.stream(), o.warmup, o.iters, fwd);
  const Timing tfb = time_on_stream(ops.stream(), o.warmup, o.iters, [&] {
    fwd();
    layer.backward(saved, dx_out, dx_in, aux, d_aux);
  });
  const FlopsBreakdown f = model_flops_breakdown(c, S);
  const double fwd_flops = (f.total() - f.lm_head) * static_cast<double>(N);
  int64_t layer_params = 0;
  for (const ParamSpec& s : table.specs())
    if (s.name.rfind("layers.", 0) == 0) layer_params += s.numel();
  const std::string name = std::string(mixer_type_name(mixer)) + (mlp == MlpType::dense ? "+dense" : "+moe");
  return {{"layer", name},
          {"params", layer_params},
          {"fwd", tf.to_json()},
          {"fwd_bwd", tfb.to_json()},
          {"tokens_per_s_fwd_bwd", static_cast<double>(N) / (tfb.median_ms * 1e-3)},
          {"fwd_bwd_tflops", tflops(3 * fwd_flops, tfb.median_ms)}};
}

json bench_layers(CudaOps& ops, const Options& o, const ModelConfig& c) {
  json out = json::array();
  bool has_linear = false, has_full = false, has_moe = false, has_dense = false;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    has_linear |= c.layer_types[i] == MixerType::linear_attention;
    has_full |= c.layer_types[i] == MixerType::full_attention;
    has_moe |= c.mlp_type(i) == MlpType::sparse_moe;
    has_dense |= c.mlp_type(i) == MlpType::dense;
  }
  // The MLP types the config uses; a dense variant too when the config defines intermediate_size (transformers'
  // configs always do), so the MoE block can be compared with a dense MLP of the config's width.
  std::vector<MlpType> mlps;
  if (has_moe) mlps.push_back(MlpType::sparse_moe);
  if (has_dense || c.intermediate_size > 0) mlps.push_back(MlpType::dense);
  for (MixerType m : {MixerType::linear_attention, MixerType::full_attention}) {
    if ((m == MixerType::linear_attention && !has_linear) || (m == MixerType::full_attention && !has_full)) continue;
    for (MlpType mlp : mlps) out.push_back(bench_one_layer(ops, o, c, m, mlp));
  }
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// step: a full training step of the model
// ------------------------------------------------------------------------------------------------------------

json bench_step(const std::shared_ptr<CudaOps>& ops, const Options& o, const ModelConfig& c, double peak) {
  const int64_t B = o.batch, S = o.seq, N = B * S;
  // --roofline: the model (and AdamW) call the CUDA backend through the counting decorator (a map update per op
  // call on the host); the timed steps are those of the decorated model.
  const std::shared_ptr<CountingOps> counting = o.roofline ? std::make_shared<CountingOps>(ops) : nullptr;
  Model model(c, {}, counting ? std::shared_ptr<Ops>(counting) : std::shared_ptr<Ops>(ops));
  const int64_t P = model.table().total_numel();
  {
    std::vector<float> host(P);
    init_parameters(model.table(), host.data(), 1234);
    ops->upload(model.params(), host.data(), host.size() * sizeof(float));
    model.params_changed();
  }
  AdamWHyper h;
  h.weight_decay = 0.1;
  AdamW opt(model.table(), {0, P}, h, &model.ops());
  // Samples of S + 1 random tokens: ids = tokens[0, S), targets = tokens[1, S + 1) (the trainer's layout).
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int64_t> tok(0, c.vocab_size - 1);
  std::vector<int64_t> ids(N), targets(N);
  for (int64_t b = 0; b < B; ++b) {
    int64_t next = tok(rng);
    for (int64_t t = 0; t < S; ++t) {
      ids[b * S + t] = next;
      next = tok(rng);
      targets[b * S + t] = next;
    }
  }
  const double lr = 1e-4;
  double loss = 0;
  auto fwd_bwd = [&] {
    model.zero_grad();
    loss = model.forward_targets(ids.data(), targets.data(), B, S).loss;
    model.backward();
  };
  auto optim = [&] { opt.step(model.params(), model.grads(), lr, &model.params_act()); };
  const Timing tfb = time_on_stream(ops->stream(), o.step_warmup, o.step_iters, fwd_bwd);
  const Timing topt = time_on_stream(ops->stream(), o.step_warmup, o.step_iters, optim);
  const Timing tstep = time_on_stream(ops->stream(), o.step_warmup, o.step_iters, [&] {
    fwd_bwd();
    optim();
  });
  const double mem = gpu_mem_used_gib();
  const double tok_s = static_cast<double>(N) / (tstep.median_ms * 1e-3);
  const double tok_s_fb = static_cast<double>(N) / (tfb.median_ms * 1e-3);
  const double train_flops = training_flops_per_token(c, S);
  json out = {{"batch", B},
              {"seq_len", S},
              {"params", P},
              {"fwd_bwd", tfb.to_json()},
              {"adamw", topt.to_json()},
              {"step", tstep.to_json()},
              {"tokens_per_s", tok_s},
              {"tokens_per_s_fwd_bwd", tok_s_fb},
              {"training_flops_per_token", train_flops},
              {"peak_tflops", peak / 1e12},
              {"mfu", model_flops_utilization(tok_s, train_flops, peak)},
              {"mfu_fwd_bwd", model_flops_utilization(tok_s_fb, train_flops, peak)},
              {"loss", loss},
              {"gpu_mem_used_gib", mem}};
  if (counting) {
    counting->reset();
    fwd_bwd();
    optim();
    ops->synchronize();
    const OpCount t = counting->total();
    out["roofline"] = {
        {"launches", t.launches},         {"host_syncs", t.host_syncs},  {"downloads", counting->downloads()},
        {"uploads", counting->uploads()}, {"gflop", t.flops / 1e9},      {"hbm_gb", t.hbm_bytes / 1e9},
        {"h100_ms", 1e3 * t.gpu_s[0]},    {"h200_ms", 1e3 * t.gpu_s[1]}, {"table", roofline_table(*counting)}};
  }
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// Versions (--what versions: the GPU check's device query; works without a GPU)
// ------------------------------------------------------------------------------------------------------------

// CUDA's encoding 13000 -> "13.0"; cuBLAS's 130001 -> "13.0.1"; cuDNN's 91900 -> "9.19.0"; NCCL's 22708 -> "2.27.8".
std::string cuda_version(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }
std::string cublas_version(size_t v) {
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}
std::string nccl_version(int v) {
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}

// The libraries this binary was compiled against and the ones the dynamic loader found, and the visible GPUs.
json library_versions() {
  json v;
  int driver = 0, runtime = 0, nccl = 0;
  v["cuda_driver"] = cudaDriverGetVersion(&driver) == cudaSuccess ? cuda_version(driver) : "none";
  v["cuda_runtime"] = cudaRuntimeGetVersion(&runtime) == cudaSuccess ? cuda_version(runtime) : "?";
  v["cuda_compiled"] = cuda_version(CUDART_VERSION);
  v["cublaslt"] = cublas_version(cublasLtGetVersion());
  v["cublas_compiled"] = cublas_version(CUBLAS_VERSION);
  v["cudnn"] = cublas_version(cudnnGetVersion());
  v["cudnn_compiled"] = cublas_version(CUDNN_VERSION);
  v["nccl"] = ncclGetVersion(&nccl) == ncclSuccess ? nccl_version(nccl) : "?";
  v["nccl_compiled"] = nccl_version(NCCL_VERSION_CODE);
  json gpus = json::array();
  for (int i = 0; i < cuda::device_count(); ++i) gpus.push_back(cuda::device_description(i));
  v["gpus"] = gpus;
  return v;
}

// ------------------------------------------------------------------------------------------------------------
// Reporting
// ------------------------------------------------------------------------------------------------------------

void print_kernel(const char* name, const json& r) {
  std::printf("%-10s %s\n", name, r["shape"].dump().c_str());
  std::printf("  fwd      %9.3f ms  %7.1f TFLOP/s\n", r["fwd"]["median_ms"].get<double>(),
              r["fwd_tflops"].get<double>());
  std::printf("  fwd+bwd  %9.3f ms  %7.1f TFLOP/s\n", r["fwd_bwd"]["median_ms"].get<double>(),
              r["fwd_bwd_tflops"].get<double>());
}

void print_text(const json& all) {
  if (all.contains("device")) std::printf("device     %s\n", all["device"].get<std::string>().c_str());
  if (all.contains("params")) {
    const json& p = all["params"];
    std::printf("params     total %.1f M, active %.1f M (embedding + lm_head %.1f M); training %.3f GFLOP/token\n",
                p["total_params"].get<double>() / 1e6, p["active_params"].get<double>() / 1e6,
                p["embedding_and_lm_head_params"].get<double>() / 1e6,
                p["training_flops_per_token"].get<double>() / 1e9);
  }
  if (all.contains("gemm")) {
    const json& g = all["gemm"];
    std::printf("gemm       bf16 %lld^3: median %.1f TFLOP/s, best %.1f TFLOP/s\n",
                static_cast<long long>(g["m"].get<int64_t>()), g["tflops_median"].get<double>(),
                g["tflops_best"].get<double>());
  }
  if (all.contains("gdr")) print_kernel("gdr", all["gdr"]);
  if (all.contains("attention")) print_kernel("attention", all["attention"]);
  if (all.contains("layers"))
    for (const json& l : all["layers"])
      std::printf("layer      %-24s fwd %8.3f ms  fwd+bwd %8.3f ms  %7.1f TFLOP/s\n",
                  l["layer"].get<std::string>().c_str(), l["fwd"]["median_ms"].get<double>(),
                  l["fwd_bwd"]["median_ms"].get<double>(), l["fwd_bwd_tflops"].get<double>());
  if (all.contains("step")) {
    const json& s = all["step"];
    std::printf(
        "step       B=%lld S=%lld: %.3f ms (fwd+bwd %.3f, adamw %.3f), %.0f tokens/s, MFU %.1f%% of %.1f "
        "TFLOP/s, %.1f GiB\n",
        static_cast<long long>(s["batch"].get<int64_t>()), static_cast<long long>(s["seq_len"].get<int64_t>()),
        s["step"]["median_ms"].get<double>(), s["fwd_bwd"]["median_ms"].get<double>(),
        s["adamw"]["median_ms"].get<double>(), s["tokens_per_s"].get<double>(), 100 * s["mfu"].get<double>(),
        s["peak_tflops"].get<double>(), s["gpu_mem_used_gib"].get<double>());
    if (s.contains("roofline")) std::printf("%s", s["roofline"]["table"].get<std::string>().c_str());
  }
}

int run(int argc, char** argv) {
  Options o;
  po::options_description opts(
      "nextron-bench-cuda: GPU benchmarks of nextron's CUDA backend (see docs/benchmarks.md)\n\n"
      "  --what params                       parameter count and FLOPs of --config (no GPU needed)\n"
      "  --what gemm                         measured bf16 GEMM peak (the MFU denominator)\n"
      "  --what gdr | attention              one kernel, forward and forward+backward\n"
      "  --what layers | step                one decoder layer per type / a full training step of --config\n"
      "  --what all                          all of the above\n"
      "  --what versions                     CUDA, cuBLASLt, cuDNN, NCCL versions (compiled / loaded), "
      "GPUs\n\nOptions");
  opts.add_options()("help,h", "show this help")("what", po::value(&o.what)->default_value(o.what),
                                                 "params|gemm|gdr|attention|layers|step|all|versions")(
      "config", po::value(&o.config_path), "HF config.json of a qwen3_next model (params, layers, step, all)")(
      "batch", po::value(&o.batch)->default_value(o.batch), "sequences (B)")(
      "seq-len", po::value(&o.seq)->default_value(o.seq), "tokens per sequence (S)")(
      "hk", po::value(&o.hk)->default_value(o.hk), "gdr: key heads (Hk)")(
      "hv", po::value(&o.hv)->default_value(o.hv), "gdr: value heads (Hv)")("dk", po::value(&o.dk)->default_value(o.dk),
                                                                            "gdr: key head dim")(
      "dv", po::value(&o.dv)->default_value(o.dv), "gdr: value head dim")("nh", po::value(&o.nh)->default_value(o.nh),
                                                                          "attention: query heads (NH)")(
      "nkv", po::value(&o.nkv)->default_value(o.nkv), "attention: key/value heads (NKV)")(
      "head-dim", po::value(&o.head_dim)->default_value(o.head_dim), "attention: head dim (D)")(
      "gemm-size", po::value(&o.gemm_size)->default_value(o.gemm_size), "gemm: M = N = K")(
      "peak-tflops", po::value(&o.peak_tflops)->default_value(0),
      "MFU denominator in TFLOP/s (0: measure the bf16 GEMM peak)")(
      "iters", po::value(&o.iters)->default_value(o.iters), "timed iterations (kernels, layers, gemm)")(
      "warmup", po::value(&o.warmup)->default_value(o.warmup), "untimed iterations first (kernels, layers, gemm)")(
      "step-iters", po::value(&o.step_iters)->default_value(o.step_iters), "timed training steps")(
      "step-warmup", po::value(&o.step_warmup)->default_value(o.step_warmup), "untimed training steps first")(
      "device", po::value(&o.device)->default_value(o.device), "CUDA device index")(
      "json", po::bool_switch(&o.json_out), "print one JSON object instead of text")(
      "roofline", po::bool_switch(&o.roofline),
      "step: run the model through CountingOps and count one more step (launches, host syncs, FLOPs, HBM bytes, "
      "H100 / H200 roofline per op)")(
      "moe-gemm", po::value(&o.moe_gemm)->default_value(o.moe_gemm),
      "the routed experts' GEMMs: cutlass (one grouped GEMM per product) or cublaslt_loop (one GEMM per expert)");
  po::variables_map vm;
  if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
  const std::vector<std::string> whats = {"params", "gemm", "gdr", "attention", "layers", "step", "all", "versions"};
  NEXTRON_CHECK(std::find(whats.begin(), whats.end(), o.what) != whats.end(), "--what ", o.what,
                " is not one of params, gemm, gdr, attention, layers, step, all, versions");
  if (o.what == "versions") {
    std::printf("%s\n", library_versions().dump(o.json_out ? -1 : 2).c_str());
    return 0;
  }
  NEXTRON_CHECK(o.batch > 0 && o.seq > 0 && o.iters > 0 && o.warmup >= 0 && o.step_iters > 0 && o.step_warmup >= 0,
                "--batch, --seq-len, --iters and --step-iters must be positive; --warmup, --step-warmup >= 0");
  NEXTRON_CHECK(o.hk > 0 && o.hv > 0 && o.dk > 0 && o.dv > 0 && o.nh > 0 && o.nkv > 0 && o.head_dim > 0,
                "head counts and dims must be positive");
  NEXTRON_CHECK(o.moe_gemm == "cutlass" || o.moe_gemm == "cublaslt_loop", "--moe-gemm ", o.moe_gemm,
                " is not cutlass or cublaslt_loop");
  const bool all = o.what == "all";
  json out;
  ModelConfig config;
  const bool needs_config = all || o.what == "params" || o.what == "layers" || o.what == "step";
  if (needs_config) {
    config = load_config(o);
    out["config"] = o.config_path;
    out["params"] = bench_params(config, o.seq);
  }
  if (o.what != "params") {
    require_gpu(o);
    CudaOpsOptions ops_options;
    ops_options.moe_gemm =
        o.moe_gemm == "cutlass" ? CudaOpsOptions::MoeGemm::cutlass : CudaOpsOptions::MoeGemm::cublaslt_loop;
    auto ops = std::make_shared<CudaOps>(o.device, ops_options);
    out["device"] = cuda::device_description(o.device);
    out["moe_gemm"] = o.moe_gemm;
    out["versions"] = library_versions();
    json gemm;
    if (all || o.what == "gemm") gemm = bench_gemm(*ops, o);
    if (all || o.what == "gdr") out["gdr"] = bench_gdr(*ops, o);
    if (all || o.what == "attention") out["attention"] = bench_attention(*ops, o);
    if (all || o.what == "layers") out["layers"] = bench_layers(*ops, o, config);
    if (all || o.what == "step") {
      const double peak = peak_flops(*ops, o, gemm);
      out["step"] = bench_step(ops, o, config, peak);
    }
    if (!gemm.is_null()) out["gemm"] = gemm;
    out["iters"] = o.iters;
    out["warmup"] = o.warmup;
  }
  if (o.json_out)
    std::printf("%s\n", out.dump().c_str());
  else
    print_text(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return nextron::cli::run_main("nextron-bench-cuda", [&] { return run(argc, argv); });
}
