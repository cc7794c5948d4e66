// Private to gated_delta_rule_fwd.cu / gated_delta_rule_bwd.cu: the parameter block shared by all chunked
// gated-delta-rule kernels, the workspace layout, index helpers, and the three device building blocks the kernels
// are made of: row loads into shared memory, a warp-tiled bf16 tensor-core product with a per-element epilogue,
// and the blocked inversion of the unit lower-triangular chunk matrix. The algorithm is described in
// gated_delta_rule_fwd.cu. Added by the traffic work: acc64_add (sums over a head group kept in registers) and
// scan64 (shuffle scans replacing one-thread loops over the 64 rows of a chunk); load_rows keeps kLoadBatch 16-byte
// loads in flight per thread and walks its vectors without a divide per vector (load_rows_async likewise).
#pragma once

#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/gated_delta_rule.h"

namespace nextron::cuda::gdr {

namespace wmma = nvcuda::wmma;
using RowMajor = wmma::row_major;
using ColMajor = wmma::col_major;

constexpr int kC = 64;                 // chunk length (tokens)
constexpr int kTile = 64;              // column tile of dk / dv in the per-chunk backward kernels
constexpr int kThreads = 256;          // every kernel runs 8 warps
constexpr int kWarps = kThreads / 32;  //
constexpr int kPadH = 8;               // bf16 row padding: rows stay 16-byte aligned and smem banks spread
constexpr int kPadF = 4;               // fp32 row padding, same reason
constexpr int kLdH = kC + kPadH;       // row stride of a 64-column bf16 tile
constexpr int kLdF = kC + kPadF;       // row stride of a 64-column fp32 tile
constexpr int kMaxDim = 256;           // largest dk / dv

// Everything the kernels read and write. Input/output layouts are those of gated_delta_rule.h; the workspace is
// head-major: row (bh, t) with bh = b * Hv + hv, so the 64 rows of one chunk are contiguous.
struct Params {
  const bf16* q;      // (B, S, Hk, dk)
  const bf16* k;      // (B, S, Hk, dk)
  const bf16* v;      // (B, S, Hv, dv)
  const float* g;     // (B, S, Hv)
  const float* beta;  // (B, S, Hv)
  const float* h0;    // (B, Hv, dk, dv) or nullptr
  const bf16* d_o;    // (B, S, Hv, dv), backward
  const float* dht;   // (B, Hv, dk, dv) or nullptr, backward
  bf16* o;            // (B, S, Hv, dv), forward
  float* ht;          // (B, Hv, dk, dv) or nullptr, forward
  bf16* grad_q;       // gradients (backward, each may be nullptr)
  bf16* grad_k;       //
  bf16* grad_v;       //
  float* grad_g;      //
  float* grad_beta;   //
  float* grad_h0;     //
  float* Gc;          // (BH, S)           cumulative sum of g within each chunk
  bf16* W;            // (BH, S, dk)       T diag(beta e^G) K per chunk
  bf16* U;            // (BH, S, dv)       T diag(beta) V per chunk
  bf16* Vn;           // (BH, S, dv)       new values U - W h_c
  bf16* H;            // (BH, NC, dk, dv)  state entering each chunk
  bf16* dVl;          // (BH, S, dv)       P^T dO, the intra-chunk part of dVn
  bf16* dVn;          // (BH, S, dv)       gradient of the new values
  bf16* dH;           // (BH, NC, dk, dv)  gradient of the state leaving each chunk
  bf16* dW;           // (BH, S, dk)       gradient of W
  float* dKp;         // (B Hk, S, dk)     dk of each key head from dqk (state and P terms, summed over its value
                      //                   heads), read by wy
  float* dGp;         // (BH, S)           dG partial sums of the dqk kernel
  int64_t B, S, Hk, Hv, BH;
  int dk, dv, r, NC, NK;  // r = Hv / Hk, NC = chunks per sequence, NK = 64-column tiles of dk
  float scale;
};

// Sets the forward intermediates' pointers of p (Gc, W, U, Vn, H: what the backward reads of the forward) from
// base (nullptr: only sizes them) and returns their bytes: the layout of gated_delta_rule_saved_bytes.
size_t carve_intermediates(Params& p, void* base);
// Sets the workspace pointers of p from base (nullptr: only sizes it) and returns the bytes used: the backward's own
// buffers, then the intermediates unless the caller keeps them (`intermediates` false: set them with
// carve_intermediates).
size_t carve_workspace(Params& p, void* base, bool intermediates);
// Fills the shape fields of p (throws nextron::Error for an unsupported shape).
void set_shape(Params& p, const GdrShape& s, float scale, const char* what);
// The two kernels the backward shares with the forward: per-chunk W, U, Gc; and the sequential state pass that
// writes H and Vn (and ht when p.ht is set).
void launch_prepare(const Params& p, cudaStream_t stream);
void launch_state_forward(const Params& p, cudaStream_t stream);
// Column tile of dv carried by one block of the two state kernels. Every block of a (b, hv) loads the chunk's full
// W, K (and Q) rows, so the number of tiles multiplies those loads: 64-column tiles (when dv % 64 == 0 and the
// block's shared memory fits kSmemPerBlock) halve them against 32-column tiles, at half the blocks for the
// sequential passes (B = 2, Hv = 32, dv = 128: 128 blocks on an H100's 132 SMs, one block per SM; at B = 1 only 64
// blocks, half the SMs idle). Narrower tiles (32, else 16) where 64 does not divide dv or does not fit (dk = 256 in
// the backward). `smem_bytes(bv)` is the kernel's shared memory at tile bv.
// The launches ask the device (device_smem_limit: 227 KB on sm_90, 163 KB on an A100, so a GPU with less keeps
// the narrower tile where 64 does not fit, and 16 where 32 does not either: the state backward at dk = 256 needs 184 KB
// at 32); the host-only traffic accounts assume sm_90's limit.
constexpr size_t kSmemPerBlock = 232448;  // sm_90's opt-in limit of dynamic shared memory per block (227 KB)
template <typename SmemBytes>
int state_tile(int dv, SmemBytes smem_bytes, size_t limit) {
  for (int bv : {64, 32})
    if (dv % bv == 0 && smem_bytes(bv) <= limit) return bv;
  return 16;
}
// The current device's opt-in limit of dynamic shared memory per block.
size_t device_smem_limit();
// The forward state kernel's tile (also the backward's recomputation of h_c) under a shared-memory limit.
int state_forward_tile(int dk, int dv, size_t limit = kSmemPerBlock);
// The kernels proper, for head dims that are multiples of 16 in [16, kMaxDim] (same contracts as the public
// gated_delta_rule_* of gated_delta_rule.h, which pad other head dims with zeros and call these).
size_t aligned_workspace_bytes(const GdrShape& s, bool caller_keeps_intermediates);
size_t aligned_saved_bytes(const GdrShape& s);
void forward_aligned(bf16* o, float* final_state, const bf16* q, const bf16* k, const bf16* v, const float* g,
                     const float* beta, const float* initial_state, const GdrShape& s, float scale, void* save,
                     void* workspace, cudaStream_t stream);
void backward_aligned(bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* d_initial_state, const bf16* d_o,
                      const float* d_final_state, const bf16* q, const bf16* k, const bf16* v, const float* g,
                      const float* beta, const float* initial_state, const GdrShape& s, float scale, const void* saved,
                      void* workspace, cudaStream_t stream);
// HBM traffic accounts of the kernels (gated_delta_rule.h): forward_traffic appends prepare, state forward (with
// the final state when `final_state`) and, when `output`, the output kernel; backward_traffic the backward's own
// kernels (after the forward's two).
void forward_traffic(const Params& p, bool final_state, bool output, std::vector<GdrKernelTraffic>& rows);
void backward_traffic(const Params& p, std::vector<GdrKernelTraffic>& rows);
// Makes `bytes` of dynamic shared memory available to `kernel` (throws when the device has less).
void allow_smem(const void* kernel, size_t bytes, const char* what);

// ---- index helpers ----

__host__ __device__ __forceinline__ int64_t qk_off(const Params& p, int64_t b, int64_t t, int64_t hk) {
  return ((b * p.S + t) * p.Hk + hk) * p.dk;
}
__host__ __device__ __forceinline__ int64_t v_off(const Params& p, int64_t b, int64_t t, int64_t hv) {
  return ((b * p.S + t) * p.Hv + hv) * p.dv;
}
__host__ __device__ __forceinline__ int64_t gb_off(const Params& p, int64_t b, int64_t t, int64_t hv) {
  return (b * p.S + t) * p.Hv + hv;
}
// First element of chunk c's state in H / dH.
__host__ __device__ __forceinline__ int64_t state_off(const Params& p, int64_t bh, int64_t c) {
  return (bh * p.NC + c) * p.dk * p.dv;
}

// One chunk of one (sequence, value head): tokens [t0, t0 + L), L = 64 except possibly for the last chunk.
struct Chunk {
  int64_t b, hv, hk, bh, t0;
  int c, L;
};
__device__ __forceinline__ Chunk chunk_of(const Params& p, int64_t bh, int c) {
  Chunk ch;
  ch.bh = bh;
  ch.b = bh / p.Hv;
  ch.hv = bh % p.Hv;
  ch.hk = ch.hv / p.r;
  ch.c = c;
  ch.t0 = int64_t(c) * kC;
  ch.L = int(p.S - ch.t0 < kC ? p.S - ch.t0 : kC);
  return ch;
}

// ---- shared memory ----

// Bump allocator over the dynamic shared memory, 128-byte aligned pieces. The host runs the same code with base 0
// to size the launch.
struct Carve {
  uintptr_t base;
  size_t off = 0;
  template <typename T>
  __host__ __device__ T* take(size_t n) {
    T* ptr = reinterpret_cast<T*>(base + off);
    off += (n * sizeof(T) + 127) / 128 * 128;
    return ptr;
  }
};

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char gdr_smem[];
  return gdr_smem;
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  if constexpr (std::is_same_v<T, float>)
    return 0.0f;
  else
    return __float2bfloat16_rn(0.0f);
}

// Copies rows [0, rows) x [0, cols) of a global matrix (row stride lds) into shared memory (row stride ldd) and
// zero-fills rows [rows, rows_alloc): padding rows past the end of a partial chunk must read as zeros. Uses 16-byte
// vectors when the source allows (dst rows are always 16-byte aligned), else single elements. All threads take
// part; no synchronisation.
//
// Vector path: each thread issues kLoadBatch 16-byte loads into registers before it stores any of them, so that
// several loads per thread are in flight instead of one load -> store round trip at a time, and walks its vectors
// (i, j) = (row, vector column) by a precomputed step (blockDim.x vectors = di rows + dj vectors) instead of a
// divide and a modulo per vector.
constexpr int kLoadBatch = 4;

// The (row, vector column) walk of one thread over a rows_alloc x per_row grid of 16-byte vectors.
struct VecWalk {
  int i, j, di, dj, per_row;
  __device__ __forceinline__ explicit VecWalk(int per_row_) : per_row(per_row_) {
    i = int(threadIdx.x) / per_row;
    j = int(threadIdx.x) - i * per_row;
    di = int(blockDim.x) / per_row;
    dj = int(blockDim.x) - di * per_row;
  }
  __device__ __forceinline__ void next() {
    i += di;
    j += dj;
    if (j >= per_row) {
      j -= per_row;
      ++i;
    }
  }
};

template <typename T>
__device__ void load_rows(T* dst, int ldd, const T* src, int64_t lds, int rows, int rows_alloc, int cols) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0 && lds % kVec == 0 && cols % kVec == 0) {
    VecWalk w(cols / kVec);
    while (w.i < rows_alloc) {
      uint4 x[kLoadBatch];
      int at[kLoadBatch];  // destination element offset, -1 past the end
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        at[u] = -1;
        x[u] = make_uint4(0u, 0u, 0u, 0u);
        if (w.i < rows_alloc) {
          at[u] = w.i * ldd + w.j * kVec;
          if (w.i < rows) x[u] = *reinterpret_cast<const uint4*>(src + w.i * lds + w.j * kVec);
        }
        w.next();
      }
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u)
        if (at[u] >= 0) *reinterpret_cast<uint4*>(dst + at[u]) = x[u];
    }
  } else {
    for (int e = threadIdx.x; e < rows_alloc * cols; e += blockDim.x) {
      const int i = e / cols, j = e % cols;
      dst[i * ldd + j] = i < rows ? src[i * lds + j] : zero_value<T>();
    }
  }
}

// load_rows with asynchronous 16-byte copies (cp.async): they land after the caller's __pipeline_commit() and
// __pipeline_wait_prior(n) and a block synchronisation; the destination must not be in use meanwhile. Zero rows and
// the element-wise fallback (unaligned source) are plain stores. The walk is load_rows's (no divide per vector); the
// copies need no registers, so every one of them is in flight at once.
template <typename T>
__device__ void load_rows_async(T* dst, int ldd, const T* src, int64_t lds, int rows, int rows_alloc, int cols) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0 && lds % kVec == 0 && cols % kVec == 0) {
    for (VecWalk w(cols / kVec); w.i < rows_alloc; w.next()) {
      if (w.i < rows)
        __pipeline_memcpy_async(dst + w.i * ldd + w.j * kVec, src + w.i * lds + w.j * kVec, 16);
      else
        *reinterpret_cast<uint4*>(dst + w.i * ldd + w.j * kVec) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    load_rows(dst, ldd, src, lds, rows, rows_alloc, cols);
  }
}

// ---- tensor-core product ----

// Element offset of (row, col) of a matrix stored with the given wmma layout: row-major X[row][col] =
// ptr[row * ld + col]; col-major is the transpose of a row-major buffer, X[row][col] = ptr[col * ld + row].
template <typename Layout>
__device__ __forceinline__ int tile_off(int row, int col, int ld) {
  return std::is_same_v<Layout, RowMajor> ? row * ld + col : col * ld + row;
}

// C = A B for A (M x K) and B (K x N) bf16 in shared memory (layouts LA, LB as in tile_off), fp32 accumulation on
// the tensor cores with 16x16x16 wmma tiles. M, N, K are multiples of 16; operand pointers and tile starts must be
// 32-byte aligned (rows padded by kPadH keep them so). Each 16x16 tile of C belongs to one warp (tiles warp,
// warp + 8, ...), is staged through that warp's 256 floats of `stage` (kWarps * 256 floats), and every element is
// handed once to epi(row, col, value), by one lane. The caller synchronises the block before (operands written)
// and after (epilogue results read by other threads); all threads must call it.
template <typename LA, typename LB, typename Epi>
__device__ void gemm(int M, int N, int K, const bf16* A, int lda, const bf16* B, int ldb, float* stage, Epi&& epi) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
  float* st = stage + warp * 256;
  for (int t = warp; t < tiles; t += kWarps) {
    const int tm = (t / tiles_n) * 16, tn = (t % tiles_n) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < K; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> b;
      wmma::load_matrix_sync(a, A + tile_off<LA>(tm, kk, lda), lda);
      wmma::load_matrix_sync(b, B + tile_off<LB>(kk, tn, ldb), ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(st, acc, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) epi(tm + (e >> 4), tn + (e & 15), st[e]);
    __syncwarp();
  }
}

// A 64 x 64 fp32 product kept in registers across several products (kThreads = 8 warps): warp w owns the 16x16
// tiles in row block w / 2 and column blocks 2 (w % 2) and 2 (w % 2) + 1. Element-wise work goes through shared
// memory (acc64_store, then acc64_load to continue accumulating), since the element layout of a wmma fragment is
// unspecified.
struct Acc64 {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> f[2];
};
__device__ __forceinline__ void acc64_zero(Acc64& acc) {
  wmma::fill_fragment(acc.f[0], 0.0f);
  wmma::fill_fragment(acc.f[1], 0.0f);
}
// acc += A (64 x K) B (K x N) for N <= 64 (column tiles at or past N are left alone); layouts as in gemm.
template <typename LA, typename LB>
__device__ void acc64_mma(Acc64& acc, int N, int K, const bf16* A, int lda, const bf16* B, int ldb) {
  const int warp = threadIdx.x >> 5, tm = (warp >> 1) * 16, tn0 = (warp & 1) * 32;
  for (int kk = 0; kk < K; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LA> a;
    wmma::load_matrix_sync(a, A + tile_off<LA>(tm, kk, lda), lda);
    for (int t = 0; t < 2; ++t) {
      const int tn = tn0 + 16 * t;
      if (tn >= N) break;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LB> b;
      wmma::load_matrix_sync(b, B + tile_off<LB>(kk, tn, ldb), ldb);
      wmma::mma_sync(acc.f[t], a, b, acc.f[t]);
    }
  }
}
// The whole 64 x 64 tile to / from fp32 shared memory (row stride ldc, a multiple of 4).
__device__ __forceinline__ void acc64_store(const Acc64& acc, float* C, int ldc) {
  const int warp = threadIdx.x >> 5, tm = (warp >> 1) * 16, tn0 = (warp & 1) * 32;
  for (int t = 0; t < 2; ++t) wmma::store_matrix_sync(C + tm * ldc + tn0 + 16 * t, acc.f[t], ldc, wmma::mem_row_major);
}
__device__ __forceinline__ void acc64_load(Acc64& acc, const float* C, int ldc) {
  const int warp = threadIdx.x >> 5, tm = (warp >> 1) * 16, tn0 = (warp & 1) * 32;
  for (int t = 0; t < 2; ++t) wmma::load_matrix_sync(acc.f[t], C + tm * ldc + tn0 + 16 * t, ldc, wmma::mem_row_major);
}

// acc += x, element by element (fragments of the same type share their element layout, whatever it is).
__device__ __forceinline__ void acc64_add(Acc64& acc, const Acc64& x) {
  for (int t = 0; t < 2; ++t)
    for (int e = 0; e < acc.f[t].num_elements; ++e) acc.f[t].x[e] += x.f[t].x[e];
}

// Inclusive scan (op = sum or min) of v over threads 0..63 in thread order, for those threads (the other threads'
// values and results are ignored): a shuffle scan in warps 0 and 1, then warp 1 combines warp 0's last value,
// passed through `carry` (one float of shared memory). All threads must call it (it synchronises the block once).
// Fixed order of operations, so deterministic. It replaces 64-step loops run by a single thread.
template <typename Op>
__device__ __forceinline__ float scan64(float v, float* carry, Op op) {
  const int lane = threadIdx.x & 31;
  for (int o = 1; o < 32; o <<= 1) {
    const float u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v = op(v, u);
  }
  if (threadIdx.x == 31) *carry = v;
  __syncthreads();
  if (threadIdx.x >= 32 && threadIdx.x < 64) v = op(v, *carry);
  return v;
}
__device__ __forceinline__ float scan64_sum(float v, float* carry) {
  return scan64(v, carry, [](float a, float b) { return a + b; });
}
// Cumulative sum of g <= 0 (threads 0..63, one token each) that is non-increasing in fp32: the shuffle scan groups
// the additions differently for neighbouring tokens, so its sums may round up by an ulp against their predecessor;
// a running minimum (exact) restores G_i <= G_j for i >= j, which keeps every decay exponent G_i - G_j <= 0.
// carry: two floats of shared memory; synchronises the block twice.
__device__ __forceinline__ float cumsum64_nonincreasing(float g, float* carry) {
  const float G = scan64_sum(g, carry);
  return scan64(G, carry + 1, [](float a, float b) { return fminf(a, b); });
}

// ---- chunk pieces ----

// T = (I + M)^-1 for M strictly lower triangular (64 x 64 fp32 in shared memory, row strides ldt, ldm), by blocked
// forward substitution over 16x16 blocks: each diagonal block is inverted column by column (64 threads, one column
// each: t_i = [i == c] - sum_{c <= j < i} M_ij t_j), then block row I = 1..3 of T is
// T_IJ = -T_II sum_{K=J}^{I-1} M_IK T_KJ for J < I (from block (I, J) of (I + M) T = I). X: 768 floats of scratch.
// Starts and ends with a block synchronisation.
__device__ inline void invert_unit_lower(float* T, int ldt, const float* M, int ldm, float* X) {
  const int tid = threadIdx.x;
  for (int e = tid; e < kC * kC; e += blockDim.x) T[(e / kC) * ldt + e % kC] = 0.0f;
  __syncthreads();
  if (tid < kC) {
    const int d0 = (tid / 16) * 16, c = tid % 16, col = d0 + c;
    for (int i = c; i < 16; ++i) {
      float x = i == c ? 1.0f : 0.0f;
      for (int j = c; j < i; ++j) x -= M[(d0 + i) * ldm + d0 + j] * T[(d0 + j) * ldt + col];
      T[(d0 + i) * ldt + col] = x;
    }
  }
  __syncthreads();
  for (int I = 1; I < 4; ++I) {
    for (int e = tid; e < I * 256; e += blockDim.x) {  // X_J = sum_{K=J}^{I-1} M_IK T_KJ
      const int J = e / 256, rr = (e / 16) % 16, cc = e % 16;
      float s = 0.0f;
      for (int K = J; K < I; ++K)
        for (int m = 0; m < 16; ++m) s += M[(I * 16 + rr) * ldm + K * 16 + m] * T[(K * 16 + m) * ldt + J * 16 + cc];
      X[e] = s;
    }
    __syncthreads();
    for (int e = tid; e < I * 256; e += blockDim.x) {  // T_IJ = -T_II X_J
      const int J = e / 256, rr = (e / 16) % 16, cc = e % 16;
      float s = 0.0f;
      for (int m = 0; m < 16; ++m) s += T[(I * 16 + rr) * ldt + I * 16 + m] * X[J * 256 + m * 16 + cc];
      T[(I * 16 + rr) * ldt + J * 16 + cc] = -s;
    }
    __syncthreads();
  }
}

// Gates of a chunk from the workspace (written by the prepare kernel), in two steps so that the sequential kernels
// can load the next chunk's while working on the current one: fetch_gates reads this thread's values into
// registers, store_gates writes G (cumulative g within the chunk; rows >= L repeat the last value), eG = e^G and
// dec = e^(G_last - G) (zero on rows >= L). Threads 0..63 hold one row each; no synchronisation.
struct GateRegs {
  float g = 0.0f, glast = 0.0f;
};
__device__ __forceinline__ GateRegs fetch_gates(const Params& p, const Chunk& ch) {
  GateRegs r;
  const int i = threadIdx.x;
  if (i < kC) {
    const float* gc = p.Gc + ch.bh * p.S + ch.t0;
    r.glast = gc[ch.L - 1];
    r.g = i < ch.L ? gc[i] : r.glast;
  }
  return r;
}
__device__ __forceinline__ void store_gates(const GateRegs& r, const Chunk& ch, float* G, float* eG, float* dec) {
  const int i = threadIdx.x;
  if (i < kC) {
    G[i] = r.g;
    eG[i] = expf(r.g);
    dec[i] = i < ch.L ? expf(r.glast - r.g) : 0.0f;
  }
}
// Both steps at once, plus beta (zero on rows >= L) when bet is not nullptr.
__device__ __forceinline__ void load_gates(const Params& p, const Chunk& ch, float* G, float* eG, float* dec,
                                           float* bet) {
  store_gates(fetch_gates(p, ch), ch, G, eG, dec);
  const int i = threadIdx.x;
  if (bet && i < kC) bet[i] = i < ch.L ? p.beta[gb_off(p, ch.b, ch.t0 + i, ch.hv)] : 0.0f;
}

// Shared by the output and dvlocal kernels, one block per (sequence, key head, chunk c); bh0 is the key head's first
// value head. group_qk: Q K^T of the chunk (Q and K staged in shared memory), formed once for the head group.
__device__ __forceinline__ void group_qk(const Params& p, int64_t bh0, int c, bf16* Q, bf16* K, Acc64& qk) {
  const Chunk ch = chunk_of(p, bh0, c);
  const int ldk = p.dk + kPadH;
  load_rows(Q, ldk, p.q + qk_off(p, ch.b, ch.t0, ch.hk), p.Hk * p.dk, ch.L, kC, p.dk);
  load_rows(K, ldk, p.k + qk_off(p, ch.b, ch.t0, ch.hk), p.Hk * p.dk, ch.L, kC, p.dk);
  __syncthreads();
  acc64_zero(qk);
  acc64_mma<RowMajor, ColMajor>(qk, kC, p.dk, Q, ldk, K, ldk);
}
// One head's P = scale (Q K^T) .* decay (causal) into P (bf16, leading dimension kLdH), with that head's gates
// loaded into G / eG / dec and Q K^T staged through F (fp32, kLdF). The caller synchronises before (the previous
// head's buffers are free) and after (P is read).
__device__ __forceinline__ void head_scores(const Params& p, const Chunk& ch, const Acc64& qk, float* F, bf16* P,
                                            float* G, float* eG, float* dec) {
  load_gates(p, ch, G, eG, dec, nullptr);
  acc64_store(qk, F, kLdF);
  __syncthreads();
  for (int e = threadIdx.x; e < kC * kC; e += kThreads) {
    const int i = e / kC, j = e % kC;
    P[i * kLdH + j] = to_bf16(j <= i ? p.scale * F[i * kLdF + j] * expf(G[i] - G[j]) : 0.0f);
  }
}

// Sum over the columns [0, cols) of row `row` of two shared matrices multiplied elementwise, by one warp (every lane
// gets the result; fixed order, so deterministic).
template <typename TA, typename TB>
__device__ __forceinline__ float row_dot(const TA* a, const TB* b, int cols) {
  float s = 0.0f;
  for (int j = threadIdx.x & 31; j < cols; j += 32) s += to_f32(a[j]) * to_f32(b[j]);
  return warp_sum(s);
}

}  // namespace nextron::cuda::gdr
