#include "plan/planner.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

#include "core/error.h"
#include "model/activation_memory.h"
#include "model/flops.h"
#include "model/param_table.h"
#include "parallel/context.h"
#include "parallel/pipeline_layout.h"
#include "parallel/schedule.h"
#include "parallel/tp_shard.h"

namespace nextron::plan {

namespace {

// Ring accounting (comm/counting_communicator.h): a rank sends 2 (p-1)/p n b bytes for an all-reduce of n elements of
// b bytes over p ranks, and (p-1) c b for an all-gather or reduce-scatter of c elements per rank.
double ar(int p, double n, double b) { return p > 1 ? 2.0 * (p - 1) / p * n * b : 0.0; }
double ag(int p, double c, double b) { return p > 1 ? (p - 1) * c * b : 0.0; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What one pipeline chunk of a rank holds, from the parameter table of its TP (x EP) slice.
struct ChunkInfo {
  StageRange stage;
  ModelConfig local;
  int64_t params = 0, dense = 0, experts = 0;  // local elements: all, before the routed experts, the routed experts
  int64_t grad_sync = 0;                       // elements TpGradSync all-reduces over TP (G)
  int64_t full_attention = 0, linear = 0, moe = 0, shared = 0, dense_mlp = 0, layers = 0;
};

// TpGradSync's packed size (parallel/grad_sync.cpp's rule on the parameter table): replicated parameters whose
// gradient each rank sees only partly (per-head norms always, residual norms under SP), and the full-size slot of a
// parameter whose TP units (KV heads) are fewer than the TP ranks.
int64_t grad_sync_elements(const ParamTable& local, const ParamTable& full, int tp, bool sp) {
  if (tp <= 1) return 0;
  int64_t total = 0;
  for (const ParamSpec& l : local.specs()) {
    const ParamSpec& f = full.get(l.name);
    if (l.tp_dim < 0) {
      if (l.tp_grad == TpGradSum::always || (l.tp_grad == TpGradSum::with_sp && sp)) total += l.numel();
      continue;
    }
    const std::vector<int64_t> parts = f.tp_parts.empty() ? std::vector<int64_t>{f.shape[f.tp_dim]} : f.tp_parts;
    bool replicated = false;
    for (int64_t part : parts) replicated |= part / f.tp_unit < tp;
    if (replicated) total += f.numel();
  }
  return total;
}

// A stage's local parameter elements, its routed experts (under EP: a range of their own) and TpGradSync's elements.
struct StageParams {
  int64_t params = 0, experts = 0, grad_sync = 0;
};
StageParams stage_params(const ModelConfig& config, const ModelConfig& local, const StageRange& stage, int tp, int ep,
                         bool sp) {
  // TpShardMap's tables (parallel/tp_shard.cpp) without its element runs, which are slow for 512 experts: the
  // rank's slice of the stage, and the whole model's parameters of the same names.
  const ParamTable local_table(local, stage), full_table(config, stage);
  StageParams out;
  out.params = local_table.total_numel();
  // The routed experts are a contiguous range at the end of the flat layout only under EP (param_table.cpp): only
  // then do they have an optimizer (and a reduction group) of their own.
  if (ep > 1) out.experts = local_table.expert_range().size();
  out.grad_sync = grad_sync_elements(local_table, full_table, tp, sp);
  return out;
}

// Forward FLOPs per token of one layer of each kind, and of the lm_head (model/flops.h's breakdown, split evenly over
// the layers of a kind: every layer of a kind has the same dimensions).
struct LayerFlops {
  double attention = 0, attention_core = 0, linear = 0, linear_core = 0, moe = 0, moe_shared = 0, dense_mlp = 0,
         head = 0;
};
LayerFlops layer_flops(const ModelConfig& config, int64_t seq_len) {
  const FlopsBreakdown f = model_flops_breakdown(config, seq_len);
  int64_t lf = 0, ll = 0, lm = 0, ld = 0;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    (config.layer_types[l] == MixerType::full_attention ? lf : ll) += 1;
    (config.mlp_type(l) == MlpType::sparse_moe ? lm : ld) += 1;
  }
  auto per = [](double v, int64_t n) { return n > 0 ? v / static_cast<double>(n) : 0.0; };
  LayerFlops out;
  out.attention = per(f.attention_proj + f.attention_core, lf);
  out.attention_core = per(f.attention_core, lf);
  out.linear = per(f.deltanet_proj + f.deltanet_conv + f.deltanet_core, ll);
  out.linear_core = per(f.deltanet_core, ll);
  out.moe = per(f.moe_router + f.moe_experts + f.moe_shared, lm);
  out.moe_shared = per(f.moe_shared, lm);
  out.dense_mlp = per(f.dense_mlp, ld);
  out.head = f.lm_head;
  return out;
}

// What layouts of one enumeration share, computed once. A rank's parameter figures are sums over its layers, and
// every layer of one kind (mixer, MLP) has the same: the tables are built for one layer of each kind (and for it as
// a first and a last stage: the embedding, the final norm and lm_head) per TP, EP and SP, instead of for every chunk
// of every CP rank of every layout (the 80B model's tables hold 48 x 512 experts: rebuilding them made the 512-GPU
// enumeration take minutes). The per-layer FLOPs depend on nothing of the layout.
struct PlanCache {
  using Key = std::tuple<int, int, bool, int64_t, int, int, bool, bool>;  // tp, ep, sp, vocab, mixer, mlp, first, last
  std::map<Key, StageParams> layers;
  std::optional<std::pair<int64_t, LayerFlops>> flops;  // per sequence length

  // Layer l's figures as a stage of its own (first / last: with the embedding / the final norm and lm_head).
  const StageParams& layer(const ModelConfig& config, const ModelConfig& local, const Candidate& c, int64_t l,
                           bool first, bool last) {
    const bool sp = c.sequence_parallel && c.sizes.tp > 1;
    const Key key{c.sizes.tp,
                  c.sizes.ep,
                  sp,
                  config.padded_vocab_size,
                  static_cast<int>(config.layer_types[l]),
                  static_cast<int>(config.mlp_type(l)),
                  first,
                  last};
    auto it = layers.find(key);
    if (it == layers.end())
      it = layers.emplace(key, stage_params(config, local, {l, l + 1, first, last}, c.sizes.tp, c.sizes.ep, sp)).first;
    return it->second;
  }

  std::vector<ChunkInfo> chunk_info(const ModelConfig& config, const Candidate& c, int pp_rank) {
    const ParallelSizes& s = c.sizes;
    const std::vector<StageRange> chunks = rank_chunks(pipeline_stages(config, s.pp, s.vpp, s.pipeline), s.pp, pp_rank);
    const ModelConfig local = ep_local_config(tp_local_config(config, s.tp), s.ep, 0);
    std::vector<ChunkInfo> out;
    for (const StageRange& stage : chunks) {
      ChunkInfo ci;
      ci.stage = stage;
      ci.local = local;
      const int64_t begin = stage.layer_begin, end = stage.end(config);
      NEXTRON_CHECK(end > begin, "nextron-plan: a pipeline stage without layers is not modelled");
      auto add = [&ci](const StageParams& p, int64_t sign) {
        ci.params += sign * p.params;
        ci.experts += sign * p.experts;
        ci.grad_sync += sign * p.grad_sync;
      };
      for (int64_t l = begin; l < end; ++l) {
        add(layer(config, local, c, l, false, false), 1);
        ++ci.layers;
        if (config.layer_types[l] == MixerType::full_attention)
          ++ci.full_attention;
        else
          ++ci.linear;
        if (config.mlp_type(l) == MlpType::sparse_moe) {
          ++ci.moe;
          if (config.shared_expert_intermediate_size > 0) ++ci.shared;
        } else {
          ++ci.dense_mlp;
        }
      }
      // The embedding (first stage) and the final norm and lm_head (last), as what they add to a layer's table.
      if (stage.first) {
        add(layer(config, local, c, begin, true, false), 1);
        add(layer(config, local, c, begin, false, false), -1);
      }
      if (stage.last) {
        add(layer(config, local, c, end - 1, false, true), 1);
        add(layer(config, local, c, end - 1, false, false), -1);
      }
      ci.dense = ci.params - ci.experts;
      out.push_back(std::move(ci));
    }
    return out;
  }
  const LayerFlops& layer_flops_of(const ModelConfig& config, int64_t seq_len) {
    if (!flops || flops->first != seq_len) flops.emplace(seq_len, layer_flops(config, seq_len));
    return flops->second;
  }
};

struct ScheduleKey {
  int pp, vpp, m;
  bool operator<(const ScheduleKey& o) const { return std::tie(pp, vpp, m) < std::tie(o.pp, o.vpp, o.m); }
};

// Records in flight per (pp rank, chunk) of a schedule (parallel/schedule.h), cached: the tables of large M are big.
const std::vector<std::vector<int>>& in_flight(int pp, int vpp, int m) {
  static std::map<ScheduleKey, std::vector<std::vector<int>>> cache;
  auto it = cache.find({pp, vpp, m});
  if (it != cache.end()) return it->second;
  const ScheduleTable table = schedule_table({pp, vpp, m});
  std::vector<std::vector<int>> counts(pp, std::vector<int>(vpp));
  for (int r = 0; r < pp; ++r)
    for (int k = 0; k < vpp; ++k) counts[r][k] = max_in_flight(table, r, k);
  return cache.emplace(ScheduleKey{pp, vpp, m}, std::move(counts)).first->second;
}

// Gradient send buffers the pipeline runner keeps per pp rank (allocated ones stay: the most it ever holds unsent,
// parallel/schedule.h), cached.
const std::vector<int>& send_buffers(int pp, int vpp, int m) {
  static std::map<ScheduleKey, std::vector<int>> cache;
  auto it = cache.find({pp, vpp, m});
  if (it != cache.end()) return it->second;
  const ScheduleTable table = schedule_table({pp, vpp, m});
  std::vector<int> most(pp, 0);
  for (int r = 0; r < pp; ++r) most[r] = max_gradients_unsent(table, r);
  return cache.emplace(ScheduleKey{pp, vpp, m}, std::move(most)).first->second;
}

double number(const nlohmann::json& j, const char* key, const std::string& where) {
  NEXTRON_CHECK(j.contains(key), where, ": missing \"", key, "\" (a positive number)");
  NEXTRON_CHECK(j[key].is_number() && j[key].get<double>() > 0, where, ": \"", key, "\" must be a positive number");
  return j[key].get<double>();
}

}  // namespace

const char* axis_name(Axis a) {
  switch (a) {
    case Axis::tp:
      return "tp";
    case Axis::cp:
      return "cp";
    case Axis::dp_cp:
      return "dp_cp";
    case Axis::pp:
      return "pp";
    case Axis::ep:
      return "ep";
    case Axis::edp:
      return "edp";
    case Axis::world:
      return "world";
  }
  return "?";
}

double AxisBytes::total() const {
  double t = 0;
  for (double b : bytes) t += b;
  return t;
}

Cluster cluster_from_json(const std::string& text, const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(detail::concat(where, ": not valid JSON (", e.what(), ")"));
  }
  NEXTRON_CHECK(j.is_object(), where, ": a cluster is a JSON object");
  static const std::vector<std::string> keys = {"name",        "gpus_per_node",   "gpu_memory_gib",
                                                "peak_tflops", "intra_node_gbps", "inter_node_gbps",
                                                "hbm_gbps",    "device",          "comment"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (std::find(keys.begin(), keys.end(), it.key()) == keys.end()) {
      std::string known;
      for (const std::string& k : keys) known += (known.empty() ? "" : ", ") + k;
      throw Error(detail::concat(where, ": unknown key \"", it.key(), "\" (the keys are ", known, ")"));
    }
  }
  Cluster c;
  c.name = j.value("name", where);
  const double gpn = number(j, "gpus_per_node", where);
  NEXTRON_CHECK(gpn == std::floor(gpn), where, ": \"gpus_per_node\" must be a whole number");
  c.gpus_per_node = static_cast<int>(gpn);
  c.memory_bytes = number(j, "gpu_memory_gib", where) * double(1ull << 30);
  c.peak_flops = number(j, "peak_tflops", where) * 1e12;
  c.intra_node_bytes_per_s = number(j, "intra_node_gbps", where) * 1e9;
  c.inter_node_bytes_per_s = number(j, "inter_node_gbps", where) * 1e9;
  c.memory_bytes_per_s = number(j, "hbm_gbps", where) * 1e9;
  const std::string device = j.value("device", std::string("cuda"));
  NEXTRON_CHECK(device == "cuda" || device == "cpu", where, ": \"device\" is \"cuda\" or \"cpu\", not \"", device,
                "\"");
  c.device = device == "cuda" ? Device::cuda : Device::cpu;
  return c;
}

Cluster load_cluster(const std::string& path) {
  std::ifstream in(path);
  NEXTRON_CHECK(in.good(), "cannot read the cluster file ", path,
                ": give an existing file (configs/clusters/*.json) or the --gpus-per-node, --gpu-memory-gib, "
                "--peak-tflops, --intra-node-gbps, --inter-node-gbps options");
  std::stringstream ss;
  ss << in.rdbuf();
  return cluster_from_json(ss.str(), path);
}

RecomputeOptions recompute_preset(const std::string& name) {
  RecomputeOptions r;
  if (name == "none") return r;
  if (name == "selective") {
    r.granularity = "selective";
    r.modules = {"core_attn", "layernorm", "moe_act", "shared_experts"};
    return r;
  }
  if (name == "full") {
    r.granularity = "full";
    r.method = "uniform";
    r.num_layers = 1;
    return r;
  }
  throw Error(detail::concat("recompute option \"", name, "\": the choices are none, selective, full"));
}

std::string Candidate::describe() const {
  std::ostringstream o;
  o << "TP" << sizes.tp << (sequence_parallel && sizes.tp > 1 ? "+SP" : "") << " CP" << sizes.cp;
  if (sizes.cp > 1) o << (sizes.cp_order == CpOrder::zigzag ? "z" : "c");
  o << " PP" << sizes.pp;
  if (sizes.vpp > 1) o << " VPP" << sizes.vpp;
  o << " EP" << sizes.ep;
  const int etp = sizes.etp == 0 ? sizes.tp : sizes.etp;
  if (etp != sizes.tp) o << " ETP" << etp;
  o << " DP" << world / (sizes.tp * sizes.cp * sizes.pp) << " mb" << micro_batch << " " << recompute_name;
  return o.str();
}

ModelSize model_size(const ModelConfig& config) {
  const ParamTable table(config);
  int64_t experts = 0;
  for (const ParamSpec& s : table.specs())
    if (s.kind == ParamKind::expert) experts += s.numel();
  ModelSize m;
  m.total = table.parameters();
  m.active = m.total - experts;
  if (config.num_experts > 0) m.active += experts / config.num_experts * config.num_experts_per_tok;
  return m;
}

ModelConfig trainer_config(const Workload& w, const Candidate& c) {
  ModelConfig config = w.config;
  // As the trainer's constructor does (train/trainer.cpp): Megatron's vocabulary padding and MoE folding.
  const int64_t multiple = w.vocab_divisible_by * std::max(1, c.sizes.tp);
  config.padded_vocab_size = ceil_div(config.vocab_size, multiple) * multiple;
  const int etp = c.sizes.etp == 0 ? c.sizes.tp : c.sizes.etp;
  config.experts_folded = etp == 1 && c.sizes.tp > 1 && config.num_moe_layers() > 0;
  config.force_load_balancing = true;  // the planner's bytes and activations assume balanced routing
  return config;
}

std::string layout_error(const Workload& w, const Candidate& c) {
  ParallelSizes sizes = c.sizes;
  if (sizes.etp == 0) sizes.etp = sizes.tp;
  std::vector<std::string> errors;
  try {
    const Layout layout = checked_layout(c.world, sizes, c.sequence_parallel, trainer_config(w, c), w.seq_len);
    // The trainer's own checks (train/trainer.cpp): whole micro-batches per DP rank, and the schedule's.
    const int64_t per_step = c.micro_batch * layout.dp();
    if (w.global_batch % per_step != 0)
      errors.push_back(detail::concat("global batch ", w.global_batch, " is not a multiple of micro-batch x DP (",
                                      c.micro_batch, " x ", layout.dp(), ")"));
    else
      ScheduleSpec{layout.pp(), layout.vpp(), static_cast<int>(w.global_batch / per_step)}.validate();
    if (c.sizes.etp != 0 && c.sizes.etp != c.sizes.tp)
      errors.push_back("ETP other than TP (folded experts) is not modelled by the planner yet");
    c.recompute.validate();
  } catch (const Error& e) {
    errors.push_back(e.what());
  }
  std::string out;
  for (const std::string& e : errors) out += (out.empty() ? "" : "\n") + e;
  return out;
}

namespace {

RankPlan plan_rank_cached(const Workload& w, const Candidate& c, const ModelConfig& config, int pp_rank, int cp_rank,
                          Device device, PlanCache& cache) {
  const ParallelSizes& s = c.sizes;
  const int t = s.tp, cp = s.cp, p = s.pp, v = s.vpp, e = s.ep, world = c.world;
  const int d = world / (t * cp * p), dcp = d * cp, edp = world / (t * e * p);
  const bool sp = c.sequence_parallel && t > 1;
  const bool own_expert_group = e > 1;                   // (folded experts are not enumerated)
  const double ba = device == Device::cuda ? 2.0 : 4.0;  // activation dtype: bf16 on CUDA, f32 on the CPU
  const int64_t B = c.micro_batch, Sl = w.seq_len / cp, N = B * Sl, Nl = sp ? N / t : N;
  const int64_t M = w.global_batch / (B * d);  // micro-batches per step
  const double H = static_cast<double>(config.hidden_size), E = static_cast<double>(config.num_experts),
               K = static_cast<double>(config.num_experts_per_tok);
  const bool moe_model = config.num_moe_layers() > 0;
  const int64_t nkv_local = config.num_key_value_heads >= t ? config.num_key_value_heads / t : 1;
  const double Hv = static_cast<double>(config.linear_num_value_heads / t),
               dk = static_cast<double>(config.linear_key_head_dim),
               dv = static_cast<double>(config.linear_value_head_dim),
               conv_local = static_cast<double>(config.conv_dim() / t);
  const std::vector<ChunkInfo> chunks = cache.chunk_info(config, c, pp_rank);
  const LayerFlops& lf = cache.layer_flops_of(w.config, w.seq_len);

  RankPlan rp;
  rp.pp_rank = pp_rank;
  rp.cp_rank = cp_rank;
  AxisBytes& by = rp.bytes;
  RankMemory& mem = rp.memory;
  const double Md = static_cast<double>(M), Nd = static_cast<double>(N), Nld = static_cast<double>(Nl);
  const int stages = p * v;
  const std::vector<std::vector<int>>* flight = p > 1 ? &in_flight(p, v, static_cast<int>(M)) : nullptr;
  // Tokens this rank computes per step: its DP replica's sequences, split over TP and CP.
  const double rank_tokens = static_cast<double>(w.global_batch / d) * static_cast<double>(w.seq_len) / (t * cp);
  int64_t transient = 0;
  SharedScratchCount shared_scratch;  // what the rank's earlier chunks hold in their shared scratch
  for (size_t k = 0; k < chunks.size(); ++k) {
    const ChunkInfo& ch = chunks[k];
    const double Lf = static_cast<double>(ch.full_attention), Ll = static_cast<double>(ch.linear),
                 Lm = static_cast<double>(ch.moe), Ls = static_cast<double>(ch.shared);
    rp.params += ch.params;
    // TP: the region boundaries (4 per layer, the embedding's exit, the lm_head's entry), the MoE layers' top-k
    // weight and shared-gate gradients, the vocab-parallel loss's 3 numbers per row; per step the gradient sync.
    if (t > 1) {
      const double regions = 4.0 * static_cast<double>(ch.layers) + (ch.stage.first ? 1 : 0) + (ch.stage.last ? 1 : 0);
      const double region_bytes = sp ? 2.0 * regions * ag(t, Nd / t * H, ba) : regions * ar(t, Nd * H, ba);
      const double moe_bytes = Lm * ar(t, Nd * K, 4) + Ls * ar(t, Nd, 4);
      const double loss_bytes = ch.stage.last ? ag(t, 3 * Nd, 4) : 0.0;
      by[Axis::tp] += Md * (region_bytes + moe_bytes + loss_bytes) + ar(t, static_cast<double>(ch.grad_sync), 4);
    }
    // CP: attention all-gathers K and V forward and reduce-scatters their gradients backward; DeltaNet passes the
    // conv halo across the chunk boundaries this rank's chunks touch, and all-gathers the states (parallel.md).
    if (cp > 1) {
      const bool zigzag = s.cp_order == CpOrder::zigzag;
      const double G = zigzag ? 2 : 1;
      const int edges = (cp_rank > 0) + (cp_rank + 1 < cp);
      const double halo_messages = zigzag ? 2.0 * edges : edges;
      const double halo =
          static_cast<double>(B) * static_cast<double>(config.linear_conv_kernel_dim - 1) * conv_local * 4;
      const double per_micro =
          Lf * 4 * ag(cp, static_cast<double>(B * Sl * nkv_local * config.head_dim), ba) +
          Ll * (halo_messages * halo + G * (cp - 1) * static_cast<double>(B) * Hv * dk * (dk + 2 * dv) * 4);
      by[Axis::cp] += Md * per_micro;
    }
    // PP: every micro-batch crosses each boundary of this chunk once forward and once backward, with the router
    // statistics (2E floats) of a MoE model.
    if (p > 1) {
      const int vs = static_cast<int>(k) * p + pp_rank;
      const int crossings = (vs + 1 < stages) + (vs > 0);
      by[Axis::pp] += crossings * Md * (Nld * H * ba + (moe_model ? 2 * E * 4 : 0.0));
    }
    // EP: per MoE layer and micro-batch the dispatch plan (row counts, local expert ids) and the routed rows, each
    // way forward and backward (balanced routing: N K / EP rows to every EP rank).
    if (e > 1) {
      const double rows = Nd * K / e;
      by[Axis::ep] += Md * Lm * ((e - 1) * 8.0 + (e - 1) * rows * 4.0 + 4.0 * (e - 1) * rows * H * ba);
    }
    // DP x CP: the loss sums and MoE statistics of every micro-batch (the last stage), ZeRO-1 of the dense segment;
    // EDP: ZeRO-1 of the routed experts under EP.
    const bool split_experts = own_expert_group && ch.experts > 0;
    const int64_t dense_segment = split_experts ? ch.dense : ch.params;
    if (ch.stage.last) by[Axis::dp_cp] += Md * (ar(dcp, 2, 8) + (moe_model ? ar(dcp, 2 * E + 1, 8) : 0.0));
    const int64_t dense_cap = ceil_div(dense_segment, dcp);
    by[Axis::dp_cp] += 2 * ag(dcp, static_cast<double>(dense_cap), 4);
    mem.optimizer += 8 * dense_cap;
    if (dcp > 1) mem.buffers += 4 * (dcp * dense_cap + dense_cap);
    if (split_experts) {
      const int64_t cap = ceil_div(ch.experts, edp);
      by[Axis::edp] += 2 * ag(edp, static_cast<double>(cap), 4);
      mem.optimizer += 8 * cap;
      if (edp > 1) mem.buffers += 4 * (edp * cap + cap);
    }
    // Memory: fp32 parameters and gradients (+ the bf16 copy the CUDA GEMMs read), the TP sync buffer.
    mem.weights += (device == Device::cuda ? 6 : 4) * ch.params;
    mem.grads += 4 * ch.params;
    mem.buffers += 4 * ch.grad_sync;
    ActivationShape shape;
    shape.B = B;
    shape.S = Sl;
    shape.tp = t;
    shape.sequence_parallel = sp;
    shape.pipeline = p > 1;
    shape.cp = cp;
    shape.cp_rank = cp_rank;
    shape.cp_order = s.cp_order;
    shape.device = device;
    // The records in flight (their Tensors: host vectors are not accelerator memory) and the chunk's buffers outside
    // them, one copy whatever is in flight, with the largest buffer a call allocates and frees.
    const ActivationBytes record = activation_record_bytes(ch.local, ch.stage, shape, c.recompute);
    const int records = flight ? (*flight)[pp_rank][k] : 1;
    mem.activations += records * (record.total() - record.host);
    // The rank's chunks share one scratch per layer kind (model/decoder.h LayerScratchPool).
    const ScratchBytes scratch = scratch_bytes(ch.local, ch.stage, shape, c.recompute, &shared_scratch);
    mem.scratch += scratch.total() - scratch.transient;
    transient = std::max(transient, scratch.transient);
    // FLOPs: the chunk's layers (and lm_head) on this rank's tokens, 3 x forward; recomputation reruns forwards.
    double fwd = Lf * lf.attention + Ll * lf.linear + Lm * lf.moe + static_cast<double>(ch.dense_mlp) * lf.dense_mlp;
    double re = 0;
    if (c.recompute.granularity == "full") {
      re = fwd;
    } else if (c.recompute.granularity == "selective") {
      if (c.recompute.recomputes_module("core_attn")) re += Lf * lf.attention_core + Ll * lf.linear_core;
      if (c.recompute.recomputes_module("mlp")) re += static_cast<double>(ch.dense_mlp) * lf.dense_mlp;
      if (c.recompute.recomputes_module("moe"))
        re += Lm * lf.moe;
      else if (c.recompute.recomputes_module("shared_experts"))
        re += Lm * lf.moe_shared;
    }
    if (ch.stage.last) fwd += lf.head;
    rp.flops += 3 * fwd * rank_tokens;
    rp.recompute_flops += re * rank_tokens;
  }
  mem.scratch += transient;
  // The input gradients waiting to be sent back, with their statistics, in the runner's send buffers.
  if (p > 1)
    mem.activations += send_buffers(p, v, static_cast<int>(M))[static_cast<size_t>(pp_rank)] *
                       (static_cast<int64_t>(Nl * config.hidden_size * static_cast<int64_t>(ba)) +
                        (moe_model ? 8 * config.num_experts : 0));
  if (p > 1) by[Axis::pp] += ar(p, 3, 8);  // the losses, shared from the last stage
  by[Axis::world] = ar(world, 1, 8);       // the gradient norm's sum of squares
  return rp;
}

// evaluate() of a layout already known valid.
Plan evaluate_valid(const Workload& w, const Candidate& c, const Cluster& cluster, double efficiency,
                    PlanCache& cache) {
  Plan plan;
  plan.layout = c;
  if (plan.layout.sizes.etp == 0) plan.layout.sizes.etp = plan.layout.sizes.tp;
  const ParallelSizes& s = plan.layout.sizes;
  plan.dp = c.world / (s.tp * s.cp * s.pp);
  plan.edp = c.world / (s.etp * s.ep * s.pp);
  plan.microbatches = w.global_batch / (c.micro_batch * plan.dp);
  const ModelConfig config = trainer_config(w, plan.layout);
  double compute = 0, recompute = 0, optimizer_bytes = 0;
  bool first = true;
  for (int r = 0; r < s.pp; ++r)
    for (int q = 0; q < s.cp; ++q) {
      const RankPlan rp = plan_rank_cached(w, plan.layout, config, r, q, cluster.device, cache);
      if (r == 0 && q == 0) plan.rank0 = rp;
      if (first || rp.memory.total() > plan.largest.memory.total()) plan.largest = rp;
      first = false;
      for (int a = 0; a < kAxes; ++a) plan.max_bytes.bytes[a] = std::max(plan.max_bytes.bytes[a], rp.bytes.bytes[a]);
      compute = std::max(compute, rp.flops);
      recompute = std::max(recompute, rp.recompute_flops);
      // AdamW streams p, g, m, v in and p, m, v out over the shard (28 bytes an element); CUDA then casts the whole
      // buffer to bf16 (4 in, 2 out).
      const double shard = static_cast<double>(rp.memory.optimizer) / 8;
      optimizer_bytes = std::max(optimizer_bytes, 28 * shard + (cluster.device == Device::cuda ? 6.0 * rp.params : 0));
    }
  plan.fits = static_cast<double>(plan.largest.memory.total()) <= cluster.memory_bytes;
  const double rate = cluster.peak_flops * efficiency;
  plan.compute_s = compute / rate;
  plan.recompute_s = recompute / rate;
  if (s.pp > 1)
    plan.bubble_s = static_cast<double>(s.pp - 1) / (static_cast<double>(s.vpp) * plan.microbatches) *
                    (plan.compute_s + plan.recompute_s);
  plan.optimizer_s = optimizer_bytes / cluster.memory_bytes_per_s;
  // A group is on one node when its ranks span at most a node (rank order tp-cp-ep-dp-pp, tp fastest).
  const int span[kAxes] = {s.tp,   s.tp * s.cp, s.tp * s.cp * plan.dp, c.world, s.etp * s.ep, s.etp * s.ep * plan.edp,
                           c.world};
  double comm = 0;
  for (int a = 0; a < kAxes; ++a) {
    const double bw =
        span[a] <= cluster.gpus_per_node ? cluster.intra_node_bytes_per_s : cluster.inter_node_bytes_per_s;
    plan.comm_s[a] = plan.max_bytes.bytes[a] / bw;
    comm += plan.comm_s[a];
  }
  plan.step_s = plan.compute_s + plan.recompute_s + plan.bubble_s + comm + plan.optimizer_s;
  const double tokens = static_cast<double>(w.global_batch) * static_cast<double>(w.seq_len);
  plan.tokens_per_s = tokens / plan.step_s;
  plan.mfu = plan.tokens_per_s * training_flops_per_token(w.config, w.seq_len) / (c.world * cluster.peak_flops);
  return plan;
}

}  // namespace

RankPlan plan_rank(const Workload& w, const Candidate& c, int pp_rank, int cp_rank, Device device) {
  PlanCache cache;
  return plan_rank_cached(w, c, trainer_config(w, c), pp_rank, cp_rank, device, cache);
}

Plan evaluate(const Workload& w, const Candidate& c, const Cluster& cluster, double efficiency) {
  const std::string err = layout_error(w, c);
  NEXTRON_CHECK(err.empty(), "layout ", c.describe(), ": ", err);
  PlanCache cache;
  return evaluate_valid(w, c, cluster, efficiency, cache);
}

std::vector<Plan> enumerate(const Workload& w, int world, const SearchSpace& space, const Cluster& cluster,
                            double efficiency) {
  NEXTRON_CHECK(world >= 1, "GPU count ", world, ": give a positive number");
  std::vector<int> divisors;
  for (int k = 1; k <= world; ++k)
    if (world % k == 0) divisors.push_back(k);
  const bool moe = w.config.num_moe_layers() > 0;
  PlanCache cache;
  std::vector<Plan> out;
  for (int tp : divisors) {
    if (tp > space.max_tp) continue;
    for (int cp : divisors) {
      if (cp > space.max_cp || world % (tp * cp) != 0) continue;
      for (int pp : divisors) {
        if (pp > space.max_pp || world % (tp * cp * pp) != 0) continue;
        for (int vpp = 1; vpp <= (pp > 1 ? space.max_vpp : 1); ++vpp) {
          if (w.config.num_hidden_layers % (pp * vpp) != 0) continue;
          for (int ep : divisors) {
            if (ep > space.max_ep || (!moe && ep > 1) || world % (tp * ep * pp) != 0) continue;
            for (int64_t mb : space.micro_batches)
              for (const std::string& rc : space.recompute) {
                Candidate c;
                c.world = world;
                c.sizes.tp = tp;
                c.sizes.cp = cp;
                c.sizes.pp = pp;
                c.sizes.vpp = vpp;
                c.sizes.ep = ep;
                c.sizes.etp = tp;
                c.sequence_parallel = tp > 1;
                c.micro_batch = mb;
                c.recompute_name = rc;
                c.recompute = recompute_preset(rc);
                if (!layout_error(w, c).empty()) continue;
                out.push_back(evaluate_valid(w, c, cluster, efficiency, cache));
              }
          }
        }
      }
    }
  }
  std::stable_sort(out.begin(), out.end(), [](const Plan& a, const Plan& b) {
    if (a.fits != b.fits) return a.fits;
    return a.step_s < b.step_s;
  });
  return out;
}

}  // namespace nextron::plan
