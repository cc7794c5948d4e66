#include "model/init.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace nextron {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// splitmix64's finaliser: a bijective mix of 64 bits, the counter-based generator's core.
uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// FNV-1a of the parameter's global name: the stream of one parameter, the same in every layout.
uint64_t name_key(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

// A uniform in (0, 1) from the counter (seed, parameter, element, lane): 53 random bits, never 0.
double uniform(uint64_t seed, uint64_t key, int64_t element, uint64_t lane) {
  const uint64_t bits = mix(mix(seed ^ mix(key)) ^ mix(static_cast<uint64_t>(element) * 2 + lane));
  return (static_cast<double>(bits >> 11) + 0.5) * 0x1.0p-53;
}

}  // namespace

ParamInit param_init(const std::string& name) {
  if (ends_with(name, "linear_attn.A_log")) return ParamInit::log_uniform_a;
  if (ends_with(name, "linear_attn.dt_bias") || ends_with(name, "linear_attn.norm")) return ParamInit::one;
  if (ends_with(name, "norm") || ends_with(name, "layernorm") || ends_with(name, "_bias")) return ParamInit::zero;
  return ParamInit::normal;
}

void init_parameter_elements(const std::string& name, int64_t first, int64_t count, float* out, uint64_t seed,
                             double initializer_range) {
  NEXTRON_CHECK(initializer_range > 0, "initializer_range must be positive, got ", initializer_range);
  const ParamInit kind = param_init(name);
  const uint64_t key = name_key(name);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = first + i;
    switch (kind) {
      case ParamInit::zero:
        out[i] = 0.0f;
        break;
      case ParamInit::one:
        out[i] = 1.0f;
        break;
      case ParamInit::log_uniform_a:
        out[i] = static_cast<float>(std::log(0.01 + (16.0 - 0.01) * uniform(seed, key, e, 0)));
        break;
      case ParamInit::normal: {
        // Box-Muller from the element's own two uniforms.
        const double r = std::sqrt(-2.0 * std::log(uniform(seed, key, e, 0)));
        out[i] =
            static_cast<float>(initializer_range * r * std::cos(2.0 * std::numbers::pi * uniform(seed, key, e, 1)));
        break;
      }
    }
  }
}

void init_parameter_elements(const ParamSpec& spec, int64_t first, int64_t count, float* out, uint64_t seed,
                             double initializer_range) {
  for (const HfPiece& piece : spec.hf) {
    const int64_t begin = std::max(first, piece.offset),
                  end = std::min(first + count, piece.offset + shape_numel(piece.shape));
    for_each_hf_run(piece, begin - piece.offset, end - piece.offset, [&](int64_t ours, int64_t hf, int64_t n) {
      init_parameter_elements(spec.name, piece.offset + hf, n, out + (piece.offset + ours - first), seed,
                              initializer_range);
    });
  }
}

void init_parameters(const ParamTable& table, float* params, uint64_t seed, double initializer_range) {
  for (const ParamSpec& s : table.specs())
    init_parameter_elements(s, 0, s.numel(), params + s.offset, seed, initializer_range);
}

}  // namespace nextron
