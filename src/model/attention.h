// Gated full attention (Qwen3NextAttention): q/k/v projections, per-head zero-centred q_norm/k_norm, partial
// RoPE, causal GQA softmax attention, sigmoid output gate, o_proj.
#pragma once

#include <memory>
#include <utility>
#include <vector>

#include "comm/context_parallel.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/inference_cache.h"
#include "model/module.h"

namespace nextron {

class GatedAttention {
 public:
  // What backward needs from one forward: one record per micro-batch in flight, owned by the caller.
  struct Saved {
    int64_t B = 0, S = 0;
    Tensor x;              // (B S, H) the normalised input (a view: the caller keeps it alive until backward)
    Tensor qg;             // (B S, NH 2D) q_proj's output, per head [query | gate]
    Tensor q_raw, q_rstd;  // (B S, NH D) queries before q_norm, (B S NH) their rstd
    Tensor k_raw, k_rstd;  // (B S, NKV D), (B S NKV)
    Tensor q, k, v, o;     // (B, S, NH|NKV, D) after norm and RoPE; o (B, S, NH, D)
    Tensor lse;            // (B, NH, S) fp32; under zigzag context parallelism (G, B, NH, L) per segment
    Tensor og;             // (B S, NH D) the gated attention output
    // Under context parallelism (S is then this rank's Sl tokens: G segments of L = Sl / G, the same on every rank):
    Tensor k_full, v_full;  // (B, (c + 1) L, NKV, D) the keys and values of the chunks up to this rank's last, c
  };
  // Buffers outside the records, shared by the attention of every layer of one kind (model/decoder.h): each lives
  // within one call, or (the recomputed core) is rewritten by the backward before it reads it.
  struct Scratch {
    Tensor seg_cos, seg_sin;  // (S, rotary_dim) RoPE rows at the zigzag segments' positions
    // Zigzag: (G, B, L, NH, D) segment-major queries, outputs and their gradients; the first segment's keys and
    // values (B, (chunk + 1) L, NKV, D) and their gradients.
    Tensor seg_q, seg_o, seg_do, seg_dq, seg_k, seg_v, seg_dk, seg_dv;
    Tensor dk_full, dv_full;  // (B, (c + 1) L, NKV, D) gradients of the gathered keys and values
    Tensor rc_o, rc_lse;      // the core's output (B, S, NH, D) and lse (B, NH, S) when it is recomputed
    Tensor dog, d_o, dq, dk, dv, dqn, dkn, dq_raw, dk_raw, dqg;  // backward
    Saved cached;                                                // generation (forward_cached)
  };
  // scratch: shared buffers (nullptr: its own).
  GatedAttention(const ModelConfig& config, ModuleWeights weights, Ops& ops,
                 std::shared_ptr<Scratch> scratch = nullptr);
  // x: (B, S, H) normalised input; y: (B, S, H) overwritten.
  void forward(Saved& s, const Tensor& x, Tensor& y, int64_t B, int64_t S);
  // dy: (B, S, H). Accumulates into dx (B, S, H) and the parameter gradients.
  void backward(const Saved& s, const Tensor& dy, Tensor& dx);
  // Generation: x (B, S, H) holds S new tokens of each of B sequences, sequence b at positions [lengths[b],
  // lengths[b] + S); their keys and values are appended to `cache` (the layer's entry for those B slots), which
  // every new query attends over. y (B, S, H) is overwritten. The caller advances the lengths.
  void forward_cached(LayerCache& cache, const std::vector<int64_t>& lengths, const Tensor& x, Tensor& y, int64_t B,
                      int64_t S);
  // Selective recomputation of the core attention (softmax(q k^T) v): its output and log-sum-exp are not kept per
  // record (this module's scratch holds the last forward's); backward reruns the kernel on the kept q, k, v.
  void set_recompute_core(bool on) { recompute_core_ = on; }
  // Context parallelism (comm/context_parallel.h; not owned, nullptr or CP 1: the whole sequence is here): x holds
  // this rank's chunks of every sequence (equal on every rank: one, or the zigzag's two); RoPE uses their positions,
  // the keys and values are all-gathered and each chunk's queries attend to those up to its end (bottom-right
  // causal); their gradients go back to their owners by a reduce-scatter.
  void set_context_parallel(const ContextParallel* cp) { cp_ = cp; }

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  // The forward's steps shared with forward_cached: the projections, q_norm and k_norm into s (before RoPE); the
  // output gate and o_proj.
  void project(Saved& s, const Tensor& x, int64_t B, int64_t S);
  void finish(Saved& s, const Tensor& o, Tensor& y);
  Tensor q_cols_, gate_cols_;  // column tables of q_proj's output
  int64_t rope_S_ = 0;
  Tensor cos_, sin_;  // RoPE tables (rope_S_, rotary_dim), shared by the micro-batches of that length
  void rope_tables_for(int64_t S);
  // The RoPE rows of the local tokens at the segments' positions: views into the tables for one segment, else
  // seg_cos_ / seg_sin_ (S, rotary_dim).
  std::pair<Tensor, Tensor> rope_rows(const std::vector<CpSegment>& segments);
  // This rank's segments of S local tokens (one, at position 0, without context parallelism).
  std::vector<CpSegment> segments_of(int64_t S) const;
  // softmax(q k^T) v per segment: keys / values (B, Sk, NKV, D) are the last segment's causal context, an earlier
  // segment's the first (chunk + 1) L rows of every sequence; o, q (B, S, NH, D); lse as Saved::lse. The backward
  // overwrites dq, dkeys and dvalues.
  void core_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& keys, const Tensor& values,
                    const std::vector<CpSegment>& segments);
  void core_backward(Tensor& dq, Tensor& dkeys, Tensor& dvalues, const Tensor& d_o, const Tensor& q, const Tensor& keys,
                     const Tensor& values, const Tensor& o, const Tensor& lse, const std::vector<CpSegment>& segments);
  // dst (B, Sk, NKV, D) = the first Sk rows of every sequence of keys.
  Tensor& key_prefix(Tensor& dst, const Tensor& keys, int64_t Sk);
  const ContextParallel* cp_ = nullptr;
  bool cp_active() const { return cp_ != nullptr && cp_->active(); }
  bool recompute_core_ = false;
  std::shared_ptr<Scratch> sc_;
  Saved& cached_ = sc_->cached;
  Tensor &seg_cos_ = sc_->seg_cos, &seg_sin_ = sc_->seg_sin, &seg_q_ = sc_->seg_q, &seg_o_ = sc_->seg_o,
         &seg_do_ = sc_->seg_do, &seg_dq_ = sc_->seg_dq, &seg_k_ = sc_->seg_k, &seg_v_ = sc_->seg_v,
         &seg_dk_ = sc_->seg_dk, &seg_dv_ = sc_->seg_dv, &dk_full_ = sc_->dk_full, &dv_full_ = sc_->dv_full,
         &rc_o_ = sc_->rc_o, &rc_lse_ = sc_->rc_lse, &dog_ = sc_->dog, &do_ = sc_->d_o, &dq_ = sc_->dq, &dk_ = sc_->dk,
         &dv_ = sc_->dv, &dqn_ = sc_->dqn, &dkn_ = sc_->dkn, &dq_raw_ = sc_->dq_raw, &dk_raw_ = sc_->dk_raw,
         &dqg_ = sc_->dqg;
};

}  // namespace nextron
