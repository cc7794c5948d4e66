// Chunked gated delta rule on the GPU: forward, shape checks and workspace (the backward is in
// gated_delta_rule_bwd.cu, the shared device pieces in gated_delta_rule_impl.cuh). CPU reference and math:
// kernels/cpu/gated_delta_rule.{h,cpp}; this is the same chunked ("UT transform") algorithm with chunks of 64.
//
// Per (sequence b, value head hv) with key head hk = hv / (Hv / Hk) (q/k are read in place, never repeated), split
// the S tokens into NC = ceil(S / 64) chunks; a partial last chunk is padded with zero rows in shared memory. In a
// chunk with entering state h_c (dk x dv):
//   G = cumsum(g) (fp32, a shuffle scan made non-increasing, so every G_i - G_j with i >= j is <= 0 and exp only
//   sees values <= 0),
//   M = strictly_lower(diag(beta) K K^T .* exp(G_i - G_j)),  T = (I + M)^-1,
//   W = T diag(beta e^G) K,  U = T diag(beta) V,  Vn = U - W h_c,
//   O = scale (e^G .* (Q h_c) + ((Q K^T) .* exp(G_i - G_j), causal incl. diagonal) Vn),
//   h_{c+1} = e^{G_last} h_c + K^T (e^{G_last - G} .* Vn).
// Kernels (256 threads each; products on the tensor cores with bf16 operands and fp32 accumulation, everything
// elementwise, the gates, T and the carried state in fp32):
//   1. prepare  (grid B * Hk * NC, looping over the Hv / Hk value heads of the key head): K K^T once (one
//      64 x 64 x dk product), then per head G, M, T by blocked forward substitution in fp32 shared memory, W and U
//      (bf16) into the workspace.
//   2. state    (grid BH * dv / bv, bv = 64, 32 or 16: state_tile): one block carries the fp32 state tile h
//      (dk x bv) through the chunks in order: writes h_c (bf16, the operand of the output kernel and the backward),
//      Vn = U - W h_c, and h <- e^{G_last} h + K^T (dec .* Vn); the final state leaves in fp32. The next chunk's
//      tiles are prefetched with cp.async while the current one is multiplied (this pass is the latency-bound part).
//   3. output   (grid B * Hk * NC, looping over the value heads of the key head): Q K^T once, then per head
//      P = scale (Q K^T) .* decay (causal) and, per 64-column tile of dv, O = e^G .* (scale Q h_c) + P Vn.
// Products are 16x16x16 wmma tiles over shared-memory operands (rows padded by 16 bytes against bank conflicts).
// Shared memory per block at dk = dv = 128: 70 - 148 KB (two blocks per SM for every kernel but the state
// backward's, dqk's and wy's); at 256 up to 211 KB. Tiles are zero-padded past the end of a partial chunk, so all
// products are 64 rows.
//
// Head dims that are not multiples of 16 are zero-padded by gated_delta_rule.cu before these kernels run.
//
// Changes of the traffic work (docs/cuda.md, "The delta rule's HBM traffic"): forward_traffic below accounts the
// global-memory bytes of each kernel; the prepare kernel's cumulative sum of g, a 64-step loop of one thread, is a
// shuffle scan (cumsum64_nonincreasing, which keeps G non-increasing so that the decay exponents stay <= 0); the
// workspace lost the backward's fp32 dq partials (dQp). Issue #18's second round: the state kernels carry 64-column
// tiles of dv where they fit (half the blocks re-reading W and K), and prepare and output run per key head, loading
// q / k and forming K K^T / Q K^T once for the value heads of the group.
//
// Workspace (gated_delta_rule_workspace_bytes; N = B * Hv * S rows, states = B * Hv * NC * dk * dv): forward
// Gc 4N + W 2N dk + U 2N dv + Vn 2N dv + H 2 states bytes; the backward adds dVn 2N dv, dH 2 states, dW 2N dk,
// dVl 2N dv, dKp 4 Nk dk (Nk = B * Hk * S key-head rows) and dGp 4N. At B = 8, S = 4096, Hk = 16, Hv = 32,
// dk = dv = 128 that is 1.35 GB for the forward and 3.0 GB in all. The forward's part (the intermediates) is either
// recomputed by the backward, as fla does, so that nothing survives from one call to the other, or kept by the
// caller (gated_delta_rule_saved_bytes): the forward writes it there, the backward reads it and skips prepare and
// the state pass, and the workspace holds only the backward's own buffers.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/gated_delta_rule_impl.cuh"

namespace nextron::cuda {

namespace gdr {

namespace {

// ---- 1. prepare ----

struct PrepareSmem {
  bf16 *K, *Kb, *V, *Tb;
  float *M, *T, *X, *G, *eG, *bet, *stage;
  size_t bytes;
  __host__ __device__ PrepareSmem(uintptr_t base, int dk, int dv) {
    Carve c{base};
    K = c.take<bf16>(size_t(kC) * (dk + kPadH));
    Kb = c.take<bf16>(size_t(kC) * (dk + kPadH));
    V = c.take<bf16>(size_t(kC) * (dv + kPadH));
    Tb = c.take<bf16>(kC * kLdH);
    M = c.take<float>(kC * kLdF);
    T = c.take<float>(kC * kLdF);
    X = c.take<float>(3 * 256);
    G = c.take<float>(kC);
    eG = c.take<float>(kC);
    bet = c.take<float>(kC);
    stage = c.take<float>(kWarps * 256);
    bytes = c.off;
  }
};

// One block per (sequence b, key head hk, chunk): K is loaded once, then for each of the r = Hv / Hk value heads of
// the key head in turn Gc, W, U of the chunk. K K^T is formed again per head (a 64 x 64 x dk product) rather than
// kept in registers across the head loop, where it would be spilled around the inversion. 105 KB of shared memory
// at dk = dv = 128.
__global__ void __launch_bounds__(kThreads) prepare_kernel(const Params p) {
  const int64_t bhk = blockIdx.x / p.NC;  // b * Hk + hk
  const int c = int(blockIdx.x % p.NC);
  const int64_t bh0 = (bhk / p.Hk) * p.Hv + (bhk % p.Hk) * p.r;  // the group's first value head
  const int dk = p.dk, dv = p.dv, ldk = dk + kPadH, ldv = dv + kPadH, tid = threadIdx.x;
  PrepareSmem sm(reinterpret_cast<uintptr_t>(dynamic_smem()), dk, dv);
  {
    const Chunk ch = chunk_of(p, bh0, c);
    load_rows(sm.K, ldk, p.k + qk_off(p, ch.b, ch.t0, ch.hk), p.Hk * dk, ch.L, kC, dk);
  }
  for (int rr = 0; rr < p.r; ++rr) {
    const Chunk ch = chunk_of(p, bh0 + rr, c);
    __syncthreads();  // K loaded; the previous head's V, Kb, Tb, M and gates are free
    float gi = 0.0f;
    if (tid < kC) {
      gi = tid < ch.L ? p.g[gb_off(p, ch.b, ch.t0 + tid, ch.hv)] : 0.0f;
      sm.bet[tid] = tid < ch.L ? p.beta[gb_off(p, ch.b, ch.t0 + tid, ch.hv)] : 0.0f;
    }
    load_rows(sm.V, ldv, p.v + v_off(p, ch.b, ch.t0, ch.hv), p.Hv * dv, ch.L, kC, dv);
    {
      Acc64 kk;  // K K^T, into M
      acc64_zero(kk);
      acc64_mma<RowMajor, ColMajor>(kk, kC, dk, sm.K, ldk, sm.K, ldk);
      acc64_store(kk, sm.M, kLdF);
    }
    // Cumulative sum by a shuffle scan (padding rows add g = 0), made non-increasing (see cumsum64_nonincreasing).
    gi = cumsum64_nonincreasing(gi, sm.X);
    if (tid < kC) {
      sm.G[tid] = gi;
      sm.eG[tid] = expf(gi);
      if (tid < ch.L) p.Gc[ch.bh * p.S + ch.t0 + tid] = gi;
    }
    __syncthreads();
    // M = strictly_lower(diag(beta) K K^T .* exp(G_i - G_j)), in place over K K^T
    for (int e = tid; e < kC * kC; e += kThreads) {
      const int i = e / kC, j = e % kC;
      float& m = sm.M[i * kLdF + j];
      m = j < i ? sm.bet[i] * m * expf(sm.G[i] - sm.G[j]) : 0.0f;
    }
    __syncthreads();
    invert_unit_lower(sm.T, kLdF, sm.M, kLdF, sm.X);
    // bf16 operands: T, diag(beta e^G) K (into Kb), diag(beta) V (in place).
    for (int e = tid; e < kC * kC; e += kThreads)
      sm.Tb[(e / kC) * kLdH + e % kC] = to_bf16(sm.T[(e / kC) * kLdF + e % kC]);
    for (int e = tid; e < kC * dk; e += kThreads) {
      const int i = e / dk, j = e % dk;
      sm.Kb[i * ldk + j] = to_bf16(sm.bet[i] * sm.eG[i] * to_f32(sm.K[i * ldk + j]));
    }
    for (int e = tid; e < kC * dv; e += kThreads) {
      bf16& x = sm.V[(e / dv) * ldv + e % dv];
      x = to_bf16(sm.bet[e / dv] * to_f32(x));
    }
    __syncthreads();
    bf16* W = p.W + (ch.bh * p.S + ch.t0) * dk;
    bf16* U = p.U + (ch.bh * p.S + ch.t0) * dv;
    gemm<RowMajor, RowMajor>(kC, dk, kC, sm.Tb, kLdH, sm.Kb, ldk, sm.stage, [&](int i, int j, float x) {
      if (i < ch.L) W[int64_t(i) * dk + j] = to_bf16(x);
    });
    gemm<RowMajor, RowMajor>(kC, dv, kC, sm.Tb, kLdH, sm.V, ldv, sm.stage, [&](int i, int j, float x) {
      if (i < ch.L) U[int64_t(i) * dv + j] = to_bf16(x);
    });
  }
}

// ---- 2. state (forward) ----

struct StateSmem {
  float *S, *G, *eG, *dec, *stage;
  bf16 *Sb, *Wc, *Kc, *Uc, *Vd;
  size_t bytes;
  __host__ __device__ StateSmem(uintptr_t base, int dk, int bv) {
    Carve c{base};
    S = c.take<float>(size_t(dk) * (bv + kPadF));
    Sb = c.take<bf16>(size_t(dk) * (bv + kPadH));
    Wc = c.take<bf16>(size_t(kC) * (dk + kPadH));
    Kc = c.take<bf16>(size_t(kC) * (dk + kPadH));
    Uc = c.take<bf16>(size_t(kC) * (bv + kPadH));
    Vd = c.take<bf16>(size_t(kC) * (bv + kPadH));
    G = c.take<float>(kC);
    eG = c.take<float>(kC);
    dec = c.take<float>(kC);
    stage = c.take<float>(kWarps * 256);
    bytes = c.off;
  }
};

// One block per (bh, column tile [v0, v0 + bv) of dv), chunks in order: writes H and Vn, and ht when asked.
// bv = 64 at dk = dv = 128 (113 KB of shared memory: two blocks fit an SM's 228 KB, hence the 2 of
// __launch_bounds__; at B = 2, Hv = 32 there are only 128 blocks, one per SM), 197 KB at dk = 256 (one per SM).
// Loads are prefetched with cp.async one phase ahead, staggered so that single buffers suffice: W_{c+1} and U_{c+1}
// (read by the first product) load during the second product of chunk c, K_{c+1} (read by the second) during the
// first product of chunk c + 1; the next chunk's gates come through registers.
__global__ void __launch_bounds__(kThreads, 2) state_forward_kernel(const Params p, int bv) {
  const int nvt = p.dv / bv;
  const int64_t bh = blockIdx.x / nvt;
  const int v0 = int(blockIdx.x % nvt) * bv;
  const int dk = p.dk, dv = p.dv, ldk = dk + kPadH, lds = bv + kPadF, ldb = bv + kPadH, tid = threadIdx.x;
  StateSmem sm(reinterpret_cast<uintptr_t>(dynamic_smem()), dk, bv);
  const int64_t sbase = bh * dk * dv + v0;  // tile origin in h0 / ht
  auto fetch_wu = [&](const Chunk& ch) {
    const int64_t row0 = bh * p.S + ch.t0;  // workspace row of the chunk's first token
    load_rows_async(sm.Wc, ldk, p.W + row0 * dk, dk, ch.L, kC, dk);
    load_rows_async(sm.Uc, ldb, p.U + row0 * dv + v0, dv, ch.L, kC, bv);
  };
  auto fetch_k = [&](const Chunk& ch) {
    load_rows_async(sm.Kc, ldk, p.k + qk_off(p, ch.b, ch.t0, ch.hk), p.Hk * dk, ch.L, kC, dk);
  };
  // h_c -> bf16 operand Sb and H (the state entering chunk c).
  auto publish = [&](int c) {
    bf16* Hc = p.H + state_off(p, bh, c) + v0;
    for (int e = tid; e < dk * bv; e += kThreads) {
      const int i = e / bv, j = e % bv;
      const bf16 x = to_bf16(sm.S[i * lds + j]);
      sm.Sb[i * ldb + j] = x;
      Hc[int64_t(i) * dv + j] = x;
    }
  };
  {
    const Chunk ch0 = chunk_of(p, bh, 0);
    fetch_wu(ch0);
    __pipeline_commit();
    fetch_k(ch0);
    __pipeline_commit();
    load_gates(p, ch0, sm.G, sm.eG, sm.dec, nullptr);
  }
  if (p.h0) {
    load_rows(sm.S, lds, p.h0 + sbase, dv, dk, dk, bv);
  } else {
    for (int e = tid; e < dk * bv; e += kThreads) sm.S[(e / bv) * lds + e % bv] = 0.0f;
  }
  __syncthreads();
  publish(0);
  for (int c = 0; c < p.NC; ++c) {
    const Chunk ch = chunk_of(p, bh, c);
    const bool more = c + 1 < p.NC;
    const Chunk next = chunk_of(p, bh, more ? c + 1 : c);
    const GateRegs next_gates = fetch_gates(p, next);
    __pipeline_wait_prior(1);  // W_c, U_c (K_c may still be in flight)
    __syncthreads();
    // Vn = U - W h_c; Vd = dec .* Vn (zero on padding rows, whose U and W rows are zero too)
    bf16* Vn = p.Vn + (bh * p.S + ch.t0) * dv + v0;
    gemm<RowMajor, RowMajor>(kC, bv, dk, sm.Wc, ldk, sm.Sb, ldb, sm.stage, [&](int i, int j, float x) {
      const float vn = to_f32(sm.Uc[i * ldb + j]) - x;
      if (i < ch.L) Vn[int64_t(i) * dv + j] = to_bf16(vn);
      sm.Vd[i * ldb + j] = to_bf16(vn * sm.dec[i]);
    });
    __pipeline_wait_prior(0);  // K_c
    __syncthreads();           // W and U are free again
    if (more) fetch_wu(next);
    __pipeline_commit();
    // h <- e^{G_last} h + K^T Vd
    const float a = sm.eG[ch.L - 1];
    gemm<ColMajor, RowMajor>(dk, bv, kC, sm.Kc, ldk, sm.Vd, ldb, sm.stage,
                             [&](int i, int j, float x) { sm.S[i * lds + j] = a * sm.S[i * lds + j] + x; });
    __syncthreads();  // K, Vd, Sb and the gates are free again
    if (more) {
      fetch_k(next);
      publish(c + 1);
      store_gates(next_gates, next, sm.G, sm.eG, sm.dec);
    }
    __pipeline_commit();
  }
  if (p.ht)
    for (int e = tid; e < dk * bv; e += kThreads)
      p.ht[sbase + int64_t(e / bv) * dv + e % bv] = sm.S[(e / bv) * lds + e % bv];
}

// ---- 3. output ----

struct OutputSmem {
  bf16 *Q, *K, *Hs, *Vn, *P;
  float *F, *G, *eG, *dec;
  size_t bytes;
  __host__ __device__ OutputSmem(uintptr_t base, int dk) {
    Carve c{base};
    Q = c.take<bf16>(size_t(kC) * (dk + kPadH));
    K = c.take<bf16>(size_t(kC) * (dk + kPadH));
    Hs = c.take<bf16>(size_t(dk) * kLdH);
    Vn = c.take<bf16>(kC * kLdH);
    P = c.take<bf16>(kC * kLdH);
    F = c.take<float>(kC * kLdF);
    G = c.take<float>(kC);
    eG = c.take<float>(kC);
    dec = c.take<float>(kC);
    bytes = c.off;
  }
};

// One block per (sequence b, key head hk, chunk): Q K^T is formed once (kept in registers) for the r = Hv / Hk value
// heads of the key head; per head, P = scale (Q K^T) .* decay (causal), then per 64-column tile [v0, v0 + w) of dv
// O = scale e^G .* (Q h_c) + P Vn (the first product, scaled, is the second's starting accumulator). F stages
// Q K^T for P and each O tile for the element-wise steps and the masked store.
__global__ void __launch_bounds__(kThreads) output_kernel(const Params p) {
  const int64_t bhk = blockIdx.x / p.NC;  // b * Hk + hk
  const int c = int(blockIdx.x % p.NC);
  const int64_t bh0 = (bhk / p.Hk) * p.Hv + (bhk % p.Hk) * p.r;  // the group's first value head
  const int dk = p.dk, dv = p.dv, ldk = dk + kPadH, tid = threadIdx.x;
  OutputSmem sm(reinterpret_cast<uintptr_t>(dynamic_smem()), dk);
  Acc64 qk;  // Q K^T
  group_qk(p, bh0, c, sm.Q, sm.K, qk);
  const float scale = p.scale;
  const int64_t ldO = p.Hv * dv;
  for (int rr = 0; rr < p.r; ++rr) {
    const Chunk ch = chunk_of(p, bh0 + rr, c);
    __syncthreads();  // the previous head's P, tiles and F are free
    head_scores(p, ch, qk, sm.F, sm.P, sm.G, sm.eG, sm.dec);
    bf16* o = p.o + v_off(p, ch.b, ch.t0, ch.hv);
    for (int v0 = 0; v0 < dv; v0 += kTile) {
      const int w = dv - v0 < kTile ? dv - v0 : kTile;
      __syncthreads();  // P written; the previous tile's Hs, Vn and F are free
      load_rows(sm.Hs, kLdH, p.H + state_off(p, ch.bh, ch.c) + v0, dv, dk, dk, w);
      load_rows(sm.Vn, kLdH, p.Vn + (ch.bh * p.S + ch.t0) * dv + v0, dv, ch.L, kC, w);
      __syncthreads();
      Acc64 acc;
      acc64_zero(acc);
      acc64_mma<RowMajor, RowMajor>(acc, w, dk, sm.Q, ldk, sm.Hs, kLdH);
      acc64_store(acc, sm.F, kLdF);
      __syncthreads();
      for (int e = tid; e < kC * kC; e += kThreads) sm.F[(e / kC) * kLdF + e % kC] *= scale * sm.eG[e / kC];
      __syncthreads();
      acc64_load(acc, sm.F, kLdF);
      acc64_mma<RowMajor, RowMajor>(acc, w, kC, sm.P, kLdH, sm.Vn, kLdH);
      acc64_store(acc, sm.F, kLdF);  // each warp rewrites the F tiles it loaded
      __syncthreads();
      for (int e = tid; e < kC * w; e += kThreads) {
        const int i = e / w, j = e % w;
        if (i < ch.L) o[i * ldO + v0 + j] = to_bf16(sm.F[i * kLdF + j]);
      }
    }
  }
}

}  // namespace

size_t device_smem_limit() {
  int dev = 0, optin = 0;
  NEXTRON_CUDA_CHECK(cudaGetDevice(&dev));
  NEXTRON_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return size_t(optin);
}

void allow_smem(const void* kernel, size_t bytes, const char* what) {
  int dev = 0, optin = 0;
  NEXTRON_CUDA_CHECK(cudaGetDevice(&dev));
  NEXTRON_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  NEXTRON_CHECK(bytes <= size_t(optin), what, ": needs ", bytes, " bytes of shared memory per block, the device has ",
                optin, " (smaller dk / dv)");
  NEXTRON_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

void set_shape(Params& p, const GdrShape& s, float scale, const char* what) {
  NEXTRON_CHECK(s.B >= 0 && s.S >= 0 && s.Hk > 0 && s.Hv > 0, what, ": bad shape B=", s.B, " S=", s.S, " Hk=", s.Hk,
                " Hv=", s.Hv);
  NEXTRON_CHECK(s.Hv % s.Hk == 0, what, ": value heads Hv=", s.Hv, " must be a multiple of key heads Hk=", s.Hk);
  NEXTRON_CHECK(s.dk >= 16 && s.dk <= kMaxDim && s.dk % 16 == 0 && s.dv >= 16 && s.dv <= kMaxDim && s.dv % 16 == 0,
                what, ": head dims dk=", s.dk, " dv=", s.dv, " must be multiples of 16 in [16, ", kMaxDim, "]");
  p.B = s.B;
  p.S = s.S;
  p.Hk = s.Hk;
  p.Hv = s.Hv;
  p.BH = s.B * s.Hv;
  p.dk = int(s.dk);
  p.dv = int(s.dv);
  p.r = int(s.Hv / s.Hk);
  p.NC = int(ceil_div(s.S, kC));
  p.NK = int(ceil_div(s.dk, kTile));
  p.scale = scale;
  // The largest grid has BH * NC * 4 blocks (4 column tiles of dk or dv); grids are 1-D.
  NEXTRON_CHECK(p.BH * p.NC * 4 <= int64_t(INT32_MAX), what, ": B * Hv * ceil(S / 64) = ", p.BH * p.NC,
                " chunks is too many for one launch");
}

namespace {
// Hands out 256-byte-aligned pieces of base (nullptr: only counts them).
struct Carver {
  void* base;
  size_t off = 0;
  template <typename T>
  T* take(size_t bytes) {
    T* ptr = base ? reinterpret_cast<T*>(static_cast<char*>(base) + off) : nullptr;
    off += (bytes + 255) / 256 * 256;
    return ptr;
  }
};
}  // namespace

size_t carve_intermediates(Params& p, void* base) {
  Carver c{base};
  const size_t N = size_t(p.BH) * size_t(p.S), dk = size_t(p.dk), dv = size_t(p.dv);
  const size_t states = size_t(p.BH) * size_t(p.NC) * dk * dv;
  p.Gc = c.take<float>(4 * N);
  p.W = c.take<bf16>(2 * N * dk);
  p.U = c.take<bf16>(2 * N * dv);
  p.Vn = c.take<bf16>(2 * N * dv);
  p.H = c.take<bf16>(2 * states);
  return c.off;
}

size_t carve_workspace(Params& p, void* base, bool intermediates) {
  Carver c{base};
  const size_t N = size_t(p.BH) * size_t(p.S), dk = size_t(p.dk), dv = size_t(p.dv);
  const size_t states = size_t(p.BH) * size_t(p.NC) * dk * dv;
  p.dVn = c.take<bf16>(2 * N * dv);
  p.dH = c.take<bf16>(2 * states);
  p.dW = c.take<bf16>(2 * N * dk);
  p.dVl = c.take<bf16>(2 * N * dv);
  p.dKp = c.take<float>(4 * size_t(p.B) * size_t(p.Hk) * size_t(p.S) * dk);
  p.dGp = c.take<float>(4 * N);
  if (intermediates) c.off += carve_intermediates(p, c.take<char>(0));  // after the rest, 256-byte aligned
  return c.off;
}

// HBM traffic of the forward's kernels, as the code reads and writes (gated_delta_rule.h). N = BH * S rows of the
// workspace, Nk = B * S * Hk rows of q / k, states = BH * NC * dk * dv, state = BH * dk * dv; nvs = dv /
// state_forward_tile column tiles of the state kernel. Block loads (every block's, L2 hits or not):
//   kernel   reads                                                          writes
//   prepare  g 4N, beta 4N, k 2 Nk dk (once per key head), v 2N dv           Gc 4N, W 2N dk, U 2N dv
//   state    (W 2N dk + k 2N dk + Gc 4N) nvs, U 2N dv, h0 4 state            H 2 states, Vn 2N dv, ht 4 state
//            (k per value head: N rows)
//   output   q, k 2 Nk dk each (once per key head), Gc 4N, H 2 states,      o 2N dv
//            Vn 2N dv
// Distinct bytes: the same with every tensor counted once per kernel; only the state kernel differs (no nvs factor,
// k 2 Nk dk).
void forward_traffic(const Params& p, bool final_state, bool output, std::vector<GdrKernelTraffic>& rows) {
  const size_t N = size_t(p.BH) * size_t(p.S), Nk = size_t(p.B) * size_t(p.S) * size_t(p.Hk);
  const size_t dk = size_t(p.dk), dv = size_t(p.dv);
  const size_t states = size_t(p.BH) * size_t(p.NC) * dk * dv, state = size_t(p.BH) * dk * dv;
  const size_t nvs = size_t(p.dv / state_forward_tile(p.dk, p.dv));
  const size_t qk = 2 * Nk * dk, ht = final_state ? 4 * state : 0;
  {
    const size_t r = 4 * N + 4 * N + qk + 2 * N * dv, w = 4 * N + 2 * N * dk + 2 * N * dv;
    rows.push_back({"prepare", r, w, r, w});
  }
  {
    const size_t once = 2 * N * dv + 4 * state, w = 2 * states + 2 * N * dv + ht;
    rows.push_back(
        {"state forward", (2 * N * dk + 2 * N * dk + 4 * N) * nvs + once, w, 2 * N * dk + qk + 4 * N + once, w});
  }
  if (output) {
    const size_t r = qk + qk + 4 * N + 2 * states + 2 * N * dv, w = 2 * N * dv;
    rows.push_back({"output", r, w, r, w});
  }
}

void launch_prepare(const Params& p, cudaStream_t stream) {
  const size_t bytes = PrepareSmem(0, p.dk, p.dv).bytes;
  allow_smem(reinterpret_cast<const void*>(&prepare_kernel), bytes, "gated_delta_rule (prepare)");
  prepare_kernel<<<unsigned(p.B * p.Hk * p.NC), kThreads, bytes, stream>>>(p);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

int state_forward_tile(int dk, int dv, size_t limit) {
  return state_tile(
      dv, [dk](int bv) { return StateSmem(0, dk, bv).bytes; }, limit);
}

void launch_state_forward(const Params& p, cudaStream_t stream) {
  const int bv = state_forward_tile(p.dk, p.dv, device_smem_limit());
  const size_t bytes = StateSmem(0, p.dk, bv).bytes;
  allow_smem(reinterpret_cast<const void*>(&state_forward_kernel), bytes, "gated_delta_rule (state)");
  state_forward_kernel<<<unsigned(p.BH * (p.dv / bv)), kThreads, bytes, stream>>>(p, bv);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace gdr

size_t gdr::aligned_workspace_bytes(const GdrShape& s, bool caller_keeps_intermediates) {
  gdr::Params p{};
  gdr::set_shape(p, s, 1.0f, "gated_delta_rule_workspace_bytes");
  return gdr::carve_workspace(p, nullptr, !caller_keeps_intermediates);
}

size_t gdr::aligned_saved_bytes(const GdrShape& s) {
  gdr::Params p{};
  gdr::set_shape(p, s, 1.0f, "gated_delta_rule_saved_bytes");
  return gdr::carve_intermediates(p, nullptr);
}

std::vector<GdrKernelTraffic> gated_delta_rule_forward_hbm_account(const GdrShape& s) {
  gdr::Params p{};
  gdr::set_shape(p, s, 1.0f, "gated_delta_rule_forward_hbm_account");
  std::vector<GdrKernelTraffic> rows;
  if (s.B > 0 && s.S > 0) gdr::forward_traffic(p, true, true, rows);
  return rows;
}

void gdr::forward_aligned(bf16* o, float* final_state, const bf16* q, const bf16* k, const bf16* v, const float* g,
                          const float* beta, const float* initial_state, const GdrShape& s, float scale, void* save,
                          void* workspace, cudaStream_t stream) {
  gdr::Params p{};
  gdr::set_shape(p, s, scale, "gated_delta_rule_forward");
  if (s.B == 0) return;
  const size_t state_bytes = size_t(s.B * s.Hv * s.dk * s.dv) * sizeof(float);
  if (s.S == 0) {  // no tokens: the state passes through
    if (final_state && initial_state)
      NEXTRON_CUDA_CHECK(cudaMemcpyAsync(final_state, initial_state, state_bytes, cudaMemcpyDeviceToDevice, stream));
    else if (final_state)
      NEXTRON_CUDA_CHECK(cudaMemsetAsync(final_state, 0, state_bytes, stream));
    return;
  }
  NEXTRON_CHECK(workspace != nullptr || save != nullptr,
                "gated_delta_rule_forward: workspace is null (size it with "
                "gated_delta_rule_workspace_bytes)");
  // The intermediates go to the caller's `save` (kept for the backward) or to the workspace.
  gdr::carve_workspace(p, workspace, save == nullptr);
  if (save) gdr::carve_intermediates(p, save);
  p.q = q;
  p.k = k;
  p.v = v;
  p.g = g;
  p.beta = beta;
  p.h0 = initial_state;
  p.o = o;
  p.ht = final_state;
  gdr::launch_prepare(p, stream);
  gdr::launch_state_forward(p, stream);
  const size_t bytes = gdr::OutputSmem(0, p.dk).bytes;
  gdr::allow_smem(reinterpret_cast<const void*>(&gdr::output_kernel), bytes, "gated_delta_rule (output)");
  gdr::output_kernel<<<unsigned(p.B * p.Hk * p.NC), gdr::kThreads, bytes, stream>>>(p);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace nextron::cuda
