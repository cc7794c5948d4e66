// SwiGLU activation on a packed gate/up projection (the dense MLP and shared expert's gate_up_proj):
// h = silu(gate) * up.
#pragma once

#include <cstdint>

namespace nextron::cpu {

// gu: (N, 2I), each row [gate (I) | up (I)]. Overwrites h (N, I).
template <typename T>
void swiglu_forward(T* h, const T* gu, int64_t N, int64_t I);

// Accumulates dgu (N, 2I) (both halves) from dh (N, I).
template <typename T>
void swiglu_backward(T* dgu, const T* dh, const T* gu, int64_t N, int64_t I);

}  // namespace nextron::cpu
