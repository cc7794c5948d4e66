#include "kernels/cpu/swiglu.h"

#include <cmath>

namespace nextron::cpu {

template <typename T>
void swiglu_forward(T* h, const T* gu, int64_t N, int64_t I) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* g = gu + n * 2 * I;
    const T* u = g + I;
    for (int64_t i = 0; i < I; ++i) h[n * I + i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
  }
}

template <typename T>
void swiglu_backward(T* dgu, const T* dh, const T* gu, int64_t N, int64_t I) {
  if (!dgu) return;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* g = gu + n * 2 * I;
    const T* u = g + I;
    T* dg = dgu + n * 2 * I;
    T* du = dg + I;
    for (int64_t i = 0; i < I; ++i) {
      const T sg = T(1) / (T(1) + std::exp(-g[i]));
      const T d = dh[n * I + i];
      // silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))).
      dg[i] += d * u[i] * sg * (T(1) + g[i] * (T(1) - sg));
      du[i] += d * g[i] * sg;
    }
  }
}

template void swiglu_forward<float>(float*, const float*, int64_t, int64_t);
template void swiglu_forward<double>(double*, const double*, int64_t, int64_t);
template void swiglu_backward<float>(float*, const float*, const float*, int64_t, int64_t);
template void swiglu_backward<double>(double*, const double*, const double*, int64_t, int64_t);

}  // namespace nextron::cpu
