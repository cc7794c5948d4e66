// Gated delta rule: per-token recurrence (reference) and chunked form (production), forward and backward.
//
// Chunked forward. Split each head's sequence into chunks of C tokens (the last one may be shorter: it is simply a
// chunk of L < C tokens, which is exactly what HF's zero padding computes). Inside a chunk with entering state S,
// keys K (L x dk), scaled queries Qs = scale Q, values V, decays g and rates beta:
//   G = cumsum(g),  Gam_ij = exp(G_i - G_j) for i >= j (else 0), formed as exp of a running sum of g_{j+1..i} <= 0;
//   M = strictly_lower(diag(beta) K K^T .* Gam),  T = (I + M)^-1 (forward substitution, unit lower triangular);
//   U = T diag(beta) V,  W = T diag(beta exp(G)) K;
//   Vn = U - W S                                 (the delta-rule "new values" u_t of every token of the chunk)
//   O  = (Qs .* exp(G)) S + ((Qs K^T) .* Gam) Vn  (the causal mask keeps the diagonal)
//   S' = exp(G_L) S + (K .* exp(G_L - G))^T Vn   (G_L: the last entry of G)
// This follows from unrolling the recurrence inside the chunk: the decayed state token i reads is
// exp(G_i) S + sum_{j<i} Gam_ij k_j u_j^T, so the rows u_i of Vn satisfy
// (I + M) Vn = diag(beta) V - diag(beta exp(G)) K S, i.e. Vn = U - W S; o_i and S' are the same sums with the
// diagonal term included (the state after token i's update).
//
// Chunked backward. The state entering every chunk (nchunks x dk x dv per head) comes from the forward (chunk_states)
// or from a forward sweep; a reverse sweep recomputes each chunk's intermediates and propagates dS (the gradient of the
// state leaving the chunk):
//   dVn = Kd dS' + P^T dO,  dS = exp(G_L) dS' + Qe^T dO - W^T dVn   (Kd = K .* exp(G_L - G), Qe = Qs .* exp(G),
//                                                                     P = (Qs K^T) .* Gam)
//   dU = dVn, dW = -dVn S^T;  dVb = T^T dU, dKb = T^T dW             (Vb = diag(beta) V, Kb = diag(beta e^G) K)
//   through T = (I + M)^-1 (dM = -T^T dT T^T with dT = dU Vb^T + dW Kb^T):  dM = -(dVb U^T + dKb W^T), strictly lower;
//   M_ij = beta_i (k_i.k_j) Gam_ij gives dbeta_i, dK += (dKK + dKK^T) K with dKK = dM .* beta_i Gam_ij.
// Every decay factor is exp of a difference of G, so its G-gradient is (factor * its cotangent) added to the later
// index and subtracted from the earlier one (exp(G_i) only to i). Gradients with respect to G become gradients with
// respect to g by a reverse cumulative sum over the chunk.
//
// Threads: forwards run one task per (b, value head). Backwards run one task per (b, key head) that processes the
// Hv/Hk value heads sharing that key head one after another, so dq/dk accumulate race-free and deterministically.
// OpenBLAS is the OpenMP build, so the gemms inside these tasks run single-threaded.
#include "kernels/cpu/gated_delta_rule.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/blas.h"

namespace nextron::cpu {

namespace {

void check_shape(const GdrShape& s, const char* what) {
  NEXTRON_CHECK(s.B >= 0 && s.S >= 0 && s.Hk > 0 && s.Hv > 0 && s.dk > 0 && s.dv > 0, what, ": bad shape B=", s.B,
                " S=", s.S, " Hk=", s.Hk, " Hv=", s.Hv, " dk=", s.dk, " dv=", s.dv);
  NEXTRON_CHECK(s.Hv % s.Hk == 0, what, ": value heads Hv=", s.Hv, " must be a multiple of key heads Hk=", s.Hk);
}

// One (b, value head): pointers at token 0 and the row strides between consecutive tokens.
template <typename T>
struct Head {
  const T* q;
  const T* k;
  const T* v;
  const T* g;
  const T* beta;
  int64_t ldk;                              // Hk * dk, for q and k
  int64_t ldv;                              // Hv * dv, for v, o, d_o
  int64_t ldg;                              // Hv, for g and beta
  int64_t qk_off, v_off, g_off, state_off;  // element offsets of token 0 / the state in the full arrays
};

template <typename T>
Head<T> make_head(const T* q, const T* k, const T* v, const T* g, const T* beta, const GdrShape& s, int64_t b,
                  int64_t hv) {
  const int64_t hk = hv / (s.Hv / s.Hk);
  Head<T> h;
  h.qk_off = (b * s.S * s.Hk + hk) * s.dk;
  h.v_off = (b * s.S * s.Hv + hv) * s.dv;
  h.g_off = b * s.S * s.Hv + hv;
  h.state_off = (b * s.Hv + hv) * s.dk * s.dv;
  auto at = [](const T* p, int64_t off) { return p ? p + off : p; };  // inputs may be nullptr when S == 0
  h.q = at(q, h.qk_off);
  h.k = at(k, h.qk_off);
  h.v = at(v, h.v_off);
  h.g = at(g, h.g_off);
  h.beta = at(beta, h.g_off);
  h.ldk = s.Hk * s.dk;
  h.ldv = s.Hv * s.dv;
  h.ldg = s.Hv;
  return h;
}

template <typename T>
void load_state(T* St, const T* init, int64_t n) {
  if (init)
    std::copy(init, init + n, St);
  else
    std::fill(St, St + n, T(0));
}

// ---------------------------------------------------------------------------------------------------------------
// Recurrent form.

// St <- exp(g) St; p = St^T k; u = beta (v - p); St += k u^T.
template <typename T>
void recurrent_step(T* St, T* p, T* u, const T* k, const T* v, T g, T beta, int64_t dk, int64_t dv) {
  const T a = std::exp(g);
  for (int64_t i = 0; i < dk * dv; ++i) St[i] *= a;
  std::fill(p, p + dv, T(0));
  for (int64_t i = 0; i < dk; ++i) {
    const T ki = k[i];
    const T* row = St + i * dv;
    for (int64_t j = 0; j < dv; ++j) p[j] += ki * row[j];
  }
  for (int64_t j = 0; j < dv; ++j) u[j] = beta * (v[j] - p[j]);
  for (int64_t i = 0; i < dk; ++i) {
    const T ki = k[i];
    T* row = St + i * dv;
    for (int64_t j = 0; j < dv; ++j) row[j] += ki * u[j];
  }
}

// o = scale St^T q.
template <typename T>
void recurrent_output(T* o, const T* St, const T* q, T scale, int64_t dk, int64_t dv) {
  std::fill(o, o + dv, T(0));
  for (int64_t i = 0; i < dk; ++i) {
    const T qi = scale * q[i];
    const T* row = St + i * dv;
    for (int64_t j = 0; j < dv; ++j) o[j] += qi * row[j];
  }
}

constexpr int64_t kRecurrentSegment = 64;  // backward checkpoint spacing (tokens)

}  // namespace

template <typename T>
void gated_delta_rule_recurrent_forward(T* o, T* final_state, const T* q, const T* k, const T* v, const T* g,
                                        const T* beta, const T* initial_state, const GdrShape& s, T scale) {
  check_shape(s, "gated_delta_rule_recurrent_forward");
  const int64_t dk = s.dk, dv = s.dv, BH = s.B * s.Hv;
#pragma omp parallel
  {
    std::vector<T> St(dk * dv), p(dv), u(dv);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
      const Head<T> h = make_head(q, k, v, g, beta, s, bh / s.Hv, bh % s.Hv);
      load_state(St.data(), initial_state ? initial_state + h.state_off : nullptr, dk * dv);
      for (int64_t t = 0; t < s.S; ++t) {
        recurrent_step(St.data(), p.data(), u.data(), h.k + t * h.ldk, h.v + t * h.ldv, h.g[t * h.ldg],
                       h.beta[t * h.ldg], dk, dv);
        recurrent_output(o + h.v_off + t * h.ldv, St.data(), h.q + t * h.ldk, scale, dk, dv);
      }
      if (final_state) std::copy(St.begin(), St.end(), final_state + h.state_off);
    }
  }
}

template <typename T>
void gated_delta_rule_recurrent_backward(T* dq, T* dk, T* dv, T* dg, T* dbeta, T* d_initial_state, const T* d_o,
                                         const T* d_final_state, const T* q, const T* k, const T* v, const T* g,
                                         const T* beta, const T* initial_state, const GdrShape& s, T scale) {
  check_shape(s, "gated_delta_rule_recurrent_backward");
  const int64_t Dk = s.dk, Dv = s.dv, r = s.Hv / s.Hk, BHk = s.B * s.Hk, n = Dk * Dv;
  const int64_t nseg = (s.S + kRecurrentSegment - 1) / kRecurrentSegment;
#pragma omp parallel
  {
    // ckpt: the state entering each segment; states: S_{t0-1}..S_{t0+len-1} of the segment being differentiated.
    std::vector<T> ckpt(nseg * n), states((kRecurrentSegment + 1) * n), Sa(n), dS(n), p(Dv), u(Dv), du(Dv);
    std::vector<T> dkt(Dk);
#pragma omp for schedule(static)
    for (int64_t bhk = 0; bhk < BHk; ++bhk) {
      const int64_t b = bhk / s.Hk, hk = bhk % s.Hk;
      for (int64_t rr = 0; rr < r; ++rr) {
        const Head<T> h = make_head(q, k, v, g, beta, s, b, hk * r + rr);
        load_state(states.data(), initial_state ? initial_state + h.state_off : nullptr, n);
        for (int64_t seg = 0; seg < nseg; ++seg) {
          std::copy(states.begin(), states.begin() + n, ckpt.begin() + seg * n);
          const int64_t t1 = std::min(s.S, (seg + 1) * kRecurrentSegment);
          for (int64_t t = seg * kRecurrentSegment; t < t1; ++t)
            recurrent_step(states.data(), p.data(), u.data(), h.k + t * h.ldk, h.v + t * h.ldv, h.g[t * h.ldg],
                           h.beta[t * h.ldg], Dk, Dv);
        }
        load_state(dS.data(), d_final_state ? d_final_state + h.state_off : nullptr, n);
        for (int64_t seg = nseg - 1; seg >= 0; --seg) {
          const int64_t t0 = seg * kRecurrentSegment, len = std::min(s.S, t0 + kRecurrentSegment) - t0;
          std::copy(ckpt.begin() + seg * n, ckpt.begin() + (seg + 1) * n, states.begin());
          for (int64_t i = 0; i < len; ++i) {
            const int64_t t = t0 + i;
            std::copy(states.begin() + i * n, states.begin() + (i + 1) * n, states.begin() + (i + 1) * n);
            recurrent_step(states.data() + (i + 1) * n, p.data(), u.data(), h.k + t * h.ldk, h.v + t * h.ldv,
                           h.g[t * h.ldg], h.beta[t * h.ldg], Dk, Dv);
          }
          for (int64_t i = len - 1; i >= 0; --i) {
            const int64_t t = t0 + i;
            const T* Sprev = states.data() + i * n;
            const T* Scur = states.data() + (i + 1) * n;
            const T* qt = h.q + t * h.ldk;
            const T* kt = h.k + t * h.ldk;
            const T* vt = h.v + t * h.ldv;
            const T* dOt = d_o + h.v_off + t * h.ldv;
            const T bt = h.beta[t * h.ldg], a = std::exp(h.g[t * h.ldg]);
            // o_t = Scur^T (scale q_t)
            if (dq) {
              T* dqt = dq + h.qk_off + t * h.ldk;
              for (int64_t x = 0; x < Dk; ++x) {
                T acc = 0;
                for (int64_t y = 0; y < Dv; ++y) acc += Scur[x * Dv + y] * dOt[y];
                dqt[x] += scale * acc;
              }
            }
            for (int64_t x = 0; x < Dk; ++x)
              for (int64_t y = 0; y < Dv; ++y) dS[x * Dv + y] += scale * qt[x] * dOt[y];
            // Recompute the step: Sa = a Sprev, p = Sa^T k, u = beta (v - p).
            for (int64_t e = 0; e < n; ++e) Sa[e] = a * Sprev[e];
            std::fill(p.begin(), p.end(), T(0));
            for (int64_t x = 0; x < Dk; ++x)
              for (int64_t y = 0; y < Dv; ++y) p[y] += kt[x] * Sa[x * Dv + y];
            for (int64_t y = 0; y < Dv; ++y) u[y] = bt * (vt[y] - p[y]);
            // Scur = Sa + k u^T
            std::fill(du.begin(), du.end(), T(0));
            for (int64_t x = 0; x < Dk; ++x) {
              T acc = 0;
              for (int64_t y = 0; y < Dv; ++y) {
                acc += dS[x * Dv + y] * u[y];
                du[y] += dS[x * Dv + y] * kt[x];
              }
              dkt[x] = acc;
            }
            // u = beta (v - p), p = Sa^T k
            T dbt = 0;
            for (int64_t y = 0; y < Dv; ++y) dbt += du[y] * (vt[y] - p[y]);
            if (dbeta) dbeta[h.g_off + t * h.ldg] += dbt;
            if (dv) {
              T* dvt = dv + h.v_off + t * h.ldv;
              for (int64_t y = 0; y < Dv; ++y) dvt[y] += bt * du[y];
            }
            for (int64_t y = 0; y < Dv; ++y) du[y] *= -bt;  // now dp
            T dgt = 0;
            for (int64_t x = 0; x < Dk; ++x) {
              T acc = 0;
              for (int64_t y = 0; y < Dv; ++y) {
                T& d = dS[x * Dv + y];
                d += kt[x] * du[y];  // dSa
                acc += Sa[x * Dv + y] * du[y];
                dgt += Sa[x * Dv + y] * d;
                d *= a;  // dS_{t-1}
              }
              dkt[x] += acc;
            }
            if (dg) dg[h.g_off + t * h.ldg] += dgt;
            if (dk) {
              T* dkp = dk + h.qk_off + t * h.ldk;
              for (int64_t x = 0; x < Dk; ++x) dkp[x] += dkt[x];
            }
          }
        }
        if (d_initial_state)
          for (int64_t e = 0; e < n; ++e) d_initial_state[h.state_off + e] += dS[e];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Chunked form.

namespace {

// Per-thread scratch for one chunk of up to C tokens (matrices are packed with the chunk's actual length L).
template <typename T>
struct ChunkWork {
  int64_t C, dk, dv;
  std::vector<T> G, eG, dec;         // (L): cumsum of g, exp(G), exp(G_L - G)
  std::vector<T> Gam, KK, M, Tm, P;  // (L, L)
  std::vector<T> Vb, U, Vn;          // (L, dv)
  std::vector<T> Kb, W, Kd, Qe;      // (L, dk)
  // backward only
  std::vector<T> dG, db;              // (L)
  std::vector<T> dLL;                 // (L, L)
  std::vector<T> dVn, dVb;            // (L, dv)
  std::vector<T> tLk, dKb, dQc, dKc;  // (L, dk)

  ChunkWork(int64_t C_, int64_t dk_, int64_t dv_, bool backward) : C(C_), dk(dk_), dv(dv_) {
    G.resize(C);
    eG.resize(C);
    dec.resize(C);
    for (auto* m : {&Gam, &KK, &M, &Tm, &P}) m->resize(C * C);
    for (auto* m : {&Vb, &U, &Vn}) m->resize(C * dv);
    for (auto* m : {&Kb, &W, &Kd, &Qe}) m->resize(C * dk);
    if (backward) {
      dG.resize(C);
      db.resize(C);
      dLL.resize(C * C);
      dVn.resize(C * dv);
      dVb.resize(C * dv);
      for (auto* m : {&tLk, &dKb, &dQc, &dKc}) m->resize(C * dk);
    }
  }
};

// The state-independent part of chunk [t0, t0 + L): decays, Gam, KK, M, T, Vb, Kb, U, W, Kd.
template <typename T>
void chunk_prepare(ChunkWork<T>& w, const Head<T>& h, int64_t t0, int64_t L) {
  const int64_t dk = w.dk, dv = w.dv;
  const T* g = h.g + t0 * h.ldg;
  const T* bt = h.beta + t0 * h.ldg;
  const T* K = h.k + t0 * h.ldk;
  const T* V = h.v + t0 * h.ldv;
  T acc = 0;
  for (int64_t i = 0; i < L; ++i) {
    acc += g[i * h.ldg];
    w.G[i] = acc;
    w.eG[i] = std::exp(acc);
  }
  acc = 0;
  for (int64_t i = L - 1; i >= 0; --i) {
    w.dec[i] = std::exp(acc);  // exp(G_L - G_i) = exp(g_{i+1} + ... + g_{L-1})
    acc += g[i * h.ldg];
  }
  // Gam_ij = exp(g_{j+1} + ... + g_i) for i >= j: a running sum of non-positive terms, accurate in fp32.
  for (int64_t i = 0; i < L; ++i) {
    T* row = w.Gam.data() + i * L;
    row[i] = 1;
    acc = 0;
    for (int64_t j = i - 1; j >= 0; --j) {
      acc += g[(j + 1) * h.ldg];
      row[j] = std::exp(acc);
    }
    std::fill(row + i + 1, row + L, T(0));
  }
  gemm<T>(false, true, L, L, dk, T(1), K, K, T(0), w.KK.data(), h.ldk, h.ldk, L);
  for (int64_t i = 0; i < L; ++i) {
    const T b = bt[i * h.ldg];
    for (int64_t j = 0; j < L; ++j) w.M[i * L + j] = j < i ? b * w.KK[i * L + j] * w.Gam[i * L + j] : T(0);
  }
  // T = (I + M)^-1 by forward substitution: row_i(T) = e_i - sum_{j<i} M_ij row_j(T) (row j is zero past column j).
  for (int64_t i = 0; i < L; ++i) {
    T* ti = w.Tm.data() + i * L;
    std::fill(ti, ti + L, T(0));
    ti[i] = 1;
    for (int64_t j = 0; j < i; ++j) {
      const T m = w.M[i * L + j];
      const T* tj = w.Tm.data() + j * L;
      for (int64_t c = 0; c <= j; ++c) ti[c] -= m * tj[c];
    }
  }
  for (int64_t i = 0; i < L; ++i) {
    const T b = bt[i * h.ldg], be = b * w.eG[i], de = w.dec[i];
    const T* vi = V + i * h.ldv;
    const T* ki = K + i * h.ldk;
    for (int64_t y = 0; y < dv; ++y) w.Vb[i * dv + y] = b * vi[y];
    for (int64_t x = 0; x < dk; ++x) {
      w.Kb[i * dk + x] = be * ki[x];
      w.Kd[i * dk + x] = de * ki[x];
    }
  }
  gemm<T>(false, false, L, dv, L, T(1), w.Tm.data(), w.Vb.data(), T(0), w.U.data());
  gemm<T>(false, false, L, dk, L, T(1), w.Tm.data(), w.Kb.data(), T(0), w.W.data());
}

// The output-side intermediates: P = (scale Q K^T) .* Gam and Qe = scale exp(G) Q.
template <typename T>
void chunk_prepare_output(ChunkWork<T>& w, const Head<T>& h, int64_t t0, int64_t L, T scale) {
  const T* Q = h.q + t0 * h.ldk;
  const T* K = h.k + t0 * h.ldk;
  gemm<T>(false, true, L, L, w.dk, scale, Q, K, T(0), w.P.data(), h.ldk, h.ldk, L);
  for (int64_t e = 0; e < L * L; ++e) w.P[e] *= w.Gam[e];
  for (int64_t i = 0; i < L; ++i) {
    const T f = scale * w.eG[i];
    for (int64_t x = 0; x < w.dk; ++x) w.Qe[i * w.dk + x] = f * Q[i * h.ldk + x];
  }
}

// Vn = U - W S.
template <typename T>
void chunk_new_values(ChunkWork<T>& w, const T* S, int64_t L) {
  std::copy(w.U.begin(), w.U.begin() + L * w.dv, w.Vn.begin());
  gemm<T>(false, false, L, w.dv, w.dk, T(-1), w.W.data(), S, T(1), w.Vn.data());
}

// S <- exp(G_L) S + Kd^T Vn.
template <typename T>
void chunk_advance_state(ChunkWork<T>& w, T* S, int64_t L) {
  const T a = w.eG[L - 1];
  for (int64_t e = 0; e < w.dk * w.dv; ++e) S[e] *= a;
  gemm<T>(true, false, w.dk, w.dv, L, T(1), w.Kd.data(), w.Vn.data(), T(1), S);
}

template <typename T>
T dot_n(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Backward through chunk [t0, t0 + L) with entering state S. On entry dS is the gradient of the state leaving the
// chunk; on exit, of the state entering it. Accumulates into the global gradients (each may be nullptr).
template <typename T>
void chunk_backward(ChunkWork<T>& w, T* dS, T* dq, T* dk, T* dv, T* dg, T* dbeta, const T* d_o, const T* S,
                    const Head<T>& h, int64_t t0, int64_t L, T scale) {
  const int64_t Dk = w.dk, Dv = w.dv;
  const T* Q = h.q + t0 * h.ldk;
  const T* K = h.k + t0 * h.ldk;
  const T* V = h.v + t0 * h.ldv;
  const T* bt = h.beta + t0 * h.ldg;
  const T* dO = d_o + h.v_off + t0 * h.ldv;
  chunk_prepare(w, h, t0, L);
  chunk_prepare_output(w, h, t0, L, scale);
  chunk_new_values(w, S, L);
  T* dG = w.dG.data();
  T* dQc = w.dQc.data();
  T* dKc = w.dKc.data();
  std::fill(dG, dG + L, T(0));
  std::fill(w.db.begin(), w.db.begin() + L, T(0));
  std::fill(dQc, dQc + L * Dk, T(0));
  std::fill(dKc, dKc + L * Dk, T(0));
  const T eGL = w.eG[L - 1];

  // S' = exp(G_L) S + Kd^T Vn
  gemm<T>(false, false, L, Dv, Dk, T(1), w.Kd.data(), dS, T(0), w.dVn.data());
  dG[L - 1] += eGL * dot_n(S, dS, Dk * Dv);
  gemm<T>(false, true, L, Dk, Dv, T(1), w.Vn.data(), dS, T(0), w.tLk.data());  // dKd
  for (int64_t i = 0; i < L; ++i) {
    const T* dKd = w.tLk.data() + i * Dk;
    const T c = w.dec[i] * dot_n(K + i * h.ldk, dKd, Dk);
    dG[L - 1] += c;
    dG[i] -= c;
    for (int64_t x = 0; x < Dk; ++x) dKc[i * Dk + x] += w.dec[i] * dKd[x];
  }
  for (int64_t e = 0; e < Dk * Dv; ++e) dS[e] *= eGL;

  // O = Qe S + P Vn
  gemm<T>(false, true, L, Dk, Dv, T(1), dO, S, T(0), w.tLk.data(), h.ldv, Dv, Dk);  // dQe
  for (int64_t i = 0; i < L; ++i) {
    const T* dQe = w.tLk.data() + i * Dk;
    dG[i] += dot_n(w.Qe.data() + i * Dk, dQe, Dk);
    const T f = scale * w.eG[i];
    for (int64_t x = 0; x < Dk; ++x) dQc[i * Dk + x] += f * dQe[x];
  }
  gemm<T>(true, false, Dk, Dv, L, T(1), w.Qe.data(), dO, T(1), dS, Dk, h.ldv, Dv);
  gemm<T>(false, true, L, L, Dv, T(1), dO, w.Vn.data(), T(0), w.dLL.data(), h.ldv, Dv, L);  // dP
  for (int64_t i = 0; i < L; ++i) {
    T* row = w.dLL.data() + i * L;
    for (int64_t j = 0; j < i; ++j) {
      const T c = row[j] * w.P[i * L + j];
      dG[i] += c;
      dG[j] -= c;
      row[j] *= scale * w.Gam[i * L + j];  // gradient of the raw Q K^T entry
    }
    row[i] *= scale;
    std::fill(row + i + 1, row + L, T(0));
  }
  gemm<T>(false, false, L, Dk, L, T(1), w.dLL.data(), K, T(1), dQc, L, h.ldk, Dk);
  gemm<T>(true, false, L, Dk, L, T(1), w.dLL.data(), Q, T(1), dKc, L, h.ldk, Dk);
  gemm<T>(true, false, L, Dv, L, T(1), w.P.data(), dO, T(1), w.dVn.data(), L, h.ldv, Dv);

  // Vn = U - W S (dS gets the last of its terms here)
  gemm<T>(true, false, Dk, Dv, L, T(-1), w.W.data(), w.dVn.data(), T(1), dS);
  gemm<T>(false, true, L, Dk, Dv, T(-1), w.dVn.data(), S, T(0), w.tLk.data());  // dW
  // U = T Vb, W = T Kb
  gemm<T>(true, false, L, Dv, L, T(1), w.Tm.data(), w.dVn.data(), T(0), w.dVb.data());
  gemm<T>(true, false, L, Dk, L, T(1), w.Tm.data(), w.tLk.data(), T(0), w.dKb.data());
  // T = (I + M)^-1: dM = -(dVb U^T + dKb W^T)
  gemm<T>(false, true, L, L, Dv, T(-1), w.dVb.data(), w.U.data(), T(0), w.dLL.data());
  gemm<T>(false, true, L, L, Dk, T(-1), w.dKb.data(), w.W.data(), T(1), w.dLL.data());
  // Vb = diag(beta) V, Kb = diag(beta exp(G)) K
  for (int64_t i = 0; i < L; ++i) {
    const T b = bt[i * h.ldg];
    const T* dVb = w.dVb.data() + i * Dv;
    w.db[i] += dot_n(V + i * h.ldv, dVb, Dv);
    if (dv) {
      T* dvi = dv + h.v_off + (t0 + i) * h.ldv;
      for (int64_t y = 0; y < Dv; ++y) dvi[y] += b * dVb[y];
    }
    const T* dKb = w.dKb.data() + i * Dk;
    const T c = w.eG[i] * dot_n(K + i * h.ldk, dKb, Dk);
    w.db[i] += c;
    dG[i] += b * c;
    const T f = b * w.eG[i];
    for (int64_t x = 0; x < Dk; ++x) dKc[i * Dk + x] += f * dKb[x];
  }
  // M_ij = beta_i KK_ij Gam_ij (i > j); dLL becomes dKK.
  for (int64_t i = 0; i < L; ++i) {
    const T b = bt[i * h.ldg];
    T* row = w.dLL.data() + i * L;
    T dbi = 0;
    for (int64_t j = 0; j < i; ++j) {
      const T dm = row[j];
      const T c = dm * w.M[i * L + j];
      dG[i] += c;
      dG[j] -= c;
      dbi += dm * w.KK[i * L + j] * w.Gam[i * L + j];
      row[j] = dm * b * w.Gam[i * L + j];
    }
    w.db[i] += dbi;
    std::fill(row + i, row + L, T(0));
  }
  gemm<T>(false, false, L, Dk, L, T(1), w.dLL.data(), K, T(1), dKc, L, h.ldk, Dk);
  gemm<T>(true, false, L, Dk, L, T(1), w.dLL.data(), K, T(1), dKc, L, h.ldk, Dk);

  // G = cumsum(g): dg_t = sum_{i >= t} dG_i.
  if (dg) {
    T acc = 0;
    for (int64_t i = L - 1; i >= 0; --i) {
      acc += dG[i];
      dg[h.g_off + (t0 + i) * h.ldg] += acc;
    }
  }
  if (dbeta)
    for (int64_t i = 0; i < L; ++i) dbeta[h.g_off + (t0 + i) * h.ldg] += w.db[i];
  if (dq)
    for (int64_t i = 0; i < L; ++i) {
      T* d = dq + h.qk_off + (t0 + i) * h.ldk;
      for (int64_t x = 0; x < Dk; ++x) d[x] += dQc[i * Dk + x];
    }
  if (dk)
    for (int64_t i = 0; i < L; ++i) {
      T* d = dk + h.qk_off + (t0 + i) * h.ldk;
      for (int64_t x = 0; x < Dk; ++x) d[x] += dKc[i * Dk + x];
    }
}

}  // namespace

template <typename T>
void gated_delta_rule_chunked_forward(T* o, T* final_state, const T* q, const T* k, const T* v, const T* g,
                                      const T* beta, const T* initial_state, const GdrShape& s, T scale, int64_t chunk,
                                      T* chunk_states) {
  check_shape(s, "gated_delta_rule_chunked_forward");
  NEXTRON_CHECK(chunk > 0, "gated_delta_rule_chunked_forward: chunk size must be positive, got ", chunk);
  const int64_t dk = s.dk, dv = s.dv, BH = s.B * s.Hv, C = std::min(chunk, std::max<int64_t>(s.S, 1));
  const int64_t nchunks = (s.S + C - 1) / C;
#pragma omp parallel
  {
    ChunkWork<T> w(C, dk, dv, false);
    std::vector<T> St(dk * dv);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
      const Head<T> h = make_head(q, k, v, g, beta, s, bh / s.Hv, bh % s.Hv);
      load_state(St.data(), initial_state ? initial_state + h.state_off : nullptr, dk * dv);
      for (int64_t t0 = 0; t0 < s.S; t0 += C) {
        const int64_t L = std::min(C, s.S - t0);
        if (chunk_states) std::copy(St.begin(), St.end(), chunk_states + (bh * nchunks + t0 / C) * dk * dv);
        chunk_prepare(w, h, t0, L);
        chunk_prepare_output(w, h, t0, L, scale);
        chunk_new_values(w, St.data(), L);
        T* O = o + h.v_off + t0 * h.ldv;
        gemm<T>(false, false, L, dv, dk, T(1), w.Qe.data(), St.data(), T(0), O, dk, dv, h.ldv);
        gemm<T>(false, false, L, dv, L, T(1), w.P.data(), w.Vn.data(), T(1), O, L, dv, h.ldv);
        chunk_advance_state(w, St.data(), L);
      }
      if (final_state) std::copy(St.begin(), St.end(), final_state + h.state_off);
    }
  }
}

template <typename T>
void gated_delta_rule_chunked_backward(T* dq, T* dk, T* dv, T* dg, T* dbeta, T* d_initial_state, const T* d_o,
                                       const T* d_final_state, const T* q, const T* k, const T* v, const T* g,
                                       const T* beta, const T* initial_state, const GdrShape& s, T scale, int64_t chunk,
                                       const T* chunk_states) {
  check_shape(s, "gated_delta_rule_chunked_backward");
  NEXTRON_CHECK(chunk > 0, "gated_delta_rule_chunked_backward: chunk size must be positive, got ", chunk);
  const int64_t Dk = s.dk, Dv = s.dv, n = Dk * Dv, r = s.Hv / s.Hk, BHk = s.B * s.Hk;
  const int64_t C = std::min(chunk, std::max<int64_t>(s.S, 1)), nchunks = (s.S + C - 1) / C;
#pragma omp parallel
  {
    ChunkWork<T> w(C, Dk, Dv, true);
    std::vector<T> states(chunk_states ? 0 : nchunks * n), St(n), dS(n);
#pragma omp for schedule(static)
    for (int64_t bhk = 0; bhk < BHk; ++bhk) {
      const int64_t b = bhk / s.Hk, hk = bhk % s.Hk;
      for (int64_t rr = 0; rr < r; ++rr) {
        const int64_t hv = hk * r + rr;
        const Head<T> h = make_head(q, k, v, g, beta, s, b, hv);
        // The state entering every chunk: the forward's, or a forward sweep's.
        const T* entering = chunk_states ? chunk_states + (b * s.Hv + hv) * nchunks * n : states.data();
        if (!chunk_states) {
          load_state(St.data(), initial_state ? initial_state + h.state_off : nullptr, n);
          for (int64_t c = 0; c < nchunks; ++c) {
            std::copy(St.begin(), St.end(), states.begin() + c * n);
            if (c + 1 == nchunks) break;
            chunk_prepare(w, h, c * C, C);
            chunk_new_values(w, St.data(), C);
            chunk_advance_state(w, St.data(), C);
          }
        }
        // Reverse sweep.
        load_state(dS.data(), d_final_state ? d_final_state + h.state_off : nullptr, n);
        for (int64_t c = nchunks - 1; c >= 0; --c) {
          const int64_t t0 = c * C, L = std::min(C, s.S - t0);
          chunk_backward(w, dS.data(), dq, dk, dv, dg, dbeta, d_o, entering + c * n, h, t0, L, scale);
        }
        if (d_initial_state)
          for (int64_t e = 0; e < n; ++e) d_initial_state[h.state_off + e] += dS[e];
      }
    }
  }
}

int64_t gated_delta_rule_chunk_states_elements(const GdrShape& s, int64_t chunk) {
  NEXTRON_CHECK(chunk > 0, "gated_delta_rule_chunk_states_elements: chunk size must be positive, got ", chunk);
  const int64_t C = std::min(chunk, std::max<int64_t>(s.S, 1));
  return s.B * s.Hv * ((s.S + C - 1) / C) * s.dk * s.dv;
}

#define NEXTRON_GDR_INSTANTIATE(T)                                                                                     \
  template void gated_delta_rule_recurrent_forward<T>(T*, T*, const T*, const T*, const T*, const T*, const T*,        \
                                                      const T*, const GdrShape&, T);                                   \
  template void gated_delta_rule_recurrent_backward<T>(T*, T*, T*, T*, T*, T*, const T*, const T*, const T*, const T*, \
                                                       const T*, const T*, const T*, const T*, const GdrShape&, T);    \
  template void gated_delta_rule_chunked_forward<T>(T*, T*, const T*, const T*, const T*, const T*, const T*,          \
                                                    const T*, const GdrShape&, T, int64_t, T*);                        \
  template void gated_delta_rule_chunked_backward<T>(T*, T*, T*, T*, T*, T*, const T*, const T*, const T*, const T*,   \
                                                     const T*, const T*, const T*, const T*, const GdrShape&, T,       \
                                                     int64_t, const T*);

NEXTRON_GDR_INSTANTIATE(float)
NEXTRON_GDR_INSTANTIATE(double)

#undef NEXTRON_GDR_INSTANTIATE

}  // namespace nextron::cpu
