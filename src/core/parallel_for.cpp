#include "core/parallel_for.h"

#include <cblas.h>
#include <omp.h>

namespace nextron {
int cpu_threads() { return omp_get_max_threads(); }
// OpenBLAS (its OpenMP build included) keeps its own thread count: omp_set_num_threads alone does not limit GEMMs.
void set_cpu_threads(int n) {
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}
}  // namespace nextron
