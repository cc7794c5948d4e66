#include "kernels/cpu/l2norm.h"

#include <cmath>

namespace nextron::cpu {

template <typename T>
void l2norm_forward(T* y, const T* x, int64_t N, int64_t D, double eps) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * D;
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * double(xr[d]);
    const T r = T(1.0 / std::sqrt(ss + eps));
    for (int64_t d = 0; d < D; ++d) y[n * D + d] = xr[d] * r;
  }
}

template <typename T>
void l2norm_backward(T* dx, const T* dy, const T* x, int64_t N, int64_t D, double eps) {
  if (!dx) return;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * D;
    const T* gr = dy + n * D;
    double ss = 0, dot = 0;
    for (int64_t d = 0; d < D; ++d) {
      ss += double(xr[d]) * double(xr[d]);
      dot += double(xr[d]) * double(gr[d]);
    }
    // y = x r, r = (ss + eps)^-1/2, dr/dx = -r^3 x: dx = r dy - r^3 (x . dy) x.
    const double rd = 1.0 / std::sqrt(ss + eps);
    const T r = T(rd), c = T(rd * rd * rd * dot);
    for (int64_t d = 0; d < D; ++d) dx[n * D + d] += r * gr[d] - c * xr[d];
  }
}

template void l2norm_forward<float>(float*, const float*, int64_t, int64_t, double);
template void l2norm_forward<double>(double*, const double*, int64_t, int64_t, double);
template void l2norm_backward<float>(float*, const float*, const float*, int64_t, int64_t, double);
template void l2norm_backward<double>(double*, const double*, const double*, int64_t, int64_t, double);

}  // namespace nextron::cpu
