// Parallel layout: how the ranks of one job are arranged into Megatron-style process groups.
//
// Two grids over the same world (docs/parallel.md):
//   dense grid   TP x CP x DP x PP     rank = tp + TP*(cp + CP*(dp + DP*pp))
//   expert grid  ETP x EP x EDP x PP   rank = etp + ETP*(ep + EP*(edp + EDP*pp))
// i.e. Megatron's order "tp-cp-ep-dp-pp" (tp fastest-varying, pp slowest), with DP = world / (TP*CP*PP) and
// EDP = world / (ETP*EP*PP). Both grids put pp slowest over the same world, so their PP groups are identical.
// A Layout is pure arithmetic (no communication); it validates the sizes against the model at construction.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "comm/context_parallel.h"
#include "model/config.h"
#include "parallel/pipeline_layout.h"

namespace nextron {

struct ParallelSizes {
  int tp = 1;                          // tensor parallel (--tensor-model-parallel-size)
  int pp = 1;                          // pipeline parallel (--pipeline-model-parallel-size)
  int cp = 1;                          // context parallel (--context-parallel-size)
  CpOrder cp_order = CpOrder::zigzag;  // which chunks of a sequence each CP rank holds (--context-parallel-order)
  int ep = 1;                          // expert parallel (--expert-model-parallel-size)
  int etp = 1;                         // expert tensor parallel (--expert-tensor-parallel-size)
  int dp = 0;   // data parallel: derived (world / (tp*cp*pp)); 0 on input, or the derived value to cross-check
  int vpp = 1;  // model chunks per pipeline rank (--virtual-pipeline-model-parallel-size): the interleaved schedule
  PipelineSplit pipeline;  // uneven stages (parallel/pipeline_layout.h); a layout string sets vpp
};

// A rank's position in the dense grid.
struct DenseCoord {
  int tp = 0, cp = 0, dp = 0, pp = 0;
  bool operator==(const DenseCoord&) const = default;
};

// A rank's position in the expert grid.
struct ExpertCoord {
  int etp = 0, ep = 0, edp = 0, pp = 0;
  bool operator==(const ExpertCoord&) const = default;
};

// Process groups. Each partitions the world; a rank belongs to exactly one group of each kind.
enum class Group {
  tp,              // dense grid: ranks differing only in tp
  cp,              // dense grid: only in cp
  dp,              // dense grid: only in dp (gradient all-reduce when CP = 1)
  pp,              // only in pp (the same in both grids)
  tp_cp,           // dense grid: tp and cp (Megatron "tp-cp")
  dp_cp,           // dense grid: dp and cp (Megatron "dp-cp": dense gradient reduction when CP > 1)
  model_parallel,  // dense grid: tp and pp (Megatron "tp-pp": the ranks holding one full model replica)
  ep,              // expert grid: only in ep
  etp,             // expert grid: only in etp
  edp,             // expert grid: only in edp (expert gradient all-reduce)
};

const char* group_name(Group g);
// Every Group value, in declaration order.
const std::vector<Group>& all_group_kinds();

class Layout {
 public:
  // Validates `sizes` against the world size, the model and the sequence length; throws nextron::Error listing
  // every violated constraint (one line each, naming the constraint and the fix).
  Layout(const ParallelSizes& sizes, int world_size, const ModelConfig& config, int64_t seq_len);

  int world_size() const { return world_; }
  // The sizes with dp filled in.
  const ParallelSizes& sizes() const { return sizes_; }
  int tp() const { return sizes_.tp; }
  int cp() const { return sizes_.cp; }
  int pp() const { return sizes_.pp; }
  int vpp() const { return sizes_.vpp; }
  int dp() const { return sizes_.dp; }
  int ep() const { return sizes_.ep; }
  int etp() const { return sizes_.etp; }
  int edp() const { return edp_; }

  DenseCoord dense_coord(int rank) const;
  ExpertCoord expert_coord(int rank) const;
  int dense_rank(const DenseCoord& c) const;
  int expert_rank(const ExpertCoord& c) const;

  // The member ranks of `rank`'s group of kind `g`, in group-rank order (the fastest-varying dimension first).
  std::vector<int> group(Group g, int rank) const;
  // All groups of kind `g`, ordered by their smallest rank; together they partition [0, world).
  std::vector<std::vector<int>> all_groups(Group g) const;
  // Index of `rank`'s group among all_groups(g): a split color that is the same on every member.
  int group_index(Group g, int rank) const;
  // Position of `rank` within its group (a split key).
  int rank_in_group(Group g, int rank) const;
  int group_size(Group g) const;

  // A one-line description, e.g. "world 16 = TP 2 x CP 1 x DP 4 x PP 2; experts ETP 1 x EP 4 x EDP 2 x PP 2".
  std::string describe() const;

 private:
  void check_rank(int rank) const;

  ParallelSizes sizes_;
  int world_ = 0;
  int edp_ = 0;
};

}  // namespace nextron
