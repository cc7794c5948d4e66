// Number of CPU worker threads (OpenMP); kernels parallelise with `#pragma omp parallel for`.
#pragma once

namespace nextron {
int cpu_threads();
void set_cpu_threads(int n);
}  // namespace nextron
