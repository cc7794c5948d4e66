// The context-parallel (CP) group as the mixers see it: each CP rank holds part of every sequence, and what crosses
// the rank boundaries is the causal conv's left context, attention's keys and values, and the DeltaNet recurrent
// state, not the tokens. One object, the forward and its backward side by side; a default-constructed
// ContextParallel is CP 1, where both are the identity (a zero incoming state, a zero final-state gradient).
//
// Which tokens a rank holds (CpOrder): the sequence is cut into equal chunks and
//   contiguous   CP chunks, rank c holds chunk c: causal attention's work grows with c (the last rank attends to the
//                whole sequence, the first to 1/CP of it), but slices may be uneven or odd for the DeltaNet layers
//   zigzag       2 CP chunks, rank c holds chunks c and 2CP-1-c (Megatron's load balancing): every rank's queries
//                attend to the same number of keys, (2CP + 1) S / (4 CP) on average
// The local rows are the rank's chunks in sequence order (chunk c first): "segments" below. Every per-sequence
// computation that runs along the sequence (the conv, the delta rule) treats the B x Sl local rows as B x segments
// items of one chunk each: (B, Sl, ...) is (B segments, L, ...) in memory, item b segments + i being segment i of
// sequence b. Segment boundaries are chunk boundaries, so each item's left context and incoming state come from the
// previous chunk, wherever that lives (another rank, or for the zigzag's middle chunk CP, this rank's chunk CP-1).
//
//   pair                  forward                                          backward
//   conv_halo             every chunk's last K-1 pre-conv rows -> the      the gradient of the received rows -> back
//                         next chunk's owner (its causal conv's context)   to their owner, added to its rows' gradient
//   kv                    all-gather the keys / values of the chunks up    reduce-scatter (sum) their gradients back
//                         to this rank's last (every segment's causal      to the chunks' owners
//                         context is a prefix of them)
//   delta_states          all-gather (M_c, L_c) of every chunk, prefix     all-gather the chunks' local dS_in, suffix
//                         in chunk order -> S_in of this rank's chunks     -> the gradient reaching each final state
//
// Bytes per layer and B sequences (b = 4 bytes, G = segments per rank): the halo B (K-1) CD b per chunk boundary
// that crosses ranks, each way; the states (all-gather accounting) forward (CP - 1) G B Hv dk (dk + dv) b, backward
// (CP - 1) G B Hv dk dv b: all independent of the sequence length.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "kernels/ops.h"

namespace nextron {

enum class CpOrder { contiguous, zigzag };
const char* cp_order_name(CpOrder order);

// One run of consecutive tokens of every sequence held by a CP rank: global chunk `chunk`, at local rows
// [local_begin, +length) and sequence positions [global_begin, +length).
struct CpSegment {
  int chunk = 0;
  int64_t local_begin = 0, global_begin = 0, length = 0;
};
// The segments of rank `rank` of `size` holding Sl tokens of every sequence (equal slices: Sl = S / size; zigzag
// needs Sl even).
std::vector<CpSegment> cp_segments(CpOrder order, int size, int rank, int64_t Sl);

class ContextParallel {
 public:
  ContextParallel() = default;  // CP 1
  // cp: the CP group over host memory (not owned), ranks ordered as the chunks; rows: the same ranks over the
  // model's memory (NCCL for GPU buffers; nullptr: cp).
  explicit ContextParallel(Communicator* cp, Communicator* rows = nullptr, CpOrder order = CpOrder::contiguous)
      : cp_(cp), rows_(rows ? rows : cp), order_(order) {}

  int size() const { return cp_ ? cp_->size() : 1; }
  int rank() const { return cp_ ? cp_->rank() : 0; }
  bool active() const { return size() > 1; }
  CpOrder order() const { return order_; }
  // Chunks per sequence, and this rank's share of them (both 1 at CP 1).
  int chunks() const { return segments() * size(); }
  int segments() const { return active() && order_ == CpOrder::zigzag ? 2 : 1; }
  // This rank's segments when it holds Sl tokens of every sequence.
  std::vector<CpSegment> segments_of(int64_t Sl) const { return cp_segments(order_, size(), rank(), Sl); }
  // Whether this rank's chunks start the sequence (their incoming states are zero) / end it (nothing reads their final
  // states): then the delta rule's first pass is already exact.
  bool holds_only_first_chunk() const { return segments() == 1 && rank() == 0; }
  bool holds_only_last_chunk() const { return segments() == 1 && rank() + 1 == size(); }

  // last_rows (G, n floats; per segment e.g. (B, K-1, CD)): every segment's last pre-conv rows, sent to the owner of
  // the chunk after it; halo (G, n): per segment the rows before it (zeros before the sequence's first chunk).
  void conv_halo_forward(const float* last_rows, float* halo, int64_t n) const;
  // d_halo (G, n): the gradient of the received rows, sent back to their owners; d_last_rows (G, n): the gradient
  // of every segment's last rows from the chunk after it (zeros after the last chunk), to be added to theirs.
  void conv_halo_backward(const float* d_halo, float* d_last_rows, int64_t n) const;

  // kv (B, Sl, W) of this rank's tokens (Sl equal on every rank) -> gathered (B, (c + 1) L, W): the chunks 0 .. c in
  // sequence order, c this rank's last chunk (L = Sl / G), resized. Segment i's causal context is the first
  // (chunk_i + 1) L rows of every sequence.
  void kv_all_gather(const Ops& ops, const Tensor& kv, Tensor& gathered) const;
  // d_gathered (B, (c + 1) L, W): this rank's gradient of those rows -> d_kv (B, Sl, W): the sum over the ranks of
  // their gradients of this rank's chunks, overwritten.
  void kv_reduce_scatter(const Ops& ops, const Tensor& d_gathered, Tensor& d_kv) const;
  // This rank's last chunk (the end of its widest causal context).
  int last_chunk() const { return chunk_of_segment(segments() - 1); }

  // transition (B G, Hv, dk, dk) and local_final (B G, Hv, dk, dv): per item (sequence, segment) its chunk's M_c and
  // final state from a zero start. Writes gathered_m (chunks, B, Hv, dk, dk): every chunk's transition in sequence
  // order, which the caller keeps for the backward, and state_in (B G, Hv, dk, dv): the state entering every item.
  void delta_states_forward(const float* transition, const float* local_final, float* gathered_m, float* state_in,
                            int64_t B, int64_t Hv, int64_t dk, int64_t dv) const;
  // local_in_grad (B G, Hv, dk, dv): every item's dS_in from its backward with a zero final-state gradient;
  // gathered_m from the forward. Writes final_grad (B G, Hv, dk, dv): the gradient reaching every item's final state.
  void delta_states_backward(const float* gathered_m, const float* local_in_grad, float* final_grad, int64_t B,
                             int64_t Hv, int64_t dk, int64_t dv) const;

 private:
  Communicator* cp_ = nullptr;
  Communicator* rows_ = nullptr;
  CpOrder order_ = CpOrder::contiguous;
  int chunk_of_segment(int i) const { return i == 0 ? rank() : chunks() - 1 - rank(); }
  int owner_of(int chunk) const { return chunk < size() ? chunk : chunks() - 1 - chunk; }
  int segment_in_owner(int chunk) const { return chunk < size() ? 0 : 1; }
  // Sends every segment's `out` block (n floats) to the owner of the chunk `step` after it and receives into each
  // segment's `in` block the block of the chunk `step` before it (zeros where that chunk does not exist).
  void exchange_with_neighbour_chunks(int step, const float* out, float* in, int64_t n) const;
};

}  // namespace nextron
