// Causal softmax attention with grouped-query heads (the core of Qwen3NextAttention, between RoPE and the output
// gate): query head h reads kv head h / (NH / NKV) (HF's repeat_kv) without materialising repeated k / v.
//   o_i = sum_{j <= i} softmax_j(scale * q_i . k_j) v_j
//
// Work is tiled in blocks of `block` rows so the score buffers stay O(block * S) per thread; all products are gemm
// calls on the head-strided rows (leading dimensions NH * D and NKV * D), inside OpenMP loops over independent tiles.
#pragma once

#include <cstdint>

namespace nextron::cpu {

// q: (B, S, NH, D), k, v: (B, S, NKV, D), NH % NKV == 0; scale: the score scale (D^-0.5 in the model).
// Overwrites o (B, S, NH, D) and lse (B, NH, S): the log-sum-exp of each row of scaled scores, saved for the backward.
template <typename T>
void attention_forward(T* o, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t S, int64_t NH, int64_t NKV,
                       int64_t D, double scale, int64_t block = 64);

// Accumulates dq (B, S, NH, D), dk, dv (B, S, NKV, D) (each may be nullptr to skip) from d_o (B, S, NH, D),
// recomputing the probabilities from q, k and lse; o and lse are the forward's outputs. dk / dv are computed per
// (b, kv head, key block), looping over the query heads of the group, so the GQA accumulation is race-free and
// deterministic; dq is a second pass per (b, query head, query block).
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* d_o, const T* q, const T* k, const T* v, const T* o, const T* lse,
                        int64_t B, int64_t S, int64_t NH, int64_t NKV, int64_t D, double scale, int64_t block = 64);

// The same with Sq queries that are the last Sq of Sk positions (Sq <= Sk; bottom-right causal: query i, at position
// Sk - Sq + i, sees keys 0 .. Sk - Sq + i): a context-parallel slice's queries against the keys gathered up to its
// end. q, o: (B, Sq, NH, D), k, v, dk, dv: (B, Sk, NKV, D), lse: (B, NH, Sq). Sq == Sk is the functions above.
template <typename T>
void causal_attention_forward(T* o, T* lse, const T* q, const T* k, const T* v, int64_t B, int64_t Sq, int64_t Sk,
                              int64_t NH, int64_t NKV, int64_t D, double scale, int64_t block = 64);
template <typename T>
void causal_attention_backward(T* dq, T* dk, T* dv, const T* d_o, const T* q, const T* k, const T* v, const T* o,
                               const T* lse, int64_t B, int64_t Sq, int64_t Sk, int64_t NH, int64_t NKV, int64_t D,
                               double scale, int64_t block = 64);

}  // namespace nextron::cpu
