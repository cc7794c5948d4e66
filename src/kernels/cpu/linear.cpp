#include "kernels/cpu/linear.h"

#include "kernels/cpu/blas.h"

namespace nextron::cpu {

template <typename T>
void linear_forward(T* y, const T* x, const T* w, const T* b, int64_t N, int64_t IN, int64_t OUT) {
  if (b) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; ++n)
      for (int64_t o = 0; o < OUT; ++o) y[n * OUT + o] = b[o];
  }
  gemm<T>(false, true, N, OUT, IN, T(1), x, w, b ? T(1) : T(0), y);
}

template <typename T>
void linear_backward(T* dx, T* dw, T* db, const T* dy, const T* x, const T* w, int64_t N, int64_t IN, int64_t OUT) {
  if (dx) gemm<T>(false, false, N, IN, OUT, T(1), dy, w, T(1), dx);
  if (dw) gemm<T>(true, false, OUT, IN, N, T(1), dy, x, T(1), dw);
  if (db) {
#pragma omp parallel for
    for (int64_t o = 0; o < OUT; ++o) {
      T s = 0;
      for (int64_t n = 0; n < N; ++n) s += dy[n * OUT + o];
      db[o] += s;
    }
  }
}

template void linear_forward<float>(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t);
template void linear_forward<double>(double*, const double*, const double*, const double*, int64_t, int64_t, int64_t);
template void linear_backward<float>(float*, float*, float*, const float*, const float*, const float*, int64_t, int64_t,
                                     int64_t);
template void linear_backward<double>(double*, double*, double*, const double*, const double*, const double*, int64_t,
                                      int64_t, int64_t);

}  // namespace nextron::cpu
