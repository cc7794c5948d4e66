#include "comm/counting_communicator.h"

#include <chrono>
#include <cstdio>

#include "core/error.h"

namespace nextron {

const char* comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::all_reduce:
      return "all_reduce";
    case CommOp::reduce_scatter:
      return "reduce_scatter";
    case CommOp::all_gather:
      return "all_gather";
    case CommOp::all_to_all:
      return "all_to_all";
    case CommOp::send:
      return "send";
    case CommOp::recv:
      return "recv";
    case CommOp::send_recv:
      return "send_recv";
    case CommOp::batch_send_recv:
      return "batch_send_recv";
    case CommOp::broadcast:
      return "broadcast";
    case CommOp::barrier:
      return "barrier";
    case CommOp::split:
      return "split";
  }
  return "?";
}

double CommVolume::total_bytes() const {
  double s = 0;
  for (double b : bytes) s += b;
  return s;
}

int64_t CommVolume::total_calls() const {
  int64_t s = 0;
  for (int64_t c : calls) s += c;
  return s;
}

std::string CommVolume::describe() const {
  std::string out;
  for (int k = 0; k < kNumCommOps; ++k) {
    if (calls[k] == 0) continue;
    char line[128];
    std::snprintf(line, sizeof(line), "%s%s %lld calls %.0f B", out.empty() ? "" : ", ",
                  comm_op_name(static_cast<CommOp>(k)), static_cast<long long>(calls[k]), bytes[k]);
    out += line;
  }
  return out.empty() ? "no calls" : out;
}

CountingCommunicator::CountingCommunicator(Communicator& inner, std::shared_ptr<CommVolume> volume)
    : inner_(&inner), volume_(volume ? std::move(volume) : std::make_shared<CommVolume>()) {}

CountingCommunicator::CountingCommunicator(std::unique_ptr<Communicator> inner, std::shared_ptr<CommVolume> volume)
    : owned_(std::move(inner)),
      inner_(owned_.get()),
      volume_(volume ? std::move(volume) : std::make_shared<CommVolume>()) {
  NEXTRON_ASSERT(inner_ != nullptr);
}

CountingCommunicator::CallTimer CountingCommunicator::count(CommOp op, double sent_bytes) {
  if (size() <= 1) sent_bytes = 0;  // a group of one sends nothing
  own_.add(op, sent_bytes);
  volume_->add(op, sent_bytes);
  return CallTimer(*this);
}

CountingCommunicator::CallTimer::~CallTimer() {
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  owner_.own_.seconds += s;
  owner_.volume_->seconds += s;
}

namespace {
// Ring all-reduce: each rank sends 2 (p - 1) blocks of n / p elements.
double ring_all_reduce_bytes(int64_t n, int p, size_t elem) {
  return 2.0 * static_cast<double>(p - 1) / static_cast<double>(p) * static_cast<double>(n) * static_cast<double>(elem);
}
}  // namespace

void CountingCommunicator::all_reduce_sum(void* buf, int64_t n, DType dt) {
  const CallTimer timer = count(CommOp::all_reduce, ring_all_reduce_bytes(n, size(), dtype_size(dt)));
  inner_->all_reduce_sum(buf, n, dt);
}

void CountingCommunicator::reduce_scatter_sum(const void* in, void* out, int64_t count_per_rank, DType dt) {
  const CallTimer timer =
      count(CommOp::reduce_scatter, static_cast<double>(size() - 1) * static_cast<double>(count_per_rank) *
                                        static_cast<double>(dtype_size(dt)));
  inner_->reduce_scatter_sum(in, out, count_per_rank, dt);
}

void CountingCommunicator::all_gather(const void* in, void* out, int64_t count_per_rank, DType dt) {
  const CallTimer timer =
      count(CommOp::all_gather, static_cast<double>(size() - 1) * static_cast<double>(count_per_rank) *
                                    static_cast<double>(dtype_size(dt)));
  inner_->all_gather(in, out, count_per_rank, dt);
}

void CountingCommunicator::all_to_all_v(const void* send_buf, const std::vector<int64_t>& send_counts, void* recv_buf,
                                        const std::vector<int64_t>& recv_counts, DType dt) {
  double elems = 0;
  for (size_t j = 0; j < send_counts.size(); ++j)
    if (static_cast<int>(j) != rank()) elems += static_cast<double>(send_counts[j]);
  const CallTimer timer = count(CommOp::all_to_all, elems * static_cast<double>(dtype_size(dt)));
  inner_->all_to_all_v(send_buf, send_counts, recv_buf, recv_counts, dt);
}

void CountingCommunicator::send(const void* buf, int64_t n, DType dt, int peer, int tag) {
  const CallTimer timer = count(CommOp::send, static_cast<double>(n) * static_cast<double>(dtype_size(dt)));
  inner_->send(buf, n, dt, peer, tag);
}

void CountingCommunicator::recv(void* buf, int64_t n, DType dt, int peer, int tag) {
  const CallTimer timer = count(CommOp::recv, 0);
  inner_->recv(buf, n, dt, peer, tag);
}

void CountingCommunicator::send_recv(const void* send_buf, int64_t send_n, int dst, void* recv_buf, int64_t recv_n,
                                     int src, DType dt, int tag) {
  const CallTimer timer = count(CommOp::send_recv, static_cast<double>(send_n) * static_cast<double>(dtype_size(dt)));
  inner_->send_recv(send_buf, send_n, dst, recv_buf, recv_n, src, dt, tag);
}

void CountingCommunicator::batch_send_recv(const std::vector<P2PMessage>& messages) {
  double sent = 0;
  for (const P2PMessage& m : messages)
    if (m.send) sent += static_cast<double>(m.n) * static_cast<double>(dtype_size(m.dt));
  const CallTimer timer = count(CommOp::batch_send_recv, sent);
  inner_->batch_send_recv(messages);
}

void CountingCommunicator::broadcast(void* buf, int64_t n, DType dt, int root) {
  const CallTimer timer =
      count(CommOp::broadcast, rank() == root ? static_cast<double>(n) * static_cast<double>(dtype_size(dt)) : 0.0);
  inner_->broadcast(buf, n, dt, root);
}

void CountingCommunicator::barrier() {
  const CallTimer timer = count(CommOp::barrier, 0);
  inner_->barrier();
}

std::unique_ptr<Communicator> CountingCommunicator::split(int color, int key) {
  const CallTimer timer = count(CommOp::split, 0);
  return std::make_unique<CountingCommunicator>(inner_->split(color, key), volume_);
}

}  // namespace nextron
