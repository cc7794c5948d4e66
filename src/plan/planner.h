// The layout planner (nextron-plan, docs/planner.md): for a model, a sequence length, a global batch and a cluster,
// every valid parallel layout with its memory per rank, its communication bytes per optimizer step per process group
// and an estimated step time.
//
// Everything is derived from the product's own closed forms, not from running it:
//   validity      checked_layout (parallel/context.h): Layout's rules and the parallel code's extra ones, plus the
//                 trainer's (global batch a multiple of micro-batch x DP, the interleaved schedule's micro-batch count)
//   parameters    TpShardMap(...).local_table() of each of the rank's pipeline chunks, on the config the trainer builds
//                 (vocabulary padded to a multiple of 128 x TP, experts_folded)
//   activations   activation_record_bytes x the schedule's in-flight records per chunk (+ the pipeline's send buffers)
//   optimizer     ZeRO-1 AdamW: two fp32 moments of ceil(P / DP x CP) (dense) and ceil(P_experts / EDP) (experts
//                 under EP), plus the optimizer's padded exchange buffers
//   bytes         the general form of tests/mpi/test_comm_volume.cpp's formulas (communication_bytes below)
//   time          FLOPs / (peak x efficiency) + bytes / bandwidth per group + pipeline bubble + optimizer
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/recompute.h"
#include "parallel/layout.h"

namespace nextron::plan {

// A cluster: what the time model needs. Read from configs/clusters/*.json (cluster_from_json names the keys).
struct Cluster {
  std::string name;
  int gpus_per_node = 8;
  double memory_bytes = 80.0 * (1ull << 30);  // per accelerator
  double peak_flops = 989e12;                 // dense, training dtype, per accelerator
  double intra_node_bytes_per_s = 450e9;      // per accelerator, per direction (NVLink)
  double inter_node_bytes_per_s = 50e9;       // per accelerator, per direction (InfiniBand)
  double memory_bytes_per_s = 3.35e12;        // HBM: the optimizer step's streaming rate
  Device device = Device::cuda;               // the backend: activation dtype, bf16 weight copy
};
// Keys: name, gpus_per_node, gpu_memory_gib, peak_tflops, intra_node_gbps, inter_node_gbps (GB/s per accelerator
// per direction), hbm_gbps, device ("cuda" | "cpu"). An unknown key or a missing/non-positive value throws
// nextron::Error naming it. `where` names the source in messages.
Cluster cluster_from_json(const std::string& text, const std::string& where);
Cluster load_cluster(const std::string& path);

// The process groups bytes are reported for (parallel/context.h's communicators).
enum class Axis { tp, cp, dp_cp, pp, ep, edp, world };
inline constexpr int kAxes = 7;
const char* axis_name(Axis a);

struct AxisBytes {
  std::array<double, kAxes> bytes{};  // sent by the rank per optimizer step, ring accounting (comm/counting_...)
  double& operator[](Axis a) { return bytes[static_cast<int>(a)]; }
  double operator[](Axis a) const { return bytes[static_cast<int>(a)]; }
  double total() const;
};

// Bytes of accelerator memory a rank holds (tensors; the training run's peak_tensor_bytes).
struct RankMemory {
  int64_t weights = 0;      // fp32 parameters (+ the bf16 copy the GEMMs read on CUDA)
  int64_t grads = 0;        // fp32 gradients
  int64_t optimizer = 0;    // AdamW's two fp32 moments of the ZeRO shard(s)
  int64_t buffers = 0;      // ZeRO's padded exchange buffers, the TP gradient-sync buffer
  int64_t activations = 0;  // in-flight activation records + pipeline send buffers
  // The chunks' buffers outside the records, one copy however many records are in flight (scratch_bytes,
  // model/activation_memory.h: every layer's forward and backward buffers, the recomputed parts' outputs, the EP
  // dispatcher's rows, a fully recomputed group's records), plus the largest buffer a call allocates and frees.
  int64_t scratch = 0;
  int64_t total() const { return weights + grads + optimizer + buffers + activations + scratch; }
};

// What is trained: one model at one sequence length and global batch.
struct Workload {
  ModelConfig config;  // as read from config.json (the planner pads the vocabulary and folds experts itself)
  int64_t seq_len = 4096;
  int64_t global_batch = 1024;
  int64_t vocab_divisible_by = 128;
};

// One layout: the parallel sizes, SP, the micro-batch and the recomputation option.
struct Candidate {
  int world = 1;
  ParallelSizes sizes;  // tp, cp, pp, vpp, ep, etp (0 = TP), cp_order
  bool sequence_parallel = false;
  int64_t micro_batch = 1;
  std::string recompute_name = "none";  // none | selective | full (the named presets of recompute_preset)
  RecomputeOptions recompute;
  std::string describe() const;  // e.g. "TP2 SP CP1 PP4 VPP3 EP32 DP4 mb1 full"
};

// The named recomputation options: "none", "selective" (core_attn layernorm moe_act shared_experts: Megatron's
// common choice), "full" (uniform, one layer per group). Throws naming the choices.
RecomputeOptions recompute_preset(const std::string& name);

// One rank's figures.
struct RankPlan {
  int pp_rank = 0, cp_rank = 0;
  int64_t params = 0;  // local parameter elements (all chunks)
  RankMemory memory;
  AxisBytes bytes;
  double flops = 0;  // training FLOPs of this rank per step (model FLOPs, without recomputation)
  double recompute_flops = 0;
};

struct Plan {
  Candidate layout;
  int dp = 1, edp = 1;
  int64_t microbatches = 1;  // per optimizer step per DP replica
  RankPlan rank0;            // world rank 0 (pp 0, cp 0)
  RankPlan largest;          // the rank with the most memory
  AxisBytes max_bytes;       // per group, the most any rank sends
  bool fits = true;          // largest.memory.total() <= cluster memory
  // Time model (seconds per optimizer step).
  double compute_s = 0, recompute_s = 0, bubble_s = 0, optimizer_s = 0;
  std::array<double, kAxes> comm_s{};
  double step_s = 0, tokens_per_s = 0, mfu = 0;
};

// The model's parameter count, and the active count (K of the E routed experts per token; the rest all counted).
struct ModelSize {
  int64_t total = 0, active = 0;
};
ModelSize model_size(const ModelConfig& config);

// The trainer's config for a layout: vocabulary padded to a multiple of divisible_by x TP, experts_folded.
ModelConfig trainer_config(const Workload& w, const Candidate& c);

// "" when the layout is valid (it would construct in nextron-train), else the reason (every violated rule).
std::string layout_error(const Workload& w, const Candidate& c);

// One rank of a valid layout (pp_rank, cp_rank; TP and EP ranks are symmetric).
RankPlan plan_rank(const Workload& w, const Candidate& c, int pp_rank, int cp_rank, Device device);

// Every figure of a valid layout (throws the layout's error otherwise).
Plan evaluate(const Workload& w, const Candidate& c, const Cluster& cluster, double efficiency);

struct SearchSpace {
  std::vector<int64_t> micro_batches{1};
  std::vector<std::string> recompute{"none", "selective", "full"};
  int max_tp = 8, max_pp = 16, max_cp = 8, max_ep = 64, max_vpp = 4;
};

// Every valid layout of `world` ranks in the space, evaluated, ranked: fitting layouts first, then by estimated step
// time. Layouts with ETP 1 under TP (folded experts) are not enumerated (docs/planner.md).
std::vector<Plan> enumerate(const Workload& w, int world, const SearchSpace& space, const Cluster& cluster,
                            double efficiency);

}  // namespace nextron::plan
