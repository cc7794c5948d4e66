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

struct ParamSpec {
  std::string name;  // nextron name, e.g. "layers.3.linear_attn.in_proj_qkvz"
  Shape shape;       // shape inside nextron (row-major)
  int tp_dim = -1;   // dimension split by tensor parallelism, -1 when replicated
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
  void add(std::string name, Shape shape, int tp_dim, ParamKind kind, bool decay, std::vector<HfPiece> hf);
  // Adds a parameter that is exactly one HF tensor of the same shape.
  void add_simple(const std::string& name, const std::string& hf_name, Shape shape, int tp_dim, bool decay);
  std::vector<ParamSpec> specs_;
  std::map<std::string, size_t> index_;
  int64_t total_ = 0;
};

}  // namespace nextron
