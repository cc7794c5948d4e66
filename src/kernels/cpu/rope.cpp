#include "kernels/cpu/rope.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace nextron::cpu {

template <typename T>
void rope_tables(T* cos, T* sin, int64_t S, int64_t rotary_dim, double theta, int64_t position_offset) {
  NEXTRON_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0, "rope: rotary_dim ", rotary_dim, " must be positive and even");
  const int64_t half = rotary_dim / 2;
  // All in float32, operation by operation, as torch evaluates
  //   1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)) and position_ids.float() * inv_freq.
  std::vector<float> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) {
    const float expo = float(2 * i) / float(rotary_dim);
    inv_freq[i] = 1.0f / std::pow(float(theta), expo);
  }
#pragma omp parallel for
  for (int64_t s = 0; s < S; ++s) {
    const float pos = float(position_offset + s);
    for (int64_t i = 0; i < half; ++i) {
      const float f = pos * inv_freq[i];
      const T c = T(std::cos(f)), sn = T(std::sin(f));
      cos[s * rotary_dim + i] = cos[s * rotary_dim + half + i] = c;
      sin[s * rotary_dim + i] = sin[s * rotary_dim + half + i] = sn;
    }
  }
}

template <typename T>
void rope_forward(T* y, const T* x, const T* cos, const T* sin, int64_t B, int64_t S, int64_t NH, int64_t D,
                  int64_t rotary_dim) {
  NEXTRON_CHECK(rotary_dim % 2 == 0 && rotary_dim <= D, "rope: rotary_dim ", rotary_dim,
                " must be even and at most head_dim ", D);
  const int64_t half = rotary_dim / 2;
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const T* c = cos + s * rotary_dim;
      const T* sn = sin + s * rotary_dim;
      for (int64_t h = 0; h < NH; ++h) {
        const T* xr = x + ((b * S + s) * NH + h) * D;
        T* yr = y + ((b * S + s) * NH + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const T x1 = xr[i], x2 = xr[i + half];
          yr[i] = x1 * c[i] - x2 * sn[i];
          yr[i + half] = x2 * c[i + half] + x1 * sn[i + half];
        }
        if (yr != xr)
          for (int64_t i = rotary_dim; i < D; ++i) yr[i] = xr[i];
      }
    }
}

template <typename T>
void rope_backward(T* dx, const T* dy, const T* cos, const T* sin, int64_t B, int64_t S, int64_t NH, int64_t D,
                   int64_t rotary_dim) {
  if (!dx) return;
  NEXTRON_CHECK(rotary_dim % 2 == 0 && rotary_dim <= D, "rope: rotary_dim ", rotary_dim,
                " must be even and at most head_dim ", D);
  const int64_t half = rotary_dim / 2;
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const T* c = cos + s * rotary_dim;
      const T* sn = sin + s * rotary_dim;
      for (int64_t h = 0; h < NH; ++h) {
        const T* gr = dy + ((b * S + s) * NH + h) * D;
        T* dxr = dx + ((b * S + s) * NH + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const T g1 = gr[i], g2 = gr[i + half];
          dxr[i] += g1 * c[i] + g2 * sn[i + half];
          dxr[i + half] += g2 * c[i + half] - g1 * sn[i];
        }
        for (int64_t i = rotary_dim; i < D; ++i) dxr[i] += gr[i];
      }
    }
}

template void rope_tables<float>(float*, float*, int64_t, int64_t, double, int64_t);
template void rope_tables<double>(double*, double*, int64_t, int64_t, double, int64_t);
template void rope_forward<float>(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  int64_t);
template void rope_forward<double>(double*, const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                   int64_t, int64_t);
template void rope_backward<float>(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                   int64_t);
template void rope_backward<double>(double*, const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                    int64_t, int64_t);

}  // namespace nextron::cpu
