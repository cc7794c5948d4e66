// Private to rmsnorm.cu / rmsnorm_gated.cu: the weight gradient of both RMSNorms, dw[d] += sum_n term(n, d), as a
// deterministic two-stage column sum over N rows through a small scratch (norm_dw_scratch_floats in norms.h).
//
// Why two stages: the norms' rows are short and many (the DeltaNet gated norm: D = 128 over N = tokens x value
// heads, about 500k rows; q_norm / k_norm: D = 256). One block per 32 columns would give D / 32 blocks, 4 to 8 on a
// 132-SM GPU, each looping over every row: latency-bound, far below the memory bandwidth. Splitting the rows into
// chunks gives about kTargetBlocks blocks; each writes its chunk's partial sums to scratch, and a second kernel adds
// the partials. Atomics would avoid the scratch but make dw depend on block timing; here every addition happens in
// an order fixed by (N, D) alone, so dw is bit-identical run to run.
//
// Chunking, a pure function of (N, D):
//   col_blocks = ceil(D / 32)
//   want       = clamp(ceil(kTargetBlocks / col_blocks), 1, ceil(N / kMinChunkRows))
//   R          = ceil(N / want)      rows per chunk
//   chunks     = ceil(N / R)         (<= want; every chunk holds rows, the last one may be short)
// chunks <= kTargetBlocks (within the 65535 limit of gridDim.y) and chunks * D <= 32 kTargetBlocks + D, so the scratch
// stays small whatever N.
//
// Stage 1, grid (col_blocks, chunks), block (32, kGroups): block (bx, c) owns columns [32 bx, 32 bx + 32) and rows
// [c R, min(N, (c + 1) R)); thread (x, y) sums column 32 bx + x over rows c R + y, c R + y + kGroups, ... in order,
// the kGroups partials are added in order of y through shared memory, and the sum goes to scratch[c D + d].
// Stage 2, one thread per column: dw[d] += scratch[0 D + d] + scratch[1 D + d] + ... (c = 0 .. chunks - 1 in order).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/device_utils.cuh"

namespace nextron::cuda::norm_dw {

inline constexpr int kCols = 32;                // columns per stage-1 block (one per lane: coalesced row segments)
inline constexpr int kGroups = 8;               // row groups per stage-1 block (block 32 x 8 = 256 threads)
inline constexpr int64_t kTargetBlocks = 1024;  // stage-1 blocks aimed for: ~8 resident per SM on a 132-SM H100
inline constexpr int64_t kMinChunkRows = 64;    // no smaller chunks: each thread gets >= 8 rows, stage 2 stays short
inline constexpr int kFinishThreads = 128;      // stage-2 block size

struct Plan {
  int64_t col_blocks = 0;      // ceil(D / 32)
  int64_t rows_per_chunk = 0;  // R
  int64_t chunks = 0;          // ceil(N / R); 0 when there is nothing to sum
};

// The chunking above (host side; the scratch size and both launches derive from it).
inline Plan plan(int64_t N, int64_t D) {
  Plan p;
  if (N <= 0 || D <= 0) return p;
  p.col_blocks = ceil_div(D, kCols);
  const int64_t want = std::clamp<int64_t>(ceil_div(kTargetBlocks, p.col_blocks), 1, ceil_div(N, kMinChunkRows));
  p.rows_per_chunk = ceil_div(N, want);
  p.chunks = ceil_div(N, p.rows_per_chunk);
  return p;
}

// Stage 1. term(n, i) is the summand of row n at flat index i = n D + d.
template <typename Term>
__global__ void __launch_bounds__(kCols* kGroups)
    partial_kernel(float* scratch, Term term, int64_t N, int64_t D, int64_t rows_per_chunk) {
  __shared__ float part[kGroups][kCols];
  const int64_t d = int64_t(blockIdx.x) * kCols + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = N - r0 < rows_per_chunk ? N : r0 + rows_per_chunk;
  float acc = 0.0f;
  if (d < D) {
#pragma unroll 4
    for (int64_t n = r0 + threadIdx.y; n < r1; n += kGroups) acc += term(n, n * D + d);
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float s = 0.0f;
    for (int g = 0; g < kGroups; ++g) s += part[g][threadIdx.x];
    scratch[int64_t(blockIdx.y) * D + d] = s;
  }
}

// Stage 2. A template only so that both .cu files may instantiate it: nvcc rejects `inline __global__`, and a plain
// kernel defined in a header included by two files would be defined twice.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) finish_kernel(float* dw, const float* scratch, int64_t chunks, int64_t D) {
  const int64_t d = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (d >= D) return;
  float s = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) s += scratch[c * D + d];
  dw[d] += s;
}

// dw[d] += sum_n term(n, n D + d) for d < D. scratch: at least plan(N, D).chunks * D floats, overwritten.
template <typename Term>
void accumulate(float* dw, float* scratch, const Term& term, int64_t N, int64_t D, cudaStream_t stream) {
  const Plan p = plan(N, D);
  if (p.chunks == 0) return;
  NEXTRON_CHECK(scratch != nullptr, "RMSNorm dw: null dw_scratch (norm_dw_scratch_floats(", N, ", ", D,
                ") floats are needed)");
  partial_kernel<Term><<<dim3(unsigned(p.col_blocks), unsigned(p.chunks)), dim3(kCols, kGroups), 0, stream>>>(
      scratch, term, N, D, p.rows_per_chunk);
  NEXTRON_CUDA_LAUNCH_CHECK();
  finish_kernel<kFinishThreads>
      <<<unsigned(ceil_div(D, kFinishThreads)), kFinishThreads, 0, stream>>>(dw, scratch, p.chunks, D);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda::norm_dw
