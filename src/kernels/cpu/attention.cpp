#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/blas.h"

namespace nextron::cpu {

namespace {
void check_shape(int64_t NH, int64_t NKV, int64_t block) {
  NEXTRON_CHECK(NKV > 0 && NH % NKV == 0, "attention: num_attention_heads ", NH,
                " must be a multiple of num_key_value_heads ", NKV);
  NEXTRON_CHECK(block > 0, "attention: block size must be positive, got ", block);
}

// p (rows x cols, row stride cols) holds scaled scores of the queries at positions pos0 + r (lse_row[r] their
// log-sum-exp) against keys j0 + c; turns them into probabilities exp(score - lse), zero where the key is in the
// future (j > the query's position).
template <typename T>
void probabilities(T* p, const T* lse_row, int64_t pos0, int64_t rows, int64_t j0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T l = lse_row[r];
    T* pr = p + r * cols;
    const int64_t valid = std::clamp<int64_t>(pos0 + r - j0 + 1, 0, cols);
    for (int64_t c = 0; c < valid; ++c) pr[c] = std::exp(pr[c] - l);
    for (int64_t c = valid; c < cols; ++c) pr[c] = T(0);
  }
}

// dp <- p * (dp - delta_r): the softmax backward, in place (masked entries have p = 0); delta_row[r] is row r's.
template <typename T>
void softmax_grad(T* dp, const T* p, const T* delta_row, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T dl = delta_row[r];
    for (int64_t c = 0; c < cols; ++c) dp[r * cols + c] = p[r * cols + c] * (dp[r * cols + c] - dl);
  }
}
}  // namespace

template <typename T>
void causal_attention_forward(T* o, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t Sq, int64_t Sk,
                              int64_t NH, int64_t NKV, int64_t D, double scale, int64_t block) {
  check_shape(NH, NKV, block);
  NEXTRON_CHECK(0 <= Sq && Sq <= Sk, "attention: ", Sq, " queries against ", Sk,
                " keys; the queries are the last of the keys' positions, so there can be no more of them");
  const int64_t G = NH / NKV, nqb = (Sq + block - 1) / block, off = Sk - Sq;  // query i is at position off + i
  const int64_t ldq = NH * D, ldk = NKV * D;
#pragma omp parallel
  {
    std::vector<T> sc(block * Sk);
#pragma omp for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t qb = 0; qb < nqb; ++qb) {
          // Queries [i0, i1) see keys [0, off + i1).
          const int64_t i0 = qb * block, i1 = std::min(Sq, i0 + block), M = i1 - i0, L = off + i1;
          const T* qp = q + ((b * Sq + i0) * NH + h) * D;
          const T* kp = k + (b * Sk * NKV + h / G) * D;
          const T* vp = v + (b * Sk * NKV + h / G) * D;
          T* lse_row = lse + (b * NH + h) * Sq;
          gemm<T>(false, true, M, L, D, T(scale), qp, kp, T(0), sc.data(), ldq, ldk, L);
          for (int64_t r = 0; r < M; ++r) {
            const T* row = sc.data() + r * L;
            const int64_t n = off + i0 + r + 1;  // keys 0 .. its position
            T m = row[0];
            for (int64_t j = 1; j < n; ++j) m = std::max(m, row[j]);
            double sum = 0;
            for (int64_t j = 0; j < n; ++j) sum += std::exp(double(row[j] - m));
            lse_row[i0 + r] = m + T(std::log(sum));
          }
          probabilities(sc.data(), lse_row + i0, off + i0, M, 0, L);
          gemm<T>(false, false, M, D, L, T(1), sc.data(), vp, T(0), o + ((b * Sq + i0) * NH + h) * D, L, ldk, ldq);
        }
  }
}

template <typename T>
void causal_attention_backward(T* dq, T* dk, T* dv, const T* d_o, const T* q, const T* k, const T* v, const T* o,
                               const T* lse, int64_t B, int64_t Sq, int64_t Sk, int64_t NH, int64_t NKV, int64_t D,
                               double scale, int64_t block) {
  check_shape(NH, NKV, block);
  NEXTRON_CHECK(0 <= Sq && Sq <= Sk, "attention: ", Sq, " queries against ", Sk, " keys");
  if (!dq && !dk && !dv) return;
  const int64_t G = NH / NKV, nqb = (Sq + block - 1) / block, nkb = (Sk + block - 1) / block, off = Sk - Sq;
  const int64_t ldq = NH * D, ldk = NKV * D;
  const T sc = T(scale);

  // delta (B, NH, Sq): rowsum(dO * O) = sum_j P_ij dP_ij, the softmax backward's correction term.
  std::vector<T> delta(B * NH * Sq);
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < Sq; ++s)
      for (int64_t h = 0; h < NH; ++h) {
        const T* gr = d_o + ((b * Sq + s) * NH + h) * D;
        const T* orow = o + ((b * Sq + s) * NH + h) * D;
        double acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += double(gr[d]) * double(orow[d]);
        delta[(b * NH + h) * Sq + s] = T(acc);
      }

  // dk, dv: one task per (b, kv head, key block [j0, j1)), seeing the queries at positions >= j0 (local rows
  // [max(0, j0 - off), Sq)) of every head of its group.
  if (dk || dv) {
#pragma omp parallel
    {
      std::vector<T> p(Sq * block), dp(Sq * block);
#pragma omp for collapse(3) schedule(dynamic)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < NKV; ++g)
          for (int64_t kb = 0; kb < nkb; ++kb) {
            const int64_t j0 = kb * block, j1 = std::min(Sk, j0 + block), Nk = j1 - j0;
            const int64_t r0 = std::max<int64_t>(0, j0 - off), M = Sq - r0;
            if (M <= 0) continue;
            const int64_t koff = ((b * Sk + j0) * NKV + g) * D;
            for (int64_t h = g * G; h < (g + 1) * G; ++h) {
              const int64_t qoff = ((b * Sq + r0) * NH + h) * D;
              const T* lse_row = lse + (b * NH + h) * Sq + r0;
              gemm<T>(false, true, M, Nk, D, sc, q + qoff, k + koff, T(0), p.data(), ldq, ldk, Nk);
              probabilities(p.data(), lse_row, off + r0, M, j0, Nk);
              if (dv) gemm<T>(true, false, Nk, D, M, T(1), p.data(), d_o + qoff, T(1), dv + koff, Nk, ldq, ldk);
              if (dk) {
                gemm<T>(false, true, M, Nk, D, T(1), d_o + qoff, v + koff, T(0), dp.data(), ldq, ldk, Nk);
                softmax_grad(dp.data(), p.data(), delta.data() + (b * NH + h) * Sq + r0, M, Nk);
                gemm<T>(true, false, Nk, D, M, sc, dp.data(), q + qoff, T(1), dk + koff, Nk, ldq, ldk);
              }
            }
          }
    }
  }

  // dq: one task per (b, query head, query block [i0, i1)), against keys [0, off + i1).
  if (dq) {
#pragma omp parallel
    {
      std::vector<T> p(Sk * block), dp(Sk * block);
#pragma omp for collapse(3) schedule(dynamic)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < NH; ++h)
          for (int64_t qb = 0; qb < nqb; ++qb) {
            const int64_t i0 = qb * block, i1 = std::min(Sq, i0 + block), M = i1 - i0, L = off + i1;
            const int64_t qoff = ((b * Sq + i0) * NH + h) * D;
            const int64_t koff = (b * Sk * NKV + h / G) * D;
            gemm<T>(false, true, M, L, D, sc, q + qoff, k + koff, T(0), p.data(), ldq, ldk, L);
            probabilities(p.data(), lse + (b * NH + h) * Sq + i0, off + i0, M, 0, L);
            gemm<T>(false, true, M, L, D, T(1), d_o + qoff, v + koff, T(0), dp.data(), ldq, ldk, L);
            softmax_grad(dp.data(), p.data(), delta.data() + (b * NH + h) * Sq + i0, M, L);
            gemm<T>(false, false, M, D, L, sc, dp.data(), k + koff, T(1), dq + qoff, L, ldk, ldq);
          }
    }
  }
}

template <typename T>
void attention_forward(T* o, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t S, int64_t NH, int64_t NKV,
                       int64_t D, double scale, int64_t block) {
  causal_attention_forward(o, lse, q, k, v, B, S, S, NH, NKV, D, scale, block);
}

template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* d_o, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        int64_t B, int64_t S, int64_t NH, int64_t NKV, int64_t D, double scale, int64_t block) {
  causal_attention_backward(dq, dk, dv, d_o, q, k, v, o, lse, B, S, S, NH, NKV, D, scale, block);
}

#define NEXTRON_ATTENTION_INSTANTIATE(T)                                                                              \
  template void causal_attention_forward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                            int64_t, int64_t, double, int64_t);                                       \
  template void causal_attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*, const T*,  \
                                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t);
NEXTRON_ATTENTION_INSTANTIATE(float)
NEXTRON_ATTENTION_INSTANTIATE(double)
#undef NEXTRON_ATTENTION_INSTANTIATE

template void attention_forward<float>(float*, float*, const float*, const float*, const float*, int64_t, int64_t,
                                       int64_t, int64_t, int64_t, double, int64_t);
template void attention_forward<double>(double*, double*, const double*, const double*, const double*, int64_t, int64_t,
                                        int64_t, int64_t, int64_t, double, int64_t);
template void attention_backward<float>(float*, float*, float*, const float*, const float*, const float*, const float*,
                                        const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, double,
                                        int64_t);
template void attention_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                         const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, double, int64_t);

}  // namespace nextron::cpu
