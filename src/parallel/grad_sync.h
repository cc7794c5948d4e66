// Completing the gradients over the tensor-parallel group after backward (before the data-parallel reduction).
// Split parameters need nothing; a replicated parameter whose gradient each rank computed from its slice only
// (per-head norms always; residual-stream norms under sequence parallelism: ParamSpec::tp_grad) is summed over the
// TP group, and a KV head replicated over several TP ranks is summed over the ranks holding it. One all-reduce.
#pragma once

#include <vector>

#include "comm/tensor_parallel.h"
#include "parallel/tp_shard.h"

namespace nextron {

class TpGradSync {
 public:
  // ops: the backend the gradients live on (not owned; must outlive this).
  TpGradSync(const TpShardMap& map, const TensorParallel& tp, Ops& ops);
  // grads: the local flat gradient buffer (map.local_table() layout), on the backend's device.
  void run(Tensor& grads);
  // Elements exchanged per call (0 when nothing needs completing).
  int64_t elements() const { return total_; }

 private:
  struct Item {
    int64_t local_offset, count;  // local elements
    int64_t packed_offset;        // where they go in the packed buffer
  };
  TensorParallel tp_;
  Ops* ops_;
  std::vector<Item> items_;
  int64_t total_ = 0;
  Tensor packed_;  // (total_) f32 on the backend's device
};

}  // namespace nextron
