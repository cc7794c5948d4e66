// Gated DeltaNet gates (Qwen3NextGatedDeltaNet.forward): beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias),
// with torch's softplus (log1p(exp(x)), or x itself above the threshold 20). g is the log-decay (<= 0).
#pragma once

#include <cstdint>

namespace nextron::cpu {

// b, a: (N, Hv), A_log, dt_bias: (Hv). Overwrites beta (N, Hv) and g (N, Hv).
template <typename T>
void gdn_gates_forward(T* beta, T* g, const T* b, const T* a, const T* A_log, const T* dt_bias, int64_t N, int64_t Hv);

// Accumulates db, da (N, Hv), dA_log, ddt_bias (Hv) (each may be nullptr to skip) from dbeta, dg (N, Hv; nullptr
// means a zero gradient).
template <typename T>
void gdn_gates_backward(T* db, T* da, T* dA_log, T* ddt_bias, const T* dbeta, const T* dg, const T* b, const T* a,
                        const T* A_log, const T* dt_bias, int64_t N, int64_t Hv);

}  // namespace nextron::cpu
