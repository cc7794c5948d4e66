// Sigmoid gating y = x * sigmoid(gate): the attention output gate (G = D, one gate per channel) and the MoE
// shared-expert gate (G = 1, one gate per token).
#pragma once

#include <cstdint>

namespace nextron::cpu {

// x: (N, D), gate: (N, G) with D % G == 0; gate column j scales the D / G consecutive x columns
// [j * D / G, (j + 1) * D / G). ld_gate: row stride of gate (and dgate) in elements, -1 = G (dense); a larger
// stride reads the gate in place from a wider tensor (the attention gate inside q_proj's output).
// Overwrites y (N, D); y may equal x (in place).
template <typename T>
void sigmoid_gate_forward(T* y, const T* x, const T* gate, int64_t N, int64_t D, int64_t G, int64_t ld_gate = -1);

// Accumulates dx (N, D) and dgate (N, G) (each may be nullptr to skip) from dy (N, D).
template <typename T>
void sigmoid_gate_backward(T* dx, T* dgate, const T* dy, const T* x, const T* gate, int64_t N, int64_t D, int64_t G,
                           int64_t ld_gate = -1);

}  // namespace nextron::cpu
