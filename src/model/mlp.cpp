#include "model/mlp.h"

#include "kernels/cpu/linear.h"
#include "kernels/cpu/swiglu.h"

namespace nextron {

using namespace cpu;

SwiGluMlp::SwiGluMlp(ModuleWeights weights, int64_t hidden, int64_t intermediate)
    : wt_(std::move(weights)), H_(hidden), I_(intermediate) {}

void SwiGluMlp::forward(const float* x, float* y, int64_t N) {
  N_ = N;
  x_ = x;
  float* gu = buffer(gu_, {N, 2 * I_});  // per row [gate (I) | up (I)]
  linear_forward<float>(gu, x, wt_.w("gate_up_proj"), nullptr, N, H_, 2 * I_);
  float* h = buffer(h_, {N, I_});
  swiglu_forward(h, gu, N, I_);
  linear_forward<float>(y, h, wt_.w("down_proj"), nullptr, N, I_, H_);
}

void SwiGluMlp::backward(const float* dy, float* dx) {
  const int64_t N = N_;
  float* dh = zeroed(dh_, {N, I_});
  linear_backward<float>(dh, wt_.g("down_proj"), nullptr, dy, h_.f32(), wt_.w("down_proj"), N, I_, H_);
  float* dgu = zeroed(dgu_, {N, 2 * I_});
  swiglu_backward(dgu, dh, gu_.f32(), N, I_);
  linear_backward<float>(dx, wt_.g("gate_up_proj"), nullptr, dgu, x_, wt_.w("gate_up_proj"), N, H_, 2 * I_);
}

}  // namespace nextron
