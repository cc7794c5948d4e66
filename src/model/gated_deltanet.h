// Gated DeltaNet linear attention (Qwen3NextGatedDeltaNet): grouped qkvz/ba projections, depthwise causal conv1d
// + SiLU over [q | k | v], L2-normalised q/k, gates beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias),
// the chunked gated delta rule, gated RMSNorm with z, out_proj.
#pragma once

#include <vector>

#include "comm/context_parallel.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/inference_cache.h"
#include "model/module.h"

namespace nextron {

class GatedDeltaNet {
 public:
  GatedDeltaNet(const ModelConfig& config, ModuleWeights weights, Ops& ops);
  // What backward needs from one forward: one record per micro-batch in flight, owned by the caller.
  struct Saved {
    int64_t B = 0, S = 0;
    Tensor x;          // (B S, H) the normalised input (a view: the caller keeps it alive until backward)
    Tensor mixed;      // (B, S, CD) the conv input [q | k | v] of all heads
    Tensor z, b, a;    // (B S, Hv dv), (B S, Hv), (B S, Hv)
    Tensor q, k, v;    // (B, S, Hk, dk), (B, S, Hk, dk), (B, S, Hv, dv) after conv + SiLU
    Tensor qn, kn;     // (B, S, Hk, dk) L2-normalised
    Tensor beta, g;    // (B, S, Hv) fp32 gates
    Tensor o, o_rstd;  // (B, S, Hv, dv) the delta rule's output, (B S Hv) its gated-norm rstd
    Tensor on;         // (B S, Hv dv) after the gated norm
    // Under context parallelism (S is then this rank's Sl tokens: G segments of L = Sl / G, items b G + i):
    Tensor mixed_ext;               // (B G, L + KC - 1, CD) each segment's conv input behind the previous chunk's
                                    // last KC-1 rows
    Tensor state_in;                // (B G, Hv, dk, dv) fp32, the state entering each segment
    std::vector<float> gathered_m;  // (chunks, B, Hv, dk, dk) every chunk's transition, for the backward
  };
  // x: (B, S, H) normalised input; y: (B, S, H) overwritten.
  void forward(Saved& s, const Tensor& x, Tensor& y, int64_t B, int64_t S);
  // Accumulates into dx (B, S, H) and the parameter gradients.
  void backward(const Saved& s, const Tensor& dy, Tensor& dx);
  // Generation: x (B, S, H) holds S new tokens of each of B sequences whose conv window and recurrent state are in
  // `cache` (the layer's entry for those B slots); y (B, S, H) is overwritten and the cache advanced by S tokens.
  // One new token runs the recurrent step; more run the chunked kernel from the cached state.
  void forward_cached(LayerCache& cache, const Tensor& x, Tensor& y, int64_t B, int64_t S);
  // Selective recomputation of the delta-rule core (the q/k L2 norms and the chunked gated delta rule, as fla's
  // kernel with use_qk_l2norm_in_kernel): qn, kn and its output are not kept per record (this module's scratch
  // holds the last forward's); backward reruns them on the kept q, k, v and gates.
  void set_recompute_core(bool on) { recompute_core_ = on; }
  // Context parallelism (comm/context_parallel.h; not owned, nullptr or CP 1: the whole sequence is here): x holds
  // this rank's chunks of every sequence (one, or the zigzag's two), each run as its own item; every chunk's causal
  // conv gets its left context from the previous chunk and its delta rule the incoming state from the earlier ones,
  // so outputs and gradients are the whole sequence's.
  void set_context_parallel(const ContextParallel* cp) { cp_ = cp; }

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  // Column tables (device i32) that regroup the projections: in_proj_qkvz's per-key-head groups into the conv input
  // [q | k | v] and z, in_proj_ba's groups into b and a; and the q / k / v columns of the conv output.
  Tensor mixed_cols_, z_cols_, b_cols_, a_cols_, q_cols_, k_cols_, v_cols_;
  // Forward scratch: the projections (B S, 2 KD + 2 VD), (B S, 2 Hv) and the conv output (B, S, CD).
  Tensor qkvz_, ba_, conv_;
  // The forward's steps shared with forward_cached: the projections regrouped into s.mixed, z, b, a; the conv
  // output split into q, k, v, their L2 norms (into qn, kn) and the gates; the gated norm and out_proj.
  void project(Saved& s, const Tensor& x, int64_t B, int64_t S);
  void split_conv(Saved& s, const Tensor& conv, Tensor& qn, Tensor& kn);
  void finish(Saved& s, const Tensor& o, Tensor& y);
  // Generation scratch: the forward's tensors, the windowed conv input (B, KC - 1 + S, CD), the new state.
  Saved cached_;
  Tensor cached_ext_, cached_final_;
  bool recompute_core_ = false;
  const ContextParallel* cp_ = nullptr;
  bool cp_active() const { return cp_ != nullptr && cp_->active(); }
  // Context-parallel scratch: the extended conv output and its gradients, the items' local final states, transitions,
  // local state gradient and incoming final-state gradient, and the discarded gradients of the backward's first pass.
  Tensor conv_ext_, dconv_ext_, dmixed_ext_, cp_final_, cp_m_, cp_din_, cp_dfin_;
  Tensor cp_dqn_, cp_dkn_, cp_dv_, cp_dg_, cp_dbeta_;
  Tensor host_f32_;              // (n) f32 staging for the boundary rows in the activation dtype
  Tensor rc_qn_, rc_kn_, rc_o_;  // (B, S, Hk, dk) x 2, (B, S, Hv, dv) when the core is recomputed
  // Backward scratch.
  Tensor don_, do_, dz_, dqn_, dkn_, dq_, dk_, dv_, dbeta_, dg_, db_, da_, dconv_, dmixed_, dqkvz_, dba_;
};

}  // namespace nextron
