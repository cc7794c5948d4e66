#include "comm/mpi_communicator.h"

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/error.h"

namespace nextron {

namespace {

bool mpi_active() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  throw Error(detail::concat(call, " failed: ", std::string(text, len), " (MPI error ", rc, ")"));
}

// MPI counts are int: anything larger must be split by the caller.
int to_count(int64_t n, const char* what) {
  NEXTRON_CHECK(n >= 0, what, ": element count ", n, " is negative");
  NEXTRON_CHECK(n <= INT_MAX, what, ": element count ", n, " exceeds INT_MAX (", INT_MAX,
                "), which MPI cannot address in one call: split the buffer into chunks of at most ", INT_MAX,
                " elements");
  return static_cast<int>(n);
}

}  // namespace

// ---- MpiSession ----

bool launched_by_mpi() {
  if (const char* force = std::getenv("NEXTRON_MPI")) {
    const std::string v = force;
    if (v == "1") return true;
    if (v == "0") return false;
    throw Error(detail::concat("NEXTRON_MPI='", v, "': use 1 (always initialise MPI) or 0 (never); unset, MPI is ",
                               "initialised only under an MPI launcher"));
  }
  // Open MPI's mpirun, PMIx launchers (Open MPI 5, srun --mpi=pmix), PMI-1/2 (MPICH's hydra, Intel MPI,
  // srun --mpi=pmi2).
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"})
    if (std::getenv(var)) return true;
  return false;
}

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  // A process started without a launcher is a one-rank job: it needs no MPI at all, so it also runs where MPI's
  // run-time (its plugins, its daemon for singletons) is absent, as on a bare GPU machine (tools/gpu_check.sh).
  if (!launched_by_mpi()) return;
  int provided = 0;
  check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  owns_ = true;
  if (provided < MPI_THREAD_FUNNELED) {
    abort_all("the MPI library provides thread level " + std::to_string(provided) +
              ", below MPI_THREAD_FUNNELED: use an MPI build with thread support (Open MPI's default has it)");
  }
}

MpiSession::MpiSession() : MpiSession(nullptr, nullptr) {}

MpiSession::~MpiSession() {
  if (owns_ && mpi_active()) MPI_Finalize();
}

int MpiSession::world_rank() const {
  int r = 0;
  if (!mpi_active()) return 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int MpiSession::world_size() const {
  int s = 1;
  if (!mpi_active()) return 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// ---- MpiCommunicator ----

std::unique_ptr<MpiCommunicator> MpiCommunicator::world() {
  NEXTRON_CHECK(mpi_active(), "MpiCommunicator::world: MPI is not initialised: create an MpiSession first");
  MPI_Comm dup = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MPI_Comm_dup");
  return std::make_unique<MpiCommunicator>(dup);
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm) : comm_(comm) {
  NEXTRON_CHECK(comm != MPI_COMM_NULL, "MpiCommunicator: got MPI_COMM_NULL");
  check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ != MPI_COMM_NULL && mpi_active()) MPI_Comm_free(&comm_);
}

void MpiCommunicator::check_peer(int peer, const char* what) const {
  NEXTRON_CHECK(peer >= 0 && peer < size_, what, ": peer rank ", peer, " is outside the group [0, ", size_, ")");
}

MPI_Datatype MpiCommunicator::mpi_type(DType dt, const char* what) const {
  check_dtype(dt, what);
  switch (dt) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    default:
      throw Error(detail::concat(what, ": no MPI type for ", dtype_name(dt)));
  }
}

void MpiCommunicator::all_reduce_sum(void* buf, int64_t n, DType dt) {
  const MPI_Datatype t = mpi_type(dt, "all_reduce_sum");
  const int c = to_count(n, "all_reduce_sum");
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, buf, c, t, MPI_SUM, comm_), "MPI_Allreduce");
}

void MpiCommunicator::reduce_scatter_sum(const void* in, void* out, int64_t count, DType dt) {
  const MPI_Datatype t = mpi_type(dt, "reduce_scatter_sum");
  to_count(count * size_, "reduce_scatter_sum (input size * count)");
  const int c = to_count(count, "reduce_scatter_sum");
  check_mpi(MPI_Reduce_scatter_block(in, out, c, t, MPI_SUM, comm_), "MPI_Reduce_scatter_block");
}

void MpiCommunicator::all_gather(const void* in, void* out, int64_t count, DType dt) {
  const MPI_Datatype t = mpi_type(dt, "all_gather");
  to_count(count * size_, "all_gather (output size * count)");
  const int c = to_count(count, "all_gather");
  check_mpi(MPI_Allgather(in, c, t, out, c, t, comm_), "MPI_Allgather");
}

void MpiCommunicator::all_to_all_v(const void* send_buf, const std::vector<int64_t>& send_counts, void* recv_buf,
                                   const std::vector<int64_t>& recv_counts, DType dt) {
  const MPI_Datatype t = mpi_type(dt, "all_to_all_v");
  NEXTRON_CHECK(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_,
                "all_to_all_v: send_counts (", send_counts.size(), ") and recv_counts (", recv_counts.size(),
                ") must have one entry per rank of the group (", size_, ")");
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int64_t s_off = 0, r_off = 0;
  for (int j = 0; j < size_; ++j) {
    sc[j] = to_count(send_counts[j], "all_to_all_v (send count)");
    rc[j] = to_count(recv_counts[j], "all_to_all_v (receive count)");
    sd[j] = to_count(s_off, "all_to_all_v (send displacement)");
    rd[j] = to_count(r_off, "all_to_all_v (receive displacement)");
    s_off += sc[j];
    r_off += rc[j];
  }
  check_mpi(MPI_Alltoallv(send_buf, sc.data(), sd.data(), t, recv_buf, rc.data(), rd.data(), t, comm_),
            "MPI_Alltoallv");
}

void MpiCommunicator::send(const void* buf, int64_t n, DType dt, int peer, int tag) {
  const MPI_Datatype t = mpi_type(dt, "send");
  check_peer(peer, "send");
  check_mpi(MPI_Send(buf, to_count(n, "send"), t, peer, tag, comm_), "MPI_Send");
}

void MpiCommunicator::recv(void* buf, int64_t n, DType dt, int peer, int tag) {
  const MPI_Datatype t = mpi_type(dt, "recv");
  check_peer(peer, "recv");
  check_mpi(MPI_Recv(buf, to_count(n, "recv"), t, peer, tag, comm_, MPI_STATUS_IGNORE), "MPI_Recv");
}

void MpiCommunicator::send_recv(const void* send_buf, int64_t send_n, int dst, void* recv_buf, int64_t recv_n, int src,
                                DType dt, int tag) {
  const MPI_Datatype t = mpi_type(dt, "send_recv");
  check_peer(dst, "send_recv (destination)");
  check_peer(src, "send_recv (source)");
  check_mpi(MPI_Sendrecv(send_buf, to_count(send_n, "send_recv"), t, dst, tag, recv_buf, to_count(recv_n, "send_recv"),
                         t, src, tag, comm_, MPI_STATUS_IGNORE),
            "MPI_Sendrecv");
}

void MpiCommunicator::batch_send_recv(const std::vector<P2PMessage>& messages) {
  std::vector<MPI_Request> requests;
  requests.reserve(messages.size());
  std::string error;
  for (const P2PMessage& m : messages) {
    const char* what = m.send ? "batch_send_recv (send)" : "batch_send_recv (receive)";
    try {
      const MPI_Datatype t = mpi_type(m.dt, what);
      check_peer(m.peer, what);
      const int n = to_count(m.n, what);
      MPI_Request r = MPI_REQUEST_NULL;
      check_mpi(
          m.send ? MPI_Isend(m.buf, n, t, m.peer, m.tag, comm_, &r) : MPI_Irecv(m.buf, n, t, m.peer, m.tag, comm_, &r),
          m.send ? "MPI_Isend" : "MPI_Irecv");
      requests.push_back(r);
    } catch (const std::exception& e) {
      error = e.what();
      break;
    }
  }
  // Messages already posted are completed even after a bad one: their buffers must not be left in MPI's hands.
  if (!requests.empty())
    check_mpi(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  if (!error.empty()) throw Error(error);
}

void MpiCommunicator::broadcast(void* buf, int64_t n, DType dt, int root) {
  const MPI_Datatype t = mpi_type(dt, "broadcast");
  check_peer(root, "broadcast (root)");
  check_mpi(MPI_Bcast(buf, to_count(n, "broadcast"), t, root, comm_), "MPI_Bcast");
}

void MpiCommunicator::barrier() { check_mpi(MPI_Barrier(comm_), "MPI_Barrier"); }

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  NEXTRON_CHECK(color >= 0, "split: color ", color, " must be >= 0");
  MPI_Comm sub = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
  return std::make_unique<MpiCommunicator>(sub);
}

// ---- abort_all ----

void abort_all(const std::string& message) {
  if (mpi_active()) {
    int rank = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    std::fprintf(stderr, "nextron: rank %d: %s\n", rank, message.c_str());
    std::fflush(stderr);
    std::fflush(stdout);
    MPI_Abort(MPI_COMM_WORLD, 1);
  } else {
    std::fprintf(stderr, "nextron: %s\n", message.c_str());
    std::fflush(stderr);
  }
  std::_Exit(1);
}

}  // namespace nextron
