#include "kernels/cpu/moe_experts.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/parallel_for.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/moe_permute.h"

namespace nextron::cpu {

void moe_dispatch_build(MoeDispatch& d, const int32_t* indices, int64_t N, int64_t K, int64_t E) {
  const int64_t S = N * K;
  for (int64_t s = 0; s < S; ++s)
    NEXTRON_CHECK(indices[s] >= 0 && indices[s] < E, "moe_dispatch_build: expert index ", indices[s], " of token ",
                  s / K, " is outside [0, ", E, ")");
  d.N = N;
  d.K = K;
  d.E = E;
  d.expert_offsets.assign(E + 1, 0);
  for (int64_t s = 0; s < S; ++s) ++d.expert_offsets[indices[s] + 1];
  for (int64_t e = 0; e < E; ++e) d.expert_offsets[e + 1] += d.expert_offsets[e];
  d.slot_token.resize(S);
  d.slot_k.resize(S);
  d.slot_of.resize(S);
  std::vector<int64_t> next(d.expert_offsets.begin(), d.expert_offsets.end() - 1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t p = next[indices[n * K + k]]++;
      d.slot_token[p] = n;
      d.slot_k[p] = int32_t(k);
      d.slot_of[n * K + k] = p;
    }
  d.active.clear();
  d.active.reserve(static_cast<size_t>(E));  // held memory of a fixed size (activation accounting)
  for (int64_t e = 0; e < E; ++e)
    if (d.expert_offsets[e + 1] > d.expert_offsets[e]) d.active.push_back(int32_t(e));
  std::stable_sort(d.active.begin(), d.active.end(), [&d](int32_t a, int32_t b) {
    return d.expert_offsets[a + 1] - d.expert_offsets[a] > d.expert_offsets[b + 1] - d.expert_offsets[b];
  });
}

namespace {

void check_dispatch(const MoeDispatch& d, int64_t N, int64_t E, int64_t K) {
  NEXTRON_ASSERT(d.N == N && d.E == E && d.K == K && int64_t(d.slot_token.size()) == N * K);
}

// Calls f(e, first_slot, n_slots) for every expert with slots. With at least as many busy experts as threads the
// experts run in parallel (each gemm single-threaded inside the region, each expert's weight gradients disjoint);
// with fewer, they run one after another and each gemm uses all threads.
template <typename F>
void for_each_expert(const MoeDispatch& d, const F& f) {
  const int64_t n_active = int64_t(d.active.size());
  const bool parallel = n_active >= cpu_threads();
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t a = 0; a < n_active; ++a) {
    const int32_t e = d.active[a];
    f(e, d.expert_offsets[e], d.expert_offsets[e + 1] - d.expert_offsets[e]);
  }
}

template <typename T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// act (S, I) = silu(gate) * up of gate_up's rows [gate | up] (S, 2I).
template <typename T>
void swiglu_rows(T* act, const T* gate_up, int64_t S, int64_t I) {
#pragma omp parallel for
  for (int64_t s = 0; s < S; ++s) {
    const T* g = gate_up + s * 2 * I;
    const T* u = g + I;
    T* h = act + s * I;
    for (int64_t i = 0; i < I; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
  }
}

}  // namespace

template <typename T>
void moe_experts_recompute_act(MoeExpertsCache<T>& cache, int64_t I) {
  const int64_t S = static_cast<int64_t>(cache.gate_up.size()) / (2 * I);
  cache.act.resize(S * I);
  swiglu_rows(cache.act.data(), cache.gate_up.data(), S, I);
}

template <typename T>
void moe_experts_forward(T* y, MoeExpertsCache<T>& cache, const MoeDispatch& dispatch, const T* x, const T* weights,
                         const T* w_gate_up, const T* w_down, int64_t N, int64_t H, int64_t I, int64_t E, int64_t K) {
  check_dispatch(dispatch, N, E, K);
  const int64_t S = N * K;
  cache.x.resize(S * H);
  cache.gate_up.resize(S * 2 * I);
  cache.act.resize(S * I);
  cache.out.resize(S * H);
  T* cx = cache.x.data();
  T* gu = cache.gate_up.data();
  T* act = cache.act.data();
  T* out = cache.out.data();

#pragma omp parallel for
  for (int64_t s = 0; s < S; ++s) std::copy_n(x + dispatch.slot_token[s] * H, H, cx + s * H);

  // gate_up (n_e, 2I) = x_e W_gu_e^T
  for_each_expert(dispatch, [&](int64_t e, int64_t s0, int64_t ne) {
    gemm<T>(false, true, ne, 2 * I, H, T(1), cx + s0 * H, w_gate_up + e * 2 * I * H, T(0), gu + s0 * 2 * I);
  });

  swiglu_rows(act, gu, S, I);

  // out (n_e, H) = act_e W_down_e^T
  for_each_expert(dispatch, [&](int64_t e, int64_t s0, int64_t ne) {
    gemm<T>(false, true, ne, H, I, T(1), act + s0 * I, w_down + e * H * I, T(0), out + s0 * H);
  });

  // y[n] = sum_k weights[n, k] out[slot (n, k)]: the dispatcher's combine (moe_permute.h), the same arithmetic.
  moe_unpermute<T>(y, out, weights, dispatch.slot_of.data(), N, K, H);
}

template <typename T>
void moe_experts_backward(T* dx, T* dweights, T* dw_gate_up, T* dw_down, MoeExpertsCache<T>& cache,
                          const MoeDispatch& dispatch, const T* dy, const T* weights, const T* w_gate_up,
                          const T* w_down, int64_t N, int64_t H, int64_t I, int64_t E, int64_t K) {
  check_dispatch(dispatch, N, E, K);
  const int64_t S = N * K;
  NEXTRON_ASSERT(int64_t(cache.out.size()) == S * H && int64_t(cache.act.size()) == S * I);
  const T* cx = cache.x.data();
  T* gu = cache.gate_up.data();  // becomes d gate_up
  T* act = cache.act.data();     // becomes d act
  T* out = cache.out.data();     // becomes d out, then the per-slot dx
  const bool need_gu = dx || dw_gate_up;

  // dweights[n,k] += <dy[n], out of slot (n,k)>
  if (dweights) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const T* o = out + dispatch.slot_of[n * K + k] * H;
        const T* g = dy + n * H;
        T s = 0;
        for (int64_t h = 0; h < H; ++h) s += g[h] * o[h];
        dweights[n * K + k] += s;
      }
  }
  if (!dw_down && !need_gu) return;

#pragma omp parallel for
  for (int64_t s = 0; s < S; ++s) {  // d out (slot) = weight * dy[token]
    const int64_t n = dispatch.slot_token[s];
    const T w = weights[n * K + dispatch.slot_k[s]];
    const T* g = dy + n * H;
    T* o = out + s * H;
    for (int64_t h = 0; h < H; ++h) o[h] = w * g[h];
  }

  // dw_down_e (H, I) += dout_e^T act_e; then d act_e (n_e, I) = dout_e W_down_e (overwrites act_e).
  for_each_expert(dispatch, [&](int64_t e, int64_t s0, int64_t ne) {
    if (dw_down) gemm<T>(true, false, H, I, ne, T(1), out + s0 * H, act + s0 * I, T(1), dw_down + e * H * I);
    if (need_gu) gemm<T>(false, false, ne, I, H, T(1), out + s0 * H, w_down + e * H * I, T(0), act + s0 * I);
  });
  if (!need_gu) return;

#pragma omp parallel for
  for (int64_t s = 0; s < S; ++s) {  // SwiGLU backward in place: [gate | up] -> [d gate | d up]
    T* g = gu + s * 2 * I;
    T* u = g + I;
    const T* dh = act + s * I;
    for (int64_t i = 0; i < I; ++i) {
      const T gi = g[i], ui = u[i], sg = sigmoid(gi);
      g[i] = dh[i] * ui * sg * (T(1) + gi * (T(1) - sg));
      u[i] = dh[i] * gi * sg;
    }
  }

  // dw_gate_up_e (2I, H) += dgu_e^T x_e; per-slot dx_e (n_e, H) = dgu_e W_gu_e (overwrites out_e).
  for_each_expert(dispatch, [&](int64_t e, int64_t s0, int64_t ne) {
    if (dw_gate_up)
      gemm<T>(true, false, 2 * I, H, ne, T(1), gu + s0 * 2 * I, cx + s0 * H, T(1), dw_gate_up + e * 2 * I * H);
    if (dx) gemm<T>(false, false, ne, H, 2 * I, T(1), gu + s0 * 2 * I, w_gate_up + e * 2 * I * H, T(0), out + s0 * H);
  });

  if (dx) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; ++n) {
      T* d = dx + n * H;
      for (int64_t k = 0; k < K; ++k) {
        const T* o = out + dispatch.slot_of[n * K + k] * H;
        for (int64_t h = 0; h < H; ++h) d[h] += o[h];
      }
    }
  }
}

template void moe_experts_recompute_act<float>(MoeExpertsCache<float>&, int64_t);
template void moe_experts_recompute_act<double>(MoeExpertsCache<double>&, int64_t);
template void moe_experts_forward<float>(float*, MoeExpertsCache<float>&, const MoeDispatch&, const float*,
                                         const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                         int64_t);
template void moe_experts_forward<double>(double*, MoeExpertsCache<double>&, const MoeDispatch&, const double*,
                                          const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                          int64_t, int64_t);
template void moe_experts_backward<float>(float*, float*, float*, float*, MoeExpertsCache<float>&, const MoeDispatch&,
                                          const float*, const float*, const float*, const float*, int64_t, int64_t,
                                          int64_t, int64_t, int64_t);
template void moe_experts_backward<double>(double*, double*, double*, double*, MoeExpertsCache<double>&,
                                           const MoeDispatch&, const double*, const double*, const double*,
                                           const double*, int64_t, int64_t, int64_t, int64_t, int64_t);

}  // namespace nextron::cpu
