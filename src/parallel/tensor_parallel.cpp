#include "parallel/tensor_parallel.h"

#include <cstring>

#include "core/error.h"
#include "model/module.h"

namespace nextron {

TensorParallel::TensorParallel(Communicator* comm, bool sequence_parallel) : comm_(comm), sp_(sequence_parallel) {}

const float* TensorParallel::enter_forward(const float* x_local, Tensor& scratch, int64_t rows, int64_t W) const {
  if (!sequence_parallel()) return x_local;  // copy_to_tensor_region: identity
  NEXTRON_ASSERT(rows % size() == 0);
  float* full = buffer(scratch, {rows, W});
  comm_->all_gather(x_local, full, local_rows(rows) * W);  // gather_from_sequence_region
  return full;
}

void TensorParallel::enter_backward(float* dx_region, float* dx_local, Tensor& scratch, int64_t rows, int64_t W) const {
  const int64_t n = local_rows(rows) * W;
  const float* summed = dx_region;
  if (sequence_parallel()) {
    float* part = buffer(scratch, {local_rows(rows), W});
    comm_->reduce_scatter_sum(dx_region, part, n);  // conjugate of the all-gather
    summed = part;
  } else if (active()) {
    comm_->all_reduce_sum(dx_region, n);  // conjugate of the identity
  }
  for (int64_t i = 0; i < n; ++i) dx_local[i] += summed[i];
}

void TensorParallel::exit_forward(float* y_region, float* y_local, int64_t rows, int64_t W) const {
  const int64_t n = local_rows(rows) * W;
  if (sequence_parallel()) {
    comm_->reduce_scatter_sum(y_region, y_local, n);  // reduce_scatter_to_sequence_region
    return;
  }
  if (active()) comm_->all_reduce_sum(y_region, n);  // reduce_from_tensor_region
  if (y_local != y_region) std::memcpy(y_local, y_region, n * sizeof(float));
}

const float* TensorParallel::exit_backward(const float* dy_local, Tensor& scratch, int64_t rows, int64_t W) const {
  if (!sequence_parallel()) return dy_local;  // conjugate of the all-reduce: identity
  float* full = buffer(scratch, {rows, W});
  comm_->all_gather(dy_local, full, local_rows(rows) * W);  // conjugate of the reduce-scatter
  return full;
}

void TensorParallel::sum(float* buf, int64_t n) const {
  if (active()) comm_->all_reduce_sum(buf, n);
}
void TensorParallel::sum(double* buf, int64_t n) const {
  if (active()) comm_->all_reduce_sum(buf, n);
}

}  // namespace nextron
