// Zero-centred RMSNorm (Qwen3NextRMSNorm): y = x * rstd * (1 + w), rstd = 1 / sqrt(mean(x^2) + eps) per row.
// Used for the input / post-attention / final norms (rows of H) and the per-head q_norm / k_norm (rows of D).
#pragma once

#include <cstdint>

namespace nextron::cpu {

// x: (N, D), w: (D). Overwrites y (N, D) and rstd (N) (saved for the backward). y may equal x (in place).
template <typename T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t N, int64_t D, double eps);

// Accumulates dx (N, D) += dL/dx and dw (D) += dL/dw (each may be nullptr to skip); dy: (N, D); x, w as in the
// forward; rstd: (N) from the forward.
template <typename T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t N, int64_t D);

}  // namespace nextron::cpu
