// Qwen3-Next model configuration, read from an HF config.json (model_type "qwen3_next").
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace nextron {

enum class MixerType { linear_attention, full_attention };
enum class MlpType { dense, sparse_moe };

// The parameter count of a model from its config alone (no table, no allocation), split into the parts a
// too-large model can be blamed on. Computed with checked 64-bit arithmetic: a product that overflows is an Error
// naming the fields of its part.
struct ParamCount {
  struct Part {
    std::string name;    // e.g. "routed experts"
    std::string fields;  // the config fields that size it, e.g. "num_experts x moe_intermediate_size x hidden_size"
    int64_t numel = 0;
  };
  std::vector<Part> parts;
  int64_t total = 0;       // == ParamTable(config).total_numel()
  int64_t hf_tensors = 0;  // HF tensors the table maps (its per-tensor bookkeeping: names, shapes)
  const Part& largest() const;
};

// Per-field upper bounds checked at parse time. Each is far above any released model (the largest value in
// configs/models/ is given for each) so that no real config trips them, yet low enough that an absurd value
// fails at once with the field's name instead of driving the layer plan or the parameter table's bookkeeping
// (one entry per layer, three per expert) into unbounded memory. transformers' Qwen3NextConfig sets no limits.
struct ConfigLimits {
  static constexpr int64_t vocab_size = int64_t{1} << 24;               // 151936 (Qwen); largest public ~262k
  static constexpr int64_t hidden_size = int64_t{1} << 17;              // 2048; largest public ~16k-25k
  static constexpr int64_t intermediate_size = int64_t{1} << 20;        // 5120; also moe_/shared_expert_
  static constexpr int64_t num_hidden_layers = 1024;                    // 48; deepest public ~126
  static constexpr int64_t heads = 4096;                                // 32; attention and DeltaNet heads
  static constexpr int64_t head_dim = int64_t{1} << 14;                 // 256; also linear_{key,value}_head_dim
  static constexpr int64_t linear_conv_kernel_dim = 1024;               // 4
  static constexpr int64_t num_experts = 4096;                          // 512 (qwen3-next-80b-a3b)
  static constexpr int64_t max_position_embeddings = int64_t{1} << 32;  // 262144; not allocated, only bounded
};

struct ModelConfig {
  int64_t vocab_size = 0;
  // Training only (not in config.json): the embedding and lm_head rows the model holds, >= vocab_size (0: exactly
  // vocab_size). Rows from vocab_size on are padding (Megatron's --make-vocab-size-divisible-by): never looked up,
  // initialised to zero, their logits kept out of the softmax, left out of checkpoints and HF exports.
  int64_t padded_vocab_size = 0;
  int64_t padded_vocab() const { return padded_vocab_size > 0 ? padded_vocab_size : vocab_size; }
  int64_t hidden_size = 0;        // H
  int64_t intermediate_size = 0;  // dense MLP width
  int64_t num_hidden_layers = 0;
  double rms_norm_eps = 1e-6;

  // Gated full attention.
  int64_t num_attention_heads = 0;  // NH
  int64_t num_key_value_heads = 0;  // NKV
  int64_t head_dim = 0;             // D
  double rope_theta = 10000.0;
  double partial_rotary_factor = 0.25;
  bool attention_bias = false;
  int64_t max_position_embeddings = 0;

  // Gated DeltaNet.
  int64_t linear_num_key_heads = 0;    // Hk
  int64_t linear_num_value_heads = 0;  // Hv
  int64_t linear_key_head_dim = 0;     // dk
  int64_t linear_value_head_dim = 0;   // dv
  int64_t linear_conv_kernel_dim = 4;  // Kc

  // Mixture of experts.
  int64_t num_experts = 0;  // E (0: every MLP is dense)
  // Training only (not in config.json): the expert-parallel slice this config's model holds: the routed experts
  // [expert_parallel_rank El, +El) of E, El = E / expert_parallel_size (ep_local_config). The router still scores all
  // E.
  int64_t expert_parallel_size = 1, expert_parallel_rank = 0;
  // Training only: Megatron's MoE parallel folding with ETP 1 under TP > 1 (and SP): each routed expert is whole on
  // its rank (not split over TP) and every rank routes its own sequence shard's tokens; the router's gradient and
  // statistics then sum over TP, and the experts reduce over their own data-parallel group (EDP).
  bool experts_folded = false;
  int64_t num_local_experts() const { return num_experts / expert_parallel_size; }           // El
  int64_t first_local_expert() const { return expert_parallel_rank * num_local_experts(); }  // its global index
  // Training only: Megatron's --moe-router-force-load-balancing. The router's scores are computed as usual, but
  // token n's K experts are (n K + k) mod E, their weights the router's probabilities there (renormalised as HF
  // does): every expert gets the same number of rows. For throughput studies, not for training a model.
  bool force_load_balancing = false;
  // Training only: Megatron's token dropping. expert_capacity_factor > 0 (--moe-expert-capacity-factor) caps each
  // expert at ceil(factor x N K / E) of a rank's N K routed slots per micro-batch; the slots over it are dropped (their
  // token keeps its other experts, the shared expert and the residual). Which are kept: the highest routing weights
  // (--moe-token-drop-policy probs, ties to the earlier slot) or the earliest positions (position). pad_to_capacity
  // (--moe-pad-expert-input-to-capacity) fills every expert up to its capacity with zero rows (static shapes).
  double expert_capacity_factor = 0;
  bool drop_by_position = false;
  bool pad_to_capacity = false;
  int64_t num_experts_per_tok = 0;  // K
  int64_t moe_intermediate_size = 0;
  int64_t shared_expert_intermediate_size = 0;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool norm_topk_prob = true;
  double router_aux_loss_coef = 0.001;

  std::vector<MixerType> layer_types;  // one per layer, resolved from layer_types or full_attention_interval
  int64_t full_attention_interval = 4;

  // Derived sizes.
  int64_t rotary_dim() const;  // D * partial_rotary_factor
  int64_t key_dim() const { return linear_num_key_heads * linear_key_head_dim; }
  int64_t value_dim() const { return linear_num_value_heads * linear_value_head_dim; }
  int64_t conv_dim() const { return 2 * key_dim() + value_dim(); }
  MlpType mlp_type(int64_t layer) const;
  int64_t num_moe_layers() const;
  // Needs a resolved layer plan (from_json, or layer_types filled in); validate() calls it.
  ParamCount parameter_count() const;

  // Parse an HF config.json object; throws nextron::Error naming the field for any missing, unknown or
  // unsupported value, or any combination that does not fit (e.g. Hv not a multiple of Hk).
  static ModelConfig from_json(const nlohmann::json& j);
  static ModelConfig from_file(const std::string& path);
  // The HF config.json form (transformers reads it back to the same model).
  nlohmann::json to_json() const;
  // Every check of from_json that does not need the JSON: signs, per-field limits (ConfigLimits), consistency,
  // and a parameter count whose fp32 training buffers (16 bytes per parameter) fit in 64-bit byte sizes.
  void validate() const;
  // Just the per-field limits (and signs of the size fields); from_json runs it before it builds the layer plan.
  void check_size_limits() const;
};

const char* mixer_type_name(MixerType t);

// The config of one tensor-parallel rank's slice of the model: attention heads, DeltaNet key-head groups,
// intermediate sizes and the vocabulary divided by TP; KV heads divided or, below TP, one per rank. A TP rank's model
// is the single-device model of this config. Throws nextron::Error naming a size TP does not divide.
ModelConfig tp_local_config(const ModelConfig& config, int tp);
// The config of expert-parallel rank `ep_rank` of `ep`: the same model holding El = E / EP of the routed experts.
// Throws nextron::Error when EP does not divide E.
ModelConfig ep_local_config(const ModelConfig& config, int ep, int ep_rank);

}  // namespace nextron
