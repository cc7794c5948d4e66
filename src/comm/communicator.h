// Communicator: the collectives the parallel trainer needs, over one process group.
// The interface is backend-neutral: buffers live where buffer_device() says (host memory for the MPI
// implementation, the GPU for NCCL's). Every call is collective over the group unless noted (send/recv/send_recv are
// point-to-point), and every member must make the same calls in the same order.
// Counts are elements, not bytes; every call names its element type (DType). In-place use is allowed where noted.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"

namespace nextron {

// One message of a batched point-to-point exchange (Communicator::batch_send_recv), as seen by this rank.
struct P2PMessage {
  bool send = true;  // send `n` elements of `buf` to `peer`, or receive them from `peer` into `buf`
  void* buf = nullptr;
  int64_t n = 0;
  DType dt = DType::f32;
  int peer = 0;
  int tag = 0;  // MPI matches (peer, tag) pairs in posting order; NCCL has no tags and matches per peer in order
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Where the buffers passed to this communicator must live.
  virtual Device buffer_device() const { return Device::cpu; }
  // Whether this communicator moves (and sums) elements of type dt: f32 and f64 everywhere; bf16 (summed in bf16,
  // as Megatron sums its bf16 activations) on NCCL only. A call with another type throws nextron::Error.
  virtual bool supports(DType dt) const { return dt == DType::f32 || dt == DType::f64; }

  // ---- The collectives, on `n` / `count` elements of type dt ----
  // buf[i] = sum over ranks of buf[i] (in place).
  virtual void all_reduce_sum(void* buf, int64_t n, DType dt) = 0;
  // in: size() * count elements (block j goes to rank j); out: count elements, the sum over ranks of block rank().
  virtual void reduce_scatter_sum(const void* in, void* out, int64_t count, DType dt) = 0;
  // in: count elements; out: size() * count elements, block j from rank j.
  virtual void all_gather(const void* in, void* out, int64_t count, DType dt) = 0;
  // Uneven all-to-all: send_counts[j] elements go to rank j (packed in rank order in `send`); recv_counts[j]
  // elements arrive from rank j (packed in rank order in `recv`). Both vectors have size() entries, and
  // send_counts[j] on rank i must equal recv_counts[i] on rank j.
  virtual void all_to_all_v(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                            const std::vector<int64_t>& recv_counts, DType dt) = 0;
  // Point to point (blocking). A matching recv must be posted on `peer` with the same tag.
  virtual void send(const void* buf, int64_t n, DType dt, int peer, int tag) = 0;
  virtual void recv(void* buf, int64_t n, DType dt, int peer, int tag) = 0;
  // Send to `dst` and receive from `src` at once (no deadlock in rings and pipelines).
  virtual void send_recv(const void* send_buf, int64_t send_n, int dst, void* recv_buf, int64_t recv_n, int src,
                         DType dt, int tag) = 0;
  // Posts every message at once and returns when all have completed (torch's batch_isend_irecv + wait; one NCCL
  // group). No message waits for another of the same batch, so two ranks that each send to and receive from the
  // other in one batch cannot deadlock: the pipeline schedules pair their sends and receives this way.
  virtual void batch_send_recv(const std::vector<P2PMessage>& messages) = 0;
  // buf on `root` is copied to every rank.
  virtual void broadcast(void* buf, int64_t n, DType dt, int root) = 0;
  virtual void barrier() = 0;
  // Sub-groups: ranks passing the same color form one communicator, ordered by (key, parent rank).
  // color must be >= 0. Collective over this communicator.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // ---- Typed forms of the same calls (the element type from the pointer) ----
  void all_reduce_sum(float* buf, int64_t n) { all_reduce_sum(buf, n, DType::f32); }
  void all_reduce_sum(double* buf, int64_t n) { all_reduce_sum(buf, n, DType::f64); }
  void reduce_scatter_sum(const float* in, float* out, int64_t count) {
    reduce_scatter_sum(in, out, count, DType::f32);
  }
  void all_gather(const float* in, float* out, int64_t count) { all_gather(in, out, count, DType::f32); }
  void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                    const std::vector<int64_t>& recv_counts) {
    all_to_all_v(send, send_counts, recv, recv_counts, DType::f32);
  }
  void send(const float* buf, int64_t n, int peer, int tag) { send(buf, n, DType::f32, peer, tag); }
  void recv(float* buf, int64_t n, int peer, int tag) { recv(buf, n, DType::f32, peer, tag); }
  void send_recv(const float* send_buf, int64_t send_n, int dst, float* recv_buf, int64_t recv_n, int src, int tag) {
    send_recv(send_buf, send_n, dst, recv_buf, recv_n, src, DType::f32, tag);
  }
  void broadcast(float* buf, int64_t n, int root) { broadcast(buf, n, DType::f32, root); }

 protected:
  // Throws unless supports(dt), naming the call.
  void check_dtype(DType dt, const char* what) const {
    NEXTRON_CHECK(supports(dt), what, ": this communicator does not move ", dtype_name(dt),
                  dt == DType::bf16 ? " (bf16 collectives need a device communicator: NCCL, with --device cuda)" : "");
  }
};

// In a class derived from Communicator: makes the typed forms visible next to the overridden dtype forms.
#define NEXTRON_COMMUNICATOR_TYPED_FORMS  \
  using Communicator::all_reduce_sum;     \
  using Communicator::reduce_scatter_sum; \
  using Communicator::all_gather;         \
  using Communicator::all_to_all_v;       \
  using Communicator::send;               \
  using Communicator::recv;               \
  using Communicator::send_recv;          \
  using Communicator::broadcast

}  // namespace nextron
