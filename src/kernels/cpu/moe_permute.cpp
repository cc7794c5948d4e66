#include "kernels/cpu/moe_permute.h"

#include <algorithm>

namespace nextron::cpu {

template <typename T>
void moe_permute(T* rows, const T* x, const int32_t* row_token, int64_t R, int64_t H) {
#pragma omp parallel for
  for (int64_t r = 0; r < R; ++r) std::copy_n(x + int64_t(row_token[r]) * H, H, rows + r * H);
}

template <typename T>
void moe_permute_backward(T* dx, const T* drows, const int32_t* slot_row, int64_t N, int64_t K, int64_t H) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    T* d = dx + n * H;
    for (int64_t k = 0; k < K; ++k) {
      const T* g = drows + int64_t(slot_row[n * K + k]) * H;
      for (int64_t h = 0; h < H; ++h) d[h] += g[h];
    }
  }
}

template <typename T, typename Index>
void moe_unpermute(T* y, const T* rows, const T* weights, const Index* slot_row, int64_t N, int64_t K, int64_t H) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    T* yn = y + n * H;
    std::fill_n(yn, H, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T w = weights[n * K + k];
      const T* o = rows + int64_t(slot_row[n * K + k]) * H;
      for (int64_t h = 0; h < H; ++h) yn[h] += w * o[h];
    }
  }
}

template <typename T>
void moe_unpermute_backward(T* drows, T* dweights, const T* dy, const T* rows, const T* weights,
                            const int32_t* slot_row, int64_t N, int64_t K, int64_t H) {
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const T* g = dy + n * H;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = slot_row[n * K + k];
      const T w = weights[n * K + k];
      T* d = drows + r * H;
      const T* o = rows + r * H;
      T dot = 0;
      for (int64_t h = 0; h < H; ++h) {
        d[h] = w * g[h];
        dot += g[h] * o[h];
      }
      if (dweights) dweights[n * K + k] += dot;
    }
  }
}

#define NEXTRON_INSTANTIATE(T)                                                                                    \
  template void moe_permute<T>(T*, const T*, const int32_t*, int64_t, int64_t);                                   \
  template void moe_permute_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t);                 \
  template void moe_unpermute<T, int32_t>(T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t);     \
  template void moe_unpermute<T, int64_t>(T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t);     \
  template void moe_unpermute_backward<T>(T*, T*, const T*, const T*, const T*, const int32_t*, int64_t, int64_t, \
                                          int64_t);
NEXTRON_INSTANTIATE(float)
NEXTRON_INSTANTIATE(double)
#undef NEXTRON_INSTANTIATE

}  // namespace nextron::cpu
