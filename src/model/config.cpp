#include "model/config.h"

#include <algorithm>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <set>

#include "core/error.h"

namespace nextron {

namespace {

using nlohmann::json;

// Keys of HF config.json files that do not change the math of training (generation, serving and bookkeeping
// settings). They are accepted and ignored; every other unknown key is an error so that nothing a user sets is
// silently dropped.
const std::set<std::string> kIgnoredKeys = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "output_router_logits", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "problem_type", "id2label", "label2id", "task_specific_params", "finetuning_task", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "cross_attention_hidden_size", "max_window_layers",
    "sliding_window",  // only meaningful with use_sliding_window, which must be false
    // Multi-token-prediction head of the released checkpoint: transformers ignores it, and so do we.
    "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings"};

struct Reader {
  const json& j;
  std::set<std::string> used;

  const json* find(const std::string& key) {
    used.insert(key);
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return nullptr;
    return &*it;
  }
  int64_t integer(const std::string& key, const int64_t* fallback = nullptr) {
    const json* v = find(key);
    if (!v) {
      NEXTRON_CHECK(fallback, "config.json: required field '", key, "' is missing");
      return *fallback;
    }
    NEXTRON_CHECK(v->is_number_integer(), "config.json: field '", key, "' must be an integer, got ", v->dump());
    return v->get<int64_t>();
  }
  double number(const std::string& key, double fallback) {
    const json* v = find(key);
    if (!v) return fallback;
    NEXTRON_CHECK(v->is_number(), "config.json: field '", key, "' must be a number, got ", v->dump());
    return v->get<double>();
  }
  bool boolean(const std::string& key, bool fallback) {
    const json* v = find(key);
    if (!v) return fallback;
    NEXTRON_CHECK(v->is_boolean(), "config.json: field '", key, "' must be true or false, got ", v->dump());
    return v->get<bool>();
  }
};

void check_positive(int64_t v, const char* field) {
  NEXTRON_CHECK(v > 0, "config.json: field '", field, "' must be positive, got ", v);
}

// lo is 1 for fields every model needs and 0 for those a model may leave unset (dense-only, attention-only).
void check_range(int64_t v, int64_t lo, int64_t hi, const char* field) {
  if (lo > 0) check_positive(v, field);
  NEXTRON_CHECK(v >= lo, "config.json: field '", field, "' must not be negative, got ", v);
  NEXTRON_CHECK(v <= hi, "config.json: field '", field, "' is ", v, ", above nextron's limit of ", hi,
                " for it (released Qwen3-Next models are far below it; a value this large cannot be trained and would "
                "only exhaust memory)");
}

// Accumulates one part of ParamCount; every product and sum is checked so that an overflow names the fields.
struct PartCounter {
  ParamCount::Part part;
  int64_t tensors = 0;

  int64_t mul(std::initializer_list<int64_t> factors) const {
    int64_t r = 1;
    for (int64_t f : factors) NEXTRON_CHECK(!__builtin_mul_overflow(r, f, &r), overflow_message());
    return r;
  }
  int64_t sum(std::initializer_list<int64_t> terms) const {
    int64_t r = 0;
    for (int64_t t : terms) NEXTRON_CHECK(!__builtin_add_overflow(r, t, &r), overflow_message());
    return r;
  }
  // Adds `layers` layers of `per_layer` parameters and `per_layer_tensors` HF tensors each.
  void add(int64_t per_layer, int64_t per_layer_tensors, int64_t layers) {
    part.numel = sum({part.numel, mul({per_layer, layers})});
    tensors = sum({tensors, mul({per_layer_tensors, layers})});
  }
  std::string overflow_message() const {
    return "config.json: the parameter count of the " + part.name + " (" + part.fields +
           ") overflows a 64-bit integer; these fields are far too large for any machine";
  }
};

}  // namespace

const char* mixer_type_name(MixerType t) {
  return t == MixerType::full_attention ? "full_attention" : "linear_attention";
}

int64_t ModelConfig::rotary_dim() const {
  return static_cast<int64_t>(static_cast<double>(head_dim) * partial_rotary_factor);
}

const ParamCount::Part& ParamCount::largest() const {
  NEXTRON_ASSERT(!parts.empty());
  return *std::max_element(parts.begin(), parts.end(), [](const Part& a, const Part& b) { return a.numel < b.numel; });
}

MlpType ModelConfig::mlp_type(int64_t layer) const {
  const bool mlp_only = std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end();
  if (num_experts > 0 && (layer + 1) % decoder_sparse_step == 0 && !mlp_only) return MlpType::sparse_moe;
  return MlpType::dense;
}

int64_t ModelConfig::num_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) n += mlp_type(i) == MlpType::sparse_moe;
  return n;
}

ModelConfig ModelConfig::from_json(const json& j) {
  NEXTRON_CHECK(j.is_object(), "config.json: expected a JSON object");
  Reader r{j, {}};
  ModelConfig c;
  {
    const json* mt = r.find("model_type");
    NEXTRON_CHECK(mt && mt->is_string() && mt->get<std::string>() == "qwen3_next",
                  "config.json: field 'model_type' must be \"qwen3_next\", got ", mt ? mt->dump() : "nothing");
  }
  const int64_t zero = 0, one = 1, four = 4;
  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size", &zero);
  c.num_hidden_layers = r.integer("num_hidden_layers");
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  c.num_attention_heads = r.integer("num_attention_heads");
  c.num_key_value_heads = r.integer("num_key_value_heads", &c.num_attention_heads);
  {
    const json* hd = r.find("head_dim");
    check_positive(c.num_attention_heads, "num_attention_heads");
    c.head_dim = hd ? r.integer("head_dim") : c.hidden_size / c.num_attention_heads;
  }
  c.attention_bias = r.boolean("attention_bias", false);
  const int64_t default_max_pos = 32768;
  c.max_position_embeddings = r.integer("max_position_embeddings", &default_max_pos);

  // RoPE: released configs put rope_theta / partial_rotary_factor at top level; transformers v5 writes them
  // inside rope_parameters. Read both; when both are present they must agree.
  c.rope_theta = r.number("rope_theta", 10000.0);
  c.partial_rotary_factor = r.number("partial_rotary_factor", 0.25);
  if (const json* rp = r.find("rope_parameters")) {
    NEXTRON_CHECK(rp->is_object(), "config.json: field 'rope_parameters' must be an object");
    for (auto it = rp->begin(); it != rp->end(); ++it) {
      const std::string& k = it.key();
      if (k == "rope_type") {
        NEXTRON_CHECK(it->is_string() && it->get<std::string>() == "default", "config.json: rope_parameters.rope_type ",
                      it->dump(), " is not supported (only \"default\" RoPE)");
      } else if (k == "rope_theta") {
        NEXTRON_CHECK(it->is_number(), "config.json: rope_parameters.rope_theta must be a number");
        if (j.contains("rope_theta") && !j["rope_theta"].is_null())
          NEXTRON_CHECK(j["rope_theta"].get<double>() == it->get<double>(),
                        "config.json: rope_theta and rope_parameters.rope_theta disagree");
        c.rope_theta = it->get<double>();
      } else if (k == "partial_rotary_factor") {
        NEXTRON_CHECK(it->is_number(), "config.json: rope_parameters.partial_rotary_factor must be a number");
        if (j.contains("partial_rotary_factor") && !j["partial_rotary_factor"].is_null())
          NEXTRON_CHECK(j["partial_rotary_factor"].get<double>() == it->get<double>(),
                        "config.json: partial_rotary_factor and rope_parameters.partial_rotary_factor disagree");
        c.partial_rotary_factor = it->get<double>();
      } else {
        NEXTRON_CHECK(false, "config.json: rope_parameters.", k, " is not supported (only default RoPE with ",
                      "rope_theta and partial_rotary_factor)");
      }
    }
  }
  if (const json* rs = r.find("rope_scaling"))
    NEXTRON_CHECK(false, "config.json: rope_scaling ", rs->dump(), " is not supported; remove it or set it to null");

  c.linear_num_key_heads = r.integer("linear_num_key_heads");
  c.linear_num_value_heads = r.integer("linear_num_value_heads");
  c.linear_key_head_dim = r.integer("linear_key_head_dim");
  c.linear_value_head_dim = r.integer("linear_value_head_dim");
  c.linear_conv_kernel_dim = r.integer("linear_conv_kernel_dim", &four);

  c.num_experts = r.integer("num_experts", &zero);
  c.num_experts_per_tok = r.integer("num_experts_per_tok", &zero);
  c.moe_intermediate_size = r.integer("moe_intermediate_size", &zero);
  c.shared_expert_intermediate_size = r.integer("shared_expert_intermediate_size", &zero);
  c.decoder_sparse_step = r.integer("decoder_sparse_step", &one);
  c.norm_topk_prob = r.boolean("norm_topk_prob", true);
  c.router_aux_loss_coef = r.number("router_aux_loss_coef", 0.001);
  if (const json* m = r.find("mlp_only_layers")) {
    NEXTRON_CHECK(m->is_array(), "config.json: field 'mlp_only_layers' must be a list of layer indices");
    for (const auto& v : *m) {
      NEXTRON_CHECK(v.is_number_integer(), "config.json: mlp_only_layers entries must be integers, got ", v.dump());
      c.mlp_only_layers.push_back(v.get<int64_t>());
    }
  }

  // Before the layer plan: num_hidden_layers sizes it, and an absurd value must fail here, not after a billion
  // entries have been pushed.
  c.check_size_limits();

  c.full_attention_interval = r.integer("full_attention_interval", &four);
  if (const json* lt = r.find("layer_types")) {
    NEXTRON_CHECK(lt->is_array(), "config.json: field 'layer_types' must be a list");
    NEXTRON_CHECK(static_cast<int64_t>(lt->size()) == c.num_hidden_layers, "config.json: 'layer_types' has ",
                  lt->size(), " entries but num_hidden_layers is ", c.num_hidden_layers);
    for (const auto& v : *lt) {
      const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
      if (s == "linear_attention") {
        c.layer_types.push_back(MixerType::linear_attention);
      } else if (s == "full_attention") {
        c.layer_types.push_back(MixerType::full_attention);
      } else {
        NEXTRON_CHECK(false, "config.json: layer_types entry '", s,
                      "' is not supported (use \"linear_attention\" or \"full_attention\")");
      }
    }
  } else {
    check_positive(c.full_attention_interval, "full_attention_interval");
    for (int64_t i = 0; i < c.num_hidden_layers; ++i)
      c.layer_types.push_back((i + 1) % c.full_attention_interval == 0 ? MixerType::full_attention
                                                                       : MixerType::linear_attention);
  }

  // Settings we check rather than implement.
  if (const json* act = r.find("hidden_act"))
    NEXTRON_CHECK(act->is_string() && act->get<std::string>() == "silu", "config.json: hidden_act ", act->dump(),
                  " is not supported (Qwen3-Next uses \"silu\")");
  NEXTRON_CHECK(!r.boolean("tie_word_embeddings", false),
                "config.json: tie_word_embeddings=true is not supported (Qwen3-Next unties lm_head); set it to false");
  NEXTRON_CHECK(r.number("attention_dropout", 0.0) == 0.0,
                "config.json: attention_dropout must be 0 (dropout is not implemented)");
  NEXTRON_CHECK(!r.boolean("use_sliding_window", false),
                "config.json: use_sliding_window=true is not supported; set it to false");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    NEXTRON_CHECK(r.used.count(k) || kIgnoredKeys.count(k), "config.json: unknown field '", k,
                  "'; nextron does not know what it means for a qwen3_next model (remove it, or report it if "
                  "transformers uses it)");
  }
  c.validate();
  return c;
}

void ModelConfig::check_size_limits() const {
  using L = ConfigLimits;
  check_range(vocab_size, 1, L::vocab_size, "vocab_size");
  check_range(hidden_size, 1, L::hidden_size, "hidden_size");
  check_range(intermediate_size, 0, L::intermediate_size, "intermediate_size");
  check_range(num_hidden_layers, 1, L::num_hidden_layers, "num_hidden_layers");
  check_range(num_attention_heads, 1, L::heads, "num_attention_heads");
  check_range(num_key_value_heads, 1, L::heads, "num_key_value_heads");
  check_range(head_dim, 1, L::head_dim, "head_dim");
  check_range(max_position_embeddings, 0, L::max_position_embeddings, "max_position_embeddings");
  check_range(linear_num_key_heads, 0, L::heads, "linear_num_key_heads");
  check_range(linear_num_value_heads, 0, L::heads, "linear_num_value_heads");
  check_range(linear_key_head_dim, 0, L::head_dim, "linear_key_head_dim");
  check_range(linear_value_head_dim, 0, L::head_dim, "linear_value_head_dim");
  check_range(linear_conv_kernel_dim, 0, L::linear_conv_kernel_dim, "linear_conv_kernel_dim");
  check_range(num_experts, 0, L::num_experts, "num_experts");
  check_range(num_experts_per_tok, 0, L::num_experts, "num_experts_per_tok");
  check_range(moe_intermediate_size, 0, L::intermediate_size, "moe_intermediate_size");
  check_range(shared_expert_intermediate_size, 0, L::intermediate_size, "shared_expert_intermediate_size");
}

ParamCount ModelConfig::parameter_count() const {
  NEXTRON_CHECK(static_cast<int64_t>(layer_types.size()) == num_hidden_layers, "config: the layer plan has ",
                layer_types.size(), " entries for ", num_hidden_layers,
                " layers; build it with ModelConfig::from_json so the layer plan is resolved");
  const int64_t H = hidden_size, V = vocab_size;
  PartCounter embed{{"embedding and lm_head", "vocab_size x hidden_size", 0}, 0};
  PartCounter norms{{"norms", "hidden_size x num_hidden_layers", 0}, 0};
  PartCounter attn{{"full-attention layers",
                    "num_attention_heads, num_key_value_heads, head_dim x hidden_size x num_hidden_layers", 0},
                   0};
  PartCounter gdn{{"Gated DeltaNet layers",
                   "linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim, "
                   "linear_conv_kernel_dim x hidden_size x num_hidden_layers",
                   0},
                  0};
  PartCounter dense{{"dense MLPs", "intermediate_size x hidden_size x num_hidden_layers", 0}, 0};
  PartCounter experts{{"routed experts", "num_experts x moe_intermediate_size x hidden_size x num_hidden_layers", 0},
                      0};
  PartCounter shared{{"shared experts", "shared_expert_intermediate_size x hidden_size x num_hidden_layers", 0}, 0};

  // The same tensors as ParamTable's constructor (src/model/param_table.cpp), counted per layer kind.
  int64_t full_layers = 0, moe_layers = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) {
    full_layers += layer_types[i] == MixerType::full_attention;
    moe_layers += mlp_type(i) == MlpType::sparse_moe;
  }
  const int64_t linear_layers = num_hidden_layers - full_layers, dense_layers = num_hidden_layers - moe_layers;
  embed.add(embed.mul({2, V, H}), 2, 1);
  norms.add(norms.mul({2, H}), 2, num_hidden_layers);
  norms.add(H, 1, 1);
  {
    const int64_t NH = num_attention_heads, NKV = num_key_value_heads, D = head_dim;
    PartCounter& a = attn;
    int64_t per = a.sum({a.mul({NH, 2, D, H}), a.mul({2, NKV, D, H}), a.mul({H, NH, D}), a.mul({2, D})});
    if (attention_bias) per = a.sum({per, a.mul({NH, 2, D}), a.mul({2, NKV, D}), H});
    a.add(per, attention_bias ? 10 : 6, full_layers);
  }
  {
    PartCounter& g = gdn;
    const int64_t Hv = linear_num_value_heads, dv = linear_value_head_dim;
    const int64_t kd = g.mul({linear_num_key_heads, linear_key_head_dim}), vd = g.mul({Hv, dv});
    const int64_t conv = g.sum({kd, kd, vd});
    const int64_t per = g.sum({g.mul({g.sum({kd, kd, vd, vd}), H}), g.mul({2, Hv, H}),
                               g.mul({conv, linear_conv_kernel_dim}), g.mul({2, Hv}), dv, g.mul({H, vd})});
    g.add(per, 7, linear_layers);
  }
  dense.add(dense.mul({3, intermediate_size, H}), 3, dense_layers);
  experts.add(experts.sum({experts.mul({num_experts, H}), experts.mul({num_experts, 3, moe_intermediate_size, H})}),
              experts.sum({1, experts.mul({3, num_experts})}), moe_layers);
  if (shared_expert_intermediate_size > 0)
    shared.add(shared.sum({shared.mul({3, shared_expert_intermediate_size, H}), H}), 4, moe_layers);

  ParamCount pc;
  PartCounter total{{"whole model", "all size fields", 0}, 0};
  for (PartCounter* p : {&embed, &norms, &attn, &gdn, &dense, &experts, &shared}) {
    pc.total = total.sum({pc.total, p->part.numel});
    pc.hf_tensors = total.sum({pc.hf_tensors, p->tensors});
    pc.parts.push_back(p->part);
  }
  return pc;
}

void ModelConfig::validate() const {
  check_size_limits();
  check_positive(vocab_size, "vocab_size");
  NEXTRON_CHECK(padded_vocab_size == 0 || padded_vocab_size >= vocab_size, "padded vocabulary ", padded_vocab_size,
                " is smaller than vocab_size ", vocab_size);
  check_positive(hidden_size, "hidden_size");
  check_positive(num_hidden_layers, "num_hidden_layers");
  check_positive(num_attention_heads, "num_attention_heads");
  check_positive(num_key_value_heads, "num_key_value_heads");
  check_positive(head_dim, "head_dim");
  NEXTRON_CHECK(rms_norm_eps > 0, "config.json: rms_norm_eps must be positive");
  NEXTRON_CHECK(num_attention_heads % num_key_value_heads == 0, "config.json: num_attention_heads (",
                num_attention_heads, ") must be a multiple of num_key_value_heads (", num_key_value_heads, ")");
  NEXTRON_CHECK(partial_rotary_factor > 0 && partial_rotary_factor <= 1,
                "config.json: partial_rotary_factor must be in (0, 1], got ", partial_rotary_factor);
  NEXTRON_CHECK(rotary_dim() % 2 == 0 && rotary_dim() > 0,
                "config.json: head_dim * partial_rotary_factor = ", rotary_dim(), " must be a positive even number");
  NEXTRON_CHECK(rope_theta > 0, "config.json: rope_theta must be positive");
  NEXTRON_CHECK(static_cast<int64_t>(layer_types.size()) == num_hidden_layers,
                "config.json: layer_types must have num_hidden_layers entries");
  const bool any_linear = std::count(layer_types.begin(), layer_types.end(), MixerType::linear_attention) > 0;
  if (any_linear) {
    check_positive(linear_num_key_heads, "linear_num_key_heads");
    check_positive(linear_num_value_heads, "linear_num_value_heads");
    check_positive(linear_key_head_dim, "linear_key_head_dim");
    check_positive(linear_value_head_dim, "linear_value_head_dim");
    check_positive(linear_conv_kernel_dim, "linear_conv_kernel_dim");
    NEXTRON_CHECK(linear_num_value_heads % linear_num_key_heads == 0, "config.json: linear_num_value_heads (",
                  linear_num_value_heads, ") must be a multiple of linear_num_key_heads (", linear_num_key_heads, ")");
  }
  NEXTRON_CHECK(num_experts >= 0, "config.json: num_experts must be >= 0");
  check_positive(decoder_sparse_step, "decoder_sparse_step");
  for (int64_t l : mlp_only_layers)
    NEXTRON_CHECK(l >= 0 && l < num_hidden_layers, "config.json: mlp_only_layers entry ", l,
                  " is not a layer index in [0, ", num_hidden_layers, ")");
  bool any_dense = false;
  for (int64_t i = 0; i < num_hidden_layers; ++i) any_dense |= mlp_type(i) == MlpType::dense;
  if (any_dense) check_positive(intermediate_size, "intermediate_size");
  if (num_moe_layers() > 0) {
    check_positive(num_experts_per_tok, "num_experts_per_tok");
    check_positive(moe_intermediate_size, "moe_intermediate_size");
    NEXTRON_CHECK(num_experts_per_tok <= num_experts, "config.json: num_experts_per_tok (", num_experts_per_tok,
                  ") must not exceed num_experts (", num_experts, ")");
    NEXTRON_CHECK(shared_expert_intermediate_size >= 0, "config.json: shared_expert_intermediate_size must be >= 0");
  }
  // Machine-independent: every flat buffer's byte size (and a training run's fp32 parameters, gradients and two
  // AdamW moments, 16 bytes per parameter) must be a 64-bit number. Whether it fits this machine is
  // check_fits_in_memory's (src/model/param_table.h) business, at the entry points that know the run.
  const ParamCount pc = parameter_count();
  const ParamCount::Part& big = pc.largest();
  NEXTRON_CHECK(pc.total <= std::numeric_limits<int64_t>::max() / 16, "config.json: the model has ", pc.total,
                " parameters, ", big.numel, " of them in its ", big.name, " (", big.fields,
                "): 16 bytes per parameter for training would overflow a 64-bit byte count; reduce those fields");
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  std::ifstream f(path);
  NEXTRON_CHECK(f.good(), "cannot open model config '", path, "'");
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    NEXTRON_CHECK(false, "model config '", path, "' is not valid JSON: ", e.what());
  }
  try {
    return from_json(j);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (in " + path + ")");
  }
}

json ModelConfig::to_json() const {
  json j;
  j["architectures"] = {"Qwen3NextForCausalLM"};
  j["model_type"] = "qwen3_next";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["rms_norm_eps"] = rms_norm_eps;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["attention_bias"] = attention_bias;
  j["attention_dropout"] = 0.0;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rope_theta"] = rope_theta;
  j["partial_rotary_factor"] = partial_rotary_factor;
  j["linear_num_key_heads"] = linear_num_key_heads;
  j["linear_num_value_heads"] = linear_num_value_heads;
  j["linear_key_head_dim"] = linear_key_head_dim;
  j["linear_value_head_dim"] = linear_value_head_dim;
  j["linear_conv_kernel_dim"] = linear_conv_kernel_dim;
  j["num_experts"] = num_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["shared_expert_intermediate_size"] = shared_expert_intermediate_size;
  j["decoder_sparse_step"] = decoder_sparse_step;
  j["mlp_only_layers"] = mlp_only_layers;
  j["norm_topk_prob"] = norm_topk_prob;
  j["router_aux_loss_coef"] = router_aux_loss_coef;
  j["full_attention_interval"] = full_attention_interval;
  std::vector<std::string> lt;
  for (MixerType t : layer_types) lt.push_back(mixer_type_name(t));
  j["layer_types"] = lt;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = false;
  j["torch_dtype"] = "float32";
  return j;
}

ModelConfig tp_local_config(const ModelConfig& c, int tp) {
  NEXTRON_CHECK(tp >= 1, "tensor-parallel size must be >= 1, got ", tp);
  ModelConfig l = c;
  // A rank holds its slice of the padded vocabulary (the whole of it at TP 1); padding is a whole-model notion.
  l.padded_vocab_size = 0;
  if (tp == 1) {
    l.vocab_size = c.padded_vocab();
    return l;
  }
  auto split = [tp](int64_t v, const char* what) {
    NEXTRON_CHECK(v % tp == 0, what, " ", v, " is not divisible by TP ", tp);
    return v / tp;
  };
  l.num_attention_heads = split(c.num_attention_heads, "num_attention_heads");
  l.num_key_value_heads = c.num_key_value_heads >= tp ? split(c.num_key_value_heads, "num_key_value_heads") : 1;
  l.linear_num_key_heads = split(c.linear_num_key_heads, "linear_num_key_heads");
  l.linear_num_value_heads = split(c.linear_num_value_heads, "linear_num_value_heads");
  l.intermediate_size = split(c.intermediate_size, "intermediate_size");
  // Folded experts (ETP 1) stay whole on every TP rank; otherwise they split like the dense MLP (ETP = TP).
  if (!c.experts_folded) l.moe_intermediate_size = split(c.moe_intermediate_size, "moe_intermediate_size");
  l.shared_expert_intermediate_size = split(c.shared_expert_intermediate_size, "shared_expert_intermediate_size");
  l.vocab_size = split(c.padded_vocab(), "vocab_size (padded)");
  return l;
}

ModelConfig ep_local_config(const ModelConfig& c, int ep, int ep_rank) {
  NEXTRON_CHECK(ep >= 1 && ep_rank >= 0 && ep_rank < ep, "expert-parallel rank ", ep_rank, " of ", ep);
  NEXTRON_CHECK(ep == 1 || (c.num_experts > 0 && c.num_experts % ep == 0), "num_experts ", c.num_experts,
                " is not divisible by EP ", ep, ": choose --expert-model-parallel-size dividing the expert count");
  ModelConfig l = c;
  l.expert_parallel_size = ep;
  l.expert_parallel_rank = ep_rank;
  return l;
}

}  // namespace nextron
