// Gated DeltaNet linear attention (Qwen3NextGatedDeltaNet): grouped qkvz/ba projections, depthwise causal conv1d
// + SiLU over [q | k | v], L2-normalised q/k, gates beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias),
// the chunked gated delta rule, gated RMSNorm with z, out_proj.
#pragma once

#include <memory>
#include <vector>

#include "comm/context_parallel.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/inference_cache.h"
#include "model/module.h"

namespace nextron {

class GatedDeltaNet {
 public:
  // What backward needs from one forward: one record per micro-batch in flight, owned by the caller.
  struct Saved {
    int64_t B = 0, S = 0;
    Tensor x;          // (B S, H) the normalised input (a view: the caller keeps it alive until backward)
    Tensor mixed;      // (B, S, CD) the conv input [q | k | v] of all heads
    Tensor z, b, a;    // (B S, Hv dv), (B S, Hv), (B S, Hv)
    Tensor qkv;        // (B S CD) after conv + SiLU: (B S, KD), (B S, KD), (B S, VD) row-major, one after another
    Tensor q, k, v;    // (B, S, Hk, dk), (B, S, Hk, dk), (B, S, Hv, dv): views of qkv
    Tensor qn, kn;     // (B, S, Hk, dk) L2-normalised
    Tensor beta, g;    // (B, S, Hv) fp32 gates
    Tensor o, o_rstd;  // (B, S, Hv, dv) the delta rule's output, (B S Hv) its gated-norm rstd
    Tensor on;         // (B S, Hv dv) after the gated norm
    Tensor gdr_saved;  // (gated_delta_rule_saved_elements) f32 the delta rule's intermediates for its backward
                       // (undefined when recomputed: the core or the delta rule's states)
    // Under context parallelism (S is then this rank's Sl tokens: G segments of L = Sl / G, items b G + i):
    Tensor mixed_ext;               // (B G, L + KC - 1, CD) each segment's conv input behind the previous chunk's
                                    // last KC-1 rows
    Tensor state_in;                // (B G, Hv, dk, dv) fp32, the state entering each segment
    std::vector<float> gathered_m;  // (chunks, B, Hv, dk, dk) every chunk's transition, for the backward
  };
  // Buffers outside the records, shared by the DeltaNet of every layer of one kind (model/decoder.h): each lives
  // within one call, or (the recomputed core) is rewritten by the backward before it reads it.
  struct Scratch {
    Tensor conv;  // forward under context parallelism and in generation: the conv output's plain rows (B, S, CD)
    // Context parallelism: the extended conv output and its gradients, the items' local final states, transitions,
    // local state gradient and incoming final-state gradient, and the discarded gradients of the backward's first
    // pass; f32 staging (n) for the boundary rows in the activation dtype.
    Tensor conv_ext, dconv_ext, dmixed_ext, cp_final, cp_m, cp_din, cp_dfin;
    Tensor cp_dqn, cp_dkn, cp_dv, cp_dg, cp_dbeta, host_f32;
    Tensor rc_qn, rc_kn, rc_o;  // (B, S, Hk, dk) x 2, (B, S, Hv, dv) when the core is recomputed
    Tensor rc_saved;            // (gated_delta_rule_saved_elements) f32: the rerun core's intermediates
    // Backward; dqkv (B S CD) the gradient of the conv's split output (dq | dk | dv, laid out as Saved::qkv), dconv
    // (B, S, CD) its plain rows under context parallelism.
    Tensor don, d_o, dz, dqn, dkn, dqkv, dbeta, dg, db, da, dconv, dmixed;
    // Generation (forward_cached): the forward's tensors, the windowed conv input (B, KC - 1 + S, CD), the new state.
    Saved cached;
    Tensor cached_ext, cached_final;
  };
  // scratch: shared buffers (nullptr: its own).
  GatedDeltaNet(const ModelConfig& config, ModuleWeights weights, Ops& ops, std::shared_ptr<Scratch> scratch = nullptr);
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
  // Selective recomputation of the delta rule's intermediates (its chunk states, W, U, new values: about 5 (B, S,
  // Hv, dv) tensors on CUDA, 2 (B, S, Hv, dv) f32 tensors' worth of chunk states on the CPU at dk = 128): not kept
  // in the record (Saved::gdr_saved), its backward recomputes them as fla's does. Off by default: the forward keeps
  // them and the backward skips a third of its work (prepare and the sequential state pass on CUDA).
  void set_recompute_states(bool on) { recompute_states_ = on; }
  // Context parallelism (comm/context_parallel.h; not owned, nullptr or CP 1: the whole sequence is here): x holds
  // this rank's chunks of every sequence (one, or the zigzag's two), each run as its own item; every chunk's causal
  // conv gets its left context from the previous chunk and its delta rule the incoming state from the earlier ones,
  // so outputs and gradients are the whole sequence's.
  void set_context_parallel(const ContextParallel* cp) { cp_ = cp; }

 private:
  const ModelConfig& c_;
  ModuleWeights wt_;
  Ops& ops_;
  // Column tables (device i32): the q / k / v columns of the conv output.
  Tensor q_cols_, k_cols_, v_cols_;
  ParamRef weight_rows(const char* name, int64_t first, int64_t n) const;
  // The forward's steps shared with forward_cached: the projections into s.mixed, z, b, a; the record's conv output
  // s.qkv and its q, k, v views (conv_output), filled by the conv itself or, from plain conv rows (context
  // parallelism, generation), by split_conv's gathers; the L2 norms (into qn, kn) and the gates; the gated norm and
  // out_proj.
  void project(Saved& s, const Tensor& x, int64_t B, int64_t S);
  void conv_output(Saved& s);
  void split_conv(Saved& s, const Tensor& conv);
  void norms_and_gates(Saved& s, Tensor& qn, Tensor& kn);
  void finish(Saved& s, const Tensor& o, Tensor& y);
  bool recompute_core_ = false;
  bool recompute_states_ = false;
  // The record's (or, for the rerun core, the scratch's) tensor for the delta rule's intermediates, sized for q
  // (B, S, Hk, dk) and v (B, S, Hv, dv); nullptr when they are recomputed.
  Tensor* delta_rule_save(Tensor& t, const Tensor& q, const Tensor& v) const;
  const ContextParallel* cp_ = nullptr;
  bool cp_active() const { return cp_ != nullptr && cp_->active(); }
  std::shared_ptr<Scratch> sc_;
  Tensor &conv_ = sc_->conv, &conv_ext_ = sc_->conv_ext, &dconv_ext_ = sc_->dconv_ext, &dmixed_ext_ = sc_->dmixed_ext,
         &cp_final_ = sc_->cp_final, &cp_m_ = sc_->cp_m, &cp_din_ = sc_->cp_din, &cp_dfin_ = sc_->cp_dfin,
         &cp_dqn_ = sc_->cp_dqn, &cp_dkn_ = sc_->cp_dkn, &cp_dv_ = sc_->cp_dv, &cp_dg_ = sc_->cp_dg,
         &cp_dbeta_ = sc_->cp_dbeta, &host_f32_ = sc_->host_f32, &rc_qn_ = sc_->rc_qn, &rc_kn_ = sc_->rc_kn,
         &rc_o_ = sc_->rc_o, &rc_saved_ = sc_->rc_saved, &don_ = sc_->don, &do_ = sc_->d_o, &dz_ = sc_->dz,
         &dqn_ = sc_->dqn, &dkn_ = sc_->dkn, &dqkv_ = sc_->dqkv, &dbeta_ = sc_->dbeta, &dg_ = sc_->dg, &db_ = sc_->db,
         &da_ = sc_->da, &dconv_ = sc_->dconv, &dmixed_ = sc_->dmixed, &cached_ext_ = sc_->cached_ext,
         &cached_final_ = sc_->cached_final;
  Saved& cached_ = sc_->cached;
};

}  // namespace nextron
