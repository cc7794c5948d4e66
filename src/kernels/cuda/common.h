// Conventions shared by the CUDA kernels (src/kernels/cuda), usable from host C++ (g++) and from .cu files.
//
// Dtypes: activations and their gradients are bf16 (`bf16` below); per-row statistics saved for a backward
// (rstd, lse), DeltaNet gates (g, beta), router probabilities and weights, and recurrent states are fp32. Parameters
// are read from the fp32 master buffer (`const float* w`), except GEMM operands, which read the bf16 shadow of the
// master buffer; parameter gradients are fp32 and accumulate (+=). Every reduction accumulates in fp32.
//
// Semantics mirror the CPU kernels of the same name (src/kernels/cpu): a backward accumulates (+=) into every
// gradient it is given (nullptr skips it); bf16 gradients accumulate as x = bf16(float(x) + delta). Where a
// function differs (e.g. attention's backward overwrites), its header says so.
//
// Every function enqueues work on `stream` and returns without synchronising, unless its header says otherwise;
// launch errors are checked (NEXTRON_CUDA_CHECK(cudaGetLastError())) and thrown as nextron::Error.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nextron::cuda {

using bf16 = __nv_bfloat16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace nextron::cuda
