// NCCL implementation of Communicator for the CUDA backend.
//
// Buffers: every pointer passed to an NcclCommunicator is a CUDA device pointer on device() (or managed memory),
// never a host pointer. Shapes and counts are exactly those of Communicator (elements, not bytes); NCCL counts are
// size_t, so unlike MpiCommunicator there is no INT_MAX limit. Negative counts are errors.
//
// Completion: every call enqueues its NCCL work on the communicator's stream. On a stream of its own it then
// synchronises that stream before returning (blocking, like MpiCommunicator: results are visible to the host and
// to every stream afterwards). On the compute backend's stream (create(..., CudaOps::stream()), what the trainer
// does) it returns at once: the kernels that read the result are queued after it on that stream, downloads wait
// for it, and the host never waits for a collective (no stream sync per TP region or ZeRO exchange). barrier()
// always waits. Ordering on entry: work queued earlier on the same stream is finished before the
// collective reads its buffers (the trainer shares CudaOps' stream, so no extra synchronisation is needed); an own
// stream is a blocking (non-cudaStreamNonBlocking) one, so work already queued on the legacy default stream is
// finished first too; data written on any other stream must be synchronised by the caller first
// (cudaStreamSynchronize / an event) before the call.
//
// Point to point: NCCL has no tags, so `tag` is ignored; messages between one pair of ranks match in the order
// they were issued. A blocking send or recv to oneself can never complete and is rejected: use send_recv, which
// issues both halves together.
//
// Errors: every NCCL and CUDA return code is checked and thrown as nextron::Error naming the call and NCCL's or
// CUDA's message. Argument errors are thrown before any NCCL call, so with the same bad arguments on every rank no
// rank is left waiting. A rank that dies mid-collective leaves its peers blocked (NCCL has no timeout here): end
// the job with abort_all.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>

#include "comm/communicator.h"
#include "comm/mpi_communicator.h"

namespace nextron {

class NcclCommunicator : public Communicator {
 public:
  // Collective over `bootstrap`: one NCCL rank per MPI rank, with the same rank numbers and size. Rank 0 creates
  // the NCCL unique id, which travels to the others over MPI; then each rank joins with ncclCommInitRank on
  // `device`. Leaves `device` as the calling thread's current CUDA device (the caller allocates its buffers there).
  // Each rank must use a different GPU (NCCL refuses two ranks of one communicator on the same device). Bad
  // devices are agreed on collectively: if any rank cannot use its device, every rank throws.
  // stream: the stream the collectives are enqueued on (not owned; must outlive this). Pass the compute backend's
  // stream (CudaOps::stream()) so that a collective is ordered after the kernels that wrote its buffers without a
  // host synchronisation; nullptr: a stream of its own (the ordering rule above applies).
  static std::unique_ptr<NcclCommunicator> create(MpiCommunicator& bootstrap, int device,
                                                  cudaStream_t stream = nullptr);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }
  Device buffer_device() const override { return Device::cuda; }
  // Owned by this object; valid until it is destroyed.
  ncclComm_t comm() const { return comm_; }
  cudaStream_t stream() const { return stream_; }

  // f32, f64, bf16 (summed in bf16), i32, i64.
  bool supports(DType) const override { return true; }
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
  // A one-element all-reduce on a device scratch value, then a stream synchronisation.
  void barrier() override;
  // ncclCommSplit (NCCL >= 2.18): ranks ordered by (key, parent rank), as MPI_Comm_split. The new communicator
  // is on the same device and uses the same stream (the caller's, or a new one of its own).
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  // Takes ownership of `comm` (destroyed here even when this constructor throws). external_stream: as create().
  NcclCommunicator(ncclComm_t comm, int device, cudaStream_t external_stream);
  void release() noexcept;
  void check_peer(int peer, const char* what) const;
  // Waits for this communicator's stream and reports NCCL errors raised while it ran.
  void synchronize(const char* what);
  // After a call's NCCL work is enqueued: synchronize() on an own stream; on the compute stream only NCCL's
  // asynchronous error state is checked (no wait).
  void finish(const char* what);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  float* scratch_ = nullptr;  // one device float, zero, for barrier()
  int device_ = 0;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace nextron
