#include "kernels/ops.h"

#include "core/error.h"

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

void check_conv_split(ConvSplit split, int64_t C, const Tensor& y, const Tensor& x) {
  NEXTRON_CHECK(y.numel() == x.numel(), "conv1d_silu: the output has ", y.numel(), " elements, the input ", x.numel());
  NEXTRON_CHECK(!split.active() || (split.c1 <= split.c2 && split.c2 <= C), "conv1d_silu: channel split at ", split.c1,
                ", ", split.c2, " is not within 0 <= c1 <= c2 <= C = ", C);
}

Tensor Ops::index_table(const std::vector<int32_t>& idx) const {
  Tensor t = allocate({static_cast<int64_t>(idx.size())}, DType::i32);
  if (!idx.empty()) upload(t, idx.data(), idx.size() * sizeof(int32_t));
  return t;
}

}  // namespace nextron
