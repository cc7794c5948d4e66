// Partial rotary position embedding (Qwen3NextRotaryEmbedding + apply_rotary_pos_emb), rotate-half convention.
// Only the first rotary_dim dims of each head rotate (rotary_dim = D * partial_rotary_factor, even); the remaining
// D - rotary_dim dims pass through. With half = rotary_dim / 2, for i < half:
//   y[i]        = x[i] cos[i] - x[i + half] sin[i]
//   y[i + half] = x[i + half] cos[i + half] + x[i] sin[i + half]
#pragma once

#include <cstdint>

namespace nextron::cpu {

// Overwrites cos, sin: (S, rotary_dim) for positions position_offset + s, s < S, computed exactly as transformers
// does in float32: inv_freq[i] = 1 / theta^(float(2i) / rotary_dim), freqs = float(position) * inv_freq,
// emb = cat(freqs, freqs), then cos / sin of the float32 value (converted to T afterwards).
template <typename T>
void rope_tables(T* cos, T* sin, int64_t S, int64_t rotary_dim, double theta, int64_t position_offset = 0);

// x: (B, S, NH, D) (NH = the number of heads of x: query or kv heads), cos, sin: (S, rotary_dim) from rope_tables.
// Overwrites y (B, S, NH, D); y may equal x (in place).
template <typename T>
void rope_forward(T* y, const T* x, const T* cos, const T* sin, int64_t B, int64_t S, int64_t NH, int64_t D,
                  int64_t rotary_dim);

// Accumulates dx (B, S, NH, D) += R^T dy (the inverse rotation; pass-through dims add dy). dx must not alias dy.
template <typename T>
void rope_backward(T* dx, const T* dy, const T* cos, const T* sin, int64_t B, int64_t S, int64_t NH, int64_t D,
                   int64_t rotary_dim);

}  // namespace nextron::cpu
