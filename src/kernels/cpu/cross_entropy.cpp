#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace nextron::cpu {

namespace {
void check_targets(const int64_t* targets, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; ++n)
    NEXTRON_CHECK(targets[n] == kIgnoreIndex || (targets[n] >= 0 && targets[n] < V), "cross_entropy: target ",
                  targets[n], " at position ", n, " is outside the vocabulary [0, ", V,
                  ") and is not the ignore index ", kIgnoreIndex);
}
// The row's max m and sum of exp(x - m) (accumulated in double): the stable logsumexp is m + log(s).
template <typename T>
void row_max_sumexp(const T* x, int64_t V, T& m, double& s) {
  m = x[0];
  for (int64_t v = 1; v < V; ++v) m = std::max(m, x[v]);
  s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(x[v] - m);
}

}  // namespace

template <typename T>
void cross_entropy_forward(double* loss_sum, int64_t* count, T* row_loss, T* lse, const T* logits,
                           const int64_t* targets, int64_t N, int64_t V) {
  check_targets(targets, N, V);
  std::vector<double> loss(N);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* x = logits + n * V;
    T m;
    double s;
    row_max_sumexp(x, V, m, s);
    const double l = double(m) + std::log(s);
    lse[n] = T(l);
    loss[n] = targets[n] == kIgnoreIndex ? 0.0 : l - double(x[targets[n]]);
  }
  double sum = 0;
  int64_t c = 0;
  for (int64_t n = 0; n < N; ++n) {
    sum += loss[n];
    c += targets[n] != kIgnoreIndex;
    if (row_loss) row_loss[n] = T(loss[n]);
  }
  *loss_sum = sum;
  *count = c;
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const T* lse, const int64_t* targets, T scale, int64_t N,
                            const VocabShard& vocab) {
  check_targets(targets, N, vocab.full);
  const int64_t V = vocab.size;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    if (targets[n] == kIgnoreIndex) continue;
    const T* x = logits + n * V;
    T* dx = dlogits + n * V;
    const T l = lse[n];
    for (int64_t v = 0; v < V; ++v) dx[v] += scale * std::exp(x[v] - l);
    if (vocab.holds(targets[n])) dx[targets[n] - vocab.begin] -= scale;
  }
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const T* lse, const int64_t* targets, T scale, int64_t N,
                            int64_t V) {
  cross_entropy_backward(dlogits, logits, lse, targets, scale, N, VocabShard::whole(V));
}

void cross_entropy_partial(float* stats, const float* logits, const int64_t* targets, int64_t N,
                           const VocabShard& vocab) {
  const int64_t V = vocab.size;
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* x = logits + n * V;
    float m;
    double s;
    row_max_sumexp(x, V, m, s);
    stats[n] = m;
    stats[N + n] = static_cast<float>(s);
    stats[2 * N + n] = targets[n] != kIgnoreIndex && vocab.holds(targets[n]) ? x[targets[n] - vocab.begin] : 0.0f;
  }
}

void cross_entropy_combine(double* loss_sum, float* row_loss, float* lse, const float* stats, int64_t P,
                           const int64_t* targets, int64_t N, int64_t V_full) {
  check_targets(targets, N, V_full);
  std::vector<double> loss(N);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    double m = stats[n], target_logit = 0;
    for (int64_t r = 1; r < P; ++r) m = std::max(m, double(stats[r * 3 * N + n]));
    double s = 0;
    for (int64_t r = 0; r < P; ++r) {
      const float* st = stats + r * 3 * N;
      s += double(st[N + n]) * std::exp(double(st[n]) - m);
      target_logit += st[2 * N + n];
    }
    const double l = m + std::log(s);
    lse[n] = float(l);
    loss[n] = targets[n] == kIgnoreIndex ? 0.0 : l - target_logit;
  }
  double sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    sum += loss[n];
    if (row_loss) row_loss[n] = float(loss[n]);
  }
  *loss_sum = sum;
}

template void cross_entropy_forward<float>(double*, int64_t*, float*, float*, const float*, const int64_t*, int64_t,
                                           int64_t);
template void cross_entropy_forward<double>(double*, int64_t*, double*, double*, const double*, const int64_t*, int64_t,
                                            int64_t);
template void cross_entropy_backward<float>(float*, const float*, const float*, const int64_t*, float, int64_t,
                                            int64_t);
template void cross_entropy_backward<double>(double*, const double*, const double*, const int64_t*, double, int64_t,
                                             int64_t);
template void cross_entropy_backward<float>(float*, const float*, const float*, const int64_t*, float, int64_t,
                                            const VocabShard&);
template void cross_entropy_backward<double>(double*, const double*, const double*, const int64_t*, double, int64_t,
                                             const VocabShard&);

}  // namespace nextron::cpu
