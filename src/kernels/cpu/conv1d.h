// Depthwise causal conv1d followed by SiLU, as HF's causal_conv1d_fn(activation="silu", bias=None) on the DeltaNet
// q/k/v channels: each channel c is convolved with its own KC taps over the sequence, zero left padding:
//   out[b, s, c] = silu(sum_{j < KC} w[c, j] * x[b, s - (KC - 1) + j, c])   (x at negative positions is 0).
#pragma once

#include <cstdint>

namespace nextron::cpu {

// x: (B, S, C), w: (C, KC) (HF conv1d.weight (C, 1, KC) without the middle axis). Overwrites y (B, S, C).
// Nothing is saved: the backward recomputes the pre-activation.
template <typename T>
void conv1d_forward(T* y, const T* x, const T* w, int64_t B, int64_t S, int64_t C, int64_t KC);

// Accumulates dx (B, S, C) and dw (C, KC) (each may be nullptr to skip) from dy (B, S, C).
template <typename T>
void conv1d_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, int64_t B, int64_t S, int64_t C, int64_t KC);

}  // namespace nextron::cpu
