// Communicator: the collectives the parallel trainer needs, over one process group.
// The interface is backend-neutral: buffers live where buffer_device() says (host memory for the MPI
// implementation, the GPU for NCCL's). Every call is collective over the group unless noted (send/recv/send_recv are
// point-to-point), and every member must make the same calls in the same order.
// Counts are elements, not bytes. In-place use is allowed where noted.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"

namespace nextron {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Where the buffers passed to this communicator must live.
  virtual Device buffer_device() const { return Device::cpu; }

  // buf[i] = sum over ranks of buf[i] (in place).
  virtual void all_reduce_sum(float* buf, int64_t n) = 0;
  virtual void all_reduce_sum(double* buf, int64_t n) = 0;
  // in: size() * count elements (block j goes to rank j); out: count elements, the sum over ranks of block rank().
  virtual void reduce_scatter_sum(const float* in, float* out, int64_t count) = 0;
  // in: count elements; out: size() * count elements, block j from rank j.
  virtual void all_gather(const float* in, float* out, int64_t count) = 0;
  // Uneven all-to-all: send_counts[j] elements go to rank j (packed in rank order in `send`); recv_counts[j]
  // elements arrive from rank j (packed in rank order in `recv`). Both vectors have size() entries, and
  // send_counts[j] on rank i must equal recv_counts[i] on rank j.
  virtual void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                            const std::vector<int64_t>& recv_counts) = 0;
  // Point to point (blocking). A matching recv must be posted on `peer` with the same tag.
  virtual void send(const float* buf, int64_t n, int peer, int tag) = 0;
  virtual void recv(float* buf, int64_t n, int peer, int tag) = 0;
  // Send to `dst` and receive from `src` at once (no deadlock in rings and pipelines).
  virtual void send_recv(const float* send_buf, int64_t send_n, int dst, float* recv_buf, int64_t recv_n, int src,
                         int tag) = 0;
  // buf on `root` is copied to every rank.
  virtual void broadcast(float* buf, int64_t n, int root) = 0;
  virtual void barrier() = 0;
  // bf16 buffers (raw bits): the CUDA backend's activations at the tensor-parallel region boundaries, summed in
  // bf16 as Megatron does. Same shapes as the f32 calls above. Only the NCCL communicator has them.
  virtual void all_reduce_sum_bf16(uint16_t* buf, int64_t n) {
    (void)buf, (void)n;
    no_bf16();
  }
  virtual void reduce_scatter_sum_bf16(const uint16_t* in, uint16_t* out, int64_t count) {
    (void)in, (void)out, (void)count;
    no_bf16();
  }
  virtual void all_gather_bf16(const uint16_t* in, uint16_t* out, int64_t count) {
    (void)in, (void)out, (void)count;
    no_bf16();
  }
  // Sub-groups: ranks passing the same color form one communicator, ordered by (key, parent rank).
  // color must be >= 0. Collective over this communicator.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

 private:
  [[noreturn]] static void no_bf16() {
    throw Error("bf16 collectives need a device communicator (NCCL, with --device cuda); this one moves f32 only");
  }
};

}  // namespace nextron
