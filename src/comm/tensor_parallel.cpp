#include "comm/tensor_parallel.h"

#include "core/error.h"

namespace nextron {

TensorParallel::TensorParallel(Communicator* comm, bool sequence_parallel) : comm_(comm), sp_(sequence_parallel) {}

namespace {

// The collectives on Tensors: f32 or bf16 buffers that live where the communicator moves data.
void check_buffer(const Communicator& comm, const Tensor& t) {
  NEXTRON_CHECK(t.device() == comm.buffer_device(), "tensor parallelism: the TP communicator moves ",
                comm.buffer_device() == Device::cpu ? "host" : "GPU", " buffers but the model's tensors are on the ",
                t.device() == Device::cpu ? "host" : "GPU",
                " (internal: build the TP group over NCCL with --device cuda, over MPI with --device cpu)");
  NEXTRON_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16, "tensor parallelism: cannot communicate ",
                dtype_name(t.dtype()), " tensors");
}

void all_reduce(Communicator& comm, Tensor& t, int64_t n) {
  check_buffer(comm, t);
  comm.all_reduce_sum(t.raw(), n, t.dtype());
}

void reduce_scatter(Communicator& comm, const Tensor& in, Tensor& out, int64_t count) {
  check_buffer(comm, in);
  check_buffer(comm, out);
  NEXTRON_ASSERT(in.dtype() == out.dtype());
  comm.reduce_scatter_sum(in.raw(), out.raw(), count, in.dtype());
}

void gather(Communicator& comm, const Tensor& in, Tensor& out, int64_t count) {
  check_buffer(comm, in);
  check_buffer(comm, out);
  NEXTRON_ASSERT(in.dtype() == out.dtype());
  comm.all_gather(in.raw(), out.raw(), count, in.dtype());
}

}  // namespace

const Tensor& TensorParallel::enter_forward(Ops& ops, const Tensor& x_local, Tensor& scratch, int64_t rows,
                                            int64_t W) const {
  if (!sequence_parallel()) return x_local;  // copy_to_tensor_region: identity
  NEXTRON_ASSERT(rows % size() == 0);
  Tensor& full = ops.ensure(scratch, {rows, W}, x_local.dtype());
  gather(*comm_, x_local, full, local_rows(rows) * W);  // gather_from_sequence_region
  return full;
}

void TensorParallel::enter_backward(Ops& ops, Tensor& dx_region, Tensor& dx_local, Tensor& scratch, int64_t rows,
                                    int64_t W) const {
  if (!active()) return;  // one rank: the caller passes dx_region as its local gradient
  const int64_t n = local_rows(rows) * W;
  Tensor summed;
  if (sequence_parallel()) {
    Tensor& part = ops.ensure(scratch, {local_rows(rows), W}, dx_region.dtype());
    reduce_scatter(*comm_, dx_region, part, n);  // conjugate of the all-gather
    summed = part;
  } else {
    all_reduce(*comm_, dx_region, n);  // conjugate of the identity
    summed = dx_region.reshape({rows, W});
  }
  Tensor out = dx_local.reshape({local_rows(rows), W});
  ops.add(out, out, summed);
}

void TensorParallel::exit_forward(Tensor& y_region, Tensor& y_local, int64_t rows, int64_t W) const {
  if (!active()) {
    if (y_local.raw() != y_region.raw()) y_local.copy_from(y_region);
    return;
  }
  const int64_t n = local_rows(rows) * W;
  if (sequence_parallel()) {
    reduce_scatter(*comm_, y_region, y_local, n);  // reduce_scatter_to_sequence_region
    return;
  }
  all_reduce(*comm_, y_region, n);  // reduce_from_tensor_region
  if (y_local.raw() != y_region.raw()) y_local.copy_from(y_region);
}

const Tensor& TensorParallel::exit_backward(Ops& ops, const Tensor& dy_local, Tensor& scratch, int64_t rows,
                                            int64_t W) const {
  if (!sequence_parallel()) return dy_local;  // conjugate of the all-reduce: identity
  Tensor& full = ops.ensure(scratch, {rows, W}, dy_local.dtype());
  gather(*comm_, dy_local, full, local_rows(rows) * W);  // conjugate of the reduce-scatter
  return full;
}

void TensorParallel::sum(Tensor& t) const {
  if (active()) all_reduce(*comm_, t, t.numel());
}

void TensorParallel::all_gather(const Tensor& in, Tensor& out) const {
  NEXTRON_ASSERT(out.numel() == size() * in.numel());
  if (active())
    gather(*comm_, in, out, in.numel());
  else
    out.copy_from(in);
}

}  // namespace nextron
