// The parallel context of one rank: the validated layout, the communicators of its groups, and what the model and
// the optimizer need from them. Built collectively by every rank of the world at start-up.
#pragma once

#include <memory>

#include "model/config.h"
#include "model/model.h"
#include "comm/communicator.h"
#include "parallel/layout.h"
#include "parallel/tp_shard.h"

namespace nextron {

class ParallelContext {
 public:
  // Collective over `world` (not owned; must outlive the context). Every rank validates the same layout, so a bad
  // layout throws the same message on every rank without any communication. Parallelisms whose layers come in
  // later work (PP, CP, EP, an ETP other than TP) are refused with a message saying so.
  ParallelContext(Communicator& world, const ParallelSizes& sizes, bool sequence_parallel, const ModelConfig& config,
                  int64_t seq_len);

  const Layout& layout() const { return layout_; }
  int rank() const { return world_.rank(); }
  bool sequence_parallel() const { return sp_; }
  Communicator& world() const { return world_; }
  Communicator& tp() const { return *tp_; }
  Communicator& dp() const { return *dp_; }
  int tp_rank() const { return tp_->rank(); }
  int dp_rank() const { return dp_->rank(); }
  const TpShardMap& shard_map() const { return map_; }
  // What the model needs: the TP group (with the SP flag) and the DP group.
  ModelComms model_comms() const;
  // The whole model's flat buffer (full_table layout) from a local buffer that is complete on this rank and the
  // same on every DP replica (parameters; gathered moments): every element is written by exactly one rank and the
  // world sums, so the result is exact. Returned on every rank (one world all-reduce of the full size).
  std::vector<float> gather_full(const float* local) const;

 private:
  Communicator& world_;
  Layout layout_;
  bool sp_;
  std::unique_ptr<Communicator> tp_, dp_;
  TpShardMap map_;
};

}  // namespace nextron
