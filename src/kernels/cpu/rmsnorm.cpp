#include "kernels/cpu/rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/row_blocks.h"

namespace nextron::cpu {

template <typename T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t N, int64_t D, double eps) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * D;
    T* yr = y + n * D;
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * double(xr[d]);
    const T r = T(1.0 / std::sqrt(ss / double(D) + eps));
    rstd[n] = r;
    for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * r * (T(1) + w[d]);
  }
}

template <typename T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t N, int64_t D) {
  if (!dx && !dw) return;
  // dw is a column sum over rows, summed deterministically (row_blocks.h).
  const auto dw_sum = rows_with_column_sums(N, dw ? D : 0, [&](int64_t n, double* pw) {
    const T* xr = x + n * D;
    const T* gr = dy + n * D;
    const T r = rstd[n];
    if (pw)
      for (int64_t d = 0; d < D; ++d) pw[d] += double(gr[d]) * double(xr[d] * r);
    if (dx) {
      // xhat = x r, g = dy (1 + w): dx = r (g - xhat mean(g xhat)).
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += double(gr[d] * (T(1) + w[d])) * double(xr[d]);
      const T c = T(dot * double(r) * double(r) / double(D));
      T* dxr = dx + n * D;
      for (int64_t d = 0; d < D; ++d) dxr[d] += r * (gr[d] * (T(1) + w[d]) - xr[d] * c);
    }
  });
  if (dw)
    for (int64_t d = 0; d < D; ++d) dw[d] += T(dw_sum[d]);
}

template void rmsnorm_forward<float>(float*, float*, const float*, const float*, int64_t, int64_t, double);
template void rmsnorm_forward<double>(double*, double*, const double*, const double*, int64_t, int64_t, double);
template void rmsnorm_backward<float>(float*, float*, const float*, const float*, const float*, const float*, int64_t,
                                      int64_t);
template void rmsnorm_backward<double>(double*, double*, const double*, const double*, const double*, const double*,
                                       int64_t, int64_t);

}  // namespace nextron::cpu
