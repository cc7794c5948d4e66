// Gated delta rule (the recurrence inside Qwen3-Next's Gated DeltaNet), per-token recurrent and chunked forms.
//
// Layouts (row-major, token-major), for B sequences of S tokens:
//   q, k: (B, S, Hk, dk)   v: (B, S, Hv, dv)   g, beta: (B, S, Hv)   o: (B, S, Hv, dv)
//   initial_state / final_state: (B, Hv, dk, dv).
// Value head j reads key head j / (Hv / Hk) (HF's repeat_interleave) without materialising repeated q/k.
// q and k arrive already L2-normalised; q is multiplied by `scale` inside (the model passes dk^-0.5).
// Per value head, with state St (dk x dv), St_0 = initial_state (zero when nullptr), for t = 0..S-1:
//   St = St * exp(g_t);  u = beta_t * (v_t - St^T k_t);  St = St + k_t u^T;  o_t = St^T (scale * q_t)
// final_state = St_S. g is the log-decay and must be <= 0 (exp is only ever taken of non-positive sums of g).
//
// Forward overwrites o and final_state (final_state may be nullptr to skip it).
// Backward accumulates (+=) into dq, dk, dv, dg, dbeta, d_initial_state (each may be nullptr to skip); d_o is
// required, d_final_state == nullptr means a zero gradient for the final state.
//
// chunk_states (B, Hv, NC, dk, dv), NC = ceil(S / chunk): the state entering every chunk. The chunked forward writes
// it when given; the chunked backward reads it when given (it must come from the forward of the same inputs and
// initial state) and otherwise recomputes it in a forward sweep. The sweep runs the forward's own chunk functions, so
// both ways give the same bits.
//
// The chunked form is the production path and agrees with the recurrent one to rounding; the recurrent form is the
// reference. Threads: the forwards run one OpenMP task per (b, value head); the backwards run one task per
// (b, key head) that handles its Hv/Hk value heads in order, so dq/dk accumulation is race-free and deterministic.
#pragma once

#include <cstdint>

namespace nextron::cpu {

struct GdrShape {
  int64_t B, S, Hk, Hv, dk, dv;
};

template <typename T>
void gated_delta_rule_recurrent_forward(T* o, T* final_state, const T* q, const T* k, const T* v, const T* g,
                                        const T* beta, const T* initial_state, const GdrShape& s, T scale);

template <typename T>
void gated_delta_rule_recurrent_backward(T* dq, T* dk, T* dv, T* dg, T* dbeta, T* d_initial_state, const T* d_o,
                                         const T* d_final_state, const T* q, const T* k, const T* v, const T* g,
                                         const T* beta, const T* initial_state, const GdrShape& s, T scale);

// Chunked ("UT transform") form with chunks of `chunk` tokens; the last chunk may be partial (S need not be a
// multiple of chunk).
template <typename T>
void gated_delta_rule_chunked_forward(T* o, T* final_state, const T* q, const T* k, const T* v, const T* g,
                                      const T* beta, const T* initial_state, const GdrShape& s, T scale,
                                      int64_t chunk = 64, T* chunk_states = nullptr);

template <typename T>
void gated_delta_rule_chunked_backward(T* dq, T* dk, T* dv, T* dg, T* dbeta, T* d_initial_state, const T* d_o,
                                       const T* d_final_state, const T* q, const T* k, const T* v, const T* g,
                                       const T* beta, const T* initial_state, const GdrShape& s, T scale,
                                       int64_t chunk = 64, const T* chunk_states = nullptr);

// Elements of chunk_states for a shape and chunk length.
int64_t gated_delta_rule_chunk_states_elements(const GdrShape& s, int64_t chunk = 64);

}  // namespace nextron::cpu
