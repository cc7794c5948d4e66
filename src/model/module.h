// Shared plumbing for model modules: parameter views by name, through which a module hands its weights to the Ops.
#pragma once

#include <string>

#include "core/tensor.h"
#include "kernels/ops.h"
#include "model/param_table.h"

namespace nextron {

// The model's flat buffers (all laid out by one ParamTable): fp32 master parameters, their copy in the activation
// dtype (the CUDA backend's bf16 GEMM operands; the same tensor as params on the CPU) and fp32 gradients.
struct FlatBuffers {
  Tensor params, params_act, grads;
};

// The parameters and gradients of one module: views into the model's flat buffers, looked up by the module's
// name prefix in the parameter table (e.g. "layers.3.linear_attn.").
class ModuleWeights {
 public:
  ModuleWeights(const ParamTable& table, const FlatBuffers& flat, std::string prefix)
      : table_(&table), flat_(&flat), prefix_(std::move(prefix)) {}
  bool has(const std::string& name) const { return table_->contains(prefix_ + name); }
  ParamRef p(const std::string& name) const {
    const std::string full = prefix_ + name;
    return {table_->view(flat_->params, full), table_->view(flat_->params_act, full), table_->view(flat_->grads, full)};
  }
  // The parameter, or an empty optional-like pointer target when the config has none (biases).
  const ParamRef* p_or_null(const std::string& name, ParamRef& slot) const {
    if (!has(name)) return nullptr;
    slot = p(name);
    return &slot;
  }
  // The weights of a child module, e.g. sub("shared_expert.").
  ModuleWeights sub(const std::string& prefix) const { return {*table_, *flat_, prefix_ + prefix}; }

 private:
  const ParamTable* table_;
  const FlatBuffers* flat_;  // owned by the model, outlives its modules
  std::string prefix_;
};

}  // namespace nextron
