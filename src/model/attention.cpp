#include "model/attention.h"

#include <cmath>
#include <cstring>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/sigmoid_gate.h"

namespace nextron {

using namespace cpu;

GatedAttention::GatedAttention(const ModelConfig& config, ModuleWeights weights)
    : c_(config), wt_(std::move(weights)) {}

void GatedAttention::forward(const float* x, float* y, int64_t B, int64_t S) {
  const int64_t N = B * S, H = c_.hidden_size, NH = c_.num_attention_heads, NKV = c_.num_key_value_heads,
                D = c_.head_dim, R = c_.rotary_dim();
  const float eps = static_cast<float>(c_.rms_norm_eps);
  if (S != S_) {
    rope_tables(buffer(cos_, {S, R}), buffer(sin_, {S, R}), S, R, c_.rope_theta, 0);
  }
  B_ = B;
  S_ = S;
  x_ = x;
  // q_proj output per head: [query (D) | gate (D)].
  float* qg = buffer(qg_, {N, NH * 2 * D});  // (N, NH, 2D)
  linear_forward(qg, x, wt_.w("q_proj"), wt_.w_or_null("q_proj_bias"), N, H, NH * 2 * D);
  float* q_raw = buffer(q_raw_, {N, NH, D});
  float* gate = buffer(gate_, {N, NH * D});
  for (int64_t r = 0; r < N * NH; ++r) {
    std::memcpy(q_raw + r * D, qg + r * 2 * D, D * sizeof(float));
    std::memcpy(gate + r * D, qg + r * 2 * D + D, D * sizeof(float));
  }
  float* k_raw = buffer(k_raw_, {N, NKV, D});
  float* v = buffer(v_, {N, NKV, D});
  linear_forward(k_raw, x, wt_.w("k_proj"), wt_.w_or_null("k_proj_bias"), N, H, NKV * D);
  linear_forward(v, x, wt_.w("v_proj"), wt_.w_or_null("v_proj_bias"), N, H, NKV * D);

  // Per-head norms, then RoPE on the first R dims of every head.
  float* q = buffer(q_, {N, NH, D});
  float* k = buffer(k_, {N, NKV, D});
  rmsnorm_forward(q, buffer(q_rstd_, {N * NH}), q_raw, wt_.w("q_norm"), N * NH, D, eps);
  rmsnorm_forward(k, buffer(k_rstd_, {N * NKV}), k_raw, wt_.w("k_norm"), N * NKV, D, eps);
  rope_forward(q, q, cos_.f32(), sin_.f32(), B, S, NH, D, R);
  rope_forward(k, k, cos_.f32(), sin_.f32(), B, S, NKV, D, R);

  float* o = buffer(o_, {N, NH, D});
  attention_forward(o, buffer(lse_, {B, NH, S}), q, k, v, B, S, NH, NKV, D, 1.0f / std::sqrt(float(D)));
  float* og = buffer(og_, {N, NH * D});
  sigmoid_gate_forward(og, o, gate, N, NH * D, NH * D);
  linear_forward(y, og, wt_.w("o_proj"), wt_.w_or_null("o_proj_bias"), N, NH * D, H);
}

void GatedAttention::backward(const float* dy, float* dx) {
  const int64_t B = B_, S = S_, N = B * S, H = c_.hidden_size, NH = c_.num_attention_heads,
                NKV = c_.num_key_value_heads, D = c_.head_dim, R = c_.rotary_dim();
  float* dog = zeroed(dog_, {N, NH * D});
  linear_backward(dog, wt_.g("o_proj"), wt_.g_or_null("o_proj_bias"), dy, og_.f32(), wt_.w("o_proj"), N, NH * D, H);
  float* d_o = zeroed(do_, {N, NH * D});
  float* dgate = zeroed(dgate_, {N, NH * D});
  sigmoid_gate_backward(d_o, dgate, dog, o_.f32(), gate_.f32(), N, NH * D, NH * D);

  float* dq = zeroed(dq_, {N, NH, D});
  float* dk = zeroed(dk_, {N, NKV, D});
  float* dv = zeroed(dv_, {N, NKV, D});
  attention_backward(dq, dk, dv, d_o, q_.f32(), k_.f32(), v_.f32(), o_.f32(), lse_.f32(), B, S, NH, NKV, D,
                     1.0f / std::sqrt(float(D)));
  float* dqn = zeroed(dqn_, {N, NH, D});
  float* dkn = zeroed(dkn_, {N, NKV, D});
  rope_backward(dqn, dq, cos_.f32(), sin_.f32(), B, S, NH, D, R);
  rope_backward(dkn, dk, cos_.f32(), sin_.f32(), B, S, NKV, D, R);
  float* dq_raw = zeroed(dq_raw_, {N, NH, D});
  float* dk_raw = zeroed(dk_raw_, {N, NKV, D});
  rmsnorm_backward(dq_raw, wt_.g("q_norm"), dqn, q_raw_.f32(), wt_.w("q_norm"), q_rstd_.f32(), N * NH, D);
  rmsnorm_backward(dk_raw, wt_.g("k_norm"), dkn, k_raw_.f32(), wt_.w("k_norm"), k_rstd_.f32(), N * NKV, D);

  float* dqg = buffer(dqg_, {N, NH * 2 * D});
  for (int64_t r = 0; r < N * NH; ++r) {
    std::memcpy(dqg + r * 2 * D, dq_raw + r * D, D * sizeof(float));
    std::memcpy(dqg + r * 2 * D + D, dgate + r * D, D * sizeof(float));
  }
  linear_backward(dx, wt_.g("q_proj"), wt_.g_or_null("q_proj_bias"), dqg, x_, wt_.w("q_proj"), N, H, NH * 2 * D);
  linear_backward(dx, wt_.g("k_proj"), wt_.g_or_null("k_proj_bias"), dk_raw, x_, wt_.w("k_proj"), N, H, NKV * D);
  linear_backward(dx, wt_.g("v_proj"), wt_.g_or_null("v_proj_bias"), dv, x_, wt_.w("v_proj"), N, H, NKV * D);
}

}  // namespace nextron
