// Context parallelism (comm/context_parallel.h) as real MPI ranks: the world is one CP group; each rank holds an
// uneven slice of the same random sequences (contiguous order) or its two zigzag chunks (chunks c and 2CP-1-c). 1. The
// delta rule's state passing alone: every rank's outputs and gradients equal the whole sequence's on one process (the
// chunked kernel, fp32), and the bytes each rank sends per layer equal the formula and do not depend on the sequence
// length. 2. The whole GatedDeltaNet layer of the tiny model (projections, the conv with its halo, gates, the delta
// rule, the gated norm) and the gated attention layer (RoPE at the slice's positions, the keys and values all-gathered,
// bottom-right causal attention, their gradients reduce-scattered): outputs, input gradients and, summed over the
// ranks, parameter gradients equal the one-process layer's on the whole sequence, and the bytes each rank sends forward
// and backward equal their formula (the DeltaNet layer's independent of the slice length, at two sequence lengths).
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "comm/context_parallel.h"
#include "comm/counting_communicator.h"
#include "kernels/cpu/delta_state_scan.h"
#include "kernels/cpu_ops.h"
#include "model/attention.h"
#include "model/gated_deltanet.h"
#include "model/init.h"
#include "model/param_table.h"
#include "mpi_fixture.h"
#include "tiny_model.h"

namespace nextron::test {
namespace {

using cpu::GdrShape;
using Vec = std::vector<float>;

Vec randn(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  Vec v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// The rows of `segments` of every sequence of x (B, S, width), one after the other: (B, sum of lengths, width).
Vec local_rows(const Vec& x, int64_t B, int64_t S, int64_t width, const std::vector<CpSegment>& segments) {
  int64_t Sl = 0;
  for (const CpSegment& g : segments) Sl += g.length;
  Vec out(static_cast<size_t>(B * Sl * width));
  for (int64_t b = 0; b < B; ++b)
    for (const CpSegment& g : segments)
      std::copy_n(x.begin() + (b * S + g.global_begin) * width, g.length * width,
                  out.begin() + (b * Sl + g.local_begin) * width);
  return out;
}

// Slice c of S tokens over n ranks, deliberately uneven and not multiples of the 64-token chunk: rank c gets
// base + (c % 3) - 1 tokens (the last rank the rest).
std::pair<int64_t, int64_t> slice_of(int64_t S, int n, int c) {
  const int64_t base = S / n;
  int64_t at = 0;
  for (int i = 0; i < c; ++i) at += base + (i % 3) - 1;
  const int64_t len = c + 1 == n ? S - at : base + (c % 3) - 1;
  return {at, len};
}

// This rank's segments of S tokens: an uneven slice (slice_of) in contiguous order, else its two zigzag chunks.
std::vector<CpSegment> segments_for(CpOrder order, int64_t S, int n, int r) {
  if (order == CpOrder::zigzag) return cp_segments(order, n, r, S / n);
  const auto [at, len] = slice_of(S, n, r);
  return {CpSegment{r, 0, at, len}};
}

void expect_close(const Vec& got, const Vec& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  float err = 0, ref = 1;
  for (size_t i = 0; i < got.size(); ++i) {
    err = std::max(err, std::abs(got[i] - want[i]));
    ref = std::max(ref, std::abs(want[i]));
  }
  // fp32: the slices' chunk boundaries and the state products change the summation order only.
  EXPECT_LE(err, 2e-5f * ref) << what;
}

// Runs one DeltaNet core over S tokens split across the world; checks against the whole sequence and returns the
// bytes this rank sent. The rank's segments run as items (B G sequences of L tokens), as the layer runs them.
double run_case(Communicator& comm, const GdrShape& whole, uint64_t seed, CpOrder order) {
  CountingCommunicator counting(comm);
  const ContextParallel cp(&counting, nullptr, order);
  const int n = cp.size(), r = cp.rank();
  const GdrShape& s = whole;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dk));
  Vec q = randn(s.B * s.S * s.Hk * s.dk, seed), k = randn(s.B * s.S * s.Hk * s.dk, seed + 1),
      v = randn(s.B * s.S * s.Hv * s.dv, seed + 2), g = randn(s.B * s.S * s.Hv, seed + 3),
      beta = randn(s.B * s.S * s.Hv, seed + 4), d_o = randn(s.B * s.S * s.Hv * s.dv, seed + 5);
  for (Vec* x : {&q, &k})
    for (size_t row = 0; row < x->size(); row += static_cast<size_t>(s.dk)) {
      float n2 = 0;
      for (int64_t i = 0; i < s.dk; ++i) n2 += (*x)[row + i] * (*x)[row + i];
      for (int64_t i = 0; i < s.dk; ++i) (*x)[row + i] /= std::sqrt(n2 + 1e-6f);
    }
  for (float& x : g) x = -std::log1p(std::exp(x));
  for (float& x : beta) x = 1.0f / (1.0f + std::exp(-x));

  // The whole sequence on this process.
  Vec o(v.size()), dq(q.size(), 0), dk(k.size(), 0), dv(v.size(), 0), dg(g.size(), 0), db(g.size(), 0);
  cpu::gated_delta_rule_chunked_forward<float>(o.data(), nullptr, q.data(), k.data(), v.data(), g.data(), beta.data(),
                                               nullptr, s, scale);
  cpu::gated_delta_rule_chunked_backward<float>(dq.data(), dk.data(), dv.data(), dg.data(), db.data(), nullptr,
                                                d_o.data(), nullptr, q.data(), k.data(), v.data(), g.data(),
                                                beta.data(), nullptr, s, scale);

  // This rank's segments, as items.
  const std::vector<CpSegment> segs = segments_for(order, s.S, n, r);
  const int64_t G = static_cast<int64_t>(segs.size()), L = segs[0].length;
  const GdrShape ls{s.B * G, L, s.Hk, s.Hv, s.dk, s.dv};
  auto mine = [&](const Vec& x, int64_t width) { return local_rows(x, s.B, s.S, width, segs); };
  const Vec lq = mine(q, s.Hk * s.dk), lk = mine(k, s.Hk * s.dk), lv = mine(v, s.Hv * s.dv), lg = mine(g, s.Hv),
            lb = mine(beta, s.Hv), ldo = mine(d_o, s.Hv * s.dv);
  const int64_t mb = ls.B * s.Hv * s.dk * s.dk, sb = ls.B * s.Hv * s.dk * s.dv;
  Vec lo(lv.size()), local_final(static_cast<size_t>(sb)), m(static_cast<size_t>(mb)),
      gathered_m(static_cast<size_t>(cp.chunks() * s.B * s.Hv * s.dk * s.dk)), state_in(static_cast<size_t>(sb));
  counting.volume()->reset();
  cpu::gated_delta_rule_chunked_forward<float>(lo.data(), local_final.data(), lq.data(), lk.data(), lv.data(),
                                               lg.data(), lb.data(), nullptr, ls, scale);
  cpu::slice_transition<float>(m.data(), lk.data(), lg.data(), lb.data(), ls);
  cp.delta_states_forward(m.data(), local_final.data(), gathered_m.data(), state_in.data(), s.B, s.Hv, s.dk, s.dv);
  cpu::gated_delta_rule_chunked_forward<float>(lo.data(), nullptr, lq.data(), lk.data(), lv.data(), lg.data(),
                                               lb.data(), state_in.data(), ls, scale);
  expect_close(lo, mine(o, s.Hv * s.dv), "outputs");

  Vec t1(lq.size(), 0), t2(lk.size(), 0), t3(lv.size(), 0), t4(lg.size(), 0), t5(lb.size(), 0);
  Vec local_in_grad(static_cast<size_t>(sb), 0), final_grad(static_cast<size_t>(sb));
  cpu::gated_delta_rule_chunked_backward<float>(t1.data(), t2.data(), t3.data(), t4.data(), t5.data(),
                                                local_in_grad.data(), ldo.data(), nullptr, lq.data(), lk.data(),
                                                lv.data(), lg.data(), lb.data(), state_in.data(), ls, scale);
  cp.delta_states_backward(gathered_m.data(), local_in_grad.data(), final_grad.data(), s.B, s.Hv, s.dk, s.dv);
  Vec gq(lq.size(), 0), gk(lk.size(), 0), gv(lv.size(), 0), gg(lg.size(), 0), gb(lb.size(), 0);
  cpu::gated_delta_rule_chunked_backward<float>(gq.data(), gk.data(), gv.data(), gg.data(), gb.data(), nullptr,
                                                ldo.data(), final_grad.data(), lq.data(), lk.data(), lv.data(),
                                                lg.data(), lb.data(), state_in.data(), ls, scale);
  expect_close(gq, mine(dq, s.Hk * s.dk), "dq");
  expect_close(gk, mine(dk, s.Hk * s.dk), "dk");
  expect_close(gv, mine(dv, s.Hv * s.dv), "dv");
  expect_close(gg, mine(dg, s.Hv), "dg");
  expect_close(gb, mine(db, s.Hv), "dbeta");
  return counting.volume()->total_bytes();
}

TEST_F(Mpi, ContextParallelDeltaNetEqualsTheWholeSequence) {
  const int n = world_size();
  for (const CpOrder order : {CpOrder::contiguous, CpOrder::zigzag}) {
    SCOPED_TRACE(cp_order_name(order));
    // Bytes per layer: forward all-gather of [M | L] of every segment, backward all-gather of its dS_in (ring
    // accounting, fp32).
    const double G = order == CpOrder::zigzag && n > 1 ? 2 : 1;
    auto formula = [&](const GdrShape& s) {
      return 4.0 * G * (n - 1) * (s.B * s.Hv * s.dk * (s.dk + s.dv) + s.B * s.Hv * s.dk * s.dv);
    };
    // Zigzag needs 2 n equal chunks: the lengths rounded down to a multiple of 2 n.
    const int64_t unit = order == CpOrder::zigzag ? 2 * n : 1;
    const GdrShape shorter{2, 256 / unit * unit, 2, 4, 16, 8}, longer{2, 2048 / unit * unit, 2, 4, 16, 8};
    const double bytes_short = run_case(*comm_, shorter, 7, order), bytes_long = run_case(*comm_, longer, 8, order);
    EXPECT_DOUBLE_EQ(bytes_short, formula(shorter));
    EXPECT_DOUBLE_EQ(bytes_long, bytes_short) << "the state passing's traffic must not depend on the sequence length";
  }
  // Hk == Hv and odd slice lengths at every world size (contiguous), zigzag chunks of 39 tokens.
  run_case(*comm_, GdrShape{1, 301, 3, 3, 8, 8}, 9, CpOrder::contiguous);
  run_case(*comm_, GdrShape{1, 78 * n, 3, 3, 8, 8}, 10, CpOrder::zigzag);
}

// One GatedDeltaNet layer (layer 0 of the tiny model) on B sequences of S tokens: this rank's slice of the outputs and
// of the input gradient, and the parameter gradients (summed over the world when split).
struct LayerRun {
  Vec y, dx, grads;
  CommVolume forward, backward;  // what this rank sent in the layer's forward and backward (split runs)
};

// This rank's segments: equal slices (`even`: attention's all-gather needs them) or uneven ones (slice_of) in
// contiguous order; the two zigzag chunks otherwise.
std::vector<CpSegment> layer_segments(CpOrder order, bool even, int64_t S, int n, int r) {
  if (order == CpOrder::contiguous && even) return cp_segments(order, n, r, S / n);
  return segments_for(order, S, n, r);
}

template <typename Layer>
LayerRun run_layer(Communicator* comm, const char* prefix, int64_t B, int64_t S, bool recompute_core, bool split,
                   bool even, CpOrder order) {
  const ModelConfig config = ModelConfig::from_json(nlohmann::json::parse(kTinyConfig));
  const ParamTable table(config);
  FlatBuffers flat;
  flat.params = Tensor::zeros({table.total_numel()});
  flat.grads = Tensor::zeros({table.total_numel()});
  flat.params_act = flat.params;
  init_parameters(table, flat.params.f32(), 5, 0.2);
  CpuOps ops;
  Layer layer(config, ModuleWeights(table, flat, prefix), ops);
  layer.set_recompute_core(recompute_core);
  CountingCommunicator counting(*comm);
  const ContextParallel cp(&counting, nullptr, order);
  if (split) layer.set_context_parallel(&cp);
  const int64_t H = config.hidden_size;
  const Vec x = randn(B * S * H, 31), dy = randn(B * S * H, 32);
  const std::vector<CpSegment> segs =
      split ? layer_segments(order, even, S, cp.size(), cp.rank()) : std::vector<CpSegment>{CpSegment{0, 0, 0, S}};
  const int64_t len = segs.back().local_begin + segs.back().length;
  Tensor xs = Tensor::zeros({B, len, H}), ys = Tensor::zeros({B, len, H}), dys = Tensor::zeros({B, len, H}),
         dxs = Tensor::zeros({B, len, H});
  const Vec xl = local_rows(x, B, S, H, segs), dyl = local_rows(dy, B, S, H, segs);
  std::copy(xl.begin(), xl.end(), xs.f32());
  std::copy(dyl.begin(), dyl.end(), dys.f32());
  typename Layer::Saved saved;
  layer.forward(saved, xs, ys, B, len);
  const CommVolume forward = *counting.volume();
  counting.volume()->reset();
  layer.backward(saved, dys, dxs);
  LayerRun out{Vec(ys.f32(), ys.f32() + ys.numel()), Vec(dxs.f32(), dxs.f32() + dxs.numel()),
               Vec(flat.grads.f32(), flat.grads.f32() + flat.grads.numel()), forward, *counting.volume()};
  if (split) comm->all_reduce_sum(out.grads.data(), static_cast<int64_t>(out.grads.size()));
  return out;
}

// The bytes this rank sends per layer forward and backward (CountingCommunicator accounting, fp32), from the tiny
// model's dimensions: the attention's keys and values all-gathered, their gradients reduce-scattered; the DeltaNet
// conv halo point to point (every chunk's last rows forward to the next chunk's owner, their gradient back) and the
// state exchange.
struct LayerBytes {
  double forward, backward;
};

LayerBytes attention_bytes(CpOrder /*either: the same all-gather*/, int n, int /*r*/, int64_t B, int64_t Sl) {
  const double kv = double(B) * Sl * kTinyKvHeads * kTinyHeadDim * 4;
  return {2 * (n - 1) * kv, 2 * (n - 1) * kv};
}

LayerBytes deltanet_bytes(CpOrder order, int n, int r, int64_t B, int64_t /*Sl: the bytes do not depend on it*/) {
  const ModelConfig c = ModelConfig::from_json(nlohmann::json::parse(kTinyConfig));
  const double halo = double(B) * (c.linear_conv_kernel_dim - 1) * c.conv_dim() * 4;
  const double Hv = c.linear_num_value_heads, dk = c.linear_key_head_dim, dv = c.linear_value_head_dim;
  // Halo messages: contiguous, rank r's slice to r + 1 forward and r - 1 backward. Zigzag, rank r's chunks r and
  // 2n-1-r: chunk r's rows go to chunk r + 1's owner r + 1 (none for r = n - 1, whose chunk n is its own) and chunk
  // 2n-1-r's to chunk 2n-r's owner r - 1 (none for r = 0: its chunk ends the sequence); backward the mirror, so
  // each way (r > 0) + (r < n - 1).
  const double G = order == CpOrder::zigzag ? 2 : 1;
  const int fwd = order == CpOrder::zigzag ? (r > 0) + (r + 1 < n) : (r + 1 < n);
  const int bwd = order == CpOrder::zigzag ? (r > 0) + (r + 1 < n) : (r > 0);
  return {fwd * halo + G * (n - 1) * B * Hv * dk * (dk + dv) * 4, bwd * halo + G * (n - 1) * B * Hv * dk * dv * 4};
}

template <typename Layer>
void check_layer(Communicator* comm, const char* prefix, int64_t S, bool even, CpOrder order,
                 LayerBytes (*bytes)(CpOrder order, int n, int r, int64_t B, int64_t Sl)) {
  const int n = world_size(), r = world_rank();
  for (const bool recompute : {false, true}) {
    SCOPED_TRACE("S " + std::to_string(S) + " " + cp_order_name(order) + (recompute ? " recompute core" : ""));
    const int64_t B = 2, H = kTinyHidden;
    const LayerRun whole = run_layer<Layer>(comm, prefix, B, S, recompute, /*split=*/false, even, order);
    const LayerRun part = run_layer<Layer>(comm, prefix, B, S, recompute, /*split=*/true, even, order);
    const std::vector<CpSegment> segs = layer_segments(order, even, S, n, r);
    expect_close(part.y, local_rows(whole.y, B, S, H, segs), "layer output");
    expect_close(part.dx, local_rows(whole.dx, B, S, H, segs), "input gradient");
    expect_close(part.grads, whole.grads, "parameter gradients (summed over the CP ranks)");
    const LayerBytes want = bytes(order, n, r, B, segs.back().local_begin + segs.back().length);
    EXPECT_DOUBLE_EQ(part.forward.total_bytes(), want.forward) << part.forward.describe();
    EXPECT_DOUBLE_EQ(part.backward.total_bytes(), want.backward) << part.backward.describe();
  }
}

TEST_F(Mpi, ContextParallelGatedDeltaNetLayerEqualsTheWholeSequence) {
  // Contiguous: slices of 7 .. 130 tokens, uneven, across chunk boundaries. Zigzag: chunks of 3 tokens (the shortest
  // the conv's left context allows) and of 65.
  for (const int64_t S : {61, 130})
    check_layer<GatedDeltaNet>(comm_.get(), "layers.0.linear_attn.", S, false, CpOrder::contiguous, deltanet_bytes);
  for (const int64_t S : {6 * world_size(), 130 * world_size()})
    check_layer<GatedDeltaNet>(comm_.get(), "layers.0.linear_attn.", S, false, CpOrder::zigzag, deltanet_bytes);
}

TEST_F(Mpi, ContextParallelAttentionLayerEqualsTheWholeSequence) {
  // Equal slices (the keys' all-gather needs them) of 5 .. 120 tokens; RoPE at the slices' positions. Zigzag: chunks
  // of 5 and 60 tokens, RoPE at both chunks' positions.
  for (const int64_t S : {40, 120})
    check_layer<GatedAttention>(comm_.get(), "layers.1.self_attn.", S, true, CpOrder::contiguous, attention_bytes);
  for (const int64_t S : {10 * world_size(), 120 * world_size()})
    check_layer<GatedAttention>(comm_.get(), "layers.1.self_attn.", S, true, CpOrder::zigzag, attention_bytes);
}

}  // namespace
}  // namespace nextron::test
