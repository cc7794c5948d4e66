#include "model/decoder.h"

#include "kernels/cpu/rmsnorm.h"

namespace nextron {

using namespace cpu;

DecoderLayer::DecoderLayer(const ModelConfig& config, int64_t layer, const ParamTable& table, const Tensor& params,
                           const Tensor& grads)
    : c_(config), wt_(table, params, grads, "layers." + std::to_string(layer) + ".") {
  const std::string p = "layers." + std::to_string(layer) + ".";
  if (config.layer_types[layer] == MixerType::full_attention)
    attention_ = std::make_unique<GatedAttention>(config, ModuleWeights(table, params, grads, p + "self_attn."));
  else
    deltanet_ = std::make_unique<GatedDeltaNet>(config, ModuleWeights(table, params, grads, p + "linear_attn."));
  if (config.mlp_type(layer) == MlpType::sparse_moe)
    moe_ = std::make_unique<SparseMoe>(config, ModuleWeights(table, params, grads, p + "mlp."));
  else
    dense_ = std::make_unique<SwiGluMlp>(ModuleWeights(table, params, grads, p + "mlp."), config.hidden_size,
                                         config.intermediate_size);
}

void DecoderLayer::forward(const float* x_in, float* x_out, int64_t B, int64_t S, MoeAuxStats& aux) {
  const int64_t N = B * S, H = c_.hidden_size;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  N_ = N;
  x_in_ = x_in;
  float* h1 = buffer(h1_, {N, H});
  rmsnorm_forward(h1, buffer(rstd1_, {N}), x_in, wt_.w("input_layernorm"), N, H, eps);
  float* mix = buffer(mix_, {N, H});
  if (attention_)
    attention_->forward(h1, mix, B, S);
  else
    deltanet_->forward(h1, mix, B, S);
  float* x_mid = buffer(x_mid_, {N, H});
  for (int64_t i = 0; i < N * H; ++i) x_mid[i] = x_in[i] + mix[i];
  float* h2 = buffer(h2_, {N, H});
  rmsnorm_forward(h2, buffer(rstd2_, {N}), x_mid, wt_.w("post_attention_layernorm"), N, H, eps);
  float* mlp = buffer(mlp_, {N, H});
  if (moe_)
    moe_->forward(h2, mlp, N, aux);
  else
    dense_->forward(h2, mlp, N);
  for (int64_t i = 0; i < N * H; ++i) x_out[i] = x_mid[i] + mlp[i];
}

void DecoderLayer::backward(const float* dx_out, float* dx_in, const MoeAuxStats& aux, float d_aux) {
  const int64_t N = N_, H = c_.hidden_size;
  // The residual carries dx_out straight to x_mid; the MLP branch adds through the post-attention norm.
  float* dh2 = zeroed(dh2_, {N, H});
  if (moe_)
    moe_->backward(dx_out, dh2, aux, d_aux);
  else
    dense_->backward(dx_out, dh2);
  float* dx_mid = buffer(dx_mid_, {N, H});
  for (int64_t i = 0; i < N * H; ++i) dx_mid[i] = dx_out[i];
  rmsnorm_backward(dx_mid, wt_.g("post_attention_layernorm"), dh2, x_mid_.f32(), wt_.w("post_attention_layernorm"),
                   rstd2_.f32(), N, H);
  float* dh1 = zeroed(dh1_, {N, H});
  if (attention_)
    attention_->backward(dx_mid, dh1);
  else
    deltanet_->backward(dx_mid, dh1);
  for (int64_t i = 0; i < N * H; ++i) dx_in[i] += dx_mid[i];
  rmsnorm_backward(dx_in, wt_.g("input_layernorm"), dh1, x_in_, wt_.w("input_layernorm"), rstd1_.f32(), N, H);
}

}  // namespace nextron
