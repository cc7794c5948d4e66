#include "model/mlp.h"

namespace nextron {

SwiGluMlp::SwiGluMlp(ModuleWeights weights, int64_t hidden, int64_t intermediate, Ops& ops,
                     std::shared_ptr<Scratch> scratch)
    : wt_(std::move(weights)),
      H_(hidden),
      I_(intermediate),
      ops_(ops),
      sc_(scratch ? std::move(scratch) : std::make_shared<Scratch>()) {}

void SwiGluMlp::forward(Saved& s, const Tensor& x, Tensor& y) {
  const int64_t N = x.numel() / H_;
  s.x = x;
  Tensor& gu = ops_.act(s.gu, {N, 2 * I_});  // per row [gate (I) | up (I)]
  ops_.linear_forward(gu, x, wt_.p("gate_up_proj"), nullptr);
  Tensor& h = ops_.act(s.h, {N, I_});
  ops_.swiglu_forward(h, gu);
  ops_.linear_forward(y, h, wt_.p("down_proj"), nullptr);
}

void SwiGluMlp::backward(const Saved& s, const Tensor& dy, Tensor& dx) {
  const int64_t N = s.x.numel() / H_;
  Tensor& dh = ops_.act_zeroed(dh_, {N, I_});
  ops_.linear_backward(&dh, wt_.p("down_proj"), nullptr, dy, s.h);
  Tensor& dgu = ops_.act_zeroed(dgu_, {N, 2 * I_});
  ops_.swiglu_backward(dgu, dh, s.gu);
  ops_.linear_backward(&dx, wt_.p("gate_up_proj"), nullptr, dgu, s.x);
}

}  // namespace nextron
