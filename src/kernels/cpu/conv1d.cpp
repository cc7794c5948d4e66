#include "kernels/cpu/conv1d.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace nextron::cpu {

namespace {
// wt (KC, C): the taps transposed so the inner loops over channels are contiguous.
template <typename T>
std::vector<T> transpose_taps(const T* w, int64_t C, int64_t KC) {
  std::vector<T> wt(KC * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < KC; ++j) wt[j * C + c] = w[c * KC + j];
  return wt;
}

// pre (C) = the pre-activation of token s of sequence xb (S, C).
template <typename T>
void preactivation(T* pre, const T* xb, const T* wt, int64_t s, int64_t C, int64_t KC) {
  std::fill(pre, pre + C, T(0));
  for (int64_t j = std::max<int64_t>(0, KC - 1 - s); j < KC; ++j) {
    const T* xr = xb + (s - (KC - 1) + j) * C;
    const T* wr = wt + j * C;
    for (int64_t c = 0; c < C; ++c) pre[c] += wr[c] * xr[c];
  }
}
}  // namespace

template <typename T>
void conv1d_forward(T* y, const T* x, const T* w, int64_t B, int64_t S, int64_t C, int64_t KC, int64_t c1, int64_t c2) {
  const std::vector<T> wt = transpose_taps(w, C, KC);
#pragma omp parallel
  {
    std::vector<T> pre(C);
#pragma omp for collapse(2)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) {
        preactivation(pre.data(), x + b * S * C, wt.data(), s, C, KC);
        const int64_t r = b * S + s;
        for (int64_t c = 0; c < C; ++c) y[conv_out_index(r, c, B * S, C, c1, c2)] = pre[c] / (T(1) + std::exp(-pre[c]));
      }
  }
}

template <typename T>
void conv1d_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, int64_t B, int64_t S, int64_t C, int64_t KC,
                     int64_t c1, int64_t c2) {
  if (!dx && !dw) return;
  const std::vector<T> wt = transpose_taps(w, C, KC);
  // dpre (B, S, C) = dy * silu'(pre).
  std::vector<T> dpre(B * S * C);
#pragma omp parallel
  {
    std::vector<T> pre(C);
#pragma omp for collapse(2)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) {
        preactivation(pre.data(), x + b * S * C, wt.data(), s, C, KC);
        const int64_t r = b * S + s;
        T* dr = dpre.data() + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const T sg = T(1) / (T(1) + std::exp(-pre[c]));
          dr[c] = dy[conv_out_index(r, c, B * S, C, c1, c2)] * sg * (T(1) + pre[c] * (T(1) - sg));
        }
      }
  }
  // dx[b, t, c] += sum_j w[c, j] dpre[b, t + (KC - 1) - j, c] over the outputs t reads into.
  if (dx) {
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < S; ++t) {
        T* dxr = dx + (b * S + t) * C;
        for (int64_t j = std::max<int64_t>(0, t + KC - S); j < KC; ++j) {
          const T* dr = dpre.data() + (b * S + t + (KC - 1) - j) * C;
          const T* wr = wt.data() + j * C;
          for (int64_t c = 0; c < C; ++c) dxr[c] += wr[c] * dr[c];
        }
      }
  }
  // dw[c, j] += sum_{b, s} dpre[b, s, c] x[b, s - (KC - 1) + j, c]: one task per chunk of channels (deterministic).
  if (dw) {
    constexpr int64_t kChunk = 64;
    const int64_t nchunk = (C + kChunk - 1) / kChunk;
#pragma omp parallel
    {
      std::vector<double> acc(KC * kChunk);
#pragma omp for
      for (int64_t ch = 0; ch < nchunk; ++ch) {
        const int64_t c0 = ch * kChunk, nc = std::min(C, c0 + kChunk) - c0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t s = 0; s < S; ++s) {
            const T* dr = dpre.data() + (b * S + s) * C + c0;
            for (int64_t j = std::max<int64_t>(0, KC - 1 - s); j < KC; ++j) {
              const T* xr = x + (b * S + s - (KC - 1) + j) * C + c0;
              double* a = acc.data() + j * kChunk;
              for (int64_t c = 0; c < nc; ++c) a[c] += double(dr[c]) * double(xr[c]);
            }
          }
        for (int64_t c = 0; c < nc; ++c)
          for (int64_t j = 0; j < KC; ++j) dw[(c0 + c) * KC + j] += T(acc[j * kChunk + c]);
      }
    }
  }
}

template void conv1d_forward<float>(float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                    int64_t);
template void conv1d_forward<double>(double*, const double*, const double*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                     int64_t);
template void conv1d_backward<float>(float*, float*, const float*, const float*, const float*, int64_t, int64_t,
                                     int64_t, int64_t, int64_t, int64_t);
template void conv1d_backward<double>(double*, double*, const double*, const double*, const double*, int64_t, int64_t,
                                      int64_t, int64_t, int64_t, int64_t);

}  // namespace nextron::cpu
