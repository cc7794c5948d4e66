// The CPU backend of Ops: fp32 everywhere, the kernels of src/kernels/cpu (OpenBLAS, OpenMP). The reference the
// CUDA backend is tested against.
#pragma once

#include <vector>

#include "kernels/ops.h"

namespace nextron {

class CpuOps final : public Ops {
 public:
  Device device() const override { return Device::cpu; }
  DType act_dtype() const override { return DType::f32; }
  const char* name() const override { return "cpu"; }
  void upload(Tensor& dst, const void* host, size_t bytes) const override;
  void download(void* host, const Tensor& src, size_t bytes) const override;

  void cast(Tensor& dst, const Tensor& src) override;
  void add(Tensor& y, const Tensor& a, const Tensor& b) override;
  void gather_cols(Tensor& dst, const Tensor& src, const Tensor& idx) override;
  void scatter_cols(Tensor& dst, const Tensor& src, const Tensor& idx, bool accumulate) override;

  void linear_forward(Tensor& y, const Tensor& x, const ParamRef& w, const ParamRef* bias) override;
  void linear_forward_f32(Tensor& y, const Tensor& x, const ParamRef& w) override;
  void linear_backward(Tensor* dx, const ParamRef& w, const ParamRef* bias, const Tensor& dy, const Tensor& x) override;

  void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const ParamRef& w, double eps) override;
  void rmsnorm_backward(Tensor* dx, const ParamRef& w, const Tensor& dy, const Tensor& x, const Tensor& rstd) override;
  void rmsnorm_gated_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& z, const ParamRef& w,
                             double eps) override;
  void rmsnorm_gated_backward(Tensor* dx, Tensor* dz, const ParamRef& w, const Tensor& dy, const Tensor& x,
                              const Tensor& z, const Tensor& rstd) override;
  void l2norm_forward(Tensor& y, const Tensor& x, int64_t D) override;
  void l2norm_backward(Tensor& dx, const Tensor& dy, const Tensor& x, int64_t D) override;

  void rope_tables(Tensor& cos, Tensor& sin, int64_t S, int64_t R, double theta) override;
  void rope_forward(Tensor& y, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t R) override;
  void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& cos, const Tensor& sin, int64_t R) override;
  void attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                         double scale) override;
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& d_o, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& o, const Tensor& lse, double scale) override;
  void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& gate, int64_t G, int64_t ld_gate) override;
  void sigmoid_gate_backward(Tensor* dx, Tensor* dgate, const Tensor& dy, const Tensor& x, const Tensor& gate,
                             int64_t G, int64_t ld_gate) override;

  void conv1d_silu_forward(Tensor& y, const Tensor& x, const ParamRef& w, ConvSplit split) override;
  void conv1d_silu_backward(Tensor& dx, const ParamRef& w, const Tensor& dy, const Tensor& x, ConvSplit split) override;
  void gdn_gates_forward(Tensor& beta, Tensor& g, const Tensor& b, const Tensor& a, const ParamRef& A_log,
                         const ParamRef& dt_bias) override;
  void gdn_gates_backward(Tensor& db, Tensor& da, const ParamRef& A_log, const ParamRef& dt_bias, const Tensor& dbeta,
                          const Tensor& dg, const Tensor& b, const Tensor& a) override;
  void gated_delta_rule_forward(Tensor& o, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                const Tensor& beta, double scale, const GdrStates& states) override;
  void gated_delta_rule_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dg, Tensor& dbeta, const Tensor& d_o,
                                 const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& beta,
                                 double scale, const GdrStates& states) override;
  void gated_delta_rule_transition(Tensor& m, const Tensor& k, const Tensor& g, const Tensor& beta) override;
  void gated_delta_rule_step(Tensor& o, Tensor& state, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& g, const Tensor& beta, double scale) override;

  void swiglu_forward(Tensor& h, const Tensor& gu) override;
  void swiglu_backward(Tensor& dgu, const Tensor& dh, const Tensor& gu) override;
  void router_forward(Tensor& probs, Tensor& indices, Tensor& weights, const Tensor& logits,
                      bool norm_topk_prob) override;
  void router_weights_from_indices(Tensor& weights, const Tensor& probs, const Tensor& indices,
                                   bool norm_topk_prob) override;
  void router_backward(Tensor& dlogits, const Tensor* dprobs, const Tensor* dweights, const Tensor& probs,
                       const Tensor& indices, bool norm_topk_prob) override;
  void aux_stats_accumulate(Tensor& count_sum, Tensor& prob_sum, const Tensor& probs, const Tensor& indices) override;
  void aux_loss_backward(Tensor& dprobs, const Tensor& count_sum, double total_rows, double daux) override;
  std::unique_ptr<MoeExpertsState> new_moe_state() override;
  void moe_experts_forward(Tensor& y, MoeExpertsState& state, const Tensor& x, const Tensor& weights,
                           const Tensor& indices, const ParamRef& w_gate_up, const ParamRef& w_down) override;
  void moe_experts_backward(Tensor& dx, Tensor& dweights, MoeExpertsState& state, const Tensor& dy,
                            const ParamRef& w_gate_up, const ParamRef& w_down) override;
  void moe_permute(Tensor& rows, const Tensor& x, const Tensor& row_token) override;
  void moe_permute_backward(Tensor& dx, const Tensor& drows, const Tensor& slot_row) override;
  void moe_unpermute(Tensor& y, const Tensor& rows, const Tensor& weights, const Tensor& slot_row) override;
  void moe_unpermute_backward(Tensor& drows, Tensor& dweights, const Tensor& dy, const Tensor& rows,
                              const Tensor& weights, const Tensor& slot_row) override;

  void embedding_forward(Tensor& out, const ParamRef& table, const Tensor& ids, const VocabShard& vocab) override;
  void embedding_backward(const ParamRef& table, const Tensor& dout, const Tensor& ids,
                          const VocabShard& vocab) override;
  void cross_entropy_forward(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& logits,
                             const Tensor& targets) override;
  void cross_entropy_partial(Tensor& stats, const Tensor& logits, const Tensor& targets,
                             const VocabShard& vocab) override;
  void cross_entropy_combine(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& stats,
                             const Tensor& targets, int64_t vocab_full) override;
  void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse, const Tensor& targets,
                              double scale, const VocabShard& vocab) override;

  double sum_squares(const Tensor& x, const std::vector<FlatRange>& ranges) override;
  void scale(Tensor& x, FlatRange r, float s) override;
  void adamw_step(Tensor& params, const Tensor& grads, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor* params_act,
                  FlatRange range, const std::vector<FlatRange>& decay, const AdamWHyper& h, int64_t step) override;

 protected:
  Tensor allocate(const Shape& shape, DType dtype) const override { return Tensor::zeros(shape, dtype); }
  void fill_zero(Tensor& t) const override { t.zero_(); }

 private:
  std::vector<float> moe_act_scratch_;  // (N K, I) the experts' SwiGLU output of MoE states that recompute it
};

}  // namespace nextron
