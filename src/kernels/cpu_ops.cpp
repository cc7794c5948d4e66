#include "kernels/cpu_ops.h"

#include <cstring>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/conv1d.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/delta_state_scan.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/gated_delta_rule.h"
#include "kernels/cpu/gdn_gates.h"
#include "kernels/cpu/l2norm.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu/moe_experts.h"
#include "kernels/cpu/moe_permute.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rmsnorm_gated.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/router.h"
#include "kernels/cpu/sigmoid_gate.h"
#include "kernels/cpu/swiglu.h"
#include "optim/grad_clip.h"

namespace nextron {

namespace {

float* f(const Tensor& t) { return t.f32(); }
float* f_or_null(const Tensor* t) { return t ? t->f32() : nullptr; }
int64_t rows(const Tensor& t, int64_t width) { return t.numel() / width; }

struct CpuMoeState final : MoeExpertsState {
  cpu::MoeDispatch dispatch;
  cpu::MoeExpertsCache<float> cache;
  Tensor weights;  // (N, K) the routing weights of the forward (its backward needs them)
  int64_t N = 0, K = 0;
  int64_t host_bytes() const override {
    const auto bytes = [](const auto& v) { return static_cast<int64_t>(v.capacity() * sizeof(v[0])); };
    return bytes(dispatch.expert_offsets) + bytes(dispatch.slot_token) + bytes(dispatch.slot_k) +
           bytes(dispatch.slot_of) + bytes(dispatch.active) + bytes(cache.x) + bytes(cache.gate_up) + bytes(cache.act) +
           bytes(cache.out);
  }
};

}  // namespace

void CpuOps::upload(Tensor& dst, const void* host, size_t bytes) const {
  NEXTRON_ASSERT(bytes <= dst.nbytes());
  std::memcpy(dst.raw(), host, bytes);
}

void CpuOps::download(void* host, const Tensor& src, size_t bytes) const {
  NEXTRON_ASSERT(bytes <= src.nbytes());
  std::memcpy(host, src.raw(), bytes);
}

void CpuOps::cast(Tensor& dst, const Tensor& src) {
  NEXTRON_CHECK(dst.dtype() == DType::f32 && src.dtype() == DType::f32, "the CPU backend casts only f32 to f32");
  if (dst.raw() != src.raw()) dst.copy_from(src);
}

void CpuOps::add(Tensor& y, const Tensor& a, const Tensor& b) {
  NEXTRON_ASSERT(y.numel() == a.numel() && y.numel() == b.numel());
  float *py = f(y), *pa = f(a), *pb = f(b);
  const int64_t n = y.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) py[i] = pa[i] + pb[i];
}

void CpuOps::gather_cols(Tensor& dst, const Tensor& src, const Tensor& idx) {
  const int64_t W = idx.numel(), N = dst.dim(0), Ws = src.numel() / N;
  NEXTRON_ASSERT(dst.numel() == N * W && src.numel() == N * Ws);
  const int32_t* ix = idx.data<int32_t>();
  float *d = f(dst), *s = f(src);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < W; ++j) d[n * W + j] = s[n * Ws + ix[j]];
}

void CpuOps::scatter_cols(Tensor& dst, const Tensor& src, const Tensor& idx, bool accumulate) {
  const int64_t W = idx.numel(), N = src.dim(0), Wd = dst.numel() / N;
  NEXTRON_ASSERT(src.numel() == N * W && dst.numel() == N * Wd);
  const int32_t* ix = idx.data<int32_t>();
  float *d = f(dst), *s = f(src);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < W; ++j) {
      float& out = d[n * Wd + ix[j]];
      out = accumulate ? out + s[n * W + j] : s[n * W + j];
    }
}

void CpuOps::linear_forward(Tensor& y, const Tensor& x, const ParamRef& w, const ParamRef* bias) {
  const int64_t OUT = w.w.dim(0), IN = w.w.dim(1);
  cpu::linear_forward<float>(f(y), f(x), f(w.w), bias ? f(bias->w) : nullptr, rows(x, IN), IN, OUT);
}

void CpuOps::linear_forward_f32(Tensor& y, const Tensor& x, const ParamRef& w) { linear_forward(y, x, w, nullptr); }

void CpuOps::linear_backward(Tensor* dx, const ParamRef& w, const ParamRef* bias, const Tensor& dy, const Tensor& x) {
  const int64_t OUT = w.w.dim(0), IN = w.w.dim(1);
  cpu::linear_backward<float>(f_or_null(dx), f(w.g), bias ? f(bias->g) : nullptr, f(dy), f(x), f(w.w), rows(x, IN), IN,
                              OUT);
}

void CpuOps::rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const ParamRef& w, double eps) {
  const int64_t D = w.w.numel();
  cpu::rmsnorm_forward<float>(f(y), f(rstd), f(x), f(w.w), rows(x, D), D, eps);
}

void CpuOps::rmsnorm_backward(Tensor* dx, const ParamRef& w, const Tensor& dy, const Tensor& x, const Tensor& rstd) {
  const int64_t D = w.w.numel();
  cpu::rmsnorm_backward<float>(f_or_null(dx), f(w.g), f(dy), f(x), f(w.w), f(rstd), rows(x, D), D);
}

void CpuOps::rmsnorm_gated_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& z, const ParamRef& w,
                                   double eps) {
  const int64_t D = w.w.numel();
  cpu::rmsnorm_gated_forward<float>(f(y), f(rstd), f(x), f(z), f(w.w), rows(x, D), D, eps);
}

void CpuOps::rmsnorm_gated_backward(Tensor* dx, Tensor* dz, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                    const Tensor& z, const Tensor& rstd) {
  const int64_t D = w.w.numel();
  cpu::rmsnorm_gated_backward<float>(f_or_null(dx), f_or_null(dz), f(w.g), f(dy), f(x), f(z), f(w.w), f(rstd),
                                     rows(x, D), D);
}

void CpuOps::l2norm_forward(Tensor& y, const Tensor& x, int64_t D) {
  cpu::l2norm_forward<float>(f(y), f(x), rows(x, D), D, 1e-6);
}

void CpuOps::l2norm_backward(Tensor& dx, const Tensor& dy, const Tensor& x, int64_t D) {
  cpu::l2norm_backward<float>(f(dx), f(dy), f(x), rows(x, D), D, 1e-6);
}

void CpuOps::rope_tables(Tensor& cos, Tensor& sin, int64_t S, int64_t R, double theta) {
  cpu::rope_tables<float>(f(this->f32(cos, {S, R})), f(this->f32(sin, {S, R})), S, R, theta, 0);
}

void CpuOps::rope_forward(Tensor& y, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t R) {
  cpu::rope_forward<float>(f(y), f(x), f(cos), f(sin), x.dim(0), x.dim(1), x.dim(2), x.dim(3), R);
}

void CpuOps::rope_backward(Tensor& dx, const Tensor& dy, const Tensor& cos, const Tensor& sin, int64_t R) {
  cpu::rope_backward<float>(f(dx), f(dy), f(cos), f(sin), dy.dim(0), dy.dim(1), dy.dim(2), dy.dim(3), R);
}

void CpuOps::attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                               double scale) {
  cpu::causal_attention_forward<float>(f(o), f(lse), f(q), f(k), f(v), q.dim(0), q.dim(1), k.dim(1), q.dim(2), k.dim(2),
                                       q.dim(3), scale);
}

void CpuOps::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& d_o, const Tensor& q, const Tensor& k,
                                const Tensor& v, const Tensor& o, const Tensor& lse, double scale) {
  dq.zero_();
  dk.zero_();
  dv.zero_();
  cpu::causal_attention_backward<float>(f(dq), f(dk), f(dv), f(d_o), f(q), f(k), f(v), f(o), f(lse), q.dim(0), q.dim(1),
                                        k.dim(1), q.dim(2), k.dim(2), q.dim(3), scale);
}

void CpuOps::sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& gate, int64_t G, int64_t ld_gate) {
  const int64_t N = x.dim(0), D = x.numel() / N;
  cpu::sigmoid_gate_forward<float>(f(y), f(x), f(gate), N, D, G, ld_gate);
}

void CpuOps::sigmoid_gate_backward(Tensor* dx, Tensor* dgate, const Tensor& dy, const Tensor& x, const Tensor& gate,
                                   int64_t G, int64_t ld_gate) {
  const int64_t N = x.dim(0), D = x.numel() / N;
  cpu::sigmoid_gate_backward<float>(f_or_null(dx), f_or_null(dgate), f(dy), f(x), f(gate), N, D, G, ld_gate);
}

void CpuOps::conv1d_silu_forward(Tensor& y, const Tensor& x, const ParamRef& w, ConvSplit split) {
  const int64_t C = x.dim(2);
  check_conv_split(split, C, y, x);
  cpu::conv1d_forward<float>(f(y), f(x), f(w.w), x.dim(0), x.dim(1), C, w.w.dim(-1), split.active() ? split.c1 : C,
                             split.active() ? split.c2 : C);
}

void CpuOps::conv1d_silu_backward(Tensor& dx, const ParamRef& w, const Tensor& dy, const Tensor& x, ConvSplit split) {
  const int64_t C = x.dim(2);
  check_conv_split(split, C, dy, x);
  cpu::conv1d_backward<float>(f(dx), f(w.g), f(dy), f(x), f(w.w), x.dim(0), x.dim(1), C, w.w.dim(-1),
                              split.active() ? split.c1 : C, split.active() ? split.c2 : C);
}

void CpuOps::gdn_gates_forward(Tensor& beta, Tensor& g, const Tensor& b, const Tensor& a, const ParamRef& A_log,
                               const ParamRef& dt_bias) {
  const int64_t Hv = A_log.w.numel();
  cpu::gdn_gates_forward<float>(f(beta), f(g), f(b), f(a), f(A_log.w), f(dt_bias.w), rows(b, Hv), Hv);
}

void CpuOps::gdn_gates_backward(Tensor& db, Tensor& da, const ParamRef& A_log, const ParamRef& dt_bias,
                                const Tensor& dbeta, const Tensor& dg, const Tensor& b, const Tensor& a) {
  const int64_t Hv = A_log.w.numel();
  cpu::gdn_gates_backward<float>(f(db), f(da), f(A_log.g), f(dt_bias.g), f(dbeta), f(dg), f(b), f(a), f(A_log.w),
                                 f(dt_bias.w), rows(b, Hv), Hv);
}

void CpuOps::gated_delta_rule_forward(Tensor& o, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                      const Tensor& beta, double scale, const GdrStates& states) {
  const cpu::GdrShape s{q.dim(0), q.dim(1), q.dim(2), v.dim(2), q.dim(3), v.dim(3)};
  check_gdr_saved(states.save, Device::cpu, q, v, "gated_delta_rule_forward");
  cpu::gated_delta_rule_chunked_forward<float>(f(o), f32_or_null(states.final_state), f(q), f(k), f(v), f(g), f(beta),
                                               f32_or_null(states.initial), s, static_cast<float>(scale), 64,
                                               f32_or_null(states.save));
}

void CpuOps::gated_delta_rule_transition(Tensor& m, const Tensor& k, const Tensor& g, const Tensor& beta) {
  const cpu::GdrShape s{k.dim(0), k.dim(1), k.dim(2), g.dim(2), k.dim(3), k.dim(3)};
  cpu::slice_transition<float>(f(m), f(k), f(g), f(beta), s);
}

void CpuOps::gated_delta_rule_step(Tensor& o, Tensor& state, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& g, const Tensor& beta, double scale) {
  // The recurrent reference over one token: it loads each head's state before writing it back, so the cache can be
  // both the initial and the final state.
  const cpu::GdrShape s{q.dim(0), 1, q.dim(1), v.dim(1), q.dim(2), v.dim(2)};
  cpu::gated_delta_rule_recurrent_forward<float>(f(o), f(state), f(q), f(k), f(v), f(g), f(beta), f(state), s,
                                                 static_cast<float>(scale));
}

void CpuOps::gated_delta_rule_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dg, Tensor& dbeta, const Tensor& d_o,
                                       const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                       const Tensor& beta, double scale, const GdrStates& states) {
  const cpu::GdrShape s{q.dim(0), q.dim(1), q.dim(2), v.dim(2), q.dim(3), v.dim(3)};
  check_gdr_saved(states.saved, Device::cpu, q, v, "gated_delta_rule_backward");
  cpu::gated_delta_rule_chunked_backward<float>(f(dq), f(dk), f(dv), f(dg), f(dbeta), f32_or_null(states.d_initial),
                                                f(d_o), f32_or_null(states.d_final), f(q), f(k), f(v), f(g), f(beta),
                                                f32_or_null(states.initial), s, static_cast<float>(scale), 64,
                                                f32_or_null(states.saved));
}

void CpuOps::swiglu_forward(Tensor& h, const Tensor& gu) {
  const int64_t N = gu.dim(0), I = gu.numel() / N / 2;
  cpu::swiglu_forward<float>(f(h), f(gu), N, I);
}

void CpuOps::swiglu_backward(Tensor& dgu, const Tensor& dh, const Tensor& gu) {
  const int64_t N = gu.dim(0), I = gu.numel() / N / 2;
  cpu::swiglu_backward<float>(f(dgu), f(dh), f(gu), N, I);
}

void CpuOps::router_forward(Tensor& probs, Tensor& indices, Tensor& weights, const Tensor& logits,
                            bool norm_topk_prob) {
  const int64_t N = logits.dim(0), E = logits.dim(1), K = indices.dim(1);
  cpu::router_forward<float>(f(probs), indices.data<int32_t>(), f(weights), f(logits), N, E, K, norm_topk_prob);
}

void CpuOps::router_weights_from_indices(Tensor& weights, const Tensor& probs, const Tensor& indices,
                                         bool norm_topk_prob) {
  cpu::router_weights_from_indices<float>(f(weights), f(probs), indices.data<int32_t>(), probs.dim(0), probs.dim(1),
                                          indices.dim(1), norm_topk_prob);
}

void CpuOps::router_backward(Tensor& dlogits, const Tensor* dprobs, const Tensor* dweights, const Tensor& probs,
                             const Tensor& indices, bool norm_topk_prob) {
  const int64_t N = probs.dim(0), E = probs.dim(1), K = indices.dim(1);
  cpu::router_backward<float>(f(dlogits), f_or_null(dprobs), f_or_null(dweights), f(probs), indices.data<int32_t>(), N,
                              E, K, norm_topk_prob);
}

void CpuOps::aux_stats_accumulate(Tensor& count_sum, Tensor& prob_sum, const Tensor& probs, const Tensor& indices) {
  cpu::aux_stats_accumulate<float>(f(count_sum), f(prob_sum), f(probs), indices.data<int32_t>(), probs.dim(0),
                                   probs.dim(1), indices.dim(1));
}

void CpuOps::aux_loss_backward(Tensor& dprobs, const Tensor& count_sum, double total_rows, double daux) {
  cpu::aux_loss_backward<float>(f(dprobs), f(count_sum), static_cast<float>(total_rows), static_cast<float>(daux),
                                dprobs.dim(0), dprobs.dim(1));
}

std::unique_ptr<MoeExpertsState> CpuOps::new_moe_state() { return std::make_unique<CpuMoeState>(); }

void CpuOps::moe_experts_forward(Tensor& y, MoeExpertsState& state, const Tensor& x, const Tensor& weights,
                                 const Tensor& indices, const ParamRef& w_gate_up, const ParamRef& w_down) {
  auto& st = static_cast<CpuMoeState&>(state);
  const int64_t N = x.dim(0), H = x.numel() / N, K = indices.dim(1), E = w_gate_up.w.dim(0), I = w_down.w.dim(2);
  st.N = N;
  st.K = K;
  st.weights = weights;
  cpu::moe_dispatch_build(st.dispatch, indices.data<int32_t>(), N, K, E);
  // A recomputed activation is written into this backend's scratch (one for all layers and micro-batches), not
  // into the state.
  if (st.recompute_act) std::swap(st.cache.act, moe_act_scratch_);
  cpu::moe_experts_forward<float>(f(y), st.cache, st.dispatch, f(x), f(weights), f(w_gate_up.w), f(w_down.w), N, H, I,
                                  E, K);
  if (st.recompute_act) std::swap(st.cache.act, moe_act_scratch_);
}

void CpuOps::moe_experts_backward(Tensor& dx, Tensor& dweights, MoeExpertsState& state, const Tensor& dy,
                                  const ParamRef& w_gate_up, const ParamRef& w_down) {
  auto& st = static_cast<CpuMoeState&>(state);
  const int64_t N = st.N, H = dy.numel() / N, K = st.K, E = w_gate_up.w.dim(0), I = w_down.w.dim(2);
  if (st.recompute_act) {
    std::swap(st.cache.act, moe_act_scratch_);
    cpu::moe_experts_recompute_act(st.cache, I);
  }
  cpu::moe_experts_backward<float>(f(dx), f(dweights), f(w_gate_up.g), f(w_down.g), st.cache, st.dispatch, f(dy),
                                   f(st.weights), f(w_gate_up.w), f(w_down.w), N, H, I, E, K);
  if (st.recompute_act) std::swap(st.cache.act, moe_act_scratch_);
}

void CpuOps::moe_permute(Tensor& rows, const Tensor& x, const Tensor& row_token) {
  const int64_t R = row_token.numel(), H = x.numel() / std::max<int64_t>(x.dim(0), 1);
  NEXTRON_CHECK(rows.numel() == R * H, "moe_permute: rows hold ", rows.numel(), " values for ", R, " x ", H);
  cpu::moe_permute<float>(f(rows), f(x), row_token.data<int32_t>(), R, H);
}

void CpuOps::moe_permute_backward(Tensor& dx, const Tensor& drows, const Tensor& slot_row) {
  const int64_t N = dx.dim(0), H = dx.numel() / std::max<int64_t>(N, 1), K = N > 0 ? slot_row.numel() / N : 0;
  cpu::moe_permute_backward<float>(f(dx), f(drows), slot_row.data<int32_t>(), N, K, H);
}

void CpuOps::moe_unpermute(Tensor& y, const Tensor& rows, const Tensor& weights, const Tensor& slot_row) {
  const int64_t N = y.dim(0), H = y.numel() / std::max<int64_t>(N, 1), K = weights.numel() / std::max<int64_t>(N, 1);
  NEXTRON_CHECK(slot_row.numel() == N * K, "moe_unpermute: ", slot_row.numel(), " slots for ", N, " x ", K);
  cpu::moe_unpermute<float>(f(y), f(rows), f(weights), slot_row.data<int32_t>(), N, K, H);
}

void CpuOps::moe_unpermute_backward(Tensor& drows, Tensor& dweights, const Tensor& dy, const Tensor& rows,
                                    const Tensor& weights, const Tensor& slot_row) {
  const int64_t N = dy.dim(0), H = dy.numel() / std::max<int64_t>(N, 1), K = weights.numel() / std::max<int64_t>(N, 1);
  cpu::moe_unpermute_backward<float>(f(drows), dweights.defined() ? f(dweights) : nullptr, f(dy), f(rows), f(weights),
                                     slot_row.data<int32_t>(), N, K, H);
}

void CpuOps::embedding_forward(Tensor& out, const ParamRef& table, const Tensor& ids, const VocabShard& vocab) {
  NEXTRON_CHECK(table.w.dim(0) == vocab.size, "embedding: table of ", table.w.dim(0), " rows for ", vocab.size, " ids");
  cpu::embedding_forward<float>(f(out), f(table.w), ids.data<int64_t>(), ids.numel(), table.w.dim(1), vocab);
}

void CpuOps::embedding_backward(const ParamRef& table, const Tensor& dout, const Tensor& ids, const VocabShard& vocab) {
  NEXTRON_CHECK(table.w.dim(0) == vocab.size, "embedding: table of ", table.w.dim(0), " rows for ", vocab.size, " ids");
  cpu::embedding_backward<float>(f(table.g), f(dout), ids.data<int64_t>(), ids.numel(), table.w.dim(1), vocab);
}

void CpuOps::cross_entropy_forward(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& logits,
                                   const Tensor& targets) {
  const int64_t N = targets.numel(), V = logits.numel() / N;
  int64_t count = 0;
  cpu::cross_entropy_forward<float>(loss_sum, &count, f(row_loss), f(lse), f(logits), targets.data<int64_t>(), N, V);
}

void CpuOps::cross_entropy_partial(Tensor& stats, const Tensor& logits, const Tensor& targets,
                                   const VocabShard& vocab) {
  const int64_t N = targets.numel();
  NEXTRON_ASSERT(logits.numel() == N * vocab.size && stats.numel() == 3 * N);
  cpu::cross_entropy_partial(f(stats), f(logits), targets.data<int64_t>(), N, vocab);
}

void CpuOps::cross_entropy_combine(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& stats,
                                   const Tensor& targets, int64_t vocab_full) {
  const int64_t N = targets.numel();
  NEXTRON_ASSERT(N > 0 && stats.numel() % (3 * N) == 0);
  cpu::cross_entropy_combine(loss_sum, f(row_loss), f(lse), f(stats), stats.numel() / (3 * N), targets.data<int64_t>(),
                             N, vocab_full);
}

void CpuOps::cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse, const Tensor& targets,
                                    double scale, const VocabShard& vocab) {
  const int64_t N = targets.numel();
  NEXTRON_ASSERT(logits.numel() == N * vocab.size);
  dlogits.zero_();
  cpu::cross_entropy_backward<float>(f(dlogits), f(logits), f(lse), targets.data<int64_t>(), static_cast<float>(scale),
                                     N, vocab);
}

double CpuOps::sum_squares(const Tensor& x, const std::vector<FlatRange>& ranges) {
  double s = 0;
  for (const FlatRange& r : ranges)
    if (r.size() > 0) s += grad_sq_sum(f(x) + r.begin, r);
  return s;
}

void CpuOps::scale(Tensor& x, FlatRange r, float s) { scale_grads(f(x) + r.begin, r, s); }

void CpuOps::adamw_step(Tensor& params, const Tensor& grads, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor* params_act,
                        FlatRange range, const std::vector<FlatRange>& decay, const AdamWHyper& h, int64_t step) {
  nextron::adamw_step(f(params) + range.begin, f(grads) + range.begin, f(exp_avg), f(exp_avg_sq), range, decay, h,
                      step);
  // On the CPU the activation-dtype copy is params itself.
  if (params_act && params_act->raw() != params.raw())
    Tensor::view_of(*params_act, range.begin, {range.size()})
        .copy_from(Tensor::view_of(params, range.begin, {range.size()}));
}

}  // namespace nextron
