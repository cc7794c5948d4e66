// L2 normalisation over the last dimension (HF's l2norm for DeltaNet q and k): y = x * rsqrt(sum(x^2) + eps).
#pragma once

#include <cstdint>

namespace nextron::cpu {

// x: (N, D). Overwrites y (N, D); y may equal x (in place).
template <typename T>
void l2norm_forward(T* y, const T* x, int64_t N, int64_t D, double eps = 1e-6);

// Accumulates dx (N, D) += dL/dx given dy (N, D); recomputes the row norms from x (dx must not alias dy or x).
template <typename T>
void l2norm_backward(T* dx, const T* dy, const T* x, int64_t N, int64_t D, double eps = 1e-6);

}  // namespace nextron::cpu
