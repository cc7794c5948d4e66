#include "model/decoder.h"

#include "kernels/cpu/rmsnorm.h"

namespace nextron {

using namespace cpu;

DecoderLayer::DecoderLayer(const ModelConfig& config, int64_t layer, const ParamTable& table, const Tensor& params,
                           const Tensor& grads, const TensorParallel& tp)
    : c_(config), wt_(table, params, grads, "layers." + std::to_string(layer) + "."), tp_(tp) {
  const std::string p = "layers." + std::to_string(layer) + ".";
  if (config.layer_types[layer] == MixerType::full_attention)
    attention_ = std::make_unique<GatedAttention>(config, ModuleWeights(table, params, grads, p + "self_attn."));
  else
    deltanet_ = std::make_unique<GatedDeltaNet>(config, ModuleWeights(table, params, grads, p + "linear_attn."));
  if (config.mlp_type(layer) == MlpType::sparse_moe)
    moe_ = std::make_unique<SparseMoe>(config, ModuleWeights(table, params, grads, p + "mlp."), tp_);
  else
    dense_ = std::make_unique<SwiGluMlp>(ModuleWeights(table, params, grads, p + "mlp."), config.hidden_size,
                                         config.intermediate_size);
}

void DecoderLayer::forward(const float* x_in, float* x_out, int64_t B, int64_t S, MoeAuxStats& aux) {
  const int64_t N = B * S, Nl = tp_.local_rows(N), H = c_.hidden_size;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  B_ = B;
  S_ = S;
  x_in_ = x_in;
  float* h1 = buffer(h1_, {Nl, H});
  rmsnorm_forward(h1, buffer(rstd1_, {Nl}), x_in, wt_.w("input_layernorm"), Nl, H, eps);
  h1_region_ = tp_.enter_forward(h1, h1_full_, N, H);
  float* mix_region = buffer(mix_region_, {N, H});
  if (attention_)
    attention_->forward(h1_region_, mix_region, B, S);
  else
    deltanet_->forward(h1_region_, mix_region, B, S);
  float* mix = tp_.active() ? buffer(mix_, {Nl, H}) : mix_region;
  tp_.exit_forward(mix_region, mix, N, H);
  float* x_mid = buffer(x_mid_, {Nl, H});
  for (int64_t i = 0; i < Nl * H; ++i) x_mid[i] = x_in[i] + mix[i];
  float* h2 = buffer(h2_, {Nl, H});
  rmsnorm_forward(h2, buffer(rstd2_, {Nl}), x_mid, wt_.w("post_attention_layernorm"), Nl, H, eps);
  h2_region_ = tp_.enter_forward(h2, h2_full_, N, H);
  float* mlp_region = buffer(mlp_region_, {N, H});
  if (moe_)
    moe_->forward(h2_region_, mlp_region, N, aux);
  else
    dense_->forward(h2_region_, mlp_region, N);
  float* mlp = tp_.active() ? buffer(mlp_, {Nl, H}) : mlp_region;
  tp_.exit_forward(mlp_region, mlp, N, H);
  for (int64_t i = 0; i < Nl * H; ++i) x_out[i] = x_mid[i] + mlp[i];
}

const float* DecoderLayer::region_grad_to_local(float* d_region, Tensor& local, int64_t N) {
  if (!tp_.active()) return d_region;
  const int64_t H = c_.hidden_size;
  float* out = zeroed(local, {tp_.local_rows(N), H});
  tp_.enter_backward(d_region, out, dscratch_, N, H);
  return out;
}

void DecoderLayer::backward(const float* dx_out, float* dx_in, const MoeAuxStats& aux, float d_aux) {
  const int64_t N = B_ * S_, Nl = tp_.local_rows(N), H = c_.hidden_size;
  // The residual carries dx_out straight to x_mid; the MLP branch adds through the post-attention norm.
  const float* dmlp = tp_.exit_backward(dx_out, dregion_full_, N, H);
  float* dh2 = zeroed(dh2_, {N, H});
  if (moe_) {
    float* dh2_rep = tp_.active() ? zeroed(dh2_replicated_, {N, H}) : dh2;
    moe_->backward(dmlp, dh2, dh2_rep, aux, d_aux);
  } else {
    dense_->backward(dmlp, dh2);
  }
  const float* dh2_local = region_grad_to_local(dh2, dh2_local_, N);
  if (moe_ && tp_.active()) {
    // The router's and shared-expert gate's input gradient is the same on every TP rank: add it once, after the
    // reduction, for this rank's rows.
    float* d = dh2_local_.f32();
    const float* rep = dh2_replicated_.f32() + tp_.local_row_begin(N) * H;
    for (int64_t i = 0; i < Nl * H; ++i) d[i] += rep[i];
  }
  float* dx_mid = buffer(dx_mid_, {Nl, H});
  for (int64_t i = 0; i < Nl * H; ++i) dx_mid[i] = dx_out[i];
  rmsnorm_backward(dx_mid, wt_.g("post_attention_layernorm"), dh2_local, x_mid_.f32(),
                   wt_.w("post_attention_layernorm"), rstd2_.f32(), Nl, H);
  const float* dmix = tp_.exit_backward(dx_mid, dregion_full_, N, H);
  float* dh1 = zeroed(dh1_, {N, H});
  if (attention_)
    attention_->backward(dmix, dh1);
  else
    deltanet_->backward(dmix, dh1);
  const float* dh1_local = region_grad_to_local(dh1, dh1_local_, N);
  for (int64_t i = 0; i < Nl * H; ++i) dx_in[i] += dx_mid[i];
  rmsnorm_backward(dx_in, wt_.g("input_layernorm"), dh1_local, x_in_, wt_.w("input_layernorm"), rstd1_.f32(), Nl, H);
}

}  // namespace nextron
