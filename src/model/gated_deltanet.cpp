#include "model/gated_deltanet.h"

#include <cmath>
#include <numeric>

namespace nextron {

namespace {

std::vector<int32_t> iota_cols(int64_t begin, int64_t n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), static_cast<int32_t>(begin));
  return v;
}

}  // namespace

GatedDeltaNet::GatedDeltaNet(const ModelConfig& config, ModuleWeights weights, Ops& ops)
    : c_(config), wt_(std::move(weights)), ops_(ops) {
  // in_proj_qkvz rows of key-head group i are [q (dk) | k (dk) | v (r dv) | z (r dv)], in_proj_ba rows
  // [b (r) | a (r)] (r = Hv / Hk). The conv runs over [q of all heads | k of all heads | v of all heads].
  const int64_t Hk = c_.linear_num_key_heads, dk = c_.linear_key_head_dim, r = c_.linear_num_value_heads / Hk,
                rdv = r * c_.linear_value_head_dim, group = 2 * dk + 2 * rdv, KD = c_.key_dim();
  std::vector<int32_t> mixed(c_.conv_dim()), z, b, a;
  for (int64_t i = 0; i < Hk; ++i) {
    for (int64_t j = 0; j < dk; ++j) {
      mixed[i * dk + j] = static_cast<int32_t>(i * group + j);
      mixed[KD + i * dk + j] = static_cast<int32_t>(i * group + dk + j);
    }
    for (int64_t j = 0; j < rdv; ++j) {
      mixed[2 * KD + i * rdv + j] = static_cast<int32_t>(i * group + 2 * dk + j);
      z.push_back(static_cast<int32_t>(i * group + 2 * dk + rdv + j));
    }
    for (int64_t j = 0; j < r; ++j) {
      b.push_back(static_cast<int32_t>(i * 2 * r + j));
      a.push_back(static_cast<int32_t>(i * 2 * r + r + j));
    }
  }
  mixed_cols_ = ops_.index_table(mixed);
  z_cols_ = ops_.index_table(z);
  b_cols_ = ops_.index_table(b);
  a_cols_ = ops_.index_table(a);
  q_cols_ = ops_.index_table(iota_cols(0, KD));
  k_cols_ = ops_.index_table(iota_cols(KD, KD));
  v_cols_ = ops_.index_table(iota_cols(2 * KD, c_.value_dim()));
}

void GatedDeltaNet::forward(Saved& s, const Tensor& x, Tensor& y, int64_t B, int64_t S) {
  const int64_t N = B * S, Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads, dk = c_.linear_key_head_dim,
                dv = c_.linear_value_head_dim, KD = c_.key_dim(), VD = c_.value_dim(), CD = c_.conv_dim();
  s.B = B;
  s.S = S;
  s.x = x;
  Tensor& qkvz = ops_.act(qkvz_, {N, 2 * KD + 2 * VD});
  Tensor& ba = ops_.act(ba_, {N, 2 * Hv});
  ops_.linear_forward(qkvz, x, wt_.p("in_proj_qkvz"), nullptr);
  ops_.linear_forward(ba, x, wt_.p("in_proj_ba"), nullptr);
  Tensor& mixed = ops_.act(s.mixed, {B, S, CD});
  Tensor& z = ops_.act(s.z, {N, Hv * dv});
  Tensor& b = ops_.act(s.b, {N, Hv});
  Tensor& a = ops_.act(s.a, {N, Hv});
  Tensor mixed_rows = mixed.reshape({N, CD});
  ops_.gather_cols(mixed_rows, qkvz, mixed_cols_);
  ops_.gather_cols(z, qkvz, z_cols_);
  ops_.gather_cols(b, ba, b_cols_);
  ops_.gather_cols(a, ba, a_cols_);

  Tensor& conv = ops_.act(conv_, {B, S, CD});
  ops_.conv1d_silu_forward(conv, mixed, wt_.p("conv1d"));
  Tensor conv_rows = conv.reshape({N, CD});
  Tensor& q = ops_.act(s.q, {B, S, Hk, dk});
  Tensor& k = ops_.act(s.k, {B, S, Hk, dk});
  Tensor& v = ops_.act(s.v, {B, S, Hv, dv});
  Tensor q_rows = q.reshape({N, KD}), k_rows = k.reshape({N, KD}), v_rows = v.reshape({N, VD});
  ops_.gather_cols(q_rows, conv_rows, q_cols_);
  ops_.gather_cols(k_rows, conv_rows, k_cols_);
  ops_.gather_cols(v_rows, conv_rows, v_cols_);
  Tensor& qn = ops_.act(recompute_core_ ? rc_qn_ : s.qn, {B, S, Hk, dk});
  Tensor& kn = ops_.act(recompute_core_ ? rc_kn_ : s.kn, {B, S, Hk, dk});
  ops_.l2norm_forward(qn, q, dk);
  ops_.l2norm_forward(kn, k, dk);

  Tensor& beta = ops_.f32(s.beta, {B, S, Hv});
  Tensor& g = ops_.f32(s.g, {B, S, Hv});
  ops_.gdn_gates_forward(beta, g, b, a, wt_.p("A_log"), wt_.p("dt_bias"));

  Tensor& o = ops_.act(recompute_core_ ? rc_o_ : s.o, {B, S, Hv, dv});
  ops_.gated_delta_rule_forward(o, qn, kn, v, g, beta, 1.0 / std::sqrt(double(dk)));
  Tensor& on = ops_.act(s.on, {N, VD});
  ops_.rmsnorm_gated_forward(on, ops_.f32(s.o_rstd, {N * Hv}), o, z, wt_.p("norm"), c_.rms_norm_eps);
  ops_.linear_forward(y, on, wt_.p("out_proj"), nullptr);
}

void GatedDeltaNet::backward(const Saved& s, const Tensor& dy, Tensor& dx) {
  const int64_t B = s.B, S = s.S, N = B * S, Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads,
                dk = c_.linear_key_head_dim, dv = c_.linear_value_head_dim, KD = c_.key_dim(), VD = c_.value_dim(),
                CD = c_.conv_dim();
  if (recompute_core_) {
    ops_.l2norm_forward(ops_.act(rc_qn_, {B, S, Hk, dk}), s.q, dk);
    ops_.l2norm_forward(ops_.act(rc_kn_, {B, S, Hk, dk}), s.k, dk);
    ops_.gated_delta_rule_forward(ops_.act(rc_o_, {B, S, Hv, dv}), rc_qn_, rc_kn_, s.v, s.g, s.beta,
                                  1.0 / std::sqrt(double(dk)));
  }
  const Tensor& qn = recompute_core_ ? rc_qn_ : s.qn;
  const Tensor& kn = recompute_core_ ? rc_kn_ : s.kn;
  const Tensor& o = recompute_core_ ? rc_o_ : s.o;
  Tensor& don = ops_.act_zeroed(don_, {N, VD});
  ops_.linear_backward(&don, wt_.p("out_proj"), nullptr, dy, s.on);
  Tensor& d_o = ops_.act_zeroed(do_, {B, S, Hv, dv});
  Tensor& dz = ops_.act_zeroed(dz_, {N, Hv * dv});
  ops_.rmsnorm_gated_backward(&d_o, &dz, wt_.p("norm"), don, o, s.z, s.o_rstd);

  Tensor& dqn = ops_.act_zeroed(dqn_, {B, S, Hk, dk});
  Tensor& dkn = ops_.act_zeroed(dkn_, {B, S, Hk, dk});
  Tensor& dvals = ops_.act_zeroed(dv_, {B, S, Hv, dv});
  Tensor& dbeta = ops_.f32_zeroed(dbeta_, {B, S, Hv});
  Tensor& dg = ops_.f32_zeroed(dg_, {B, S, Hv});
  ops_.gated_delta_rule_backward(dqn, dkn, dvals, dg, dbeta, d_o, qn, kn, s.v, s.g, s.beta,
                                 1.0 / std::sqrt(double(dk)));
  Tensor& db = ops_.act_zeroed(db_, {N, Hv});
  Tensor& da = ops_.act_zeroed(da_, {N, Hv});
  ops_.gdn_gates_backward(db, da, wt_.p("A_log"), wt_.p("dt_bias"), dbeta, dg, s.b, s.a);
  Tensor& dq = ops_.act_zeroed(dq_, {N, KD});
  Tensor& dkeys = ops_.act_zeroed(dk_, {N, KD});
  ops_.l2norm_backward(dq, dqn, s.q, dk);
  ops_.l2norm_backward(dkeys, dkn, s.k, dk);
  Tensor& dconv = ops_.act(dconv_, {B, S, CD});
  Tensor dconv_rows = dconv.reshape({N, CD});
  ops_.scatter_cols(dconv_rows, dq, q_cols_, /*accumulate=*/false);
  ops_.scatter_cols(dconv_rows, dkeys, k_cols_, false);
  ops_.scatter_cols(dconv_rows, dvals.reshape({N, VD}), v_cols_, false);
  Tensor& dmixed = ops_.act_zeroed(dmixed_, {B, S, CD});
  ops_.conv1d_silu_backward(dmixed, wt_.p("conv1d"), dconv, s.mixed);

  Tensor& dqkvz = ops_.act(dqkvz_, {N, 2 * KD + 2 * VD});
  Tensor& dba = ops_.act(dba_, {N, 2 * Hv});
  ops_.scatter_cols(dqkvz, dmixed.reshape({N, CD}), mixed_cols_, false);
  ops_.scatter_cols(dqkvz, dz, z_cols_, false);
  ops_.scatter_cols(dba, db, b_cols_, false);
  ops_.scatter_cols(dba, da, a_cols_, false);
  ops_.linear_backward(&dx, wt_.p("in_proj_qkvz"), nullptr, dqkvz, s.x);
  ops_.linear_backward(&dx, wt_.p("in_proj_ba"), nullptr, dba, s.x);
}

}  // namespace nextron
