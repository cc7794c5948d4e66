#include "model/flops.h"

#include <algorithm>

#include "core/error.h"

namespace nextron {

double FlopsBreakdown::total() const {
  return attention_proj + attention_core + deltanet_proj + deltanet_conv + deltanet_core + dense_mlp + moe_router +
         moe_experts + moe_shared + lm_head;
}

FlopsBreakdown model_flops_breakdown(const ModelConfig& c, int64_t seq_len) {
  NEXTRON_CHECK(seq_len > 0, "model FLOPs: seq_len must be positive, got ", seq_len, "; pass the training --seq-len");
  NEXTRON_CHECK(static_cast<int64_t>(c.layer_types.size()) == c.num_hidden_layers, "model FLOPs: the config has ",
                c.layer_types.size(), " layer_types for ", c.num_hidden_layers,
                " layers; build it with ModelConfig::from_json so the layer plan is resolved");
  // Every term below is per token; a matmul in -> out costs 2 * in * out.
  const auto matmul = [](int64_t in, int64_t out) { return 2.0 * static_cast<double>(in) * static_cast<double>(out); };
  const int64_t H = c.hidden_size;
  FlopsBreakdown f;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    if (c.layer_types[i] == MixerType::full_attention) {
      const int64_t NH = c.num_attention_heads, NKV = c.num_key_value_heads, D = c.head_dim;
      f.attention_proj += matmul(H, NH * 2 * D) + 2 * matmul(H, NKV * D) + matmul(NH * D, H);
      // Q K^T and P V: 2 * D per (query, key) pair each, over the (seq_len + 1) / 2 keys a query sees on average.
      const double context = (static_cast<double>(seq_len) + 1.0) / 2.0;
      f.attention_core += 2.0 * 2.0 * static_cast<double>(D * NH) * context;
    } else {
      const double C = static_cast<double>(std::min(kGdnChunk, seq_len));
      const double dk = static_cast<double>(c.linear_key_head_dim), dv = static_cast<double>(c.linear_value_head_dim);
      f.deltanet_proj += matmul(H, 2 * c.key_dim() + 2 * c.value_dim()) + matmul(H, 2 * c.linear_num_value_heads) +
                         matmul(c.value_dim(), H);
      f.deltanet_conv += 2.0 * static_cast<double>(c.linear_conv_kernel_dim * c.conv_dim());
      // Per value head: K K^T, Q K^T, W = T (beta e^G K) (6 C dk); U = T (beta V), (Q K^T .* Gamma) Vn (4 C dv);
      // W S, (Q e^G) S, the state update K^T Vn (6 dk dv).
      f.deltanet_core += static_cast<double>(c.linear_num_value_heads) * (6 * C * dk + 4 * C * dv + 6 * dk * dv);
    }
    if (c.mlp_type(i) == MlpType::dense) {
      f.dense_mlp += 3 * matmul(H, c.intermediate_size);  // gate, up, down
    } else {
      f.moe_router += matmul(H, c.num_experts);
      f.moe_experts += static_cast<double>(c.num_experts_per_tok) * 3 * matmul(H, c.moe_intermediate_size);
      if (c.shared_expert_intermediate_size > 0) {
        f.moe_shared += 3 * matmul(H, c.shared_expert_intermediate_size) + matmul(H, 1);
      }
    }
  }
  f.lm_head = matmul(H, c.vocab_size);
  return f;
}

double model_flops_per_token(const ModelConfig& config, int64_t seq_len) {
  return model_flops_breakdown(config, seq_len).total();
}

double training_flops_per_token(const ModelConfig& config, int64_t seq_len) {
  return 3.0 * model_flops_per_token(config, seq_len);
}

double model_flops_utilization(double tokens_per_s, double training_flops_per_token, double peak_flops) {
  NEXTRON_CHECK(peak_flops > 0, "MFU: the peak FLOP/s must be positive, got ", peak_flops,
                "; pass --peak-tflops or let the trainer measure the CPU GEMM rate");
  return tokens_per_s * training_flops_per_token / peak_flops;
}

}  // namespace nextron
