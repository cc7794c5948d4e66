// Chunked gated delta rule on the GPU: backward (forward, algorithm and workspace: gated_delta_rule_fwd.cu; CPU
// reference and the derivation: kernels/cpu/gated_delta_rule.cpp, chunk_backward).
//
// With dS' the gradient of the state leaving a chunk, Qe = scale e^G .* Q, P = scale (Q K^T) .* decay (causal):
//   dVn = (dec .* K) dS' + P^T dO,   dS = e^{G_last} dS' + Qe^T dO - W^T dVn   (dS: the entering state),
//   dQ = scale e^G .* (dO h^T) + dP K,  dK = dec .* (Vn dS'^T) + dP^T Q + (WY terms),  dW = -dVn h^T,
//   with dP = scale decay .* (dO Vn^T) (causal); then through W = T Kb, U = T Vb, T = (I + M)^-1:
//   dVb = T^T dVn, dKb = T^T dW, dM = -(dVb U^T + dKb W^T) (strictly lower), dKK = dM .* beta_i decay_ij,
//   dK += beta e^G .* dKb + (dKK + dKK^T) K, dv += beta .* dVb, dbeta = v.dVb + e^G k.dKb + sum_j dM_ij KK_ij decay_ij.
// dG (the gradient of the cumulative gates) uses that every decay factor exp(G_i - G_j) pairs with q_i.k_j or
// k_i.k_j: its share is q_i.dq_i - k_i.dk_i over the q/k gradients of those terms, plus e^{G_last} <h, dS'> and
// sum_i k_i.dk_i(state) on the last row; dg is the reverse cumulative sum of dG within the chunk.
// Kernels, in order (the first two are the forward's, recomputing Gc, W, U, h_c and Vn into the workspace):
//   prepare, state forward (as in the forward, without the final state);
//   dvlocal     (B * Hk * NC blocks, looping over the value heads of the key head and, per head, over dv in 64-column
//               tiles): Q K^T once, then per head P and dVl = P^T dO (bf16, as the other workspace operands);
//   state back  (BH * dv / bv blocks, chunks in reverse): carries dS (fp32, dk x bv), writes dH_c = dS' (bf16) and
//               dVn = dVl + dec .* (K dS'), then dS <- e^{G_last} dS + [Q; W]^T [scale e^G .* dO; -dVn] (one product
//               with K = 128), finally d_initial_state += dS; prefetched like the forward state kernel;
//   dqk         (B * Hk * NC blocks, looping over the Hv / Hk value heads of the key head and, per head, over the
//               64-column tiles of dk with dO, Vn, dVn held at full width dv in shared memory): dP once per head,
//               then per tile dQ, dK (state and P terms), dW; the dG partial of each head (fp32, dGp); its three
//               sums over dv per tile stay in registers (wmma accumulator fragments), and so do dq and dK, summed
//               over the head group: dq is added to the bf16 dq once, dK written once per key head (dKp, fp32);
//   wy          (B * Hk * NC blocks, looping over the value heads of the key head): KK once, then per head T, dVb,
//               dKb, dM (in registers), dKK; accumulates dv, dbeta, dg (the reverse cumulative sum by a shuffle
//               scan); dk (the WY terms, summed over the head group) in registers, added with dKp to the bf16 dk
//               once.
// Changes of the traffic work (docs/cuda.md, "The delta rule's HBM traffic"): dq and dk used to be written per value
// head as fp32 partials (dQp, and dKp read-modify-written twice by wy), then summed over the head group by a
// separate reduce kernel; summing the group inside dqk / wy (in head order, so still deterministic) removes the dQp
// buffer, the reduce kernel and wy's two read-modify-writes, and loads q / k once per key head instead of once per
// value head: 80.64 -> 67.14 units of traffic at the issue's shape. The one-thread serial loops (the dg reverse
// cumsum, dqk's sum of the last row's terms) became a shuffle scan and a warp sum. T is still recomputed by wy
// rather than saved by prepare: saving it would add traffic (T in bf16 is 64 values per row, half a (B, S, Hv, dv)
// tensor written and read again, +1 unit) to save the inversion per chunk and head; KK, the product it would also
// save, is now formed once per key head. Issue #18's second round (docs/cuda.md): the state backward carries
// 64-column tiles of dv where they fit (half the re-reads of K, Q, W), dvlocal runs per key head (Q K^T once), dVl is
// bf16, dqk holds a head's dO, Vn, dVn for all tiles of dk (read once instead of once per tile) and sums dK over the
// head group (dKp per key head: half the fp32 bytes written by dqk and read by wy): 67.14 -> 46.52 units.
// No atomics: every output element is written by one thread, partial sums are combined in a fixed order, so two
// runs give bit-identical gradients.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/gated_delta_rule_impl.cuh"

namespace nextron::cuda {

namespace gdr {

namespace {

// ---- dvlocal: dVl = P^T dO ----

struct DvLocalSmem {
  bf16 *Q, *K, *dO, *P;
  float *F, *G, *eG, *dec;
  size_t bytes;
  __host__ __device__ DvLocalSmem(uintptr_t base, int dk) {
    Carve c{base};
    Q = c.take<bf16>(size_t(kC) * (dk + kPadH));
    K = c.take<bf16>(size_t(kC) * (dk + kPadH));
    dO = c.take<bf16>(kC * kLdH);
    P = c.take<bf16>(kC * kLdH);
    F = c.take<float>(kC * kLdF);
    G = c.take<float>(kC);
    eG = c.take<float>(kC);
    dec = c.take<float>(kC);
    bytes = c.off;
  }
};

// One block per (sequence b, key head hk, chunk): Q K^T is formed once (kept in registers) for the r = Hv / Hk value
// heads of the key head; per head, P = scale (Q K^T) .* decay (causal) with that head's gates, then dVl = P^T dO over
// the whole dv in 64-column tiles (dO loaded tile by tile). F stages Q K^T for P and each tile of dVl for the
// masked store (rows past the end of a partial chunk are not written).
__global__ void __launch_bounds__(kThreads) dvlocal_kernel(const Params p) {
  const int64_t bhk = blockIdx.x / p.NC;  // b * Hk + hk
  const int c = int(blockIdx.x % p.NC);
  const int64_t bh0 = (bhk / p.Hk) * p.Hv + (bhk % p.Hk) * p.r;  // the group's first value head
  const int dk = p.dk, dv = p.dv, tid = threadIdx.x;
  DvLocalSmem sm(reinterpret_cast<uintptr_t>(dynamic_smem()), dk);
  Acc64 qk;  // Q K^T
  group_qk(p, bh0, c, sm.Q, sm.K, qk);
  for (int rr = 0; rr < p.r; ++rr) {
    const Chunk ch = chunk_of(p, bh0 + rr, c);
    __syncthreads();  // the previous head's P, dO and F are free
    head_scores(p, ch, qk, sm.F, sm.P, sm.G, sm.eG, sm.dec);
    bf16* dVl = p.dVl + (ch.bh * p.S + ch.t0) * dv;
    for (int v0 = 0; v0 < dv; v0 += kTile) {
      const int w = dv - v0 < kTile ? dv - v0 : kTile;
      __syncthreads();  // P written; the previous tile's dO and F are free
      load_rows(sm.dO, kLdH, p.d_o + v_off(p, ch.b, ch.t0, ch.hv) + v0, p.Hv * dv, ch.L, kC, w);
      __syncthreads();
      Acc64 acc;
      acc64_zero(acc);
      acc64_mma<ColMajor, RowMajor>(acc, w, kC, sm.P, kLdH, sm.dO, kLdH);
      acc64_store(acc, sm.F, kLdF);
      __syncthreads();
      for (int e = tid; e < kC * w; e += kThreads) {
        const int i = e / w, j = e % w;
        if (i < ch.L) dVl[int64_t(i) * dv + v0 + j] = to_bf16(sm.F[i * kLdF + j]);
      }
    }
  }
}

// ---- state backward ----

struct StateBackSmem {
  float *dS, *G, *eG, *dec, *stage;
  bf16 *dSb, *QW, *Kc, *dO, *DB, *dVl;
  size_t bytes;
  __host__ __device__ StateBackSmem(uintptr_t base, int dk, int bv) {
    Carve c{base};
    dS = c.take<float>(size_t(dk) * (bv + kPadF));
    dSb = c.take<bf16>(size_t(dk) * (bv + kPadH));
    QW = c.take<bf16>(size_t(2 * kC) * (dk + kPadH));
    Kc = c.take<bf16>(size_t(kC) * (dk + kPadH));
    dO = c.take<bf16>(size_t(kC) * (bv + kPadH));
    DB = c.take<bf16>(size_t(2 * kC) * (bv + kPadH));
    dVl = c.take<bf16>(size_t(kC) * (bv + kPadH));
    G = c.take<float>(kC);
    eG = c.take<float>(kC);
    dec = c.take<float>(kC);
    stage = c.take<float>(kWarps * 256);
    bytes = c.off;
  }
};

// The column tile of dv of one block (state_tile): 64 at dk <= 128 (148 KB of shared memory at dk = dv = 128: one
// block per SM, hence no second block in __launch_bounds__), else 32 (dk = 256: 184 KB) or 16.
int state_backward_tile(int dk, int dv, size_t limit = kSmemPerBlock) {
  return state_tile(
      dv, [dk](int bv) { return StateBackSmem(0, dk, bv).bytes; }, limit);
}

// One block per (bh, column tile [v0, v0 + bv) of dv), chunks in reverse order. Prefetch as in the forward state
// kernel: K, dVl, dO of chunk c - 1 (read in the first phase) load during the second product of chunk c; Q, W
// (read by the second product) during the first phase of chunk c - 1.
__global__ void __launch_bounds__(kThreads, 1) state_backward_kernel(const Params p, int bv) {
  const int nvt = p.dv / bv;
  const int64_t bh = blockIdx.x / nvt;
  const int v0 = int(blockIdx.x % nvt) * bv;
  const int dk = p.dk, dv = p.dv, ldk = dk + kPadH, lds = bv + kPadF, ldb = bv + kPadH, tid = threadIdx.x;
  StateBackSmem sm(reinterpret_cast<uintptr_t>(dynamic_smem()), dk, bv);
  const int64_t sbase = bh * dk * dv + v0;
  const float scale = p.scale;
  auto fetch_first = [&](const Chunk& ch) {  // K, dVl, dO
    load_rows_async(sm.Kc, ldk, p.k + qk_off(p, ch.b, ch.t0, ch.hk), p.Hk * dk, ch.L, kC, dk);
    load_rows_async(sm.dVl, ldb, p.dVl + (bh * p.S + ch.t0) * dv + v0, dv, ch.L, kC, bv);
    load_rows_async(sm.dO, ldb, p.d_o + v_off(p, ch.b, ch.t0, ch.hv) + v0, p.Hv * dv, ch.L, kC, bv);
  };
  auto fetch_second = [&](const Chunk& ch) {  // Q and W, stacked
    load_rows_async(sm.QW, ldk, p.q + qk_off(p, ch.b, ch.t0, ch.hk), p.Hk * dk, ch.L, kC, dk);
    load_rows_async(sm.QW + kC * ldk, ldk, p.W + (bh * p.S + ch.t0) * dk, dk, ch.L, kC, dk);
  };
  // dS' of chunk c (the gradient of the state leaving it) -> bf16 operand dSb and dH.
  auto publish = [&](int c) {
    bf16* dHc = p.dH + state_off(p, bh, c) + v0;
    for (int e = tid; e < dk * bv; e += kThreads) {
      const int i = e / bv, j = e % bv;
      const bf16 x = to_bf16(sm.dS[i * lds + j]);
      sm.dSb[i * ldb + j] = x;
      dHc[int64_t(i) * dv + j] = x;
    }
  };
  {
    const Chunk last = chunk_of(p, bh, p.NC - 1);
    fetch_first(last);
    __pipeline_commit();
    fetch_second(last);
    __pipeline_commit();
    load_gates(p, last, sm.G, sm.eG, sm.dec, nullptr);
  }
  if (p.dht) {
    load_rows(sm.dS, lds, p.dht + sbase, dv, dk, dk, bv);
  } else {
    for (int e = tid; e < dk * bv; e += kThreads) sm.dS[(e / bv) * lds + e % bv] = 0.0f;
  }
  __syncthreads();
  publish(p.NC - 1);
  for (int c = p.NC - 1; c >= 0; --c) {
    const Chunk ch = chunk_of(p, bh, c);
    const bool more = c > 0;
    const Chunk next = chunk_of(p, bh, more ? c - 1 : c);
    const GateRegs next_gates = fetch_gates(p, next);
    __pipeline_wait_prior(1);  // K, dVl, dO of chunk c (Q, W may still be in flight)
    __syncthreads();
    // Rows 0..63 of DB: scale e^G .* dO; rows 64..127: -dVn with dVn = dVl + dec .* (K dS')
    for (int e = tid; e < kC * bv; e += kThreads) {
      const int i = e / bv, j = e % bv;
      sm.DB[i * ldb + j] = to_bf16(scale * sm.eG[i] * to_f32(sm.dO[i * ldb + j]));
    }
    bf16* dVn = p.dVn + (bh * p.S + ch.t0) * dv + v0;
    gemm<RowMajor, RowMajor>(kC, bv, dk, sm.Kc, ldk, sm.dSb, ldb, sm.stage, [&](int i, int j, float x) {
      const float d = to_f32(sm.dVl[i * ldb + j]) + sm.dec[i] * x;
      if (i < ch.L) dVn[int64_t(i) * dv + j] = to_bf16(d);
      sm.DB[(kC + i) * ldb + j] = to_bf16(-d);
    });
    __pipeline_wait_prior(0);  // Q, W
    __syncthreads();           // K, dVl, dO are free again
    if (more) fetch_first(next);
    __pipeline_commit();
    // dS <- e^{G_last} dS + Q^T (scale e^G .* dO) - W^T dVn
    const float a = sm.eG[ch.L - 1];
    gemm<ColMajor, RowMajor>(dk, bv, 2 * kC, sm.QW, ldk, sm.DB, ldb, sm.stage,
                             [&](int i, int j, float x) { sm.dS[i * lds + j] = a * sm.dS[i * lds + j] + x; });
    __syncthreads();  // QW, DB, dSb and the gates are free again
    if (more) {
      fetch_second(next);
      publish(c - 1);
      store_gates(next_gates, next, sm.G, sm.eG, sm.dec);
    }
    __pipeline_commit();
  }
  if (p.grad_h0)
    for (int e = tid; e < dk * bv; e += kThreads)
      add_to(p.grad_h0 + sbase + int64_t(e / bv) * dv + e % bv, sm.dS[(e / bv) * lds + e % bv]);
}

// ---- dqk: dQ, dK (state and P terms), dW, dG partial ----

struct DqkSmem {
  bf16 *Q, *K, *dO, *Vn, *dVn, *H, *dH, *dP;
  float *F, *G, *eG, *dec, *r3, *dGl, *red;
  size_t bytes;
  __host__ __device__ DqkSmem(uintptr_t base, int dk, int dv) {
    Carve c{base};
    Q = c.take<bf16>(size_t(kC) * (dk + kPadH));
    K = c.take<bf16>(size_t(kC) * (dk + kPadH));
    dO = c.take<bf16>(size_t(kC) * (dv + kPadH));
    Vn = c.take<bf16>(size_t(kC) * (dv + kPadH));
    dVn = c.take<bf16>(size_t(kC) * (dv + kPadH));
    H = c.take<bf16>(kTile * kLdH);
    dH = c.take<bf16>(kTile * kLdH);
    dP = c.take<bf16>(kC * kLdH);
    F = c.take<float>(kC * kLdF);
    G = c.take<float>(kC);
    eG = c.take<float>(kC);
    dec = c.take<float>(kC);
    r3 = c.take<float>(kC);
    dGl = c.take<float>(kC + 1);
    red = c.take<float>(32);
    bytes = c.off;
  }
};

// One block per (sequence b, key head hk, chunk), looping over the r = Hv / Hk value heads of the key head in head
// order and, per head, over the NKT = ceil(dk / 64) column tiles of dk. q / k of the key head are loaded once; per
// head, dO, Vn and dVn are loaded once at their full width dv and kept in shared memory for all tiles of dk, so each
// is read once (the h_c / dS' tiles, one per (dk, dv) tile pair, are read once too). dP = scale decay .* (dO Vn^T)
// is formed once per head. dq and dK (state and P terms), each summed over the group in head order, stay in
// registers (NKT Acc64 tiles each) and go out once per key head: dq added to grad_q, dK as the fp32 dKp for the wy
// kernel. The dG partial of a head (summed over the tiles of dk) goes to dGp. Shared memory at dk = dv = 128:
// 131 KB (211 KB at 256), so one block per SM (__launch_bounds__ lets it use the registers of two).
template <int NKT>
__global__ void __launch_bounds__(kThreads, 1) dqk_kernel(const Params p) {
  const int64_t bhk = blockIdx.x / p.NC;  // b * Hk + hk
  const int c = int(blockIdx.x % p.NC);
  const int64_t bh0 = (bhk / p.Hk) * p.Hv + (bhk % p.Hk) * p.r;  // the group's first value head
  const int dk = p.dk, dv = p.dv, ldk = dk + kPadH, ldv = dv + kPadH, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  DqkSmem sm(reinterpret_cast<uintptr_t>(dynamic_smem()), dk, dv);
  float* F = sm.F;
  const float scale = p.scale;
  const Chunk ch0 = chunk_of(p, bh0, c);
  load_rows(sm.Q, ldk, p.q + qk_off(p, ch0.b, ch0.t0, ch0.hk), p.Hk * dk, ch0.L, kC, dk);
  load_rows(sm.K, ldk, p.k + qk_off(p, ch0.b, ch0.t0, ch0.hk), p.Hk * dk, ch0.L, kC, dk);
  Acc64 sQ[NKT], sK[NKT];  // dq and dK: sums over the group's value heads, in head order
#pragma unroll
  for (int kt = 0; kt < NKT; ++kt) {
    acc64_zero(sQ[kt]);
    acc64_zero(sK[kt]);
  }
  for (int rr = 0; rr < p.r; ++rr) {
    const Chunk ch = chunk_of(p, bh0 + rr, c);
    const int64_t row0 = ch.bh * p.S + ch.t0;
    __syncthreads();  // the previous head's tiles, gates and dG sums are free
    load_gates(p, ch, sm.G, sm.eG, sm.dec, nullptr);
    if (tid < kC) sm.r3[tid] = 0.0f;
    if (tid <= kC) sm.dGl[tid] = 0.0f;
    load_rows(sm.dO, ldv, p.d_o + v_off(p, ch.b, ch.t0, ch.hv), p.Hv * dv, ch.L, kC, dv);
    load_rows(sm.Vn, ldv, p.Vn + row0 * dv, dv, ch.L, kC, dv);
    load_rows(sm.dVn, ldv, p.dVn + row0 * dv, dv, ch.L, kC, dv);
    __syncthreads();
    {  // dP = scale decay .* (dO Vn^T), causal (bf16)
      Acc64 aP;
      acc64_zero(aP);
      acc64_mma<RowMajor, ColMajor>(aP, kC, dv, sm.dO, ldv, sm.Vn, ldv);
      acc64_store(aP, F, kLdF);
    }
    __syncthreads();
    for (int e = tid; e < kC * kC; e += kThreads) {
      const int i = e / kC, j = e % kC;
      sm.dP[i * kLdH + j] = to_bf16(j <= i ? scale * expf(sm.G[i] - sm.G[j]) * F[i * kLdF + j] : 0.0f);
    }
    const bf16* Hc = p.H + state_off(p, ch.bh, ch.c);
    const bf16* dHc = p.dH + state_off(p, ch.bh, ch.c);
    float hdh = 0.0f;  // this thread's share of <h_c, dS'>
#pragma unroll
    for (int kt = 0; kt < NKT; ++kt) {
      const int k0 = kt * kTile, bk = dk - k0 < kTile ? dk - k0 : kTile;
      const bf16* Qt = sm.Q + k0;  // the tile's columns of Q and K (row stride ldk)
      const bf16* Kt = sm.K + k0;
      // Sums over dv: aQ = dO h^T, aK = Vn dS'^T, aW = dVn h^T (64 x bk).
      Acc64 aQ, aK, aW;
      acc64_zero(aQ);
      acc64_zero(aK);
      acc64_zero(aW);
      for (int v0 = 0; v0 < dv; v0 += kTile) {
        const int w = dv - v0 < kTile ? dv - v0 : kTile;
        __syncthreads();  // dP written; the previous h / dS' tiles and F are free
        load_rows(sm.H, kLdH, Hc + int64_t(k0) * dv + v0, dv, bk, kTile, w);
        load_rows(sm.dH, kLdH, dHc + int64_t(k0) * dv + v0, dv, bk, kTile, w);
        __syncthreads();
        acc64_mma<RowMajor, ColMajor>(aQ, bk, w, sm.dO + v0, ldv, sm.H, kLdH);
        acc64_mma<RowMajor, ColMajor>(aK, bk, w, sm.Vn + v0, ldv, sm.dH, kLdH);
        acc64_mma<RowMajor, ColMajor>(aW, bk, w, sm.dVn + v0, ldv, sm.H, kLdH);
        for (int e = tid; e < bk * w; e += kThreads)
          hdh += to_f32(sm.H[(e / w) * kLdH + e % w]) * to_f32(sm.dH[(e / w) * kLdH + e % w]);
      }
      // dQ = scale e^G .* (dO h^T) + dP K
      acc64_store(aQ, F, kLdF);
      __syncthreads();
      for (int e = tid; e < kC * kC; e += kThreads) F[(e / kC) * kLdF + e % kC] *= scale * sm.eG[e / kC];
      __syncthreads();
      acc64_load(aQ, F, kLdF);
      acc64_mma<RowMajor, RowMajor>(aQ, bk, kC, sm.dP, kLdH, Kt, ldk);
      __syncthreads();
      // dK = dec .* (Vn dS'^T) + dP^T Q; r3_i += k_i . dK(state)_i, the dG of the state update's decay factors
      acc64_store(aK, F, kLdF);
      __syncthreads();
      for (int i = warp; i < kC; i += kWarps) {
        float s = 0.0f;
        for (int j = lane; j < kC; j += 32) {
          F[i * kLdF + j] *= sm.dec[i];
          if (j < bk) s += to_f32(Kt[i * ldk + j]) * F[i * kLdF + j];
        }
        s = warp_sum(s);
        if (lane == 0) sm.r3[i] += s;
      }
      __syncthreads();
      acc64_load(aK, F, kLdF);
      acc64_mma<ColMajor, RowMajor>(aK, bk, kC, sm.dP, kLdH, Qt, ldk);
      __syncthreads();
      // dq += dQ, dK sum += dK (registers), dW = -dVn h^T, and dG_i += q_i . dQ_i - k_i . dK_i over the tile
      acc64_add(sQ[kt], aQ);
      acc64_add(sK[kt], aK);
      acc64_store(aQ, F, kLdF);
      __syncthreads();
      for (int i = warp; i < kC; i += kWarps) {
        const float s = row_dot(Qt + i * ldk, F + i * kLdF, bk);
        if (lane == 0) sm.dGl[i] += s;
      }
      __syncthreads();
      acc64_store(aK, F, kLdF);
      __syncthreads();
      for (int i = warp; i < kC; i += kWarps) {
        const float s = row_dot(Kt + i * ldk, F + i * kLdF, bk);
        if (lane == 0) sm.dGl[i] -= s;
      }
      __syncthreads();
      acc64_store(aW, F, kLdF);
      __syncthreads();
      for (int e = tid; e < kC * bk; e += kThreads) {
        const int i = e / bk, j = e % bk;
        if (i < ch.L) p.dW[(row0 + i) * dk + k0 + j] = to_bf16(-F[i * kLdF + j]);
      }
    }
    hdh = block_sum(hdh, sm.red);
    if (warp == 0) {  // the last row's extra terms: e^{G_last} <h, dS'> + sum_i k_i . dK(state)_i (zero past L)
      const float tail = warp_sum(sm.r3[lane] + sm.r3[lane + 32]);
      if (lane == 0) sm.dGl[kC] = sm.eG[ch.L - 1] * hdh + tail;
    }
    __syncthreads();
    if (tid < ch.L) p.dGp[row0 + tid] = sm.dGl[tid] + (tid == ch.L - 1 ? sm.dGl[kC] : 0.0f);
  }
  // dKp (always: wy reads it) and dq of the key head
  float* dKp = p.dKp + (bhk * p.S + ch0.t0) * dk;
  bf16* dq = p.grad_q ? p.grad_q + qk_off(p, ch0.b, ch0.t0, ch0.hk) : nullptr;
  const int64_t ldq = p.Hk * dk;
#pragma unroll
  for (int kt = 0; kt < NKT; ++kt) {
    const int k0 = kt * kTile, bk = dk - k0 < kTile ? dk - k0 : kTile;
    __syncthreads();  // F is free
    acc64_store(sK[kt], F, kLdF);
    __syncthreads();
    for (int e = tid; e < kC * bk; e += kThreads) {
      const int i = e / bk, j = e % bk;
      if (i < ch0.L) dKp[int64_t(i) * dk + k0 + j] = F[i * kLdF + j];
    }
    if (!dq) continue;
    __syncthreads();
    acc64_store(sQ[kt], F, kLdF);
    __syncthreads();
    for (int e = tid; e < kC * bk; e += kThreads) {
      const int i = e / bk, j = e % bk;
      if (i < ch0.L) add_to(dq + i * ldq + k0 + j, F[i * kLdF + j]);
    }
  }
}

// ---- wy: backward through W = T Kb, U = T Vb, T = (I + M)^-1, M ----

struct WySmem {
  bf16 *K, *Tb, *A1, *A2, *A3;
  float *KK, *M, *T, *Xs, *G, *eG, *dec, *bet, *dGl, *dbl, *rowc, *colc;
  size_t bytes;
  __host__ __device__ WySmem(uintptr_t base, int dk) {
    Carve c{base};
    K = c.take<bf16>(size_t(kC) * (dk + kPadH));
    Tb = c.take<bf16>(kC * kLdH);
    A1 = c.take<bf16>(kC * kLdH);
    A2 = c.take<bf16>(kC * kLdH);
    A3 = c.take<bf16>(kC * kLdH);
    KK = c.take<float>(kC * kLdF);
    M = c.take<float>(kC * kLdF);
    T = c.take<float>(kC * kLdF);
    Xs = c.take<float>(3 * 256);
    G = c.take<float>(kC);
    eG = c.take<float>(kC);
    dec = c.take<float>(kC);
    bet = c.take<float>(kC);
    dGl = c.take<float>(kC);
    dbl = c.take<float>(kC);
    rowc = c.take<float>(kC);
    colc = c.take<float>(kC);
    bytes = c.off;
  }
};

// One block per (sequence b, key head hk, chunk), looping over the r = Hv / Hk value heads of the key head in head
// order: K and KK = K K^T are the same for the whole group, so they are loaded / computed once. dk of the key head
// (the sum over the group of each value head's beta e^G .* dKb and dKK K + dKK^T K) is summed in registers,
// NKT = ceil(dk / 64) column tiles of Acc64, and added to grad_k once together with dKp (the dqk kernel's terms,
// already summed over the group): no read-modify-write of an fp32 partial in global memory and no separate
// reduction. Products go through register accumulators (Acc64).
// Buffer reuse: T holds T, then the fp32 product X = T^T (column tile of dVn or dW); A1 holds that tile of dVn / dW,
// then X in bf16; Tb holds T (bf16), then dKK. dM = -sum (dVb U^T + dKb W^T) stays in registers until the tiles are
// done, then goes to M.
template <int NKT>
__global__ void __launch_bounds__(kThreads, 2) wy_kernel(const Params p) {
  const int64_t bhk = blockIdx.x / p.NC;  // b * Hk + hk
  const int c = int(blockIdx.x % p.NC);
  const int64_t bh0 = (bhk / p.Hk) * p.Hv + (bhk % p.Hk) * p.r;  // the group's first value head
  const int dk = p.dk, dv = p.dv, ldk = dk + kPadH, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  WySmem sm(reinterpret_cast<uintptr_t>(dynamic_smem()), dk);
  float* X = sm.T;
  Acc64 dK[NKT];  // the key head's dk, 64-column tiles
#pragma unroll
  for (int kt = 0; kt < NKT; ++kt) acc64_zero(dK[kt]);
  {
    const Chunk ch = chunk_of(p, bh0, c);
    load_rows(sm.K, ldk, p.k + qk_off(p, ch.b, ch.t0, ch.hk), p.Hk * dk, ch.L, kC, dk);
    __syncthreads();
    Acc64 kk;  // KK = K K^T, as the prepare kernel forms it
    acc64_zero(kk);
    acc64_mma<RowMajor, ColMajor>(kk, kC, dk, sm.K, ldk, sm.K, ldk);
    acc64_store(kk, sm.KK, kLdF);
  }
  for (int rr = 0; rr < p.r; ++rr) {
    const Chunk ch = chunk_of(p, bh0 + rr, c);
    const int64_t row0 = ch.bh * p.S + ch.t0;
    __syncthreads();  // KK written; the previous head's gates and tiles are free
    load_gates(p, ch, sm.G, sm.eG, sm.dec, sm.bet);
    if (tid < kC) {
      sm.dGl[tid] = 0.0f;
      sm.dbl[tid] = 0.0f;
    }
    __syncthreads();
    // Recompute M and T exactly as the prepare kernel did.
    for (int e = tid; e < kC * kC; e += kThreads) {
      const int i = e / kC, j = e % kC;
      sm.M[i * kLdF + j] = j < i ? sm.bet[i] * sm.KK[i * kLdF + j] * expf(sm.G[i] - sm.G[j]) : 0.0f;
    }
    __syncthreads();
    invert_unit_lower(sm.T, kLdF, sm.M, kLdF, sm.Xs);
    for (int e = tid; e < kC * kC; e += kThreads)
      sm.Tb[(e / kC) * kLdH + e % kC] = to_bf16(sm.T[(e / kC) * kLdF + e % kC]);
    __syncthreads();
    Acc64 mdM;  // -dM
    acc64_zero(mdM);
    // X = T^T tile, in fp32 shared memory (columns past w come out zero).
    auto t_transpose_times = [&](const bf16* tile, int w) {
      Acc64 acc;
      acc64_zero(acc);
      acc64_mma<ColMajor, RowMajor>(acc, w, kC, sm.Tb, kLdH, tile, kLdH);
      acc64_store(acc, X, kLdF);
    };
    // dVb = T^T dVn per 64-column tile of dv: dv += beta .* dVb, dbeta += v . dVb, dM -= dVb U^T
    for (int v0 = 0; v0 < dv; v0 += kTile) {
      const int w = dv - v0 < kTile ? dv - v0 : kTile;
      load_rows(sm.A1, kLdH, p.dVn + row0 * dv + v0, dv, ch.L, kC, w);
      load_rows(sm.A2, kLdH, p.U + row0 * dv + v0, dv, ch.L, kC, w);
      load_rows(sm.A3, kLdH, p.v + v_off(p, ch.b, ch.t0, ch.hv) + v0, p.Hv * dv, ch.L, kC, w);
      __syncthreads();
      t_transpose_times(sm.A1, w);
      __syncthreads();
      for (int i = warp; i < kC; i += kWarps) {
        const float s = row_dot(sm.A3 + i * kLdH, X + i * kLdF, w);
        if (lane == 0) sm.dbl[i] += s;
      }
      for (int e = tid; e < kC * w; e += kThreads) {
        const int i = e / w, j = e % w;
        if (p.grad_v && i < ch.L)
          add_to(p.grad_v + v_off(p, ch.b, ch.t0 + i, ch.hv) + v0 + j, sm.bet[i] * X[i * kLdF + j]);
        sm.A1[i * kLdH + j] = to_bf16(X[i * kLdF + j]);
      }
      __syncthreads();
      acc64_mma<RowMajor, ColMajor>(mdM, kC, w, sm.A1, kLdH, sm.A2, kLdH);
      __syncthreads();
    }
    // dKb = T^T dW per 64-column tile of dk: dK += beta e^G .* dKb, dbeta and dG += (beta) e^G k . dKb,
    // dM -= dKb W^T
#pragma unroll
    for (int kt = 0; kt < NKT; ++kt) {
      const int k0 = kt * kTile, w = dk - k0 < kTile ? dk - k0 : kTile;
      load_rows(sm.A1, kLdH, p.dW + row0 * dk + k0, dk, ch.L, kC, w);
      load_rows(sm.A2, kLdH, p.W + row0 * dk + k0, dk, ch.L, kC, w);
      __syncthreads();
      t_transpose_times(sm.A1, w);
      __syncthreads();
      for (int i = warp; i < kC; i += kWarps) {
        const float s = sm.eG[i] * row_dot(sm.K + i * ldk + k0, X + i * kLdF, w);
        if (lane == 0) {
          sm.dbl[i] += s;
          sm.dGl[i] += sm.bet[i] * s;
        }
      }
      __syncthreads();  // X is rewritten below
      for (int e = tid; e < kC * kC; e += kThreads) {
        const int i = e / kC, j = e % kC;
        const float xv = X[i * kLdF + j];
        sm.A1[i * kLdH + j] = to_bf16(xv);
        X[i * kLdF + j] = (i < ch.L && j < w) ? sm.bet[i] * sm.eG[i] * xv : 0.0f;
      }
      __syncthreads();
      {
        Acc64 t;
        acc64_load(t, X, kLdF);
        acc64_add(dK[kt], t);
      }
      acc64_mma<RowMajor, ColMajor>(mdM, kC, w, sm.A1, kLdH, sm.A2, kLdH);
      __syncthreads();
    }
    acc64_store(mdM, sm.M, kLdF);
    __syncthreads();
    // Through M_ij = beta_i KK_ij decay_ij (j < i): dG_i += sum_j dM_ij M_ij, dG_j -= the same; dbeta;
    // dKK = dM .* beta_i decay_ij (into Tb).
    auto dM = [&](int i, int j) { return -sm.M[i * kLdF + j]; };
    if (tid < kC) {
      const int i = tid;
      float rs = 0.0f, db = 0.0f;
      for (int j = 0; j < i; ++j) {
        const float kd = sm.KK[i * kLdF + j] * expf(sm.G[i] - sm.G[j]);
        rs += dM(i, j) * sm.bet[i] * kd;
        db += dM(i, j) * kd;
      }
      sm.rowc[i] = rs;
      sm.dbl[i] += db;
    } else if (tid < 2 * kC) {
      const int j = tid - kC;
      float cs = 0.0f;
      for (int i = j + 1; i < kC; ++i) cs += dM(i, j) * sm.bet[i] * sm.KK[i * kLdF + j] * expf(sm.G[i] - sm.G[j]);
      sm.colc[j] = cs;
    }
    for (int e = tid; e < kC * kC; e += kThreads) {
      const int i = e / kC, j = e % kC;
      sm.Tb[i * kLdH + j] = to_bf16(j < i ? dM(i, j) * sm.bet[i] * expf(sm.G[i] - sm.G[j]) : 0.0f);
    }
    __syncthreads();
    // dK += dKK K + dKK^T K, straight into the register tiles
#pragma unroll
    for (int kt = 0; kt < NKT; ++kt) {
      const int k0 = kt * kTile, w = dk - k0 < kTile ? dk - k0 : kTile;
      acc64_mma<RowMajor, RowMajor>(dK[kt], w, kC, sm.Tb, kLdH, sm.K + k0, ldk);
      acc64_mma<ColMajor, RowMajor>(dK[kt], w, kC, sm.Tb, kLdH, sm.K + k0, ldk);
    }
    // dG of the chunk = this kernel's share + the dqk partial; dg = reverse cumsum within the
    // chunk, as a prefix sum over reversed rows: thread t < 64 holds row i = 63 - t (zero past L).
    float dGi = 0.0f;
    if (tid < kC) {
      const int i = kC - 1 - tid;
      if (i < ch.L) {
        dGi = sm.dGl[i] + sm.rowc[i] - sm.colc[i];
        dGi += p.dGp[ch.bh * p.S + ch.t0 + i];
        if (p.grad_beta) add_to(p.grad_beta + gb_off(p, ch.b, ch.t0 + i, ch.hv), sm.dbl[i]);
      }
    }
    dGi = scan64_sum(dGi, sm.Xs);
    if (tid < kC && p.grad_g) {
      const int i = kC - 1 - tid;
      if (i < ch.L) add_to(p.grad_g + gb_off(p, ch.b, ch.t0 + i, ch.hv), dGi);
    }
  }
  if (p.grad_k) {
    const Chunk ch = chunk_of(p, bh0, c);
    bf16* dk_out = p.grad_k + qk_off(p, ch.b, ch.t0, ch.hk);
    const float* dKp = p.dKp + (bhk * p.S + ch.t0) * dk;  // the dqk kernel's terms, summed over the group
    const int64_t ldq = p.Hk * dk;
#pragma unroll
    for (int kt = 0; kt < NKT; ++kt) {
      const int k0 = kt * kTile, w = dk - k0 < kTile ? dk - k0 : kTile;
      __syncthreads();  // X is free
      acc64_store(dK[kt], X, kLdF);
      __syncthreads();
      for (int e = tid; e < kC * w; e += kThreads) {
        const int i = e / w, j = e % w;
        if (i < ch.L) add_to(dk_out + i * ldq + k0 + j, X[i * kLdF + j] + dKp[int64_t(i) * dk + k0 + j]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) add_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    y[i] += x[i];
}

// dqk and wy with their dk register tiles sized at compile time (NKT = ceil(dk / 64) in 1..4); one block per
// (sequence, key head, chunk) each.
template <int NKT>
void launch_dqk_wy_tiles(const Params& p, cudaStream_t stream) {
  const unsigned grid = unsigned(p.B * p.Hk * p.NC);
  {
    const size_t bytes = DqkSmem(0, p.dk, p.dv).bytes;
    allow_smem(reinterpret_cast<const void*>(&dqk_kernel<NKT>), bytes, "gated_delta_rule_backward (dqk)");
    dqk_kernel<NKT><<<grid, kThreads, bytes, stream>>>(p);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  const size_t bytes = WySmem(0, p.dk).bytes;
  allow_smem(reinterpret_cast<const void*>(&wy_kernel<NKT>), bytes, "gated_delta_rule_backward (wy)");
  wy_kernel<NKT><<<grid, kThreads, bytes, stream>>>(p);
  NEXTRON_CUDA_LAUNCH_CHECK();
}
void launch_dqk_wy(const Params& p, cudaStream_t stream) {
  static_assert(kMaxDim <= 4 * kTile, "dqk_kernel / wy_kernel instantiations cover dk <= 256");
  switch (p.NK) {
    case 1:
      return launch_dqk_wy_tiles<1>(p, stream);
    case 2:
      return launch_dqk_wy_tiles<2>(p, stream);
    case 3:
      return launch_dqk_wy_tiles<3>(p, stream);
    default:
      return launch_dqk_wy_tiles<4>(p, stream);
  }
}

unsigned elementwise_grid(int64_t n) { return unsigned(std::min<int64_t>(ceil_div(n, kThreads), 65536)); }

}  // namespace

// HBM traffic of the backward's own kernels (after prepare and state forward, accounted in
// gated_delta_rule_fwd.cu), as the code reads and writes (gated_delta_rule.h). N = BH * S, Nk = B * S * Hk,
// states = BH * NC * dk * dv, state = BH * dk * dv; nvs = dv / state_backward_tile. Block loads (every block's, L2
// hits or not):
//   kernel      reads                                                           writes
//   dvlocal     q, k 2 Nk dk each (once per key head), Gc 4N, dO 2N dv            dVl 2N dv
//   state back  (k + q + W 2N dk each + Gc 4N) nvs, dVl 2N dv, dO 2N dv,        dH 2 states, dVn 2N dv,
//               dht 4 state, d_initial_state 4 state                            d_initial_state 4 state
//   dqk         q, k 2 Nk dk each (once per key head), Gc 4N, dO, Vn, dVn       dKp 4 Nk dk, dW 2N dk, dGp 4N,
//               2N dv each, H, dH 2 states each, dq 2 Nk dk                      dq 2 Nk dk
//   wy          k 2 Nk dk (once per key head), Gc 4N, beta 4N, dVn, U, v 2N dv   dv 2N dv, dbeta 4N, dg 4N,
//               each, dv 2N dv, dW, W 2N dk each, dKp 4 Nk dk, dGp 4N,           dk 2 Nk dk
//               dbeta 4N, dg 4N, dk 2 Nk dk
// Distinct bytes: the same with every tensor counted once per kernel; only the state backward differs (no nvs
// factor, q and k Nk rows).
// (Before the traffic work dqk and wy ran per value head, with dq and dk summed over the head group by a separate
// reduce kernel from fp32 partials, and wy added its two dk terms to dKp by read-modify-writes: 80.64 units of the
// (B, S, Hv, dv) bf16 tensor at the issue's shape, against 67.14 after it; docs/cuda.md.)
void backward_traffic(const Params& p, std::vector<GdrKernelTraffic>& rows) {
  const size_t N = size_t(p.BH) * size_t(p.S), Nk = size_t(p.B) * size_t(p.S) * size_t(p.Hk);
  const size_t dk = size_t(p.dk), dv = size_t(p.dv);
  const size_t states = size_t(p.BH) * size_t(p.NC) * dk * dv, state = size_t(p.BH) * dk * dv;
  const size_t nvs = size_t(p.dv / state_backward_tile(p.dk, p.dv));
  const size_t qk = 2 * Nk * dk;  // q or k, once
  // dvlocal
  rows.push_back({"dvlocal", qk + qk + 4 * N + 2 * N * dv, 2 * N * dv, qk + qk + 4 * N + 2 * N * dv, 2 * N * dv});
  // state backward
  {
    const size_t once = 2 * N * dv + 2 * N * dv + 8 * state, w = 2 * states + 2 * N * dv + 4 * state;
    rows.push_back(
        {"state backward", (3 * 2 * N * dk + 4 * N) * nvs + once, w, qk + qk + 2 * N * dk + 4 * N + once, w});
  }
  // dqk
  {
    const size_t r = qk + qk + 4 * N + 3 * 2 * N * dv + 2 * 2 * states + qk;
    const size_t w = 4 * Nk * dk + 2 * N * dk + 4 * N + qk;
    rows.push_back({"dqk", r, w, r, w});
  }
  // wy
  {
    const size_t r = qk + 8 * N + 3 * 2 * N * dv + 2 * N * dv + 2 * 2 * N * dk + 4 * Nk * dk + 4 * N + 8 * N + qk;
    const size_t w = 2 * N * dv + 8 * N + qk;
    rows.push_back({"wy", r, w, r, w});
  }
}

}  // namespace gdr

std::vector<GdrKernelTraffic> gated_delta_rule_backward_hbm_account(const GdrShape& s, bool saved) {
  gdr::Params p{};
  gdr::set_shape(p, s, 1.0f, "gated_delta_rule_backward_hbm_account");
  std::vector<GdrKernelTraffic> rows;
  if (s.B == 0 || s.S == 0) return rows;
  if (!saved) gdr::forward_traffic(p, false, false, rows);  // the recomputed prepare and state pass
  gdr::backward_traffic(p, rows);
  return rows;
}

void gdr::backward_aligned(bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* d_initial_state,
                           const bf16* d_o, const float* d_final_state, const bf16* q, const bf16* k, const bf16* v,
                           const float* g, const float* beta, const float* initial_state, const GdrShape& s,
                           float scale, const void* saved, void* workspace, cudaStream_t stream) {
  using namespace gdr;
  Params p{};
  set_shape(p, s, scale, "gated_delta_rule_backward");
  if (s.B == 0) return;
  if (s.S == 0) {  // no tokens: the initial state is the final state
    const int64_t n = s.B * s.Hv * s.dk * s.dv;
    if (d_initial_state && d_final_state) {
      add_kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(d_initial_state, d_final_state, n);
      NEXTRON_CUDA_LAUNCH_CHECK();
    }
    return;
  }
  NEXTRON_CHECK(workspace != nullptr,
                "gated_delta_rule_backward: workspace is null (size it with "
                "gated_delta_rule_workspace_bytes)");
  NEXTRON_CHECK(d_o != nullptr, "gated_delta_rule_backward: d_o is required");
  carve_workspace(p, workspace, saved == nullptr);
  // The kernels only read the intermediates (and the caller may run this backward twice on them: context parallelism).
  if (saved) carve_intermediates(p, const_cast<void*>(saved));
  p.q = q;
  p.k = k;
  p.v = v;
  p.g = g;
  p.beta = beta;
  p.h0 = initial_state;
  p.d_o = d_o;
  p.dht = d_final_state;
  p.grad_q = dq;
  p.grad_k = dk;
  p.grad_v = dv;
  p.grad_g = dg;
  p.grad_beta = dbeta;
  p.grad_h0 = d_initial_state;
  // Forward intermediates: Gc, W, U (prepare), h_c and Vn (state forward), unless the forward kept them.
  if (!saved) {
    launch_prepare(p, stream);
    launch_state_forward(p, stream);
  }
  {
    const size_t bytes = DvLocalSmem(0, p.dk).bytes;
    allow_smem(reinterpret_cast<const void*>(&dvlocal_kernel), bytes, "gated_delta_rule_backward (dvlocal)");
    dvlocal_kernel<<<unsigned(p.B * p.Hk * p.NC), kThreads, bytes, stream>>>(p);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  {
    const int bv = state_backward_tile(p.dk, p.dv, device_smem_limit());
    const size_t bytes = StateBackSmem(0, p.dk, bv).bytes;
    allow_smem(reinterpret_cast<const void*>(&state_backward_kernel), bytes, "gated_delta_rule_backward (state)");
    state_backward_kernel<<<unsigned(p.BH * (p.dv / bv)), kThreads, bytes, stream>>>(p, bv);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
  launch_dqk_wy(p, stream);
}

}  // namespace nextron::cuda
