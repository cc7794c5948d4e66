// The MoE experts' grouped GEMMs on the device: one CUTLASS sm90 pointer-array grouped GEMM launch per product,
// its per-expert problems, pointers and strides built on the device from the device expert offsets
// (grouped_gemm_args.h), so neither a per-expert launch loop nor a host read of the offsets is needed.
// grouped_gemm.cu derives the layouts. W (E, OUT, IN) row-major; rows sorted by expert, expert e owning rows
// [offsets[e], offsets[e + 1]) (device int64, E + 1 entries, offsets[0] = 0, offsets[E] = the row count).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// Whether the current device runs the CUTLASS kernels (compiled for sm_90a only: compute capability 9.0).
bool grouped_gemm_device_supported();

// Whether the CUTLASS path takes these products: TMA needs 16-byte aligned rows and starts, so IN and OUT must be
// multiples of 8 (bf16; the fp32 weight gradient then has rows of 32-byte multiples) and every base pointer given
// (nullptr ones are skipped) 16-byte aligned. Expert blocks (x + offsets[e] IN, w + e OUT IN) are then aligned too.
bool grouped_gemm_shapes_supported(int64_t IN, int64_t OUT, std::initializer_list<const void*> pointers);

// Device bytes of the workspace the calls below need for E experts on the current device (the per-group argument
// arrays and CUTLASS's own workspace: per-SM TMA descriptors). One buffer serves every call on one stream.
int64_t grouped_gemm_workspace_bytes(int64_t E);

// y_e (rows_e, OUT) = x_e (rows_e, IN) W_e^T for every expert; y (bf16) overwritten (every row belongs to an expert).
void grouped_gemm_forward(bf16* y, const bf16* x, const bf16* w, const int64_t* offsets, int64_t E, int64_t IN,
                          int64_t OUT, void* workspace, int64_t workspace_bytes, cudaStream_t stream);

// dx_e (rows_e, IN) = dy_e (rows_e, OUT) W_e (bf16, OVERWRITTEN, unlike Blas::grouped_backward) and
// dw_e (OUT, IN) += dy_e^T x_e (fp32, accumulated; an expert without rows leaves its dw_e untouched). Either
// output may be nullptr.
void grouped_gemm_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w, const int64_t* offsets,
                           int64_t E, int64_t IN, int64_t OUT, void* workspace, int64_t workspace_bytes,
                           cudaStream_t stream);

// Host-only check (no GPU needed) that the plain argument layouts of grouped_gemm_args.h are what the CUTLASS
// instantiations read: GroupedProblem vs cute::Shape<int, int, int>, each int64 leading dimension vs the operand's
// CUTLASS stride type. Returns an empty string when they match, else what differs.
const char* grouped_gemm_layout_mismatch();

}  // namespace nextron::cuda
