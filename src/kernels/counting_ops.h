// CountingOps: an Ops decorator that forwards every call to another backend unchanged (results are bit for bit
// those of the wrapped backend) and tallies, per op name, the calls, the FLOPs and the HBM bytes the op must move
// at the least on a GPU with the CUDA backend's dtypes, and the host synchronisations it costs. It is the
// roofline of a step: with it a change's effect on launches, host syncs and bytes is visible on a machine without
// a GPU (tests/unit/test_counting_ops.cpp pins them; nextron-bench --roofline prints them).
//
// The cost model (counting_ops.cpp, "The cost model", one function per op with the derivation of each formula):
// - Bytes use the CUDA backend's dtypes whatever the wrapped backend's: activations and their gradients 2 bytes
//   (bf16), statistics / gates / router tensors / states 4 (f32), index tensors their own size (i32 4, i64 8).
//   Parameters: GEMMs read the bf16 shadow (w_act, 2 bytes); the other ops read the fp32 master (as the CUDA
//   kernels do); a backward reads and writes the fp32 gradient it accumulates into (8 bytes per element).
//   Every input tensor is read once and every output written once; an accumulated (+=) output is read and
//   written. Scratch a kernel keeps in HBM between its own phases (the delta rule's per-chunk states, cuBLAS or
//   cuDNN workspaces, the MoE's sorted copies) is not counted: this is the floor a fused kernel could reach.
//   On the CPU backend the activation dtype is f32 too, so a tensor that can be either (cast, add, gather, the
//   output of linear_forward) is counted as an activation; the ops whose contract makes a tensor f32 count 4.
// - FLOPs: GEMMs 2 M N K; attention the causal pairs only; the delta rule its chunked algebra (GEMMs and the
//   triangular solve, recomputation in the backward included); elementwise ops a documented handful per element.
// - Launches: the ops calls that enqueue device work (every op but new_moe_state, upload, download and resolve_reads).
// A CUDA op
//   may be several kernels (moe_experts_forward is about eight), so this is a lower bound on kernel launches.
//   Memory traffic outside Ops (Tensor::copy_from, Tensor::zero_ as in Model::zero_grad) is not seen.
// - Host syncs: download() calls (each waits for the stream on the CUDA backend), resolve_reads() with reads
//   pending (the deferred reads of read_later() and of the ops that defer theirs: the loss sums, the embedding's,
//   the loss's and the MoE dispatch's input checks), and the waits CudaOps makes inside an op (modelled per op: the
//   MoE dispatch's row counts on the cuBLASLt fallback only, the gradient norm, which resolves the pending reads).
//   Uploads do not wait (pinned staging).
// - Time on a GPU: per call max(flops / peak, bytes / bandwidth), summed (Roofline below). No launch latency.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"

namespace nextron {

// The tallies of one op (or a sum of ops).
struct OpCount {
  int64_t calls = 0;
  int64_t launches = 0;      // calls that enqueue device work
  int64_t host_syncs = 0;    // waits on the stream: uploads, downloads, and CudaOps' waits inside the op
  double flops = 0;          // floating-point operations
  double hbm_bytes = 0;      // bytes read + written in HBM at the least (CUDA dtypes)
  double host_bytes = 0;     // upload / download payload (host <-> device, not HBM)
  double wall_s = 0;         // measured time of the wrapped call (when timing is on; CPU backend only meaningful)
  double gpu_s[2] = {0, 0};  // roofline time on kRooflineGpus[0] and [1]: sum over calls of max(flops/peak, bytes/bw)
  OpCount& operator+=(const OpCount& o);
};

// A GPU for the roofline: dense bf16 tensor-core peak and HBM bandwidth.
struct RooflineGpu {
  const char* name;
  double peak_flops;  // FLOP/s
  double hbm_bw;      // bytes/s
};
// H100 SXM (989 TFLOP/s bf16 dense, 3.35 TB/s HBM3) and H200 (the same compute, 4.8 TB/s HBM3e).
inline constexpr RooflineGpu kRooflineGpus[2] = {{"H100 SXM", 989e12, 3.35e12}, {"H200", 989e12, 4.8e12}};

class CountingOps final : public Ops {
 public:
  // inner: the backend that does the work. time_calls: measure each wrapped call's wall time (meaningful only on
  // a synchronous backend: the CPU).
  explicit CountingOps(std::shared_ptr<Ops> inner, bool time_calls = false);

  Ops& inner() { return *inner_; }
  // Per op name ("linear_forward", "upload", ...), in name order.
  const std::map<std::string, OpCount>& per_op() const { return counts_; }
  OpCount op(const std::string& name) const;  // zero when never called
  OpCount total() const;                      // every op, uploads and downloads included
  int64_t launches() const { return total().launches; }
  int64_t downloads() const { return op("download").calls; }
  int64_t uploads() const { return op("upload").calls; }
  int64_t host_syncs() const { return total().host_syncs; }
  int64_t allocations() const { return allocations_; }  // buffers (re)allocated through this backend
  void reset();

  Device device() const override { return inner_->device(); }
  DType act_dtype() const override { return inner_->act_dtype(); }
  const char* name() const override { return name_.c_str(); }
  void upload(Tensor& dst, const void* host, size_t bytes) const override;
  void download(void* host, const Tensor& src, size_t bytes) const override;
  void read_later(void* host, const Tensor& src, size_t bytes) const override;
  void resolve_reads() const override;
  // The reads pending on the modelled CUDA backend (whatever the wrapped backend does).
  int64_t pending_reads() const override { return pending_; }

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
  void gated_delta_rule_step(Tensor& o, Tensor& state, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& g, const Tensor& beta, double scale) override;
  void gated_delta_rule_transition(Tensor& m, const Tensor& k, const Tensor& g, const Tensor& beta) override;

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
  // Through the wrapped backend's public buffer calls (Ops::ensure on an empty tensor allocates; Ops::zero fills),
  // which reach its protected allocate / fill_zero. A zero fill is a launch (cudaMemsetAsync) writing the tensor.
  Tensor allocate(const Shape& shape, DType dtype) const override;
  void fill_zero(Tensor& t) const override;

 private:
  // The cost of one call of an op, from the cost model.
  struct Cost {
    double flops = 0, bytes = 0;
    int64_t launches = 1, syncs = 0;
    double host_bytes = 0;
  };
  // Runs f() on the wrapped backend (timed when asked) and adds `c` to op `name`'s tallies.
  template <typename F>
  void record(const char* name, const Cost& c, F&& f) const {
    const auto t0 = time_calls_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    f();
    const double dt = time_calls_ ? std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() : 0.0;
    add(name, c, dt);
  }
  void add(const char* name, const Cost& c, double wall_s) const;
  // Bytes per element under the CUDA backend's dtypes (the roles of the cost model).
  double act_b(const Tensor& t) const;  // an activation (or its gradient): bf16, unless it is f32 on a bf16 backend
  static double f32_b() { return 4.0; }
  static double idx_b(const Tensor& t);  // index tensors keep their dtype (i32, i64)

  std::shared_ptr<Ops> inner_;
  bool time_calls_ = false;
  std::string name_;
  mutable std::map<std::string, OpCount> counts_;  // mutable: upload / download / allocate are const in Ops
  mutable int64_t allocations_ = 0;
  mutable int64_t pending_ = 0;  // deferred reads the CUDA backend would hold now (resolve_reads waits for them)
};

// The per-op table of `ops` (calls, launches, GFLOP, HBM MB, the implied time on each of kRooflineGpus and, when
// the calls were timed, the measured time) and its totals, every count divided by `per` (the steps counted).
std::string roofline_table(const CountingOps& ops, double per = 1.0);

}  // namespace nextron
