// Ops: the one interface through which the model runs its math, implemented by the CPU backend (fp32, the
// reference: kernels/cpu) and the CUDA backend (bf16 activations, fp32 statistics and gradients: kernels/cuda).
// Model code (src/model) calls these ops on Tensors and never sees the device or the activation dtype, so it reads
// like the single-device math and runs unchanged on either backend.
//
// Dtypes: activations and their gradients have act_dtype() (f32 on the CPU, bf16 on CUDA); statistics saved for a
// backward (rstd, lse), DeltaNet gates, router probabilities and weights are f32; parameters are read through a
// ParamRef (fp32 master, its GEMM-operand copy in the activation dtype, fp32 gradient).
// Gradients: as in the kernels, every *_backward ACCUMULATES (+=) into each gradient it is given (a null Tensor
// pointer skips it), parameter gradients included. Forwards overwrite their outputs.
// Shapes are taken from the tensors (row-major; the leading dims are flattened into rows where a comment says N).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "kernels/vocab_shard.h"
#include "optim/adamw.h"

namespace nextron {

// One parameter as the ops see it: views of the same entry in the flat buffers.
struct ParamRef {
  Tensor w;      // fp32 master
  Tensor w_act;  // the same values in the activation dtype (CUDA: the bf16 shadow the GEMMs read; CPU: w)
  Tensor g;      // fp32 gradient
};

// Backend-specific state a MoE layer keeps between its forward and backward (dispatch, sorted activations).
struct MoeExpertsState {
  virtual ~MoeExpertsState() = default;
  // Selective recomputation of the experts' activation (--recompute-modules moe_act), set by the layer: the SwiGLU
  // output (N K, I) is not kept between forward and backward (the backend's scratch holds the last forward's), and
  // backward recomputes it from the kept [gate | up] projections.
  bool recompute_act = false;
  // Host memory the state holds outside Tensors (the CPU backend's expert-ordered buffers), for activation memory
  // accounting; Tensors are counted by the allocator (core/tensor.h).
  virtual int64_t host_bytes() const { return 0; }
};

// Channels where a conv's output is split into row-major blocks (Ops::conv1d_silu_forward); none by default.
struct ConvSplit {
  int64_t c1 = -1, c2 = -1;  // 0 <= c1 <= c2 <= C, or -1: not split
  bool active() const { return c1 >= 0; }
};
// Throws unless `split` is none or 0 <= c1 <= c2 <= C, and y (the output or its gradient) has x's element count.
void check_conv_split(ConvSplit split, int64_t C, const Tensor& y, const Tensor& x);

// The recurrent state at the boundaries of a sequence slice (context parallelism, kernels/cpu/delta_state_scan.h):
// (B, Hv, dk, dv) f32 tensors, each optional. Forward: `initial` (nullptr: zero) and `final_state` (written when
// given). Backward: `initial` as in the forward, `d_final` (nullptr: zero) and `d_initial` (accumulated when given).
//
// And the forward's intermediates, kept for the backward (a training forward's choice: memory for speed). `save`
// (forward): receives them; `saved` (backward): what the forward of the same q, k, v, g, beta and `initial` wrote,
// read only, so that the backward skips recomputing them (nullptr: it recomputes them, as fla does). Both are
// (gated_delta_rule_saved_elements) f32 tensors whose layout is the backend's: on the CPU the state entering every
// chunk, on CUDA also the chunks' W, U, new values and decays. The results are the same bits either way.
struct GdrStates {
  const Tensor* initial = nullptr;
  Tensor* final_state = nullptr;
  const Tensor* d_final = nullptr;
  Tensor* d_initial = nullptr;
  Tensor* save = nullptr;
  const Tensor* saved = nullptr;
};
// Elements of GdrStates::save / saved on `device` for q, k (B, S, Hk, dk) and v (B, S, Hv, dv): on the CPU the
// chunk states (B, Hv, NC, dk, dv), NC = ceil(S / 64); on CUDA the bytes of cuda::gated_delta_rule_saved_bytes / 4
// (tests/cuda pins the two equal).
int64_t gated_delta_rule_saved_elements(Device device, int64_t B, int64_t S, int64_t Hk, int64_t Hv, int64_t dk,
                                        int64_t dv);
// Throws unless `t` (a GdrStates::save / saved, if given) has that many elements.
void check_gdr_saved(const Tensor* t, Device device, const Tensor& q, const Tensor& v, const char* what);
// A state's f32 data, or nullptr when absent (the kernels' convention).
inline const float* f32_or_null(const Tensor* t) { return t != nullptr ? t->f32() : nullptr; }
inline float* f32_or_null(Tensor* t) { return t != nullptr ? t->f32() : nullptr; }

class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;
  virtual DType act_dtype() const = 0;
  virtual const char* name() const = 0;

  // --- Buffers: (re)allocated only when the shape or dtype changes, so steps of a fixed shape allocate nothing.
  Tensor& act(Tensor& t, const Shape& shape) const { return ensure(t, shape, act_dtype()); }
  Tensor& f32(Tensor& t, const Shape& shape) const { return ensure(t, shape, DType::f32); }
  Tensor& i32(Tensor& t, const Shape& shape) const { return ensure(t, shape, DType::i32); }
  Tensor& i64(Tensor& t, const Shape& shape) const { return ensure(t, shape, DType::i64); }
  // The same, zero-filled (the target of an accumulating backward).
  Tensor& act_zeroed(Tensor& t, const Shape& shape) const;
  Tensor& f32_zeroed(Tensor& t, const Shape& shape) const;
  Tensor& ensure(Tensor& t, const Shape& shape, DType dtype) const;
  void zero(Tensor& t) const;
  // Host data into a device tensor of the backend (same dtype and element count) and back. The host buffer is free
  // when upload() returns; an upload of at most kStagedUploadBytes does not wait for the device (the CUDA backend
  // stages it in pinned memory), a larger one (weights at load time) does, so that no model-sized pinned buffer is
  // kept. download() waits: the bytes are on the host when it returns.
  static constexpr size_t kStagedUploadBytes = size_t{16} << 20;
  virtual void upload(Tensor& dst, const void* host, size_t bytes) const = 0;
  virtual void download(void* host, const Tensor& src, size_t bytes) const = 0;

  // --- Deferred reads: values the host needs once per step (loss sums, router statistics) and device-side input
  // checks (token ids, targets and expert indices in range) wait for the device all together, once. read_later()
  // copies `bytes` of `src` now (stream-ordered) and writes them to `host` at the next resolve_reads(), which
  // waits once for every read pending and then raises the first failed check (on the CPU both happen at once).
  // `host` must stay valid until then and be read only after it. sum_squares() resolves pending reads in its own
  // wait, so a training step waits for the device once (the gradient norm; tests/unit/test_counting_ops.cpp).
  virtual void read_later(void* host, const Tensor& src, size_t bytes) const { download(host, src, bytes); }
  virtual void resolve_reads() const {}
  // Reads pending: 0 on a backend that reads at once.
  virtual int64_t pending_reads() const { return 0; }

  // --- Glue.
  // dst = src converted to dst's dtype (same element count; f32 <-> act dtype).
  virtual void cast(Tensor& dst, const Tensor& src) = 0;
  // y = a + b (elementwise, same shapes; y may alias a or b).
  virtual void add(Tensor& y, const Tensor& a, const Tensor& b) = 0;
  // Column gather / scatter over rows: dst (N, Wd), src (N, Ws); idx: (W) i32 column indices (a device tensor
  // from index_table). gather: dst[:, j] = src[:, idx[j]] for j < W = Wd. scatter: dst[:, idx[j]] (+)= src[:, j] for
  // j < W = Ws (idx injective), accumulating when `accumulate`, else overwriting those columns.
  virtual void gather_cols(Tensor& dst, const Tensor& src, const Tensor& idx) = 0;
  virtual void scatter_cols(Tensor& dst, const Tensor& src, const Tensor& idx, bool accumulate) = 0;
  // A constant i32 index table on the backend's device.
  Tensor index_table(const std::vector<int32_t>& idx) const;

  // --- Matrix products. x: (N, IN), w: (OUT, IN), y: (N, OUT). bias may be nullptr.
  virtual void linear_forward(Tensor& y, const Tensor& x, const ParamRef& w, const ParamRef* bias) = 0;
  // y in f32 whatever the activation dtype (the router logits).
  virtual void linear_forward_f32(Tensor& y, const Tensor& x, const ParamRef& w) = 0;
  // Accumulates dx (may be nullptr), w.g and bias->g. dy has the dtype of the forward's y.
  virtual void linear_backward(Tensor* dx, const ParamRef& w, const ParamRef* bias, const Tensor& dy,
                               const Tensor& x) = 0;

  // --- Norms. Rows: N = x.numel() / D, D = w's size. rstd: (N) f32.
  virtual void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const ParamRef& w, double eps) = 0;
  virtual void rmsnorm_backward(Tensor* dx, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                const Tensor& rstd) = 0;
  virtual void rmsnorm_gated_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& z, const ParamRef& w,
                                     double eps) = 0;
  virtual void rmsnorm_gated_backward(Tensor* dx, Tensor* dz, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                      const Tensor& z, const Tensor& rstd) = 0;
  // Rows of D; eps 1e-6 as HF's l2norm.
  virtual void l2norm_forward(Tensor& y, const Tensor& x, int64_t D) = 0;
  virtual void l2norm_backward(Tensor& dx, const Tensor& dy, const Tensor& x, int64_t D) = 0;

  // --- Attention. RoPE tables cos, sin: (S, R) f32 on the device; x: (B, S, NH, D).
  virtual void rope_tables(Tensor& cos, Tensor& sin, int64_t S, int64_t R, double theta) = 0;
  virtual void rope_forward(Tensor& y, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t R) = 0;
  virtual void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& cos, const Tensor& sin, int64_t R) = 0;
  // Causal GQA attention; q, o: (B, Sq, NH, D), k, v: (B, Sk, NKV, D), lse: (B, NH, Sq) f32. Sq == Sk for a whole
  // sequence; Sq < Sk when the queries are the last Sq of the Sk key positions (bottom-right causal: a
  // context-parallel slice against the keys gathered up to its end).
  virtual void attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                 double scale) = 0;
  // OVERWRITES dq, dk, dv (the fused GPU kernel writes its gradients).
  virtual void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& d_o, const Tensor& q,
                                  const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                                  double scale) = 0;
  // y = x * sigmoid(gate), gate (N, G) with row stride ld_gate (G when dense); x, y: (N, D).
  virtual void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& gate, int64_t G, int64_t ld_gate) = 0;
  virtual void sigmoid_gate_backward(Tensor* dx, Tensor* dgate, const Tensor& dy, const Tensor& x, const Tensor& gate,
                                     int64_t G, int64_t ld_gate) = 0;

  // --- Gated DeltaNet. x: (B, S, C), w: (C, KC); y (and dy): B S C elements, the plain (B, S, C) or, with `split`,
  // three row-major channel blocks one after another, (B S, c1), (B S, c2 - c1), (B S, C - c2): the DeltaNet's q, k
  // and v, each then a contiguous tensor that needs no column gather (nor its gradient a scatter).
  virtual void conv1d_silu_forward(Tensor& y, const Tensor& x, const ParamRef& w, ConvSplit split) = 0;
  virtual void conv1d_silu_backward(Tensor& dx, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                    ConvSplit split) = 0;
  // b, a: (N, Hv) act; beta, g: (N, Hv) f32.
  virtual void gdn_gates_forward(Tensor& beta, Tensor& g, const Tensor& b, const Tensor& a, const ParamRef& A_log,
                                 const ParamRef& dt_bias) = 0;
  virtual void gdn_gates_backward(Tensor& db, Tensor& da, const ParamRef& A_log, const ParamRef& dt_bias,
                                  const Tensor& dbeta, const Tensor& dg, const Tensor& b, const Tensor& a) = 0;
  // q, k: (B, S, Hk, dk), v, o: (B, S, Hv, dv) act; g, beta: (B, S, Hv) f32; states: GdrStates ({} for a whole
  // sequence).
  virtual void gated_delta_rule_forward(Tensor& o, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                        const Tensor& beta, double scale, const GdrStates& states) = 0;
  virtual void gated_delta_rule_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dg, Tensor& dbeta,
                                         const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& g, const Tensor& beta, double scale,
                                         const GdrStates& states) = 0;
  // One decoding step (a single new token per sequence) of the same recurrence, on the cached state: q, k
  // (B, Hk, dk) act (L2-normalised), v, o (B, Hv, dv) act, g, beta (B, Hv) f32; state (B, Hv, dk, dv) f32 is read
  // and overwritten with the state after the token (generation: O(1) per token whatever the context length).
  virtual void gated_delta_rule_step(Tensor& o, Tensor& state, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& g, const Tensor& beta, double scale) = 0;
  // m (B, Hv, dk, dk) f32 = the slice's transition M (S_out = M S_in + L): the recurrence with v = 0 from the
  // identity (kernels/cpu/delta_state_scan.h). k: (B, S, Hk, dk) act (L2-normalised), g, beta: (B, S, Hv) f32.
  virtual void gated_delta_rule_transition(Tensor& m, const Tensor& k, const Tensor& g, const Tensor& beta) = 0;

  // --- MLP and MoE. gu: (N, 2I) rows [gate | up], h: (N, I).
  virtual void swiglu_forward(Tensor& h, const Tensor& gu) = 0;
  virtual void swiglu_backward(Tensor& dgu, const Tensor& dh, const Tensor& gu) = 0;
  // logits: (N, E) f32 -> probs (N, E), weights (N, K) f32, indices (N, K) i32.
  virtual void router_forward(Tensor& probs, Tensor& indices, Tensor& weights, const Tensor& logits,
                              bool norm_topk_prob) = 0;
  // Routing replay: weights (N, K) = probs at the given indices (N, K), renormalised when norm_topk_prob.
  virtual void router_weights_from_indices(Tensor& weights, const Tensor& probs, const Tensor& indices,
                                           bool norm_topk_prob) = 0;
  virtual void router_backward(Tensor& dlogits, const Tensor* dprobs, const Tensor* dweights, const Tensor& probs,
                               const Tensor& indices, bool norm_topk_prob) = 0;
  // count_sum, prob_sum: (E) f32 accumulated; dprobs (N, E) += daux * E * count_sum / total_rows^2.
  virtual void aux_stats_accumulate(Tensor& count_sum, Tensor& prob_sum, const Tensor& probs,
                                    const Tensor& indices) = 0;
  virtual void aux_loss_backward(Tensor& dprobs, const Tensor& count_sum, double total_rows, double daux) = 0;
  // Routed SwiGLU experts; x, y: (N, H), weights, indices: (N, K); w_gate_up: (E, 2I, H), w_down: (E, H, I).
  virtual std::unique_ptr<MoeExpertsState> new_moe_state() = 0;
  virtual void moe_experts_forward(Tensor& y, MoeExpertsState& state, const Tensor& x, const Tensor& weights,
                                   const Tensor& indices, const ParamRef& w_gate_up, const ParamRef& w_down) = 0;
  // Accumulates dx, dweights (f32) and the expert weight gradients.
  virtual void moe_experts_backward(Tensor& dx, Tensor& dweights, MoeExpertsState& state, const Tensor& dy,
                                    const ParamRef& w_gate_up, const ParamRef& w_down) = 0;
  // Token movement of the expert-parallel dispatcher: rows of width H in the activation dtype, index tables (i32) on
  // the backend's device, a token's K routed slots summed in k order (deterministic).
  //   rows (R, H) = x[row_token[r]]                                      (overwrites; dispatch preprocess)
  virtual void moe_permute(Tensor& rows, const Tensor& x, const Tensor& row_token) = 0;
  //   dx (N, H) += sum_k drows[slot_row[n K + k]]                          (its backward; K = slot_row / N)
  virtual void moe_permute_backward(Tensor& dx, const Tensor& drows, const Tensor& slot_row) = 0;
  //   y (N, H) = sum_k weights[n, k] rows[slot_row[n K + k]]             (overwrites; combine postprocess)
  virtual void moe_unpermute(Tensor& y, const Tensor& rows, const Tensor& weights, const Tensor& slot_row) = 0;
  //   drows[slot_row[n K + k]] = weights[n, k] dy[n] (overwrites), dweights (N, K) f32 += dy[n] . rows[slot]
  virtual void moe_unpermute_backward(Tensor& drows, Tensor& dweights, const Tensor& dy, const Tensor& rows,
                                      const Tensor& weights, const Tensor& slot_row) = 0;

  // --- Embedding and loss. ids, targets: (N) i64 tensors of the backend's device. `vocab`: the ids the table's
  // rows / the logits' columns hold (VocabShard::whole(V) on one device; a TP rank's slice under tensor
  // parallelism).
  // out (N, H) = the table rows of the ids held, zero rows for the others. Ids outside [0, vocab.full) are errors
  // (raised at the next resolve_reads() on the CUDA backend, at once on the CPU).
  virtual void embedding_forward(Tensor& out, const ParamRef& table, const Tensor& ids, const VocabShard& vocab) = 0;
  virtual void embedding_backward(const ParamRef& table, const Tensor& dout, const Tensor& ids,
                                  const VocabShard& vocab) = 0;
  // The whole vocabulary: logits (N, V); overwrites lse, row_loss (N) f32; writes the loss sum (double) to
  // *loss_sum as a deferred read (valid after resolve_reads(); a target outside the vocabulary raises there). The
  // scored-token count is the caller's (it holds the targets on the host).
  virtual void cross_entropy_forward(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& logits,
                                     const Tensor& targets) = 0;
  // Vocab-parallel (kernels/cpu/cross_entropy.h): stats (3, N) f32 of this rank's logit columns (N, vocab.size) ...
  virtual void cross_entropy_partial(Tensor& stats, const Tensor& logits, const Tensor& targets,
                                     const VocabShard& vocab) = 0;
  // ... and, from every rank's stats (P, 3, N), lse and row_loss (N) f32 and the loss sum (as the forward above).
  virtual void cross_entropy_combine(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& stats,
                                     const Tensor& targets, int64_t vocab_full) = 0;
  // OVERWRITES dlogits (N, vocab.size) with scale * (softmax - onehot) over the columns held, 0 on ignored rows.
  virtual void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse, const Tensor& targets,
                                      double scale, const VocabShard& vocab) = 0;
  // --- Optimizer on flat f32 buffers laid out by the parameter table.
  // Sum of squares of x over the given ranges of flat element indices, in double (deterministic). Resolves the
  // pending deferred reads in the same wait (see read_later).
  virtual double sum_squares(const Tensor& x, const std::vector<FlatRange>& ranges) = 0;
  // x[r] *= s.
  virtual void scale(Tensor& x, FlatRange r, float s) = 0;
  // One AdamW update (optim/adamw.h's arithmetic) of flat elements `range`: params and grads are full flat buffers,
  // exp_avg / exp_avg_sq hold range.size() elements; params_act (may be nullptr) receives the updated range in
  // the activation dtype (the CUDA backend's bf16 shadow). decay: absolute flat ranges, sorted.
  virtual void adamw_step(Tensor& params, const Tensor& grads, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor* params_act,
                          FlatRange range, const std::vector<FlatRange>& decay, const AdamWHyper& h, int64_t step) = 0;

 protected:
  // Allocation on the backend's device (zero-filled).
  virtual Tensor allocate(const Shape& shape, DType dtype) const = 0;
  virtual void fill_zero(Tensor& t) const = 0;
};

}  // namespace nextron
