#include "parallel/tensor_parallel.h"

#include <cstring>

#include "core/error.h"

namespace nextron {

TensorParallel::TensorParallel(Communicator* comm, bool sequence_parallel) : comm_(comm), sp_(sequence_parallel) {}

namespace {

// The region boundaries move activations through the communicator as f32 host buffers (the CPU backend); the
// CUDA backend runs with TP 1 until its bf16 collectives land (ParallelContext refuses the layout before this).
float* f32_data(const Tensor& t) {
  NEXTRON_CHECK(t.device() == Device::cpu && t.dtype() == DType::f32,
                "tensor parallelism runs on the CPU backend only for now: use --tensor-model-parallel-size 1 with "
                "--device cuda");
  return t.f32();
}

Tensor& host_buffer(Tensor& t, const Shape& shape) {
  if (!t.defined() || t.shape() != shape || t.dtype() != DType::f32 || t.device() != Device::cpu)
    t = Tensor::zeros(shape);
  return t;
}

}  // namespace

const Tensor& TensorParallel::enter_forward(const Tensor& x_local, Tensor& scratch, int64_t rows, int64_t W) const {
  if (!sequence_parallel()) return x_local;  // copy_to_tensor_region: identity
  NEXTRON_ASSERT(rows % size() == 0);
  Tensor& full = host_buffer(scratch, {rows, W});
  comm_->all_gather(f32_data(x_local), full.f32(), local_rows(rows) * W);  // gather_from_sequence_region
  return full;
}

void TensorParallel::enter_backward(Tensor& dx_region, Tensor& dx_local, Tensor& scratch, int64_t rows,
                                    int64_t W) const {
  if (!active()) return;  // one rank: the caller passes dx_region as its local gradient
  const int64_t n = local_rows(rows) * W;
  const float* summed = f32_data(dx_region);
  if (sequence_parallel()) {
    Tensor& part = host_buffer(scratch, {local_rows(rows), W});
    comm_->reduce_scatter_sum(f32_data(dx_region), part.f32(), n);  // conjugate of the all-gather
    summed = part.f32();
  } else {
    comm_->all_reduce_sum(f32_data(dx_region), n);  // conjugate of the identity
  }
  float* out = f32_data(dx_local);
  for (int64_t i = 0; i < n; ++i) out[i] += summed[i];
}

void TensorParallel::exit_forward(Tensor& y_region, Tensor& y_local, int64_t rows, int64_t W) const {
  if (!active()) {
    if (y_local.raw() != y_region.raw()) y_local.copy_from(y_region);
    return;
  }
  const int64_t n = local_rows(rows) * W;
  if (sequence_parallel()) {
    comm_->reduce_scatter_sum(f32_data(y_region), f32_data(y_local), n);  // reduce_scatter_to_sequence_region
    return;
  }
  comm_->all_reduce_sum(f32_data(y_region), n);  // reduce_from_tensor_region
  if (y_local.raw() != y_region.raw()) std::memcpy(f32_data(y_local), y_region.f32(), n * sizeof(float));
}

const Tensor& TensorParallel::exit_backward(const Tensor& dy_local, Tensor& scratch, int64_t rows, int64_t W) const {
  if (!sequence_parallel()) return dy_local;  // conjugate of the all-reduce: identity
  Tensor& full = host_buffer(scratch, {rows, W});
  comm_->all_gather(f32_data(dy_local), full.f32(), local_rows(rows) * W);  // conjugate of the reduce-scatter
  return full;
}

void TensorParallel::sum(float* buf, int64_t n) const {
  if (active()) comm_->all_reduce_sum(buf, n);
}
void TensorParallel::sum(double* buf, int64_t n) const {
  if (active()) comm_->all_reduce_sum(buf, n);
}

}  // namespace nextron
