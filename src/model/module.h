// Shared plumbing for model modules: parameter/gradient views by name and reusable activation buffers.
#pragma once

#include <string>

#include "core/tensor.h"
#include "model/param_table.h"

namespace nextron {

// The parameters and gradients of one module: views into the model's flat buffers, looked up by the module's
// name prefix in the parameter table (e.g. "layers.3.linear_attn.").
class ModuleWeights {
 public:
  ModuleWeights(const ParamTable& table, const Tensor& params, const Tensor& grads, std::string prefix)
      : table_(&table), params_(params), grads_(grads), prefix_(std::move(prefix)) {}
  bool has(const std::string& name) const { return table_->contains(prefix_ + name); }
  float* w(const std::string& name) const { return table_->view(params_, prefix_ + name).f32(); }
  float* g(const std::string& name) const { return table_->view(grads_, prefix_ + name).f32(); }
  float* w_or_null(const std::string& name) const { return has(name) ? w(name) : nullptr; }
  float* g_or_null(const std::string& name) const { return has(name) ? g(name) : nullptr; }
  // The weights of a child module, e.g. sub("shared_expert.").
  ModuleWeights sub(const std::string& prefix) const { return {*table_, params_, grads_, prefix_ + prefix}; }

 private:
  const ParamTable* table_;
  Tensor params_, grads_;
  std::string prefix_;
};

// An activation buffer of the given shape, reallocated only when the shape changes (so steps of a fixed batch
// shape allocate nothing).
inline float* buffer(Tensor& t, const Shape& shape) {
  if (!t.defined() || t.shape() != shape) t = Tensor::zeros(shape);
  return t.f32();
}
// The same, zero-filled: the target of accumulating (+=) backward kernels.
inline float* zeroed(Tensor& t, const Shape& shape) {
  float* p = buffer(t, shape);
  t.zero_();
  return p;
}

}  // namespace nextron
