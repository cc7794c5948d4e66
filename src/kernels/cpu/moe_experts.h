// Routed SwiGLU experts (Qwen3NextExperts), computed grouped by expert: the N*K (token, k) slots are sorted by
// expert so each expert runs two gemms over a contiguous block of its tokens instead of a loop over tokens.
#pragma once

#include <cstdint>
#include <vector>

namespace nextron::cpu {

// The (token, k) slots of a routing decision sorted by expert (stable counting sort). Slot s in
// [expert_offsets[e], expert_offsets[e+1]) goes to expert e; within an expert, slots are in increasing token order.
struct MoeDispatch {
  int64_t N = 0, K = 0, E = 0;
  std::vector<int64_t> expert_offsets;  // (E+1)
  std::vector<int64_t> slot_token;      // (N*K) token of each sorted slot
  std::vector<int32_t> slot_k;          // (N*K) which of the token's top-k choices it is
  std::vector<int64_t> slot_of;         // (N*K) inverse: sorted position of (n, k) at n*K + k
  std::vector<int32_t> active;          // experts with at least one slot, most slots first (work order)
};

// indices: (N, K) expert ids from the router. Throws nextron::Error for an id outside [0, E).
void moe_dispatch_build(MoeDispatch& dispatch, const int32_t* indices, int64_t N, int64_t K, int64_t E);

// Activations of the forward, rows in sorted-slot order; owned by the caller and reused across steps (the forward
// resizes the buffers). The backward reuses these buffers as scratch, so one forward allows one backward.
template <typename T>
struct MoeExpertsCache {
  std::vector<T> x;        // (N*K, H) gathered expert inputs
  std::vector<T> gate_up;  // (N*K, 2I) [gate | up] projections
  std::vector<T> act;      // (N*K, I) silu(gate) * up
  std::vector<T> out;      // (N*K, H) down projections, before the routing weight
};

// Recomputes cache.act (N K, I) from cache.gate_up, exactly as the forward computed it (for a backward whose
// forward did not keep it).
template <typename T>
void moe_experts_recompute_act(MoeExpertsCache<T>& cache, int64_t I);

// x: (N, H), weights: (N, K) routing weights (aligned with the indices the dispatch was built from),
// w_gate_up: (E, 2I, H) with rows [0, I) of each expert = gate_proj and [I, 2I) = up_proj, w_down: (E, H, I).
// y (N, H) overwritten: y[n] = sum_k weights[n,k] * down_e(silu(gate_e x[n]) * up_e x[n]), e = indices[n,k].
template <typename T>
void moe_experts_forward(T* y, MoeExpertsCache<T>& cache, const MoeDispatch& dispatch, const T* x, const T* weights,
                         const T* w_gate_up, const T* w_down, int64_t N, int64_t H, int64_t I, int64_t E, int64_t K);

// Accumulates dx (N, H), dweights (N, K), dw_gate_up (E, 2I, H), dw_down (E, H, I) (each may be nullptr) from
// dy (N, H). cache: filled by the forward with the same dispatch and inputs; consumed (overwritten) here.
template <typename T>
void moe_experts_backward(T* dx, T* dweights, T* dw_gate_up, T* dw_down, MoeExpertsCache<T>& cache,
                          const MoeDispatch& dispatch, const T* dy, const T* weights, const T* w_gate_up,
                          const T* w_down, int64_t N, int64_t H, int64_t I, int64_t E, int64_t K);

}  // namespace nextron::cpu
