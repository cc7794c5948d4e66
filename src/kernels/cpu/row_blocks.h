// Deterministic column sums of per-row terms (weight gradients of norms and gates), shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace nextron::cpu {

// Calls row_fn(n, partial) for every row n in [0, N), in parallel over a fixed split of the rows into at most 64
// blocks. `partial` (W zero-initialised doubles) belongs to the row's block; row_fn adds the row's terms into it.
// Returns the column sums of the block partials, added in block order, so the result does not depend on the
// thread count. With W == 0, row_fn gets nullptr and every row is its own unit of work.
template <typename RowFn>
std::vector<double> rows_with_column_sums(int64_t N, int64_t W, RowFn row_fn) {
  const int64_t nblk = W > 0 ? std::max<int64_t>(1, std::min<int64_t>(N, 64)) : N;
  std::vector<double> part(W > 0 ? nblk * W : 0, 0.0);
#pragma omp parallel for
  for (int64_t blk = 0; blk < nblk; ++blk) {
    double* pw = W > 0 ? part.data() + blk * W : nullptr;
    for (int64_t n = blk * N / nblk; n < (blk + 1) * N / nblk; ++n) row_fn(n, pw);
  }
  std::vector<double> sums(W, 0.0);
  for (int64_t blk = 0; blk < (W > 0 ? nblk : 0); ++blk)
    for (int64_t c = 0; c < W; ++c) sums[c] += part[blk * W + c];
  return sums;
}

}  // namespace nextron::cpu
