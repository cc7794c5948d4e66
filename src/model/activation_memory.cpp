#include "model/activation_memory.h"

#include <algorithm>
#include <set>
#include <utility>

#include "kernels/ops.h"
#include "model/model.h"

namespace nextron {

namespace {

constexpr int64_t kF32 = 4, kI32 = 4, kI64 = 8;

// The routed experts' dispatch and expert-ordered buffers of one MoE state (kernels/cpu_ops.cpp CpuMoeState,
// kernels/cuda/cuda_ops.cpp CudaMoeState), for NK = N K slots.
int64_t moe_state_bytes(Device device, int64_t NK, int64_t E, int64_t H, int64_t I, bool recompute_act) {
  if (device == Device::cuda) {
    const int64_t a = 2;  // bf16
    return (E + 1) * kI64 * 2 /* offsets: device and host */ + NK * kI32 * 2 /* slot_token, slot_of */ +
           kI32 /* bad-index flag */ + NK * (H + 2 * I + (recompute_act ? 0 : I) + H) * a;
  }
  return (E + 1) * kI64 + NK * (kI64 + kI32 + kI64) /* slot_token, slot_k, slot_of */ + E * kI32 /* active */ +
         NK * (H + 2 * I + (recompute_act ? 0 : I) + H) * kF32;
}

// Of moe_state_bytes, what is host memory: all of the CPU state (std::vectors), the CUDA state's host offsets.
int64_t moe_state_host_bytes(Device device, int64_t state_bytes, int64_t E) {
  return device == Device::cuda ? (E + 1) * kI64 : state_bytes;
}

// One decoder layer's record, in the parts full recomputation's scratch shares between layers of different kinds:
// what every layer keeps (norms, residual), the mixer's, the MLP's, and how much of the total is host memory.
struct LayerRecord {
  int64_t common = 0, mixer = 0, mlp = 0;
  int64_t mixer_host = 0, mlp_host = 0;  // host vectors in them (CP transitions; the CPU MoE state, the plan)
  int64_t total() const { return common + mixer + mlp; }
};

// The delta rule's kept intermediates (GatedDeltaNet Saved::gdr_saved / Scratch::rc_saved): the backend's size for
// the items it runs (under context parallelism each of a sequence's G segments on this rank is one).
int64_t delta_rule_saved_bytes(const ModelConfig& c, const ActivationShape& shape) {
  const int64_t G = shape.cp > 1 && shape.cp_order == CpOrder::zigzag ? 2 : 1;
  return kF32 * gated_delta_rule_saved_elements(shape.device, shape.B * G, shape.S / G, c.linear_num_key_heads,
                                                c.linear_num_value_heads, c.linear_key_head_dim,
                                                c.linear_value_head_dim);
}

LayerRecord layer_record(const ModelConfig& c, int64_t layer, int64_t N, int64_t Nl, bool sp, int64_t a, Device device,
                         const RecomputeOptions& r, const ActivationShape& shape) {
  const int64_t H = c.hidden_size;
  LayerRecord out;
  int64_t& common = out.common;
  common = 2 * Nl * kF32 + Nl * H * a;                                                         // rstd1, rstd2, x_mid
  if (!r.recomputes_module("layernorm")) common += 2 * Nl * H * a + (sp ? 2 * N * H * a : 0);  // h1, h2 (+ gathers)
  const bool core = r.recomputes_module("core_attn");
  int64_t& mixer = out.mixer;
  if (c.layer_types[layer] == MixerType::full_attention) {
    const int64_t NH = c.num_attention_heads, NKV = c.num_key_value_heads, D = c.head_dim;
    mixer += N * NH * 2 * D * a                          // qg
             + 3 * N * NH * D * a                        // q_raw, q, og
             + 3 * N * NKV * D * a                       // k_raw, k, v
             + N * (NH + NKV) * kF32;                    // q_rstd, k_rstd
    if (!core) mixer += N * NH * D * a + N * NH * kF32;  // o, lse
    if (shape.cp > 1) {
      // k_full, v_full: the chunks up to this rank's last.
      const CpSegment last =
          cp_segments(shape.cp_order, static_cast<int>(shape.cp), static_cast<int>(shape.cp_rank), shape.S).back();
      const int64_t gathered = (last.chunk + 1) * last.length * shape.B;
      mixer += 2 * gathered * NKV * D * a;
    }
  } else {
    const int64_t Hv = c.linear_num_value_heads, KD = c.key_dim(), VD = c.value_dim(), CD = c.conv_dim();
    mixer += N * CD * a                               // mixed (the conv input)
             + 3 * N * VD * a                         // z, v, on
             + 2 * N * Hv * a                         // b, a
             + 2 * N * KD * a                         // q, k
             + 3 * N * Hv * kF32;                     // beta, g, o_rstd
    if (!core) mixer += 2 * N * KD * a + N * VD * a;  // qn, kn, o
    if (!core && !r.recomputes_module("delta_rule_states")) mixer += delta_rule_saved_bytes(c, shape);  // gdr_saved
    if (shape.cp > 1) {
      const int64_t dk = c.linear_key_head_dim, dv = c.linear_value_head_dim,
                    G = shape.cp_order == CpOrder::zigzag ? 2 : 1;
      const int64_t gathered_m = G * shape.cp * shape.B * Hv * dk * dk * kF32;  // per chunk, host
      mixer += (N + G * shape.B * (c.linear_conv_kernel_dim - 1)) * CD * a  // mixed_ext: each segment behind its halo
               + G * shape.B * Hv * dk * dv * kF32                          // state_in, per segment
               + gathered_m;
      out.mixer_host += gathered_m;
    }
  }
  int64_t& mlp = out.mlp;
  if (c.mlp_type(layer) == MlpType::dense) {
    if (!r.recomputes_module("mlp")) mlp += 3 * N * c.intermediate_size * a;  // gu, h
    return out;
  }
  if (r.recomputes_module("moe")) return out;
  const int64_t E = c.num_experts, K = c.num_experts_per_tok, Is = c.shared_expert_intermediate_size;
  // The router and the routed experts see all N region rows, or this rank's Nl when the experts are folded (the
  // dispatcher then serves them even at EP 1 only with a capacity factor).
  const int64_t Nr = c.experts_folded ? Nl : N;
  const bool dispatched = c.expert_parallel_size > 1 || c.expert_capacity_factor > 0;
  mlp += Nr * E * kF32 + Nr * K * (kF32 + kI32);  // probs, topw, topi
  const bool act = r.recomputes_module("moe_act");
  if (dispatched) {
    // The dispatcher's record (model/moe_dispatcher.h): where each slot went, the returned expert outputs, the plan
    // (dropless: with a capacity factor fewer rows are kept, and padding to capacity sends more);
    // and the local experts' state over the R rows received, R = N K under balanced routing (each rank receives as
    // many rows as it sends, exact with --moe-router-force-load-balancing).
    const int64_t NK = Nr * K, R = NK, P = c.expert_parallel_size;
    mlp += NK * kI32 + (NK + 1) * H * a + R * (kF32 + kI32) + 2 * P * kI64;  // + the zero row of dropped slots
    const int64_t state = moe_state_bytes(device, R, c.num_local_experts(), H, c.moe_intermediate_size, act);
    mlp += state;
    out.mlp_host += 2 * P * kI64 + moe_state_host_bytes(device, state, c.num_local_experts());
  } else {
    const int64_t state = moe_state_bytes(device, Nr * K, E, H, c.moe_intermediate_size, act);
    mlp += state;
    out.mlp_host += moe_state_host_bytes(device, state, E);
  }
  if (Is > 0) {
    mlp += N * a;                                                                   // the shared expert's gate logit
    if (!r.recomputes_module("shared_experts")) mlp += 3 * N * Is * a + N * H * a;  // gu, h, its output
  }
  return out;
}

}  // namespace

int64_t ActivationBytes::total() const {
  int64_t t = io + head;
  for (int64_t b : layers) t += b;
  return t;
}

ActivationBytes activation_record_bytes(const ModelConfig& c, const StageRange& stage, const ActivationShape& shape,
                                        const RecomputeOptions& recompute) {
  const bool sp = shape.sequence_parallel && shape.tp > 1;
  const int64_t N = shape.B * shape.S, Nl = sp ? N / shape.tp : N, H = c.hidden_size, E = c.num_experts;
  const int64_t a = shape.device == Device::cuda ? 2 : 4;
  const int64_t L = stage.num_layers(c);
  ActivationBytes out;
  out.layers.assign(static_cast<size_t>(L), 0);
  // The layer inputs kept: the stage's input, then each layer's output, but inside a fully recomputed group only
  // the group's output (its layers' records and inner outputs live in the model's scratch).
  int64_t hidden = 1;
  for (const RecomputeGroup& g : recompute_groups(recompute, L)) {
    if (g.recompute) {
      ++hidden;
      continue;
    }
    hidden += g.end - g.begin;
    for (int64_t i = g.begin; i < g.end; ++i) {
      const LayerRecord r = layer_record(c, stage.layer_begin + i, N, Nl, sp, a, shape.device, recompute, shape);
      out.layers[i] = r.total();
      out.host += r.mixer_host + r.mlp_host;
    }
  }
  out.io = hidden * Nl * H * a;
  if (stage.first)
    out.io += N * kI64 + 2 * std::max<int64_t>(E, 1) * kF32;  // ids; router statistics (reset)
  else if (E > 0)
    out.io += 2 * E * kF32;                                 // the router statistics received with the activations
  if (shape.pipeline && !stage.last) out.io += Nl * H * a;  // d_output
  if (stage.last)
    out.head = Nl * H * a + Nl * kF32 + (sp ? N * H * a : 0)  // final_h, its rstd (and gather)
               + N * c.vocab_size * a                         // logits (this rank's padded vocabulary slice)
               + 2 * N * kF32                                 // row_loss, lse
               + 2 * N * kI64;                                // targets on the device and on the host
  if (stage.last) out.host += N * kI64;
  return out;
}

int64_t ScratchBytes::total() const {
  int64_t t = model + transient;
  for (int64_t b : layers) t += b;
  return t;
}

namespace {

// One decoder layer's buffers outside its records (model/decoder.h, attention.h, gated_deltanet.h, mlp.h, moe.h,
// moe_dispatcher.h: the members named in comments), at their steady-state sizes after one forward and backward:
// `own`, the layer's alone (index and RoPE tables), and `shared`, its kind's DecoderLayer::Scratch, one copy for all
// the stage's layers of the same mixer and MLP.
struct LayerScratchBytes {
  int64_t own = 0, shared = 0;
};
LayerScratchBytes layer_scratch(const ModelConfig& c, int64_t layer, const ActivationShape& shape,
                                const RecomputeOptions& r) {
  const bool tp = shape.tp > 1, sp = shape.sequence_parallel && tp, cp = shape.cp > 1;
  const int64_t B = shape.B, S = shape.S, N = B * S, Nl = sp ? N / shape.tp : N, H = c.hidden_size;
  const int64_t a = shape.device == Device::cuda ? 2 : 4;
  const Device device = shape.device;
  const bool moe = c.mlp_type(layer) == MlpType::sparse_moe, folded = moe && c.experts_folded && tp;
  const bool norm = r.recomputes_module("layernorm"), core = r.recomputes_module("core_attn");
  const bool rerun_mlp = r.recomputes_module(moe ? "moe" : "mlp");
  // Context parallelism: G segments of L tokens per sequence; the last one's gathered context.
  const int64_t G = cp && shape.cp_order == CpOrder::zigzag ? 2 : 1, L = S / G;
  const std::vector<CpSegment> segments =
      cp ? cp_segments(shape.cp_order, static_cast<int>(shape.cp), static_cast<int>(shape.cp_rank), S)
         : std::vector<CpSegment>{CpSegment{0, 0, 0, S}};
  int64_t bytes = 0, own = 0;
  // DecoderLayer: the branch outputs (N, H) and their local rows, the rerun norms, the backward's gradients.
  bytes += 2 * N * H * a + (tp ? 2 * Nl * H * a : 0);                        // mix_region_, mlp_region_ (mix_, mlp_)
  if (folded) bytes += Nl * H * a + Nl * H * a;                              // routed_, dh2_routed_
  if (norm) bytes += 2 * Nl * H * a + (sp ? 2 * N * H * a : 0) + Nl * kF32;  // rc_h1_, rc_h2_ (+ gathers), rc_rstd_
  if (sp) bytes += N * H * a;                                                // dregion_full_
  bytes += 2 * N * H * a + Nl * H * a;                                       // dh1_, dh2_, dx_mid_
  if (tp) bytes += 2 * Nl * H * a + (sp ? Nl * H * a : 0);                   // dh1_local_, dh2_local_ (dscratch_)
  if (moe && (tp || folded)) bytes += N * H * a;                             // dh2_replicated_
  if (rerun_mlp) {
    // The MLP block's record in this layer's scratch (rc_dense_ / rc_moe_, its tensors only) and its output.
    const LayerRecord rec = layer_record(c, layer, N, Nl, sp, a, device, RecomputeOptions{}, shape);
    bytes += rec.mlp - rec.mlp_host + N * H * a;  // + rc_mlp_region_
    if (moe) bytes += 2 * c.num_experts * kF32;   // rc_aux_
  }
  if (c.layer_types[layer] == MixerType::full_attention) {
    const int64_t NH = c.num_attention_heads, NKV = c.num_key_value_heads, D = c.head_dim, R = c.rotary_dim();
    const CpSegment& last = segments.back();
    own += 2 * NH * D * kI32;                                 // q_cols_, gate_cols_
    own += 2 * (last.global_begin + last.length) * R * kF32;  // cos_, sin_ up to the last position held
    if (G > 1) bytes += 2 * S * R * kF32;                     // seg_cos_, seg_sin_
    if (core) bytes += N * NH * D * a + N * NH * kF32;        // rc_o_, rc_lse_
    bytes +=
        7 * N * NH * D * a + 4 * N * NKV * D * a;  // dog_, dqg_ (2), do_, dq_, dqn_, dq_raw_; dk_, dv_, dkn_, dk_raw_
    if (cp) {
      const int64_t Sk = (last.chunk + 1) * L;
      bytes += 2 * B * Sk * NKV * D * a;  // dk_full_, dv_full_
      if (G > 1) {
        // The zigzag's segment-major queries, outputs and their gradients, and the first segment's keys and values
        // and their gradients (its causal context: the chunks up to its own).
        const int64_t Sk0 = (segments.front().chunk + 1) * L;
        bytes += 4 * N * NH * D * a + 4 * B * Sk0 * NKV * D * a;
      }
    }
  } else {
    const int64_t Hv = c.linear_num_value_heads, KD = c.key_dim(), VD = c.value_dim(), CD = c.conv_dim(),
                  dk = c.linear_key_head_dim, dv = c.linear_value_head_dim;
    own += CD * kI32;  // the q / k / v column tables
    // The projections and the conv write the record's tensors; only under CP does the conv run on plain rows
    // (conv_) whose gradient (dconv_) is gathered from / scattered to the split q | k | v.
    if (cp) bytes += 2 * N * CD * a;                 // conv_, dconv_
    if (core) bytes += 2 * N * KD * a + N * VD * a;  // rc_qn_, rc_kn_, rc_o_
    if (core && !r.recomputes_module("delta_rule_states")) bytes += delta_rule_saved_bytes(c, shape);  // rc_saved_
    bytes += 3 * N * VD * a + 2 * N * KD * a + 2 * N * CD * a  // don_, do_, dz_; dqn_, dkn_; dqkv_, dmixed_
             + 2 * N * Hv * kF32 + 2 * N * Hv * a;             // dbeta_, dg_; db_, da_
    if (cp) {
      const int64_t Bi = B * G, ext = Bi * (L + c.linear_conv_kernel_dim - 1) * CD * a,
                    state = Bi * Hv * dk * dv * kF32;
      bytes += 3 * ext;                                                    // conv_ext_, dconv_ext_, dmixed_ext_
      bytes += 2 * state + Bi * Hv * dk * dk * kF32;                       // cp_final_, cp_din_, cp_m_
      if (a != kF32) bytes += (c.linear_conv_kernel_dim - 1) * CD * kF32;  // host_f32_: the halo rows' staging
      const bool only_last = G == 1 && shape.cp_rank + 1 == shape.cp;
      if (!only_last)  // the backward's first pass into discarded gradients, and the incoming final-state gradient
        bytes += 2 * N * KD * a + N * VD * a + 2 * N * Hv * kF32 + state;
    }
  }
  if (!moe) return {own, bytes + 3 * N * c.intermediate_size * a};  // dh_, dgu_
  const int64_t E = c.num_experts, K = c.num_experts_per_tok, Is = c.shared_expert_intermediate_size;
  const int64_t Nr = folded ? Nl : N, NK = Nr * K;
  bytes += Nr * E * kF32;                      // logits_
  bytes += Nr * K * kF32 + 2 * Nr * E * kF32;  // dtopw_, dprobs_, dlogits_
  if (c.expert_parallel_size > 1 || c.expert_capacity_factor > 0) {
    // The dispatcher's buffers, dropless and balanced: every rank sends and receives N K rows.
    const int64_t sent = NK, R = NK;
    bytes += sent * kI32 + sent * H * a + 2 * R * H * a;  // send_token_, send_, received_, expert_out_
    bytes +=
        2 * (sent + 1) * H * a + 2 * R * H * a + R * kF32;  // d_returned_, d_send_, d_expert_out_, d_received_, d_ones_
  }
  if (Is > 0) {
    if (!folded) bytes += N * H * a;                                                 // shared_gated_
    if (r.recomputes_module("shared_experts")) bytes += 3 * N * Is * a + N * H * a;  // rc_shared_, rc_shared_out_
    bytes += N * H * a + N * a + 3 * N * Is * a;  // dshared_, dshared_gate_, the shared MLP's dh_, dgu_
  }
  return {own, bytes};
}

}  // namespace

ScratchBytes scratch_bytes(const ModelConfig& c, const StageRange& stage, const ActivationShape& shape,
                           const RecomputeOptions& recompute, SharedScratchCount* counted) {
  const bool tp = shape.tp > 1, sp = shape.sequence_parallel && tp;
  const int64_t N = shape.B * shape.S, Nl = sp ? N / shape.tp : N, H = c.hidden_size, E = c.num_experts;
  const int64_t a = shape.device == Device::cuda ? 2 : 4;
  const int64_t L = stage.num_layers(c);
  ScratchBytes out;
  // Each layer's own tables, and its kind's shared scratch with the first layer of that kind.
  SharedScratchCount own;
  SharedScratchCount& shared = counted ? *counted : own;
  std::set<std::pair<MixerType, MlpType>>& kinds = shared.kinds;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t l = stage.layer_begin + i;
    const LayerScratchBytes b = layer_scratch(c, l, shape, recompute);
    out.layers.push_back(b.own + (kinds.insert({c.layer_types[l], c.mlp_type(l)}).second ? b.shared : 0));
  }
  // The model's own (model/model.h): the backward's running gradients, the embedding's and the loss's buffers.
  int64_t& m = out.model;
  m += Nl * H * a + (L > 0 ? Nl * H * a : 0);  // dhidden_a_, dhidden_b_
  if (stage.first && tp) m += N * H * a;       // embed_region_
  if (stage.first && sp) m += N * H * a;       // dembed_full_
  if (stage.last) {
    m += N * c.vocab_size * a + N * H * a;  // dlogits_, dfinal_h_
    if (tp)
      m +=
          Nl * H * a + (sp ? Nl * H * a : 0) + (1 + shape.tp) * 3 * N * kF32;  // dfinal_h_local_ (dscratch_), ce_stats_
  }
  // Full recomputation: one group's layer records (the tensors of every layer kind its positions run), its inner
  // layer inputs, its output and the rerun's router statistics, in the pool the rank's chunks share: this stage adds
  // what its groups need beyond what the others already hold.
  size_t widest = 0;
  std::vector<std::vector<int64_t>> positions;  // per position in a group, the layers that run there
  for (const RecomputeGroup& g : recompute_groups(recompute, L)) {
    if (!g.recompute) continue;
    widest = std::max(widest, static_cast<size_t>(g.end - g.begin));
    positions.resize(widest);
    for (int64_t i = g.begin; i < g.end; ++i) positions[static_cast<size_t>(i - g.begin)].push_back(i);
  }
  if (widest > 0) {
    std::vector<std::array<int64_t, 5>>& parts = shared.group_positions;
    if (parts.size() < widest) parts.resize(widest, std::array<int64_t, 5>{});
    for (size_t p = 0; p < widest; ++p) {
      // A Saved reused by layers of different kinds keeps each kind's tensors (its attention, DeltaNet, dense and MoE
      // records are separate members); the norms' and the residual's are shared.
      for (int64_t i : positions[p]) {
        const int64_t l = stage.layer_begin + i;
        const LayerRecord r = layer_record(c, l, N, Nl, sp, a, shape.device, RecomputeOptions{}, shape);
        std::array<int64_t, 5>& part = parts[p];
        part[0] = std::max(part[0], r.common);
        int64_t& mixer = part[c.layer_types[l] == MixerType::full_attention ? 1 : 2];
        int64_t& mlp = part[c.mlp_type(l) == MlpType::sparse_moe ? 4 : 3];
        mixer = std::max(mixer, r.mixer - r.mixer_host);
        mlp = std::max(mlp, r.mlp - r.mlp_host);
      }
    }
    int64_t total = 0;
    for (const std::array<int64_t, 5>& part : parts)
      for (int64_t b : part) total += b;
    total += static_cast<int64_t>(parts.size() - 1) * Nl * H * a + Nl * H * a  // rc_hidden_, rc_out_
             + 2 * std::max<int64_t>(E, 1) * kF32;                             // rc_aux_
    m += total - shared.group_bytes;
    shared.group_bytes = total;
  }
  // The CUDA backend's one buffer for the experts' SwiGLU output of states that recompute it.
  if (shape.device == Device::cuda && recompute.recomputes_module("moe_act") && E > 0)
    m += N * c.num_experts_per_tok * c.moe_intermediate_size * a;
  // Context parallelism: attention's key/value all-gather and reduce-scatter stage all ranks' rows in a buffer that
  // lives for the call only.
  if (shape.cp > 1)
    for (int64_t i = 0; i < L; ++i)
      if (c.layer_types[stage.layer_begin + i] == MixerType::full_attention)
        out.transient = shape.cp * N * c.num_key_value_heads * c.head_dim * a;
  return out;
}

int64_t record_host_bytes(const ModelActivations& a) {
  int64_t bytes = static_cast<int64_t>(a.targets.capacity() * sizeof(int64_t));
  for (const DecoderLayer::Saved& s : a.layers) {
    if (s.moe.experts) bytes += s.moe.experts->host_bytes();
    const AllToAllPlan& plan = s.moe.dispatch.plan;
    bytes += static_cast<int64_t>((plan.send_rows.capacity() + plan.recv_rows.capacity()) * sizeof(int64_t));
    bytes += static_cast<int64_t>(s.deltanet.gathered_m.capacity() * sizeof(float));
  }
  return bytes;
}

}  // namespace nextron
