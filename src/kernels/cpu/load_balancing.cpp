#include "kernels/cpu/load_balancing.h"

#include <vector>

#include "core/error.h"

namespace nextron::cpu {

template <typename T>
void aux_stats_accumulate(T* count_sum, T* prob_sum, const T* probs, const int32_t* indices, int64_t N, int64_t E,
                          int64_t K) {
  for (int64_t s = 0; s < N * K; ++s) {
    NEXTRON_CHECK(indices[s] >= 0 && indices[s] < E, "aux_stats_accumulate: expert index ", indices[s], " at slot ", s,
                  " is outside [0, ", E, ")");
    count_sum[indices[s]] += T(1);
  }
#pragma omp parallel for
  for (int64_t e = 0; e < E; ++e) {
    T s = 0;
    for (int64_t n = 0; n < N; ++n) s += probs[n * E + e];
    prob_sum[e] += s;
  }
}

template <typename T>
double aux_loss_value(const T* count_sum, const T* prob_sum, double total_rows, int64_t E) {
  double s = 0;
  for (int64_t e = 0; e < E; ++e) s += double(count_sum[e]) * double(prob_sum[e]);
  return double(E) * s / (total_rows * total_rows);
}

template <typename T>
void aux_loss_backward(T* dprobs, const T* count_sum, T total_rows, T daux, int64_t N, int64_t E) {
  std::vector<T> g(E);
  const T scale = daux * T(E) / (total_rows * total_rows);
  for (int64_t e = 0; e < E; ++e) g[e] = scale * count_sum[e];
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) dprobs[n * E + e] += g[e];
}

template void aux_stats_accumulate<float>(float*, float*, const float*, const int32_t*, int64_t, int64_t, int64_t);
template void aux_stats_accumulate<double>(double*, double*, const double*, const int32_t*, int64_t, int64_t, int64_t);
template double aux_loss_value<float>(const float*, const float*, double, int64_t);
template double aux_loss_value<double>(const double*, const double*, double, int64_t);
template void aux_loss_backward<float>(float*, const float*, float, float, int64_t, int64_t);
template void aux_loss_backward<double>(double*, const double*, double, double, int64_t, int64_t);

}  // namespace nextron::cpu
