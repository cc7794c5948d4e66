#include "optim/grad_clip.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace nextron {

namespace {
// Fixed block size: partial sums are formed per block and added in block order, independent of threads.
constexpr int64_t kBlock = 1 << 14;

void check_range(FlatRange range, const void* g, const char* what) {
  NEXTRON_CHECK(range.begin >= 0 && range.begin <= range.end, what, ": invalid range [", range.begin, ", ", range.end,
                ")");
  NEXTRON_CHECK(range.size() == 0 || g != nullptr, what, ": null gradient buffer for a non-empty range");
}
}  // namespace

double grad_sq_sum(const float* g, FlatRange range) {
  check_range(range, g, "grad_sq_sum");
  const int64_t n = range.size();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t e = std::min(n, (b + 1) * kBlock);
    double s = 0.0;
    for (int64_t i = b * kBlock; i < e; ++i) s += static_cast<double>(g[i]) * static_cast<double>(g[i]);
    partial[static_cast<size_t>(b)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

double clip_coefficient(double total_norm, double max_norm) {
  NEXTRON_CHECK(std::isfinite(max_norm) && max_norm > 0, "clip_grad_norm: max_norm must be finite and > 0, got ",
                max_norm, " (disable clipping instead of passing 0)");
  const double coef = max_norm / (total_norm + 1e-6);
  return std::isnan(coef) ? coef : std::min(coef, 1.0);
}

void scale_grads(float* g, FlatRange range, float s) {
  check_range(range, g, "scale_grads");
  const int64_t n = range.size();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] *= s;
}

double clip_grad_norm(float* g, FlatRange range, double max_norm) {
  const double norm = std::sqrt(grad_sq_sum(g, range));
  const double coef = clip_coefficient(norm, max_norm);
  if (!(coef >= 1.0)) scale_grads(g, range, static_cast<float>(coef));
  return norm;
}

}  // namespace nextron
