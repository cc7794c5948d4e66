// Gated full attention (Qwen3NextAttention): q/k/v projections, per-head zero-centred q_norm/k_norm, partial
// RoPE, causal GQA softmax attention, sigmoid output gate, o_proj.
#pragma once

#include "comm/context_parallel.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/module.h"

namespace nextron {

class GatedAttention {
 public:
  GatedAttention(const ModelConfig& config, ModuleWeights weights, Ops& ops);
  // What backward needs from one forward: one record per micro-batch in flight, owned by the caller.
  struct Saved {
    int64_t B = 0, S = 0;
    Tensor x;                // (B S, H) the normalised input (a view: the caller keeps it alive until backward)
    Tensor qg;               // (B S, NH 2D) q_proj's output, per head [query | gate]
    Tensor q_raw, q_rstd;    // (B S, NH D) queries before q_norm, (B S NH) their rstd
    Tensor k_raw, k_rstd;    // (B S, NKV D), (B S NKV)
    Tensor q, k, v, o, lse;  // (B, S, NH|NKV, D) after norm and RoPE; o (B, S, NH, D); lse (B, NH, S)
    Tensor og;               // (B S, NH D) the gated attention output
    // Under context parallelism (S is then this rank's slice Sl, the same on every rank):
    Tensor k_full, v_full;  // (B, (rank + 1) Sl, NKV, D) the keys and values of the slices up to this one's end
  };
  // x: (B, S, H) normalised input; y: (B, S, H) overwritten.
  void forward(Saved& s, const Tensor& x, Tensor& y, int64_t B, int64_t S);
  // dy: (B, S, H). Accumulates into dx (B, S, H) and the parameter gradients.
  void backward(const Saved& s, const Tensor& dy, Tensor& dx);
  // Selective recomputation of the core attention (softmax(q k^T) v): its output and log-sum-exp are not kept per
  // record (this module's scratch holds the last forward's); backward reruns the kernel on the kept q, k, v.
  void set_recompute_core(bool on) { recompute_core_ = on; }
  // Context parallelism (comm/context_parallel.h; not owned, nullptr or CP 1: the whole sequence is here): x holds
  // this rank's slice of every sequence (slices of equal length, in rank order); RoPE uses the slice's positions,
  // the keys and values of the slices up to this one's end are all-gathered and the slice's queries attend to them
  // (bottom-right causal); their gradients go back to their owners by a reduce-scatter.
  void set_context_parallel(const ContextParallel* cp) { cp_ = cp; }

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  Tensor q_cols_, gate_cols_;  // column tables of q_proj's output
  int64_t rope_S_ = 0;
  Tensor cos_, sin_;  // RoPE tables (rope_S_, rotary_dim), shared by the micro-batches of that length
  void rope_tables_for(int64_t S);
  // The RoPE rows of positions [pos0, pos0 + S) (views into the tables for pos0 + S positions).
  std::pair<Tensor, Tensor> rope_rows(int64_t pos0, int64_t S);
  const ContextParallel* cp_ = nullptr;
  bool cp_active() const { return cp_ != nullptr && cp_->active(); }
  Tensor dk_full_, dv_full_;  // (B, (rank + 1) Sl, NKV, D) gradients of the gathered keys and values
  bool recompute_core_ = false;
  Tensor rc_o_, rc_lse_;  // the core's output (B, S, NH, D) and lse (B, NH, S) when it is recomputed
  Tensor dog_, do_, dq_, dk_, dv_, dqn_, dkn_, dq_raw_, dk_raw_, dqg_;  // backward scratch
};

}  // namespace nextron
