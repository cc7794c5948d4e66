#include "comm/pipeline_p2p.h"

#include "core/error.h"

namespace nextron {

namespace {
const char* memory_name(Device d) { return d == Device::cuda ? "GPU" : "host"; }
}  // namespace

const char* pipe_tensor_name(PipeTensor kind) {
  switch (kind) {
    case PipeTensor::activation:
      return "activation";
    case PipeTensor::activation_aux:
      return "router statistics (forward)";
    case PipeTensor::gradient:
      return "gradient";
    case PipeTensor::gradient_aux:
      return "router statistics (backward)";
  }
  return "?";
}

void PipelineP2P::exchange(const std::vector<PipeMessage>& messages) {
  if (messages.empty()) return;
  NEXTRON_CHECK(pp_ && pp_->size() > 1, "pipeline exchange of ", messages.size(),
                " messages with one pipeline stage (internal: the schedule must not communicate at PP 1)");
  std::vector<P2PMessage> batch;
  batch.reserve(messages.size());
  for (const PipeMessage& m : messages) {
    NEXTRON_CHECK(m.tensor != nullptr && m.tensor->numel() > 0, "pipeline ", m.send ? "send" : "receive", " of the ",
                  pipe_tensor_name(m.kind), " to/from rank ", m.peer, " has no tensor");
    NEXTRON_CHECK(m.peer != rank() && m.peer >= 0 && m.peer < size(), "pipeline ", m.send ? "send" : "receive",
                  " of the ", pipe_tensor_name(m.kind), ": peer ", m.peer, " is not another rank of the ", size(),
                  " pipeline ranks");
    NEXTRON_CHECK(m.tensor->device() == pp_->buffer_device(), "pipeline ", pipe_tensor_name(m.kind), " lives in ",
                  memory_name(m.tensor->device()), " memory but the pipeline communicator moves ",
                  memory_name(pp_->buffer_device()), " memory");
    batch.push_back({m.send, m.tensor->raw(), m.tensor->numel(), m.tensor->dtype(), m.peer, static_cast<int>(m.kind)});
  }
  pp_->batch_send_recv(batch);
}

}  // namespace nextron
