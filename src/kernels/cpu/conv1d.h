// Depthwise causal conv1d followed by SiLU, as HF's causal_conv1d_fn(activation="silu", bias=None) on the DeltaNet
// q/k/v channels: each channel c is convolved with its own KC taps over the sequence, zero left padding:
//   out[b, s, c] = silu(sum_{j < KC} w[c, j] * x[b, s - (KC - 1) + j, c])   (x at negative positions is 0).
#pragma once

#include <cstdint>

namespace nextron::cpu {

// The output's layout (and its gradient's): split at channels c1 <= c2 <= C, three row-major channel blocks one after
// another, (B S, c1), (B S, c2 - c1), (B S, C - c2) (the DeltaNet's q, k and v, each then a contiguous tensor);
// c1 = c2 = C is the plain (B, S, C). Element (row r, channel c) of N rows is at:
inline int64_t conv_out_index(int64_t r, int64_t c, int64_t N, int64_t C, int64_t c1, int64_t c2) {
  if (c < c1) return r * c1 + c;
  if (c < c2) return N * c1 + r * (c2 - c1) + (c - c1);
  return N * c2 + r * (C - c2) + (c - c2);
}

// x: (B, S, C), w: (C, KC) (HF conv1d.weight (C, 1, KC) without the middle axis). Overwrites y (B S C elements laid
// out as conv_out_index says). Nothing is saved: the backward recomputes the pre-activation.
template <typename T>
void conv1d_forward(T* y, const T* x, const T* w, int64_t B, int64_t S, int64_t C, int64_t KC, int64_t c1, int64_t c2);

// Accumulates dx (B, S, C) and dw (C, KC) (each may be nullptr to skip) from dy (laid out as y).
template <typename T>
void conv1d_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, int64_t B, int64_t S, int64_t C, int64_t KC,
                     int64_t c1, int64_t c2);

}  // namespace nextron::cpu
