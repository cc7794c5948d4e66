// The parameter table: one entry per parameter tensor of the model, the single source from which the flat
// buffers, the HF checkpoint names, weight-decay groups and (later) tensor-parallel shards, gradient reduction
// groups, ZeRO ranges and distributed-checkpoint keys are derived.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/stage.h"

namespace nextron {

// Where a parameter is replicated or split under tensor/expert parallelism (used by src/parallel).
enum class ParamKind {
  dense,   // reduced over the dense data-parallel group
  expert,  // routed-expert weights: split over the expert-parallel group, reduced over expert-data-parallel
};

// Rows that nextron keeps in another order than the HF tensor. HF packs the Gated DeltaNet input projections per
// key-head group: in_proj_qkvz is Hk groups of [q (dk) | k (dk) | v (r dv) | z (r dv)] rows, in_proj_ba Hk groups of
// [b (r) | a (r)]. nextron keeps each part of every group together instead ([q of all heads | k | v | z]), so that
// q|k|v (the conv's input) and z are contiguous row ranges of the weight: each is one GEMM whose output needs no
// column gather, and whose gradient no scatter (issue #18). HF row g * sum(parts) + sum(parts[< p]) + j is nextron
// row groups * sum(parts[< p]) + g * parts[p] + j. groups == 0: the same order as HF.
struct HfRowGroups {
  int64_t groups = 0;
  std::vector<int64_t> parts;  // rows of each part within one group
  int64_t row = 0;             // elements per row
};

// One HF checkpoint tensor that covers a contiguous block of a parameter (a parameter may pack several HF
// tensors, e.g. [gate_proj; up_proj] of a SwiGLU, or one tensor per expert), in HF's element order unless
// `regroup` says otherwise.
struct HfPiece {
  HfPiece() = default;
  HfPiece(std::string name, int64_t first, Shape hf_shape, HfRowGroups rows = {})
      : hf_name(std::move(name)), offset(first), shape(std::move(hf_shape)), regroup(std::move(rows)) {}
  std::string hf_name;
  int64_t offset = 0;  // elements from the start of the parameter
  Shape shape;         // shape of the HF tensor (its element count is contiguous in the parameter)
  HfRowGroups regroup;
};

// The runs of the piece's elements [begin, end) (counted from the piece's start, in nextron order) that are
// contiguous in the HF tensor too: fn(nextron offset, HF offset, count) in nextron order, both from the piece's
// start. One run when the piece is in HF order; at most one per row part otherwise.
template <typename Fn>
void for_each_hf_run(const HfPiece& piece, int64_t begin, int64_t end, Fn&& fn) {
  const HfRowGroups& r = piece.regroup;
  if (r.groups == 0) {
    if (end > begin) fn(begin, begin, end - begin);
    return;
  }
  int64_t group_rows = 0;
  for (int64_t part : r.parts) group_rows += part;
  int64_t part_start = 0, before = 0;  // nextron row where part p starts; rows of parts[< p] in one group
  for (int64_t part : r.parts) {
    for (int64_t g = 0; g < r.groups; ++g) {
      const int64_t lo = (part_start + g * part) * r.row, hi = lo + part * r.row;  // nextron elements of (p, g)
      const int64_t b = std::max(begin, lo), e = std::min(end, hi);
      if (b < e) fn(b, (g * group_rows + before) * r.row + (b - lo), e - b);
    }
    part_start += r.groups * part;
    before += part;
  }
}
// A whole piece from nextron's element order into HF's (`to_hf`) or back; n = the piece's element count.
void hf_reorder(const HfPiece& piece, const float* from, float* to, bool to_hf);
// The piece's values (nextron's order, numel(piece.shape) floats) in HF's order.
std::vector<float> in_hf_order(const HfPiece& piece, const float* values);

// How the gradient of a parameter that tensor parallelism replicates (tp_dim == -1) is completed over the TP
// group after backward.
enum class TpGradSum {
  none,     // every TP rank computes the whole gradient itself (sharded parameters; router and shared-expert gate,
            // which run on the full token set on every rank)
  always,   // each rank sees only its heads: per-head norms (q_norm, k_norm, the DeltaNet gated norm)
  with_sp,  // each rank sees only its sequence shard under sequence parallelism: the residual-stream norms
};

struct ParamSpec {
  std::string name;  // nextron name, e.g. "layers.3.linear_attn.in_proj_qkvz"
  Shape shape;       // shape inside nextron (row-major)
  int tp_dim = -1;   // dimension split by tensor parallelism, -1 when replicated
  // Blocks along tp_dim that are split separately (each rank takes its 1/TP of every block), e.g. {I, I} for a packed
  // [gate; up] projection or {key_dim, key_dim, value_dim} for the DeltaNet conv channels. Empty: one block.
  std::vector<int64_t> tp_parts;
  // Rows along tp_dim that stay together (a KV head of head_dim rows). A block of fewer units than TP ranks is
  // replicated: rank r holds unit r * units / TP, shared by TP / units consecutive ranks.
  int64_t tp_unit = 1;
  TpGradSum tp_grad = TpGradSum::none;
  ParamKind kind = ParamKind::dense;
  bool weight_decay = true;  // false for norms, biases, A_log and dt_bias
  std::vector<HfPiece> hf;   // how the parameter maps onto HF tensors
  int64_t offset = 0;        // elements from the start of the flat buffer
  int64_t numel() const { return shape_numel(shape); }
};

class ParamTable {
 public:
  // The parameters of `stage` of the model (the whole model by default), with their global names, laid out in the
  // order of the whole model's table.
  explicit ParamTable(const ModelConfig& config);
  ParamTable(const ModelConfig& config, const StageRange& stage);

  const std::vector<ParamSpec>& specs() const { return specs_; }
  const ParamSpec& get(const std::string& name) const;
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // Elements of the flat buffers: the parameters and the alignment gaps after entries (below).
  int64_t total_numel() const { return total_; }
  // Parameters (the HF count of this table's slice): total_numel() without the gaps.
  int64_t parameters() const { return parameters_; }
  // Every entry starts at a multiple of this many elements (each takes its size rounded up: the layout of a stage
  // is then the concatenation of its layers', which the planner sums): 16-byte aligned rows in the bf16 shadow and
  // 32-byte in the fp32 buffers (cudaMalloc'd buffers are 256-byte aligned), as the CUDA backend's CUTLASS grouped
  // GEMM of the experts (TMA) needs, and vector loads everywhere. The gaps stay zero in every buffer.
  static constexpr int64_t kAlign = 8;
  // The flat range of the routed experts' parameters, which are last under expert parallelism (empty at the end
  // when there are none). Only for such a table: asserts that no other parameter lies inside the range.
  FlatRange expert_range() const;
  // A tensor view of parameter `name` inside `flat` (params, grads or optimizer state: same layout).
  Tensor view(const Tensor& flat, const std::string& name) const;

 private:
  ParamSpec& add(std::string name, Shape shape, int tp_dim, ParamKind kind, bool decay, std::vector<HfPiece> hf);
  // Adds a parameter that is exactly one HF tensor of the same shape.
  ParamSpec& add_simple(const std::string& name, const std::string& hf_name, Shape shape, int tp_dim, bool decay);
  std::vector<ParamSpec> specs_;
  std::map<std::string, size_t> index_;
  int64_t total_ = 0, parameters_ = 0;
  // Places `s` at the end of the layout and advances it by s's size rounded up to kAlign.
  void place(ParamSpec& s);
};

// ---- Whether a model fits this process's memory, checked from the config before anything is allocated ----

// Host bytes per parameter of a one-process CPU training run: the flat fp32 parameters and gradients
// (src/model/model.cpp) and AdamW's exp_avg and exp_avg_sq (src/optim/adamw.cpp), all laid out like the table.
// (The initial-weights vector the trainer fills, 4 more bytes, is freed before the moments are allocated.)
inline constexpr int64_t kTrainBytesPerParam = 16;
// One fp32 copy of the weights: what nextron-eval and nextron-convert hold at least.
inline constexpr int64_t kWeightsBytesPerParam = 4;
// Estimated bookkeeping of the table per HF tensor (its name, shape and offset, and the ParamSpec around it).
inline constexpr int64_t kTableBytesPerHfTensor = 256;

// The memory this process may use and where the figure comes from: the smallest of the physical memory
// (sysconf(_SC_PHYS_PAGES) x _SC_PAGE_SIZE), the container's cgroup limit (v2 memory.max, v1
// memory.limit_in_bytes) and RLIMIT_AS when set. Not MemAvailable: it is a snapshot that moves with the page cache
// and with other processes, so a check against it would refuse the same valid run on one day and pass it on the
// next; a run that needs more than the machine (or container) has can never fit, whatever else is running.
struct MemoryLimit {
  double bytes = 0;
  std::string source;  // e.g. "physical memory (sysconf)"
};
MemoryLimit host_memory_limit();

// What a run keeps in memory for its model.
struct MemoryNeed {
  int64_t bytes_per_param = kTrainBytesPerParam;  // of the flat buffers, over ModelConfig::parameter_count().total
  std::string per_param_what = "fp32 parameters, gradients and AdamW moments";
  double activation_bytes = 0;  // e.g. activation_bytes_lower_bound(); 0 when not counted
};

// A lower bound of the activations one micro-batch of a one-process run keeps until its backward: the residual
// stream at every layer boundary ((L + 1) x B x S x H) and the logits and their gradient (2 x B x S x vocab), at
// bytes_per_value (4 on the CPU). Everything else (per-layer intermediates, MoE dispatch) comes on top, so a run
// refused on this bound is certain not to fit. In double: B x S x vocab may exceed int64 for absurd options.
double activation_bytes_lower_bound(const ModelConfig& config, int64_t micro_batch, int64_t seq_len,
                                    int64_t bytes_per_value = 4);

// Bytes `need` amounts to for `config`: parameters x bytes_per_param + the table's bookkeeping + activations.
double memory_needed_bytes(const ModelConfig& config, const MemoryNeed& need);

// Throws nextron::Error when memory_needed_bytes(config, need) exceeds limit.bytes, with a message naming the part
// of the model (and its config fields) that holds most parameters, the bytes needed and the bytes available. Cheap
// (no table, no allocation): call it after parsing the config and before the first buffer of the model.
void check_fits_in_memory(const ModelConfig& config, const MemoryNeed& need,
                          const MemoryLimit& limit = host_memory_limit());

}  // namespace nextron
