#include "kernels/counting_ops.h"

#include <algorithm>
#include <cstdio>

namespace nextron {

OpCount& OpCount::operator+=(const OpCount& o) {
  calls += o.calls;
  launches += o.launches;
  host_syncs += o.host_syncs;
  flops += o.flops;
  hbm_bytes += o.hbm_bytes;
  host_bytes += o.host_bytes;
  wall_s += o.wall_s;
  gpu_s[0] += o.gpu_s[0];
  gpu_s[1] += o.gpu_s[1];
  return *this;
}

CountingOps::CountingOps(std::shared_ptr<Ops> inner, bool time_calls)
    : inner_(std::move(inner)), time_calls_(time_calls) {
  NEXTRON_CHECK(inner_ != nullptr, "CountingOps needs a backend to wrap");
  name_ = std::string("counting(") + inner_->name() + ")";
}

OpCount CountingOps::op(const std::string& name) const {
  const auto it = counts_.find(name);
  return it == counts_.end() ? OpCount{} : it->second;
}

OpCount CountingOps::total() const {
  OpCount t;
  for (const auto& [name, c] : counts_) t += c;
  return t;
}

void CountingOps::reset() {
  counts_.clear();
  allocations_ = 0;
}

void CountingOps::add(const char* name, const Cost& c, double wall_s) const {
  OpCount& o = counts_[name];
  o.calls += 1;
  o.launches += c.launches;
  o.host_syncs += c.syncs;
  o.flops += c.flops;
  o.hbm_bytes += c.bytes;
  o.host_bytes += c.host_bytes;
  o.wall_s += wall_s;
  // The roofline of one call: it takes at least as long as its arithmetic at the peak and as its bytes at the
  // bandwidth; calls run one after another on one stream, so the step's floor is the sum over calls.
  for (int i = 0; i < 2; ++i)
    o.gpu_s[i] += std::max(c.flops / kRooflineGpus[i].peak_flops, c.bytes / kRooflineGpus[i].hbm_bw);
}

double CountingOps::act_b(const Tensor& t) const {
  // bf16 on the CUDA backend; on the CPU backend activations are f32 like the statistics, and an activation is
  // what a tensor of the activation dtype is taken to be. A genuine f32 tensor on a bf16 backend stays 4 bytes.
  if (t.dtype() == DType::bf16 || t.dtype() == inner_->act_dtype()) return 2.0;
  return static_cast<double>(dtype_size(t.dtype()));
}

double CountingOps::idx_b(const Tensor& t) { return static_cast<double>(dtype_size(t.dtype())); }

namespace {

double n_of(const Tensor& t) { return static_cast<double>(t.numel()); }
double n_of(const Tensor* t) { return t != nullptr && t->defined() ? static_cast<double>(t->numel()) : 0.0; }

// ---------------------------------------------------------------------------------------------------------------
// FLOPs of the chunked gated delta rule per value head (kernels/cpu/gated_delta_rule.cpp; the CUDA kernels follow
// the same form), over a sequence of S tokens cut into chunks of C = min(64, S) (the last one partial). In a chunk
// of L tokens with key width K = dk and value width V = dv, a product of (a x b) by (b x c) is 2 a b c:
//   prepare     KK = K K^T (2 L^2 K); T = (I + M)^-1 by forward substitution (sum_i sum_{j<i} 2 (j + 1) =
//               (L - 1) L (L + 1) / 3); U = T Vb (2 L^2 V); W = T Kb (2 L^2 K)
//   output      P = Q K^T (2 L^2 K); O = Qe S (2 L K V) + P Vn (2 L^2 V)
//   state       Vn = U - W S (2 L K V); S' = a S + Kd^T Vn (2 L K V)
// forward: 6 L^2 K + 4 L^2 V + 6 L K V + solve (model/flops.h's 6 C dk + 4 C dv + 6 dk dv per token, plus the
// solve). Elementwise work (decays, masks, Gam: a few L^2 + L (K + V) per chunk) is left out.
// backward (chunk_backward, which recomputes every chunk's intermediates, after a forward sweep over all chunks
// but the last that recomputes the entering states: prepare + state, 4 L^2 K + 2 L^2 V + 4 L K V + solve):
//   recompute   prepare + P + Vn: 6 L^2 K + 2 L^2 V + 2 L K V + solve
//   dVn = Kd dS, dKd = Vn dS^T, dQe = dO S^T, dS += Qe^T dO, dS -= W^T dVn, dW = -dVn S^T: 12 L K V
//   dP = dO Vn^T, dVn += P^T dO, dVb = T^T dVn, dM = -dVb U^T: 8 L^2 V
//   dQ += dP K, dK += dP^T Q, dKb = T^T dW, dM -= dKb W^T, dK += dKK K, dK += dKK^T K: 12 L^2 K
// = 18 L^2 K + 10 L^2 V + 14 L K V + solve per chunk, i.e. about 3 x the forward (the recomputation included).
double tri_solve_flops(double L) { return (L - 1) * L * (L + 1) / 3.0; }

template <typename F>
double over_chunks(int64_t S, F&& per_chunk) {
  const int64_t C = std::min<int64_t>(64, std::max<int64_t>(S, 1));
  double f = 0;
  for (int64_t t0 = 0; t0 < S; t0 += C) f += per_chunk(static_cast<double>(std::min(C, S - t0)), t0 + C >= S);
  return f;
}

double gdr_forward_flops_per_head(int64_t S, double K, double V) {
  return over_chunks(
      S, [&](double L, bool) { return 6 * L * L * K + 4 * L * L * V + 6 * L * K * V + tri_solve_flops(L); });
}

// The bytes of the delta rule's kept intermediates on CUDA (GdrStates::save / saved) for q (B, S, Hk, dk), v (B, S,
// Hv, dv).
double gdr_saved_cuda_bytes(const Tensor& q, const Tensor& v) {
  return 4.0 * static_cast<double>(gated_delta_rule_saved_elements(Device::cuda, q.dim(0), q.dim(1), q.dim(2), v.dim(2),
                                                                   q.dim(3), v.dim(3)));
}

// saved: the forward kept the chunk states (GdrStates::saved), so there is no forward sweep.
double gdr_backward_flops_per_head(int64_t S, double K, double V, bool saved) {
  return over_chunks(S, [&](double L, bool last) {
    const double sweep = last || saved ? 0.0 : 4 * L * L * K + 2 * L * L * V + 4 * L * K * V + tri_solve_flops(L);
    return sweep + 18 * L * L * K + 10 * L * L * V + 14 * L * K * V + tri_solve_flops(L);
  });
}

// The transition (kernels/cpu/delta_state_scan.h): the recurrence with v = 0 from the identity, i.e. the state
// part of the forward with V = K: prepare + state, 4 L^2 K + 2 L^2 K + 4 L K K + solve.
double gdr_transition_flops_per_head(int64_t S, double K) {
  return over_chunks(S, [&](double L, bool) { return 6 * L * L * K + 4 * L * K * K + tri_solve_flops(L); });
}

// Causal (query, key) pairs of attention with Sq queries that are the last Sq of Sk key positions (bottom-right
// causal): query i sees Sk - Sq + i + 1 keys, in all Sq (Sk - Sq) + Sq (Sq + 1) / 2 (Sq (Sq + 1) / 2 = the
// "causal half" of Sq^2 for a whole sequence, as model/flops.h's (S + 1) / 2 mean context).
double causal_pairs(double Sq, double Sk) { return Sq * (Sk - Sq) + Sq * (Sq + 1) / 2; }

}  // namespace

// ===============================================================================================================
// The cost model. Per op: FLOPs (c.flops), HBM bytes (c.bytes) under the CUDA dtypes (A = act_b: 2, F = 4 for
// f32, I = index size), launches (1 unless said) and host syncs (CudaOps' waits inside the op; uploads and
// downloads are syncs of their own). x[n] below means n elements of tensor x.
// ===============================================================================================================

void CountingOps::upload(Tensor& dst, const void* host, size_t bytes) const {
  // A host -> device copy: no kernel and no wait up to kStagedUploadBytes (CudaOps::upload stages the bytes in
  // pinned memory and copies asynchronously; its ring waits once per wrap, every few hundred steps, which is not
  // counted), one wait above (weights at load time); its bytes cross PCIe, not HBM, so they are kept apart.
  Cost c;
  c.launches = 0;
  c.syncs = bytes > kStagedUploadBytes ? 1 : 0;
  c.host_bytes = static_cast<double>(bytes);
  record("upload", c, [&] { inner_->upload(dst, host, bytes); });
}

void CountingOps::download(void* host, const Tensor& src, size_t bytes) const {
  // A device -> host read: the stream must drain first (a host sync).
  Cost c;
  c.launches = 0;
  c.syncs = 1;
  c.host_bytes = static_cast<double>(bytes);
  record("download", c, [&] { inner_->download(host, src, bytes); });
}

void CountingOps::read_later(void* host, const Tensor& src, size_t bytes) const {
  // A device-to-device copy into CudaOps' read-back buffer (one launch, the bytes read and written), no wait: the
  // wait is resolve_reads()'s, shared by every read pending.
  Cost c;
  c.bytes = 2.0 * static_cast<double>(bytes);
  c.host_bytes = static_cast<double>(bytes);
  ++pending_;
  record("read_later", c, [&] { inner_->read_later(host, src, bytes); });
}

void CountingOps::resolve_reads() const {
  // One copy of the read-back buffer to the host and one wait, when anything is pending.
  Cost c;
  c.launches = 0;
  c.syncs = pending_ > 0 ? 1 : 0;
  pending_ = 0;
  record("resolve_reads", c, [&] { inner_->resolve_reads(); });
}

Tensor CountingOps::allocate(const Shape& shape, DType dtype) const {
  ++allocations_;
  Tensor t;
  inner_->ensure(t, shape, dtype);  // an undefined tensor: the wrapped backend allocates
  return t;
}

void CountingOps::fill_zero(Tensor& t) const {
  // cudaMemsetAsync: writes the tensor once.
  Cost c;
  c.launches = t.defined() && t.numel() > 0 ? 1 : 0;
  c.bytes = t.defined() ? n_of(t) * act_b(t) : 0.0;
  record("fill_zero", c, [&] { inner_->zero(t); });
}

void CountingOps::cast(Tensor& dst, const Tensor& src) {
  // f32 <-> bf16 (the contract: one side each): read n x 4 or 2, write n x the other. 0 FLOPs.
  Cost c;
  c.bytes = n_of(src) * (2.0 + 4.0);
  record("cast", c, [&] { inner_->cast(dst, src); });
}

void CountingOps::add(Tensor& y, const Tensor& a, const Tensor& b) {
  // y = a + b: read a[n], b[n], write y[n]; 1 FLOP per element.
  Cost c;
  c.flops = n_of(y);
  c.bytes = n_of(a) * act_b(a) + n_of(b) * act_b(b) + n_of(y) * act_b(y);
  record("add", c, [&] { inner_->add(y, a, b); });
}

void CountingOps::gather_cols(Tensor& dst, const Tensor& src, const Tensor& idx) {
  // dst (N, W) = src[:, idx]: the W gathered columns of src read, dst written, idx[W] read.
  Cost c;
  c.bytes = 2 * n_of(dst) * act_b(dst) + n_of(idx) * idx_b(idx);
  record("gather_cols", c, [&] { inner_->gather_cols(dst, src, idx); });
}

void CountingOps::scatter_cols(Tensor& dst, const Tensor& src, const Tensor& idx, bool accumulate) {
  // dst[:, idx] (+)= src (N, W): src read, the W columns of dst written (and read first when accumulating);
  // 1 FLOP per element when accumulating.
  Cost c;
  c.flops = accumulate ? n_of(src) : 0.0;
  c.bytes = n_of(src) * act_b(src) * (accumulate ? 3 : 2) + n_of(idx) * idx_b(idx);
  record("scatter_cols", c, [&] { inner_->scatter_cols(dst, src, idx, accumulate); });
}

void CountingOps::linear_forward(Tensor& y, const Tensor& x, const ParamRef& w, const ParamRef* bias) {
  // y (N, OUT) = x (N, IN) w^T (+ b): 2 N IN OUT FLOPs (+ N OUT for the bias). Bytes: x[N IN], the bf16 shadow
  // w_act[OUT IN] x 2, y[N OUT], the fp32 bias[OUT] (CudaOps passes the master) when given.
  const double OUT = static_cast<double>(w.w.dim(0)), IN = static_cast<double>(w.w.dim(1)), N = n_of(x) / IN;
  Cost c;
  c.flops = 2 * N * IN * OUT + (bias ? N * OUT : 0.0);
  c.bytes = N * IN * act_b(x) + OUT * IN * 2 + N * OUT * act_b(y) + (bias ? OUT * f32_b() : 0.0);
  record("linear_forward", c, [&] { inner_->linear_forward(y, x, w, bias); });
}

void CountingOps::linear_forward_f32(Tensor& y, const Tensor& x, const ParamRef& w) {
  // As linear_forward, y in f32 (the router logits): y[N OUT] x 4.
  const double OUT = static_cast<double>(w.w.dim(0)), IN = static_cast<double>(w.w.dim(1)), N = n_of(x) / IN;
  Cost c;
  c.flops = 2 * N * IN * OUT;
  c.bytes = N * IN * act_b(x) + OUT * IN * 2 + N * OUT * f32_b();
  record("linear_forward_f32", c, [&] { inner_->linear_forward_f32(y, x, w); });
}

void CountingOps::linear_backward(Tensor* dx, const ParamRef& w, const ParamRef* bias, const Tensor& dy,
                                  const Tensor& x) {
  // dx += dy w (2 N IN OUT, only when dx is asked for), dW += dy^T x (2 N IN OUT), db += column sums of dy
  // (N OUT). Bytes: dy[N OUT] and x[N IN] read once; w_act[OUT IN] x 2 read for dx; dx[N IN] read + written;
  // the fp32 gradients dW[OUT IN] and db[OUT] read + written (8 bytes each). (The router's dy is f32 on CUDA,
  // here counted as an activation: N x E, negligible.)
  const double OUT = static_cast<double>(w.w.dim(0)), IN = static_cast<double>(w.w.dim(1)), N = n_of(x) / IN;
  Cost c;
  c.flops = 2 * N * IN * OUT * (dx ? 2 : 1) + (bias ? N * OUT : 0.0);
  c.bytes = N * OUT * act_b(dy) + N * IN * act_b(x) + (dx ? OUT * IN * 2 + 2 * N * IN * act_b(*dx) : 0.0) +
            OUT * IN * 2 * f32_b() + (bias ? OUT * 2 * f32_b() : 0.0);
  record("linear_backward", c, [&] { inner_->linear_backward(dx, w, bias, dy, x); });
}

void CountingOps::rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const ParamRef& w, double eps) {
  // Rows of D: square + sum (2 per element), scale by rstd and by w (2): 4 N D FLOPs. Bytes: x, y [N D],
  // rstd[N] f32 written, w[D] f32 read.
  const double D = n_of(w.w), ND = n_of(x);
  Cost c;
  c.flops = 4 * ND;
  c.bytes = ND * act_b(x) + ND * act_b(y) + ND / D * f32_b() + D * f32_b();
  record("rmsnorm_forward", c, [&] { inner_->rmsnorm_forward(y, rstd, x, w, eps); });
}

void CountingOps::rmsnorm_backward(Tensor* dx, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                   const Tensor& rstd) {
  // xhat = x rstd, g = dy w, dx += rstd (g - xhat mean(g xhat)), dw += dy xhat: about 8 FLOPs per element. Bytes:
  // dy, x [N D] and rstd[N], w[D] read; dx[N D] read + written; dw[D] f32 read + written.
  const double D = n_of(w.w), ND = n_of(x);
  Cost c;
  c.flops = 8 * ND;
  c.bytes = ND * act_b(dy) + ND * act_b(x) + ND / D * f32_b() + D * f32_b() + (dx ? 2 * ND * act_b(*dx) : 0.0) +
            2 * D * f32_b();
  record("rmsnorm_backward", c, [&] { inner_->rmsnorm_backward(dx, w, dy, x, rstd); });
}

void CountingOps::rmsnorm_gated_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& z, const ParamRef& w,
                                        double eps) {
  // The RMSNorm (4 per element) times silu(z) (z / (1 + exp(-z)): 3, and the product: 1): 8 N D FLOPs. Bytes:
  // x, z read, y written [N D]; rstd[N] f32 written; w[D] f32 read.
  const double D = n_of(w.w), ND = n_of(x);
  Cost c;
  c.flops = 8 * ND;
  c.bytes = ND * (act_b(x) + act_b(z) + act_b(y)) + ND / D * f32_b() + D * f32_b();
  record("rmsnorm_gated_forward", c, [&] { inner_->rmsnorm_gated_forward(y, rstd, x, z, w, eps); });
}

void CountingOps::rmsnorm_gated_backward(Tensor* dx, Tensor* dz, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                         const Tensor& z, const Tensor& rstd) {
  // The RMSNorm backward (8) on dy silu(z), recomputing silu(z) and its derivative for dz (about 8 more): 16 N D.
  // Bytes: dy, x, z [N D], rstd[N], w[D] read; dx, dz [N D] read + written; dw[D] f32 read + written.
  const double D = n_of(w.w), ND = n_of(x);
  Cost c;
  c.flops = 16 * ND;
  c.bytes = ND * (act_b(dy) + act_b(x) + act_b(z)) + ND / D * f32_b() + D * f32_b() + (dx ? 2 * ND * act_b(*dx) : 0.0) +
            (dz ? 2 * ND * act_b(*dz) : 0.0) + 2 * D * f32_b();
  record("rmsnorm_gated_backward", c, [&] { inner_->rmsnorm_gated_backward(dx, dz, w, dy, x, z, rstd); });
}

void CountingOps::l2norm_forward(Tensor& y, const Tensor& x, int64_t D) {
  // Square + sum (2), scale (1): 3 FLOPs per element. x read, y written.
  Cost c;
  c.flops = 3 * n_of(x);
  c.bytes = n_of(x) * (act_b(x) + act_b(y));
  record("l2norm_forward", c, [&] { inner_->l2norm_forward(y, x, D); });
}

void CountingOps::l2norm_backward(Tensor& dx, const Tensor& dy, const Tensor& x, int64_t D) {
  // Recompute the norm (2), dot(dy, xhat) (2), dx += (dy - xhat dot) / norm (3): 7 per element. dy, x read,
  // dx read + written.
  Cost c;
  c.flops = 7 * n_of(x);
  c.bytes = n_of(x) * (act_b(dy) + act_b(x) + 2 * act_b(dx));
  record("l2norm_backward", c, [&] { inner_->l2norm_backward(dx, dy, x, D); });
}

void CountingOps::rope_tables(Tensor& cos, Tensor& sin, int64_t S, int64_t R, double theta) {
  // Built on the host and uploaded by CudaOps (two uploads, no wait; once per sequence length): no kernel.
  Cost c;
  c.launches = 0;
  c.syncs = 0;
  c.host_bytes = 2.0 * static_cast<double>(S * R) * f32_b();
  record("rope_tables", c, [&] { inner_->rope_tables(cos, sin, S, R, theta); });
}

void CountingOps::rope_forward(Tensor& y, const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t R) {
  // x (B, S, NH, D): the first R dims of every head rotated in pairs, 3 FLOPs per rotated element (2 products,
  // 1 sum); the rest copied. Bytes: x read, y written; cos, sin [S R] f32 read once.
  const double rotated = n_of(x) / static_cast<double>(x.dim(3)) * static_cast<double>(R);
  Cost c;
  c.flops = 3 * rotated;
  c.bytes = n_of(x) * (act_b(x) + act_b(y)) + (n_of(cos) + n_of(sin)) * f32_b();
  record("rope_forward", c, [&] { inner_->rope_forward(y, x, cos, sin, R); });
}

void CountingOps::rope_backward(Tensor& dx, const Tensor& dy, const Tensor& cos, const Tensor& sin, int64_t R) {
  // The inverse rotation accumulated into dx: 3 FLOPs per rotated element + 1 per element for the +=. dy read,
  // dx read + written, cos, sin read.
  const double rotated = n_of(dy) / static_cast<double>(dy.dim(3)) * static_cast<double>(R);
  Cost c;
  c.flops = 3 * rotated + n_of(dy);
  c.bytes = n_of(dy) * (act_b(dy) + 2 * act_b(dx)) + (n_of(cos) + n_of(sin)) * f32_b();
  record("rope_backward", c, [&] { inner_->rope_backward(dx, dy, cos, sin, R); });
}

void CountingOps::attention_forward(Tensor& o, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                                    double scale) {
  // S = Q K^T and O = P V over the causal pairs only (a fused flash kernel skips the masked blocks): 2 D FLOPs
  // per pair each, 4 B NH D pairs (= 4 B NH Sq Sk D halved for Sq = Sk). Softmax (~5 per pair) not counted, as
  // model/flops.h. Bytes (flash: nothing of size S^2 in HBM): q, k, v read once, o written, lse[B NH Sq] f32.
  const double B = static_cast<double>(q.dim(0)), Sq = static_cast<double>(q.dim(1)),
               NH = static_cast<double>(q.dim(2)), D = static_cast<double>(q.dim(3)),
               Sk = static_cast<double>(k.dim(1));
  Cost c;
  c.flops = 4 * B * NH * D * causal_pairs(Sq, Sk);
  c.bytes = n_of(q) * act_b(q) + n_of(k) * act_b(k) + n_of(v) * act_b(v) + n_of(o) * act_b(o) + n_of(lse) * f32_b();
  record("attention_forward", c, [&] { inner_->attention_forward(o, lse, q, k, v, scale); });
}

void CountingOps::attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& d_o, const Tensor& q,
                                     const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                                     double scale) {
  // Flash backward: recompute S = Q K^T, then dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: 5 products of
  // 2 D FLOPs per causal pair against the forward's 2, i.e. 2.5 x the forward. Bytes: d_o, q, k, v, o read, lse
  // read; dq, dk, dv written (overwritten, by the contract).
  const double B = static_cast<double>(q.dim(0)), Sq = static_cast<double>(q.dim(1)),
               NH = static_cast<double>(q.dim(2)), D = static_cast<double>(q.dim(3)),
               Sk = static_cast<double>(k.dim(1));
  Cost c;
  c.flops = 2.5 * 4 * B * NH * D * causal_pairs(Sq, Sk);
  c.bytes = n_of(d_o) * act_b(d_o) + n_of(q) * act_b(q) + n_of(k) * act_b(k) + n_of(v) * act_b(v) + n_of(o) * act_b(o) +
            n_of(lse) * f32_b() + n_of(dq) * act_b(dq) + n_of(dk) * act_b(dk) + n_of(dv) * act_b(dv);
  record("attention_backward", c, [&] { inner_->attention_backward(dq, dk, dv, d_o, q, k, v, o, lse, scale); });
}

void CountingOps::sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& gate, int64_t G, int64_t ld_gate) {
  // y = x sigmoid(gate): sigmoid 4 FLOPs per gate element (G per row), 1 product per element. Bytes: x read, y
  // written [N D], the G used columns of gate read [N G].
  const double N = static_cast<double>(x.dim(0)), ND = n_of(x);
  Cost c;
  c.flops = ND + 4 * N * static_cast<double>(G);
  c.bytes = ND * (act_b(x) + act_b(y)) + N * static_cast<double>(G) * act_b(gate);
  record("sigmoid_gate_forward", c, [&] { inner_->sigmoid_gate_forward(y, x, gate, G, ld_gate); });
}

void CountingOps::sigmoid_gate_backward(Tensor* dx, Tensor* dgate, const Tensor& dy, const Tensor& x,
                                        const Tensor& gate, int64_t G, int64_t ld_gate) {
  // dx += dy s (2 per element), dgate += sum(dy x) s (1 - s) (2 per element, 4 per gate element with the
  // sigmoid). Bytes: dy, x [N D], gate [N G] read; dx [N D] and dgate [N G] read + written when given.
  const double N = static_cast<double>(x.dim(0)), ND = n_of(x), NG = N * static_cast<double>(G);
  Cost c;
  c.flops = 4 * ND + 4 * NG;
  c.bytes = ND * (act_b(dy) + act_b(x)) + NG * act_b(gate) + (dx ? 2 * ND * act_b(*dx) : 0.0) +
            (dgate ? 2 * NG * act_b(*dgate) : 0.0);
  record("sigmoid_gate_backward", c, [&] { inner_->sigmoid_gate_backward(dx, dgate, dy, x, gate, G, ld_gate); });
}

void CountingOps::conv1d_silu_forward(Tensor& y, const Tensor& x, const ParamRef& w, ConvSplit split) {
  // Depthwise causal conv of KC taps (2 KC per element, as model/flops.h) and SiLU (4): (2 KC + 4) per element.
  // Bytes: x read, y written [B S C]; w[C KC] f32 (CudaOps reads the master).
  const double KC = static_cast<double>(w.w.dim(-1));
  Cost c;
  c.flops = (2 * KC + 4) * n_of(x);
  c.bytes = n_of(x) * (act_b(x) + act_b(y)) + n_of(w.w) * f32_b();
  record("conv1d_silu_forward", c, [&] { inner_->conv1d_silu_forward(y, x, w, split); });
}

void CountingOps::conv1d_silu_backward(Tensor& dx, const ParamRef& w, const Tensor& dy, const Tensor& x,
                                       ConvSplit split) {
  // Recompute the pre-activation (2 KC) and SiLU' (5), dx += conv^T (2 KC), dw += (2 KC): (6 KC + 5) per
  // element. Bytes: dy, x read; dx read + written [B S C]; w read (f32) and dw read + written.
  const double KC = static_cast<double>(w.w.dim(-1));
  Cost c;
  c.flops = (6 * KC + 5) * n_of(x);
  c.bytes = n_of(x) * (act_b(dy) + act_b(x) + 2 * act_b(dx)) + n_of(w.w) * 3 * f32_b();
  record("conv1d_silu_backward", c, [&] { inner_->conv1d_silu_backward(dx, w, dy, x, split); });
}

void CountingOps::gdn_gates_forward(Tensor& beta, Tensor& g, const Tensor& b, const Tensor& a, const ParamRef& A_log,
                                    const ParamRef& dt_bias) {
  // beta = sigmoid(b) (4), g = -exp(A_log) softplus(a + dt_bias) (about 6): 10 per (token, value head). Bytes:
  // b, a [N Hv] read, beta, g [N Hv] f32 written, A_log, dt_bias [Hv] f32 read.
  const double NH = n_of(b), Hv = n_of(A_log.w);
  Cost c;
  c.flops = 10 * NH;
  c.bytes = NH * (act_b(b) + act_b(a)) + 2 * NH * f32_b() + 2 * Hv * f32_b();
  record("gdn_gates_forward", c, [&] { inner_->gdn_gates_forward(beta, g, b, a, A_log, dt_bias); });
}

void CountingOps::gdn_gates_backward(Tensor& db, Tensor& da, const ParamRef& A_log, const ParamRef& dt_bias,
                                     const Tensor& dbeta, const Tensor& dg, const Tensor& b, const Tensor& a) {
  // The gates' derivatives (about 12 per element, with the sums into dA_log, ddt_bias). Bytes: dbeta, dg [N Hv]
  // f32 and b, a read; db, da read + written; A_log, dt_bias [Hv] read and their gradients read + written.
  const double NH = n_of(b), Hv = n_of(A_log.w);
  Cost c;
  c.flops = 12 * NH;
  c.bytes = 2 * NH * f32_b() + NH * (act_b(b) + act_b(a)) + 2 * NH * (act_b(db) + act_b(da)) + 2 * Hv * 3 * f32_b();
  record("gdn_gates_backward", c, [&] { inner_->gdn_gates_backward(db, da, A_log, dt_bias, dbeta, dg, b, a); });
}

void CountingOps::gated_delta_rule_forward(Tensor& o, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& g, const Tensor& beta, double scale, const GdrStates& states) {
  // FLOPs: gdr_forward_flops_per_head x B Hv. Bytes: q, k [B S Hk dk] and v [B S Hv dv] read once (a key head's
  // q, k serve its Hv / Hk value heads from on-chip memory), g, beta [B S Hv] f32 read, o written; the states
  // [B Hv dk dv] f32 read / written when given. The chunk intermediates (Gc, W, U, new values, chunk states: I =
  // gdr_saved_cuda_bytes, CUDA's size whatever the inner backend's) cross kernels: written once and read back (by
  // the state pass and the output kernel), 2 I, whether they go to the workspace or to the caller's `save`.
  const int64_t B = q.dim(0), S = q.dim(1), Hv = v.dim(2);
  const double K = static_cast<double>(q.dim(3)), V = static_cast<double>(v.dim(3));
  Cost c;
  c.flops = static_cast<double>(B * Hv) * gdr_forward_flops_per_head(S, K, V);
  c.bytes = n_of(q) * act_b(q) + n_of(k) * act_b(k) + n_of(v) * act_b(v) + (n_of(g) + n_of(beta)) * f32_b() +
            n_of(o) * act_b(o) + (n_of(states.initial) + n_of(states.final_state)) * f32_b() +
            2 * gdr_saved_cuda_bytes(q, v);
  record("gated_delta_rule_forward", c, [&] { inner_->gated_delta_rule_forward(o, q, k, v, g, beta, scale, states); });
}

void CountingOps::gated_delta_rule_backward(Tensor& dq, Tensor& dk, Tensor& dv, Tensor& dg, Tensor& dbeta,
                                            const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& g, const Tensor& beta, double scale,
                                            const GdrStates& states) {
  // FLOPs: gdr_backward_flops_per_head x B Hv (with the forward sweep that recomputes the chunk states unless the
  // forward kept them: `saved`). Bytes: d_o, q, k, v read, g, beta f32 read; dq, dk, dv read + written, dg, dbeta
  // f32 read + written (all accumulated); states: initial and d_final read, d_initial read + written; the chunk
  // intermediates read (I), and first recomputed unless the forward kept them (`saved`): the forward's 2 I again.
  const int64_t B = q.dim(0), S = q.dim(1), Hv = v.dim(2);
  const double K = static_cast<double>(q.dim(3)), V = static_cast<double>(v.dim(3));
  Cost c;
  c.flops = static_cast<double>(B * Hv) * gdr_backward_flops_per_head(S, K, V, states.saved != nullptr);
  c.bytes = n_of(d_o) * act_b(d_o) + n_of(q) * act_b(q) + n_of(k) * act_b(k) + n_of(v) * act_b(v) +
            (n_of(g) + n_of(beta)) * f32_b() +
            2 * (n_of(dq) * act_b(dq) + n_of(dk) * act_b(dk) + n_of(dv) * act_b(dv)) +
            2 * (n_of(dg) + n_of(dbeta)) * f32_b() +
            (n_of(states.initial) + n_of(states.d_final) + 2 * n_of(states.d_initial)) * f32_b() +
            (states.saved ? 1 : 3) * gdr_saved_cuda_bytes(q, v);
  record("gated_delta_rule_backward", c,
         [&] { inner_->gated_delta_rule_backward(dq, dk, dv, dg, dbeta, d_o, q, k, v, g, beta, scale, states); });
}

void CountingOps::gated_delta_rule_step(Tensor& o, Tensor& state, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& g, const Tensor& beta, double scale) {
  // One token per value head on the (dk, dv) state: decay (1), p = S^T k (2), S += k u^T (2), o = S^T q (2):
  // 7 dk dv. Bytes: the f32 state read + written; q, k, v, g, beta read, o written.
  const double BH = static_cast<double>(v.dim(0) * v.dim(1)), K = static_cast<double>(q.dim(2)),
               V = static_cast<double>(v.dim(2));
  Cost c;
  c.flops = 7 * BH * K * V;
  c.bytes = 2 * n_of(state) * f32_b() + n_of(q) * act_b(q) + n_of(k) * act_b(k) + n_of(v) * act_b(v) +
            (n_of(g) + n_of(beta)) * f32_b() + n_of(o) * act_b(o);
  record("gated_delta_rule_step", c, [&] { inner_->gated_delta_rule_step(o, state, q, k, v, g, beta, scale); });
}

void CountingOps::gated_delta_rule_transition(Tensor& m, const Tensor& k, const Tensor& g, const Tensor& beta) {
  // FLOPs: gdr_transition_flops_per_head x B Hv. Bytes: k, g, beta read; m [B Hv dk dk] f32 written.
  const int64_t B = k.dim(0), S = k.dim(1), Hv = g.dim(2);
  Cost c;
  c.flops = static_cast<double>(B * Hv) * gdr_transition_flops_per_head(S, static_cast<double>(k.dim(3)));
  c.bytes = n_of(k) * act_b(k) + (n_of(g) + n_of(beta)) * f32_b() + n_of(m) * f32_b();
  record("gated_delta_rule_transition", c, [&] { inner_->gated_delta_rule_transition(m, k, g, beta); });
}

void CountingOps::swiglu_forward(Tensor& h, const Tensor& gu) {
  // h = silu(gate) up: SiLU 4 + product 1 = 5 per output element. gu [N 2I] read, h [N I] written.
  Cost c;
  c.flops = 5 * n_of(h);
  c.bytes = n_of(gu) * act_b(gu) + n_of(h) * act_b(h);
  record("swiglu_forward", c, [&] { inner_->swiglu_forward(h, gu); });
}

void CountingOps::swiglu_backward(Tensor& dgu, const Tensor& dh, const Tensor& gu) {
  // Recompute silu (4), dup = dh silu (1), dgate = dh up silu' (5): 10 per element of h. dh, gu read; dgu [N 2I]
  // read + written.
  Cost c;
  c.flops = 10 * n_of(dh);
  c.bytes = n_of(dh) * act_b(dh) + n_of(gu) * act_b(gu) + 2 * n_of(dgu) * act_b(dgu);
  record("swiglu_backward", c, [&] { inner_->swiglu_backward(dgu, dh, gu); });
}

void CountingOps::router_forward(Tensor& probs, Tensor& indices, Tensor& weights, const Tensor& logits,
                                 bool norm_topk_prob) {
  // Softmax over E (max, subtract, exp, sum, divide: 5 per logit); top-k selection (comparisons) and the
  // renormalisation (2 per chosen) are not arithmetic worth counting beyond 2 N K. Bytes: logits [N E] f32 read,
  // probs [N E] f32 written, indices [N K] and weights [N K] f32 written.
  Cost c;
  c.flops = 5 * n_of(logits) + 2 * n_of(weights);
  c.bytes = 2 * n_of(logits) * f32_b() + n_of(indices) * idx_b(indices) + n_of(weights) * f32_b();
  record("router_forward", c, [&] { inner_->router_forward(probs, indices, weights, logits, norm_topk_prob); });
}

void CountingOps::router_weights_from_indices(Tensor& weights, const Tensor& probs, const Tensor& indices,
                                              bool norm_topk_prob) {
  // Gather the K chosen probabilities per row (and renormalise: 2 per element): probs read at [N K] only, indices
  // read, weights written.
  Cost c;
  c.flops = 2 * n_of(weights);
  c.bytes = n_of(indices) * (f32_b() + idx_b(indices)) + n_of(weights) * f32_b();
  record("router_weights_from_indices", c,
         [&] { inner_->router_weights_from_indices(weights, probs, indices, norm_topk_prob); });
}

void CountingOps::router_backward(Tensor& dlogits, const Tensor* dprobs, const Tensor* dweights, const Tensor& probs,
                                  const Tensor& indices, bool norm_topk_prob) {
  // The softmax Jacobian-vector product (dot and scale: 4 per logit). Bytes: probs [N E] read, dprobs [N E] and
  // dweights [N K] read when given, indices read, dlogits [N E] f32 read + written (accumulated).
  Cost c;
  c.flops = 4 * n_of(probs);
  c.bytes = n_of(probs) * f32_b() + (n_of(dprobs) + n_of(dweights)) * f32_b() + n_of(indices) * idx_b(indices) +
            2 * n_of(dlogits) * f32_b();
  record("router_backward", c,
         [&] { inner_->router_backward(dlogits, dprobs, dweights, probs, indices, norm_topk_prob); });
}

void CountingOps::aux_stats_accumulate(Tensor& count_sum, Tensor& prob_sum, const Tensor& probs,
                                       const Tensor& indices) {
  // Column sums of probs (1 per element) and the top-k counts (1 per slot). probs [N E] f32 and indices read;
  // count_sum, prob_sum [E] f32 read + written.
  Cost c;
  c.flops = n_of(probs) + n_of(indices);
  c.bytes = n_of(probs) * f32_b() + n_of(indices) * idx_b(indices) + 2 * (n_of(count_sum) + n_of(prob_sum)) * f32_b();
  record("aux_stats_accumulate", c, [&] { inner_->aux_stats_accumulate(count_sum, prob_sum, probs, indices); });
}

void CountingOps::aux_loss_backward(Tensor& dprobs, const Tensor& count_sum, double total_rows, double daux) {
  // dprobs[n, e] += c_e (1 add per element; c_e from count_sum). dprobs [N E] f32 read + written, count_sum read.
  Cost c;
  c.flops = n_of(dprobs);
  c.bytes = 2 * n_of(dprobs) * f32_b() + n_of(count_sum) * f32_b();
  record("aux_loss_backward", c, [&] { inner_->aux_loss_backward(dprobs, count_sum, total_rows, daux); });
}

std::unique_ptr<MoeExpertsState> CountingOps::new_moe_state() {
  // Host-side object only.
  Cost c;
  c.launches = 0;
  std::unique_ptr<MoeExpertsState> s;
  record("new_moe_state", c, [&] { s = inner_->new_moe_state(); });
  return s;
}

void CountingOps::moe_experts_forward(Tensor& y, MoeExpertsState& state, const Tensor& x, const Tensor& weights,
                                      const Tensor& indices, const ParamRef& w_gate_up, const ParamRef& w_down) {
  // N tokens x K slots through E experts of (2I, H) and (H, I): gate_up 2 NK H 2I, down 2 NK I H (6 NK H I), SwiGLU
  // 5 NK I, the weighted combine 2 NK H. Bytes: x [N H], weights [N K] f32 and indices read; the experts' bf16
  // shadows [E 3 H I] x 2 read (every expert taken to receive tokens); y [N H] written; and the state the
  // backward reads (CudaMoeState: the sorted inputs xs [NK H], gu [NK 2I], the activation [NK I] unless it is
  // recomputed, the expert outputs ys [NK H]) written once. CudaOps defers the check of its bad-index flag (a
  // pending read) and does not wait: the CUTLASS grouped GEMMs read the per-expert row offsets on the device. Only
  // its cuBLASLt fallback (H or I not a multiple of 8: TMA's 16-byte rows) waits for them, once.
  // (The weights' 16-byte alignment, the fallback's other condition, holds for the shipped configs:
  // ParamTable.ExpertWeightsAreAlignedForTheGroupedGemm.)
  const double N = static_cast<double>(x.dim(0)), H = n_of(x) / N, NK = n_of(indices),
               E = static_cast<double>(w_gate_up.w.dim(0)), I = static_cast<double>(w_down.w.dim(2));
  const double state_elems = NK * H + NK * 2 * I + (state.recompute_act ? 0.0 : NK * I) + NK * H;
  Cost c;
  c.flops = 6 * NK * H * I + 5 * NK * I + 2 * NK * H;
  c.bytes = N * H * act_b(x) + NK * (f32_b() + idx_b(indices)) + E * 3 * H * I * 2 + N * H * act_b(y) +
            state_elems * act_b(x);
  const bool grouped_on_device = static_cast<int64_t>(H) % 8 == 0 && static_cast<int64_t>(I) % 8 == 0;
  c.syncs = grouped_on_device ? 0 : 1;
  ++pending_;
  record("moe_experts_forward", c,
         [&] { inner_->moe_experts_forward(y, state, x, weights, indices, w_gate_up, w_down); });
}

void CountingOps::moe_experts_backward(Tensor& dx, Tensor& dweights, MoeExpertsState& state, const Tensor& dy,
                                       const ParamRef& w_gate_up, const ParamRef& w_down) {
  // dweights = dy . ys (2 NK H) and dys = w dy (NK H); down: dact, dW (4 NK I H); SwiGLU backward 10 NK I (+ 5
  // NK I to recompute the activation); gate_up: dxs, dW (8 NK H I); dx += sum over k (NK H). Bytes: dy [N H] read,
  // the saved state read once (as written by the forward), the bf16 shadows [E 3 H I] x 2 read, the fp32
  // gradients [E 3 H I] read + written, dx [N H] read + written, dweights [N K] f32 read + written.
  const double N = static_cast<double>(dx.dim(0)), H = n_of(dx) / N, NK = n_of(dweights),
               E = static_cast<double>(w_gate_up.w.dim(0)), I = static_cast<double>(w_down.w.dim(2));
  const double state_elems = NK * H + NK * 2 * I + (state.recompute_act ? 0.0 : NK * I) + NK * H;
  Cost c;
  c.flops = 12 * NK * H * I + (state.recompute_act ? 15 : 10) * NK * I + 4 * NK * H;
  c.bytes = N * H * act_b(dy) + state_elems * act_b(dy) + E * 3 * H * I * (2 + 2 * f32_b()) + 2 * N * H * act_b(dx) +
            2 * NK * f32_b();
  record("moe_experts_backward", c, [&] { inner_->moe_experts_backward(dx, dweights, state, dy, w_gate_up, w_down); });
}

void CountingOps::moe_permute(Tensor& rows, const Tensor& x, const Tensor& row_token) {
  // rows [R H] = x[row_token]: R rows read and written, row_token [R] read.
  Cost c;
  c.bytes = 2 * n_of(rows) * act_b(rows) + n_of(row_token) * idx_b(row_token);
  record("moe_permute", c, [&] { inner_->moe_permute(rows, x, row_token); });
}

void CountingOps::moe_permute_backward(Tensor& dx, const Tensor& drows, const Tensor& slot_row) {
  // dx [N H] += sum of K rows of drows: the NK H gathered elements read (1 FLOP each), dx read + written,
  // slot_row read.
  const double NKH = n_of(slot_row) * (n_of(dx) / std::max<double>(1.0, static_cast<double>(dx.dim(0))));
  Cost c;
  c.flops = NKH;
  c.bytes = NKH * act_b(drows) + 2 * n_of(dx) * act_b(dx) + n_of(slot_row) * idx_b(slot_row);
  record("moe_permute_backward", c, [&] { inner_->moe_permute_backward(dx, drows, slot_row); });
}

void CountingOps::moe_unpermute(Tensor& y, const Tensor& rows, const Tensor& weights, const Tensor& slot_row) {
  // y [N H] = sum_k weights[n, k] rows[slot]: 2 FLOPs per gathered element (NK H); the NK rows read, weights [N K]
  // f32 and slot_row read, y written.
  const double NKH = n_of(slot_row) * (n_of(y) / std::max<double>(1.0, static_cast<double>(y.dim(0))));
  Cost c;
  c.flops = 2 * NKH;
  c.bytes = NKH * act_b(rows) + n_of(weights) * f32_b() + n_of(slot_row) * idx_b(slot_row) + n_of(y) * act_b(y);
  record("moe_unpermute", c, [&] { inner_->moe_unpermute(y, rows, weights, slot_row); });
}

void CountingOps::moe_unpermute_backward(Tensor& drows, Tensor& dweights, const Tensor& dy, const Tensor& rows,
                                         const Tensor& weights, const Tensor& slot_row) {
  // drows[slot] = weights dy[n] (1 per element), dweights += dy[n] . rows[slot] (2 per element): 3 NK H. Bytes:
  // dy [N H], the NK rows, weights and slot_row read; drows [NK H] written; dweights [N K] f32 read + written.
  const double NKH = n_of(slot_row) * (n_of(dy) / std::max<double>(1.0, static_cast<double>(dy.dim(0))));
  Cost c;
  c.flops = 3 * NKH;
  c.bytes = n_of(dy) * act_b(dy) + NKH * (act_b(rows) + act_b(drows)) + n_of(weights) * f32_b() +
            n_of(slot_row) * idx_b(slot_row) + (dweights.defined() ? 2 * n_of(dweights) * f32_b() : 0.0);
  record("moe_unpermute_backward", c,
         [&] { inner_->moe_unpermute_backward(drows, dweights, dy, rows, weights, slot_row); });
}

void CountingOps::embedding_forward(Tensor& out, const ParamRef& table, const Tensor& ids, const VocabShard& vocab) {
  // out [N H] = table rows: ids [N] read, N rows of the fp32 master read (CudaOps gathers from it), out written.
  // CudaOps defers the check of its bad-id flag (a pending read, no wait).
  Cost c;
  c.bytes = n_of(ids) * idx_b(ids) + n_of(out) * (f32_b() + act_b(out));
  ++pending_;
  record("embedding_forward", c, [&] { inner_->embedding_forward(out, table, ids, vocab); });
}

void CountingOps::embedding_backward(const ParamRef& table, const Tensor& dout, const Tensor& ids,
                                     const VocabShard& vocab) {
  // dtable[ids[n]] += dout[n] (1 per element): dout [N H] and ids read, at most N rows of the fp32 gradient read +
  // written.
  Cost c;
  c.flops = n_of(dout);
  c.bytes = n_of(dout) * (act_b(dout) + 2 * f32_b()) + n_of(ids) * idx_b(ids);
  record("embedding_backward", c, [&] { inner_->embedding_backward(table, dout, ids, vocab); });
}

void CountingOps::cross_entropy_forward(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& logits,
                                        const Tensor& targets) {
  // Online log-sum-exp per row (max, subtract, exp, add: 4 per logit). logits [N V] read, targets [N] read,
  // row_loss, lse [N] f32 written. CudaOps defers two reads (the bad-target flag, the loss sum): no wait.
  Cost c;
  c.flops = 4 * n_of(logits);
  c.bytes = n_of(logits) * act_b(logits) + n_of(targets) * idx_b(targets) + (n_of(row_loss) + n_of(lse)) * f32_b();
  pending_ += 2;
  record("cross_entropy_forward", c, [&] { inner_->cross_entropy_forward(loss_sum, row_loss, lse, logits, targets); });
}

void CountingOps::cross_entropy_partial(Tensor& stats, const Tensor& logits, const Tensor& targets,
                                        const VocabShard& vocab) {
  // As the forward over this rank's columns: 4 per logit; logits and targets read, stats [3 N] f32 written.
  Cost c;
  c.flops = 4 * n_of(logits);
  c.bytes = n_of(logits) * act_b(logits) + n_of(targets) * idx_b(targets) + n_of(stats) * f32_b();
  record("cross_entropy_partial", c, [&] { inner_->cross_entropy_partial(stats, logits, targets, vocab); });
}

void CountingOps::cross_entropy_combine(double* loss_sum, Tensor& row_loss, Tensor& lse, const Tensor& stats,
                                        const Tensor& targets, int64_t vocab_full) {
  // Combine P ranks' (max, sum, target logit) per row (about 4 per stat). stats [P 3 N] f32 and targets read,
  // row_loss, lse written. CudaOps defers two reads, as the forward.
  Cost c;
  c.flops = 4 * n_of(stats);
  c.bytes = n_of(stats) * f32_b() + n_of(targets) * idx_b(targets) + (n_of(row_loss) + n_of(lse)) * f32_b();
  pending_ += 2;
  record("cross_entropy_combine", c,
         [&] { inner_->cross_entropy_combine(loss_sum, row_loss, lse, stats, targets, vocab_full); });
}

void CountingOps::cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& lse,
                                         const Tensor& targets, double scale, const VocabShard& vocab) {
  // dlogits = scale (exp(logit - lse) - onehot): 4 per logit. logits read, dlogits written (overwritten) [N V];
  // lse [N] f32 and targets read.
  Cost c;
  c.flops = 4 * n_of(logits);
  c.bytes = n_of(logits) * act_b(logits) + n_of(dlogits) * act_b(dlogits) + n_of(lse) * f32_b() +
            n_of(targets) * idx_b(targets);
  record("cross_entropy_backward", c,
         [&] { inner_->cross_entropy_backward(dlogits, logits, lse, targets, scale, vocab); });
}

double CountingOps::sum_squares(const Tensor& x, const std::vector<FlatRange>& ranges) {
  // 2 FLOPs per element of the ranges, each read once (f32); the result comes back to the host in one wait, with
  // every deferred read pending (resolve_reads).
  double n = 0;
  for (const FlatRange& r : ranges) n += static_cast<double>(r.size());
  Cost c;
  c.flops = 2 * n;
  c.bytes = n * f32_b();
  c.syncs = 1;
  pending_ = 0;
  double out = 0;
  record("sum_squares", c, [&] { out = inner_->sum_squares(x, ranges); });
  return out;
}

void CountingOps::scale(Tensor& x, FlatRange r, float s) {
  // x[r] *= s: 1 FLOP, read + write f32 per element.
  Cost c;
  c.flops = static_cast<double>(r.size());
  c.bytes = 2 * static_cast<double>(r.size()) * f32_b();
  record("scale", c, [&] { inner_->scale(x, r, s); });
}

void CountingOps::adamw_step(Tensor& params, const Tensor& grads, Tensor& exp_avg, Tensor& exp_avg_sq,
                             Tensor* params_act, FlatRange range, const std::vector<FlatRange>& decay,
                             const AdamWHyper& h, int64_t step) {
  // Per element (optim/adamw.h): decay (1), two moment updates (3 + 4), bias corrections, sqrt, divide and the
  // update (about 6): 14 FLOPs. Bytes: params, grads, exp_avg, exp_avg_sq read (f32), params and both moments
  // written (f32), the bf16 shadow written when given (2): 30 bytes per element with the shadow. CudaOps uploads
  // the decayed ranges that meet the range when they change (asynchronously: no wait).
  const double n = static_cast<double>(range.size());
  Cost c;
  c.flops = 14 * n;
  c.bytes = n * (7 * f32_b() + (params_act ? 2.0 : 0.0));
  record("adamw_step", c,
         [&] { inner_->adamw_step(params, grads, exp_avg, exp_avg_sq, params_act, range, decay, h, step); });
}

// ---------------------------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------------------------

std::string roofline_table(const CountingOps& ops, double per) {
  const bool timed = ops.total().wall_s > 0;
  std::string out;
  char line[512];
  std::snprintf(line, sizeof line, "%-28s %7s %7s %10s %11s %8s %10s %10s%s\n", "op", "calls", "launch", "GFLOP",
                "HBM MB", "syncs", "H100 ms", "H200 ms", timed ? "     CPU ms" : "");
  out += line;
  auto row = [&](const std::string& name, const OpCount& c) {
    std::snprintf(line, sizeof line, "%-28s %7.0f %7.0f %10.3f %11.2f %8.0f %10.4f %10.4f", name.c_str(),
                  static_cast<double>(c.calls) / per, static_cast<double>(c.launches) / per, c.flops / per / 1e9,
                  c.hbm_bytes / per / 1e6, static_cast<double>(c.host_syncs) / per, 1e3 * c.gpu_s[0] / per,
                  1e3 * c.gpu_s[1] / per);
    out += line;
    if (timed) {
      std::snprintf(line, sizeof line, " %10.3f", 1e3 * c.wall_s / per);
      out += line;
    }
    out += "\n";
  };
  for (const auto& [name, c] : ops.per_op()) row(name, c);
  const OpCount t = ops.total();
  row("total", t);
  std::snprintf(line, sizeof line,
                "per step: %.0f launches, %.0f host syncs (%.0f downloads, %.0f uploads), %.3f GFLOP, %.2f MB HBM; "
                "roofline %.3f ms on %s, %.3f ms on %s (arithmetic alone %.3f ms, bytes alone %.3f / %.3f ms)\n",
                static_cast<double>(t.launches) / per, static_cast<double>(t.host_syncs) / per,
                static_cast<double>(ops.downloads()) / per, static_cast<double>(ops.uploads()) / per,
                t.flops / per / 1e9, t.hbm_bytes / per / 1e6, 1e3 * t.gpu_s[0] / per, kRooflineGpus[0].name,
                1e3 * t.gpu_s[1] / per, kRooflineGpus[1].name, 1e3 * t.flops / per / kRooflineGpus[0].peak_flops,
                1e3 * t.hbm_bytes / per / kRooflineGpus[0].hbm_bw, 1e3 * t.hbm_bytes / per / kRooflineGpus[1].hbm_bw);
  out += line;
  return out;
}

}  // namespace nextron
