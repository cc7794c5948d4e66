// The gated delta rule over a sequence split into consecutive slices (context parallelism: one slice per CP rank),
// made exact by passing the recurrent state between slices instead of the tokens.
//
// Per value head the recurrence (cpu/gated_delta_rule.h) is affine in the state:
//   St = exp(g_t) St-1 - beta_t k_t (k_t^T exp(g_t) St-1) + beta_t k_t v_t^T = A_t St-1 + beta_t k_t v_t^T,
//   A_t = exp(g_t) (I - beta_t k_t k_t^T)                                              (dk x dk)
// so a slice c maps its incoming state S_in to S_out = M_c S_in + L_c, with M_c = A_T ... A_1 (the slice's
// transition) and L_c its final state from a zero start. The transition is the final state of the same recurrence
// with v = 0, dv = dk and the identity as initial state (slice_transition: the existing kernel, no new one).
//
// Forward: every slice computes (M_c, L_c) at once, the pairs are exchanged (all-gather: CP x Hv x dk x (dk + dv)
// floats per sequence, independent of the sequence length), the incoming states follow by a prefix over earlier slices
// (prefix_states: S_in_0 = 0, S_in_{c+1} = M_c S_in_c + L_c), and each slice reruns its chunked forward from S_in_c,
// whose outputs are then exact. A prefix of CP - 1 small matrix products on every rank, rather than a log-depth scan:
// CP is at most a few tens, and the products cost O(CP Hv dk^2 dv), nothing against the slice's O(S Hv dk dv).
//
// Backward: the gradients are linear in the upstream gradients, so a slice's backward from S_in_c with d_o alone gives
// its local dS_in (dL_c); the gradient reaching a slice's final state is the next slice's total dS_in, and
// dS_in_c = dL_c + M_c^T dS_out_c (suffix_final_grads: dS_out_last = 0, dS_out_{c-1} = dS_in_c). Each slice then
// reruns its backward from S_in_c with d_final_state = dS_out_c, which gives exact dq, dk, dv, dg, dbeta (the final
// state's dependence on k, g, beta, through M_c and L_c alike, is inside that backward).
//
// Layouts as cpu/gated_delta_rule.h; per sequence b and value head h, M is (dk, dk) and states are (dk, dv), all
// row-major: M: (B, Hv, dk, dk), states (B, Hv, dk, dv), one block per slice.
#pragma once

#include <cstdint>

#include "kernels/cpu/gated_delta_rule.h"

namespace nextron::cpu {

// m (B, Hv, dk, dk) = the transition of the slice whose k, g, beta are given (s.S tokens; q, v are not read).
template <typename T>
void slice_transition(T* m, const T* k, const T* g, const T* beta, const GdrShape& s, int64_t chunk = 64);

// states_in[c] (B, Hv, dk, dv) for slices c = 0 .. n-1: zero for c = 0, then M_c S_in_c + L_c.
// m[c]: (B, Hv, dk, dk); local_final[c]: (B, Hv, dk, dv), each block `c` of a contiguous array.
template <typename T>
void prefix_states(T* states_in, const T* m, const T* local_final, int64_t n, int64_t B, int64_t Hv, int64_t dk,
                   int64_t dv);

// final_grads[c] (B, Hv, dk, dv): the gradient reaching slice c's final state, from the slices' local dS_in (their
// backward with d_final_state = 0): zero for the last slice, then dS_in_{c+1} = local_in_grads[c+1] +
// M_{c+1}^T final_grads[c+1].
template <typename T>
void suffix_final_grads(T* final_grads, const T* m, const T* local_in_grads, int64_t n, int64_t B, int64_t Hv,
                        int64_t dk, int64_t dv);

}  // namespace nextron::cpu
