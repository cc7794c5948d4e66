// Point-to-point between pipeline stages, as conjugate pairs: the forward pass sends a stage's output activation to
// the next stage, which receives it as its input; the backward pass sends the gradient of a stage's input back to
// the previous stage, which receives it as the gradient of its output. Megatron's calls (send_forward,
// recv_forward, send_backward, recv_backward and their combinations such as send_forward_recv_backward) are all
// one `exchange` of the messages a schedule puts at one point: posted together and completed together, so two
// neighbours that each send to and receive from the other cannot deadlock (the schedule tables pair them that way,
// parallel/schedule.h).
//
// What travels with a micro-batch's activation (the (Sl, H) local rows: under sequence parallelism the TP rank's
// slice of the sequence) are the MoE router statistics summed so far, count_sum and prob_sum (E each), because the
// load-balancing loss is one sum over every MoE layer of the model; the gradient travels back with the final
// statistics, which every MoE layer's backward needs. Each kind of tensor has its own tag, so the messages of one
// kind between two ranks match in the order they are posted (NCCL matches per peer in order: the schedules post the
// kinds of one exchange in a fixed order on both sides).
//
// At pipeline size 1 there is no peer and every exchange must be empty.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "core/tensor.h"

namespace nextron {

enum class PipeTensor {
  activation,      // a stage's output -> the next stage's input
  activation_aux,  // the router statistics that travel with it
  gradient,        // the gradient of a stage's input -> the previous stage's output gradient
  gradient_aux,    // the final router statistics that travel with it
};
const char* pipe_tensor_name(PipeTensor kind);

struct PipeMessage {
  bool send = true;
  PipeTensor kind = PipeTensor::activation;
  int peer = 0;              // pipeline rank
  Tensor* tensor = nullptr;  // sent from / received into (already shaped; on the communicator's device)
};

class PipelineP2P {
 public:
  // pp: the pipeline-parallel group (not owned; must outlive this); nullptr: one stage.
  explicit PipelineP2P(Communicator* pp = nullptr) : pp_(pp) {}

  int rank() const { return pp_ ? pp_->rank() : 0; }
  int size() const { return pp_ ? pp_->size() : 1; }
  // The neighbours in the pipeline's ring (interleaved schedules wrap from the last rank to the first).
  int next() const { return (rank() + 1) % size(); }
  int prev() const { return (rank() + size() - 1) % size(); }

  // Posts every message, then waits for all (one MPI Waitall / one NCCL group). Throws nextron::Error for a message
  // without a tensor, to this rank itself, or on a communicator whose device does not hold the tensor.
  void exchange(const std::vector<PipeMessage>& messages);

 private:
  Communicator* pp_;
};

}  // namespace nextron
