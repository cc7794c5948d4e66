// The tensor-parallel (TP) group as the model sees it: Megatron's conjugate communication pairs at the boundaries
// of the TP regions, and the TP sums a module needs inside them. A default-constructed TensorParallel is the
// single-device identity (no communication, no copies), so model code reads the same with and without TP.
//
// Inside a TP region every rank holds all B*S token rows and its slice of heads / intermediate channels / vocab.
// Outside (norms, residual stream), rows are either replicated on every TP rank, or, with sequence parallelism
// (SP), split into TP contiguous blocks of the flattened (B*S) token dim: rank r holds rows [r N/TP, (r+1) N/TP).
//
//   pair                               forward          backward         used
//   copy_to_tensor_region              identity         all-reduce       region entry without SP
//   reduce_from_tensor_region          all-reduce       identity         region exit without SP
//   gather_from_sequence_region        all-gather       reduce-scatter   region entry with SP
//   reduce_scatter_to_sequence_region  reduce-scatter   all-gather       region exit with SP
//
// enter_* / exit_* pick the pair for the mode. Buffers are (rows, W) row-major Tensors of the backend's activation
// dtype on its device (f32 host memory on the CPU, bf16 GPU memory with the CUDA backend and an NCCL group);
// scratch buffers are allocated through the Ops and reused. "local" rows are N/TP with SP and N without. With one
// rank every call is the identity and touches no memory, whatever the backend.
#pragma once

#include <cstdint>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "kernels/ops.h"

namespace nextron {

class TensorParallel {
 public:
  TensorParallel() = default;  // single device
  // comm: the TP group (not owned; may be nullptr for size 1). Its buffers must live where the model's do.
  TensorParallel(Communicator* comm, bool sequence_parallel);

  int size() const { return comm_ ? comm_->size() : 1; }
  int rank() const { return comm_ ? comm_->rank() : 0; }
  bool active() const { return size() > 1; }
  bool sequence_parallel() const { return sp_ && active(); }
  // Rows this rank holds outside the TP regions, and where they start among the N rows of the region.
  int64_t local_rows(int64_t rows) const { return sequence_parallel() ? rows / size() : rows; }
  int64_t local_row_begin(int64_t rows) const { return sequence_parallel() ? rank() * (rows / size()) : 0; }
  Communicator* comm() const { return comm_; }

  // Region entry, forward: local rows -> all N rows. Returns x_local itself when no gather is needed, else scratch.
  const Tensor& enter_forward(Ops& ops, const Tensor& x_local, Tensor& scratch, int64_t rows, int64_t W) const;
  // Region entry, backward: dx_region (N, W) holds this rank's partial gradient (modified: it is reduced in place
  // without SP); the summed gradient of the local rows is ADDED to dx_local.
  void enter_backward(Ops& ops, Tensor& dx_region, Tensor& dx_local, Tensor& scratch, int64_t rows, int64_t W) const;
  // Region exit, forward: y_region (N, W) holds this rank's partial sum (modified); the summed local rows are
  // written to y_local (which may be y_region itself when nothing is split).
  void exit_forward(Tensor& y_region, Tensor& y_local, int64_t rows, int64_t W) const;
  // Region exit, backward: local rows -> all N rows. Returns dy_local itself when no gather is needed.
  const Tensor& exit_backward(Ops& ops, const Tensor& dy_local, Tensor& scratch, int64_t rows, int64_t W) const;

  // t[i] = sum over the TP group of t[i] (f32 or bf16, in place): completes a quantity each rank computed from its
  // slice only.
  void sum(Tensor& t) const;
  // out (size() * in.numel()) = every rank's `in`, in rank order.
  void all_gather(const Tensor& in, Tensor& out) const;

 private:
  Communicator* comm_ = nullptr;
  bool sp_ = false;
};

}  // namespace nextron
