#include "kernels/cpu/rmsnorm_gated.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/row_blocks.h"

namespace nextron::cpu {

namespace {
template <typename T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}
}  // namespace

template <typename T>
void rmsnorm_gated_forward(T* y, T* rstd, const T* x, const T* z, const T* w, int64_t N, int64_t D, double eps) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * D;
    const T* zr = z + n * D;
    T* yr = y + n * D;
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * double(xr[d]);
    const T r = T(1.0 / std::sqrt(ss / double(D) + eps));
    rstd[n] = r;
    for (int64_t d = 0; d < D; ++d) yr[d] = w[d] * (xr[d] * r) * (zr[d] / (T(1) + std::exp(-zr[d])));
  }
}

template <typename T>
void rmsnorm_gated_backward(T* dx, T* dz, T* dw, const T* dy, const T* x, const T* z, const T* w, const T* rstd,
                            int64_t N, int64_t D) {
  if (!dx && !dz && !dw) return;
  // dw is a column sum over rows, summed deterministically (row_blocks.h).
  const auto dw_sum = rows_with_column_sums(N, dw ? D : 0, [&](int64_t n, double* pw) {
    const T* xr = x + n * D;
    const T* zr = z + n * D;
    const T* gr = dy + n * D;
    const T r = rstd[n];
    // y = w xhat silu(z), xhat = x r.
    if (pw || dz) {
      for (int64_t d = 0; d < D; ++d) {
        const T sg = sigmoid(zr[d]);
        const T xh = xr[d] * r;
        if (pw) pw[d] += double(gr[d]) * double(xh * zr[d] * sg);
        if (dz) dz[n * D + d] += gr[d] * w[d] * xh * sg * (T(1) + zr[d] * (T(1) - sg));
      }
    }
    if (dx) {
      // g = dy w silu(z) = dL/dxhat; dx = r (g - xhat mean(g xhat)).
      T* dxr = dx + n * D;
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        const T g = gr[d] * w[d] * zr[d] * sigmoid(zr[d]);
        dxr[d] += r * g;  // the rest is added below, once the row's dot product is known
        dot += double(g) * double(xr[d]);
      }
      const T c = T(dot * double(r) * double(r) * double(r) / double(D));
      for (int64_t d = 0; d < D; ++d) dxr[d] -= xr[d] * c;
    }
  });
  if (dw)
    for (int64_t d = 0; d < D; ++d) dw[d] += T(dw_sum[d]);
}

template void rmsnorm_gated_forward<float>(float*, float*, const float*, const float*, const float*, int64_t, int64_t,
                                           double);
template void rmsnorm_gated_forward<double>(double*, double*, const double*, const double*, const double*, int64_t,
                                            int64_t, double);
template void rmsnorm_gated_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                            const float*, const float*, int64_t, int64_t);
template void rmsnorm_gated_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                             const double*, const double*, int64_t, int64_t);

}  // namespace nextron::cpu
