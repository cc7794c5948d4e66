// Dense SwiGLU MLP (Qwen3NextMLP): down_proj(silu(gate_proj x) * up_proj x), with [gate_proj; up_proj] packed
// into one (2I, H) parameter so a single GEMM feeds the SwiGLU. Also the shared expert of the MoE block.
#pragma once

#include <memory>

#include "kernels/ops.h"
#include "model/module.h"

namespace nextron {

class SwiGluMlp {
 public:
  // Buffers that live within one call only, so the MLPs of every layer of one kind (model/decoder.h) share them.
  struct Scratch {
    Tensor dh, dgu;  // backward (N, I), (N, 2I)
  };
  // `weights` selects the parameters ("mlp." or "mlp.shared_expert."); scratch: shared buffers (nullptr: its own).
  SwiGluMlp(ModuleWeights weights, int64_t hidden, int64_t intermediate, Ops& ops,
            std::shared_ptr<Scratch> scratch = nullptr);
  // What backward needs from one forward: one record per micro-batch in flight, owned by the caller.
  struct Saved {
    Tensor x;   // (N, H) the input (a view: the caller keeps it alive until backward)
    Tensor gu;  // (N, 2I) per row [gate | up]
    Tensor h;   // (N, I) silu(gate) * up
  };
  // x: (N, H); y: (N, H) overwritten.
  void forward(Saved& s, const Tensor& x, Tensor& y);
  // Accumulates into dx (N, H) and the parameter gradients.
  void backward(const Saved& s, const Tensor& dy, Tensor& dx);

 private:
  ModuleWeights wt_;
  int64_t H_, I_;
  Ops& ops_;
  std::shared_ptr<Scratch> sc_;
  Tensor &dh_ = sc_->dh, &dgu_ = sc_->dgu;
};

}  // namespace nextron
