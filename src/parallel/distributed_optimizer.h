// ZeRO-1 data parallelism over flat buffers: each data-parallel (DP) rank owns a contiguous slice (its shard) of the
// local flat layout and keeps AdamW's fp32 moments for that slice only, so optimizer memory per rank falls as 1/DP.
// A step: reduce-scatter the gradients over DP (each rank receives the sum of its shard), clip with the global norm
// (partial sums of squares all-reduced over the whole world), AdamW on the shard, all-gather the parameters.
// With one DP rank (dp == nullptr) the shard is the whole buffer and no communication happens.
#pragma once

#include <cstdint>
#include <vector>

#include "optim/adamw.h"
#include "parallel/communicator.h"

namespace nextron {

class DistributedOptimizer {
 public:
  // table: the rank's local parameter table. dp: the data-parallel group (not owned; nullptr for one replica).
  DistributedOptimizer(const ParamTable& table, Communicator* dp, const AdamWHyper& h);

  // This rank's slice of the flat layout: [rank * ceil(P / DP), ...) clipped to P.
  FlatRange shard() const { return shard_; }
  int64_t shard_capacity() const { return capacity_; }  // ceil(P / DP): the padded slice every rank exchanges

  // grads[shard] = sum over the DP group of grads[shard] (the rest of grads is left as it was).
  void reduce_scatter_grads(float* grads);
  // Sum of squares of grads over shard ∩ `counted` (sorted local ranges; e.g. TpShardMap::owned_ranges, so that a
  // sum over every rank counts each element of the model once). Deterministic for a fixed layout.
  double shard_sq_sum(const float* grads, const std::vector<FlatRange>& counted) const;
  void scale_shard(float* grads, float s) const;
  // AdamW on params[shard] from grads[shard] with learning rate lr, then params all-gathered over DP.
  void step(float* params, const float* grads, double lr);
  // buf[every rank's shard] = that rank's buf[shard] (parameters after a step; gradients or moments for
  // checkpoints and tests).
  void all_gather(float* buf);

  AdamW& adam() { return adam_; }
  const AdamW& adam() const { return adam_; }

  // Bytes of optimizer state this rank holds (both moments).
  int64_t state_bytes() const { return 2 * shard_.size() * static_cast<int64_t>(sizeof(float)); }

 private:
  Communicator* dp_;
  int64_t total_, capacity_;
  FlatRange shard_;
  AdamW adam_;
  std::vector<float> padded_, mine_;
};

}  // namespace nextron
