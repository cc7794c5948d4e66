#include "comm/context_parallel.h"

#include <algorithm>

#include "kernels/cpu/delta_state_scan.h"

namespace nextron {

const char* cp_order_name(CpOrder order) { return order == CpOrder::zigzag ? "zigzag" : "contiguous"; }

std::vector<CpSegment> cp_segments(CpOrder order, int size, int rank, int64_t Sl) {
  if (order == CpOrder::contiguous || size == 1) return {CpSegment{rank, 0, rank * Sl, Sl}};
  NEXTRON_CHECK(Sl % 2 == 0, "zigzag context parallelism: ", Sl,
                " tokens per rank cannot be two equal chunks; choose --seq-len a multiple of 2 x CP = ", 2 * size,
                " or --context-parallel-order contiguous");
  const int64_t L = Sl / 2;
  const int last = 2 * size - 1 - rank;
  return {CpSegment{rank, 0, rank * L, L}, CpSegment{last, L, last * L, L}};
}

void ContextParallel::exchange_with_neighbour_chunks(int step, const float* out, float* in, int64_t n) const {
  const int G = segments(), nc = chunks(), me = rank();
  std::vector<P2PMessage> messages;
  for (int i = 0; i < G; ++i) {
    const int chunk = chunk_of_segment(i), to = chunk + step, from = chunk - step;
    if (to >= 0 && to < nc) {
      if (owner_of(to) == me)  // the zigzag's chunks CP-1 and CP, both on rank CP-1
        std::copy_n(out + i * n, n, in + segment_in_owner(to) * n);
      else
        messages.push_back({true, const_cast<float*>(out + i * n), n, DType::f32, owner_of(to), to});
    }
    if (from < 0 || from >= nc)
      std::fill_n(in + i * n, n, 0.0f);
    else if (owner_of(from) != me)
      messages.push_back({false, in + i * n, n, DType::f32, owner_of(from), chunk});
  }
  if (!messages.empty()) cp_->batch_send_recv(messages);
}

void ContextParallel::conv_halo_forward(const float* last_rows, float* halo, int64_t n) const {
  exchange_with_neighbour_chunks(+1, last_rows, halo, n);
}

void ContextParallel::conv_halo_backward(const float* d_halo, float* d_last_rows, int64_t n) const {
  exchange_with_neighbour_chunks(-1, d_halo, d_last_rows, n);
}

void ContextParallel::kv_all_gather(const Ops& ops, const Tensor& kv, Tensor& gathered) const {
  const int64_t B = kv.dim(0), Sl = kv.dim(1), W = kv.numel() / (B * Sl), n = size(), L = Sl / segments(),
                end = last_chunk() + 1;
  ops.ensure(gathered, {B, end * L, W}, kv.dtype());
  if (n == 1) {
    gathered.copy_from(kv.reshape({B, Sl, W}));
    return;
  }
  // The all-gather delivers rank-major (CP, B, Sl, W) blocks; the context is re-laid out batch-major in sequence order.
  Tensor all;
  ops.ensure(all, {n, B, Sl, W}, kv.dtype());
  rows_->all_gather(kv.raw(), all.raw(), B * Sl * W, kv.dtype());
  for (int64_t b = 0; b < B; ++b)
    for (int c = 0; c < end; ++c)
      gathered.copy_elements_from((b * end + c) * L * W, all,
                                  ((owner_of(c) * B + b) * Sl + segment_in_owner(c) * L) * W, L * W);
}

void ContextParallel::kv_reduce_scatter(const Ops& ops, const Tensor& d_gathered, Tensor& d_kv) const {
  const int64_t B = d_kv.dim(0), Sl = d_kv.dim(1), W = d_kv.numel() / (B * Sl), n = size(), L = Sl / segments(),
                end = last_chunk() + 1;
  NEXTRON_ASSERT(d_gathered.numel() == B * end * L * W);
  if (n == 1) {
    d_kv.copy_from(d_gathered.reshape(d_kv.shape()));
    return;
  }
  // Rank-major (CP, B, Sl, W) blocks, zero for the chunks after this rank's last (they were not attended to).
  Tensor all;
  ops.ensure(all, {n, B, Sl, W}, d_kv.dtype());
  ops.zero(all);
  for (int64_t b = 0; b < B; ++b)
    for (int c = 0; c < end; ++c)
      all.copy_elements_from(((owner_of(c) * B + b) * Sl + segment_in_owner(c) * L) * W, d_gathered,
                             (b * end + c) * L * W, L * W);
  rows_->reduce_scatter_sum(all.raw(), d_kv.raw(), B * Sl * W, d_kv.dtype());
}

void ContextParallel::delta_states_forward(const float* transition, const float* local_final, float* gathered_m,
                                           float* state_in, int64_t B, int64_t Hv, int64_t dk, int64_t dv) const {
  const int64_t mi = Hv * dk * dk, si = Hv * dk * dv, mb = B * mi, sb = B * si, n = size(), G = segments(),
                nc = chunks();
  if (n == 1) {
    std::copy_n(transition, mb, gathered_m);
    std::fill_n(state_in, sb, 0.0f);
    return;
  }
  // One all-gather of [M | L] of every item, then a prefix in chunk order up to this rank's last chunk.
  const int64_t block = G * (mb + sb);
  std::vector<float> mine(static_cast<size_t>(block)), all(static_cast<size_t>(n * block));
  std::copy_n(transition, G * mb, mine.begin());
  std::copy_n(local_final, G * sb, mine.begin() + G * mb);
  cp_->all_gather(mine.data(), all.data(), block);
  std::vector<float> finals(static_cast<size_t>(nc * sb));
  for (int c = 0; c < nc; ++c) {
    const float* from = all.data() + owner_of(c) * block;
    const int64_t p = segment_in_owner(c);
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(from + (b * G + p) * mi, mi, gathered_m + (c * B + b) * mi);
      std::copy_n(from + G * mb + (b * G + p) * si, si, finals.begin() + (c * B + b) * si);
    }
  }
  const int last = chunk_of_segment(static_cast<int>(G) - 1);
  std::vector<float> states(static_cast<size_t>((last + 1) * sb));
  cpu::prefix_states<float>(states.data(), gathered_m, finals.data(), last + 1, B, Hv, dk, dv);
  for (int i = 0; i < G; ++i)
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(states.begin() + (chunk_of_segment(i) * B + b) * si, si, state_in + (b * G + i) * si);
}

void ContextParallel::delta_states_backward(const float* gathered_m, const float* local_in_grad, float* final_grad,
                                            int64_t B, int64_t Hv, int64_t dk, int64_t dv) const {
  const int64_t si = Hv * dk * dv, sb = B * si, n = size(), G = segments(), nc = chunks();
  if (n == 1) {
    std::fill_n(final_grad, sb, 0.0f);
    return;
  }
  std::vector<float> all(static_cast<size_t>(n * G * sb)), in_grads(static_cast<size_t>(nc * sb)),
      grads(static_cast<size_t>(nc * sb));
  cp_->all_gather(local_in_grad, all.data(), G * sb);
  for (int c = 0; c < nc; ++c)
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(all.begin() + owner_of(c) * G * sb + (b * G + segment_in_owner(c)) * si, si,
                  in_grads.begin() + (c * B + b) * si);
  cpu::suffix_final_grads<float>(grads.data(), gathered_m, in_grads.data(), nc, B, Hv, dk, dv);
  for (int i = 0; i < G; ++i)
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(grads.begin() + (chunk_of_segment(i) * B + b) * si, si, final_grad + (b * G + i) * si);
}

}  // namespace nextron
