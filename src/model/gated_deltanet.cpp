#include "model/gated_deltanet.h"

#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace nextron {

namespace {

std::vector<int32_t> iota_cols(int64_t begin, int64_t n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), static_cast<int32_t>(begin));
  return v;
}

// Elements [offset, offset + n) of `t` (any device; f32 or the activation dtype) as host floats, and back. Context
// parallelism exchanges its small boundary tensors (conv halos, states) through host memory.
std::vector<float> host_f32(Ops& ops, const Tensor& t, int64_t offset, int64_t n, Tensor& scratch) {
  std::vector<float> out(static_cast<size_t>(n));
  const Tensor view = Tensor::view_of(t, offset, {n});
  if (t.dtype() == DType::f32) {
    ops.download(out.data(), view, static_cast<size_t>(n) * sizeof(float));
  } else {
    Tensor& f = ops.f32(scratch, {n});
    ops.cast(f, view);
    ops.download(out.data(), f, static_cast<size_t>(n) * sizeof(float));
  }
  return out;
}

void put_f32(Ops& ops, Tensor& t, int64_t offset, const float* src, int64_t n, Tensor& scratch) {
  Tensor view = Tensor::view_of(t, offset, {n});
  if (t.dtype() == DType::f32) {
    ops.upload(view, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    Tensor& f = ops.f32(scratch, {n});
    ops.upload(f, src, static_cast<size_t>(n) * sizeof(float));
    ops.cast(view, f);
  }
}

// (B, S, ...) as (Bi, L, ...) with Bi L = B S: a sequence's G segments as G consecutive items (the same memory).
Tensor as_items(const Tensor& t, int64_t Bi, int64_t L) {
  Shape shape = t.shape();
  shape[0] = Bi;
  shape[1] = L;
  return t.reshape(shape);
}

}  // namespace

GatedDeltaNet::GatedDeltaNet(const ModelConfig& config, ModuleWeights weights, Ops& ops,
                             std::shared_ptr<Scratch> scratch)
    : c_(config), wt_(std::move(weights)), ops_(ops), sc_(scratch ? std::move(scratch) : std::make_shared<Scratch>()) {
  const int64_t KD = c_.key_dim();
  q_cols_ = ops_.index_table(iota_cols(0, KD));
  k_cols_ = ops_.index_table(iota_cols(KD, KD));
  v_cols_ = ops_.index_table(iota_cols(2 * KD, c_.value_dim()));
}

// Rows [first, first + n) of a (rows, IN) weight: its master, activation-dtype copy and gradient alike.
ParamRef GatedDeltaNet::weight_rows(const char* name, int64_t first, int64_t n) const {
  const ParamRef w = wt_.p(name);
  const int64_t in = w.w.shape()[1];
  auto rows = [&](const Tensor& t) { return Tensor::view_of(t, first * in, {n, in}); };
  return {rows(w.w), rows(w.w_act), rows(w.g)};
}

void GatedDeltaNet::project(Saved& s, const Tensor& x, int64_t B, int64_t S) {
  const int64_t N = B * S, Hv = c_.linear_num_value_heads, dv = c_.linear_value_head_dim, VD = c_.value_dim(),
                CD = c_.conv_dim();
  s.B = B;
  s.S = S;
  s.x = x;
  // The weights' rows are [q | k | v | z] and [b | a] of all heads (ParamTable, HfRowGroups): one product per part,
  // each writing its tensor whole.
  Tensor& mixed = ops_.act(s.mixed, {B, S, CD});
  Tensor mixed_rows = mixed.reshape({N, CD});
  ops_.linear_forward(mixed_rows, x, weight_rows("in_proj_qkvz", 0, CD), nullptr);
  ops_.linear_forward(ops_.act(s.z, {N, Hv * dv}), x, weight_rows("in_proj_qkvz", CD, VD), nullptr);
  ops_.linear_forward(ops_.act(s.b, {N, Hv}), x, weight_rows("in_proj_ba", 0, Hv), nullptr);
  ops_.linear_forward(ops_.act(s.a, {N, Hv}), x, weight_rows("in_proj_ba", Hv, Hv), nullptr);
}

void GatedDeltaNet::conv_output(Saved& s) {
  const int64_t B = s.B, S = s.S, N = B * S, Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads,
                dk = c_.linear_key_head_dim, dv = c_.linear_value_head_dim, KD = c_.key_dim();
  // One record tensor of three row-major blocks (the conv's split output): q, k and v are views of it.
  Tensor& qkv = ops_.act(s.qkv, {N * c_.conv_dim()});
  s.q = Tensor::view_of(qkv, 0, {B, S, Hk, dk});
  s.k = Tensor::view_of(qkv, N * KD, {B, S, Hk, dk});
  s.v = Tensor::view_of(qkv, 2 * N * KD, {B, S, Hv, dv});
}

void GatedDeltaNet::split_conv(Saved& s, const Tensor& conv) {
  const int64_t N = s.B * s.S, KD = c_.key_dim(), VD = c_.value_dim();
  conv_output(s);
  Tensor conv_rows = conv.reshape({N, c_.conv_dim()});
  Tensor q_rows = s.q.reshape({N, KD}), k_rows = s.k.reshape({N, KD}), v_rows = s.v.reshape({N, VD});
  ops_.gather_cols(q_rows, conv_rows, q_cols_);
  ops_.gather_cols(k_rows, conv_rows, k_cols_);
  ops_.gather_cols(v_rows, conv_rows, v_cols_);
}

void GatedDeltaNet::norms_and_gates(Saved& s, Tensor& qn, Tensor& kn) {
  const int64_t B = s.B, S = s.S, Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads,
                dk = c_.linear_key_head_dim;
  ops_.l2norm_forward(ops_.act(qn, {B, S, Hk, dk}), s.q, dk);
  ops_.l2norm_forward(ops_.act(kn, {B, S, Hk, dk}), s.k, dk);
  ops_.gdn_gates_forward(ops_.f32(s.beta, {B, S, Hv}), ops_.f32(s.g, {B, S, Hv}), s.b, s.a, wt_.p("A_log"),
                         wt_.p("dt_bias"));
}

void GatedDeltaNet::finish(Saved& s, const Tensor& o, Tensor& y) {
  const int64_t N = s.B * s.S, Hv = c_.linear_num_value_heads;
  Tensor& on = ops_.act(s.on, {N, c_.value_dim()});
  ops_.rmsnorm_gated_forward(on, ops_.f32(s.o_rstd, {N * Hv}), o, s.z, wt_.p("norm"), c_.rms_norm_eps);
  ops_.linear_forward(y, on, wt_.p("out_proj"), nullptr);
}

void GatedDeltaNet::forward(Saved& s, const Tensor& x, Tensor& y, int64_t B, int64_t S) {
  const int64_t Hv = c_.linear_num_value_heads, dk = c_.linear_key_head_dim, dv = c_.linear_value_head_dim,
                CD = c_.conv_dim();
  project(s, x, B, S);
  const Tensor& mixed = s.mixed;
  if (cp_active()) {
    // Every segment's causal conv needs the previous chunk's last KC-1 pre-conv rows: it runs over them and the
    // segment (as B G items of L rows), and the first KC-1 outputs (the previous chunk's) are dropped.
    const int64_t H = c_.linear_conv_kernel_dim - 1, G = cp_->segments(), Bi = B * G, L = S / G;
    NEXTRON_CHECK(S % G == 0 && L >= H, "context parallelism: a chunk of ", L,
                  " tokens is shorter than the causal conv's ", H,
                  "-token left context; use fewer context-parallel ranks or longer sequences");
    std::vector<float> last(static_cast<size_t>(G * B * H * CD)), halo(last.size());  // (G, B, H, CD)
    for (int64_t it = 0; it < Bi; ++it) {
      const std::vector<float> rows = host_f32(ops_, mixed, (it * L + L - H) * CD, H * CD, host_f32_);
      std::copy(rows.begin(), rows.end(), last.begin() + ((it % G) * B + it / G) * H * CD);
    }
    cp_->conv_halo_forward(last.data(), halo.data(), B * H * CD);
    Tensor& ext = ops_.act(s.mixed_ext, {Bi, L + H, CD});
    Tensor& conv_ext = ops_.act(conv_ext_, {Bi, L + H, CD});
    for (int64_t it = 0; it < Bi; ++it) {
      put_f32(ops_, ext, it * (L + H) * CD, halo.data() + ((it % G) * B + it / G) * H * CD, H * CD, host_f32_);
      ext.copy_elements_from((it * (L + H) + H) * CD, mixed, it * L * CD, L * CD);
    }
    ops_.conv1d_silu_forward(conv_ext, ext, wt_.p("conv1d"), {});
    Tensor& conv = ops_.act(conv_, {B, S, CD});
    for (int64_t it = 0; it < Bi; ++it) conv.copy_elements_from(it * L * CD, conv_ext, (it * (L + H) + H) * CD, L * CD);
    split_conv(s, conv);
  } else {
    // The conv writes q, k and v whole (its output split at KD and 2 KD): no column gathers.
    conv_output(s);
    ops_.conv1d_silu_forward(s.qkv, mixed, wt_.p("conv1d"), ConvSplit{c_.key_dim(), 2 * c_.key_dim()});
  }
  Tensor& qn = recompute_core_ ? rc_qn_ : s.qn;
  Tensor& kn = recompute_core_ ? rc_kn_ : s.kn;
  norms_and_gates(s, qn, kn);
  const Tensor &v = s.v, &g = s.g, &beta = s.beta;

  Tensor& o = ops_.act(recompute_core_ ? rc_o_ : s.o, {B, S, Hv, dv});
  const double scale = 1.0 / std::sqrt(double(dk));
  if (cp_active()) {
    // Every item (sequence, segment) from a zero state gives its chunk's local final state L; with the transitions M,
    // one exchange gives the state entering every item, from which the rerun is exact (a rank holding only the first
    // chunk has zero incoming states: its first run already is).
    const int64_t G = cp_->segments(), Bi = B * G, L = S / G, mb = Bi * Hv * dk * dk, sb = Bi * Hv * dk * dv;
    Tensor io = as_items(o, Bi, L), iq = as_items(qn, Bi, L), ik = as_items(kn, Bi, L), iv = as_items(v, Bi, L),
           ig = as_items(g, Bi, L), ibeta = as_items(beta, Bi, L);
    Tensor& fin = ops_.f32(cp_final_, {Bi, Hv, dk, dv});
    // The run whose output stands keeps the intermediates (the backward runs from the same incoming states).
    Tensor* save = recompute_core_ ? nullptr : delta_rule_save(s.gdr_saved, iq, iv);
    GdrStates local;
    local.final_state = &fin;
    if (cp_->holds_only_first_chunk()) local.save = save;
    ops_.gated_delta_rule_forward(io, iq, ik, iv, ig, ibeta, scale, local);
    Tensor& m = ops_.f32(cp_m_, {Bi, Hv, dk, dk});
    ops_.gated_delta_rule_transition(m, ik, ig, ibeta);
    std::vector<float> mh(static_cast<size_t>(mb)), fh(static_cast<size_t>(sb)), in(static_cast<size_t>(sb));
    ops_.download(mh.data(), m, mh.size() * sizeof(float));
    ops_.download(fh.data(), fin, fh.size() * sizeof(float));
    s.gathered_m.assign(static_cast<size_t>(cp_->chunks() * B * Hv * dk * dk), 0.0f);
    cp_->delta_states_forward(mh.data(), fh.data(), s.gathered_m.data(), in.data(), B, Hv, dk, dv);
    Tensor& state_in = ops_.f32(s.state_in, {Bi, Hv, dk, dv});
    ops_.upload(state_in, in.data(), in.size() * sizeof(float));
    if (!cp_->holds_only_first_chunk()) {
      GdrStates from;
      from.initial = &state_in;
      from.save = save;
      ops_.gated_delta_rule_forward(io, iq, ik, iv, ig, ibeta, scale, from);
    }
  } else {
    GdrStates whole;
    whole.save = recompute_core_ ? nullptr : delta_rule_save(s.gdr_saved, qn, v);
    ops_.gated_delta_rule_forward(o, qn, kn, v, g, beta, scale, whole);
  }
  finish(s, o, y);
}

Tensor* GatedDeltaNet::delta_rule_save(Tensor& t, const Tensor& q, const Tensor& v) const {
  if (recompute_states_) return nullptr;
  return &ops_.f32(
      t, {gated_delta_rule_saved_elements(ops_.device(), q.dim(0), q.dim(1), q.dim(2), v.dim(2), q.dim(3), v.dim(3))});
}

void GatedDeltaNet::forward_cached(LayerCache& cache, const Tensor& x, Tensor& y, int64_t B, int64_t S) {
  const int64_t Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads, dk = c_.linear_key_head_dim,
                dv = c_.linear_value_head_dim, CD = c_.conv_dim(), W = c_.linear_conv_kernel_dim - 1;
  Saved& s = cached_;
  project(s, x, B, S);
  // The conv runs over each sequence's cached window followed by its new rows; the first W outputs (the window's,
  // already produced) are dropped and the last W inputs become the next window.
  Tensor& ext = ops_.act(cached_ext_, {B, W + S, CD});
  Tensor& conv_ext = ops_.act(conv_ext_, {B, W + S, CD});
  for (int64_t b = 0; b < B; ++b) {
    ext.copy_elements_from(b * (W + S) * CD, cache.conv, b * W * CD, W * CD);
    ext.copy_elements_from((b * (W + S) + W) * CD, s.mixed, b * S * CD, S * CD);
  }
  ops_.conv1d_silu_forward(conv_ext, ext, wt_.p("conv1d"), {});
  Tensor& conv = ops_.act(conv_, {B, S, CD});
  for (int64_t b = 0; b < B; ++b) {
    conv.copy_elements_from(b * S * CD, conv_ext, (b * (W + S) + W) * CD, S * CD);
    cache.conv.copy_elements_from(b * W * CD, ext, (b * (W + S) + S) * CD, W * CD);
  }
  split_conv(s, conv);
  norms_and_gates(s, s.qn, s.kn);
  Tensor& o = ops_.act(s.o, {B, S, Hv, dv});
  const double scale = 1.0 / std::sqrt(double(dk));
  if (S == 1) {
    // Decoding: one step of the recurrence on the cached state.
    Tensor o_step = o.reshape({B, Hv, dv});
    ops_.gated_delta_rule_step(o_step, cache.state, s.qn.reshape({B, Hk, dk}), s.kn.reshape({B, Hk, dk}),
                               s.v.reshape({B, Hv, dv}), s.g.reshape({B, Hv}), s.beta.reshape({B, Hv}), scale);
  } else {
    // A prompt (or a continuation of several tokens): the chunked kernel from the cached state.
    Tensor& fin = ops_.f32(cached_final_, {B, Hv, dk, dv});
    GdrStates states;
    states.initial = &cache.state;
    states.final_state = &fin;
    ops_.gated_delta_rule_forward(o, s.qn, s.kn, s.v, s.g, s.beta, scale, states);
    cache.state.copy_from(fin);
  }
  finish(s, o, y);
}

void GatedDeltaNet::backward(const Saved& s, const Tensor& dy, Tensor& dx) {
  const int64_t B = s.B, S = s.S, N = B * S, Hk = c_.linear_num_key_heads, Hv = c_.linear_num_value_heads,
                dk = c_.linear_key_head_dim, dv = c_.linear_value_head_dim, KD = c_.key_dim(), VD = c_.value_dim(),
                CD = c_.conv_dim();
  if (recompute_core_) {
    ops_.l2norm_forward(ops_.act(rc_qn_, {B, S, Hk, dk}), s.q, dk);
    ops_.l2norm_forward(ops_.act(rc_kn_, {B, S, Hk, dk}), s.k, dk);
    GdrStates from;
    const int64_t G = cp_active() ? cp_->segments() : 1;
    if (cp_active()) from.initial = &s.state_in;
    Tensor io = as_items(ops_.act(rc_o_, {B, S, Hv, dv}), B * G, S / G);
    const Tensor iq = as_items(rc_qn_, B * G, S / G), iv = as_items(s.v, B * G, S / G);
    from.save = delta_rule_save(rc_saved_, iq, iv);
    ops_.gated_delta_rule_forward(io, iq, as_items(rc_kn_, B * G, S / G), iv, as_items(s.g, B * G, S / G),
                                  as_items(s.beta, B * G, S / G), 1.0 / std::sqrt(double(dk)), from);
  }
  // The intermediates the delta rule's forward kept (the record's, or the rerun core's), if any.
  const Tensor* saved = recompute_states_ ? nullptr : recompute_core_ ? &rc_saved_ : &s.gdr_saved;
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
  // The gradient of the conv's split output, dq | dk | dv, zeroed once: the delta rule accumulates dv into its last
  // block, the L2 norms' backwards dq and dk into the first two.
  Tensor& dqkv = ops_.act_zeroed(dqkv_, {N * CD});
  Tensor dvals = Tensor::view_of(dqkv, 2 * N * KD, {B, S, Hv, dv});
  Tensor& dbeta = ops_.f32_zeroed(dbeta_, {B, S, Hv});
  Tensor& dg = ops_.f32_zeroed(dg_, {B, S, Hv});
  const double scale = 1.0 / std::sqrt(double(dk));
  GdrStates states;
  if (cp_active()) {
    // The gradient reaching every item's final state comes from the later chunks: the items' local state gradients
    // are exchanged (from a backward with none), then the backward with it is exact. Nothing reads the sequence's
    // last chunk's final state, so a rank holding only that chunk has its exact backward at the first pass.
    const int64_t G = cp_->segments(), Bi = B * G, L = S / G, sb = Bi * Hv * dk * dv;
    const bool last = cp_->holds_only_last_chunk();
    auto items = [&](const Tensor& t) { return as_items(t, Bi, L); };
    Tensor idq = items(dqn), idk = items(dkn), idv = items(dvals), idg = items(dg), idbeta = items(dbeta);
    const Tensor ido = items(d_o), iq = items(qn), ik = items(kn), iv = items(s.v), ig = items(s.g),
                 ibeta = items(s.beta);
    Tensor& din = ops_.f32_zeroed(cp_din_, {Bi, Hv, dk, dv});
    GdrStates first;
    first.initial = &s.state_in;
    first.d_initial = &din;
    first.saved = saved;
    if (last) {
      ops_.gated_delta_rule_backward(idq, idk, idv, idg, idbeta, ido, iq, ik, iv, ig, ibeta, scale, first);
    } else {
      Tensor tq = items(ops_.act_zeroed(cp_dqn_, {B, S, Hk, dk})), tk = items(ops_.act_zeroed(cp_dkn_, {B, S, Hk, dk})),
             tv = items(ops_.act_zeroed(cp_dv_, {B, S, Hv, dv})), tg = items(ops_.f32_zeroed(cp_dg_, {B, S, Hv})),
             tbeta = items(ops_.f32_zeroed(cp_dbeta_, {B, S, Hv}));
      ops_.gated_delta_rule_backward(tq, tk, tv, tg, tbeta, ido, iq, ik, iv, ig, ibeta, scale, first);
    }
    std::vector<float> dh(static_cast<size_t>(sb)), fg(static_cast<size_t>(sb));
    ops_.download(dh.data(), din, dh.size() * sizeof(float));
    cp_->delta_states_backward(s.gathered_m.data(), dh.data(), fg.data(), B, Hv, dk, dv);
    if (!last) {
      Tensor& dfin = ops_.f32(cp_dfin_, {Bi, Hv, dk, dv});
      ops_.upload(dfin, fg.data(), fg.size() * sizeof(float));
      states.initial = &s.state_in;
      states.d_final = &dfin;
      states.saved = saved;
      ops_.gated_delta_rule_backward(idq, idk, idv, idg, idbeta, ido, iq, ik, iv, ig, ibeta, scale, states);
    }
  } else {
    states.saved = saved;
    ops_.gated_delta_rule_backward(dqn, dkn, dvals, dg, dbeta, d_o, qn, kn, s.v, s.g, s.beta, scale, states);
  }
  Tensor& db = ops_.act_zeroed(db_, {N, Hv});
  Tensor& da = ops_.act_zeroed(da_, {N, Hv});
  ops_.gdn_gates_backward(db, da, wt_.p("A_log"), wt_.p("dt_bias"), dbeta, dg, s.b, s.a);
  Tensor dq = Tensor::view_of(dqkv, 0, {N, KD}), dkeys = Tensor::view_of(dqkv, N * KD, {N, KD});
  ops_.l2norm_backward(dq, dqn, s.q, dk);
  ops_.l2norm_backward(dkeys, dkn, s.k, dk);
  Tensor& dmixed = ops_.act_zeroed(dmixed_, {B, S, CD});
  if (cp_active()) {
    // The extended conv ran on plain rows: the split gradient goes back to them first.
    Tensor& dconv = ops_.act(dconv_, {B, S, CD});
    Tensor dconv_rows = dconv.reshape({N, CD});
    ops_.scatter_cols(dconv_rows, dq, q_cols_, /*accumulate=*/false);
    ops_.scatter_cols(dconv_rows, dkeys, k_cols_, false);
    ops_.scatter_cols(dconv_rows, dvals.reshape({N, VD}), v_cols_, false);
    // Every item's conv ran over [previous chunk's last KC-1 rows | segment]: the gradient of those rows goes back to
    // their owner, and the next chunk's gradient of this segment's last rows comes in.
    const int64_t H = c_.linear_conv_kernel_dim - 1, G = cp_->segments(), Bi = B * G, L = S / G;
    Tensor& dconv_ext = ops_.act_zeroed(dconv_ext_, {Bi, L + H, CD});
    Tensor& dmixed_ext = ops_.act_zeroed(dmixed_ext_, {Bi, L + H, CD});
    for (int64_t it = 0; it < Bi; ++it)
      dconv_ext.copy_elements_from((it * (L + H) + H) * CD, dconv, it * L * CD, L * CD);
    ops_.conv1d_silu_backward(dmixed_ext, wt_.p("conv1d"), dconv_ext, s.mixed_ext, {});
    std::vector<float> d_halo(static_cast<size_t>(G * B * H * CD)), d_last(d_halo.size());  // (G, B, H, CD)
    for (int64_t it = 0; it < Bi; ++it) {
      const std::vector<float> rows = host_f32(ops_, dmixed_ext, it * (L + H) * CD, H * CD, host_f32_);
      std::copy(rows.begin(), rows.end(), d_halo.begin() + ((it % G) * B + it / G) * H * CD);
    }
    cp_->conv_halo_backward(d_halo.data(), d_last.data(), B * H * CD);
    for (int64_t it = 0; it < Bi; ++it) {
      // The segment's last H rows are the extended rows [L, L + H).
      std::vector<float> rows = host_f32(ops_, dmixed_ext, (it * (L + H) + L) * CD, H * CD, host_f32_);
      const float* add = d_last.data() + ((it % G) * B + it / G) * H * CD;
      for (int64_t e = 0; e < H * CD; ++e) rows[static_cast<size_t>(e)] += add[e];
      put_f32(ops_, dmixed_ext, (it * (L + H) + L) * CD, rows.data(), H * CD, host_f32_);
      dmixed.copy_elements_from(it * L * CD, dmixed_ext, (it * (L + H) + H) * CD, L * CD);
    }
  } else {
    ops_.conv1d_silu_backward(dmixed, wt_.p("conv1d"), dqkv, s.mixed, ConvSplit{KD, 2 * KD});
  }

  ops_.linear_backward(&dx, weight_rows("in_proj_qkvz", 0, CD), nullptr, dmixed.reshape({N, CD}), s.x);
  ops_.linear_backward(&dx, weight_rows("in_proj_qkvz", CD, VD), nullptr, dz, s.x);
  ops_.linear_backward(&dx, weight_rows("in_proj_ba", 0, Hv), nullptr, db, s.x);
  ops_.linear_backward(&dx, weight_rows("in_proj_ba", Hv, Hv), nullptr, da, s.x);
}

}  // namespace nextron
