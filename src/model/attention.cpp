#include "model/attention.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace nextron {

GatedAttention::GatedAttention(const ModelConfig& config, ModuleWeights weights, Ops& ops,
                               std::shared_ptr<Scratch> scratch)
    : c_(config), wt_(std::move(weights)), ops_(ops), sc_(scratch ? std::move(scratch) : std::make_shared<Scratch>()) {
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

std::pair<Tensor, Tensor> GatedAttention::rope_rows(const std::vector<CpSegment>& segments) {
  const CpSegment& last = segments.back();
  rope_tables_for(std::max(rope_S_, last.global_begin + last.length));
  const int64_t W = cos_.numel() / rope_S_, S = last.local_begin + last.length;
  if (segments.size() == 1) {
    const int64_t pos0 = last.global_begin;
    if (pos0 == 0 && S == rope_S_) return {cos_, sin_};
    return {Tensor::view_of(cos_, pos0 * W, {S, W}), Tensor::view_of(sin_, pos0 * W, {S, W})};
  }
  // Rows at the segments' positions, one after the other as the local tokens are.
  ops_.ensure(seg_cos_, {S, W}, cos_.dtype());
  ops_.ensure(seg_sin_, {S, W}, sin_.dtype());
  for (const CpSegment& g : segments) {
    seg_cos_.copy_elements_from(g.local_begin * W, cos_, g.global_begin * W, g.length * W);
    seg_sin_.copy_elements_from(g.local_begin * W, sin_, g.global_begin * W, g.length * W);
  }
  return {seg_cos_, seg_sin_};
}

std::vector<CpSegment> GatedAttention::segments_of(int64_t S) const {
  return cp_active() ? cp_->segments_of(S) : std::vector<CpSegment>{CpSegment{0, 0, 0, S}};
}

namespace {
// (B, S, W) rows <-> (G, B, L, W) segment-major rows, S = G L (the zigzag's two segments as separate batches).
void to_segments(Tensor& dst, const Tensor& src, int64_t B, int64_t G) {
  const int64_t S = src.dim(1), L = S / G, W = src.numel() / (B * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < G; ++i) dst.copy_elements_from((i * B + b) * L * W, src, (b * S + i * L) * W, L * W);
}
void from_segments(Tensor& dst, const Tensor& src, int64_t B, int64_t G) {
  const int64_t S = dst.dim(1), L = S / G, W = dst.numel() / (B * S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < G; ++i) dst.copy_elements_from((b * S + i * L) * W, src, (i * B + b) * L * W, L * W);
}
}  // namespace

void GatedAttention::core_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& keys, const Tensor& values,
                                  const std::vector<CpSegment>& segments) {
  const double scale = 1.0 / std::sqrt(double(c_.head_dim));
  const int64_t G = static_cast<int64_t>(segments.size());
  if (G == 1) {
    ops_.attention_forward(o, lse, q, keys, values, scale);
    return;
  }
  // Each segment's queries attend to the keys up to its end (bottom-right causal), as a batch of their own; the last
  // segment's context is all of `keys`, an earlier one's a prefix of every sequence's (copied out).
  const int64_t B = q.dim(0), L = q.dim(1) / G, NH = q.dim(2), D = q.dim(3), n = B * L * NH * D;
  Tensor& qs = ops_.act(seg_q_, {G, B, L, NH, D});
  Tensor& os = ops_.act(seg_o_, {G, B, L, NH, D});
  to_segments(qs, q, B, G);
  for (int64_t i = 0; i < G; ++i) {
    Tensor oi = Tensor::view_of(os, i * n, {B, L, NH, D}), lse_i = Tensor::view_of(lse, i * B * NH * L, {B, NH, L});
    const int64_t Sk = (segments[static_cast<size_t>(i)].chunk + 1) * L;
    const Tensor& k = i + 1 == G ? keys : key_prefix(seg_k_, keys, Sk);
    const Tensor& v = i + 1 == G ? values : key_prefix(seg_v_, values, Sk);
    ops_.attention_forward(oi, lse_i, Tensor::view_of(qs, i * n, {B, L, NH, D}), k, v, scale);
  }
  from_segments(o, os, B, G);
}

void GatedAttention::core_backward(Tensor& dq, Tensor& dkeys, Tensor& dvalues, const Tensor& d_o, const Tensor& q,
                                   const Tensor& keys, const Tensor& values, const Tensor& o, const Tensor& lse,
                                   const std::vector<CpSegment>& segments) {
  const double scale = 1.0 / std::sqrt(double(c_.head_dim));
  const int64_t G = static_cast<int64_t>(segments.size());
  if (G == 1) {
    ops_.attention_backward(dq, dkeys, dvalues, d_o, q, keys, values, o, lse, scale);
    return;
  }
  const int64_t B = q.dim(0), L = q.dim(1) / G, NH = q.dim(2), D = q.dim(3), n = B * L * NH * D;
  const int64_t Sk_all = keys.dim(1), W = keys.numel() / (B * Sk_all);
  Tensor& qs = ops_.act(seg_q_, {G, B, L, NH, D});
  Tensor& os = ops_.act(seg_o_, {G, B, L, NH, D});
  Tensor& dos = ops_.act(seg_do_, {G, B, L, NH, D});
  Tensor& dqs = ops_.act(seg_dq_, {G, B, L, NH, D});
  to_segments(qs, q, B, G);
  to_segments(os, o, B, G);
  to_segments(dos, d_o, B, G);
  // The last segment's gradients overwrite dkeys / dvalues; an earlier one's are added into their prefix rows.
  for (int64_t i = G - 1; i >= 0; --i) {
    Tensor dqi = Tensor::view_of(dqs, i * n, {B, L, NH, D});
    const Tensor qi = Tensor::view_of(qs, i * n, {B, L, NH, D}), oi = Tensor::view_of(os, i * n, {B, L, NH, D}),
                 doi = Tensor::view_of(dos, i * n, {B, L, NH, D}),
                 lse_i = Tensor::view_of(lse, i * B * NH * L, {B, NH, L});
    if (i + 1 == G) {
      ops_.attention_backward(dqi, dkeys, dvalues, doi, qi, keys, values, oi, lse_i, scale);
      continue;
    }
    const int64_t Sk = (segments[static_cast<size_t>(i)].chunk + 1) * L;
    Tensor& dk = ops_.act(seg_dk_, {B, Sk, keys.dim(2), keys.dim(3)});
    Tensor& dv = ops_.act(seg_dv_, {B, Sk, keys.dim(2), keys.dim(3)});
    ops_.attention_backward(dqi, dk, dv, doi, qi, key_prefix(seg_k_, keys, Sk), key_prefix(seg_v_, values, Sk), oi,
                            lse_i, scale);
    for (int64_t b = 0; b < B; ++b)
      for (auto [full, part] : {std::pair<Tensor*, Tensor*>{&dkeys, &dk}, {&dvalues, &dv}}) {
        Tensor rows = Tensor::view_of(*full, b * Sk_all * W, {Sk * W});
        ops_.add(rows, rows, Tensor::view_of(*part, b * Sk * W, {Sk * W}));
      }
  }
  from_segments(dq, dqs, B, G);
}

Tensor& GatedAttention::key_prefix(Tensor& dst, const Tensor& keys, int64_t Sk) {
  const int64_t B = keys.dim(0), S_all = keys.dim(1), W = keys.numel() / (B * S_all);
  ops_.act(dst, {B, Sk, keys.dim(2), keys.dim(3)});
  for (int64_t b = 0; b < B; ++b) dst.copy_elements_from(b * Sk * W, keys, b * S_all * W, Sk * W);
  return dst;
}

void GatedAttention::project(Saved& s, const Tensor& x, int64_t B, int64_t S) {
  const int64_t N = B * S, NH = c_.num_attention_heads, NKV = c_.num_key_value_heads, D = c_.head_dim;
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
}

void GatedAttention::finish(Saved& s, const Tensor& o, Tensor& y) {
  const int64_t N = s.B * s.S, NH = c_.num_attention_heads, D = c_.head_dim;
  ParamRef bias;
  Tensor& og = ops_.act(s.og, {N, NH * D});
  // The gate is the second half of each head's 2D columns of qg: (N * NH, D) rows with stride 2D.
  Tensor o_rows = o.reshape({N * NH, D});
  Tensor og_rows = og.reshape({N * NH, D});
  Tensor gate = Tensor::view_of(s.qg, D, {N * NH, D});
  ops_.sigmoid_gate_forward(og_rows, o_rows, gate, D, 2 * D);
  ops_.linear_forward(y, og, wt_.p("o_proj"), wt_.p_or_null("o_proj_bias", bias));
}

void GatedAttention::forward(Saved& s, const Tensor& x, Tensor& y, int64_t B, int64_t S) {
  const int64_t NH = c_.num_attention_heads, NKV = c_.num_key_value_heads, D = c_.head_dim, R = c_.rotary_dim();
  const std::vector<CpSegment> segments = segments_of(S);
  const auto [cos, sin] = rope_rows(segments);
  project(s, x, B, S);
  Tensor &q = s.q, &k = s.k, &v = s.v;
  ops_.rope_forward(q, q, cos, sin, R);
  ops_.rope_forward(k, k, cos, sin, R);
  if (cp_active()) {
    cp_->kv_all_gather(ops_, k.reshape({B, S, NKV * D}), s.k_full);
    cp_->kv_all_gather(ops_, v.reshape({B, S, NKV * D}), s.v_full);
    s.k_full = s.k_full.reshape({B, s.k_full.dim(1), NKV, D});
    s.v_full = s.v_full.reshape({B, s.v_full.dim(1), NKV, D});
  }
  Tensor& o = ops_.act(recompute_core_ ? rc_o_ : s.o, {B, S, NH, D});
  core_forward(o, ops_.f32(recompute_core_ ? rc_lse_ : s.lse, {B, NH, S}), q, cp_active() ? s.k_full : k,
               cp_active() ? s.v_full : v, segments);
  finish(s, o, y);
}

void GatedAttention::forward_cached(LayerCache& cache, const std::vector<int64_t>& lengths, const Tensor& x, Tensor& y,
                                    int64_t B, int64_t S) {
  const int64_t NH = c_.num_attention_heads, NKV = c_.num_key_value_heads, D = c_.head_dim, R = c_.rotary_dim(),
                C = cache.k.dim(1), W = NKV * D;
  const double scale = 1.0 / std::sqrt(double(D));
  Saved& s = cached_;
  project(s, x, B, S);
  rope_tables_for(std::max(rope_S_, C));
  const int64_t Wr = cos_.numel() / rope_S_;
  Tensor& o = ops_.act(s.o, {B, S, NH, D});
  Tensor& lse = ops_.f32(s.lse, {B, NH, S});
  // Sequences sit at different positions: each rotates its rows by its own positions, appends its keys and values
  // to its cache rows, and attends to all of them (its S queries are the last S of its keys: bottom-right causal).
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pos = lengths[static_cast<size_t>(b)];
    NEXTRON_CHECK(pos + S <= C, "generation: sequence ", b, " would hold ", pos + S,
                  " positions, more than its cache's capacity ", C);
    const Tensor cos = Tensor::view_of(cos_, pos * Wr, {S, Wr}), sin = Tensor::view_of(sin_, pos * Wr, {S, Wr});
    Tensor qb = Tensor::view_of(s.q, b * S * NH * D, {1, S, NH, D}),
           kb = Tensor::view_of(s.k, b * S * W, {1, S, NKV, D});
    ops_.rope_forward(qb, qb, cos, sin, R);
    ops_.rope_forward(kb, kb, cos, sin, R);
    cache.k.copy_elements_from((b * C + pos) * W, s.k, b * S * W, S * W);
    cache.v.copy_elements_from((b * C + pos) * W, s.v, b * S * W, S * W);
    const Tensor keys = Tensor::view_of(cache.k, b * C * W, {1, pos + S, NKV, D}),
                 values = Tensor::view_of(cache.v, b * C * W, {1, pos + S, NKV, D});
    Tensor ob = Tensor::view_of(o, b * S * NH * D, {1, S, NH, D}), lse_b = Tensor::view_of(lse, b * NH * S, {1, NH, S});
    ops_.attention_forward(ob, lse_b, qb, keys, values, scale);
  }
  finish(s, o, y);
}

void GatedAttention::backward(const Saved& s, const Tensor& dy, Tensor& dx) {
  const int64_t B = s.B, S = s.S, N = B * S, NH = c_.num_attention_heads, NKV = c_.num_key_value_heads, D = c_.head_dim,
                R = c_.rotary_dim();
  const std::vector<CpSegment> segments = segments_of(S);
  const auto [cos, sin] = rope_rows(segments);
  const Tensor& keys = cp_active() ? s.k_full : s.k;
  const Tensor& values = cp_active() ? s.v_full : s.v;
  ParamRef bias;
  if (recompute_core_)
    core_forward(ops_.act(rc_o_, {B, S, NH, D}), ops_.f32(rc_lse_, {B, NH, S}), s.q, keys, values, segments);
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
    // Gradients of every gathered key and value; each chunk's owner receives their sum over the ranks.
    const int64_t Sk = keys.dim(1);
    Tensor& dk_full = ops_.act(dk_full_, {B, Sk, NKV, D});
    Tensor& dv_full = ops_.act(dv_full_, {B, Sk, NKV, D});
    core_backward(dq, dk_full, dv_full, d_o, s.q, keys, values, o, lse, segments);
    Tensor dk_rows = dk.reshape({B, S, NKV * D}), dv_rows = dv.reshape({B, S, NKV * D});
    cp_->kv_reduce_scatter(ops_, dk_full.reshape({B, Sk, NKV * D}), dk_rows);
    cp_->kv_reduce_scatter(ops_, dv_full.reshape({B, Sk, NKV * D}), dv_rows);
  } else {
    core_backward(dq, dk, dv, d_o, s.q, s.k, s.v, o, lse, segments);
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
