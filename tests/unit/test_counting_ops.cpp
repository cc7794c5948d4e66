// CountingOps (kernels/counting_ops.h): the decorator is transparent (a model run through it gives the wrapped
// backend's numbers bit for bit), its counts match closed forms on single ops, and the costs of one training step
// of the tiny model on the CPU are pinned: ops launches, host syncs and the HBM bytes of a Gated DeltaNet layer,
// which are what a GPU step pays in latency and bandwidth whatever the CPU's speed. A change that adds a launch,
// a host sync or a tensor round trip through HBM fails here and must update the pinned number on purpose.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/counting_ops.h"
#include "kernels/cpu_ops.h"
#include "model/config.h"
#include "model/flops.h"
#include "model/gated_deltanet.h"
#include "model/init.h"
#include "model/model.h"
#include "model/module.h"
#include "model/param_table.h"
#include "optim/adamw.h"

namespace nextron::test {

namespace {

ModelConfig tiny_config() {
  return ModelConfig::from_file(std::string(NEXTRON_SOURCE_DIR) + "/configs/models/qwen3-next-tiny.json");
}

std::shared_ptr<CountingOps> counting_cpu() { return std::make_shared<CountingOps>(std::make_shared<CpuOps>()); }

Tensor randn_tensor(const Shape& shape, uint64_t seed, float stddev = 1.0f) {
  Tensor t = Tensor::zeros(shape);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = d(rng);
  return t;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.f32(), b.f32(), a.nbytes()) == 0;
}

// A model and its optimizer on one backend, stepping as the trainer's single-process step does: zero the
// gradients, forward with aligned targets (LM + load-balancing loss) whose values are read later (forward_scored),
// backward, the gradient norm (sum_squares, which the trainer always takes for clipping and logging, and which
// resolves the deferred reads; no clipping at this norm), the loss values, and AdamW through the Ops.
struct Trainee {
  static constexpr int64_t B = 2, S = 128;  // two delta-rule chunks of 64 per sequence
  std::unique_ptr<Model> model;
  std::unique_ptr<AdamW> opt;
  std::vector<int64_t> ids, targets;
  ModelActivations acts;
  ScoreReadout readout;
  LossValues loss;

  Trainee(const ModelConfig& config, std::shared_ptr<Ops> ops) {
    model = std::make_unique<Model>(config, ModelComms{}, std::move(ops));
    init_parameters(model->table(), model->params().f32(), 1234);
    model->params_changed();
    AdamWHyper h;
    h.weight_decay = 0.1;
    opt = std::make_unique<AdamW>(model->table(), FlatRange{0, model->table().total_numel()}, h, &model->ops());
    for (int64_t i = 0; i < B * S; ++i) {
      ids.push_back((i * 29 + 5) % config.vocab_size);
      targets.push_back((i * 11 + 4) % config.vocab_size);
    }
  }
  void step() {
    model->zero_grad();
    model->forward_scored(acts, ids.data(), targets.data(), B, S, readout);
    model->backward(acts);
    const double sq = model->ops().sum_squares(model->grads(), {FlatRange{0, model->table().total_numel()}});
    EXPECT_TRUE(std::isfinite(sq));
    EXPECT_EQ(model->ops().pending_reads(), 0);  // the norm's wait resolved the losses' reads
    loss = model->loss_values(readout);
    opt->step(model->params(), model->grads(), 1e-3, &model->params_act());
  }
};

}  // namespace

// The decorator forwards every call unchanged: two training steps through CountingOps over CpuOps give the same
// losses, logits and updated parameters, bit for bit, as the same steps on CpuOps alone. The deferred loss of the
// step (forward_scored, then loss_values after the norm's wait) is the immediate one of forward_targets.
TEST(OpCounts, DecoratorIsTransparent) {
  const ModelConfig config = tiny_config();
  Trainee plain(config, std::make_shared<CpuOps>());
  auto counting = counting_cpu();
  Trainee counted(config, counting);
  Trainee immediate(config, std::make_shared<CpuOps>());
  const LossValues first =
      immediate.model->forward_targets(immediate.ids.data(), immediate.targets.data(), Trainee::B, Trainee::S);
  EXPECT_GT(first.aux_loss, 0.0);
  for (int i = 0; i < 2; ++i) {
    plain.step();
    counted.step();
    if (i == 0) {
      EXPECT_EQ(plain.loss.loss, first.loss);
      EXPECT_EQ(plain.loss.lm_loss, first.lm_loss);
      EXPECT_EQ(plain.loss.aux_loss, first.aux_loss);
      EXPECT_EQ(plain.loss.tokens, first.tokens);
    }
    EXPECT_EQ(plain.loss.loss, counted.loss.loss) << "step " << i;
    EXPECT_EQ(plain.loss.aux_loss, counted.loss.aux_loss) << "step " << i;
    EXPECT_TRUE(same_bits(plain.model->logits(plain.acts), counted.model->logits(counted.acts)))
        << "logits differ at step " << i;
    EXPECT_TRUE(same_bits(plain.model->grads(), counted.model->grads())) << "gradients differ at step " << i;
    EXPECT_TRUE(same_bits(plain.model->params(), counted.model->params())) << "parameters differ at step " << i;
  }
  EXPECT_GT(counting->launches(), 0);
}

// One linear_forward of known shape: exactly 2 N IN OUT FLOPs and (N IN + OUT IN + N OUT) x 2 bytes (x and y
// bf16, the bf16 weight shadow), one launch, no sync; its result is CpuOps' own.
TEST(OpCounts, LinearForwardMatchesClosedForm) {
  const int64_t N = 6, IN = 10, OUT = 7;
  auto ops = counting_cpu();
  CpuOps plain;
  Tensor x = randn_tensor({N, IN}, 1), w = randn_tensor({OUT, IN}, 2), g = Tensor::zeros({OUT, IN});
  const ParamRef p{w, w, g};
  Tensor y = Tensor::zeros({N, OUT}), y_ref = Tensor::zeros({N, OUT});
  ops->linear_forward(y, x, p, nullptr);
  plain.linear_forward(y_ref, x, p, nullptr);
  EXPECT_TRUE(same_bits(y, y_ref));
  const OpCount c = ops->op("linear_forward");
  EXPECT_EQ(c.calls, 1);
  EXPECT_EQ(c.launches, 1);
  EXPECT_EQ(c.host_syncs, 0);
  EXPECT_EQ(c.flops, 2.0 * N * IN * OUT);
  EXPECT_EQ(c.hbm_bytes, (N * IN + OUT * IN + N * OUT) * 2.0);
  // The roofline of a call: max(arithmetic at the peak, bytes at the bandwidth); this one is bandwidth-bound.
  EXPECT_DOUBLE_EQ(c.gpu_s[0], c.hbm_bytes / kRooflineGpus[0].hbm_bw);
  EXPECT_DOUBLE_EQ(c.gpu_s[1], c.hbm_bytes / kRooflineGpus[1].hbm_bw);
  // The backward accumulates dx (read + write), reads dy, x and the shadow, and reads + writes the fp32 gradient.
  Tensor dy = randn_tensor({N, OUT}, 3), dx = Tensor::zeros({N, IN});
  ops->linear_backward(&dx, p, nullptr, dy, x);
  const OpCount b = ops->op("linear_backward");
  EXPECT_EQ(b.flops, 4.0 * N * IN * OUT);
  EXPECT_EQ(b.hbm_bytes, (N * OUT + N * IN + OUT * IN + 2 * N * IN) * 2.0 + OUT * IN * 8.0);
}

// An elementwise add of n elements reads two and writes one bf16 tensor: 3 n 2 bytes, n FLOPs.
// Uploads: a staged one (a step's token ids) does not wait, one above Ops::kStagedUploadBytes (weights at load
// time) does; the bytes arrive either way.
TEST(OpCounts, OnlyLargeUploadsWait) {
  auto ops = counting_cpu();
  Tensor small = Tensor::zeros({16}), large = Tensor::zeros({static_cast<int64_t>(Ops::kStagedUploadBytes / 4) + 1});
  const std::vector<float> host(static_cast<size_t>(large.numel()), 1.0f);
  ops->upload(small, host.data(), small.nbytes());
  EXPECT_EQ(ops->host_syncs(), 0);
  ops->upload(large, host.data(), large.nbytes());
  EXPECT_EQ(ops->host_syncs(), 1);
  EXPECT_EQ(small.f32()[15], 1.0f);
  EXPECT_EQ(large.f32()[large.numel() - 1], 1.0f);
}

TEST(OpCounts, AddMatchesClosedForm) {
  const int64_t n = 1000;
  auto ops = counting_cpu();
  Tensor a = randn_tensor({n}, 4), b = randn_tensor({n}, 5), y = Tensor::zeros({n});
  ops->add(y, a, b);
  const OpCount c = ops->op("add");
  EXPECT_EQ(c.hbm_bytes, 3.0 * n * 2);
  EXPECT_EQ(c.flops, static_cast<double>(n));
  EXPECT_EQ(ops->total().calls, 1);
  EXPECT_EQ(y.f32()[17], a.f32()[17] + b.f32()[17]);
}

// Attention and delta-rule FLOPs agree with model/flops.h, the MFU numerator: attention exactly (causal pairs,
// (S + 1) / 2 mean context); the delta rule forward is flops.h's count plus the triangular solve of each chunk
// ((L - 1) L (L + 1) / 3, which flops.h leaves out), per value head.
TEST(OpCounts, CoreFlopsAgreeWithModelFlops) {
  const int64_t B = 2, S = 128, NH = 4, NKV = 2, D = 32, Hk = 2, Hv = 4, dk = 32, dv = 32;
  auto ops = counting_cpu();
  Tensor q = randn_tensor({B, S, NH, D}, 6), k = randn_tensor({B, S, NKV, D}, 7), v = randn_tensor({B, S, NKV, D}, 8);
  Tensor o = Tensor::zeros({B, S, NH, D}), lse = Tensor::zeros({B, NH, S});
  ops->attention_forward(o, lse, q, k, v, 1.0 / std::sqrt(double(D)));
  EXPECT_DOUBLE_EQ(ops->op("attention_forward").flops, 4.0 * B * NH * D * S * (S + 1) / 2.0);

  Tensor gq = randn_tensor({B, S, Hk, dk}, 9, 0.1f), gk = randn_tensor({B, S, Hk, dk}, 10, 0.1f),
         gv = randn_tensor({B, S, Hv, dv}, 11), g = Tensor::zeros({B, S, Hv}), beta = Tensor::zeros({B, S, Hv}),
         go = Tensor::zeros({B, S, Hv, dv});
  for (int64_t i = 0; i < g.numel(); ++i) {
    g.f32()[i] = -0.1f;
    beta.f32()[i] = 0.5f;
  }
  ops->gated_delta_rule_forward(go, gq, gk, gv, g, beta, 1.0 / std::sqrt(double(dk)), {});
  const double C = 64, per_token_flops_h = 6 * C * dk + 4 * C * dv + 6.0 * dk * dv;
  const double solve_per_chunk = (C - 1) * C * (C + 1) / 3;
  EXPECT_DOUBLE_EQ(ops->op("gated_delta_rule_forward").flops,
                   B * Hv * (S * per_token_flops_h + (S / C) * solve_per_chunk));
  // And flops.h's per-token delta-rule core of a one-DeltaNet-layer model of these heads is the same count.
  ModelConfig c = tiny_config();
  c.num_hidden_layers = 1;
  c.layer_types = {MixerType::linear_attention};
  c.mlp_only_layers.clear();
  c.validate();
  EXPECT_DOUBLE_EQ(model_flops_breakdown(c, S).deltanet_core * B * S, B * Hv * S * per_token_flops_h);
}

// The counts of one steady-state training step of configs/models/qwen3-next-tiny.json (B = 2, S = 128) through
// CountingOps over CpuOps (the counts do not depend on the wrapped backend: the same calls reach CudaOps).
//
// The pinned numbers are CEILINGS: a change may lower them (then lower the pin in the same commit, so the gain is
// kept), never raise them without saying why. Each is checked with EXPECT_LE (the rule) and EXPECT_EQ (so that a
// drop is noticed too and the pin follows it, instead of leaving slack a later regression could hide in).
TEST(OpCounts, TinyTrainingStepLaunchesSyncsAndBytes) {
  const ModelConfig config = tiny_config();
  auto ops = counting_cpu();
  Trainee t(config, ops);
  t.step();  // the first step allocates its buffers and uploads the RoPE tables
  const int64_t first_allocations = ops->allocations();
  ops->reset();
  t.step();
  // A step of a fixed shape allocates nothing after the first (the CUDA backend's cudaMalloc-free steady state).
  EXPECT_GT(first_allocations, 0);
  EXPECT_EQ(ops->allocations(), 0);
  EXPECT_EQ(ops->op("rope_tables").calls, 0);

  // (a) Launches: ops calls that enqueue device work, per step (4 layers: 3 DeltaNet + 1 attention, all MoE), of
  // which 84 are zero fills of accumulating gradients and 2 the deferred reads of the router statistics. History:
  // 324 before the DeltaNet projections' rows were kept per part (4 column gathers and 4 scatters per layer became 2
  // more GEMMs forward and 2 more linear backwards): 312; then the conv writing q | k | v whole (its split output:
  // no 3 gathers, no 3 scatters, one zero fill of dq | dk | dv instead of three, per layer): 288.
  constexpr int64_t kLaunches = 288;
  // (b) Host syncs. No download: the router statistics of the load-balancing loss value are deferred reads
  // (Model::score), as are the loss sum and the input checks of the embedding, the loss and the MoE dispatch.
  // Uploads (the token ids and the targets) go through pinned staging and do not wait. The MoE experts' grouped
  // GEMMs read the per-expert row offsets on the device (CUTLASS; H = 128 and I = 128 take that path). The one
  // wait: the gradient norm, which resolves every deferred read. (Issue #18's bound: at most 2.)
  constexpr int64_t kDownloads = 0, kUploads = 2, kHostSyncs = 1;
  const int64_t launches = ops->launches(), downloads = ops->downloads(), uploads = ops->uploads(),
                syncs = ops->host_syncs();
  std::printf("%s", roofline_table(*ops).c_str());
  EXPECT_LE(launches, kLaunches);
  EXPECT_EQ(launches, kLaunches);
  EXPECT_LE(downloads, kDownloads);
  EXPECT_EQ(downloads, kDownloads);
  EXPECT_LE(uploads, kUploads);
  EXPECT_EQ(uploads, kUploads);
  EXPECT_LE(syncs, kHostSyncs);
  EXPECT_EQ(syncs, kHostSyncs);
}

// HBM bytes of one Gated DeltaNet layer (the mixer: projections, conv, gates, L2 norms, delta rule, gated norm,
// out_proj), forward + backward, in units of one (B, S, Hv, dv) bf16 tensor (the delta rule's output): the
// activation traffic a fused implementation could cut, independent of B and S up to the weight terms. Pinned as a
// ceiling, as above.
TEST(OpCounts, DeltaNetLayerHbmBytes) {
  const ModelConfig config = tiny_config();
  ASSERT_EQ(config.layer_types[0], MixerType::linear_attention);
  auto ops = counting_cpu();
  const ParamTable table(config);
  FlatBuffers flat;
  flat.params = Tensor::zeros({table.total_numel()});
  init_parameters(table, flat.params.f32(), 1234);
  flat.params_act = flat.params;  // the CPU backend's activation dtype is f32: the shadow is the master
  flat.grads = Tensor::zeros({table.total_numel()});
  GatedDeltaNet layer(config, ModuleWeights(table, flat, "layers.0.linear_attn."), *ops);
  const int64_t B = 2, S = 128, H = config.hidden_size, Hv = config.linear_num_value_heads,
                dv = config.linear_value_head_dim;
  const Tensor x = randn_tensor({B * S, H}, 21), dy = randn_tensor({B * S, H}, 22, 1e-2f);
  Tensor y = Tensor::zeros({B * S, H}), dx = Tensor::zeros({B * S, H});
  // One forward and backward after a warm-up (buffers); returns {forward, forward + backward}.
  auto measure = [&](bool recompute_states) {
    layer.set_recompute_states(recompute_states);
    GatedDeltaNet::Saved saved;
    layer.forward(saved, x, y, B, S);
    layer.backward(saved, dy, dx);
    ops->reset();
    layer.forward(saved, x, y, B, S);
    const OpCount fwd = ops->total();
    layer.backward(saved, dy, dx);
    EXPECT_EQ(ops->allocations(), 0);
    return std::make_pair(fwd, ops->total());
  };
  // The delta rule recomputing its intermediates in the backward (--recompute-modules delta_rule_states), then as
  // the layer runs by default, keeping them: the same forward, a backward without the recomputation.
  const auto [fwd_rc, all_rc] = measure(true);
  const auto [fwd, all] = measure(false);
  std::printf("%s", roofline_table(*ops).c_str());
  EXPECT_EQ(fwd.hbm_bytes, fwd_rc.hbm_bytes);
  EXPECT_LT(all.hbm_bytes, all_rc.hbm_bytes);
  EXPECT_LT(all.flops, all_rc.flops);
  const double unit = static_cast<double>(B * S * Hv * dv) * 2.0;
  std::printf(
      "DeltaNet layer (B %lld, S %lld): forward %.0f bytes (%.4f units), forward + backward %.0f bytes "
      "(%.4f units), %lld launches, %lld host syncs\n",
      static_cast<long long>(B), static_cast<long long>(S), fwd.hbm_bytes, fwd.hbm_bytes / unit, all.hbm_bytes,
      all.hbm_bytes / unit, static_cast<long long>(all.launches), static_cast<long long>(all.host_syncs));
  // B S Hv dv x 2 = 65,536 bytes a unit: forward 30.66 units, forward + backward 98.51 units (the weights' share,
  // independent of B S, is the fraction), 33 launches; 105.63 with the delta rule's intermediates recomputed.
  // History (the first three under the cost model before it counted the delta rule's intermediates, I = 3.56 units
  // here, twice in the forward and three times in a recomputing backward, which added 5 I = 17.81 units): 23.53 and
  // 87.82 units before the intermediates were kept for the backward; 31.70 and 100.15 units, 45 launches, before the
  // projections' rows were kept per part (no gathers of q|k|v, z, b, a from the packed projections, no scatters
  // back); 27.55 and 95.85, 41 launches, before the conv wrote q | k | v whole (no gathers of them from its output,
  // no scatters of their gradients).
  constexpr double kForwardBytes = 2009248, kForwardBackwardBytes = 6455936;
  constexpr int64_t kLayerLaunches = 33;
  EXPECT_LE(fwd.hbm_bytes, kForwardBytes);
  EXPECT_EQ(fwd.hbm_bytes, kForwardBytes);
  EXPECT_LE(all.hbm_bytes, kForwardBackwardBytes);
  EXPECT_EQ(all.hbm_bytes, kForwardBackwardBytes);
  EXPECT_LE(all.launches, kLayerLaunches);
  EXPECT_EQ(all.launches, kLayerLaunches);
  EXPECT_EQ(all.host_syncs, 0);  // a whole-sequence DeltaNet layer never waits for the host
}

}  // namespace nextron::test
