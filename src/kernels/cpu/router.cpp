#include "kernels/cpu/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace nextron::cpu {

template <typename T>
void router_forward(T* probs, int32_t* indices, T* weights, const T* logits, int64_t N, int64_t E, int64_t K,
                    bool norm_topk_prob) {
  NEXTRON_CHECK(K >= 1 && K <= E, "router: top-k ", K, " must be in [1, num_experts = ", E, "]");
#pragma omp parallel
  {
    std::vector<int32_t> order(E);
#pragma omp for
    for (int64_t n = 0; n < N; ++n) {
      const T* x = logits + n * E;
      T* p = probs + n * E;
      T m = x[0];
      for (int64_t e = 1; e < E; ++e) m = std::max(m, x[e]);
      T s = 0;
      for (int64_t e = 0; e < E; ++e) s += (p[e] = std::exp(x[e] - m));
      const T inv = T(1) / s;
      for (int64_t e = 0; e < E; ++e) p[e] *= inv;

      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(),
                        [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      T top = 0;
      for (int64_t k = 0; k < K; ++k) {
        indices[n * K + k] = order[k];
        top += (weights[n * K + k] = p[order[k]]);
      }
      if (norm_topk_prob)
        for (int64_t k = 0; k < K; ++k) weights[n * K + k] /= top;
    }
  }
}

template <typename T>
void router_weights_from_indices(T* weights, const T* probs, const int32_t* indices, int64_t N, int64_t E, int64_t K,
                                 bool norm_topk_prob) {
  for (int64_t i = 0; i < N * K; ++i)
    NEXTRON_CHECK(indices[i] >= 0 && indices[i] < E, "routing replay: expert index ", indices[i], " of row ", i / K,
                  " is outside [0, ", E, ") (recorded with another config?)");
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    T top = 0;
    for (int64_t k = 0; k < K; ++k) top += (weights[n * K + k] = probs[n * E + indices[n * K + k]]);
    if (norm_topk_prob)
      for (int64_t k = 0; k < K; ++k) weights[n * K + k] /= top;
  }
}

template <typename T>
void router_backward(T* dlogits, const T* dprobs, const T* dweights, const T* probs, const int32_t* indices, int64_t N,
                     int64_t E, int64_t K, bool norm_topk_prob) {
  if (!dprobs && !dweights) return;
#pragma omp parallel
  {
    std::vector<T> g(E);
#pragma omp for
    for (int64_t n = 0; n < N; ++n) {
      const T* p = probs + n * E;
      const int32_t* idx = indices + n * K;
      // g = total gradient w.r.t. this row's probs.
      if (dprobs)
        std::copy_n(dprobs + n * E, E, g.begin());
      else
        std::fill(g.begin(), g.end(), T(0));
      if (dweights) {
        const T* dw = dweights + n * K;
        if (norm_topk_prob) {
          // w_k = p_k / S with S = sum_j p_j: dL/dp_k = (dw_k - sum_j dw_j w_j) / S.
          T S = 0;
          for (int64_t k = 0; k < K; ++k) S += p[idx[k]];
          T dot = 0;
          for (int64_t k = 0; k < K; ++k) dot += dw[k] * p[idx[k]];
          dot /= S;
          for (int64_t k = 0; k < K; ++k) g[idx[k]] += (dw[k] - dot) / S;
        } else {
          for (int64_t k = 0; k < K; ++k) g[idx[k]] += dw[k];
        }
      }
      // Softmax Jacobian: dlogit_e = p_e (g_e - sum_f p_f g_f).
      T pg = 0;
      for (int64_t e = 0; e < E; ++e) pg += p[e] * g[e];
      T* dl = dlogits + n * E;
      for (int64_t e = 0; e < E; ++e) dl[e] += p[e] * (g[e] - pg);
    }
  }
}

template void router_forward<float>(float*, int32_t*, float*, const float*, int64_t, int64_t, int64_t, bool);
template void router_forward<double>(double*, int32_t*, double*, const double*, int64_t, int64_t, int64_t, bool);
template void router_weights_from_indices<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t, bool);
template void router_weights_from_indices<double>(double*, const double*, const int32_t*, int64_t, int64_t, int64_t,
                                                  bool);
template void router_backward<float>(float*, const float*, const float*, const float*, const int32_t*, int64_t, int64_t,
                                     int64_t, bool);
template void router_backward<double>(double*, const double*, const double*, const double*, const int32_t*, int64_t,
                                      int64_t, int64_t, bool);

}  // namespace nextron::cpu
