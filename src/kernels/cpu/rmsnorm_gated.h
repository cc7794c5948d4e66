// Gated RMSNorm (Qwen3NextRMSNormGated, the DeltaNet output norm): y = w * (x * rstd) * silu(z),
// rstd = 1 / sqrt(mean(x^2) + eps) per row. The weight is plain (starts at 1), not zero-centred like rmsnorm.h.
#pragma once

#include <cstdint>

namespace nextron::cpu {

// x, z: (N, D), w: (D). Overwrites y (N, D) and rstd (N) (saved for the backward).
template <typename T>
void rmsnorm_gated_forward(T* y, T* rstd, const T* x, const T* z, const T* w, int64_t N, int64_t D, double eps);

// Accumulates dx (N, D), dz (N, D), dw (D) (each may be nullptr to skip); dy: (N, D); rstd: (N) from the forward.
template <typename T>
void rmsnorm_gated_backward(T* dx, T* dz, T* dw, const T* dy, const T* x, const T* z, const T* w, const T* rstd,
                            int64_t N, int64_t D);

}  // namespace nextron::cpu
