#include "comm/context_parallel.h"

#include <algorithm>
#include <vector>

#include "kernels/cpu/delta_state_scan.h"

namespace nextron {

namespace {
// Every rank sends `out` to rank + step and receives `in` from rank - step, where those exist; `in` is zero-filled
// where no rank sends.
void shift(Communicator* cp, int step, const float* out, float* in, int64_t n) {
  const int size = cp != nullptr ? cp->size() : 1, rank = cp != nullptr ? cp->rank() : 0;
  const int to = rank + step, from = rank - step;
  std::vector<P2PMessage> messages;
  if (to >= 0 && to < size) messages.push_back({true, const_cast<float*>(out), n, DType::f32, to, 0});
  if (from >= 0 && from < size)
    messages.push_back({false, in, n, DType::f32, from, 0});
  else
    std::fill_n(in, n, 0.0f);
  if (!messages.empty()) cp->batch_send_recv(messages);
}
}  // namespace

void ContextParallel::conv_halo_forward(const float* last_rows, float* halo, int64_t n) const {
  shift(cp_, +1, last_rows, halo, n);
}

void ContextParallel::conv_halo_backward(const float* d_halo, float* d_last_rows, int64_t n) const {
  shift(cp_, -1, d_halo, d_last_rows, n);
}

void ContextParallel::kv_all_gather(const Ops& ops, const Tensor& kv, Tensor& gathered) const {
  const int64_t B = kv.dim(0), Sl = kv.dim(1), W = kv.numel() / (B * Sl), n = size(), r = rank(), L = (r + 1) * Sl;
  ops.ensure(gathered, {B, L, W}, kv.dtype());
  if (n == 1) {
    gathered.copy_from(kv.reshape({B, L, W}));
    return;
  }
  // The all-gather delivers rank-major (CP, B, Sl, W) blocks; the prefix is re-laid out batch-major.
  Tensor all;
  ops.ensure(all, {n, B, Sl, W}, kv.dtype());
  rows_->all_gather(kv.raw(), all.raw(), B * Sl * W, kv.dtype());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c <= r; ++c)
      gathered.copy_elements_from((b * L + c * Sl) * W, all, ((c * B + b) * Sl) * W, Sl * W);
}

void ContextParallel::kv_reduce_scatter(const Ops& ops, const Tensor& d_gathered, Tensor& d_kv) const {
  const int64_t B = d_gathered.dim(0), L = d_gathered.dim(1), W = d_gathered.numel() / (B * L), n = size(), r = rank(),
                Sl = L / (r + 1);
  ops.ensure(d_kv, {B, Sl, W}, d_gathered.dtype());
  if (n == 1) {
    d_kv.copy_from(d_gathered.reshape({B, Sl, W}));
    return;
  }
  // Rank-major (CP, B, Sl, W) blocks, zero for the slices after this rank's (it did not attend to them).
  Tensor all;
  ops.ensure(all, {n, B, Sl, W}, d_gathered.dtype());
  ops.zero(all);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c <= r; ++c)
      all.copy_elements_from(((c * B + b) * Sl) * W, d_gathered, (b * L + c * Sl) * W, Sl * W);
  rows_->reduce_scatter_sum(all.raw(), d_kv.raw(), B * Sl * W, d_gathered.dtype());
}

void ContextParallel::delta_states_forward(const float* transition, const float* local_final, float* gathered_m,
                                           float* state_in, int64_t B, int64_t Hv, int64_t dk, int64_t dv) const {
  const int64_t mb = B * Hv * dk * dk, sb = B * Hv * dk * dv, n = size(), r = rank();
  std::copy_n(transition, mb, gathered_m + r * mb);
  if (n == 1) {
    std::fill_n(state_in, sb, 0.0f);
    return;
  }
  // One all-gather of [M_c | L_c] per rank, then the prefix up to this rank's slice.
  std::vector<float> mine(static_cast<size_t>(mb + sb)), all(static_cast<size_t>(n * (mb + sb)));
  std::copy_n(transition, mb, mine.begin());
  std::copy_n(local_final, sb, mine.begin() + mb);
  cp_->all_gather(mine.data(), all.data(), mb + sb);
  std::vector<float> finals(static_cast<size_t>(n * sb)), states(static_cast<size_t>((r + 1) * sb));
  for (int64_t c = 0; c < n; ++c) {
    std::copy_n(all.begin() + c * (mb + sb), mb, gathered_m + c * mb);
    std::copy_n(all.begin() + c * (mb + sb) + mb, sb, finals.begin() + c * sb);
  }
  cpu::prefix_states<float>(states.data(), gathered_m, finals.data(), r + 1, B, Hv, dk, dv);
  std::copy_n(states.begin() + r * sb, sb, state_in);
}

void ContextParallel::delta_states_backward(const float* gathered_m, const float* local_in_grad, float* final_grad,
                                            int64_t B, int64_t Hv, int64_t dk, int64_t dv) const {
  const int64_t sb = B * Hv * dk * dv, n = size(), r = rank();
  if (n == 1) {
    std::fill_n(final_grad, sb, 0.0f);
    return;
  }
  std::vector<float> all(static_cast<size_t>(n * sb)), grads(static_cast<size_t>(n * sb));
  cp_->all_gather(local_in_grad, all.data(), sb);
  cpu::suffix_final_grads<float>(grads.data(), gathered_m, all.data(), n, B, Hv, dk, dv);
  std::copy_n(grads.begin() + r * sb, sb, final_grad);
}

}  // namespace nextron
