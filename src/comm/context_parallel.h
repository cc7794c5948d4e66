// The context-parallel (CP) group as a Gated DeltaNet layer sees it: each CP rank holds a consecutive slice of every
// sequence, and the recurrent state crosses the slice boundaries instead of the tokens (the math:
// kernels/cpu/delta_state_scan.h). One object, the forward and its backward side by side; a default-constructed
// ContextParallel is CP 1, where both are the identity (a zero incoming state, a zero final-state gradient).
//
//   pair                  forward                                          backward
//   conv_halo             this slice's last K-1 pre-conv rows -> the       the gradient of the received rows -> back
//                         next rank (the causal conv's left context)       to their owner, added to its rows' gradient
//   kv                    all-gather the slices' keys / values up to       reduce-scatter (sum) their gradients back
//                         this rank's end (attention's causal context)     to the slices' owners
//   delta_states          all-gather (M_c, L_c), prefix -> S_in of this    all-gather the slices' local dS_in, suffix
//                         rank's slice                                     -> the gradient reaching this slice's
//                                                                          final state
//
// Bytes per layer and sequence batch (b = 4): the halo B (K-1) CD b each way (point to point, every rank but one);
// the states (all-gather accounting) forward (CP - 1) B Hv dk (dk + dv) b, backward (CP - 1) B Hv dk dv b: all
// independent of the sequence length.
#pragma once

#include <cstdint>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "kernels/ops.h"

namespace nextron {

class ContextParallel {
 public:
  ContextParallel() = default;  // CP 1
  // cp: the CP group over host memory (not owned), ranks ordered as the slices; rows: the same ranks over the
  // model's memory (NCCL for GPU buffers; nullptr: cp).
  explicit ContextParallel(Communicator* cp, Communicator* rows = nullptr) : cp_(cp), rows_(rows ? rows : cp) {}

  int size() const { return cp_ ? cp_->size() : 1; }
  int rank() const { return cp_ ? cp_->rank() : 0; }
  bool active() const { return size() > 1; }

  // last_rows (n floats, e.g. (B, K-1, CD)): this slice's last pre-conv rows, sent to the next rank; halo (n):
  // the previous rank's, received (zeros on rank 0, whose slice starts the sequence).
  void conv_halo_forward(const float* last_rows, float* halo, int64_t n) const;
  // d_halo (n): the gradient of the received rows, sent back to the previous rank; d_last_rows (n): the next rank's
  // gradient of this rank's last rows (zeros on the last rank), to be added to their gradient.
  void conv_halo_backward(const float* d_halo, float* d_last_rows, int64_t n) const;

  // kv (B, Sl, W) of this rank's slice (every rank's slice of the same length Sl) -> gathered (B, (rank + 1) Sl, W):
  // the slices 0 .. rank in sequence order, resized.
  void kv_all_gather(const Ops& ops, const Tensor& kv, Tensor& gathered) const;
  // d_gathered (B, (rank + 1) Sl, W), this rank's gradient of those rows -> d_kv (B, Sl, W): the sum over the ranks
  // of their gradients of this rank's slice, overwritten.
  void kv_reduce_scatter(const Ops& ops, const Tensor& d_gathered, Tensor& d_kv) const;

  // transition (B, Hv, dk, dk) and local_final (B, Hv, dk, dv): this rank's slice's M_c and final state from a zero
  // start. Writes gathered_m (CP, B, Hv, dk, dk): every slice's transition, which the caller keeps for the backward,
  // and state_in (B, Hv, dk, dv): the state entering this rank's slice.
  void delta_states_forward(const float* transition, const float* local_final, float* gathered_m, float* state_in,
                            int64_t B, int64_t Hv, int64_t dk, int64_t dv) const;
  // local_in_grad (B, Hv, dk, dv): dS_in of this rank's slice from its backward with a zero final-state gradient;
  // gathered_m from the forward. Writes final_grad (B, Hv, dk, dv): the gradient reaching this slice's final state.
  void delta_states_backward(const float* gathered_m, const float* local_in_grad, float* final_grad, int64_t B,
                             int64_t Hv, int64_t dk, int64_t dv) const;

 private:
  Communicator* cp_ = nullptr;
  Communicator* rows_ = nullptr;
};

}  // namespace nextron
