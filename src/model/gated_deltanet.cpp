#include "model/gated_deltanet.h"

#include <cmath>
#include <cstring>

#include "kernels/cpu/conv1d.h"
#include "kernels/cpu/gated_delta_rule.h"
#include "kernels/cpu/gdn_gates.h"
#include "kernels/cpu/l2norm.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/rmsnorm_gated.h"

namespace nextron {

using namespace cpu;

namespace {

// The projections are grouped per key head: in_proj_qkvz rows of group i are [q (dk) | k (dk) | v (r dv) | z (r dv)],
// in_proj_ba rows [b (r) | a (r)]. The conv runs over [q of all heads | k of all heads | v of all heads].
struct GroupLayout {
  int64_t Hk, dk, rdv, r;
  int64_t group() const { return 2 * dk + 2 * rdv; }
  int64_t key_dim() const { return Hk * dk; }
};

// Copies one row of grouped qkvz/ba into the conv input [q|k|v], z, b and a (or back, for the gradients).
template <bool kToGrouped>
void regroup_row(float* qkvz, float* ba, float* mixed, float* z, float* b, float* a, const GroupLayout& L) {
  auto move = [](float* grouped, float* flat, int64_t n) {
    if (kToGrouped)
      std::memcpy(grouped, flat, n * sizeof(float));
    else
      std::memcpy(flat, grouped, n * sizeof(float));
  };
  for (int64_t i = 0; i < L.Hk; ++i) {
    float* grp = qkvz + i * L.group();
    move(grp, mixed + i * L.dk, L.dk);
    move(grp + L.dk, mixed + L.key_dim() + i * L.dk, L.dk);
    move(grp + 2 * L.dk, mixed + 2 * L.key_dim() + i * L.rdv, L.rdv);
    move(grp + 2 * L.dk + L.rdv, z + i * L.rdv, L.rdv);
    move(ba + i * 2 * L.r, b + i * L.r, L.r);
    move(ba + i * 2 * L.r + L.r, a + i * L.r, L.r);
  }
}

// Copies columns [off, off + n) of every row of src (row length ld) into the dense (rows, n) dst, or back.
void copy_cols(float* dst, const float* src, int64_t rows, int64_t ld, int64_t off, int64_t n) {
  for (int64_t t = 0; t < rows; ++t) std::memcpy(dst + t * n, src + t * ld + off, n * sizeof(float));
}
void add_cols(float* dst, const float* src, int64_t rows, int64_t ld, int64_t off, int64_t n) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < n; ++j) dst[t * ld + off + j] += src[t * n + j];
}

}  // namespace

GatedDeltaNet::GatedDeltaNet(const ModelConfig& config, ModuleWeights weights) : c_(config), wt_(std::move(weights)) {}

void GatedDeltaNet::forward(const float* x, float* y, int64_t B, int64_t S) {
  const int64_t N = B * S, H = c_.hidden_size, Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads,
                dk = c_.linear_key_head_dim, dv = c_.linear_value_head_dim, KD = c_.key_dim(), VD = c_.value_dim(),
                CD = c_.conv_dim(), Kc = c_.linear_conv_kernel_dim;
  const GroupLayout L{Hk, dk, (Hv / Hk) * dv, Hv / Hk};
  B_ = B;
  S_ = S;
  x_ = x;
  float* qkvz = buffer(qkvz_, {N, 2 * KD + 2 * VD});
  float* ba = buffer(ba_, {N, 2 * Hv});
  linear_forward<float>(qkvz, x, wt_.w("in_proj_qkvz"), nullptr, N, H, 2 * KD + 2 * VD);
  linear_forward<float>(ba, x, wt_.w("in_proj_ba"), nullptr, N, H, 2 * Hv);
  float* mixed = buffer(mixed_, {N, CD});
  float* z = buffer(z_, {N, Hv, dv});
  float* b = buffer(b_, {N, Hv});
  float* a = buffer(a_, {N, Hv});
#pragma omp parallel for
  for (int64_t t = 0; t < N; ++t)
    regroup_row<false>(qkvz + t * (2 * KD + 2 * VD), ba + t * 2 * Hv, mixed + t * CD, z + t * VD, b + t * Hv,
                       a + t * Hv, L);

  float* conv = buffer(conv_, {N, CD});
  conv1d_forward(conv, mixed, wt_.w("conv1d"), B, S, CD, Kc);
  float* q = buffer(q_, {N, Hk, dk});
  float* k = buffer(k_, {N, Hk, dk});
  float* v = buffer(v_, {N, Hv, dv});
  copy_cols(q, conv, N, CD, 0, KD);
  copy_cols(k, conv, N, CD, KD, KD);
  copy_cols(v, conv, N, CD, 2 * KD, VD);
  float* qn = buffer(qn_, {N, Hk, dk});
  float* kn = buffer(kn_, {N, Hk, dk});
  l2norm_forward(qn, q, N * Hk, dk, 1e-6f);
  l2norm_forward(kn, k, N * Hk, dk, 1e-6f);

  float* beta = buffer(beta_, {N, Hv});
  float* g = buffer(g_, {N, Hv});
  gdn_gates_forward(beta, g, b, a, wt_.w("A_log"), wt_.w("dt_bias"), N, Hv);

  float* o = buffer(o_, {N, Hv, dv});
  const GdrShape shape{B, S, Hk, Hv, dk, dv};
  gated_delta_rule_chunked_forward<float>(o, nullptr, qn, kn, v, g, beta, nullptr, shape, 1.0f / std::sqrt(float(dk)));
  float* on = buffer(on_, {N, VD});
  rmsnorm_gated_forward(on, buffer(o_rstd_, {N * Hv}), o, z, wt_.w("norm"), N * Hv, dv,
                        static_cast<float>(c_.rms_norm_eps));
  linear_forward<float>(y, on, wt_.w("out_proj"), nullptr, N, VD, H);
}

void GatedDeltaNet::backward(const float* dy, float* dx) {
  const int64_t B = B_, S = S_, N = B * S, H = c_.hidden_size, Hk = c_.linear_num_key_heads,
                Hv = c_.linear_num_value_heads, dk = c_.linear_key_head_dim, dv = c_.linear_value_head_dim,
                KD = c_.key_dim(), VD = c_.value_dim(), CD = c_.conv_dim(), Kc = c_.linear_conv_kernel_dim;
  const GroupLayout L{Hk, dk, (Hv / Hk) * dv, Hv / Hk};
  float* don = zeroed(don_, {N, VD});
  linear_backward<float>(don, wt_.g("out_proj"), nullptr, dy, on_.f32(), wt_.w("out_proj"), N, VD, H);
  float* d_o = zeroed(do_, {N, Hv, dv});
  float* dz = zeroed(dz_, {N, Hv, dv});
  rmsnorm_gated_backward(d_o, dz, wt_.g("norm"), don, o_.f32(), z_.f32(), wt_.w("norm"), o_rstd_.f32(), N * Hv, dv);

  float* dqn = zeroed(dqn_, {N, Hk, dk});
  float* dkn = zeroed(dkn_, {N, Hk, dk});
  float* dconv = zeroed(dconv_, {N, CD});
  float* dvals = zeroed(dv_, {N, Hv, dv});
  float* dbeta = zeroed(dbeta_, {N, Hv});
  float* dg = zeroed(dg_, {N, Hv});
  const GdrShape shape{B, S, Hk, Hv, dk, dv};
  gated_delta_rule_chunked_backward<float>(dqn, dkn, dvals, dg, dbeta, nullptr, d_o, nullptr, qn_.f32(), kn_.f32(),
                                           v_.f32(), g_.f32(), beta_.f32(), nullptr, shape,
                                           1.0f / std::sqrt(float(dk)));
  float* db = zeroed(db_, {N, Hv});
  float* da = zeroed(da_, {N, Hv});
  gdn_gates_backward(db, da, wt_.g("A_log"), wt_.g("dt_bias"), dbeta, dg, b_.f32(), a_.f32(), wt_.w("A_log"),
                     wt_.w("dt_bias"), N, Hv);
  float* dq = zeroed(dq_, {N, Hk, dk});
  float* dkeys = zeroed(dk_, {N, Hk, dk});
  l2norm_backward(dq, dqn, q_.f32(), N * Hk, dk, 1e-6f);
  l2norm_backward(dkeys, dkn, k_.f32(), N * Hk, dk, 1e-6f);
  add_cols(dconv, dq, N, CD, 0, KD);
  add_cols(dconv, dkeys, N, CD, KD, KD);
  add_cols(dconv, dvals, N, CD, 2 * KD, VD);
  float* dmixed = zeroed(dmixed_, {N, CD});
  conv1d_backward(dmixed, wt_.g("conv1d"), dconv, mixed_.f32(), wt_.w("conv1d"), B, S, CD, Kc);

  float* dqkvz = buffer(dqkvz_, {N, 2 * KD + 2 * VD});
  float* dba = buffer(dba_, {N, 2 * Hv});
#pragma omp parallel for
  for (int64_t t = 0; t < N; ++t)
    regroup_row<true>(dqkvz + t * (2 * KD + 2 * VD), dba + t * 2 * Hv, dmixed + t * CD, dz + t * VD, db + t * Hv,
                      da + t * Hv, L);
  linear_backward<float>(dx, wt_.g("in_proj_qkvz"), nullptr, dqkvz, x_, wt_.w("in_proj_qkvz"), N, H, 2 * KD + 2 * VD);
  linear_backward<float>(dx, wt_.g("in_proj_ba"), nullptr, dba, x_, wt_.w("in_proj_ba"), N, H, 2 * Hv);
}

}  // namespace nextron
