// Model FLOPs of a Qwen3-Next model per trained token: the numerator of MFU (docs/mfu.md has the derivation).
//
// Counted (forward pass, per token, a multiply-add = 2 FLOPs):
// - every matmul as 2 * in * out: attention q_proj (query and gate halves, H -> 2 * NH * D), k_proj, v_proj,
//   o_proj; DeltaNet in_proj_qkvz, in_proj_ba, out_proj; the dense SwiGLU MLP (3 matmuls); the MoE router
//   (H -> E), only the K active routed experts (3 matmuls of moe_intermediate_size each), the shared expert
//   (3 matmuls) and its gate (H -> 1); the lm_head (H -> vocab);
// - causal attention: scores Q K^T and the weighted sum over V, 2 * 2 * D * NH * (seq_len + 1) / 2 per token
//   (the average causal context of a sequence of seq_len tokens is (seq_len + 1) / 2);
// - the chunked gated delta rule, per value head per token 6 C dk + 4 C dv + 6 dk dv with C = min(64, seq_len);
// - the DeltaNet depthwise causal conv, 2 * Kc per channel (conv_dim channels).
// Not counted: elementwise ops (activations, gates, RoPE, softmax, decays), norms, the embedding lookup, the
// loss, biases, and the triangular solve inside a DeltaNet chunk (about 2 C^2 / 3 per token per value head: 1.5%
// of the chunk cost at C = 64, dk = dv = 128).
//
// Training = forward + backward, the backward costing twice the forward (a gradient for the input and one for
// the weights of every matmul): training_flops_per_token = 3 x forward. Activation recomputation is not counted
// (it is not useful work), so the MFU of a run that recomputes is lower than its hardware utilization.
#pragma once

#include <cstdint>

#include "model/config.h"

namespace nextron {

// Chunk length of the chunked gated delta rule (src/kernels/cpu/gated_delta_rule).
inline constexpr int64_t kGdnChunk = 64;

// Forward FLOPs per token split by component, summed over all layers.
struct FlopsBreakdown {
  double attention_proj = 0;  // q (with gate), k, v, o projections of the full-attention layers
  double attention_core = 0;  // causal Q K^T and (softmax) V
  double deltanet_proj = 0;   // in_proj_qkvz, in_proj_ba, out_proj
  double deltanet_conv = 0;   // depthwise causal conv1d
  double deltanet_core = 0;   // chunked gated delta rule
  double dense_mlp = 0;       // dense SwiGLU MLP layers
  double moe_router = 0;      // router logits
  double moe_experts = 0;     // the top-k active routed experts
  double moe_shared = 0;      // shared expert and its sigmoid gate
  double lm_head = 0;
  double total() const;
};

// Forward FLOPs per token of a sequence of seq_len tokens (seq_len > 0), by component.
FlopsBreakdown model_flops_breakdown(const ModelConfig& config, int64_t seq_len);

// Forward FLOPs per token: model_flops_breakdown(config, seq_len).total().
double model_flops_per_token(const ModelConfig& config, int64_t seq_len);

// Training (forward + backward) FLOPs per token: 3 x model_flops_per_token.
double training_flops_per_token(const ModelConfig& config, int64_t seq_len);

// Model FLOPs utilization: achieved model FLOP/s over the peak, as a fraction (0.25 = 25%).
// tokens_per_s counts trained tokens (all positions of every sequence), peak_flops is in FLOP/s (> 0).
double model_flops_utilization(double tokens_per_s, double training_flops_per_token, double peak_flops);

}  // namespace nextron
