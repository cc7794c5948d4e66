#include "kernels/ops.h"

namespace nextron {

Tensor& Ops::ensure(Tensor& t, const Shape& shape, DType dtype) const {
  if (!t.defined() || t.shape() != shape || t.dtype() != dtype || t.device() != device()) t = allocate(shape, dtype);
  return t;
}

Tensor& Ops::act_zeroed(Tensor& t, const Shape& shape) const {
  act(t, shape);
  fill_zero(t);
  return t;
}

Tensor& Ops::f32_zeroed(Tensor& t, const Shape& shape) const {
  f32(t, shape);
  fill_zero(t);
  return t;
}

void Ops::zero(Tensor& t) const { fill_zero(t); }

Tensor Ops::index_table(const std::vector<int32_t>& idx) const {
  Tensor t = allocate({static_cast<int64_t>(idx.size())}, DType::i32);
  if (!idx.empty()) upload(t, idx.data(), idx.size() * sizeof(int32_t));
  return t;
}

}  // namespace nextron
