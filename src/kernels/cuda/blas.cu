// Matrix products through cuBLASLt (bf16 operands, fp32 accumulation and scale) plus the two tiny kernels a linear
// layer needs around them: the fp32 bias added to the product, and the deterministic column sum for dbias.
//
// Row-major vs column-major: cuBLASLt is column-major, and a row-major matrix with row stride ld is the
// column-major view of its transpose with leading dimension ld. So the row-major product C (M, N) = op(A) op(B) is
// issued as the column-major product C^T (N, M) = op(B)^T op(A)^T: cuBLASLt's "A" is our B and its "B" is our A,
// each with its own transpose flag, and no data moves.
//
// Each distinct problem (shape, strides, transposes, output dtype, beta == 0, pointer alignments) gets a Plan:
// its descriptors and the algorithm of one heuristic query, kept in a std::map, so steady-state steps run no
// heuristic. The pointer alignments are part of the key because the heuristic assumes 256-byte aligned operands
// unless told otherwise, and expert blocks (x + offsets[e] * IN) are often less aligned than that.
//
// Fallback: for some problems the heuristic finds no algorithm (found == 0, or the query itself answers
// CUBLAS_STATUS_NOT_SUPPORTED): degenerate shapes such as the shared-expert gate (OUT = 1, so N = 1 with ldb = ldc
// = 1) or K = 1, and oddly aligned operands. Training must not stop on a shape the model legitimately produces, so
// such a plan is marked as a fallback and gemm() issues the same column-major product through classic cuBLAS
// cublasGemmEx (bf16 A/B, C of the plan's type, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT: same accumulation and
// alpha/beta semantics). Its handle is created with the first fallback plan, on the same stream and workspace (the
// two handles never run at once: both enqueue on stream_). Each fallback shape is reported once on stderr; any
// other heuristic error still throws.
//
// The bias is added by a small kernel after the GEMM rather than with CUBLASLT_EPILOGUE_BIAS: cuBLASLt documents
// the bias type as the output type (bf16 for a bf16 output) and our bias is the fp32 master parameter.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <iostream>
#include <string>

#include "core/error.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/device_utils.cuh"

// A failed cuBLAS or cuBLASLt call becomes a nextron::Error naming the call and the status.
#define NEXTRON_CUBLAS_CHECK(call)                                                                                \
  do {                                                                                                            \
    cublasStatus_t nextron_st_ = (call);                                                                          \
    if (nextron_st_ != CUBLAS_STATUS_SUCCESS)                                                                     \
      throw ::nextron::Error(::nextron::detail::concat(                                                           \
          "cuBLAS error in ", #call, ": ", cublasLtGetStatusName(nextron_st_), " at ", __FILE__, ":", __LINE__)); \
  } while (0)

namespace nextron::cuda {

namespace {

// Plans are keyed by exact shape; the grouped products see a new row count per expert now and then, so the map is
// bounded (dropping every plan when it fills only costs a re-query of the shapes still in use).
constexpr size_t kMaxPlans = size_t(1) << 14;

enum KeyField { kTransA, kTransB, kM, kN, kK, kLda, kLdb, kLdc, kCType, kBetaNonZero, kAlignA, kAlignB, kAlignC };

// The largest power of two (at most 256) that divides the address.
int64_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int64_t al = 256;
  while (al > 1 && a % uintptr_t(al) != 0) al >>= 1;
  return al;
}

size_t ctype_size(cudaDataType_t ct) { return ct == CUDA_R_32F ? 4 : 2; }

// The problem of a plan key in words (the fallback's log line).
std::string describe(const std::array<int64_t, 13>& key) {
  return detail::concat("the bf16 GEMM C (", key[kM], ", ", key[kN], ") = op(A) op(B) with K = ", key[kK],
                        ", transposes ", key[kTransA], key[kTransB], ", lda/ldb/ldc ", key[kLda], "/", key[kLdb], "/",
                        key[kLdc], ", output ", cudaDataType_t(key[kCType]) == CUDA_R_32F ? "fp32" : "bf16",
                        ", alignments ", key[kAlignA], "/", key[kAlignB], "/", key[kAlignC], " bytes");
}

// y (N, OUT) += bias (OUT), in place after the GEMM (fp32 sum, one rounding for bf16 y).
template <typename T>
__global__ void add_bias_kernel(T* y, const float* bias, int64_t N, int64_t OUT) {
  const int64_t total = N * OUT;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) add_to(&y[i], bias[i % OUT]);
}

// dbias (OUT) += sum over rows of dy (N, OUT). Block (32, 32) owns 32 columns: thread (x, y) sums rows y, y + 32,
// ... of column x (a warp reads 32 consecutive columns of one row), then the 32 partials of a column are added in
// row-group order. Fixed order throughout: deterministic.
__global__ void column_sum_kernel(float* dbias, const bf16* dy, int64_t N, int64_t OUT) {
  __shared__ float part[32][33];
  const int64_t o = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.0f;
  if (o < OUT)
    for (int64_t n = threadIdx.y; n < N; n += 32) s += to_f32(dy[n * OUT + o]);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && o < OUT) {
    float t = 0.0f;
    for (int r = 0; r < 32; ++r) t += part[r][threadIdx.x];
    dbias[o] += t;
  }
}

template <typename T>
void add_bias(T* y, const float* bias, int64_t N, int64_t OUT, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(N * OUT, 256), int64_t(1) << 16);
  add_bias_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(y, bias, N, OUT);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

}  // namespace

Blas::Blas(cudaStream_t stream, size_t workspace_bytes) : stream_(stream), workspace_bytes_(workspace_bytes) {
  NEXTRON_CUBLAS_CHECK(cublasLtCreate(&handle_));
  if (workspace_bytes_ == 0) return;
  if (cudaError_t err = cudaMalloc(&workspace_, workspace_bytes_); err != cudaSuccess) {
    cublasLtDestroy(handle_);  // the destructor does not run for a throwing constructor
    NEXTRON_CUDA_CHECK(err);
  }
}

Blas::~Blas() {
  clear_plans();
  if (gemm_ex_handle_) cublasDestroy(gemm_ex_handle_);  // before the workspace it may use goes
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

void Blas::Plan::destroy() {
  if (a) cublasLtMatrixLayoutDestroy(a);
  if (b) cublasLtMatrixLayoutDestroy(b);
  if (c) cublasLtMatrixLayoutDestroy(c);
  if (desc) cublasLtMatmulDescDestroy(desc);
  a = b = c = nullptr;
  desc = nullptr;
}

void Blas::clear_plans() {
  for (auto& entry : plans_) entry.second.destroy();
  plans_.clear();
}

const Blas::Plan& Blas::plan(const PlanKey& key) {
  if (auto it = plans_.find(key); it != plans_.end()) return it->second;
  if (plans_.size() >= kMaxPlans) clear_plans();
  Plan p;  // enters the map only once complete, so a failed query leaves no half-built plan behind
  try {
    build_plan(p, key);
    if (p.fallback) prepare_fallback(key);
  } catch (...) {
    p.destroy();
    throw;
  }
  if (p.fallback) ++fallback_plans_;
  return plans_.emplace(key, p).first->second;
}

// A new fallback plan: checks that cublasGemmEx can take the problem, creates its handle on first need, and
// reports the shape once (not when forced by a test: cuBLASLt was not asked).
void Blas::prepare_fallback(const PlanKey& key) {
  const int64_t largest = *std::max_element(key.begin() + kM, key.begin() + kLdc + 1);  // M, N, K, lda, ldb, ldc
  NEXTRON_CHECK(largest <= INT_MAX, "cuBLASLt has no algorithm for ", describe(key),
                ", and the cublasGemmEx fallback takes sizes and strides below 2^31");
  if (!gemm_ex_handle_) {
    cublasHandle_t h = nullptr;
    NEXTRON_CUBLAS_CHECK(cublasCreate(&h));
    // The workspace is set after the stream: cublasSetStream resets a user workspace to cuBLAS's own pool. Sharing
    // cuBLASLt's is safe because both handles enqueue on stream_ only, so their kernels never overlap.
    cublasStatus_t st = cublasSetStream(h, stream_);
    if (st == CUBLAS_STATUS_SUCCESS && workspace_) st = cublasSetWorkspace(h, workspace_, workspace_bytes_);
    if (st != CUBLAS_STATUS_SUCCESS) {
      cublasDestroy(h);
      NEXTRON_CUBLAS_CHECK(st);
    }
    gemm_ex_handle_ = h;
  }
  if (force_fallback_) return;
  const std::string shape = describe(key);
  if (logged_fallbacks_.size() >= kMaxPlans) logged_fallbacks_.clear();  // bounded like the plans
  if (logged_fallbacks_.insert(shape).second)
    std::cerr << "nextron: cuBLASLt has no algorithm for " << shape << "; using cublasGemmEx\n";
}

void Blas::build_plan(Plan& p, const PlanKey& key) const {
  if (force_fallback_) {  // test only: exercise cublasGemmEx without asking cuBLASLt
    p.fallback = true;
    return;
  }
  const bool ta = key[kTransA] != 0, tb = key[kTransB] != 0;
  const int64_t M = key[kM], N = key[kN], K = key[kK];
  const auto ct = cudaDataType_t(key[kCType]);

  NEXTRON_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLASLt's A is our B, its B is our A (see the top of the file).
  const cublasOperation_t op_a = tb ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  NEXTRON_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  NEXTRON_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  // Stored (column-major) shapes: our B is (K, N) row-major = (N, K) column-major, or (K, N) when transposed;
  // our A is (M, K) row-major = (K, M) column-major, or (M, K) when transposed; C^T is (N, M).
  NEXTRON_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, uint64_t(tb ? K : N), uint64_t(tb ? N : K), key[kLdb]));
  NEXTRON_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, uint64_t(ta ? M : K), uint64_t(ta ? K : M), key[kLda]));
  NEXTRON_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, ct, uint64_t(N), uint64_t(M), key[kLdc]));

  cublasLtMatmulPreference_t pref = nullptr;
  NEXTRON_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = workspace_bytes_;
  // Alignments in cuBLASLt's naming: its A is our B, its B is our A; C and D are the same buffer.
  const uint32_t al_a = uint32_t(key[kAlignB]), al_b = uint32_t(key[kAlignA]), al_c = uint32_t(key[kAlignC]);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  bool no_algorithm = false;
  cublasStatus_t st =
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c));
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
    // NOT_SUPPORTED from the query itself (not from the preference setup) is how cuBLASLt turns down some problems
    // it has no kernel for, like found == 0; both go to the fallback. Any other status is a real error.
    no_algorithm = st == CUBLAS_STATUS_NOT_SUPPORTED ||
                   (st == CUBLAS_STATUS_SUCCESS && (found == 0 || result.state != CUBLAS_STATUS_SUCCESS));
  }
  cublasLtMatmulPreferenceDestroy(pref);
  if (no_algorithm) {
    p.destroy();  // the descriptors are of no use to cublasGemmEx
    p.fallback = true;
    return;
  }
  NEXTRON_CUBLAS_CHECK(st);
  p.algo = result.algo;
}

void Blas::gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A, int64_t lda,
                const bf16* B, int64_t ldb, float beta, void* C, cudaDataType_t ct, int64_t ldc) {
  NEXTRON_CHECK(ct == CUDA_R_16BF || ct == CUDA_R_32F, "Blas::gemm: the output type must be CUDA_R_16BF or CUDA_R_32F");
  NEXTRON_CHECK(M >= 0 && N >= 0 && K >= 0, "Blas::gemm: negative size M=", M, " N=", N, " K=", K);
  if (M == 0 || N == 0) return;
  NEXTRON_CHECK(ldc >= N, "Blas::gemm: ldc ", ldc, " < N ", N);
  if (K == 0) {  // op(A) op(B) is zero: C = beta C
    if (beta == 1.0f) return;
    NEXTRON_CHECK(beta == 0.0f, "Blas::gemm: K = 0 is supported with beta 0 or 1 only");
    const size_t es = ctype_size(ct);
    NEXTRON_CUDA_CHECK(cudaMemset2DAsync(C, size_t(ldc) * es, 0, size_t(N) * es, size_t(M), stream_));
    return;
  }
  NEXTRON_CHECK(lda >= (trans_a ? M : K) && ldb >= (trans_b ? K : N), "Blas::gemm: row stride too small (lda ", lda,
                ", ldb ", ldb, ")");
  const PlanKey key = {trans_a,      trans_b,      M,           N, K, lda, ldb, ldc, int64_t(ct), beta != 0.0f,
                       alignment(A), alignment(B), alignment(C)};
  const Plan& p = plan(key);
  if (p.fallback) {
    // The column-major product of the cuBLASLt path, C^T (N, M) = op(B)^T op(A)^T: m = N, n = M, k = K, cuBLAS's A
    // is our B (transa = tb, leading dimension ldb), its B is our A (transb = ta, lda). cuBLAS requires
    //   lda' >= max(1, transa ? k : m) = max(1, tb ? K : N)   (our ldb),
    //   ldb' >= max(1, transb ? n : k) = max(1, ta ? M : K)   (our lda),
    //   ldc' >= max(1, m) = max(1, N)                         (our ldc),
    // which are the row-stride checks above, with M, N, K >= 1 here. E.g. the gate's forward y (T, 1) = x (T, IN)
    // w^T has N = 1, tb, ldb = IN = K, ldc = 1 = N; its dw (1, IN) += dy^T x has ta, lda = 1 = M; K = 1 (IN = 1 or
    // the gate's dx) has lda = 1 = K, or tb and ldb = 1 = K. All valid.
    const cublasOperation_t op_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    NEXTRON_CUBLAS_CHECK(cublasGemmEx(gemm_ex_handle_, op_a, op_b, int(N), int(M), int(K), &alpha, B, CUDA_R_16BF,
                                      int(ldb), A, CUDA_R_16BF, int(lda), &beta, C, ct, int(ldc), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    return;
  }
  // cuBLASLt's A is our B and its B is our A; C and D are the same buffer.
  NEXTRON_CUBLAS_CHECK(cublasLtMatmul(handle_, p.desc, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c, &p.algo,
                                      workspace_, workspace_bytes_, stream_));
}

void Blas::linear_forward(bf16* y, const bf16* x, const bf16* w, const float* bias, int64_t N, int64_t IN,
                          int64_t OUT) {
  if (N == 0 || OUT == 0) return;
  gemm(false, true, N, OUT, IN, 1.0f, x, IN, w, IN, 0.0f, y, CUDA_R_16BF, OUT);  // y (N, OUT) = x (N, IN) W^T
  if (bias) add_bias(y, bias, N, OUT, stream_);
}

void Blas::linear_forward(float* y, const bf16* x, const bf16* w, const float* bias, int64_t N, int64_t IN,
                          int64_t OUT) {
  if (N == 0 || OUT == 0) return;
  gemm(false, true, N, OUT, IN, 1.0f, x, IN, w, IN, 0.0f, y, CUDA_R_32F, OUT);
  if (bias) add_bias(y, bias, N, OUT, stream_);
}

void Blas::linear_backward(bf16* dx, float* dw, float* dbias, const bf16* dy, const bf16* x, const bf16* w, int64_t N,
                           int64_t IN, int64_t OUT) {
  if (dx) gemm(false, false, N, IN, OUT, 1.0f, dy, OUT, w, IN, 1.0f, dx, CUDA_R_16BF, IN);  // dx (N, IN) += dy W
  if (dw) gemm(true, false, OUT, IN, N, 1.0f, dy, OUT, x, IN, 1.0f, dw, CUDA_R_32F, IN);    // dw (OUT, IN) += dy^T x
  if (dbias && N > 0 && OUT > 0) {
    column_sum_kernel<<<unsigned(ceil_div(OUT, 32)), dim3(32, 32), 0, stream_>>>(dbias, dy, N, OUT);
    NEXTRON_CUDA_LAUNCH_CHECK();
  }
}

namespace {
void check_offsets(const int64_t* offsets, int64_t E) {
  NEXTRON_CHECK(E >= 0 && offsets != nullptr && offsets[0] == 0, "grouped GEMM: offsets must start at 0");
  for (int64_t e = 0; e < E; ++e)
    NEXTRON_CHECK(offsets[e + 1] >= offsets[e], "grouped GEMM: offsets decrease at expert ", e, " (", offsets[e],
                  " -> ", offsets[e + 1], ")");
}
}  // namespace

void Blas::grouped_forward(bf16* y, const bf16* x, const bf16* w, const int64_t* offsets, int64_t E, int64_t IN,
                           int64_t OUT) {
  check_offsets(offsets, E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    // y_e (rows, OUT) = x_e (rows, IN) W_e^T, W_e = w + e OUT IN.
    gemm(false, true, rows, OUT, IN, 1.0f, x + r0 * IN, IN, w + e * OUT * IN, IN, 0.0f, y + r0 * OUT, CUDA_R_16BF, OUT);
  }
}

void Blas::grouped_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w, const int64_t* offsets,
                            int64_t E, int64_t IN, int64_t OUT) {
  check_offsets(offsets, E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    if (dx)  // dx_e (rows, IN) += dy_e (rows, OUT) W_e
      gemm(false, false, rows, IN, OUT, 1.0f, dy + r0 * OUT, OUT, w + e * OUT * IN, IN, 1.0f, dx + r0 * IN, CUDA_R_16BF,
           IN);
    if (dw)  // dw_e (OUT, IN) += dy_e^T x_e
      gemm(true, false, OUT, IN, rows, 1.0f, dy + r0 * OUT, OUT, x + r0 * IN, IN, 1.0f, dw + e * OUT * IN, CUDA_R_32F,
           IN);
  }
}

}  // namespace nextron::cuda
