// ZeRO-1 data parallelism over flat buffers: each data-parallel (DP) rank owns a contiguous slice (its shard) of the
// local flat layout and keeps AdamW's fp32 moments for that slice only, so optimizer memory per rank falls as 1/DP.
// A step: reduce-scatter the gradients over DP (each rank receives the sum of its shard), clip with the global norm
// (partial sums of squares all-reduced over the whole world), AdamW on the shard, all-gather the parameters.
// With one DP rank (no group) the shard is the whole buffer and no communication happens.
//
// One optimizer serves one reduction group's segment of the flat layout (the whole buffer by default): under expert
// parallelism the trainer runs two, the dense parameters over DP and the routed experts (last in the layout,
// ParamTable::expert_range) over EDP, each sharding its own segment.
//
// The buffers live on the Ops backend's device (host for the CPU backend, the GPU for CUDA): the exchanges run on
// `dp` (MPI over host memory, or NCCL over device memory), the arithmetic through the Ops. Host-side copies for
// checkpoints go through `dp_host` (MPI), which may be the same communicator.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "kernels/ops.h"
#include "optim/adamw.h"

namespace nextron {

class DistributedOptimizer {
 public:
  // table: the rank's local parameter table. dp / dp_host: the data-parallel group for device and host buffers
  // (not owned; nullptr for one replica). ops: the backend holding parameters and gradients.
  // segment: the part of the flat layout this optimizer owns (size 0: the whole of it).
  DistributedOptimizer(const ParamTable& table, Communicator* dp, Communicator* dp_host, const AdamWHyper& h, Ops& ops,
                       FlatRange segment = {});

  FlatRange segment() const { return segment_; }
  // This rank's slice of the segment: segment.begin + [rank * ceil(S / DP), ...) clipped to the segment's S elements.
  FlatRange shard() const { return shard_; }
  int64_t shard_capacity() const { return capacity_; }  // ceil(S / DP): the padded slice every rank exchanges

  // grads[shard] = sum over the DP group of grads[shard] (the rest of the segment is left as it was; the rest of the
  // buffer is not touched).
  void reduce_scatter_grads(Tensor& grads);
  // Sum of squares of grads over shard ∩ `counted` (sorted local ranges; e.g. TpShardMap::owned_ranges, so that a
  // sum over every rank counts each element of the model once). Deterministic for a fixed layout.
  double shard_sq_sum(const Tensor& grads, const std::vector<FlatRange>& counted) const;
  void scale_shard(Tensor& grads, float s) const;
  // AdamW on params[shard] from grads[shard] with learning rate lr, then params all-gathered over DP; params_act
  // (may be nullptr) is the activation-dtype copy of params, refreshed for the whole buffer.
  void step(Tensor& params, const Tensor& grads, double lr, Tensor* params_act);
  // buf[every rank's shard] = that rank's buf[shard], for a device buffer (parameters after a step), within the
  // segment ...
  void all_gather(Tensor& buf);
  // ... and for a host buffer of the full flat size (gradients or moments for checkpoints and tests).
  void all_gather_host(float* buf);

  AdamW& adam() { return adam_; }
  const AdamW& adam() const { return adam_; }

  // Bytes of optimizer state this rank holds (both moments).
  int64_t state_bytes() const { return 2 * shard_.size() * static_cast<int64_t>(sizeof(float)); }

 private:
  Communicator* dp_;
  Communicator* dp_host_;
  Ops& ops_;
  FlatRange segment_;
  int64_t total_, capacity_;  // the segment's size S, ceil(S / DP)
  FlatRange shard_;
  AdamW adam_;
  Tensor padded_, mine_;  // exchange buffers on the device
  std::vector<float> padded_host_, mine_host_;
};

}  // namespace nextron
