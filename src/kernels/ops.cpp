#include "kernels/ops.h"

#include "core/error.h"
#include "kernels/cpu/gated_delta_rule.h"

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

int64_t gated_delta_rule_saved_elements(Device device, int64_t B, int64_t S, int64_t Hk, int64_t Hv, int64_t dk,
                                        int64_t dv) {
  if (device == Device::cpu) return cpu::gated_delta_rule_chunk_states_elements({B, S, Hk, Hv, dk, dv});
  // CUDA (kernels/cuda/gated_delta_rule_fwd.cu, carve_intermediates): at head dims rounded up to 16, Gc 4N, W 2N dk,
  // U and Vn 2N dv each, h_c 2 B Hv NC dk dv bytes (N = B Hv S rows), each rounded up to 256 bytes.
  auto r16 = [](int64_t d) { return (d + 15) / 16 * 16; };
  auto r256 = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t N = B * Hv * S, dkp = r16(dk), dvp = r16(dv), NC = (S + 63) / 64;
  const int64_t bytes = r256(4 * N) + r256(2 * N * dkp) + 2 * r256(2 * N * dvp) + r256(2 * B * Hv * NC * dkp * dvp);
  return bytes / 4;
}

void check_gdr_saved(const Tensor* t, Device device, const Tensor& q, const Tensor& v, const char* what) {
  if (t == nullptr) return;
  const int64_t want =
      gated_delta_rule_saved_elements(device, q.dim(0), q.dim(1), q.dim(2), v.dim(2), q.dim(3), v.dim(3));
  NEXTRON_CHECK(t->dtype() == DType::f32 && t->numel() == want, what, ": the saved intermediates hold ", t->numel(),
                " elements, this shape needs ", want, " f32 (size them with gated_delta_rule_saved_elements)");
}

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
