#include "core/peak_flops.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/blas.h"

// OpenBLAS's thread-count API (the library CMake links; declared here so any cblas.h header will do).
extern "C" {
int openblas_get_num_threads(void);
void openblas_set_num_threads(int num_threads);
}

namespace nextron {

namespace {
constexpr int64_t kN = 1024;             // square GEMM side: large enough for OpenBLAS to reach its peak
constexpr double kMeasureSeconds = 0.3;  // timed calls stop once this much time has passed...
constexpr int kMinCalls = 3;             // ...and at least this many calls have run
constexpr int kMaxCalls = 200;

// Sets the thread count of OpenMP and of OpenBLAS and restores both on scope exit, exceptions included. OpenBLAS
// keeps its own count: in the OpenMP build shipped by Debian/Ubuntu (0.3.21) omp_set_num_threads alone does not
// change how many threads a gemm uses, openblas_set_num_threads does.
struct ThreadCountGuard {
  int saved_omp = omp_get_max_threads();
  int saved_blas = openblas_get_num_threads();
  explicit ThreadCountGuard(int threads) {
    if (threads <= 0) return;
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
  }
  ~ThreadCountGuard() {
    omp_set_num_threads(saved_omp);
    openblas_set_num_threads(saved_blas);
  }
};
}  // namespace

double measure_cpu_peak_flops(int threads) {
  ThreadCountGuard guard(threads);
  const size_t n = static_cast<size_t>(kN * kN);
  std::vector<float> a(n), b(n), c(n, 0.0f);
  // Deterministic values of moderate size (no denormals, no overflow across repeated beta = 0 calls).
  for (size_t i = 0; i < n; ++i) {
    a[i] = static_cast<float>(static_cast<int>(i % 7) - 3) * 0.125f;
    b[i] = static_cast<float>(static_cast<int>(i % 5) - 2) * 0.25f;
  }
  const auto call = [&] { cpu::gemm<float>(false, false, kN, kN, kN, 1.0f, a.data(), b.data(), 0.0f, c.data()); };
  using Clock = std::chrono::steady_clock;
  call();  // warm-up: thread pool start, page faults, caches

  double best = 0;  // seconds of the fastest call
  const auto start = Clock::now();
  for (int calls = 0; calls < kMaxCalls; ++calls) {
    const auto t0 = Clock::now();
    call();
    const auto t1 = Clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    if (s > 0 && (best == 0 || s < best)) best = s;
    if (calls + 1 >= kMinCalls && std::chrono::duration<double>(t1 - start).count() >= kMeasureSeconds) break;
  }
  NEXTRON_CHECK(best > 0, "measuring the CPU GEMM peak failed (the clock did not advance); pass --peak-tflops");
  const double flops = 2.0 * static_cast<double>(kN) * static_cast<double>(kN) * static_cast<double>(kN);
  return flops / best;
}

}  // namespace nextron
