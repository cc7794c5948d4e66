// MoE token movement on the GPU (CPU reference: kernels/cpu/moe_experts.cpp): the dispatch (the N K (token, k)
// slots sorted by expert, stable) and the gathers/scatters between token order and expert order, with backwards.
//
// Dispatch: a stable counting sort in four small kernels, deterministic by construction (integer counts only, each
// slot's position is computed, never raced for):
//   1. count: the slots are cut into C chunks of CH consecutive slots; one warp per chunk counts its slots per
//      expert (32 slots at a time: __match_any_sync groups the lanes with the same expert and the group leader adds
//      the group size to the shared counter).
//   2. scan over chunks, per expert (one block per expert): pre[e][c] = slots of expert e in chunks before c;
//      then one block scans the expert totals into expert_offsets.
//   3. scatter: one warp per chunk walks its slots in order with running per-expert positions in shared memory
//      (start: expert_offsets[e] + pre[e][c]); a lane's position is the running position plus its rank among the
//      lanes with the same expert, so within an expert slots keep increasing n K + k order. It writes the slot id
//      at its sorted position.
//   4. finalise: slot_of[slot] = position, and the slot id at each position becomes its token.
// There is no scratch argument, so the (E, C) counts live in slot_of until step 4 overwrites it: with CH >= 2 E,
// C E <= N K whenever C >= 2 (N K > (C - 1) CH >= 2 (C - 1) E >= C E); with one chunk no table is needed.
//
// Gathers/scatters: one block per row, 8 bf16 (16 bytes) per thread access when H % 8 == 0 and the buffers are
// 16-byte aligned, one element otherwise; sums over a token's k slots in k order in fp32.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/moe.h"

namespace nextron::cuda {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxDispatchExperts = 2048;  // (E + CH) ints of shared memory: at most 24 KiB per warp

// Slots per chunk: at least 2 E (so the count table fits in slot_of, see the top), a multiple of 32.
int64_t chunk_slots(int64_t E) { return ceil_div(std::max<int64_t>(256, 2 * E), 32) * 32; }

// Step 1. counts (E, C) expert-major, or, with a single chunk (counts == nullptr), totals (E) int64.
// Shared: cnt (E) then the chunk's expert ids (CH).
__global__ void dispatch_count_kernel(int32_t* counts, int64_t* totals, const int32_t* indices, int64_t NK, int E,
                                      int64_t CH, int64_t C, int32_t* bad_index) {
  extern __shared__ int shared[];
  int* cnt = shared;
  int* idx = shared + E;
  const int lane = threadIdx.x;
  const int64_t c = blockIdx.x, start = c * CH;
  const int len = int(std::min<int64_t>(CH, NK - start));
  for (int e = lane; e < E; e += 32) cnt[e] = 0;
  for (int i = lane; i < len; i += 32) idx[i] = indices[start + i];
  __syncwarp();
  for (int i0 = 0; i0 < len; i0 += 32) {
    const int i = i0 + lane;
    int e = i < len ? idx[i] : -1;
    if (i < len && (e < 0 || e >= E)) {
      if (bad_index) *bad_index = 1;
      e = -1;
    }
    const unsigned peers = __match_any_sync(kFull, e);
    const bool leader = (peers & ((1u << lane) - 1u)) == 0;
    if (e >= 0 && leader) cnt[e] += __popc(peers);  // one leader per expert: no two lanes touch the same counter
    __syncwarp();
  }
  for (int e = lane; e < E; e += 32) {
    if (counts)
      counts[int64_t(e) * C + c] = cnt[e];
    else
      totals[e] = cnt[e];
  }
}

// In-place exclusive scan of a[0, L) by the whole block (blockDim.x a multiple of 32): each thread scans a
// contiguous run serially, the run sums are scanned across the block with shuffles. Returns the total.
// warp_sums: 32 entries of shared memory.
template <typename T>
__device__ T block_exclusive_scan(T* a, int64_t L, T* warp_sums) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, warps = blockDim.x >> 5;
  const int64_t per = (L + blockDim.x - 1) / blockDim.x;
  const int64_t lo = std::min<int64_t>(L, t * per), hi = std::min<int64_t>(L, lo + per);
  T s = 0;
  for (int64_t i = lo; i < hi; ++i) s += a[i];
  T incl = s;  // inclusive scan of the run sums within the warp
  for (int o = 1; o < 32; o <<= 1) {
    const T v = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? warp_sums[lane] : T(0);
    for (int o = 1; o < 32; o <<= 1) {
      const T v = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += v;
    }
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  T run = incl - s + (warp > 0 ? warp_sums[warp - 1] : T(0));
  for (int64_t i = lo; i < hi; ++i) {
    const T v = a[i];
    a[i] = run;
    run += v;
  }
  return warp_sums[warps - 1];
}

// Step 2a (C >= 2). Block e: counts[e][0, C) -> exclusive prefix over chunks; totals[e] = its sum.
__global__ void dispatch_scan_chunks_kernel(int32_t* counts, int64_t* totals, int64_t C) {
  __shared__ int32_t warp_sums[32];
  const int64_t e = blockIdx.x;
  const int32_t total = block_exclusive_scan(counts + e * C, C, warp_sums);
  if (threadIdx.x == 0) totals[e] = total;
}

// Step 2b. offsets (E + 1): expert totals in [0, E) -> exclusive prefix, offsets[E] = N K (valid slots).
__global__ void dispatch_scan_experts_kernel(int64_t* offsets, int E) {
  __shared__ int64_t warp_sums[32];
  if (threadIdx.x == 0) offsets[E] = 0;
  __syncthreads();
  block_exclusive_scan(offsets, int64_t(E) + 1, warp_sums);
}

// Step 3. sorted (N K): the slot id at each sorted position. pre: (E, C) or nullptr (one chunk).
// Shared: the running positions (E) then the chunk's expert ids (CH).
__global__ void dispatch_scatter_kernel(int32_t* sorted, const int32_t* pre, const int64_t* offsets,
                                        const int32_t* indices, int64_t NK, int E, int64_t CH, int64_t C) {
  extern __shared__ int shared[];
  int* run = shared;
  int* idx = shared + E;
  const int lane = threadIdx.x;
  const int64_t c = blockIdx.x, start = c * CH;
  const int len = int(std::min<int64_t>(CH, NK - start));
  for (int e = lane; e < E; e += 32) run[e] = int(offsets[e]) + (pre ? pre[int64_t(e) * C + c] : 0);
  for (int i = lane; i < len; i += 32) idx[i] = indices[start + i];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;
  for (int i0 = 0; i0 < len; i0 += 32) {
    const int i = i0 + lane;
    int e = i < len ? idx[i] : -1;
    if (e >= E) e = -1;
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0) sorted[run[e] + __popc(peers & lower)] = int(start + i);
    __syncwarp();  // every lane has read run[e] before the leader advances it
    if (e >= 0 && (peers & lower) == 0) run[e] += __popc(peers);
    __syncwarp();
  }
}

// Step 4. slot_of[slot] = position; slot_token[position] = slot / K (in place over the slot ids).
__global__ void dispatch_finalize_kernel(int32_t* slot_token, int32_t* slot_of, const int64_t* offsets, int64_t NK,
                                         int E, int K) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= NK || p >= offsets[E]) return;  // positions past offsets[E] exist only with bad indices
  const int32_t s = slot_token[p];
  if (s < 0 || s >= NK) return;
  slot_of[s] = int32_t(p);
  slot_token[p] = s / K;
}

// --- gathers and scatters ---------------------------------------------------------------------------------

constexpr int kRowThreads = 128;

// V consecutive bf16 <-> fp32: V = 8 as one 16-byte access, V = 1 as a scalar.
template <int V>
__device__ __forceinline__ void load_f32(float (&f)[V], const bf16* p) {
  if constexpr (V == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  } else {
    f[0] = to_f32(*p);
  }
}
template <int V>
__device__ __forceinline__ void store_bf16(bf16* p, const float (&f)[V]) {
  if constexpr (V == 8) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
    *p = to_bf16(f[0]);
  }
}

// xs[s] = x[slot_token[s]]; block s.
template <int V>
__global__ void permute_kernel(bf16* xs, const bf16* x, const int32_t* slot_token, int64_t H) {
  const int64_t s = blockIdx.x;
  const bf16* src = x + int64_t(slot_token[s]) * H;
  bf16* dst = xs + s * H;
  for (int64_t i = int64_t(threadIdx.x) * V; i < H; i += int64_t(blockDim.x) * V) {
    if constexpr (V == 8)
      *reinterpret_cast<uint4*>(dst + i) = *reinterpret_cast<const uint4*>(src + i);
    else
      dst[i] = src[i];
  }
}

// dx[n] += sum_k dxs[slot_of[n K + k]]; block n.
template <int V>
__global__ void permute_backward_kernel(bf16* dx, const bf16* dxs, const int32_t* slot_of, int K, int64_t H) {
  const int64_t n = blockIdx.x;
  const int32_t* so = slot_of + n * K;
  for (int64_t i = int64_t(threadIdx.x) * V; i < H; i += int64_t(blockDim.x) * V) {
    float acc[V] = {}, f[V];
    for (int k = 0; k < K; ++k) {
      load_f32<V>(f, dxs + int64_t(so[k]) * H + i);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += f[j];
    }
    load_f32<V>(f, dx + n * H + i);
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] += acc[j];
    store_bf16<V>(dx + n * H + i, f);
  }
}

// y[n] = sum_k weights[n, k] ys[slot_of[n K + k]]; block n.
template <int V>
__global__ void unpermute_kernel(bf16* y, const bf16* ys, const float* weights, const int32_t* slot_of, int K,
                                 int64_t H) {
  const int64_t n = blockIdx.x;
  const int32_t* so = slot_of + n * K;
  const float* w = weights + n * K;
  for (int64_t i = int64_t(threadIdx.x) * V; i < H; i += int64_t(blockDim.x) * V) {
    float acc[V] = {}, f[V];
    for (int k = 0; k < K; ++k) {
      load_f32<V>(f, ys + int64_t(so[k]) * H + i);
      const float wk = w[k];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += wk * f[j];
    }
    store_bf16<V>(y + n * H + i, acc);
  }
}

// dys[slot_of[n K + k]] = weights[n, k] dy[n]; dweights[n, k] += dy[n] . ys[slot] (block sum, fixed order).
template <int V>
__global__ void unpermute_backward_kernel(bf16* dys, float* dweights, const bf16* dy, const bf16* ys,
                                          const float* weights, const int32_t* slot_of, int K, int64_t H) {
  __shared__ float red[32];
  const int64_t n = blockIdx.x;
  const bf16* g = dy + n * H;
  for (int k = 0; k < K; ++k) {
    const int64_t slot = slot_of[n * K + k];
    const float wk = weights[n * K + k];
    float dot = 0.0f;
    for (int64_t i = int64_t(threadIdx.x) * V; i < H; i += int64_t(blockDim.x) * V) {
      float gf[V], yf[V], o[V];
      load_f32<V>(gf, g + i);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = wk * gf[j];
      store_bf16<V>(dys + slot * H + i, o);
      if (dweights) {
        load_f32<V>(yf, ys + slot * H + i);
#pragma unroll
        for (int j = 0; j < V; ++j) dot += gf[j] * yf[j];
      }
    }
    if (dweights) {  // uniform across the block
      dot = block_sum(dot, red);
      if (threadIdx.x == 0) dweights[n * K + k] += dot;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void moe_dispatch_build(int64_t* expert_offsets, int32_t* slot_token, int32_t* slot_of, const int32_t* indices,
                        int64_t N, int64_t K, int64_t E, int32_t* bad_index, cudaStream_t stream) {
  NEXTRON_CHECK(E >= 1 && E <= kMaxDispatchExperts, "moe_dispatch_build: the number of experts ", E, " must be in [1, ",
                kMaxDispatchExperts, "]");
  NEXTRON_CHECK(N >= 0 && K >= 1, "moe_dispatch_build: bad sizes N = ", N, ", K = ", K);
  const int64_t NK = N * K;
  NEXTRON_CHECK(NK < INT32_MAX, "moe_dispatch_build: ", NK, " slots exceed the int32 slot indices");
  if (NK == 0) {
    NEXTRON_CUDA_CHECK(cudaMemsetAsync(expert_offsets, 0, size_t(E + 1) * sizeof(int64_t), stream));
    return;
  }
  const int64_t CH = chunk_slots(E), C = ceil_div(NK, CH);
  const size_t shmem = size_t(E + CH) * sizeof(int);
  int32_t* table = C > 1 ? slot_of : nullptr;  // (E, C) counts, then prefixes; see the top of the file

  dispatch_count_kernel<<<unsigned(C), 32, shmem, stream>>>(table, expert_offsets, indices, NK, int(E), CH, C,
                                                            bad_index);
  NEXTRON_CUDA_LAUNCH_CHECK();
  if (table) {
    dispatch_scan_chunks_kernel<<<unsigned(E), 256, 0, stream>>>(table, expert_offsets, C);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  dispatch_scan_experts_kernel<<<1, 1024, 0, stream>>>(expert_offsets, int(E));
  NEXTRON_CUDA_LAUNCH_CHECK();
  dispatch_scatter_kernel<<<unsigned(C), 32, shmem, stream>>>(slot_token, table, expert_offsets, indices, NK, int(E),
                                                              CH, C);
  NEXTRON_CUDA_LAUNCH_CHECK();
  dispatch_finalize_kernel<<<unsigned(ceil_div(NK, 256)), 256, 0, stream>>>(slot_token, slot_of, expert_offsets, NK,
                                                                            int(E), int(K));
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void moe_permute(bf16* xs, const bf16* x, const int32_t* slot_token, int64_t NK, int64_t H, cudaStream_t stream) {
  if (NK == 0 || H == 0) return;
  if (H % 8 == 0 && aligned16(xs) && aligned16(x))
    permute_kernel<8><<<unsigned(NK), kRowThreads, 0, stream>>>(xs, x, slot_token, H);
  else
    permute_kernel<1><<<unsigned(NK), kRowThreads, 0, stream>>>(xs, x, slot_token, H);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void moe_permute_backward(bf16* dx, const bf16* dxs, const int32_t* slot_of, int64_t N, int64_t K, int64_t H,
                          cudaStream_t stream) {
  if (N == 0 || H == 0) return;
  if (H % 8 == 0 && aligned16(dx) && aligned16(dxs))
    permute_backward_kernel<8><<<unsigned(N), kRowThreads, 0, stream>>>(dx, dxs, slot_of, int(K), H);
  else
    permute_backward_kernel<1><<<unsigned(N), kRowThreads, 0, stream>>>(dx, dxs, slot_of, int(K), H);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void moe_unpermute(bf16* y, const bf16* ys, const float* weights, const int32_t* slot_of, int64_t N, int64_t K,
                   int64_t H, cudaStream_t stream) {
  if (N == 0 || H == 0) return;
  if (H % 8 == 0 && aligned16(y) && aligned16(ys))
    unpermute_kernel<8><<<unsigned(N), kRowThreads, 0, stream>>>(y, ys, weights, slot_of, int(K), H);
  else
    unpermute_kernel<1><<<unsigned(N), kRowThreads, 0, stream>>>(y, ys, weights, slot_of, int(K), H);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void moe_unpermute_backward(bf16* dys, float* dweights, const bf16* dy, const bf16* ys, const float* weights,
                            const int32_t* slot_of, int64_t N, int64_t K, int64_t H, cudaStream_t stream) {
  if (N == 0 || H == 0) return;
  if (H % 8 == 0 && aligned16(dys) && aligned16(dy) && aligned16(ys))
    unpermute_backward_kernel<8>
        <<<unsigned(N), kRowThreads, 0, stream>>>(dys, dweights, dy, ys, weights, slot_of, int(K), H);
  else
    unpermute_backward_kernel<1>
        <<<unsigned(N), kRowThreads, 0, stream>>>(dys, dweights, dy, ys, weights, slot_of, int(K), H);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
