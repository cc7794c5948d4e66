// Public entry points of the chunked gated delta rule (gated_delta_rule.h): head dims that are multiples of 16 go
// straight to the kernels (gated_delta_rule_fwd.cu / _bwd.cu); any other dk, dv in [1, 256] run zero-padded to the
// next multiple of 16.
//
// Why padding is exact: with q, k padded by zero columns (dk -> dkp) and v by zero columns (dv -> dvp), every
// product over dk (K K^T, Q K^T, k^T h) sums the same terms plus zeros; the state rows of padded key columns receive
// k_i * (...) = 0 and the state columns of padded value columns receive (...) * v_j = 0, so they stay at their
// initial value, which the padding makes zero; outputs of padded value columns are zero and are dropped. Backward
// likewise: the gradients of the real columns, dg and dbeta are the unpadded ones. Gradients accumulate, so the
// padded gradient buffers start as copies of the caller's and are copied back.
//
// Workspace for padded dims: the kernels' own (at the padded shape; the saved intermediates, when the caller keeps
// them, are at the padded shape too), then q, k, dq, dk (B, S, Hk, dkp) bf16,
// v, dv, o / d_o (B, S, Hv, dvp) bf16 and three states (B, Hv, dkp, dvp) fp32 (initial, final / d_final,
// d_initial). For the 8-wide heads of the test models that is twice the unpadded kernels' workspace; Qwen3-Next's
// 128 needs none of it.
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/gated_delta_rule_impl.cuh"

namespace nextron::cuda {

namespace gdr {
namespace {

constexpr int kAlign = 16;

int64_t round_up(int64_t d) { return (d + kAlign - 1) / kAlign * kAlign; }

// dst (n, ap, bp) <- src (n, a, b) in its leading corner, zeros elsewhere.
__global__ void __launch_bounds__(kThreads)
    pad_bf16_kernel(bf16* dst, const bf16* src, int64_t n, int a, int b, int ap, int bp) {
  const int64_t total = n * ap * bp;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx / (int64_t(ap) * bp);
    const int j = int(idx / bp % ap), l = int(idx % bp);
    dst[idx] = (j < a && l < b) ? src[(i * a + j) * b + l] : to_bf16(0.0f);
  }
}
__global__ void __launch_bounds__(kThreads)
    pad_f32_kernel(float* dst, const float* src, int64_t n, int a, int b, int ap, int bp) {
  const int64_t total = n * ap * bp;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx / (int64_t(ap) * bp);
    const int j = int(idx / bp % ap), l = int(idx % bp);
    dst[idx] = (j < a && l < b) ? src[(i * a + j) * b + l] : 0.0f;
  }
}
// dst (n, a, b) <- the leading corner of src (n, ap, bp).
__global__ void __launch_bounds__(kThreads)
    unpad_bf16_kernel(bf16* dst, const bf16* src, int64_t n, int a, int b, int ap, int bp) {
  const int64_t total = n * a * b;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx / (int64_t(a) * b);
    const int j = int(idx / b % a), l = int(idx % b);
    dst[idx] = src[(i * ap + j) * bp + l];
  }
}
__global__ void __launch_bounds__(kThreads)
    unpad_f32_kernel(float* dst, const float* src, int64_t n, int a, int b, int ap, int bp) {
  const int64_t total = n * a * b;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx / (int64_t(a) * b);
    const int j = int(idx / b % a), l = int(idx % b);
    dst[idx] = src[(i * ap + j) * bp + l];
  }
}

unsigned grid_for(int64_t n) { return unsigned(std::clamp<int64_t>(ceil_div(n, kThreads), 1, 65536)); }

// Copies of one tensor of shape (n, a, b) into its padded form (n, ap, bp) and back; null and empty are no-ops.
struct PadDims {
  int64_t n;
  int a, b, ap, bp;
};
void pad(bf16* dst, const bf16* src, const PadDims& d, cudaStream_t stream) {
  if (!dst || !src || d.n == 0) return;
  pad_bf16_kernel<<<grid_for(d.n * d.ap * d.bp), kThreads, 0, stream>>>(dst, src, d.n, d.a, d.b, d.ap, d.bp);
  NEXTRON_CUDA_LAUNCH_CHECK();
}
void pad(float* dst, const float* src, const PadDims& d, cudaStream_t stream) {
  if (!dst || !src || d.n == 0) return;
  pad_f32_kernel<<<grid_for(d.n * d.ap * d.bp), kThreads, 0, stream>>>(dst, src, d.n, d.a, d.b, d.ap, d.bp);
  NEXTRON_CUDA_LAUNCH_CHECK();
}
void unpad(bf16* dst, const bf16* src, const PadDims& d, cudaStream_t stream) {
  if (!dst || !src || d.n == 0) return;
  unpad_bf16_kernel<<<grid_for(d.n * d.a * d.b), kThreads, 0, stream>>>(dst, src, d.n, d.a, d.b, d.ap, d.bp);
  NEXTRON_CUDA_LAUNCH_CHECK();
}
void unpad(float* dst, const float* src, const PadDims& d, cudaStream_t stream) {
  if (!dst || !src || d.n == 0) return;
  unpad_f32_kernel<<<grid_for(d.n * d.a * d.b), kThreads, 0, stream>>>(dst, src, d.n, d.a, d.b, d.ap, d.bp);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

// The padded shape and the buffers of the padded copies, carved after the kernels' workspace.
struct Padded {
  GdrShape shape;                       // dk, dv rounded up to multiples of 16
  PadDims qk_dims, v_dims, state_dims;  // (B S Hk, 1, dk), (B S Hv, 1, dv), (B Hv, dk, dv)
  bf16 *q, *k, *dq, *dk;                // (B, S, Hk, dkp)
  bf16 *v, *dv, *o;                     // (B, S, Hv, dvp); o doubles as d_o in the backward
  float *h0, *ht, *dh0;                 // (B, Hv, dkp, dvp); ht doubles as d_final_state in the backward
  void* kernel_workspace;
};

void check_dims(const GdrShape& s, const char* what) {
  NEXTRON_CHECK(s.dk >= 1 && s.dk <= kMaxDim && s.dv >= 1 && s.dv <= kMaxDim, what, ": head dims dk=", s.dk,
                " dv=", s.dv, " must be in [1, ", kMaxDim, "]");
  NEXTRON_CHECK(s.B >= 0 && s.S >= 0, what, ": bad shape B=", s.B, " S=", s.S);
}

bool aligned(const GdrShape& s) { return s.dk % kAlign == 0 && s.dv % kAlign == 0; }

// Lays out (base = nullptr: only sizes) the padded buffers; returns the total workspace bytes.
size_t carve_padded(Padded& p, const GdrShape& s, bool caller_keeps_intermediates, void* base) {
  p.shape = s;
  p.shape.dk = round_up(s.dk);
  p.shape.dv = round_up(s.dv);
  const int dk = int(s.dk), dv = int(s.dv), dkp = int(p.shape.dk), dvp = int(p.shape.dv);
  p.qk_dims = {s.B * s.S * s.Hk, 1, dk, 1, dkp};
  p.v_dims = {s.B * s.S * s.Hv, 1, dv, 1, dvp};
  p.state_dims = {s.B * s.Hv, dk, dv, dkp, dvp};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* ptr = base ? static_cast<char*>(base) + off : nullptr;
    off += (bytes + 255) / 256 * 256;
    return static_cast<void*>(ptr);
  };
  p.kernel_workspace = take(aligned_workspace_bytes(p.shape, caller_keeps_intermediates));
  const size_t nqk = size_t(p.qk_dims.n) * size_t(dkp), nv = size_t(p.v_dims.n) * size_t(dvp);
  const size_t nstate = size_t(p.state_dims.n) * size_t(dkp) * size_t(dvp);
  for (bf16** b : {&p.q, &p.k, &p.dq, &p.dk}) *b = static_cast<bf16*>(take(2 * nqk));
  for (bf16** b : {&p.v, &p.dv, &p.o}) *b = static_cast<bf16*>(take(2 * nv));
  for (float** b : {&p.h0, &p.ht, &p.dh0}) *b = static_cast<float*>(take(4 * nstate));
  return off;
}

// The padded buffer where the caller passed a pointer, else nullptr (the kernels see the same optional arguments).
template <typename T>
T* if_given(const void* caller, T* padded) {
  return caller ? padded : nullptr;
}

}  // namespace
}  // namespace gdr

size_t gated_delta_rule_workspace_bytes(const GdrShape& s, bool caller_keeps_intermediates) {
  gdr::check_dims(s, "gated_delta_rule_workspace_bytes");
  if (gdr::aligned(s)) return gdr::aligned_workspace_bytes(s, caller_keeps_intermediates);
  gdr::Padded p{};
  return gdr::carve_padded(p, s, caller_keeps_intermediates, nullptr);
}

size_t gated_delta_rule_saved_bytes(const GdrShape& s) {
  gdr::check_dims(s, "gated_delta_rule_saved_bytes");
  GdrShape padded = s;
  padded.dk = gdr::round_up(s.dk);
  padded.dv = gdr::round_up(s.dv);
  return gdr::aligned_saved_bytes(padded);
}

namespace {
size_t total_bytes(const std::vector<GdrKernelTraffic>& rows) {
  size_t n = 0;
  for (const GdrKernelTraffic& r : rows) n += r.read_bytes + r.write_bytes;
  return n;
}
// The kernels' shape: dk, dv rounded up to multiples of 16.
GdrShape kernel_shape(const GdrShape& s, const char* what) {
  gdr::check_dims(s, what);
  GdrShape k = s;
  k.dk = gdr::round_up(s.dk);
  k.dv = gdr::round_up(s.dv);
  return k;
}
}  // namespace

size_t gated_delta_rule_forward_hbm_bytes(const GdrShape& s) {
  return total_bytes(gated_delta_rule_forward_hbm_account(kernel_shape(s, "gated_delta_rule_forward_hbm_bytes")));
}
size_t gated_delta_rule_backward_hbm_bytes(const GdrShape& s, bool saved) {
  return total_bytes(
      gated_delta_rule_backward_hbm_account(kernel_shape(s, "gated_delta_rule_backward_hbm_bytes"), saved));
}

void gated_delta_rule_forward(bf16* o, float* final_state, const bf16* q, const bf16* k, const bf16* v, const float* g,
                              const float* beta, const float* initial_state, const GdrShape& s, float scale, void* save,
                              void* workspace, cudaStream_t stream) {
  gdr::check_dims(s, "gated_delta_rule_forward");
  if (gdr::aligned(s))
    return gdr::forward_aligned(o, final_state, q, k, v, g, beta, initial_state, s, scale, save, workspace, stream);
  NEXTRON_CHECK(workspace != nullptr || s.B == 0,
                "gated_delta_rule_forward: workspace is null (size it with gated_delta_rule_workspace_bytes)");
  gdr::Padded p{};
  gdr::carve_padded(p, s, save != nullptr, workspace);
  using gdr::if_given;
  gdr::pad(p.q, q, p.qk_dims, stream);
  gdr::pad(p.k, k, p.qk_dims, stream);
  gdr::pad(p.v, v, p.v_dims, stream);
  gdr::pad(p.h0, initial_state, p.state_dims, stream);
  gdr::forward_aligned(if_given(o, p.o), if_given(final_state, p.ht), if_given(q, p.q), if_given(k, p.k),
                       if_given(v, p.v), g, beta, if_given(initial_state, p.h0), p.shape, scale, save,
                       p.kernel_workspace, stream);
  gdr::unpad(o, p.o, p.v_dims, stream);
  gdr::unpad(final_state, p.ht, p.state_dims, stream);
}

void gated_delta_rule_backward(bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* d_initial_state,
                               const bf16* d_o, const float* d_final_state, const bf16* q, const bf16* k, const bf16* v,
                               const float* g, const float* beta, const float* initial_state, const GdrShape& s,
                               float scale, const void* saved, void* workspace, cudaStream_t stream) {
  gdr::check_dims(s, "gated_delta_rule_backward");
  if (gdr::aligned(s))
    return gdr::backward_aligned(dq, dk, dv, dg, dbeta, d_initial_state, d_o, d_final_state, q, k, v, g, beta,
                                 initial_state, s, scale, saved, workspace, stream);
  NEXTRON_CHECK(workspace != nullptr || s.B == 0,
                "gated_delta_rule_backward: workspace is null (size it with gated_delta_rule_workspace_bytes)");
  gdr::Padded p{};
  gdr::carve_padded(p, s, saved != nullptr, workspace);
  using gdr::if_given;
  gdr::pad(p.q, q, p.qk_dims, stream);
  gdr::pad(p.k, k, p.qk_dims, stream);
  gdr::pad(p.v, v, p.v_dims, stream);
  gdr::pad(p.o, d_o, p.v_dims, stream);
  gdr::pad(p.h0, initial_state, p.state_dims, stream);
  gdr::pad(p.ht, d_final_state, p.state_dims, stream);
  // The gradients accumulate: start the padded ones from the caller's values.
  gdr::pad(p.dq, dq, p.qk_dims, stream);
  gdr::pad(p.dk, dk, p.qk_dims, stream);
  gdr::pad(p.dv, dv, p.v_dims, stream);
  gdr::pad(p.dh0, d_initial_state, p.state_dims, stream);
  gdr::backward_aligned(if_given(dq, p.dq), if_given(dk, p.dk), if_given(dv, p.dv), dg, dbeta,
                        if_given(d_initial_state, p.dh0), if_given(d_o, p.o), if_given(d_final_state, p.ht),
                        if_given(q, p.q), if_given(k, p.k), if_given(v, p.v), g, beta, if_given(initial_state, p.h0),
                        p.shape, scale, saved, p.kernel_workspace, stream);
  gdr::unpad(dq, p.dq, p.qk_dims, stream);
  gdr::unpad(dk, p.dk, p.qk_dims, stream);
  gdr::unpad(dv, p.dv, p.v_dims, stream);
  gdr::unpad(d_initial_state, p.dh0, p.state_dims, stream);
}

}  // namespace nextron::cuda
