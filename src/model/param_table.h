// The parameter table: one entry per parameter tensor of the model, the single source from which the flat
// buffers, the HF checkpoint names, weight-decay groups and (later) tensor-parallel shards, gradient reduction
// groups, ZeRO ranges and distributed-checkpoint keys are derived.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace nextron {

// Where a parameter is replicated or split under tensor/expert parallelism (used by src/parallel).
enum class ParamKind {
  dense,   // reduced over the dense data-parallel group
  expert,  // routed-expert weights: split over the expert-parallel group, reduced over expert-data-parallel
};

// One HF checkpoint tensor that covers a contiguous block of a parameter (a parameter may pack several HF
// tensors, e.g. [gate_proj; up_proj] of a SwiGLU, or one tensor per expert).
struct HfPiece {
  std::string hf_name;
  int64_t offset = 0;  // elements from the start of the parameter
  Shape shape;         // shape of the HF tensor (its element count is contiguous in the parameter)
};

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
  explicit ParamTable(const ModelConfig& config);

  const std::vector<ParamSpec>& specs() const { return specs_; }
  const ParamSpec& get(const std::string& name) const;
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  int64_t total_numel() const { return total_; }
  // A tensor view of parameter `name` inside `flat` (params, grads or optimizer state: same layout).
  Tensor view(const Tensor& flat, const std::string& name) const;

 private:
  ParamSpec& add(std::string name, Shape shape, int tp_dim, ParamKind kind, bool decay, std::vector<HfPiece> hf);
  // Adds a parameter that is exactly one HF tensor of the same shape.
  ParamSpec& add_simple(const std::string& name, const std::string& hf_name, Shape shape, int tp_dim, bool decay);
  std::vector<ParamSpec> specs_;
  std::map<std::string, size_t> index_;
  int64_t total_ = 0;
};

}  // namespace nextron
