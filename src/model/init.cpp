#include "model/init.h"

#include <cmath>
#include <random>

namespace nextron {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

void init_parameters(const ParamTable& table, float* params, uint64_t seed, double initializer_range) {
  NEXTRON_CHECK(initializer_range > 0, "initializer_range must be positive, got ", initializer_range);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, initializer_range);
  std::uniform_real_distribution<double> a_range(0.01, 16.0);
  for (const ParamSpec& s : table.specs()) {
    float* p = params + s.offset;
    const int64_t n = s.numel();
    if (ends_with(s.name, "linear_attn.A_log")) {
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(std::log(a_range(rng)));
    } else if (ends_with(s.name, "linear_attn.dt_bias") || ends_with(s.name, "linear_attn.norm")) {
      for (int64_t i = 0; i < n; ++i) p[i] = 1.0f;
    } else if (ends_with(s.name, "norm") || ends_with(s.name, "layernorm") || ends_with(s.name, "_bias")) {
      for (int64_t i = 0; i < n; ++i) p[i] = 0.0f;  // zero-centred norms (1 + w) and biases
    } else {
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(normal(rng));
    }
  }
}

}  // namespace nextron
