#include "kernels/cuda/cuda_ops.h"

#include <algorithm>
#include <cstring>
#include <iostream>
#include <vector>

#include "core/cuda/check.h"
#include "core/cuda/device.h"
#include "kernels/cpu/rope.h"
#include "kernels/cuda/delta_state.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/gated_delta_rule.h"
#include "kernels/cuda/glue.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/loss_optim.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/norms.h"

namespace nextron {

using cuda::bf16;

namespace {

// Device memory for core/tensor.h. Allocation and zeroing run on the legacy default stream, which orders itself
// with the backend's (blocking) stream, so a buffer is never used before it is zeroed.
void* device_alloc(size_t bytes) {
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  NEXTRON_CHECK(err == cudaSuccess, "out of GPU memory allocating ", bytes, " bytes (", cudaGetErrorString(err),
                "): reduce the micro-batch size or sequence length, or use more GPUs");
  NEXTRON_CUDA_CHECK(cudaMemset(p, 0, bytes));
  return p;
}
void device_free(void* p) { cudaFree(p); }
void device_zero(void* p, size_t bytes) { NEXTRON_CUDA_CHECK(cudaMemset(p, 0, bytes)); }
void device_copy(void* dst, const void* src, size_t bytes) {
  NEXTRON_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

bf16* bf(const Tensor& t) {
  NEXTRON_ASSERT(t.dtype() == DType::bf16 && t.device() == Device::cuda);
  return static_cast<bf16*>(t.raw());
}
bf16* bf_or_null(const Tensor* t) { return t ? bf(*t) : nullptr; }
float* f(const Tensor& t) {
  NEXTRON_ASSERT(t.dtype() == DType::f32 && t.device() == Device::cuda);
  return static_cast<float*>(t.raw());
}
int32_t* i32p(const Tensor& t) {
  NEXTRON_ASSERT(t.dtype() == DType::i32);
  return t.data<int32_t>();
}
int64_t* i64p(const Tensor& t) {
  NEXTRON_ASSERT(t.dtype() == DType::i64);
  return t.data<int64_t>();
}
int64_t rows(const Tensor& t, int64_t width) { return t.numel() / width; }

// The MoE layer's dispatch and expert-ordered activations between its forward and backward.
struct CudaMoeState final : MoeExpertsState {
  int64_t N = 0, K = 0, E = 0, H = 0, I = 0;
  Tensor expert_offsets;            // (E + 1) i64 on the device
  std::vector<int64_t> offsets;     // the same on the host, for the cuBLASLt loop only (CudaOpsOptions::moe_gemm)
  bool host_offsets = false;        // offsets holds this forward's expert_offsets
  Tensor slot_token, slot_of, bad;  // (N K) i32, (N K) i32, (1) i32
  Tensor weights;                   // (N, K) f32 routing weights of the forward
  Tensor xs, gu, act, ys;           // (N K, H), (N K, 2I), (N K, I), (N K, H) in expert order
  int64_t host_bytes() const override { return static_cast<int64_t>(offsets.capacity() * sizeof(int64_t)); }
};

// Whether a MoE layer's products (hidden H, expert intermediate I) run through the CUTLASS grouped GEMM
// (CudaOpsOptions::moe_gemm), else through one cuBLASLt GEMM per expert; a fallback of the cutlass option is
// reported once per backend.
bool moe_use_cutlass(CudaOpsOptions::MoeGemm mode, bool device, bool& noted, int64_t H, int64_t I,
                     std::initializer_list<const void*> pointers) {
  if (mode != CudaOpsOptions::MoeGemm::cutlass) return false;
  if (device && cuda::grouped_gemm_shapes_supported(H, I, pointers)) return true;
  if (!noted) {
    noted = true;
    std::cerr << "nextron: the MoE experts' CUTLASS grouped GEMM ";
    if (device)
      std::cerr << "needs the hidden and expert intermediate sizes to be multiples of 8 and 16-byte aligned expert "
                   "weights and gradients (H = "
                << H << ", I = " << I << ")";
    else
      std::cerr << "runs on sm_90 GPUs only";
    std::cerr << "; using one cuBLASLt GEMM per expert\n";
  }
  return false;
}

}  // namespace

CudaOps::CudaOps(int device, CudaOpsOptions options) : device_(device), moe_gemm_(options.moe_gemm) {
  const int count = cuda::device_count();
  NEXTRON_CHECK(count > 0, "--device cuda: no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)");
  NEXTRON_CHECK(device >= 0 && device < count, "--device cuda: GPU ", device, " requested but only ", count,
                " visible: run at most ", count, " ranks per node, one GPU each");
  NEXTRON_CUDA_CHECK(cudaSetDevice(device));
  DeviceMemoryHooks hooks;
  hooks.alloc = device_alloc;
  hooks.free = device_free;
  hooks.memset_zero = device_zero;
  hooks.copy = device_copy;
  register_device_memory_hooks(hooks);
  // A blocking stream: it orders itself with the legacy default stream that allocation and zeroing use.
  NEXTRON_CUDA_CHECK(cudaStreamCreate(&stream_));
  blas_ = std::make_unique<cuda::Blas>(stream_);
  attention_ = std::make_unique<cuda::FusedAttention>(
      stream_, cuda::AttentionOptions{.deterministic_backward = options.deterministic});
  i64(flag_, {2});
  moe_gemm_device_ = cuda::grouped_gemm_device_supported();  // asked once, not per MoE layer
  NEXTRON_CUDA_CHECK(cudaEventCreateWithFlags(&staging_event_, cudaEventDisableTiming));
}

CudaOps::~CudaOps() {
  attention_.reset();
  blas_.reset();
  if (stream_) cudaStreamSynchronize(stream_);  // staged uploads and read-backs may still be in flight
  if (staging_) cudaFreeHost(staging_);
  if (readback_host_) cudaFreeHost(readback_host_);
  if (staging_event_) cudaEventDestroy(staging_event_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaOps::synchronize() const { NEXTRON_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

Tensor CudaOps::allocate(const Shape& shape, DType dtype) const { return Tensor::zeros(shape, dtype, Device::cuda); }

void CudaOps::fill_zero(Tensor& t) const {
  if (t.defined() && t.nbytes() > 0) NEXTRON_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, t.nbytes(), stream_));
}

Tensor& CudaOps::scratch(Tensor& t, int64_t bytes) const {
  // Bytes held as f64 words (8-byte aligned, as every workspace user needs at least that).
  if (!t.defined() || static_cast<int64_t>(t.nbytes()) < bytes)
    t = allocate({std::max<int64_t>((bytes + 7) / 8, 1)}, DType::f64);
  return t;
}

void CudaOps::upload(Tensor& dst, const void* host, size_t bytes) const {
  NEXTRON_ASSERT(bytes <= dst.nbytes());
  if (bytes == 0) return;
  if (bytes > kStagedUploadBytes) {  // weights at load time: copy and wait, with no pinned copy of them kept
    NEXTRON_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), host, bytes, cudaMemcpyHostToDevice, stream_));
    synchronize();
    return;
  }
  // The caller may reuse `host` at once: its bytes go to pinned staging memory first, from which the copy runs
  // asynchronously. Staging is a ring (1 MiB at least, grown to the largest staged upload, at most
  // kStagedUploadBytes): the bytes from staging_head_ on are free unless the ring wraps, and then every earlier copy
  // must have left it (one wait per wrap: a step uploads kilobytes, so that is once in hundreds of steps).
  const size_t need = (bytes + 255) & ~size_t{255};
  if (need > staging_capacity_) {
    NEXTRON_CUDA_CHECK(cudaEventSynchronize(staging_event_));
    if (staging_) NEXTRON_CUDA_CHECK(cudaFreeHost(staging_));
    staging_capacity_ = std::max<size_t>(need, size_t{1} << 20);
    void* p = nullptr;
    NEXTRON_CUDA_CHECK(cudaMallocHost(&p, staging_capacity_));
    staging_ = static_cast<char*>(p);
    staging_head_ = 0;
  } else if (staging_head_ + need > staging_capacity_) {
    NEXTRON_CUDA_CHECK(cudaEventSynchronize(staging_event_));
    staging_head_ = 0;
  }
  char* stage = staging_ + staging_head_;
  std::memcpy(stage, host, bytes);
  NEXTRON_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), stage, bytes, cudaMemcpyHostToDevice, stream_));
  NEXTRON_CUDA_CHECK(cudaEventRecord(staging_event_, stream_));
  staging_head_ += need;
}

void CudaOps::download(void* host, const Tensor& src, size_t bytes) const {
  NEXTRON_ASSERT(bytes <= src.nbytes());
  NEXTRON_CUDA_CHECK(cudaMemcpyAsync(host, src.raw(), bytes, cudaMemcpyDeviceToHost, stream_));
  synchronize();
}

void CudaOps::grow_readback(size_t capacity) const {
  NEXTRON_ASSERT(readback_used_ == 0);  // nothing pending: the buffers can be replaced
  readback_capacity_ = capacity;
  readback_dev_ = allocate({static_cast<int64_t>((capacity + 7) / 8)}, DType::f64);
  if (readback_host_) NEXTRON_CUDA_CHECK(cudaFreeHost(readback_host_));
  NEXTRON_CUDA_CHECK(cudaMallocHost(&readback_host_, capacity));
}

size_t CudaOps::reserve_readback(size_t bytes) const {
  const size_t need = (bytes + 7) & ~size_t{7};
  readback_epoch_bytes_ += need;
  if (readback_used_ + need > readback_capacity_) {
    // Full: deliver what is pending (one extra wait, until resolve_reads grows the buffers for the next round).
    flush_readback();
    if (need > readback_capacity_) grow_readback(std::max<size_t>(2 * need, size_t{1} << 16));
  }
  const size_t offset = readback_used_;
  readback_used_ += need;
  return offset;
}

void CudaOps::read_later(void* host, const Tensor& src, size_t bytes) const {
  NEXTRON_ASSERT(bytes <= src.nbytes());
  if (bytes == 0) return;
  const size_t offset = reserve_readback(bytes);
  NEXTRON_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(readback_dev_.raw()) + offset, src.raw(), bytes,
                                     cudaMemcpyDeviceToDevice, stream_));
  reads_.push_back({offset, bytes, host});
}

void CudaOps::check_later(const Tensor& flag, size_t bytes, std::function<std::string(int64_t)> message) const {
  NEXTRON_ASSERT((bytes == 4 || bytes == 8) && bytes <= flag.nbytes());
  const size_t offset = reserve_readback(bytes);
  NEXTRON_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(readback_dev_.raw()) + offset, flag.raw(), bytes,
                                     cudaMemcpyDeviceToDevice, stream_));
  checks_.push_back({offset, bytes, std::move(message)});
}

void CudaOps::resolve_reads() const {
  flush_readback();
  // Reads since the last resolve that did not fit in one wait: grow now (nothing is pending), so that the next
  // round of the same reads (the next training step) takes one wait and allocates nothing.
  if (readback_epoch_bytes_ > readback_capacity_) grow_readback(readback_epoch_bytes_ + readback_epoch_bytes_ / 4);
  readback_epoch_bytes_ = 0;
}

void CudaOps::flush_readback() const {
  if (readback_used_ == 0) return;
  NEXTRON_CUDA_CHECK(
      cudaMemcpyAsync(readback_host_, readback_dev_.raw(), readback_used_, cudaMemcpyDeviceToHost, stream_));
  synchronize();
  const char* base = static_cast<const char*>(readback_host_);
  for (const PendingRead& r : reads_) std::memcpy(r.host, base + r.offset, r.bytes);
  // Taken out before raising, so that the backend is left with nothing pending whatever the caller does next.
  std::vector<PendingCheck> checks;
  checks.swap(checks_);
  reads_.clear();
  readback_used_ = 0;
  for (const PendingCheck& c : checks) {
    int64_t value = 0;
    if (c.bytes == 4) {
      int32_t v = 0;
      std::memcpy(&v, base + c.offset, 4);
      value = v;
    } else {
      std::memcpy(&value, base + c.offset, 8);
    }
    if (value != 0) throw Error(c.message(value));
  }
}

void CudaOps::cast(Tensor& dst, const Tensor& src) {
  NEXTRON_ASSERT(dst.numel() == src.numel());
  if (dst.dtype() == DType::bf16 && src.dtype() == DType::f32)
    cuda::cast_f32_to_bf16(bf(dst), f(src), src.numel(), stream_);
  else if (dst.dtype() == DType::f32 && src.dtype() == DType::bf16)
    cuda::cast_bf16_to_f32(f(dst), bf(src), src.numel(), stream_);
  else if (dst.raw() != src.raw())
    NEXTRON_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, stream_));
}

void CudaOps::add(Tensor& y, const Tensor& a, const Tensor& b) {
  NEXTRON_ASSERT(y.numel() == a.numel() && y.numel() == b.numel());
  if (y.dtype() == DType::bf16)
    cuda::add(bf(y), bf(a), bf(b), y.numel(), stream_);
  else
    cuda::add(f(y), f(a), f(b), y.numel(), stream_);
}

void CudaOps::gather_cols(Tensor& dst, const Tensor& src, const Tensor& idx) {
  const int64_t W = idx.numel(), N = dst.dim(0), Ws = src.numel() / N;
  NEXTRON_ASSERT(dst.numel() == N * W && src.numel() == N * Ws && dst.dtype() == src.dtype());
  if (dst.dtype() == DType::bf16)
    cuda::gather_cols(bf(dst), bf(src), i32p(idx), N, W, Ws, stream_);
  else
    cuda::gather_cols(f(dst), f(src), i32p(idx), N, W, Ws, stream_);
}

void CudaOps::scatter_cols(Tensor& dst, const Tensor& src, const Tensor& idx, bool accumulate) {
  const int64_t W = idx.numel(), N = src.dim(0), Wd = dst.numel() / N;
  NEXTRON_ASSERT(src.numel() == N * W && dst.numel() == N * Wd && dst.dtype() == src.dtype());
  if (dst.dtype() == DType::bf16)
    cuda::scatter_cols(bf(dst), bf(src), i32p(idx), N, W, Wd, accumulate, stream_);
  else
    cuda::scatter_cols(f(dst), f(src), i32p(idx), N, W, Wd, accumulate, stream_);
}

void CudaOps::linear_forward(Tensor& y, const Tensor& x, const ParamRef& w, const ParamRef* bias) {
  const int64_t OUT = w.w.dim(0), IN = w.w.dim(1);
  const float* b = bias ? f(bias->w) : nullptr;
  if (y.dtype() == DType::f32)
    blas_->linear_forward(f(y), bf(x), bf(w.w_act), b, rows(x, IN), IN, OUT);
  else
    blas_->linear_forward(bf(y), bf(x), bf(w.w_act), b, rows(x, IN), IN, OUT);
}

void CudaOps::linear_forward_f32(Tensor& y, const Tensor& x, const ParamRef& w) {
  const int64_t OUT = w.w.dim(0), IN = w.w.dim(1);
  blas_->linear_forward(f(y), bf(x), bf(w.w_act), nullptr, rows(x, IN), IN, OUT);
}

void CudaOps::linear_backward(Tensor* dx, const ParamRef& w, const ParamRef* bias, const Tensor& dy, const Tensor& x) {
  const int64_t OUT = w.w.dim(0), IN = w.w.dim(1);
  const bf16* dyb = nullptr;
  if (dy.dtype() == DType::f32) {
    // An fp32 output gradient (the router logits): the GEMM reads bf16 operands.
    act(dy_bf16_, {dy.numel()});
    cuda::cast_f32_to_bf16(bf(dy_bf16_), f(dy), dy.numel(), stream_);
    dyb = bf(dy_bf16_);
  } else {
    dyb = bf(dy);
  }
  blas_->linear_backward(bf_or_null(dx), f(w.g), bias ? f(bias->g) : nullptr, dyb, bf(x), bf(w.w_act), rows(x, IN), IN,
                         OUT);
}

void CudaOps::rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const ParamRef& w, double eps) {
  const int64_t D = w.w.numel();
  cuda::rmsnorm_forward(bf(y), f(rstd), bf(x), f(w.w), rows(x, D), D, static_cast<float>(eps), stream_);
}

void CudaOps::rmsnorm_backward(Tensor* dx, const ParamRef& w, const Tensor& dy, const Tensor& x, const Tensor& rstd) {
  const int64_t D = w.w.numel(), N = rows(x, D);
  // Grow-only (scratch, not f32): the norms of one step alternate widths (2048, 256, 128), and an exact-shape buffer
  // would be reallocated at every switch.
  Tensor& ws = scratch(norm_dw_scratch_, cuda::norm_dw_scratch_floats(N, D) * static_cast<int64_t>(sizeof(float)));
  cuda::rmsnorm_backward(bf_or_null(dx), f(w.g), static_cast<float*>(ws.raw()), bf(dy), bf(x), f(w.w), f(rstd), N, D,
                         stream_);
}

void CudaOps::rmsnorm_gated_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& z, const ParamRef& w,
                                    double eps) {
  const int64_t D = w.w.numel();
  cuda::rmsnorm_gated_forward(bf(y), f(rstd), bf(x), bf(z), f(w.w), rows(x, D), D, static_cast<float>(eps), stream_);
}

void CudaOps::rmsnorm_gated_backward(Tensor* dx, Tensor* dz, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                     const Tensor& z, const Tensor& rstd) {
  const int64_t D = w.w.numel(), N = rows(x, D);
  Tensor& ws = scratch(norm_dw_scratch_, cuda::norm_dw_scratch_floats(N, D) * static_cast<int64_t>(sizeof(float)));
  cuda::rmsnorm_gated_backward(bf_or_null(dx), bf_or_null(dz), f(w.g), static_cast<float*>(ws.raw()), bf(dy), bf(x),
                               bf(z), f(w.w), f(rstd), N, D, stream_);
}

void CudaOps::l2norm_forward(Tensor& y, const Tensor& x, int64_t D) {
  cuda::l2norm_forward(bf(y), bf(x), rows(x, D), D, 1e-6f, stream_);
}

void CudaOps::l2norm_backward(Tensor& dx, const Tensor& dy, const Tensor& x, int64_t D) {
  cuda::l2norm_backward(bf(dx), bf(dy), bf(x), rows(x, D), D, 1e-6f, stream_);
}

void CudaOps::rope_tables(Tensor& cos, Tensor& sin, int64_t S, int64_t R, double theta) {
  // Computed once per sequence length on the host, exactly as the CPU backend (transformers' float32 recipe).
  std::vector<float> c(S * R), s(S * R);
  cpu::rope_tables<float>(c.data(), s.data(), S, R, theta, 0);
  upload(f32(cos, {S, R}), c.data(), c.size() * sizeof(float));
  upload(f32(sin, {S, R}), s.data(), s.size() * sizeof(float));
}

void CudaOps::rope_forward(Tensor& y, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t R) {
  cuda::rope_forward(bf(y), bf(x), f(cos), f(sin), x.dim(0), x.dim(1), x.dim(2), x.dim(3), R, stream_);
}

void CudaOps::rope_backward(Tensor& dx, const Tensor& dy, const Tensor& cos, const Tensor& sin, int64_t R) {
  cuda::rope_backward(bf(dx), bf(dy), f(cos), f(sin), dy.dim(0), dy.dim(1), dy.dim(2), dy.dim(3), R, stream_);
}

void CudaOps::attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                double scale) {
  const cuda::AttentionShape s{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), k.dim(1)};
  attention_->forward(bf(o), f(lse), bf(q), bf(k), bf(v), s, static_cast<float>(scale));
}

void CudaOps::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& d_o, const Tensor& q,
                                 const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse, double scale) {
  const cuda::AttentionShape s{q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), k.dim(1)};
  attention_->backward(bf(dq), bf(dk), bf(dv), bf(d_o), bf(q), bf(k), bf(v), bf(o), f(lse), s,
                       static_cast<float>(scale));
}

void CudaOps::sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& gate, int64_t G, int64_t ld_gate) {
  const int64_t N = x.dim(0), D = x.numel() / N;
  cuda::sigmoid_gate_forward(bf(y), bf(x), bf(gate), N, D, G, ld_gate, stream_);
}

void CudaOps::sigmoid_gate_backward(Tensor* dx, Tensor* dgate, const Tensor& dy, const Tensor& x, const Tensor& gate,
                                    int64_t G, int64_t ld_gate) {
  const int64_t N = x.dim(0), D = x.numel() / N;
  cuda::sigmoid_gate_backward(bf_or_null(dx), bf_or_null(dgate), bf(dy), bf(x), bf(gate), N, D, G, ld_gate, stream_);
}

void CudaOps::conv1d_silu_forward(Tensor& y, const Tensor& x, const ParamRef& w, ConvSplit split) {
  const int64_t C = x.dim(2);
  check_conv_split(split, C, y, x);
  cuda::conv1d_silu_forward(bf(y), bf(x), f(w.w), x.dim(0), x.dim(1), C, w.w.dim(-1), split.active() ? split.c1 : C,
                            split.active() ? split.c2 : C, stream_);
}

void CudaOps::conv1d_silu_backward(Tensor& dx, const ParamRef& w, const Tensor& dy, const Tensor& x, ConvSplit split) {
  const int64_t C = x.dim(2);
  check_conv_split(split, C, dy, x);
  cuda::conv1d_silu_backward(bf(dx), f(w.g), bf(dy), bf(x), f(w.w), x.dim(0), x.dim(1), C, w.w.dim(-1),
                             split.active() ? split.c1 : C, split.active() ? split.c2 : C, stream_);
}

void CudaOps::gdn_gates_forward(Tensor& beta, Tensor& g, const Tensor& b, const Tensor& a, const ParamRef& A_log,
                                const ParamRef& dt_bias) {
  const int64_t Hv = A_log.w.numel();
  cuda::gdn_gates_forward(f(beta), f(g), bf(b), bf(a), f(A_log.w), f(dt_bias.w), rows(b, Hv), Hv, stream_);
}

void CudaOps::gdn_gates_backward(Tensor& db, Tensor& da, const ParamRef& A_log, const ParamRef& dt_bias,
                                 const Tensor& dbeta, const Tensor& dg, const Tensor& b, const Tensor& a) {
  const int64_t Hv = A_log.w.numel();
  cuda::gdn_gates_backward(bf(db), bf(da), f(A_log.g), f(dt_bias.g), f(dbeta), f(dg), bf(b), bf(a), f(A_log.w),
                           f(dt_bias.w), rows(b, Hv), Hv, stream_);
}

void CudaOps::gated_delta_rule_forward(Tensor& o, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                                       const Tensor& beta, double scale, const GdrStates& states) {
  const cuda::GdrShape s{q.dim(0), q.dim(1), q.dim(2), v.dim(2), q.dim(3), v.dim(3)};
  check_gdr_saved(states.save, Device::cuda, q, v, "gated_delta_rule_forward");
  const bool keeps = states.save != nullptr;
  Tensor& ws = scratch(gdr_workspace_, static_cast<int64_t>(cuda::gated_delta_rule_workspace_bytes(s, keeps)));
  cuda::gated_delta_rule_forward(bf(o), f32_or_null(states.final_state), bf(q), bf(k), bf(v), f(g), f(beta),
                                 f32_or_null(states.initial), s, static_cast<float>(scale), f32_or_null(states.save),
                                 ws.raw(), stream_);
}

void CudaOps::gated_delta_rule_transition(Tensor& m, const Tensor& k, const Tensor& g, const Tensor& beta) {
  const cuda::GdrShape s{k.dim(0), k.dim(1), k.dim(2), g.dim(2), k.dim(3), k.dim(3)};
  Tensor& ws = scratch(gdr_workspace_, static_cast<int64_t>(cuda::gated_delta_rule_transition_workspace_bytes(s)));
  cuda::gated_delta_rule_transition(f(m), bf(k), f(g), f(beta), s, ws.raw(), stream_);
}

void CudaOps::gated_delta_rule_step(Tensor& o, Tensor& state, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& g, const Tensor& beta, double scale) {
  cuda::gated_delta_rule_step(bf(o), f(state), bf(q), bf(k), bf(v), f(g), f(beta), q.dim(0), q.dim(1), v.dim(1),
                              q.dim(2), v.dim(2), static_cast<float>(scale), stream_);
}

void CudaOps::gated_delta_rule_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dg, Tensor& dbeta,
                                        const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& g, const Tensor& beta, double scale, const GdrStates& states) {
  const cuda::GdrShape s{q.dim(0), q.dim(1), q.dim(2), v.dim(2), q.dim(3), v.dim(3)};
  check_gdr_saved(states.saved, Device::cuda, q, v, "gated_delta_rule_backward");
  const bool keeps = states.saved != nullptr;
  Tensor& ws = scratch(gdr_workspace_, static_cast<int64_t>(cuda::gated_delta_rule_workspace_bytes(s, keeps)));
  cuda::gated_delta_rule_backward(bf(dq), bf(dk), bf(dv), f(dg), f(dbeta), f32_or_null(states.d_initial), bf(d_o),
                                  f32_or_null(states.d_final), bf(q), bf(k), bf(v), f(g), f(beta),
                                  f32_or_null(states.initial), s, static_cast<float>(scale), f32_or_null(states.saved),
                                  ws.raw(), stream_);
}

void CudaOps::swiglu_forward(Tensor& h, const Tensor& gu) {
  const int64_t N = gu.dim(0), I = gu.numel() / N / 2;
  cuda::swiglu_forward(bf(h), bf(gu), N, I, stream_);
}

void CudaOps::swiglu_backward(Tensor& dgu, const Tensor& dh, const Tensor& gu) {
  const int64_t N = gu.dim(0), I = gu.numel() / N / 2;
  cuda::swiglu_backward(bf(dgu), bf(dh), bf(gu), N, I, stream_);
}

void CudaOps::router_forward(Tensor& probs, Tensor& indices, Tensor& weights, const Tensor& logits,
                             bool norm_topk_prob) {
  cuda::router_forward(f(probs), i32p(indices), f(weights), f(logits), logits.dim(0), logits.dim(1), indices.dim(1),
                       norm_topk_prob, stream_);
}

void CudaOps::router_weights_from_indices(Tensor& weights, const Tensor& probs, const Tensor& indices,
                                          bool norm_topk_prob) {
  cuda::router_weights_from_indices(f(weights), f(probs), i32p(indices), probs.dim(0), probs.dim(1), indices.dim(1),
                                    norm_topk_prob, stream_);
}

void CudaOps::router_backward(Tensor& dlogits, const Tensor* dprobs, const Tensor* dweights, const Tensor& probs,
                              const Tensor& indices, bool norm_topk_prob) {
  cuda::router_backward(f(dlogits), dprobs ? f(*dprobs) : nullptr, dweights ? f(*dweights) : nullptr, f(probs),
                        i32p(indices), probs.dim(0), probs.dim(1), indices.dim(1), norm_topk_prob, stream_);
}

void CudaOps::aux_stats_accumulate(Tensor& count_sum, Tensor& prob_sum, const Tensor& probs, const Tensor& indices) {
  cuda::aux_stats_accumulate(f(count_sum), f(prob_sum), f(probs), i32p(indices), probs.dim(0), probs.dim(1),
                             indices.dim(1), stream_);
}

void CudaOps::aux_loss_backward(Tensor& dprobs, const Tensor& count_sum, double total_rows, double daux) {
  cuda::aux_loss_backward(f(dprobs), f(count_sum), static_cast<float>(total_rows), static_cast<float>(daux),
                          dprobs.dim(0), dprobs.dim(1), stream_);
}

std::unique_ptr<MoeExpertsState> CudaOps::new_moe_state() { return std::make_unique<CudaMoeState>(); }

void CudaOps::moe_experts_forward(Tensor& y, MoeExpertsState& state, const Tensor& x, const Tensor& weights,
                                  const Tensor& indices, const ParamRef& w_gate_up, const ParamRef& w_down) {
  auto& st = static_cast<CudaMoeState&>(state);
  st.N = x.dim(0);
  st.H = x.numel() / st.N;
  st.K = indices.dim(1);
  st.E = w_gate_up.w.dim(0);
  st.I = w_down.w.dim(2);
  const int64_t N = st.N, K = st.K, E = st.E, H = st.H, I = st.I, NK = N * K;
  st.weights = weights;
  i64(st.expert_offsets, {E + 1});
  i32(st.slot_token, {NK});
  i32(st.slot_of, {NK});
  ensure(st.bad, {1}, DType::i32);
  fill_zero(st.bad);
  cuda::moe_dispatch_build(i64p(st.expert_offsets), i32p(st.slot_token), i32p(st.slot_of), i32p(indices), N, K, E,
                           i32p(st.bad), stream_);
  const bool cutlass = moe_use_cutlass(moe_gemm_, moe_gemm_device_, moe_gemm_fallback_noted_, H, I,
                                       {w_gate_up.w_act.raw(), w_down.w_act.raw(), w_gate_up.g.raw(), w_down.g.raw()});
  // The CUTLASS grouped GEMM reads the device offsets; the cuBLASLt loop takes them on the host (a stream sync).
  st.host_offsets = !cutlass;
  if (!cutlass) {
    st.offsets.resize(E + 1);
    download(st.offsets.data(), st.expert_offsets, (E + 1) * sizeof(int64_t));
  }
  check_later(st.bad, sizeof(int32_t),
              [E](int64_t) { return detail::concat("MoE router produced an expert index outside [0, ", E, ")"); });
  act(st.xs, {NK, H});
  act(st.gu, {NK, 2 * I});
  // A recomputed activation goes to this backend's scratch (one for all layers and micro-batches), not the state.
  Tensor& h = act(st.recompute_act ? moe_act_scratch_ : st.act, {NK, I});
  act(st.ys, {NK, H});
  cuda::moe_permute(bf(st.xs), bf(x), i32p(st.slot_token), NK, H, stream_);
  if (cutlass) {
    Tensor& ws = scratch(moe_gemm_ws_, cuda::grouped_gemm_workspace_bytes(E));
    const auto bytes = static_cast<int64_t>(ws.nbytes());
    cuda::grouped_gemm_forward(bf(st.gu), bf(st.xs), bf(w_gate_up.w_act), i64p(st.expert_offsets), E, H, 2 * I,
                               ws.raw(), bytes, stream_);
    cuda::swiglu_forward(bf(h), bf(st.gu), NK, I, stream_);
    cuda::grouped_gemm_forward(bf(st.ys), bf(h), bf(w_down.w_act), i64p(st.expert_offsets), E, I, H, ws.raw(), bytes,
                               stream_);
  } else {
    blas_->grouped_forward(bf(st.gu), bf(st.xs), bf(w_gate_up.w_act), st.offsets.data(), E, H, 2 * I);
    cuda::swiglu_forward(bf(h), bf(st.gu), NK, I, stream_);
    blas_->grouped_forward(bf(st.ys), bf(h), bf(w_down.w_act), st.offsets.data(), E, I, H);
  }
  cuda::moe_unpermute(bf(y), bf(st.ys), f(weights), i32p(st.slot_of), N, K, H, stream_);
}

void CudaOps::moe_experts_backward(Tensor& dx, Tensor& dweights, MoeExpertsState& state, const Tensor& dy,
                                   const ParamRef& w_gate_up, const ParamRef& w_down) {
  auto& st = static_cast<CudaMoeState&>(state);
  const int64_t N = st.N, K = st.K, E = st.E, H = st.H, I = st.I, NK = N * K;
  // Backward scratch belongs to the backend (one set for every layer and micro-batch), not to the state.
  Tensor& dys = act(moe_dys_, {NK, H});
  cuda::moe_unpermute_backward(bf(dys), f(dweights), bf(dy), bf(st.ys), f(st.weights), i32p(st.slot_of), N, K, H,
                               stream_);
  if (st.recompute_act) cuda::swiglu_forward(bf(act(moe_act_scratch_, {NK, I})), bf(st.gu), NK, I, stream_);
  const Tensor& h = st.recompute_act ? moe_act_scratch_ : st.act;
  const bool cutlass = moe_use_cutlass(moe_gemm_, moe_gemm_device_, moe_gemm_fallback_noted_, H, I,
                                       {w_gate_up.w_act.raw(), w_down.w_act.raw(), w_gate_up.g.raw(), w_down.g.raw()});
  if (cutlass) {
    // dact and dxs are overwritten by the grouped GEMMs (every row belongs to an expert) and dgu by the SwiGLU
    // backward (accumulate false): no zero fill.
    Tensor& ws = scratch(moe_gemm_ws_, cuda::grouped_gemm_workspace_bytes(E));
    const auto bytes = static_cast<int64_t>(ws.nbytes());
    const int64_t* offsets = i64p(st.expert_offsets);
    Tensor& dact = act(moe_dact_, {NK, I});
    cuda::grouped_gemm_backward(bf(dact), f(w_down.g), bf(dys), bf(h), bf(w_down.w_act), offsets, E, I, H, ws.raw(),
                                bytes, stream_);
    Tensor& dgu = act(moe_dgu_, {NK, 2 * I});
    cuda::swiglu_backward(bf(dgu), bf(dact), bf(st.gu), NK, I, stream_, /*accumulate=*/false);
    Tensor& dxs = act(moe_dxs_, {NK, H});
    cuda::grouped_gemm_backward(bf(dxs), f(w_gate_up.g), bf(dgu), bf(st.xs), bf(w_gate_up.w_act), offsets, E, H, 2 * I,
                                ws.raw(), bytes, stream_);
    cuda::moe_permute_backward(bf(dx), bf(dxs), i32p(st.slot_of), N, K, H, stream_);
    return;
  }
  if (!st.host_offsets) {  // the forward ran the CUTLASS path and kept the offsets on the device only
    st.offsets.resize(E + 1);
    download(st.offsets.data(), st.expert_offsets, (E + 1) * sizeof(int64_t));
    st.host_offsets = true;
  }
  // The cuBLASLt loop accumulates (beta = 1) into dact and dxs: zeroed first.
  Tensor& dact = act_zeroed(moe_dact_, {NK, I});
  blas_->grouped_backward(bf(dact), f(w_down.g), bf(dys), bf(h), bf(w_down.w_act), st.offsets.data(), E, I, H);
  Tensor& dgu = act(moe_dgu_, {NK, 2 * I});
  cuda::swiglu_backward(bf(dgu), bf(dact), bf(st.gu), NK, I, stream_, /*accumulate=*/false);
  Tensor& dxs = act_zeroed(moe_dxs_, {NK, H});
  blas_->grouped_backward(bf(dxs), f(w_gate_up.g), bf(dgu), bf(st.xs), bf(w_gate_up.w_act), st.offsets.data(), E, H,
                          2 * I);
  cuda::moe_permute_backward(bf(dx), bf(dxs), i32p(st.slot_of), N, K, H, stream_);
}

void CudaOps::moe_permute(Tensor& rows, const Tensor& x, const Tensor& row_token) {
  const int64_t R = row_token.numel(), H = x.numel() / std::max<int64_t>(x.dim(0), 1);
  NEXTRON_CHECK(rows.numel() == R * H, "moe_permute: rows hold ", rows.numel(), " values for ", R, " x ", H);
  cuda::moe_permute(bf(rows), bf(x), i32p(row_token), R, H, stream_);
}

void CudaOps::moe_permute_backward(Tensor& dx, const Tensor& drows, const Tensor& slot_row) {
  const int64_t N = dx.dim(0), H = dx.numel() / std::max<int64_t>(N, 1), K = N > 0 ? slot_row.numel() / N : 0;
  cuda::moe_permute_backward(bf(dx), bf(drows), i32p(slot_row), N, K, H, stream_);
}

void CudaOps::moe_unpermute(Tensor& y, const Tensor& rows, const Tensor& weights, const Tensor& slot_row) {
  const int64_t N = y.dim(0), H = y.numel() / std::max<int64_t>(N, 1), K = weights.numel() / std::max<int64_t>(N, 1);
  NEXTRON_CHECK(slot_row.numel() == N * K, "moe_unpermute: ", slot_row.numel(), " slots for ", N, " x ", K);
  cuda::moe_unpermute(bf(y), bf(rows), f(weights), i32p(slot_row), N, K, H, stream_);
}

void CudaOps::moe_unpermute_backward(Tensor& drows, Tensor& dweights, const Tensor& dy, const Tensor& rows,
                                     const Tensor& weights, const Tensor& slot_row) {
  const int64_t N = dy.dim(0), H = dy.numel() / std::max<int64_t>(N, 1), K = weights.numel() / std::max<int64_t>(N, 1);
  cuda::moe_unpermute_backward(bf(drows), dweights.defined() ? f(dweights) : nullptr, bf(dy), bf(rows), f(weights),
                               i32p(slot_row), N, K, H, stream_);
}

void CudaOps::embedding_forward(Tensor& out, const ParamRef& table, const Tensor& ids, const VocabShard& vocab) {
  const int64_t H = table.w.dim(1), N = ids.numel();
  NEXTRON_CHECK(table.w.dim(0) == vocab.size, "embedding: table of ", table.w.dim(0), " rows for ", vocab.size, " ids");
  fill_zero(flag_);
  cuda::embedding_forward(bf(out), f(table.w), i64p(ids), N, H, vocab.size, vocab.begin, vocab.full, i64p(flag_),
                          stream_);
  const int64_t full = vocab.full;
  check_later(flag_, sizeof(int64_t), [full](int64_t code) {
    return detail::concat("token id ", code > 0 ? code - 1 : code, " is outside the vocabulary [0, ", full,
                          "): the data was tokenized for another vocabulary, or the config's vocab_size is wrong");
  });
}

void CudaOps::embedding_backward(const ParamRef& table, const Tensor& dout, const Tensor& ids,
                                 const VocabShard& vocab) {
  const int64_t H = table.w.dim(1), N = ids.numel();
  NEXTRON_CHECK(table.w.dim(0) == vocab.size, "embedding: table of ", table.w.dim(0), " rows for ", vocab.size, " ids");
  i64(embed_rows_, {std::max<int64_t>(N, 1)});
  i64(embed_offsets_, {vocab.size + 1});
  cuda::embedding_backward(f(table.g), bf(dout), i64p(ids), N, H, vocab.size, vocab.begin, i64p(embed_rows_),
                           i64p(embed_offsets_), stream_);
}

void CudaOps::finish_loss(double* loss_sum, const Tensor& row_loss, const Tensor& bad_target, int64_t vocab) {
  const int64_t N = row_loss.numel();
  scratch(sum_scratch_, static_cast<int64_t>(cuda::sum_scratch_bytes(N)));
  ensure(sum_out_, {1}, DType::f64);
  cuda::sum_f64(sum_out_.data<double>(), f(row_loss), N, sum_scratch_.raw(), stream_);
  check_later(bad_target, sizeof(int64_t), [vocab](int64_t bad_row) {
    return detail::concat("target at token ", bad_row - 1, " is outside the vocabulary [0, ", vocab,
                          ") and is not -100 (ignored)");
  });
  read_later(loss_sum, sum_out_, sizeof(double));
}

void CudaOps::cross_entropy_forward(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& logits,
                                    const Tensor& targets) {
  const int64_t N = targets.numel(), V = logits.numel() / N;
  fill_zero(flag_);
  Tensor bad_target = Tensor::view_of(flag_, 1, {1});
  cuda::cross_entropy_forward(f(row_loss), f(lse), bf(logits), i64p(targets), N, V, i64p(bad_target), stream_);
  finish_loss(loss_sum, row_loss, bad_target, V);
}

void CudaOps::cross_entropy_partial(Tensor& stats, const Tensor& logits, const Tensor& targets,
                                    const VocabShard& vocab) {
  const int64_t N = targets.numel();
  NEXTRON_CHECK(logits.numel() == N * vocab.size, "cross_entropy_partial: logits of ", logits.numel(),
                " elements are not ", N, " rows of ", vocab.size, " columns (the vocabulary slice held)");
  NEXTRON_ASSERT(stats.numel() == 3 * N);
  cuda::cross_entropy_partial(f(stats), bf(logits), i64p(targets), N, vocab.size, vocab.begin, stream_);
}

void CudaOps::cross_entropy_combine(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& stats,
                                    const Tensor& targets, int64_t vocab_full) {
  const int64_t N = targets.numel();
  NEXTRON_ASSERT(N > 0 && stats.numel() % (3 * N) == 0);
  const int64_t P = stats.numel() / (3 * N);
  fill_zero(flag_);
  Tensor bad_target = Tensor::view_of(flag_, 1, {1});
  cuda::cross_entropy_combine(f(row_loss), f(lse), f(stats), P, i64p(targets), N, vocab_full, i64p(bad_target),
                              stream_);
  finish_loss(loss_sum, row_loss, bad_target, vocab_full);
}

void CudaOps::cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse, const Tensor& targets,
                                     double scale, const VocabShard& vocab) {
  const int64_t N = targets.numel();
  NEXTRON_CHECK(logits.numel() == N * vocab.size, "cross_entropy_backward: logits of ", logits.numel(),
                " elements are not ", N, " rows of ", vocab.size, " columns (the vocabulary slice held)");
  NEXTRON_ASSERT(dlogits.numel() == logits.numel());
  cuda::cross_entropy_backward(bf(dlogits), bf(logits), f(lse), i64p(targets), static_cast<float>(scale), N, vocab.size,
                               vocab.begin, vocab.full, stream_);
}

double CudaOps::sum_squares(const Tensor& x, const std::vector<FlatRange>& ranges) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  int64_t total = 0;
  for (const FlatRange& r : ranges) {
    pairs.emplace_back(r.begin, r.end);
    total += r.size();
  }
  scratch(sum_scratch_, static_cast<int64_t>(cuda::sum_scratch_bytes(total)));
  ensure(sum_out_, {1}, DType::f64);
  cuda::sum_squares_f64(sum_out_.data<double>(), f(x), pairs, sum_scratch_.raw(), stream_);
  double out = 0;
  read_later(&out, sum_out_, sizeof(double));
  resolve_reads();  // the one wait of a training step: this norm, the losses and the input checks together
  return out;
}

void CudaOps::scale(Tensor& x, FlatRange r, float s) { cuda::scale_inplace(f(x) + r.begin, r.size(), s, stream_); }

void CudaOps::adamw_step(Tensor& params, const Tensor& grads, Tensor& exp_avg, Tensor& exp_avg_sq, Tensor* params_act,
                         FlatRange range, const std::vector<FlatRange>& decay, const AdamWHyper& h, int64_t step) {
  // The decayed ranges clipped to the updated range and made relative to it (a few hundred pairs: uploaded when
  // they change, into a buffer allocated once).
  std::vector<int64_t> rel;
  for (const FlatRange& d : decay) {
    const int64_t b = std::max(d.begin, range.begin), e = std::min(d.end, range.end);
    if (b < e) {
      rel.push_back(b - range.begin);
      rel.push_back(e - range.begin);
    }
  }
  const int64_t pairs = static_cast<int64_t>(rel.size() / 2);
  if (!decay_ranges_.defined() || decay_ranges_.numel() < std::max<int64_t>(2 * pairs, 2)) {
    decay_ranges_ = allocate({std::max<int64_t>(2 * pairs, 2)}, DType::i64);
    decay_host_.clear();
  }
  if (pairs > 0 && rel != decay_host_) {
    upload(decay_ranges_, rel.data(), rel.size() * sizeof(int64_t));
    decay_host_ = rel;
  }
  const cuda::AdamWStep hs{h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step};
  bf16* shadow = params_act && params_act->dtype() == DType::bf16 ? bf(*params_act) + range.begin : nullptr;
  cuda::adamw_step(f(params) + range.begin, f(grads) + range.begin, f(exp_avg), f(exp_avg_sq), shadow, range.size(),
                   i64p(decay_ranges_), pairs, hs, stream_);
}

}  // namespace nextron
