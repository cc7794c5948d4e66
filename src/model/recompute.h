// Activation recomputation (Megatron's --recompute-* options): trade compute for activation memory by keeping less
// of the forward and running parts of it again in backward.
//
//   full      whole decoder layers keep only their input; backward reruns their forward first.
//             uniform: the stage's layers in groups of num_layers, each group keeping only its input
//             block:   the first num_layers layers of each stage (each alone); the others keep everything
//   selective named submodules keep only their inputs (Megatron's --recompute-modules names):
//             core_attn       the mixer's core: attention's softmax(q k^T) v (output and lse), or the DeltaNet
//                             delta rule with its q/k L2 norms (qn, kn and the output), rerun on the kept q, k, v
//             layernorm       both norms of every layer: their outputs and SP gathers
//             mlp             the dense SwiGLU MLP
//             moe             the whole sparse MoE block: router, experts, shared expert
//             moe_act         the routed experts' SwiGLU output (N K, I), recomputed from the kept [gate | up]
//             shared_experts  the shared expert (its projections, activation and output)
//             delta_rule_states  the gated delta rule's intermediates (its chunk states, and on CUDA also the chunks'
//                             W, U, new values: about 5 (B, S, Hv, dv) tensors per DeltaNet layer), which the forward
//                             otherwise keeps so that the backward need not rerun prepare and the state pass (under
//                             core_attn the rerun core keeps them in the layer's scratch instead, unless this is set)
//
// A rerun forward is the same computation on the same input, so the numbers equal the run without recomputation
// (bit for bit on the CPU backend); its router statistics go to a scratch record (the load-balancing loss counts
// each layer once) and routing replay, when on, replays the same choice.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nextron {

struct RecomputeOptions {
  std::string granularity;           // --recompute-granularity: "" (off), "full" or "selective"
  std::string method;                // --recompute-method (full): "uniform" or "block"
  int64_t num_layers = 0;            // --recompute-num-layers (full): layers per group / recomputed layers per stage
  std::vector<std::string> modules;  // --recompute-modules (selective)
  bool active() const { return !granularity.empty(); }
  bool recomputes_module(const std::string& name) const;
  // Throws nextron::Error naming the option and the fix for a value or combination Megatron would refuse, and for
  // a module this build cannot recompute yet.
  void validate() const;
};

// The modules --recompute-modules accepts here.
const std::vector<std::string>& recomputable_modules();

// A stage's decoder layers [begin, end) as consecutive groups; a group with `recompute` keeps only its input.
struct RecomputeGroup {
  int64_t begin = 0, end = 0;
  bool recompute = false;
};
// The groups of a stage of `layers` layers (one group per layer, none recomputed, when full recomputation is off).
std::vector<RecomputeGroup> recompute_groups(const RecomputeOptions& options, int64_t layers);

}  // namespace nextron
