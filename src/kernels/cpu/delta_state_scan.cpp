#include "kernels/cpu/delta_state_scan.h"

#include <vector>

#include "core/error.h"

namespace nextron::cpu {

template <typename T>
void slice_transition(T* m, const T* k, const T* g, const T* beta, const GdrShape& s, int64_t chunk) {
  NEXTRON_CHECK(s.B >= 0 && s.S >= 0 && s.Hk > 0 && s.Hv > 0 && s.dk > 0, "slice_transition: bad shape");
  // The recurrence with v = 0 and dv = dk from the identity: every step multiplies the state by A_t.
  const GdrShape t{s.B, s.S, s.Hk, s.Hv, s.dk, s.dk};
  std::vector<T> q(static_cast<size_t>(s.B * s.S * s.Hk * s.dk), T(0));          // (B, S, Hk, dk): o is not used
  std::vector<T> v(static_cast<size_t>(s.B * s.S * s.Hv * s.dk), T(0));          // (B, S, Hv, dk)
  std::vector<T> o(v.size());                                                    // (B, S, Hv, dk)
  std::vector<T> identity(static_cast<size_t>(s.B * s.Hv * s.dk * s.dk), T(0));  // (B, Hv, dk, dk)
  for (int64_t bh = 0; bh < s.B * s.Hv; ++bh)
    for (int64_t i = 0; i < s.dk; ++i) identity[static_cast<size_t>((bh * s.dk + i) * s.dk + i)] = T(1);
  gated_delta_rule_chunked_forward<T>(o.data(), m, q.data(), k, v.data(), g, beta, identity.data(), t, T(1), chunk);
}

namespace {

// out (dk, dv) = a (dk, dk) x (dk, dv) [+ add], or a^T x when transpose.
template <typename T>
void matmul_add(T* out, const T* a, const T* x, const T* add, int64_t dk, int64_t dv, bool transpose) {
  for (int64_t i = 0; i < dk; ++i)
    for (int64_t j = 0; j < dv; ++j) {
      T acc = add != nullptr ? add[i * dv + j] : T(0);
      for (int64_t l = 0; l < dk; ++l) acc += (transpose ? a[l * dk + i] : a[i * dk + l]) * x[l * dv + j];
      out[i * dv + j] = acc;
    }
}

}  // namespace

template <typename T>
void prefix_states(T* states_in, const T* m, const T* local_final, int64_t n, int64_t B, int64_t Hv, int64_t dk,
                   int64_t dv) {
  const int64_t heads = B * Hv, mb = heads * dk * dk, sb = heads * dk * dv;  // elements per slice block
  for (int64_t e = 0; e < sb; ++e) states_in[e] = T(0);
  for (int64_t c = 0; c + 1 < n; ++c)
    for (int64_t h = 0; h < heads; ++h)
      matmul_add(states_in + (c + 1) * sb + h * dk * dv, m + c * mb + h * dk * dk, states_in + c * sb + h * dk * dv,
                 local_final + c * sb + h * dk * dv, dk, dv, /*transpose=*/false);
}

template <typename T>
void suffix_final_grads(T* final_grads, const T* m, const T* local_in_grads, int64_t n, int64_t B, int64_t Hv,
                        int64_t dk, int64_t dv) {
  const int64_t heads = B * Hv, mb = heads * dk * dk, sb = heads * dk * dv;
  if (n == 0) return;
  for (int64_t e = 0; e < sb; ++e) final_grads[(n - 1) * sb + e] = T(0);
  // final_grads[c] = dS_in_{c+1} = local_in_grads[c+1] + M_{c+1}^T final_grads[c+1].
  for (int64_t c = n - 2; c >= 0; --c)
    for (int64_t h = 0; h < heads; ++h)
      matmul_add(final_grads + c * sb + h * dk * dv, m + (c + 1) * mb + h * dk * dk,
                 final_grads + (c + 1) * sb + h * dk * dv, local_in_grads + (c + 1) * sb + h * dk * dv, dk, dv,
                 /*transpose=*/true);
}

#define NEXTRON_INSTANTIATE(T)                                                                         \
  template void slice_transition<T>(T*, const T*, const T*, const T*, const GdrShape&, int64_t);       \
  template void prefix_states<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t); \
  template void suffix_final_grads<T>(T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t);
NEXTRON_INSTANTIATE(float)
NEXTRON_INSTANTIATE(double)
#undef NEXTRON_INSTANTIATE

}  // namespace nextron::cpu
