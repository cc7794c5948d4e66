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

// p (rows x cols, row stride cols) holds scaled scores of queries i0 + r against keys j0 + c; turns them into
// probabilities exp(score - lse_i), zero where the key is in the future (j > i).
template <typename T>
void probabilities(T* p, const T* lse_row, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const T l = lse_row[i];
    T* pr = p + r * cols;
    const int64_t valid = std::clamp<int64_t>(i - j0 + 1, 0, cols);
    for (int64_t c = 0; c < valid; ++c) pr[c] = std::exp(pr[c] - l);
    for (int64_t c = valid; c < cols; ++c) pr[c] = T(0);
  }
}

// dp <- p * (dp - delta_i): the softmax backward, in place (masked entries have p = 0).
template <typename T>
void softmax_grad(T* dp, const T* p, const T* delta_row, int64_t i0, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T dl = delta_row[i0 + r];
    for (int64_t c = 0; c < cols; ++c) dp[r * cols + c] = p[r * cols + c] * (dp[r * cols + c] - dl);
  }
}
}  // namespace

template <typename T>
void attention_forward(T* o, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t S, int64_t NH, int64_t NKV,
                       int64_t D, double scale, int64_t block) {
  check_shape(NH, NKV, block);
  const int64_t G = NH / NKV, nqb = (S + block - 1) / block;
  const int64_t ldq = NH * D, ldk = NKV * D;
#pragma omp parallel
  {
    std::vector<T> sc(block * S);
#pragma omp for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t qb = 0; qb < nqb; ++qb) {
          // Queries [i0, i1) see keys [0, i1).
          const int64_t i0 = qb * block, i1 = std::min(S, i0 + block), M = i1 - i0, L = i1;
          const T* qp = q + ((b * S + i0) * NH + h) * D;
          const T* kp = k + (b * S * NKV + h / G) * D;
          const T* vp = v + (b * S * NKV + h / G) * D;
          T* lse_row = lse + (b * NH + h) * S;
          gemm<T>(false, true, M, L, D, T(scale), qp, kp, T(0), sc.data(), ldq, ldk, L);
          for (int64_t r = 0; r < M; ++r) {
            const T* row = sc.data() + r * L;
            const int64_t n = i0 + r + 1;  // keys 0..i
            T m = row[0];
            for (int64_t j = 1; j < n; ++j) m = std::max(m, row[j]);
            double sum = 0;
            for (int64_t j = 0; j < n; ++j) sum += std::exp(double(row[j] - m));
            lse_row[i0 + r] = m + T(std::log(sum));
          }
          probabilities(sc.data(), lse_row, i0, M, 0, L);
          gemm<T>(false, false, M, D, L, T(1), sc.data(), vp, T(0), o + ((b * S + i0) * NH + h) * D, L, ldk, ldq);
        }
  }
}

template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* d_o, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        int64_t B, int64_t S, int64_t NH, int64_t NKV, int64_t D, double scale, int64_t block) {
  check_shape(NH, NKV, block);
  if (!dq && !dk && !dv) return;
  const int64_t G = NH / NKV, nb = (S + block - 1) / block;
  const int64_t ldq = NH * D, ldk = NKV * D;
  const T sc = T(scale);

  // delta (B, NH, S): rowsum(dO * O) = sum_j P_ij dP_ij, the softmax backward's correction term.
  std::vector<T> delta(B * NH * S);
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < NH; ++h) {
        const T* gr = d_o + ((b * S + s) * NH + h) * D;
        const T* orow = o + ((b * S + s) * NH + h) * D;
        double acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += double(gr[d]) * double(orow[d]);
        delta[(b * NH + h) * S + s] = T(acc);
      }

  // dk, dv: one task per (b, kv head, key block [j0, j1)), seeing queries [j0, S) of every head of its group.
  if (dk || dv) {
#pragma omp parallel
    {
      std::vector<T> p(S * block), dp(S * block);
#pragma omp for collapse(3) schedule(dynamic)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < NKV; ++g)
          for (int64_t kb = 0; kb < nb; ++kb) {
            const int64_t j0 = kb * block, j1 = std::min(S, j0 + block), Nk = j1 - j0, M = S - j0;
            const int64_t koff = ((b * S + j0) * NKV + g) * D;
            for (int64_t h = g * G; h < (g + 1) * G; ++h) {
              const int64_t qoff = ((b * S + j0) * NH + h) * D;
              const T* lse_row = lse + (b * NH + h) * S;
              gemm<T>(false, true, M, Nk, D, sc, q + qoff, k + koff, T(0), p.data(), ldq, ldk, Nk);
              probabilities(p.data(), lse_row, j0, M, j0, Nk);
              if (dv) gemm<T>(true, false, Nk, D, M, T(1), p.data(), d_o + qoff, T(1), dv + koff, Nk, ldq, ldk);
              if (dk) {
                gemm<T>(false, true, M, Nk, D, T(1), d_o + qoff, v + koff, T(0), dp.data(), ldq, ldk, Nk);
                softmax_grad(dp.data(), p.data(), delta.data() + (b * NH + h) * S, j0, M, Nk);
                gemm<T>(true, false, Nk, D, M, sc, dp.data(), q + qoff, T(1), dk + koff, Nk, ldq, ldk);
              }
            }
          }
    }
  }

  // dq: one task per (b, query head, query block [i0, i1)), against keys [0, i1).
  if (dq) {
#pragma omp parallel
    {
      std::vector<T> p(S * block), dp(S * block);
#pragma omp for collapse(3) schedule(dynamic)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < NH; ++h)
          for (int64_t qb = 0; qb < nb; ++qb) {
            const int64_t i0 = qb * block, i1 = std::min(S, i0 + block), M = i1 - i0, L = i1;
            const int64_t qoff = ((b * S + i0) * NH + h) * D;
            const int64_t koff = (b * S * NKV + h / G) * D;
            gemm<T>(false, true, M, L, D, sc, q + qoff, k + koff, T(0), p.data(), ldq, ldk, L);
            probabilities(p.data(), lse + (b * NH + h) * S, i0, M, 0, L);
            gemm<T>(false, true, M, L, D, T(1), d_o + qoff, v + koff, T(0), dp.data(), ldq, ldk, L);
            softmax_grad(dp.data(), p.data(), delta.data() + (b * NH + h) * S, i0, M, L);
            gemm<T>(false, false, M, D, L, sc, dp.data(), k + koff, T(1), dq + qoff, L, ldk, ldq);
          }
    }
  }
}

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
