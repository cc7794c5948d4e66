#include "kernels/cpu/blas.h"

#include <cblas.h>

namespace nextron::cpu {

namespace {
template <typename T>
void gemm_impl(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta, T* C,
               int64_t lda, int64_t ldb, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (lda < 0) lda = ta ? M : K;
  if (ldb < 0) ldb = tb ? K : N;
  if (ldc < 0) ldc = N;
  const auto TA = ta ? CblasTrans : CblasNoTrans;
  const auto TB = tb ? CblasTrans : CblasNoTrans;
  if constexpr (sizeof(T) == 4) {
    cblas_sgemm(CblasRowMajor, TA, TB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    cblas_dgemm(CblasRowMajor, TA, TB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}
}  // namespace

template <>
void gemm<float>(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B,
                 float beta, float* C, int64_t lda, int64_t ldb, int64_t ldc) {
  gemm_impl(ta, tb, M, N, K, alpha, A, B, beta, C, lda, ldb, ldc);
}
template <>
void gemm<double>(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, const double* B,
                  double beta, double* C, int64_t lda, int64_t ldb, int64_t ldc) {
  gemm_impl(ta, tb, M, N, K, alpha, A, B, beta, C, lda, ldb, ldc);
}

}  // namespace nextron::cpu
