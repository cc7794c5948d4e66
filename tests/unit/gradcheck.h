// Finite-difference gradient checking in double precision, shared by the op tests.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

namespace nextron::test {

inline std::vector<double> randn(size_t n, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

inline std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }

// Checks analytic gradient `grad` of scalar function `f` at `x` against central differences (step h).
// With double precision and h = 1e-6 the truncation and round-off errors are ~1e-9 relative, so a tolerance
// of 1e-6 relative to max(1, |g|) catches any real error while never flaking.
inline void expect_gradient(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x,
                            const std::vector<double>& grad, const char* what, double h = 1e-6, double tol = 1e-6) {
  ASSERT_EQ(x.size(), grad.size()) << what;
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    const double fd = (fp - fm) / (2 * h);
    ASSERT_NEAR(grad[i], fd, tol * std::max(1.0, std::abs(fd))) << what << " element " << i;
  }
}

// sum(y * r): the scalar we differentiate; its gradient w.r.t. y is r.
inline double dot(const std::vector<double>& y, const std::vector<double>& r) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += y[i] * r[i];
  return s;
}

}  // namespace nextron::test
