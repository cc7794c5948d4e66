#include "model/param_table.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/error.h"

namespace nextron {

namespace {
std::string layer_prefix(int64_t i) { return "layers." + std::to_string(i) + "."; }
std::string hf_layer_prefix(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

// A byte count for messages: "23.4 GiB (25123456789 bytes)"; absurd sizes in scientific notation.
std::string format_bytes(double bytes) {
  char buf[96];
  if (bytes < 9e18)
    std::snprintf(buf, sizeof buf, "%.1f GiB (%.0f bytes)", bytes / (1024.0 * 1024 * 1024), bytes);
  else
    std::snprintf(buf, sizeof buf, "%.3g bytes", bytes);
  return buf;
}

// The first number in a file (cgroup limits, "max" meaning none), or -1.
double read_limit_file(const std::string& path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word) || word == "max") return -1;
  try {
    return std::stod(word);
  } catch (const std::exception&) {
    return -1;
  }
}

// This process's cgroup v2 path ("0::/path" in /proc/self/cgroup), "" when there is none.
std::string cgroup_v2_path() {
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("0::", 0) == 0) return line.substr(3);
  return "";
}

// MemAvailable from /proc/meminfo in bytes, or -1: shown in messages, not compared against (see MemoryLimit).
double mem_available() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return -1;
}
}  // namespace

MemoryLimit host_memory_limit() {
  MemoryLimit m{std::numeric_limits<double>::infinity(), "unknown (sysconf gave no physical memory size)"};
  auto consider = [&m](double bytes, std::string source) {
    if (bytes > 0 && bytes < m.bytes) m = {bytes, std::move(source)};
  };
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0)
    consider(static_cast<double>(pages) * static_cast<double>(page),
             "physical memory (sysconf _SC_PHYS_PAGES x _SC_PAGE_SIZE)");
  // In a container the physical size is the host's; the cgroup's limit is what the OOM killer enforces.
  const std::string cg = cgroup_v2_path();
  if (!cg.empty()) consider(read_limit_file("/sys/fs/cgroup" + cg + "/memory.max"), "cgroup limit (memory.max)");
  consider(read_limit_file("/sys/fs/cgroup/memory.max"), "cgroup limit (memory.max)");
  consider(read_limit_file("/sys/fs/cgroup/memory/memory.limit_in_bytes"), "cgroup limit (memory.limit_in_bytes)");
  rlimit as{};
  if (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY)
    consider(static_cast<double>(as.rlim_cur), "address-space limit (RLIMIT_AS, ulimit -v)");
  return m;
}

double activation_bytes_lower_bound(const ModelConfig& c, int64_t micro_batch, int64_t seq_len,
                                    int64_t bytes_per_value) {
  const double tokens = static_cast<double>(micro_batch) * static_cast<double>(seq_len);
  const double per_token = static_cast<double>(c.num_hidden_layers + 1) * static_cast<double>(c.hidden_size) +
                           2.0 * static_cast<double>(c.vocab_size);
  return tokens * per_token * static_cast<double>(bytes_per_value);
}

double memory_needed_bytes(const ModelConfig& config, const MemoryNeed& need) {
  const ParamCount pc = config.parameter_count();
  return static_cast<double>(pc.total) * static_cast<double>(need.bytes_per_param) +
         static_cast<double>(pc.hf_tensors) * static_cast<double>(kTableBytesPerHfTensor) + need.activation_bytes;
}

void check_fits_in_memory(const ModelConfig& config, const MemoryNeed& need, const MemoryLimit& limit) {
  const double needed = memory_needed_bytes(config, need);
  if (needed <= limit.bytes) return;
  const ParamCount pc = config.parameter_count();
  const ParamCount::Part& big = pc.largest();
  std::ostringstream os;
  os << "the model does not fit in memory: it needs " << format_bytes(needed) << " (" << pc.total << " parameters x "
     << need.bytes_per_param << " bytes of " << need.per_param_what << ", table bookkeeping for " << pc.hf_tensors
     << " tensors";
  if (need.activation_bytes > 0) os << ", at least " << format_bytes(need.activation_bytes) << " of activations";
  os << ") but this process can use " << format_bytes(limit.bytes) << ", its " << limit.source;
  const double avail = mem_available();
  if (avail >= 0) os << "; MemAvailable is " << format_bytes(avail);
  os << ". Most parameters (" << big.numel << ") are in the " << big.name << ": reduce " << big.fields;
  if (need.activation_bytes > needed / 2)
    os << "; most of the need is activations: reduce --micro-batch-size or --seq-len (with vocab_size, hidden_size "
          "and num_hidden_layers)";
  throw Error(os.str());
}

void hf_reorder(const HfPiece& piece, const float* from, float* to, bool to_hf) {
  for_each_hf_run(piece, 0, shape_numel(piece.shape), [&](int64_t ours, int64_t hf, int64_t n) {
    if (to_hf)
      std::copy_n(from + ours, n, to + hf);
    else
      std::copy_n(from + hf, n, to + ours);
  });
}

std::vector<float> in_hf_order(const HfPiece& piece, const float* values) {
  std::vector<float> out(static_cast<size_t>(shape_numel(piece.shape)));
  hf_reorder(piece, values, out.data(), true);
  return out;
}

ParamSpec& ParamTable::add(std::string name, Shape shape, int tp_dim, ParamKind kind, bool decay,
                           std::vector<HfPiece> hf) {
  ParamSpec s;
  s.name = std::move(name);
  s.shape = std::move(shape);
  s.tp_dim = tp_dim;
  s.kind = kind;
  s.weight_decay = decay;
  s.hf = std::move(hf);
  place(s);
  int64_t covered = 0;
  for (const auto& p : s.hf) {
    covered += shape_numel(p.shape);
    if (p.regroup.groups > 0) {
      int64_t rows = 0;
      for (int64_t part : p.regroup.parts) rows += part;
      NEXTRON_ASSERT(p.regroup.groups * rows * p.regroup.row == shape_numel(p.shape));
    }
  }
  NEXTRON_ASSERT(covered == s.numel());
  index_[s.name] = specs_.size();
  specs_.push_back(std::move(s));
  return specs_.back();
}

ParamSpec& ParamTable::add_simple(const std::string& name, const std::string& hf_name, Shape shape, int tp_dim,
                                  bool decay) {
  return add(name, shape, tp_dim, ParamKind::dense, decay, {HfPiece{hf_name, 0, shape}});
}

ParamTable::ParamTable(const ModelConfig& c) : ParamTable(c, StageRange::whole(c)) {}

ParamTable::ParamTable(const ModelConfig& c, const StageRange& stage) {
  stage.validate(c);
  const int64_t H = c.hidden_size;
  if (stage.first) add_simple("embed_tokens", "model.embed_tokens.weight", {c.vocab_size, H}, 0, true);
  for (int64_t i = stage.layer_begin; i < stage.end(c); ++i) {
    const std::string p = layer_prefix(i), hp = hf_layer_prefix(i);
    add_simple(p + "input_layernorm", hp + "input_layernorm.weight", {H}, -1, false).tp_grad = TpGradSum::with_sp;
    if (c.layer_types[i] == MixerType::full_attention) {
      const int64_t NH = c.num_attention_heads, NKV = c.num_key_value_heads, D = c.head_dim;
      // q_proj rows are per head [query (D) | gate (D)].
      add_simple(p + "self_attn.q_proj", hp + "self_attn.q_proj.weight", {NH * 2 * D, H}, 0, true);
      // KV heads are split over TP, or replicated when there are fewer than TP ranks.
      add_simple(p + "self_attn.k_proj", hp + "self_attn.k_proj.weight", {NKV * D, H}, 0, true).tp_unit = D;
      add_simple(p + "self_attn.v_proj", hp + "self_attn.v_proj.weight", {NKV * D, H}, 0, true).tp_unit = D;
      add_simple(p + "self_attn.o_proj", hp + "self_attn.o_proj.weight", {H, NH * D}, 1, true);
      if (c.attention_bias) {
        add_simple(p + "self_attn.q_proj_bias", hp + "self_attn.q_proj.bias", {NH * 2 * D}, 0, false);
        add_simple(p + "self_attn.k_proj_bias", hp + "self_attn.k_proj.bias", {NKV * D}, 0, false).tp_unit = D;
        add_simple(p + "self_attn.v_proj_bias", hp + "self_attn.v_proj.bias", {NKV * D}, 0, false).tp_unit = D;
        add_simple(p + "self_attn.o_proj_bias", hp + "self_attn.o_proj.bias", {H}, -1, false).tp_grad =
            TpGradSum::with_sp;
      }
      add_simple(p + "self_attn.q_norm", hp + "self_attn.q_norm.weight", {D}, -1, false).tp_grad = TpGradSum::always;
      add_simple(p + "self_attn.k_norm", hp + "self_attn.k_norm.weight", {D}, -1, false).tp_grad = TpGradSum::always;
    } else {
      const int64_t Hv = c.linear_num_value_heads, dv = c.linear_value_head_dim;
      // HF groups the rows of in_proj_qkvz per key head [q | k | v | z], of in_proj_ba per key head [b | a];
      // nextron keeps them per part, [q of all heads | k | v | z] and [b | a] (HfRowGroups), so that the
      // projections' outputs split into contiguous row ranges. Tensor parallelism splits every part separately,
      // which gives each rank whole key-head groups (the layout requires Hk % TP == 0).
      const int64_t Hk = c.linear_num_key_heads, dk = c.linear_key_head_dim, r = Hv / Hk;
      const Shape qkvz{2 * c.key_dim() + 2 * c.value_dim(), H}, ba{2 * Hv, H};
      add(p + "linear_attn.in_proj_qkvz", qkvz, 0, ParamKind::dense, true,
          {HfPiece{hp + "linear_attn.in_proj_qkvz.weight", 0, qkvz, {Hk, {dk, dk, r * dv, r * dv}, H}}})
          .tp_parts = {c.key_dim(), c.key_dim(), c.value_dim(), c.value_dim()};
      add(p + "linear_attn.in_proj_ba", ba, 0, ParamKind::dense, true,
          {HfPiece{hp + "linear_attn.in_proj_ba.weight", 0, ba, {Hk, {r, r}, H}}})
          .tp_parts = {Hv, Hv};
      // Conv channels are [q of all heads | k of all heads | v of all heads]: each block is split separately.
      add(p + "linear_attn.conv1d", {c.conv_dim(), c.linear_conv_kernel_dim}, 0, ParamKind::dense, true,
          {HfPiece{hp + "linear_attn.conv1d.weight", 0, {c.conv_dim(), 1, c.linear_conv_kernel_dim}}})
          .tp_parts = {c.key_dim(), c.key_dim(), c.value_dim()};
      add_simple(p + "linear_attn.dt_bias", hp + "linear_attn.dt_bias", {Hv}, 0, false);
      add_simple(p + "linear_attn.A_log", hp + "linear_attn.A_log", {Hv}, 0, false);
      add_simple(p + "linear_attn.norm", hp + "linear_attn.norm.weight", {dv}, -1, false).tp_grad = TpGradSum::always;
      add_simple(p + "linear_attn.out_proj", hp + "linear_attn.out_proj.weight", {H, c.value_dim()}, 1, true);
    }
    add_simple(p + "post_attention_layernorm", hp + "post_attention_layernorm.weight", {H}, -1, false).tp_grad =
        TpGradSum::with_sp;
    if (c.mlp_type(i) == MlpType::dense) {
      const int64_t I = c.intermediate_size;
      // [gate_proj; up_proj] packed so one GEMM produces the SwiGLU input.
      add(p + "mlp.gate_up_proj", {2 * I, H}, 0, ParamKind::dense, true,
          {HfPiece{hp + "mlp.gate_proj.weight", 0, {I, H}}, HfPiece{hp + "mlp.up_proj.weight", I * H, {I, H}}})
          .tp_parts = {I, I};
      add_simple(p + "mlp.down_proj", hp + "mlp.down_proj.weight", {H, I}, 1, true);
    } else {
      const int64_t E = c.num_experts, El = c.num_local_experts(), I = c.moe_intermediate_size;
      // Folded experts route each rank's own rows: the router's gradient is then a partial sum over the TP ranks.
      add_simple(p + "mlp.gate", hp + "mlp.gate.weight", {E, H}, -1, true).tp_grad =
          c.experts_folded ? TpGradSum::with_sp : TpGradSum::none;
      // This rank's experts (all of them without expert parallelism), named by their global index.
      std::vector<HfPiece> gate_up, down;
      for (int64_t e = 0; e < El; ++e) {
        const std::string ep = hp + "mlp.experts." + std::to_string(c.first_local_expert() + e) + ".";
        gate_up.push_back({ep + "gate_proj.weight", e * 2 * I * H, {I, H}});
        gate_up.push_back({ep + "up_proj.weight", e * 2 * I * H + I * H, {I, H}});
        down.push_back({ep + "down_proj.weight", e * H * I, {H, I}});
      }
      const bool split = !c.experts_folded;  // over TP like the dense MLP (ETP = TP), or whole (ETP 1)
      add(p + "mlp.experts.gate_up_proj", {El, 2 * I, H}, split ? 1 : -1, ParamKind::expert, true, gate_up).tp_parts = {
          I, I};
      add(p + "mlp.experts.down_proj", {El, H, I}, split ? 2 : -1, ParamKind::expert, true, down);
      if (c.shared_expert_intermediate_size > 0) {
        const int64_t Is = c.shared_expert_intermediate_size;
        add(p + "mlp.shared_expert.gate_up_proj", {2 * Is, H}, 0, ParamKind::dense, true,
            {HfPiece{hp + "mlp.shared_expert.gate_proj.weight", 0, {Is, H}},
             HfPiece{hp + "mlp.shared_expert.up_proj.weight", Is * H, {Is, H}}})
            .tp_parts = {Is, Is};
        add_simple(p + "mlp.shared_expert.down_proj", hp + "mlp.shared_expert.down_proj.weight", {H, Is}, 1, true);
        add_simple(p + "mlp.shared_expert_gate", hp + "mlp.shared_expert_gate.weight", {1, H}, -1, true);
      }
    }
  }
  if (stage.last) {
    add_simple("norm", "model.norm.weight", {H}, -1, false).tp_grad = TpGradSum::with_sp;
    add_simple("lm_head", "lm_head.weight", {c.vocab_size, H}, 0, true);
  }
  // Under expert parallelism or folding the routed experts reduce over another group (EDP) than the rest (DP): last,
  // so each group's parameters are one contiguous range of the flat layout and each ZeRO shard is a slice of it.
  if (c.expert_parallel_size > 1 || c.experts_folded) {
    std::stable_partition(specs_.begin(), specs_.end(), [](const ParamSpec& s) { return s.kind != ParamKind::expert; });
    total_ = 0;
    parameters_ = 0;
    index_.clear();
    for (size_t i = 0; i < specs_.size(); ++i) {
      place(specs_[i]);
      index_[specs_[i].name] = i;
    }
  }
}

void ParamTable::place(ParamSpec& s) {
  s.offset = total_;
  total_ += (s.numel() + kAlign - 1) / kAlign * kAlign;
  parameters_ += s.numel();
}

FlatRange ParamTable::expert_range() const {
  FlatRange r{total_, total_};
  for (const ParamSpec& s : specs_)
    if (s.kind == ParamKind::expert) {
      r.begin = std::min(r.begin, s.offset);
      NEXTRON_ASSERT(s.offset + s.numel() <= r.end);
    }
  for (const ParamSpec& s : specs_)
    if (s.kind != ParamKind::expert) NEXTRON_ASSERT(s.offset + s.numel() <= r.begin || s.offset >= r.end);
  return r;
}

const ParamSpec& ParamTable::get(const std::string& name) const {
  auto it = index_.find(name);
  NEXTRON_CHECK(it != index_.end(), "no parameter named '", name, "'");
  return specs_[it->second];
}

Tensor ParamTable::view(const Tensor& flat, const std::string& name) const {
  const ParamSpec& s = get(name);
  return Tensor::view_of(flat, s.offset, s.shape);
}

}  // namespace nextron
