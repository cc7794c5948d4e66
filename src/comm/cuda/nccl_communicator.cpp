#include "comm/cuda/nccl_communicator.h"

#include <cstdint>
#include <limits>
#include <string>

#include "core/cuda/check.h"
#include "core/cuda/device.h"
#include "core/error.h"

// split() relies on ncclCommSplit, and error messages on ncclGetLastError.
#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "nextron's NcclCommunicator needs NCCL >= 2.18 (ncclCommSplit): install a newer NCCL"
#endif

namespace nextron {

namespace {

void check_nccl(ncclResult_t rc, const char* call, ncclComm_t comm = nullptr) {
  if (rc == ncclSuccess) return;
  // ncclGetLastError carries the detail (e.g. which GPU is duplicated); ncclGetErrorString only the category.
  const char* last = ncclGetLastError(comm);
  throw Error(detail::concat(call, " failed: ", ncclGetErrorString(rc), " (NCCL error ", static_cast<int>(rc), ")",
                             last && *last ? ": " : "", last ? last : ""));
}

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  throw Error(detail::concat(call, " failed: ", std::string(text, len), " (MPI error ", rc, ")"));
}

size_t to_count(int64_t n, const char* what) {
  NEXTRON_CHECK(n >= 0, what, ": element count ", n, " is negative");
  return static_cast<size_t>(n);
}

// NCCL calls take the device from the communicator, but stream and scratch allocation/free use the current device:
// make ours current for the duration and give the caller's back afterwards (a thread may drive several devices).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    NEXTRON_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) NEXTRON_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Collects the first failure among the calls of an NCCL group: ncclGroupEnd must be called even after a failed
// call inside the group, or the thread's group depth stays unbalanced and every later NCCL call misbehaves.
struct GroupErrors {
  ncclResult_t rc = ncclSuccess;
  const char* call = nullptr;
  void note(ncclResult_t r, const char* name) {
    if (r != ncclSuccess && rc == ncclSuccess) {
      rc = r;
      call = name;
    }
  }
};

}  // namespace

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(MpiCommunicator& bootstrap, int device,
                                                           cudaStream_t stream) {
  // Local checks first, agreed on over MPI: a rank that cannot use its device must not leave the others blocked in
  // ncclCommInitRank, so either every rank goes on or every rank throws.
  std::string local_error;
  try {
    const int count = cuda::device_count();
    NEXTRON_CHECK(count > 0, "NcclCommunicator::create: no CUDA device is visible on this rank");
    NEXTRON_CHECK(device >= 0 && device < count, "NcclCommunicator::create: device ", device,
                  " is outside the visible devices [0, ", count, ") of this rank (check CUDA_VISIBLE_DEVICES)");
    NEXTRON_CUDA_CHECK(cudaSetDevice(device));
  } catch (const Error& e) {
    local_error = e.what();
  }
  int ok = local_error.empty() ? 1 : 0, all_ok = 0;
  check_mpi(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, bootstrap.comm()), "MPI_Allreduce");
  if (!all_ok) {
    throw Error(local_error.empty() ? "NcclCommunicator::create: another rank could not use its CUDA device"
                                    : local_error);
  }

  // Rank 0's ncclGetUniqueId result travels with the id, so its failure is an error on every rank, not a hang.
  struct {
    int rc;
    ncclUniqueId id;
  } root_msg{};
  if (bootstrap.rank() == 0) root_msg.rc = static_cast<int>(ncclGetUniqueId(&root_msg.id));
  check_mpi(MPI_Bcast(&root_msg, static_cast<int>(sizeof(root_msg)), MPI_BYTE, 0, bootstrap.comm()), "MPI_Bcast");
  check_nccl(static_cast<ncclResult_t>(root_msg.rc), "ncclGetUniqueId (on rank 0)");

  ncclComm_t comm = nullptr;
  check_nccl(ncclCommInitRank(&comm, bootstrap.size(), root_msg.id, bootstrap.rank()), "ncclCommInitRank");
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(comm, device, stream));
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, int device, cudaStream_t external_stream)
    : comm_(comm), stream_(external_stream), device_(device) {
  try {
    NEXTRON_CHECK(comm_ != nullptr, "NcclCommunicator: got a null ncclComm_t");
    DeviceGuard guard(device_);
    check_nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank", comm_);
    check_nccl(ncclCommCount(comm_, &size_), "ncclCommCount", comm_);
    if (!stream_) {
      // Default flags (not cudaStreamNonBlocking): ordered after the legacy default stream's work (see the header).
      NEXTRON_CUDA_CHECK(cudaStreamCreate(&stream_));
      owns_stream_ = true;
    }
    NEXTRON_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scratch_), sizeof(float)));
    NEXTRON_CUDA_CHECK(cudaMemset(scratch_, 0, sizeof(float)));  // a sum of zeros stays zero, barrier after barrier
  } catch (...) {
    release();
    throw;
  }
}

NcclCommunicator::~NcclCommunicator() { release(); }

void NcclCommunicator::release() noexcept {
  // Destructors must not throw: failures here are ignored (the process is usually ending anyway).
  int previous = -1;
  if (cudaGetDevice(&previous) == cudaSuccess && previous != device_) cudaSetDevice(device_);
  if (comm_) ncclCommDestroy(comm_);  // waits for operations still in flight
  if (scratch_) cudaFree(scratch_);
  if (stream_ && owns_stream_) cudaStreamDestroy(stream_);
  comm_ = nullptr;
  scratch_ = nullptr;
  stream_ = nullptr;
  if (previous >= 0 && previous != device_) cudaSetDevice(previous);
}

void NcclCommunicator::check_peer(int peer, const char* what) const {
  NEXTRON_CHECK(peer >= 0 && peer < size_, what, ": peer rank ", peer, " is outside the group [0, ", size_, ")");
}

void NcclCommunicator::finish(const char* what) {
  if (owns_stream_) {
    synchronize(what);
    return;
  }
  // On the compute stream: whatever reads the result is queued after the collective on the same stream (or waits
  // for it: a download, a copy on the legacy default stream), so the host does not wait here. Errors NCCL has
  // already seen are reported now, the rest at the next synchronize() or by the next call.
  ncclResult_t async = ncclSuccess;
  check_nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", comm_);
  check_nccl(async, what, comm_);
}

void NcclCommunicator::synchronize(const char* what) {
  const cudaError_t err = cudaStreamSynchronize(stream_);
  NEXTRON_CHECK(err == cudaSuccess, what, ": cudaStreamSynchronize failed: ", cudaGetErrorString(err));
  ncclResult_t async = ncclSuccess;
  check_nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError", comm_);
  check_nccl(async, what, comm_);
}

// Zero counts return before any NCCL call: every rank of a collective passes the same count, so all of them skip,
// and NCCL is never handed the null pointers that empty buffers often are.

namespace {

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::f32:
      return ncclFloat32;
    case DType::f64:
      return ncclFloat64;
    case DType::bf16:
      return ncclBfloat16;
    case DType::i32:
      return ncclInt32;
    case DType::i64:
      return ncclInt64;
  }
  throw Error("NCCL: unknown element type");
}

}  // namespace

void NcclCommunicator::all_reduce_sum(void* buf, int64_t n, DType dt) {
  const ncclDataType_t type = nccl_type(dt);
  const size_t c = to_count(n, "all_reduce_sum");
  if (c == 0) return;
  DeviceGuard guard(device_);
  check_nccl(ncclAllReduce(buf, buf, c, type, ncclSum, comm_, stream_), "ncclAllReduce", comm_);
  finish("ncclAllReduce");
}

void NcclCommunicator::reduce_scatter_sum(const void* in, void* out, int64_t count, DType dt) {
  const ncclDataType_t type = nccl_type(dt);
  const size_t c = to_count(count, "reduce_scatter_sum");
  NEXTRON_CHECK(count <= std::numeric_limits<int64_t>::max() / size_, "reduce_scatter_sum: count ", count,
                " times the group size ", size_, " overflows int64");
  if (c == 0) return;
  DeviceGuard guard(device_);
  check_nccl(ncclReduceScatter(in, out, c, type, ncclSum, comm_, stream_), "ncclReduceScatter", comm_);
  finish("ncclReduceScatter");
}

void NcclCommunicator::all_gather(const void* in, void* out, int64_t count, DType dt) {
  const ncclDataType_t type = nccl_type(dt);
  const size_t c = to_count(count, "all_gather");
  NEXTRON_CHECK(count <= std::numeric_limits<int64_t>::max() / size_, "all_gather: count ", count,
                " times the group size ", size_, " overflows int64");
  if (c == 0) return;
  DeviceGuard guard(device_);
  check_nccl(ncclAllGather(in, out, c, type, comm_, stream_), "ncclAllGather", comm_);
  finish("ncclAllGather");
}

void NcclCommunicator::all_to_all_v(const void* send_buf, const std::vector<int64_t>& send_counts, void* recv_buf,
                                    const std::vector<int64_t>& recv_counts, DType dt) {
  const ncclDataType_t type = nccl_type(dt);
  const size_t elem = dtype_size(dt);
  NEXTRON_CHECK(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_,
                "all_to_all_v: send_counts (", send_counts.size(), ") and recv_counts (", recv_counts.size(),
                ") must have one entry per rank of the group (", size_, ")");
  for (int j = 0; j < size_; ++j) {
    to_count(send_counts[j], "all_to_all_v (send count)");
    to_count(recv_counts[j], "all_to_all_v (receive count)");
  }
  DeviceGuard guard(device_);
  // One group of per-peer sends and receives (NCCL's all-to-all idiom; self-exchange included). Pairs with a zero
  // count post nothing on either side, which agrees because send_counts[j] on i equals recv_counts[i] on j.
  GroupErrors errors;
  check_nccl(ncclGroupStart(), "ncclGroupStart", comm_);
  size_t s_off = 0, r_off = 0;
  for (int j = 0; j < size_; ++j) {
    const auto sc = static_cast<size_t>(send_counts[j]), rc = static_cast<size_t>(recv_counts[j]);
    if (sc > 0)
      errors.note(ncclSend(static_cast<const char*>(send_buf) + s_off * elem, sc, type, j, comm_, stream_), "ncclSend");
    if (rc > 0)
      errors.note(ncclRecv(static_cast<char*>(recv_buf) + r_off * elem, rc, type, j, comm_, stream_), "ncclRecv");
    s_off += sc;
    r_off += rc;
  }
  const ncclResult_t end = ncclGroupEnd();
  check_nccl(errors.rc, errors.call ? errors.call : "", comm_);
  check_nccl(end, "ncclGroupEnd (all_to_all_v)", comm_);
  finish("all_to_all_v");
}

void NcclCommunicator::send(const void* buf, int64_t n, DType dt, int peer, int /*tag*/) {
  const ncclDataType_t type = nccl_type(dt);
  check_peer(peer, "send");
  NEXTRON_CHECK(peer != rank_, "send: a blocking send to oneself (rank ", peer,
                ") can never complete with NCCL: use send_recv");
  const size_t c = to_count(n, "send");
  if (c == 0) return;  // the matching recv has n == 0 too and posts nothing
  DeviceGuard guard(device_);
  check_nccl(ncclSend(buf, c, type, peer, comm_, stream_), "ncclSend", comm_);
  finish("ncclSend");
}

void NcclCommunicator::recv(void* buf, int64_t n, DType dt, int peer, int /*tag*/) {
  const ncclDataType_t type = nccl_type(dt);
  check_peer(peer, "recv");
  NEXTRON_CHECK(peer != rank_, "recv: a blocking receive from oneself (rank ", peer,
                ") can never complete with NCCL: use send_recv");
  const size_t c = to_count(n, "recv");
  if (c == 0) return;
  DeviceGuard guard(device_);
  check_nccl(ncclRecv(buf, c, type, peer, comm_, stream_), "ncclRecv", comm_);
  finish("ncclRecv");
}

void NcclCommunicator::send_recv(const void* send_buf, int64_t send_n, int dst, void* recv_buf, int64_t recv_n, int src,
                                 DType dt, int /*tag*/) {
  const ncclDataType_t type = nccl_type(dt);
  check_peer(dst, "send_recv (destination)");
  check_peer(src, "send_recv (source)");
  const size_t sc = to_count(send_n, "send_recv (send)"), rc = to_count(recv_n, "send_recv (receive)");
  DeviceGuard guard(device_);
  // Both halves in one group, so rings and pipelines cannot deadlock (and a one-rank ring sends to itself).
  GroupErrors errors;
  check_nccl(ncclGroupStart(), "ncclGroupStart", comm_);
  if (sc > 0) errors.note(ncclSend(send_buf, sc, type, dst, comm_, stream_), "ncclSend");
  if (rc > 0) errors.note(ncclRecv(recv_buf, rc, type, src, comm_, stream_), "ncclRecv");
  const ncclResult_t end = ncclGroupEnd();
  check_nccl(errors.rc, errors.call ? errors.call : "", comm_);
  check_nccl(end, "ncclGroupEnd (send_recv)", comm_);
  finish("send_recv");
}

void NcclCommunicator::batch_send_recv(const std::vector<P2PMessage>& messages) {
  // Every argument is checked before the group starts, so a bad batch posts nothing.
  std::vector<size_t> counts;
  for (const P2PMessage& m : messages) {
    nccl_type(m.dt);
    check_peer(m.peer, m.send ? "batch_send_recv (send)" : "batch_send_recv (receive)");
    counts.push_back(to_count(m.n, "batch_send_recv"));
  }
  DeviceGuard guard(device_);
  GroupErrors errors;
  check_nccl(ncclGroupStart(), "ncclGroupStart", comm_);
  for (size_t i = 0; i < messages.size(); ++i) {
    const P2PMessage& m = messages[i];
    if (counts[i] == 0) continue;  // the matching message has n == 0 too and posts nothing
    if (m.send)
      errors.note(ncclSend(m.buf, counts[i], nccl_type(m.dt), m.peer, comm_, stream_), "ncclSend");
    else
      errors.note(ncclRecv(m.buf, counts[i], nccl_type(m.dt), m.peer, comm_, stream_), "ncclRecv");
  }
  const ncclResult_t end = ncclGroupEnd();
  check_nccl(errors.rc, errors.call ? errors.call : "", comm_);
  check_nccl(end, "ncclGroupEnd (batch_send_recv)", comm_);
  finish("batch_send_recv");
}

void NcclCommunicator::broadcast(void* buf, int64_t n, DType dt, int root) {
  const ncclDataType_t type = nccl_type(dt);
  check_peer(root, "broadcast (root)");
  const size_t c = to_count(n, "broadcast");
  if (c == 0) return;
  DeviceGuard guard(device_);
  check_nccl(ncclBroadcast(buf, buf, c, type, root, comm_, stream_), "ncclBroadcast", comm_);
  finish("ncclBroadcast");
}

void NcclCommunicator::barrier() {
  DeviceGuard guard(device_);
  check_nccl(ncclAllReduce(scratch_, scratch_, 1, ncclFloat, ncclSum, comm_, stream_), "ncclAllReduce (barrier)",
             comm_);
  synchronize("barrier");
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  NEXTRON_CHECK(color >= 0, "split: color ", color, " must be >= 0");
  DeviceGuard guard(device_);
  ncclComm_t sub = nullptr;
  // config nullptr: the child inherits this communicator's configuration (blocking).
  check_nccl(ncclCommSplit(comm_, color, key, &sub, nullptr), "ncclCommSplit", comm_);
  return std::unique_ptr<Communicator>(new NcclCommunicator(sub, device_, owns_stream_ ? nullptr : stream_));
}

}  // namespace nextron
