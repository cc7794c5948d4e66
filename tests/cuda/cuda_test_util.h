// Shared plumbing of the CUDA kernel tests (tests/cuda): skip without a GPU, device arrays filled from host
// vectors, bf16 rounding of test inputs, and a tolerance check against the CPU reference.
//
// Every test compares a CUDA kernel with its CPU reference (src/kernels/cpu) run in fp32 on the same inputs
// rounded to bf16 (so input rounding is not part of the error). Tolerances are per output dtype: a bf16 output
// carries a relative rounding error of 2^-8 (0.4%) plus fp32 accumulation-order differences.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/cuda/check.h"
#include "core/cuda/device.h"
#include "core/dtype.h"
#include "kernels/cuda/common.h"

namespace nextron::test {

// GTEST_SKIP with a clear reason when no CUDA device is visible (CI has none; the tests run where one is).
#define NEXTRON_REQUIRE_GPU()                                                                              \
  do {                                                                                                     \
    if (::nextron::cuda::device_count() == 0)                                                              \
      GTEST_SKIP() << "no CUDA device visible: this GPU test runs only on a machine with a GPU (CUDA "     \
                      "backend verification)";                                                             \
  } while (0)

// A device array of T (RAII). For bf16, host values are fp32 and rounded on upload.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    NEXTRON_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(bytes(), 1)));
    NEXTRON_CUDA_CHECK(cudaMemset(ptr_, 0, std::max<size_t>(bytes(), 1)));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  void upload(const std::vector<T>& host) {
    NEXTRON_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    NEXTRON_CUDA_CHECK(cudaDeviceSynchronize());
    NEXTRON_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// bf16 device arrays exchanged with fp32 host vectors.
class DeviceBf16 {
 public:
  explicit DeviceBf16(size_t n) : raw_(n) {}
  explicit DeviceBf16(const std::vector<float>& host) : raw_(host.size()) { upload(host); }
  cuda::bf16* get() const { return reinterpret_cast<cuda::bf16*>(raw_.get()); }
  size_t size() const { return raw_.size(); }
  void upload(const std::vector<float>& host) {
    std::vector<uint16_t> h(host.size());
    for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_bf16(host[i]);
    raw_.upload(h);
  }
  std::vector<float> download() const {
    std::vector<uint16_t> h = raw_.download();
    std::vector<float> out(h.size());
    for (size_t i = 0; i < h.size(); ++i) out[i] = bf16_to_f32(h[i]);
    return out;
  }

 private:
  DeviceArray<uint16_t> raw_;
};

// n values uniform in [lo, hi), rounded to bf16 (exactly representable as bf16 and fp32).
inline std::vector<float> random_bf16(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = bf16_to_f32(f32_to_bf16(dist(gen)));
  return v;
}
inline std::vector<float> random_f32(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// Every |got - want| <= atol + rtol * max|want| (a tensor-scale tolerance: bf16 rounding is relative to the
// magnitudes involved, and a per-element relative test fails on values that cancel to near zero).
// Reports the worst element.
inline ::testing::AssertionResult close_to(const std::vector<float>& got, const std::vector<float>& want, double rtol,
                                           double atol = 0.0) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  double scale = 0.0;
  for (float w : want) scale = std::max(scale, std::fabs(double(w)));
  double worst = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double err = std::fabs(double(got[i]) - double(want[i]));
    if (!(err <= worst) || std::isnan(err)) {
      worst = std::isnan(err) ? INFINITY : err;
      at = i;
    }
  }
  const double tol = atol + rtol * scale;
  if (worst <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "worst error " << worst << " at " << at << " (got " << got[at] << ", want "
                                       << want[at] << "), tolerance " << tol << " = " << atol << " + " << rtol
                                       << " * max|want| " << scale;
}

// Tolerances relative to the tensor's max magnitude: bf16 outputs (one rounding of 2^-9 relative, plus fp32
// reduction order and bf16 intermediates inside fused kernels), fp32 outputs computed from bf16 inputs.
inline constexpr double kBf16Rtol = 1e-2;
inline constexpr double kF32Rtol = 1e-4;

}  // namespace nextron::test
