// The per-expert arguments of the grouped GEMM from the device expert offsets (kernels/cuda/grouped_gemm_args.h
// says what each entry is). One thread per expert: thread e reads offsets[e] and offsets[e + 1] and writes group e's
// problem, four pointers and four leading dimensions. Integer work only, no host round trip: the GEMM that follows
// on the same stream reads the arrays on the device (CUTLASS's grouped kernel takes device problem shapes).
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/grouped_gemm_args.h"

namespace nextron::cuda {

namespace {

constexpr int64_t kArrayAlign = 16;

int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Byte offsets of the nine arrays in the buffer: problems (12 bytes each), then 4 pointer and 4 int64 arrays.
struct ArgsLayout {
  int64_t problems, ptr[4], ld[4], total;
};

ArgsLayout args_layout(int64_t E) {
  ArgsLayout l{};
  int64_t at = 0;
  l.problems = at;
  at = round_up(at + E * int64_t(sizeof(GroupedProblem)), kArrayAlign);
  for (int64_t& p : l.ptr) {
    p = at;
    at = round_up(at + E * int64_t(sizeof(void*)), kArrayAlign);
  }
  for (int64_t& p : l.ld) {
    p = at;
    at = round_up(at + E * int64_t(sizeof(int64_t)), kArrayAlign);
  }
  l.total = std::max<int64_t>(at, kArrayAlign);
  return l;
}

// One operand's start for expert e (see the header): base + elem_bytes (r0 row_step + e expert_step).
__host__ __device__ inline const void* operand_ptr(const GroupedOperand& o, int64_t r0, int64_t e) {
  if (o.base == nullptr) return nullptr;
  return static_cast<const char*>(o.base) + o.elem_bytes * (r0 * o.row_step + e * o.expert_step);
}

__host__ __device__ inline int32_t extent(int64_t v, int64_t rows) { return int32_t(v == kGroupRows ? rows : v); }

// Group e's problem: the spec's extents with kGroupRows replaced by the expert's rows; an expert without rows gets
// (0, 0, k), so the GEMM schedules no tile for it.
__host__ __device__ inline GroupedProblem group_problem(const GroupedGemmSpec& s, int64_t rows) {
  if (rows == 0) return GroupedProblem{0, 0, extent(s.k, rows)};
  return GroupedProblem{extent(s.m, rows), extent(s.n, rows), extent(s.k, rows)};
}

__global__ void build_args_kernel(GroupedGemmArrays out, GroupedGemmSpec spec, const int64_t* offsets, int64_t E) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
  out.problems[e] = group_problem(spec, rows);
  out.ptr_a[e] = operand_ptr(spec.a, r0, e);
  out.ptr_b[e] = operand_ptr(spec.b, r0, e);
  out.ptr_c[e] = operand_ptr(spec.c, r0, e);
  out.ptr_d[e] = const_cast<void*>(operand_ptr(spec.d, r0, e));
  out.ld_a[e] = spec.a.ld;
  out.ld_b[e] = spec.b.ld;
  out.ld_c[e] = spec.c.ld;
  out.ld_d[e] = spec.d.ld;
}

GroupedOperand operand(const void* base, int64_t elem_bytes, int64_t row_step, int64_t expert_step, int64_t ld) {
  GroupedOperand o;
  o.base = base;
  o.elem_bytes = elem_bytes;
  o.row_step = row_step;
  o.expert_step = expert_step;
  o.ld = ld;
  return o;
}

}  // namespace

int64_t grouped_gemm_args_bytes(int64_t E) { return args_layout(E).total; }

GroupedGemmArrays grouped_gemm_args_carve(void* buffer, int64_t E) {
  const ArgsLayout l = args_layout(E);
  char* b = static_cast<char*>(buffer);
  GroupedGemmArrays a;
  a.problems = reinterpret_cast<GroupedProblem*>(b + l.problems);
  a.ptr_a = reinterpret_cast<const void**>(b + l.ptr[0]);
  a.ptr_b = reinterpret_cast<const void**>(b + l.ptr[1]);
  a.ptr_c = reinterpret_cast<const void**>(b + l.ptr[2]);
  a.ptr_d = reinterpret_cast<void**>(b + l.ptr[3]);
  a.ld_a = reinterpret_cast<int64_t*>(b + l.ld[0]);
  a.ld_b = reinterpret_cast<int64_t*>(b + l.ld[1]);
  a.ld_c = reinterpret_cast<int64_t*>(b + l.ld[2]);
  a.ld_d = reinterpret_cast<int64_t*>(b + l.ld[3]);
  return a;
}

void grouped_gemm_build_args(const GroupedGemmArrays& out, const GroupedGemmSpec& spec, const int64_t* offsets,
                             int64_t E, cudaStream_t stream) {
  NEXTRON_CHECK(E >= 0 && E < (int64_t(1) << 31), "grouped GEMM: bad expert count ", E);
  if (E == 0) return;
  constexpr int kThreads = 128;
  build_args_kernel<<<unsigned(ceil_div(E, kThreads)), kThreads, 0, stream>>>(out, spec, offsets, E);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void grouped_gemm_build_args_reference(GroupedProblem* problems, const void** ptr_a, const void** ptr_b,
                                       const void** ptr_c, void** ptr_d, int64_t* ld_a, int64_t* ld_b, int64_t* ld_c,
                                       int64_t* ld_d, const GroupedGemmSpec& spec, const int64_t* offsets, int64_t E) {
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
    problems[e] = group_problem(spec, rows);
    ptr_a[e] = operand_ptr(spec.a, r0, e);
    ptr_b[e] = operand_ptr(spec.b, r0, e);
    ptr_c[e] = operand_ptr(spec.c, r0, e);
    ptr_d[e] = const_cast<void*>(operand_ptr(spec.d, r0, e));
    ld_a[e] = spec.a.ld;
    ld_b[e] = spec.b.ld;
    ld_c[e] = spec.c.ld;
    ld_d[e] = spec.d.ld;
  }
}

// The three MoE products in the terms of grouped_gemm.cu's derivation (CUTLASS's D (M, N) = A (M, K) B (N, K)^T
// with each operand's leading dimension):
//   forward: M = rows_e, N = OUT, K = IN; A = x_e (row r0, ld IN), B = W_e (expert e, ld IN), D = y_e (ld OUT).
//   dx:      M = rows_e, N = IN, K = OUT; A = dy_e (ld OUT), B = W_e (ld IN), D = dx_e (ld IN).
//   dw:      M = OUT, N = IN, K = rows_e; A = dy_e (ld OUT), B = x_e (ld IN), C = D = dw_e (fp32, expert e, ld IN).
GroupedGemmSpec grouped_forward_spec(bf16* y, const bf16* x, const bf16* w, int64_t IN, int64_t OUT) {
  GroupedGemmSpec s;
  s.m = kGroupRows;
  s.n = OUT;
  s.k = IN;
  s.a = operand(x, 2, IN, 0, IN);
  s.b = operand(w, 2, 0, OUT * IN, IN);
  s.d = operand(y, 2, OUT, 0, OUT);
  return s;
}

GroupedGemmSpec grouped_dx_spec(bf16* dx, const bf16* dy, const bf16* w, int64_t IN, int64_t OUT) {
  GroupedGemmSpec s;
  s.m = kGroupRows;
  s.n = IN;
  s.k = OUT;
  s.a = operand(dy, 2, OUT, 0, OUT);
  s.b = operand(w, 2, 0, OUT * IN, IN);
  s.d = operand(dx, 2, IN, 0, IN);
  return s;
}

GroupedGemmSpec grouped_dw_spec(float* dw, const bf16* dy, const bf16* x, int64_t IN, int64_t OUT) {
  GroupedGemmSpec s;
  s.m = OUT;
  s.n = IN;
  s.k = kGroupRows;
  s.a = operand(dy, 2, OUT, 0, OUT);
  s.b = operand(x, 2, IN, 0, IN);
  s.c = operand(dw, 4, 0, OUT * IN, IN);
  s.d = s.c;
  return s;
}

}  // namespace nextron::cuda
