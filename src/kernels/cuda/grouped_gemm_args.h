// The per-expert arguments of a grouped (pointer-array) GEMM, built on the device from the device expert offsets
// (kernels/cuda/grouped_gemm.h runs the GEMM; this header and grouped_gemm_args.cu hold no CUTLASS, so the builder
// runs on the block emulator, tools/cuda_emu).
//
// Rows of the expert-ordered activations are sorted by expert: expert e owns rows [offsets[e], offsets[e + 1]) (the
// (E + 1) int64 of moe_dispatch_build, in device memory). Group e of a grouped GEMM is the product of expert e:
// each operand X of the group (A, B, C, D) starts at
//     ptr_X[e] = base_X + elem_bytes_X (offsets[e] row_step_X + e expert_step_X)
// (row_step: elements per activation row of an operand that is a row block of the expert-ordered activations;
// expert_step: elements per expert of an operand that is one matrix of an (E, ., .) stack of expert weights), with
// the same leading dimension ld_X for every group, and the group's problem (m, n, k) takes the expert's row count
// rows_e = offsets[e + 1] - offsets[e] for each extent given as kRows. An expert with no rows gets the empty problem
// (0, 0, k): the GEMM schedules no tile for it, so nothing is read or written for it (a weight gradient C = D with
// beta = 1 stays untouched without relying on k = 0).
#pragma once

#include <cstdint>

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// A problem extent that is the expert's row count.
inline constexpr int64_t kGroupRows = -1;

// One operand of the grouped GEMM (see the top of the file). base == nullptr: the operand is absent (C of a GEMM
// that overwrites), every ptr is nullptr.
struct GroupedOperand {
  const void* base = nullptr;
  int64_t elem_bytes = 2;
  int64_t row_step = 0;
  int64_t expert_step = 0;
  int64_t ld = 0;
};

struct GroupedGemmSpec {
  int64_t m = 0, n = 0, k = 0;  // each > 0 or kGroupRows
  GroupedOperand a, b, c, d;
};

// One group's problem extents, laid out as CUTLASS's cute::Shape<int, int, int> (checked in grouped_gemm.cu).
struct GroupedProblem {
  int32_t m, n, k;
};

// The per-group argument arrays (device memory, E entries each). The strides are the single run-time stride of each
// operand's CUTLASS stride type (the leading dimension; the other modes are static), laid out as one int64.
struct GroupedGemmArrays {
  GroupedProblem* problems = nullptr;
  const void** ptr_a = nullptr;
  const void** ptr_b = nullptr;
  const void** ptr_c = nullptr;
  void** ptr_d = nullptr;
  int64_t* ld_a = nullptr;
  int64_t* ld_b = nullptr;
  int64_t* ld_c = nullptr;
  int64_t* ld_d = nullptr;
};

// Bytes of the argument arrays of E groups, and their carving out of a device buffer of at least that many bytes
// (256-byte aligned; each array starts 16-byte aligned).
int64_t grouped_gemm_args_bytes(int64_t E);
GroupedGemmArrays grouped_gemm_args_carve(void* buffer, int64_t E);

// Writes the E groups' arguments from the device offsets (E + 1 int64), one thread per group. Nothing is read back
// to the host.
void grouped_gemm_build_args(const GroupedGemmArrays& out, const GroupedGemmSpec& spec, const int64_t* offsets,
                             int64_t E, cudaStream_t stream);

// CPU reference of the same (host arrays of E entries; offsets on the host).
void grouped_gemm_build_args_reference(GroupedProblem* problems, const void** ptr_a, const void** ptr_b,
                                       const void** ptr_c, void** ptr_d, int64_t* ld_a, int64_t* ld_b, int64_t* ld_c,
                                       int64_t* ld_d, const GroupedGemmSpec& spec, const int64_t* offsets, int64_t E);

// The specs of the MoE experts' three products, W (E, OUT, IN) row-major, rows sorted by expert:
//   forward  y_e (rows_e, OUT) = x_e (rows_e, IN) W_e^T            (bf16 y overwritten)
//   dx       dx_e (rows_e, IN) = dy_e (rows_e, OUT) W_e            (bf16 dx overwritten)
//   dw       dw_e (OUT, IN)   += dy_e^T (OUT, rows_e) x_e          (fp32 dw: C = D, beta = 1)
// (the layouts in CUTLASS's terms are derived at the top of grouped_gemm.cu).
GroupedGemmSpec grouped_forward_spec(bf16* y, const bf16* x, const bf16* w, int64_t IN, int64_t OUT);
GroupedGemmSpec grouped_dx_spec(bf16* dx, const bf16* dy, const bf16* w, int64_t IN, int64_t OUT);
GroupedGemmSpec grouped_dw_spec(float* dw, const bf16* dy, const bf16* x, int64_t IN, int64_t OUT);

}  // namespace nextron::cuda
