// Tensor-parallel (pipeline, expert-parallel) sharding of the parameters: which elements of the full (single-device,
// whole-model) flat layout each rank holds in its local flat layout: its TP slice of the parameters of its pipeline
// stage. Derived from the parameter table alone (tp_dim, tp_parts, tp_unit), so the optimizer, checkpoints, the HF
// converter and the equivalence tests all shard and gather the same way.
//
// A TP rank's local model is the single-device model of a smaller config (tp_local_config, model/config.h), so its
// local ParamTable has the local shapes in the same order as the full table.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/config.h"
#include "model/param_table.h"
#include "model/stage.h"
#include "optim/adamw.h"

namespace nextron {

// A contiguous run of elements: full flat [full_offset, +count) is local flat [local_offset, +count).
struct TpRun {
  int64_t full_offset = 0;
  int64_t local_offset = 0;
  int64_t count = 0;
  // This rank is the one TP rank that stands for these elements when the ranks' copies are combined (replicated
  // parameters: TP rank 0; replicated KV heads: the first rank holding the head; split parameters: always).
  bool owner = true;
  bool expert = false;  // a routed expert's elements (ParamKind::expert): replicated over EDP, not DP
};

class TpShardMap {
 public:
  // stage: the layers this rank's model holds (the whole model by default); full_table() is always the whole
  // model's, local_table() the stage's TP slice.
  // A padded vocabulary (full_config.padded_vocab_size) pads the local embedding and lm_head; full_table() stays
  // the unpadded model's, so padded rows belong to no run (scatter leaves them as they are, zero).
  // Under expert parallelism (ep_size > 1) the rank holds routed experts [ep_rank El, +El) (ep_local_config), each
  // split over TP like the dense MLP (ETP = TP).
  TpShardMap(const ModelConfig& full_config, int tp_rank, int tp_size, const StageRange& stage = {}, int ep_rank = 0,
             int ep_size = 1);

  int tp_rank() const { return rank_; }
  int tp_size() const { return size_; }
  const ModelConfig& full_config() const { return full_config_; }
  const ModelConfig& local_config() const { return local_config_; }
  const ParamTable& full_table() const { return full_; }
  const ParamTable& local_table() const { return local_; }
  // Every local element appears in exactly one run; runs are in local order.
  const std::vector<TpRun>& runs() const { return runs_; }

  // local = this rank's elements of full (full_table().total_numel() -> local_table().total_numel()).
  void scatter(const float* full, float* local) const;
  // full[owned elements] = local: with every rank writing into a zero-filled full buffer, the sum over TP ranks is
  // the full parameter set (each element written by exactly one rank).
  // dense / experts: which parameters to place (the data-parallel replicas of each kind differ under EP).
  void place_owned(const float* local, float* full, bool dense = true, bool experts = true) const;
  // Fills this rank's elements without the whole model: fill(full_spec, first, count, out) is called once per run
  // and writes elements [first, first + count) of that full parameter (single-device order) to out. Padded
  // vocabulary rows are left as they are.
  void fill_local(
      float* local,
      const std::function<void(const ParamSpec& full, int64_t first, int64_t count, float* out)>& fill) const;
  // The same for the full elements [begin, begin + count) only: out[i] = full element begin + i where this rank owns it
  // (others untouched). For streaming one tensor at a time.
  void place_owned_range(const float* local, int64_t begin, int64_t count, float* out, bool dense, bool experts) const;
  // full[every element this rank holds] = local.
  void place_all(const float* local, float* full) const;
  // The local flat ranges this rank owns (sorted, merged): a sum over these on every rank counts each element of the
  // full model once (the global gradient norm).
  const std::vector<FlatRange>& owned_ranges() const { return owned_; }

 private:
  ModelConfig full_config_, local_config_;
  int rank_, size_;
  ParamTable full_, local_;
  std::vector<TpRun> runs_;
  std::vector<FlatRange> owned_;
  std::vector<FlatRange> padding_;  // local ranges of padded vocabulary rows and alignment gaps (in no run)
};

}  // namespace nextron
