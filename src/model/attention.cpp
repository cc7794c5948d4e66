#include "model/attention.h"

#include <cmath>

namespace nextron {

GatedAttention::GatedAttention(const ModelConfig& config, ModuleWeights weights, Ops& ops)
    : c_(config), wt_(std::move(weights)), ops_(ops) {
  // q_proj's output holds per head [query (D) | gate (D)]: the query columns are gathered into (N, NH, D); the gate
  // is read in place (row stride 2D per head).
  const int64_t NH = c_.num_attention_heads, D = c_.head_dim;
  std::vector<int32_t> q_cols;
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t d = 0; d < D; ++d) q_cols.push_back(static_cast<int32_t>(h * 2 * D + d));
  std::vector<int32_t> gate_cols;
  for (int32_t c : q_cols) gate_cols.push_back(static_cast<int32_t>(c + D));
  q_cols_ = ops_.index_table(q_cols);
  gate_cols_ = ops_.index_table(gate_cols);
}

void GatedAttention::rope_tables_for(int64_t S) {
  if (S == rope_S_) return;
  ops_.rope_tables(cos_, sin_, S, c_.rotary_dim(), c_.rope_theta);
  rope_S_ = S;
}

std::pair<Tensor, Tensor> GatedAttention::rope_rows(int64_t pos0, int64_t S) {
  rope_tables_for(pos0 + S);
  if (pos0 == 0 && S == rope_S_) return {cos_, sin_};
  const int64_t W = cos_.numel() / rope_S_;
  return {Tensor::view_of(cos_, pos0 * W, {S, W}), Tensor::view_of(sin_, pos0 * W, {S, W})};
}

void GatedAttention::forward(Saved& s, const Tensor& x, Tensor& y, int64_t B, int64_t S) {
  const int64_t N = B * S, NH = c_.num_attention_heads, NKV = c_.num_key_value_heads, D = c_.head_dim,
                R = c_.rotary_dim();
  const auto [cos, sin] = rope_rows(cp_active() ? cp_->rank() * S : 0, S);
  s.B = B;
  s.S = S;
  s.x = x;
  ParamRef bias;
  Tensor& qg = ops_.act(s.qg, {N, NH * 2 * D});  // per head [query (D) | gate (D)]
  ops_.linear_forward(qg, x, wt_.p("q_proj"), wt_.p_or_null("q_proj_bias", bias));
  Tensor& q_raw = ops_.act(s.q_raw, {N, NH * D});
  ops_.gather_cols(q_raw, qg, q_cols_);
  Tensor& k_raw = ops_.act(s.k_raw, {N, NKV * D});
  Tensor& v = ops_.act(s.v, {B, S, NKV, D});
  ops_.linear_forward(k_raw, x, wt_.p("k_proj"), wt_.p_or_null("k_proj_bias", bias));
  ops_.linear_forward(v, x, wt_.p("v_proj"), wt_.p_or_null("v_proj_bias", bias));

  // Per-head norms, then RoPE on the first R dims of every head.
  Tensor& q = ops_.act(s.q, {B, S, NH, D});
  Tensor& k = ops_.act(s.k, {B, S, NKV, D});
  ops_.rmsnorm_forward(q, ops_.f32(s.q_rstd, {N * NH}), q_raw, wt_.p("q_norm"), c_.rms_norm_eps);
  ops_.rmsnorm_forward(k, ops_.f32(s.k_rstd, {N * NKV}), k_raw, wt_.p("k_norm"), c_.rms_norm_eps);
  ops_.rope_forward(q, q, cos, sin, R);
  ops_.rope_forward(k, k, cos, sin, R);
  if (cp_active()) {
    cp_->kv_all_gather(ops_, k, s.k_full);
    cp_->kv_all_gather(ops_, v, s.v_full);
    s.k_full = s.k_full.reshape({B, s.k_full.dim(1), NKV, D});
    s.v_full = s.v_full.reshape({B, s.v_full.dim(1), NKV, D});
  }
  const Tensor& keys = cp_active() ? s.k_full : k;
  const Tensor& values = cp_active() ? s.v_full : v;

  Tensor& o = ops_.act(recompute_core_ ? rc_o_ : s.o, {B, S, NH, D});
  ops_.attention_forward(o, ops_.f32(recompute_core_ ? rc_lse_ : s.lse, {B, NH, S}), q, keys, values,
                         1.0 / std::sqrt(double(D)));
  Tensor& og = ops_.act(s.og, {N, NH * D});
  // The gate is the second half of each head's 2D columns of qg: (N * NH, D) rows with stride 2D.
  Tensor o_rows = o.reshape({N * NH, D});
  Tensor og_rows = og.reshape({N * NH, D});
  Tensor gate = Tensor::view_of(qg, D, {N * NH, D});
  ops_.sigmoid_gate_forward(og_rows, o_rows, gate, D, 2 * D);
  ops_.linear_forward(y, og, wt_.p("o_proj"), wt_.p_or_null("o_proj_bias", bias));
}

void GatedAttention::backward(const Saved& s, const Tensor& dy, Tensor& dx) {
  const int64_t B = s.B, S = s.S, N = B * S, NH = c_.num_attention_heads, NKV = c_.num_key_value_heads, D = c_.head_dim,
                R = c_.rotary_dim();
  const auto [cos, sin] = rope_rows(cp_active() ? cp_->rank() * S : 0, S);
  const Tensor& keys = cp_active() ? s.k_full : s.k;
  const Tensor& values = cp_active() ? s.v_full : s.v;
  ParamRef bias;
  if (recompute_core_)
    ops_.attention_forward(ops_.act(rc_o_, {B, S, NH, D}), ops_.f32(rc_lse_, {B, NH, S}), s.q, keys, values,
                           1.0 / std::sqrt(double(D)));
  const Tensor& o = recompute_core_ ? rc_o_ : s.o;
  const Tensor& lse = recompute_core_ ? rc_lse_ : s.lse;
  Tensor& dog = ops_.act_zeroed(dog_, {N, NH * D});
  ops_.linear_backward(&dog, wt_.p("o_proj"), wt_.p_or_null("o_proj_bias", bias), dy, s.og);
  // dqg holds per head [dquery | dgate]; the gate gradient is written in place into its columns.
  Tensor& dqg = ops_.act_zeroed(dqg_, {N, NH * 2 * D});
  Tensor& d_o = ops_.act_zeroed(do_, {B, S, NH, D});
  Tensor d_o_rows = d_o.reshape({N * NH, D});
  Tensor dgate = Tensor::view_of(dqg, D, {N * NH, D});
  Tensor gate = Tensor::view_of(s.qg, D, {N * NH, D});
  ops_.sigmoid_gate_backward(&d_o_rows, &dgate, dog.reshape({N * NH, D}), o.reshape({N * NH, D}), gate, D, 2 * D);

  Tensor& dq = ops_.act(dq_, {B, S, NH, D});
  Tensor& dk = ops_.act(dk_, {B, S, NKV, D});
  Tensor& dv = ops_.act(dv_, {B, S, NKV, D});
  if (cp_active()) {
    // Gradients of every gathered key and value; each slice's owner receives their sum over the ranks.
    const int64_t L = keys.dim(1);
    Tensor& dk_full = ops_.act(dk_full_, {B, L, NKV, D});
    Tensor& dv_full = ops_.act(dv_full_, {B, L, NKV, D});
    ops_.attention_backward(dq, dk_full, dv_full, d_o, s.q, keys, values, o, lse, 1.0 / std::sqrt(double(D)));
    Tensor dk_rows = dk.reshape({B, S, NKV * D}), dv_rows = dv.reshape({B, S, NKV * D});
    cp_->kv_reduce_scatter(ops_, dk_full.reshape({B, L, NKV * D}), dk_rows);
    cp_->kv_reduce_scatter(ops_, dv_full.reshape({B, L, NKV * D}), dv_rows);
  } else {
    ops_.attention_backward(dq, dk, dv, d_o, s.q, s.k, s.v, o, lse, 1.0 / std::sqrt(double(D)));
  }
  Tensor& dqn = ops_.act_zeroed(dqn_, {B, S, NH, D});
  Tensor& dkn = ops_.act_zeroed(dkn_, {B, S, NKV, D});
  ops_.rope_backward(dqn, dq, cos, sin, R);
  ops_.rope_backward(dkn, dk, cos, sin, R);
  Tensor& dq_raw = ops_.act_zeroed(dq_raw_, {N, NH * D});
  Tensor& dk_raw = ops_.act_zeroed(dk_raw_, {N, NKV * D});
  ops_.rmsnorm_backward(&dq_raw, wt_.p("q_norm"), dqn, s.q_raw, s.q_rstd);
  ops_.rmsnorm_backward(&dk_raw, wt_.p("k_norm"), dkn, s.k_raw, s.k_rstd);

  ops_.scatter_cols(dqg, dq_raw, q_cols_, /*accumulate=*/false);
  ops_.linear_backward(&dx, wt_.p("q_proj"), wt_.p_or_null("q_proj_bias", bias), dqg, s.x);
  ops_.linear_backward(&dx, wt_.p("k_proj"), wt_.p_or_null("k_proj_bias", bias), dk_raw, s.x);
  ops_.linear_backward(&dx, wt_.p("v_proj"), wt_.p_or_null("v_proj_bias", bias), dv, s.x);
}

}  // namespace nextron
