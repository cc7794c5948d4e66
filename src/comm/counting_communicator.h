// CountingCommunicator: a Communicator that forwards every call to another one and counts what this rank sends, so
// tests and benchmarks can check the communication volume of a layout against its analytic formula, and times the
// calls (nextron-train --log-step-stats: the step's time per process group).
//
// The accounting convention (bytes THIS rank sends per call, b = element size, p = group size, n / c = counts in
// elements as passed to the call). It is the standard bandwidth-optimal (ring) cost, not what the MPI library's
// internal algorithm actually puts on the wire (that depends on the implementation, the message size and the
// transport):
//
//   all_reduce_sum(buf, n)            2 (p - 1) / p * n * b   (ring: reduce-scatter then all-gather of n / p blocks)
//   reduce_scatter_sum(in, out, c)    (p - 1) * c * b         (c: the per-rank output count)
//   all_gather(in, out, c)            (p - 1) * c * b         (c: the per-rank input count)
//   all_to_all_v(send, counts, ...)   sum over j != rank() of counts[j] * b
//   broadcast(buf, n, root)           n * b on the root, 0 elsewhere (a pipelined chain / tree: the root pushes its
//                                     buffer once; forwarding by the other ranks is not counted)
//   send(buf, n, ...)                 n * b
//   send_recv(send_buf, send_n, ...)  send_n * b
//   batch_send_recv(messages)         sum of n * b over the messages this rank sends (one call per batch)
//   recv, barrier, split              0 bytes (calls are counted)
//
// A group of one rank sends nothing: every call on it counts 0 bytes (its calls are still counted). All-reduce bytes
// are fractional in general, so bytes are doubles (exact for the counts that occur: integers times 2(p-1)/p).
//
// Two tallies: own() counts the calls made on this communicator only (one process group); volume() is shared by a
// communicator and every communicator split() from it (and their splits), so the world's volume() is everything the
// rank sent over all its groups.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.h"

namespace nextron {

enum class CommOp : int {
  all_reduce,
  reduce_scatter,
  all_gather,
  all_to_all,
  send,
  recv,
  send_recv,
  batch_send_recv,
  broadcast,
  barrier,
  split
};
constexpr int kNumCommOps = 11;
const char* comm_op_name(CommOp op);

// Calls and bytes sent per kind of operation.
struct CommVolume {
  std::array<int64_t, kNumCommOps> calls{};
  std::array<double, kNumCommOps> bytes{};
  double seconds = 0;  // wall-clock time spent in the calls (waiting for the peers included)

  void add(CommOp op, double sent_bytes) {
    ++calls[static_cast<int>(op)];
    bytes[static_cast<int>(op)] += sent_bytes;
  }
  int64_t calls_of(CommOp op) const { return calls[static_cast<int>(op)]; }
  double bytes_of(CommOp op) const { return bytes[static_cast<int>(op)]; }
  double total_bytes() const;
  int64_t total_calls() const;
  void reset() { *this = CommVolume{}; }
  // "all_reduce 12 calls 3072 B, all_gather ..." (kinds with no calls left out).
  std::string describe() const;
};

class CountingCommunicator : public Communicator {
 public:
  // Wraps `inner` (not owned; must outlive this). `volume`: the shared tally to add to (a new one when null).
  explicit CountingCommunicator(Communicator& inner, std::shared_ptr<CommVolume> volume = nullptr);
  // Owns `inner` (what split() returns).
  CountingCommunicator(std::unique_ptr<Communicator> inner, std::shared_ptr<CommVolume> volume);

  // This rank's sends over this communicator and all communicators split from it.
  const std::shared_ptr<CommVolume>& volume() const { return volume_; }
  // This rank's sends over this communicator alone.
  const CommVolume& own() const { return own_; }
  // Zeroes own() (volume() is reset through the shared CommVolume).
  void reset_own() { own_.reset(); }
  // The wrapped communicator.
  Communicator& inner() const { return *inner_; }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  Device buffer_device() const override { return inner_->buffer_device(); }

  bool supports(DType dt) const override { return inner_->supports(dt); }

  NEXTRON_COMMUNICATOR_TYPED_FORMS;
  void all_reduce_sum(void* buf, int64_t n, DType dt) override;
  void reduce_scatter_sum(const void* in, void* out, int64_t count, DType dt) override;
  void all_gather(const void* in, void* out, int64_t count, DType dt) override;
  void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                    const std::vector<int64_t>& recv_counts, DType dt) override;
  void send(const void* buf, int64_t n, DType dt, int peer, int tag) override;
  void recv(void* buf, int64_t n, DType dt, int peer, int tag) override;
  void send_recv(const void* send_buf, int64_t send_n, int dst, void* recv_buf, int64_t recv_n, int src, DType dt,
                 int tag) override;
  void batch_send_recv(const std::vector<P2PMessage>& messages) override;
  void broadcast(void* buf, int64_t n, DType dt, int root) override;
  void barrier() override;
  // The child wraps the inner communicator's split and adds to the same volume().
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  // Adds the wall-clock time from its construction to its destruction (the forwarded call) to own() and volume().
  class CallTimer {
   public:
    explicit CallTimer(CountingCommunicator& owner) : owner_(owner), start_(std::chrono::steady_clock::now()) {}
    CallTimer(const CallTimer&) = delete;
    CallTimer& operator=(const CallTimer&) = delete;
    ~CallTimer();

   private:
    CountingCommunicator& owner_;
    std::chrono::steady_clock::time_point start_;
  };
  // Counts one call; the returned timer times it.
  CallTimer count(CommOp op, double sent_bytes);

  std::unique_ptr<Communicator> owned_;
  Communicator* inner_;
  std::shared_ptr<CommVolume> volume_;
  CommVolume own_;
};

}  // namespace nextron
