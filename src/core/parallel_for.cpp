#include "core/parallel_for.h"

#include <omp.h>

namespace nextron {
int cpu_threads() { return omp_get_max_threads(); }
void set_cpu_threads(int n) { omp_set_num_threads(n); }
}  // namespace nextron
