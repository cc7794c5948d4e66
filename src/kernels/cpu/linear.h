// Linear layer y = x W^T (+ b), weights stored (out_features, in_features) as in HF.
#pragma once

#include <cstdint>

namespace nextron::cpu {

// x: (N, IN), w: (OUT, IN), b: (OUT) or nullptr, y: (N, OUT) overwritten.
template <typename T>
void linear_forward(T* y, const T* x, const T* w, const T* b, int64_t N, int64_t IN, int64_t OUT);

// Accumulates: dx += dy W, dw += dy^T x, db += sum_rows dy (each may be nullptr to skip).
template <typename T>
void linear_backward(T* dx, T* dw, T* db, const T* dy, const T* x, const T* w, int64_t N, int64_t IN, int64_t OUT);

}  // namespace nextron::cpu
