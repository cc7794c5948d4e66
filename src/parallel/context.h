// The parallel context of one rank: the validated layout, every communicator of its groups (MPI for host buffers,
// and the device ones, NCCL, for buffers on the GPU), the layers it holds, and what the model and the optimizer need
// from them. Built collectively by every rank of the world at start-up; modules only receive handles.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "model/config.h"
#include "model/model.h"
#include "parallel/layout.h"
#include "parallel/tp_shard.h"

namespace nextron {

// Makes a communicator over device memory (NCCL) with the members of an MPI group. Empty: the run is on the host.
using DeviceCommFactory = std::function<std::unique_ptr<Communicator>(Communicator& mpi)>;

// The layout a ParallelContext of `world_size` ranks would build, with every check it makes (Layout's and those of
// the model's parallel code: CP chunks against the conv context, ETP, SP divisibility, attention_bias under TP),
// without communication; throws nextron::Error listing each violated rule. config.experts_folded must be what the
// trainer sets (ETP 1 under TP for a MoE model). The layout planner (plan/planner.h) calls it too.
Layout checked_layout(int world_size, const ParallelSizes& sizes, bool sequence_parallel, const ModelConfig& config,
                      int64_t seq_len);

class ParallelContext {
 public:
  // Collective over `world` (not owned; must outlive the context). Every rank validates the same layout, so a bad
  // layout throws the same message on every rank without any communication. Parallelisms whose layers come in
  // later work (an ETP other than TP) are refused with a message saying so. device: builds the device groups
  // (TP, CP, DP x CP, PP, EP, EDP) when the model lives on a GPU.
  ParallelContext(Communicator& world, const ParallelSizes& sizes, bool sequence_parallel, const ModelConfig& config,
                  int64_t seq_len, const DeviceCommFactory& device = {});

  const Layout& layout() const { return layout_; }
  int rank() const { return world_.rank(); }
  bool sequence_parallel() const { return sp_; }
  // The groups over host memory (MPI).
  Communicator& world() const { return world_; }
  Communicator& tp() const { return *tp_; }
  Communicator& dp() const { return *dp_; }
  Communicator& pp() const { return *pp_; }
  Communicator& ep() const { return *ep_; }    // expert parallel (the ranks sharing tokens for their experts)
  Communicator& edp() const { return *edp_; }  // expert data parallel (replicas of the same experts)
  Communicator& cp() const { return *cp_; }    // context parallel (the slices of the same sequences)
  // DP x CP: the ranks holding the same parameters with different tokens, over which the dense gradients and the
  // loss reduce (DP itself when CP is 1).
  Communicator& dp_cp() const { return *dp_cp_; }
  int cp_rank() const { return cp_->rank(); }
  int tp_rank() const { return tp_->rank(); }
  int dp_rank() const { return dp_->rank(); }
  int pp_rank() const { return pp_->rank(); }
  // The groups over the model's memory: the device communicators when the context was built with a factory, else
  // the host ones.
  Communicator& tp_device() const { return tp_dev_ ? *tp_dev_ : *tp_; }
  Communicator& dp_device() const { return dp_dev_ ? *dp_dev_ : *dp_; }
  Communicator& cp_device() const { return cp_dev_ ? *cp_dev_ : *cp_; }
  Communicator& dp_cp_device() const { return dp_cp_dev_ ? *dp_cp_dev_ : *dp_cp_; }
  Communicator& pp_device() const { return pp_dev_ ? *pp_dev_ : *pp_; }
  Communicator& ep_device() const { return ep_dev_ ? *ep_dev_ : *ep_; }
  // The group the routed experts' gradients reduce over: EDP under expert parallelism or folding, else DP itself.
  Communicator& edp_device() const { return own_expert_group() ? (edp_dev_ ? *edp_dev_ : *edp_) : dp_cp_device(); }
  // Whether the routed experts reduce over another group than the dense parameters (EP > 1, or folded experts).
  bool own_expert_group() const { return ep_->size() > 1 || (layout_.etp() != layout_.tp()); }

  // This rank's model chunks (one, or VPP under the interleaved schedule): chunk c is virtual stage c * PP + pp_rank.
  int num_chunks() const { return static_cast<int>(chunks_.size()); }
  const StageRange& chunk(int c) const { return chunks_.at(c); }
  // Chunk c's TP slice of the whole model's parameters.
  const TpShardMap& shard_map(int c = 0) const { return maps_.at(c); }
  const ParamTable& full_table() const { return maps_.front().full_table(); }
  // What the model needs: the TP group over the model's memory (with the SP flag) and the DP group (host statistics).
  ModelComms model_comms() const;
  // The whole model's flat buffer (full_table layout) from this rank's local buffers, one per chunk, that are
  // complete on this rank and the same on every DP replica (parameters; gathered moments): every element is
  // written by exactly one rank and the world sums, so the result is exact. Returned on every rank (one world
  // all-reduce of the full size).
  std::vector<float> gather_full(const std::vector<const float*>& chunk_locals) const;
  // full -> chunk c's local elements.
  void scatter(int c, const float* full, float* local) const { maps_.at(c).scatter(full, local); }

 private:
  Communicator& world_;
  Layout layout_;
  bool sp_;
  std::unique_ptr<Communicator> tp_, dp_, pp_, ep_, edp_, cp_, dp_cp_;
  std::unique_ptr<Communicator> tp_dev_, dp_dev_, pp_dev_, ep_dev_, edp_dev_, cp_dev_, dp_cp_dev_;
  std::vector<StageRange> chunks_;
  std::vector<TpShardMap> maps_;
};

}  // namespace nextron
