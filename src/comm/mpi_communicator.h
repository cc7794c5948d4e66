// MPI implementation of Communicator, the MPI session (init/finalize) and abort_all.
#pragma once

// Only MPI's C API is used: skip the deprecated C++ bindings (their headers do not compile warning-free).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace nextron {

// Whether this process was started by an MPI launcher (mpirun / mpiexec / srun set their rank variables), or
// NEXTRON_MPI=1 (always) / 0 (never) says otherwise.
bool launched_by_mpi();

// RAII MPI_Init_thread(MPI_THREAD_FUNNELED) / MPI_Finalize. Only the main thread makes MPI calls (OpenMP threads
// never do). If MPI is already initialised, the session neither initialises nor finalises it. A process not
// started by an MPI launcher (launched_by_mpi() false) is a one-rank job and does not initialise MPI at all:
// world_size() 1, world_rank() 0.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  MpiSession();  // no command line
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int world_rank() const;
  int world_size() const;

 private:
  bool owns_ = false;
};

// A Communicator over an MPI communicator it owns (freed on destruction). Errors are returned by MPI
// (MPI_ERRORS_RETURN) and thrown as nextron::Error naming the call; counts above INT_MAX elements are errors.
class MpiCommunicator : public Communicator {
 public:
  // A duplicate of MPI_COMM_WORLD (MPI must be initialised).
  static std::unique_ptr<MpiCommunicator> world();
  // Takes ownership of `comm` (freed with MPI_Comm_free).
  explicit MpiCommunicator(MPI_Comm comm);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm comm() const { return comm_; }

  // f32, f64, i32 and i64 (MPI has no bf16 sum).
  bool supports(DType dt) const override { return dt != DType::bf16; }
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
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  void check_peer(int peer, const char* what) const;
  MPI_Datatype mpi_type(DType dt, const char* what) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

// Ends the whole job: prints "nextron: rank R: <message>" to stderr and calls MPI_Abort(MPI_COMM_WORLD, 1), so a
// failure on one rank does not leave the others hanging in a collective. Without MPI it prints
// "nextron: <message>" and exits with status 1.
[[noreturn]] void abort_all(const std::string& message);

}  // namespace nextron
