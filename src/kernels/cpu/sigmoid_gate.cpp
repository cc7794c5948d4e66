#include "kernels/cpu/sigmoid_gate.h"

#include <cmath>

#include "core/error.h"

namespace nextron::cpu {

template <typename T>
void sigmoid_gate_forward(T* y, const T* x, const T* gate, int64_t N, int64_t D, int64_t G, int64_t ld_gate) {
  NEXTRON_CHECK(G > 0 && D % G == 0, "sigmoid_gate: width ", D, " must be a multiple of the gate width ", G);
  const int64_t W = D / G, ld = ld_gate < 0 ? G : ld_gate;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < G; ++j) {
      const T sg = T(1) / (T(1) + std::exp(-gate[n * ld + j]));
      for (int64_t c = j * W; c < (j + 1) * W; ++c) y[n * D + c] = x[n * D + c] * sg;
    }
}

template <typename T>
void sigmoid_gate_backward(T* dx, T* dgate, const T* dy, const T* x, const T* gate, int64_t N, int64_t D, int64_t G,
                           int64_t ld_gate) {
  if (!dx && !dgate) return;
  NEXTRON_CHECK(G > 0 && D % G == 0, "sigmoid_gate: width ", D, " must be a multiple of the gate width ", G);
  const int64_t W = D / G, ld = ld_gate < 0 ? G : ld_gate;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < G; ++j) {
      const T sg = T(1) / (T(1) + std::exp(-gate[n * ld + j]));
      double acc = 0;
      for (int64_t c = j * W; c < (j + 1) * W; ++c) {
        if (dx) dx[n * D + c] += dy[n * D + c] * sg;
        acc += double(dy[n * D + c]) * double(x[n * D + c]);
      }
      if (dgate) dgate[n * ld + j] += T(acc) * sg * (T(1) - sg);
    }
}

template void sigmoid_gate_forward<float>(float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t);
template void sigmoid_gate_forward<double>(double*, const double*, const double*, int64_t, int64_t, int64_t, int64_t);
template void sigmoid_gate_backward<float>(float*, float*, const float*, const float*, const float*, int64_t, int64_t,
                                           int64_t, int64_t);
template void sigmoid_gate_backward<double>(double*, double*, const double*, const double*, const double*, int64_t,
                                            int64_t, int64_t, int64_t);

}  // namespace nextron::cpu
