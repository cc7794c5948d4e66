#include "comm/expert_parallel.h"

#include <numeric>

#include "core/error.h"
#include "kernels/ops.h"

namespace nextron {

int64_t AllToAllPlan::sent() const { return std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0}); }
int64_t AllToAllPlan::received() const { return std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0}); }

ExpertParallel::ExpertParallel(Communicator* rows, Communicator* host)
    : rows_(rows ? rows : host), host_(host ? host : rows) {
  NEXTRON_CHECK(!rows_ || rows_->size() == host_->size(), "expert-parallel groups of different sizes");
}

std::vector<int32_t> ExpertParallel::plan(AllToAllPlan& plan, const std::vector<int64_t>& send_rows,
                                          const std::vector<int32_t>& send_ids) const {
  const int P = size();
  NEXTRON_ASSERT(static_cast<int>(send_rows.size()) == P);
  plan.send_rows = send_rows;
  plan.recv_rows.assign(P, 0);
  NEXTRON_ASSERT(static_cast<int64_t>(send_ids.size()) == plan.sent());
  if (!active()) {
    plan.recv_rows = send_rows;
    return send_ids;
  }
  // The counts first (one value per rank pair), then the ids with them (host memory).
  host_->all_to_all_v(send_rows.data(), std::vector<int64_t>(P, 1), plan.recv_rows.data(), std::vector<int64_t>(P, 1),
                      DType::i64);
  std::vector<int32_t> recv_ids(static_cast<size_t>(plan.received()));
  host_->all_to_all_v(send_ids.data(), plan.send_rows, recv_ids.data(), plan.recv_rows, DType::i32);
  return recv_ids;
}

void ExpertParallel::exchange(const Ops& ops, const Tensor& in, Tensor& out, const std::vector<int64_t>& from,
                              const std::vector<int64_t>& to) const {
  const int64_t sent = std::accumulate(from.begin(), from.end(), int64_t{0}),
                got = std::accumulate(to.begin(), to.end(), int64_t{0});
  NEXTRON_ASSERT(in.shape().size() == 2);
  const int64_t W = in.dim(1);
  NEXTRON_CHECK(in.numel() == sent * W, "expert-parallel exchange: ", in.numel(), " values for ", sent, " rows");
  ops.ensure(out, {got, W}, in.dtype());
  if (!active()) {
    if (got > 0) out.copy_from(in);
    return;
  }
  std::vector<int64_t> from_elems(from.size()), to_elems(to.size());
  for (size_t j = 0; j < from.size(); ++j) {
    from_elems[j] = from[j] * W;
    to_elems[j] = to[j] * W;
  }
  rows_->all_to_all_v(in.raw(), from_elems, out.raw(), to_elems, in.dtype());
}

void ExpertParallel::token_dispatch(const Ops& ops, const Tensor& rows, Tensor& received,
                                    const AllToAllPlan& plan) const {
  exchange(ops, rows, received, plan.send_rows, plan.recv_rows);
}

void ExpertParallel::token_dispatch_backward(const Ops& ops, const Tensor& d_received, Tensor& d_rows,
                                             const AllToAllPlan& plan) const {
  exchange(ops, d_received, d_rows, plan.recv_rows, plan.send_rows);
}

void ExpertParallel::token_combine(const Ops& ops, const Tensor& expert_out, Tensor& returned,
                                   const AllToAllPlan& plan) const {
  exchange(ops, expert_out, returned, plan.recv_rows, plan.send_rows);
}

void ExpertParallel::token_combine_backward(const Ops& ops, const Tensor& d_returned, Tensor& d_expert_out,
                                            const AllToAllPlan& plan) const {
  exchange(ops, d_returned, d_expert_out, plan.send_rows, plan.recv_rows);
}

}  // namespace nextron
