#include "kernels/cpu/gdn_gates.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/row_blocks.h"

namespace nextron::cpu {

namespace {
constexpr double kSoftplusThreshold = 20;  // torch.nn.functional.softplus default

template <typename T>
T softplus(T v) {
  return v > T(kSoftplusThreshold) ? v : std::log1p(std::exp(v));
}

// d softplus / dv as torch's softplus_backward: exactly 1 above the threshold, else sigmoid(v).
template <typename T>
T softplus_grad(T v) {
  return v > T(kSoftplusThreshold) ? T(1) : T(1) / (T(1) + std::exp(-v));
}
}  // namespace

template <typename T>
void gdn_gates_forward(T* beta, T* g, const T* b, const T* a, const T* A_log, const T* dt_bias, int64_t N, int64_t Hv) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Hv; ++h) {
      const int64_t i = n * Hv + h;
      beta[i] = T(1) / (T(1) + std::exp(-b[i]));
      g[i] = -std::exp(A_log[h]) * softplus(a[i] + dt_bias[h]);
    }
}

template <typename T>
void gdn_gates_backward(T* db, T* da, T* dA_log, T* ddt_bias, const T* dbeta, const T* dg, const T* b, const T* a,
                        const T* A_log, const T* dt_bias, int64_t N, int64_t Hv) {
  if (db && dbeta) {
#pragma omp parallel for
    for (int64_t i = 0; i < N * Hv; ++i) {
      const T s = T(1) / (T(1) + std::exp(-b[i]));
      db[i] += dbeta[i] * s * (T(1) - s);
    }
  }
  if (!dg || (!da && !dA_log && !ddt_bias)) return;
  // dA_log, ddt_bias are column sums over rows, summed deterministically (row_blocks.h); the partial row holds
  // [dA_log (Hv) | ddt_bias (Hv)].
  const auto sums = rows_with_column_sums(N, 2 * Hv, [&](int64_t n, double* pa) {
    double* pd = pa + Hv;
    for (int64_t h = 0; h < Hv; ++h) {
      const int64_t i = n * Hv + h;
      const T A = std::exp(A_log[h]), v = a[i] + dt_bias[h];
      // g = -A softplus(v): dg/dA_log = g, dg/dv = -A softplus'(v).
      const T dv = dg[i] * -A * softplus_grad(v);
      if (da) da[i] += dv;
      pa[h] += double(dg[i]) * double(-A * softplus(v));
      pd[h] += double(dv);
    }
  });
  for (int64_t h = 0; h < Hv; ++h) {
    if (dA_log) dA_log[h] += T(sums[h]);
    if (ddt_bias) ddt_bias[h] += T(sums[Hv + h]);
  }
}

template void gdn_gates_forward<float>(float*, float*, const float*, const float*, const float*, const float*, int64_t,
                                       int64_t);
template void gdn_gates_forward<double>(double*, double*, const double*, const double*, const double*, const double*,
                                        int64_t, int64_t);
template void gdn_gates_backward<float>(float*, float*, float*, float*, const float*, const float*, const float*,
                                        const float*, const float*, const float*, int64_t, int64_t);
template void gdn_gates_backward<double>(double*, double*, double*, double*, const double*, const double*,
                                         const double*, const double*, const double*, const double*, int64_t, int64_t);

}  // namespace nextron::cpu
