// Thin typed wrapper over CBLAS gemm (row-major) so kernels are written once for float and double.
#pragma once

#include <cstdint>

namespace nextron::cpu {

// C[M,N] = alpha * op(A) op(B) + beta * C, row-major; op(X) = X^T when trans_X.
// lda/ldb/ldc default to the packed row length of each operand.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, const T* B, T beta, T* C,
          int64_t lda = -1, int64_t ldb = -1, int64_t ldc = -1);

}  // namespace nextron::cpu
