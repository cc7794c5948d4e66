// Matrix products on the GPU through cuBLASLt: bf16 operands, fp32 accumulation (CPU reference:
// kernels/cpu/linear.h and moe_experts.h). Weights are (OUT, IN) row-major as in HF, read from the bf16 shadow.
// Problems cuBLASLt's heuristic has no algorithm for (degenerate ones such as the shared-expert gate, OUT = 1 with
// row stride 1, or K = 1, and oddly aligned operands) run through classic cuBLAS cublasGemmEx instead, with the same
// types, accumulation and alpha/beta semantics (logged once per shape on stderr).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// One cuBLASLt handle and its workspace (allocated once), bound to a stream, and a classic cuBLAS handle on the same
// stream and workspace, created with the first fallback plan. Not thread-safe.
class Blas {
 public:
  explicit Blas(cudaStream_t stream, size_t workspace_bytes = 32u << 20);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  cudaStream_t stream() const { return stream_; }

  // y (N, OUT) = x (N, IN) W^T (+ bias (OUT) fp32, may be nullptr); y overwritten.
  void linear_forward(bf16* y, const bf16* x, const bf16* w, const float* bias, int64_t N, int64_t IN, int64_t OUT);
  // The same with an fp32 output (router logits, LM-head logits kept in fp32 when asked).
  void linear_forward(float* y, const bf16* x, const bf16* w, const float* bias, int64_t N, int64_t IN, int64_t OUT);
  // Accumulates dx (N, IN) += dy W (bf16), dw (OUT, IN) += dy^T x (fp32), dbias (OUT) += column sums of dy (fp32)
  // (each may be nullptr).
  void linear_backward(bf16* dx, float* dw, float* dbias, const bf16* dy, const bf16* x, const bf16* w, int64_t N,
                       int64_t IN, int64_t OUT);

  // Grouped products over experts: rows of x sorted by expert, expert e owning rows [offsets[e], offsets[e + 1])
  // (host array of E + 1 entries, offsets[0] = 0). For each expert with rows: y_e = x_e W_e^T, W: (E, OUT, IN).
  // Issued as one grouped call (or one GEMM per expert with rows), never one per token.
  void grouped_forward(bf16* y, const bf16* x, const bf16* w, const int64_t* offsets, int64_t E, int64_t IN,
                       int64_t OUT);
  // Accumulates dx += dy_e W_e (bf16) and dw_e += dy_e^T x_e (fp32) (each may be nullptr).
  void grouped_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w, const int64_t* offsets,
                        int64_t E, int64_t IN, int64_t OUT);

  // Generic row-major C (M, N) = alpha op(A) op(B) + beta C, bf16 A/B, C/D of type ct (CUDA_R_16BF or
  // CUDA_R_32F); lda/ldb/ldc are row strides. The building block of the calls above.
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A, int64_t lda,
            const bf16* B, int64_t ldb, float beta, void* C, cudaDataType_t ct, int64_t ldc);

  // Plans built so far that run through cublasGemmEx (cuBLASLt had no algorithm, or force_fallback_for_testing was
  // on). A problem counts again if its plan is rebuilt after the plan cache was flushed.
  size_t fallback_plans() const { return fallback_plans_; }
  // TEST ONLY: while on, every NEW plan is a fallback plan (no heuristic query), so the cublasGemmEx path can be
  // checked on a GPU where cuBLASLt has an algorithm for every shape. Plans already cached keep their path, and forced
  // plans are not logged. Never set in production: the cuBLASLt path is the tuned one.
  void force_fallback_for_testing(bool on) { force_fallback_ = on; }

 private:
  // The cuBLASLt descriptors and chosen algorithm of one problem, cached so a repeated shape makes no heuristic
  // query. Key: transposes, M, N, K, lda, ldb, ldc, C type, beta != 0, and the pointer alignments of A, B, C.
  // A fallback plan (cuBLASLt found no algorithm) holds no descriptors: gemm() issues cublasGemmEx from the key.
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool fallback = false;
    void destroy();
  };
  using PlanKey = std::array<int64_t, 13>;
  const Plan& plan(const PlanKey& key);
  void build_plan(Plan& p, const PlanKey& key) const;
  void prepare_fallback(const PlanKey& key);
  void clear_plans();

  cudaStream_t stream_;
  cublasLtHandle_t handle_ = nullptr;
  cublasHandle_t gemm_ex_handle_ = nullptr;  // created with the first fallback plan
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<PlanKey, Plan> plans_;
  size_t fallback_plans_ = 0;
  bool force_fallback_ = false;
  std::set<std::string> logged_fallbacks_;  // shape descriptions already reported on stderr
};

}  // namespace nextron::cuda
