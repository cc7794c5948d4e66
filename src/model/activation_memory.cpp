#include "model/activation_memory.h"

#include <algorithm>

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

int64_t layer_bytes(const ModelConfig& c, int64_t layer, int64_t N, int64_t Nl, bool sp, int64_t a, Device device,
                    const RecomputeOptions& r, const ActivationShape& shape) {
  const int64_t H = c.hidden_size;
  int64_t bytes = 2 * Nl * kF32 + Nl * H * a;                                                 // rstd1, rstd2, x_mid
  if (!r.recomputes_module("layernorm")) bytes += 2 * Nl * H * a + (sp ? 2 * N * H * a : 0);  // h1, h2 (+ gathers)
  const bool core = r.recomputes_module("core_attn");
  if (c.layer_types[layer] == MixerType::full_attention) {
    const int64_t NH = c.num_attention_heads, NKV = c.num_key_value_heads, D = c.head_dim;
    bytes += N * NH * 2 * D * a                          // qg
             + 3 * N * NH * D * a                        // q_raw, q, og
             + 3 * N * NKV * D * a                       // k_raw, k, v
             + N * (NH + NKV) * kF32;                    // q_rstd, k_rstd
    if (!core) bytes += N * NH * D * a + N * NH * kF32;  // o, lse
    if (shape.cp > 1) {
      // k_full, v_full: the chunks up to this rank's last.
      const CpSegment last =
          cp_segments(shape.cp_order, static_cast<int>(shape.cp), static_cast<int>(shape.cp_rank), shape.S).back();
      const int64_t gathered = (last.chunk + 1) * last.length * shape.B;
      bytes += 2 * gathered * NKV * D * a;
    }
  } else {
    const int64_t Hv = c.linear_num_value_heads, KD = c.key_dim(), VD = c.value_dim(), CD = c.conv_dim();
    bytes += N * CD * a                               // mixed (the conv input)
             + 3 * N * VD * a                         // z, v, on
             + 2 * N * Hv * a                         // b, a
             + 2 * N * KD * a                         // q, k
             + 3 * N * Hv * kF32;                     // beta, g, o_rstd
    if (!core) bytes += 2 * N * KD * a + N * VD * a;  // qn, kn, o
    if (shape.cp > 1) {
      const int64_t dk = c.linear_key_head_dim, dv = c.linear_value_head_dim,
                    G = shape.cp_order == CpOrder::zigzag ? 2 : 1;
      bytes += (N + G * shape.B * (c.linear_conv_kernel_dim - 1)) * CD * a  // mixed_ext: each segment behind its halo
               + G * shape.B * Hv * dk * dv * kF32                          // state_in, per segment
               + G * shape.cp * shape.B * Hv * dk * dk * kF32;              // gathered_m (host), per chunk
    }
  }
  if (c.mlp_type(layer) == MlpType::dense) {
    if (!r.recomputes_module("mlp")) bytes += 3 * N * c.intermediate_size * a;  // gu, h
    return bytes;
  }
  if (r.recomputes_module("moe")) return bytes;
  const int64_t E = c.num_experts, K = c.num_experts_per_tok, Is = c.shared_expert_intermediate_size;
  // The router and the routed experts see all N region rows, or this rank's Nl when the experts are folded (the
  // dispatcher then serves them even at EP 1 only with a capacity factor).
  const int64_t Nr = c.experts_folded ? Nl : N;
  const bool dispatched = c.expert_parallel_size > 1 || c.expert_capacity_factor > 0;
  bytes += Nr * E * kF32 + Nr * K * (kF32 + kI32);  // probs, topw, topi
  if (dispatched) {
    // The dispatcher's record (model/moe_dispatcher.h): where each slot went, the returned expert outputs, the plan
    // (dropless: with a capacity factor fewer rows are kept, and padding to capacity sends more);
    // and the local experts' state over the R rows received, R = N K under balanced routing (each rank receives as
    // many rows as it sends, exact with --moe-router-force-load-balancing).
    const int64_t NK = Nr * K, R = NK, P = c.expert_parallel_size;
    bytes += NK * kI32 + (NK + 1) * H * a + R * (kF32 + kI32) + 2 * P * kI64;  // + the zero row of dropped slots
    bytes +=
        moe_state_bytes(device, R, c.num_local_experts(), H, c.moe_intermediate_size, r.recomputes_module("moe_act"));
  } else {
    bytes += moe_state_bytes(device, Nr * K, E, H, c.moe_intermediate_size, r.recomputes_module("moe_act"));
  }
  if (Is > 0) {
    bytes += N * a;                                                                   // the shared expert's gate logit
    if (!r.recomputes_module("shared_experts")) bytes += 3 * N * Is * a + N * H * a;  // gu, h, its output
  }
  return bytes;
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
    for (int64_t i = g.begin; i < g.end; ++i)
      out.layers[i] = layer_bytes(c, stage.layer_begin + i, N, Nl, sp, a, shape.device, recompute, shape);
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
