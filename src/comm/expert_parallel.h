// The expert-parallel (EP) group as the MoE dispatcher sees it: Megatron's token_dispatch / token_combine, the
// all-to-all pair that moves each token's routed rows to the ranks holding their experts and the expert outputs
// back, each written with its backward beside it. A default-constructed ExpertParallel is EP 1: inactive, and the MoE
// layer runs every expert locally without it.
//
//   pair             forward                                    backward
//   token_dispatch   rows in destination order -> received      gradients of the received rows -> their senders
//   token_combine    expert outputs -> back to their senders    gradients of the returned rows -> the experts
//
// How many rows go to each rank is exchanged first over the host group (one small all-to-all: the one host
// synchronisation of a dispatch), with the local expert of every row; the rows themselves move over the group of the
// model's memory (NCCL for GPU buffers) as (rows, W) Tensors of the activation dtype.
#pragma once

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"
#include "kernels/ops.h"

namespace nextron {

// Rows this rank sends to and receives from each EP rank in one dispatch (the combine runs it in reverse).
struct AllToAllPlan {
  std::vector<int64_t> send_rows, recv_rows;  // (EP) each
  int64_t sent() const;
  int64_t received() const;
};

class ExpertParallel {
 public:
  ExpertParallel() = default;  // EP 1
  // rows: the EP group over the model's memory; host: the same ranks over host memory (not owned; may be the same).
  ExpertParallel(Communicator* rows, Communicator* host);

  int size() const { return host_ ? host_->size() : 1; }
  int rank() const { return host_ ? host_->rank() : 0; }
  bool active() const { return size() > 1; }

  // The plan of a dispatch from the rows this rank sends to each rank, and the ids (a local expert per row, in send
  // order) that travel with them: returns the ids of the rows this rank receives, in receive order.
  std::vector<int32_t> plan(AllToAllPlan& plan, const std::vector<int64_t>& send_rows,
                            const std::vector<int32_t>& send_ids) const;

  // rows (plan.sent(), W) -> received (plan.received(), W), resized.
  void token_dispatch(const Ops& ops, const Tensor& rows, Tensor& received, const AllToAllPlan& plan) const;
  void token_dispatch_backward(const Ops& ops, const Tensor& d_received, Tensor& d_rows,
                               const AllToAllPlan& plan) const;
  // expert_out (plan.received(), W) -> returned (plan.sent(), W), resized.
  void token_combine(const Ops& ops, const Tensor& expert_out, Tensor& returned, const AllToAllPlan& plan) const;
  void token_combine_backward(const Ops& ops, const Tensor& d_returned, Tensor& d_expert_out,
                              const AllToAllPlan& plan) const;

 private:
  // in (sum from, W) -> out (sum to, W): rows from[j] to rank j, to[j] from rank j. Tensors are 2-D (rows, W).
  void exchange(const Ops& ops, const Tensor& in, Tensor& out, const std::vector<int64_t>& from,
                const std::vector<int64_t>& to) const;
  Communicator* rows_ = nullptr;
  Communicator* host_ = nullptr;
};

}  // namespace nextron
