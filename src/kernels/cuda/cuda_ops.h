// The CUDA backend of Ops (kernels/ops.h): bf16 activations, fp32 master weights / statistics / gradients, on one
// GPU and one stream. GEMMs through cuBLASLt (Blas), attention through cuDNN (FusedAttention), the rest through
// our kernels (kernels/cuda/*.cu), each tested against the CPU backend in tests/cuda.
//
// Memory: every activation buffer is allocated by the Ops buffer calls, which reallocate only when a shape
// changes, and every library workspace is allocated once and kept; a step of a fixed shape after the first makes
// no cudaMalloc (tests/cuda/test_cuda_model.cpp counts them).
// Synchronisation: the ops enqueue on stream() and do not wait for it, with these exceptions: download() and
// sum_squares() (which resolves the deferred reads: the loss sums, the router statistics and the input checks of
// the embedding, the loss and the MoE dispatch, all in one copy and one wait), and the MoE dispatch's per-expert
// row counts on the cuBLASLt path. Uploads go through a pinned staging ring and do not wait.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/blas.h"
#include "kernels/ops.h"

namespace nextron {

struct CudaOpsOptions {
  // Bitwise reproducible run to run where a library offers it: cuDNN's deterministic attention backward (a
  // B x NH x S^2 x 2-byte workspace on Hopper). nextron's own kernels are deterministic either way.
  bool deterministic = false;
  // The routed experts' GEMMs: `cutlass`, one CUTLASS grouped GEMM per product with the per-expert arguments built
  // on the device (no per-expert launches, no host read of the expert offsets; kernels/cuda/grouped_gemm.h), or
  // `cublaslt_loop`, one cuBLASLt GEMM per expert with rows after downloading the offsets (a stream sync per MoE
  // layer; kept for comparison). `cutlass` falls back to the loop, noted once on stderr, where it cannot run: a
  // GPU other than sm_90, expert widths not multiples of 8, or operands not 16-byte aligned.
  enum class MoeGemm { cutlass, cublaslt_loop };
  MoeGemm moe_gemm = MoeGemm::cutlass;
};

class CudaOps final : public Ops {
 public:
  // Selects `device` for this thread, creates the stream and the library handles, and registers the device memory
  // hooks of core/tensor.h. Throws nextron::Error naming the problem when there is no such device.
  explicit CudaOps(int device, CudaOpsOptions options = {});
  ~CudaOps() override;
  Device device() const override { return Device::cuda; }
  DType act_dtype() const override { return DType::bf16; }
  const char* name() const override { return "cuda"; }
  cudaStream_t stream() const { return stream_; }
  int device_index() const { return device_; }
  void synchronize() const;

  void upload(Tensor& dst, const void* host, size_t bytes) const override;
  void download(void* host, const Tensor& src, size_t bytes) const override;
  void read_later(void* host, const Tensor& src, size_t bytes) const override;
  void resolve_reads() const override;
  int64_t pending_reads() const override { return static_cast<int64_t>(reads_.size() + checks_.size()); }

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
  Tensor allocate(const Shape& shape, DType dtype) const override;
  void fill_zero(Tensor& t) const override;

 private:
  // The loss sum of row_loss (N) in double into *loss_sum and the bad-target flag the loss kernel set (its row +
  // 1) checked, both at the next resolve_reads().
  void finish_loss(double* loss_sum, const Tensor& row_loss, const Tensor& bad_target, int64_t vocab);
  // Scratch reused across calls (grown only when a larger size is asked for).
  Tensor& scratch(Tensor& t, int64_t bytes) const;
  // Copies `bytes` (4 or 8) of the device error word `flag` for resolve_reads(), which raises
  // nextron::Error(message(value)) when the word is not zero. The word may be zeroed and reused after this call.
  void check_later(const Tensor& flag, size_t bytes, std::function<std::string(int64_t)> message) const;
  // Room for `bytes` more in the read-back buffers (8-byte aligned), flushing them first when they are full.
  size_t reserve_readback(size_t bytes) const;
  // One copy of the pending read-back bytes to the host, one wait, then every pending read delivered and check made
  // (the first failed check raised, with nothing left pending).
  void flush_readback() const;
  // Replaces the (empty) read-back buffers by ones of `capacity` bytes.
  void grow_readback(size_t capacity) const;

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::Blas> blas_;
  std::unique_ptr<cuda::FusedAttention> attention_;
  Tensor dy_bf16_;                                 // f32 output gradients cast for a bf16 GEMM (router logits)
  Tensor gdr_workspace_;                           // gated delta rule
  Tensor flag_;                                    // (2) i64 device error flags: bad id, bad target
  Tensor embed_rows_, embed_offsets_;              // embedding backward scratch
  Tensor moe_dys_, moe_dact_, moe_dgu_, moe_dxs_;  // MoE backward scratch (N K, H), (N K, I), (N K, 2I), (N K, H)
  Tensor moe_act_scratch_;           // (N K, I) the experts' SwiGLU output of MoE states that recompute it
  Tensor sum_scratch_, sum_out_;     // loss sum
  Tensor decay_ranges_;              // AdamW: decayed ranges relative to the updated range (int64 pairs)
  Tensor norm_dw_scratch_;           // RMSNorm / gated RMSNorm dw: per-chunk partial column sums
  std::vector<int64_t> decay_host_;  // the decayed ranges last uploaded to decay_ranges_ (uploaded only on change)

  // Deferred reads: values copied (stream-ordered) into readback_dev_, brought to the pinned readback_host_ in one
  // copy and one wait by resolve_reads().
  struct PendingRead {
    size_t offset, bytes;
    void* host;
  };
  struct PendingCheck {
    size_t offset, bytes;
    std::function<std::string(int64_t)> message;
  };
  mutable Tensor readback_dev_;                               // (R) f64 words
  mutable void* readback_host_ = nullptr;                     // R words, pinned
  mutable size_t readback_capacity_ = 0, readback_used_ = 0;  // bytes
  mutable size_t readback_epoch_bytes_ = 0;                   // bytes asked for since the last resolve_reads()
  mutable std::vector<PendingRead> reads_;
  mutable std::vector<PendingCheck> checks_;
  // Uploads: a ring of pinned staging memory. Each upload copies into the next free bytes and enqueues the
  // host-to-device copy; staging_event_ marks the last one, waited for only when the ring wraps (or grows).
  mutable char* staging_ = nullptr;
  mutable size_t staging_capacity_ = 0, staging_head_ = 0;
  cudaEvent_t staging_event_ = nullptr;

  // The MoE experts' GEMMs (CudaOpsOptions::moe_gemm): the grouped GEMM workspace (per-expert argument arrays,
  // CUTLASS's own), the option, and whether the cutlass option's fallback to the cuBLASLt loop was reported.
  Tensor moe_gemm_ws_;
  CudaOpsOptions::MoeGemm moe_gemm_ = CudaOpsOptions::MoeGemm::cutlass;
  bool moe_gemm_device_ = false;  // the GPU runs the CUTLASS grouped GEMM (sm_90)
  bool moe_gemm_fallback_noted_ = false;
};

}  // namespace nextron
