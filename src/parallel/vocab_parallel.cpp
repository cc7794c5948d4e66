#include "parallel/vocab_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cross_entropy.h"

namespace nextron {

namespace {
bool held(int64_t id, const VocabShard& s) { return id >= s.begin && id < s.begin + s.size; }
}  // namespace

void vocab_parallel_embedding_forward(float* out, const float* table_local, const int64_t* ids, int64_t N, int64_t H,
                                      const VocabShard& shard) {
  for (int64_t n = 0; n < N; ++n)
    NEXTRON_CHECK(ids[n] >= 0 && ids[n] < shard.full, "embedding: token id ", ids[n], " at position ", n,
                  " is outside the vocabulary [0, ", shard.full, ")");
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    if (held(ids[n], shard))
      std::memcpy(out + n * H, table_local + (ids[n] - shard.begin) * H, H * sizeof(float));
    else
      std::memset(out + n * H, 0, H * sizeof(float));
  }
}

void vocab_parallel_embedding_backward(float* dtable_local, const float* dout, const int64_t* ids, int64_t N, int64_t H,
                                       const VocabShard& shard) {
  // Parallel over column blocks, rows in order: repeated ids accumulate in a fixed order.
  constexpr int64_t kCols = 64;
  const int64_t blocks = (H + kCols - 1) / kCols;
#pragma omp parallel for
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t h0 = b * kCols, h1 = std::min(H, h0 + kCols);
    for (int64_t n = 0; n < N; ++n) {
      if (!held(ids[n], shard)) continue;
      float* d = dtable_local + (ids[n] - shard.begin) * H;
      const float* g = dout + n * H;
      for (int64_t h = h0; h < h1; ++h) d[h] += g[h];
    }
  }
}

void vocab_parallel_cross_entropy_forward(double* loss_sum, int64_t* count, float* row_loss, float* lse,
                                          const float* logits_local, const int64_t* targets, int64_t N,
                                          const VocabShard& shard, const TensorParallel& tp) {
  for (int64_t n = 0; n < N; ++n)
    NEXTRON_CHECK(targets[n] == cpu::kIgnoreIndex || (targets[n] >= 0 && targets[n] < shard.full),
                  "cross_entropy: target ", targets[n], " at position ", n, " is outside the vocabulary [0, ",
                  shard.full, ") and is not the ignore index ", cpu::kIgnoreIndex);
  const int64_t V = shard.size, P = tp.size();
  // 1. The row maxima over the whole vocabulary: gather every rank's local maxima (N floats each).
  std::vector<float> local_max(N), all_max(N * P);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* x = logits_local + n * V;
    float m = x[0];
    for (int64_t v = 1; v < V; ++v) m = std::max(m, x[v]);
    local_max[n] = m;
  }
  if (tp.active())
    tp.comm()->all_gather(local_max.data(), all_max.data(), N);
  else
    all_max = local_max;
  // 2. Partial sums of exp(x - max) and the target logit (from the rank holding it), summed over the group.
  std::vector<double> sums(2 * N);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    float m = all_max[n];
    for (int64_t p = 1; p < P; ++p) m = std::max(m, all_max[p * N + n]);
    local_max[n] = m;
    const float* x = logits_local + n * V;
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(x[v] - m);
    sums[n] = s;
    sums[N + n] = targets[n] != cpu::kIgnoreIndex && held(targets[n], shard) ? double(x[targets[n] - shard.begin]) : 0;
  }
  tp.sum(sums.data(), 2 * N);
  double total = 0;
  int64_t c = 0;
  for (int64_t n = 0; n < N; ++n) {
    const double l = double(local_max[n]) + std::log(sums[n]);
    lse[n] = float(l);
    const double loss = targets[n] == cpu::kIgnoreIndex ? 0.0 : l - sums[N + n];
    total += loss;
    c += targets[n] != cpu::kIgnoreIndex;
    if (row_loss) row_loss[n] = float(loss);
  }
  *loss_sum = total;
  *count = c;
}

void vocab_parallel_cross_entropy_backward(float* dlogits_local, const float* logits_local, const float* lse,
                                           const int64_t* targets, float scale, int64_t N, const VocabShard& shard) {
  const int64_t V = shard.size;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] == cpu::kIgnoreIndex) continue;
    const float* x = logits_local + n * V;
    float* dx = dlogits_local + n * V;
    const float l = lse[n];
    for (int64_t v = 0; v < V; ++v) dx[v] += scale * std::exp(x[v] - l);
    if (held(targets[n], shard)) dx[targets[n] - shard.begin] -= scale;
  }
}

}  // namespace nextron
