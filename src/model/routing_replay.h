// Routing replay (Megatron-LM's RouterReplay): one forward records which experts every MoE layer chose for each
// token, and later forwards of the same batch choose exactly those, with routing weights recomputed from their own
// probabilities (router_weights_from_indices) and gradients through the router as usual.
//
// Why: top-k is a discrete choice. Two numerically different runs of one model (bf16 on the GPU against fp32 on
// the CPU, another parallel layout, a recomputed forward) pick different experts for the few tokens whose k-th and
// (k+1)-th probabilities are closer than their rounding error, and each such token's output then differs by O(1).
// Replaying the reference run's choice removes that discontinuity, so what remains is comparable tensor by tensor.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace nextron {

class RoutingReplay {
 public:
  enum class Mode { record, replay };
  explicit RoutingReplay(Mode mode = Mode::record) : mode_(mode) {}
  Mode mode() const { return mode_; }
  void set_mode(Mode mode) { mode_ = mode; }

  // Record mode: the choice of MoE layer `layer` (index in the model), indices (N, K) on the host.
  void record(int64_t layer, std::vector<int32_t> indices, int64_t N, int64_t K);
  // Replay mode: the recorded choice of `layer`, checked against the forward now running (N rows, top-K of E
  // experts); throws nextron::Error naming the mismatch (nothing recorded, another batch shape, an index >= E).
  const std::vector<int32_t>& choice(int64_t layer, int64_t N, int64_t K, int64_t E) const;
  // MoE layers recorded so far.
  int64_t layers_recorded() const { return static_cast<int64_t>(choices_.size()); }

 private:
  struct Choice {
    int64_t N = 0, K = 0;
    std::vector<int32_t> indices;  // (N, K)
  };
  Mode mode_;
  std::map<int64_t, Choice> choices_;
};

}  // namespace nextron
