// Token movement of the expert-parallel MoE dispatcher (CPU reference of kernels/cuda/moe.h's moe_permute family).
// A token's K routed slots sit at rows slot_row[n K + k] of a slot-ordered buffer (R = N K rows of width H):
//
//   permute     rows[r] = x[row_token[r]]                     backward: dx[n] += sum_k drows[slot_row[n K + k]]
//   unpermute   y[n] = sum_k w[n, k] rows[slot_row[n K + k]]  backward: drows[slot_row[n K + k]] = w[n, k] dy[n],
//                                                                       dw[n, k] += dy[n] . rows[slot_row[n K + k]]
//
// Sums run over k in order (y starts at 0), as the fused expert kernel's combine does, so an expert-parallel run that
// returns the same expert outputs gives the same y bit for bit.
#pragma once

#include <cstdint>

namespace nextron::cpu {

template <typename T>
void moe_permute(T* rows, const T* x, const int32_t* row_token, int64_t R, int64_t H);
template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int32_t* slot_row, int64_t N, int64_t K, int64_t H);
// slot_row: int32 (the dispatcher's tables) or int64 (the fused kernel's MoeDispatch::slot_of).
template <typename T, typename Index = int32_t>
void moe_unpermute(T* y, const T* rows, const T* weights, const Index* slot_row, int64_t N, int64_t K, int64_t H);
template <typename T>
void moe_unpermute_backward(T* drows, T* dweights, const T* dy, const T* rows, const T* weights,
                            const int32_t* slot_row, int64_t N, int64_t K, int64_t H);

}  // namespace nextron::cpu
