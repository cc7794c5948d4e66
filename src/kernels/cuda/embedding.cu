// Token embedding on the GPU (model.embed_tokens; CPU reference: kernels/cpu/embedding.cpp), for a table that holds
// the whole vocabulary or, under tensor parallelism, one rank's slice of it: the V_local rows are ids
// [vocab_begin, vocab_begin + V_local) of a vocabulary of V_full ids (kernels/vocab_shard.h). An id is "held" when
// it falls in that slice; its local row is id - vocab_begin.
//
// Forward: one thread per output element out[n, h] = bf16(table[ids[n] - vocab_begin, h]) for held ids, and zero
// for the other valid ids (another rank holds them; the sum over the ranks is the full lookup). Grid-stride, 64-bit
// indices. A bad id (outside [0, V_full)) cannot throw from the device: the row is written as zeros and the first
// bad id seen is recorded in *bad_id (an atomicCAS from 0, so a later error never overwrites an earlier report the
// caller has not read yet). Every rank checks against V_full, so each reports the same ids.
//
// Backward: dtable[v] += sum of dout[n] over the tokens n with local id v (ids[n] - vocab_begin == v), summed in
// token order, with no atomics on the table. The rows are first grouped by local id with a stable counting sort in
// the caller's scratch:
//   1. count:    row_offsets[v] = number of tokens with local id v (integer atomics: exact, order-free);
//   2. scan:     row_offsets[v] = start of id v in the sorted order (exclusive scan, one block of kScanThreads,
//                each thread owning a contiguous chunk of the V_local + 1 entries);
//   3. scatter:  one warp walks the tokens in order, 32 at a time; __match_any_sync groups the lanes with the same
//                id, the lowest lane of a group advances the id's cursor row_offsets[v] by the group size and each
//                lane writes its token at cursor + (its rank in the group). Tokens are placed in token order, so the
//                sort is stable; afterwards row_offsets[v] = end of id v's rows (= start of id v + 1);
//   4. reduce:   one block per sorted position p; the block whose p starts a run of equal ids adds that run's rows
//                to dtable[v] in token order (each thread owns columns h: acc = dtable[v, h]; acc += rows; store),
//                the same fp32 additions in the same order as the CPU reference.
// Step 3 is serial over N / 32 warp steps (about 1 us each), which is small next to a training step; the rest is
// parallel. Tokens whose id this table does not hold (another rank's, or bad: the forward reports those) are
// skipped by every step, so the sort and the scratch are sized by the local rows.
#include <algorithm>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/elementwise.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;
constexpr int kScanThreads = 1024;
constexpr int kReduceThreads = 256;

// The local row of `id` in a table holding ids [begin, begin + V_local), or -1 when the table does not hold it.
// Compared before subtracting, so that no id (however negative) overflows.
__device__ __forceinline__ int64_t local_row(int64_t id, int64_t begin, int64_t V_local) {
  return id >= begin && id - begin < V_local ? id - begin : -1;
}

// out: (N, H) bf16; table: (V_local, H) fp32 holding ids [begin, begin + V_local); ids: (N) in [0, V_full).
__global__ void embedding_forward_kernel(bf16* out, const float* table, const int64_t* ids, int64_t N, int64_t H,
                                         int64_t V_local, int64_t begin, int64_t V_full, int64_t* bad_id) {
  const int64_t total = N * H;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / H, h = i % H;
    const int64_t v = ids[n];
    const int64_t row = local_row(v, begin, V_local);
    out[i] = row >= 0 ? to_bf16(table[row * H + h]) : to_bf16(0.0f);
    if (!(v >= 0 && v < V_full) && h == 0 && bad_id) {
      // Nonzero for every bad id: id + 1 for ids >= V_full, the id itself for negative ids (see elementwise.h).
      // Unsigned arithmetic so that id + 1 cannot overflow a signed value.
      const unsigned long long flag = v < 0 ? (unsigned long long)v : (unsigned long long)v + 1ull;
      atomicCAS(reinterpret_cast<unsigned long long*>(bad_id), 0ull, flag);
    }
  }
}

// Step 1: counts[v] += 1 per token with a held id of local row v (counts zeroed by the caller).
__global__ void count_ids_kernel(int64_t* counts, const int64_t* ids, int64_t N, int64_t V_local, int64_t begin) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = local_row(ids[n], begin, V_local);
    if (v >= 0) atomicAdd(reinterpret_cast<unsigned long long*>(counts + v), 1ull);
  }
}

// Step 2: in-place exclusive scan of a (n) with one block of kScanThreads: thread t owns the contiguous chunk
// [t chunk, (t + 1) chunk); chunk totals are scanned serially by thread 0 (kScanThreads steps in shared memory).
__global__ void __launch_bounds__(kScanThreads) exclusive_scan_kernel(int64_t* a, int64_t n) {
  __shared__ int64_t totals[kScanThreads];
  const int64_t chunk = (n + kScanThreads - 1) / kScanThreads;
  const int64_t lo = min(n, int64_t(threadIdx.x) * chunk), hi = min(n, lo + chunk);
  int64_t sum = 0;
  for (int64_t i = lo; i < hi; ++i) sum += a[i];
  totals[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t run = 0;
    for (int t = 0; t < kScanThreads; ++t) {
      const int64_t c = totals[t];
      totals[t] = run;
      run += c;
    }
  }
  __syncthreads();
  int64_t run = totals[threadIdx.x];
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t c = a[i];
    a[i] = run;
    run += c;
  }
}

// Step 3: stable scatter by one warp (launch with a single block of 32 threads). cursor[v] starts at the start of
// local id v and ends at its end.
__global__ void stable_scatter_kernel(int64_t* sorted_rows, int64_t* cursor, const int64_t* ids, int64_t N,
                                      int64_t V_local, int64_t begin) {
  const unsigned lane = threadIdx.x;
  for (int64_t base = 0; base < N; base += 32) {
    const int64_t n = base + lane;
    const int64_t v = n < N ? local_row(ids[n], begin, V_local) : -1;
    const bool held = v >= 0;
    // Lanes without a held id get a key no local row can equal, so they never join a group of held lanes.
    const unsigned long long key = held ? (unsigned long long)v : ~0ull;
    const unsigned group = __match_any_sync(0xffffffffu, key);
    const int leader = __ffs(group) - 1;
    const int rank = __popc(group & ((1u << lane) - 1u));
    int64_t start = 0;
    if (held && int(lane) == leader) {
      start = cursor[v];
      cursor[v] = start + __popc(group);
    }
    start = __shfl_sync(0xffffffffu, start, leader);
    if (held) sorted_rows[start + rank] = n;
    // Make this step's cursor updates visible to the lanes that lead the next step's groups.
    __syncwarp();
  }
}

// Step 4: block p handles the run of equal ids starting at sorted position p (if p starts one).
// dtable: (V_local, H) fp32; dout: (N, H) bf16; run_end[v] = end of local id v's rows in sorted_rows for
// v < V_local, and run_end[V_local] = the number of held tokens (the scan's total, which the scatter leaves alone).
// Every sorted row holds an id of this table, so ids[...] - begin is its local row.
__global__ void reduce_runs_kernel(float* dtable, const bf16* dout, const int64_t* ids, const int64_t* sorted_rows,
                                   const int64_t* run_end, int64_t H, int64_t V_local, int64_t begin) {
  const int64_t p = blockIdx.x;
  if (p >= run_end[V_local]) return;  // past the held tokens
  const int64_t id = ids[sorted_rows[p]];
  if (p > 0 && ids[sorted_rows[p - 1]] == id) return;  // not the first row of its run
  const int64_t v = id - begin;
  const int64_t end = run_end[v];
  float* dst = dtable + v * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = dst[h];
    for (int64_t q = p; q < end; ++q) acc += to_f32(dout[sorted_rows[q] * H + h]);
    dst[h] = acc;
  }
}

}  // namespace

void embedding_forward(bf16* out, const float* table, const int64_t* ids, int64_t N, int64_t H, int64_t V_local,
                       int64_t vocab_begin, int64_t V_full, int64_t* bad_id, cudaStream_t stream) {
  const int64_t total = N * H;
  if (total <= 0) return;
  embedding_forward_kernel<<<grid_stride_blocks(total), kThreads, 0, stream>>>(out, table, ids, N, H, V_local,
                                                                               vocab_begin, V_full, bad_id);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void embedding_backward(float* dtable, const bf16* dout, const int64_t* ids, int64_t N, int64_t H, int64_t V_local,
                        int64_t vocab_begin, int64_t* scratch_sorted_rows, int64_t* scratch_row_offsets,
                        cudaStream_t stream) {
  if (!dtable || N <= 0 || H <= 0 || V_local <= 0) return;
  int64_t* offsets = scratch_row_offsets;  // (V_local + 1): counts, then starts, then ends of each id's rows
  NEXTRON_CUDA_CHECK(cudaMemsetAsync(offsets, 0, size_t(V_local + 1) * sizeof(int64_t), stream));
  count_ids_kernel<<<grid_stride_blocks(N), kThreads, 0, stream>>>(offsets, ids, N, V_local, vocab_begin);
  NEXTRON_CUDA_LAUNCH_CHECK();
  exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(offsets, V_local + 1);
  NEXTRON_CUDA_LAUNCH_CHECK();
  stable_scatter_kernel<<<1, 32, 0, stream>>>(scratch_sorted_rows, offsets, ids, N, V_local, vocab_begin);
  NEXTRON_CUDA_LAUNCH_CHECK();
  reduce_runs_kernel<<<unsigned(N), kReduceThreads, 0, stream>>>(dtable, dout, ids, scratch_sorted_rows, offsets, H,
                                                                 V_local, vocab_begin);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
