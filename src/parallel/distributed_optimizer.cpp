#include "parallel/distributed_optimizer.h"

#include <algorithm>
#include <cstring>

#include "model/param_table.h"
#include "optim/grad_clip.h"

namespace nextron {

namespace {
FlatRange shard_of(int64_t total, int dp_size, int dp_rank) {
  const int64_t cap = (total + dp_size - 1) / dp_size;
  return {std::min(total, dp_rank * cap), std::min(total, (dp_rank + 1) * cap)};
}
}  // namespace

DistributedOptimizer::DistributedOptimizer(const ParamTable& table, Communicator* dp, const AdamWHyper& h)
    : dp_(dp && dp->size() > 1 ? dp : nullptr),
      total_(table.total_numel()),
      capacity_((total_ + (dp_ ? dp_->size() : 1) - 1) / (dp_ ? dp_->size() : 1)),
      shard_(shard_of(total_, dp_ ? dp_->size() : 1, dp_ ? dp_->rank() : 0)),
      adam_(table, shard_, h) {}

void DistributedOptimizer::reduce_scatter_grads(float* grads) {
  if (!dp_) return;
  const int64_t P = dp_->size();
  // reduce_scatter exchanges equal blocks: pad the flat buffer to P * capacity.
  padded_.assign(P * capacity_, 0.0f);
  std::memcpy(padded_.data(), grads, total_ * sizeof(float));
  mine_.resize(capacity_);
  dp_->reduce_scatter_sum(padded_.data(), mine_.data(), capacity_);
  std::memcpy(grads + shard_.begin, mine_.data(), shard_.size() * sizeof(float));
}

double DistributedOptimizer::shard_sq_sum(const float* grads, const std::vector<FlatRange>& counted) const {
  double s = 0;
  for (const FlatRange& c : counted) {
    const FlatRange r{std::max(c.begin, shard_.begin), std::min(c.end, shard_.end)};
    if (r.size() > 0) s += grad_sq_sum(grads + r.begin, r);
  }
  return s;
}

void DistributedOptimizer::scale_shard(float* grads, float s) const { scale_grads(grads + shard_.begin, shard_, s); }

void DistributedOptimizer::step(float* params, const float* grads, double lr) {
  adam_.step(params, grads, lr);
  all_gather(params);
}

void DistributedOptimizer::all_gather(float* buf) {
  if (!dp_) return;
  const int64_t P = dp_->size();
  mine_.assign(capacity_, 0.0f);
  std::memcpy(mine_.data(), buf + shard_.begin, shard_.size() * sizeof(float));
  padded_.resize(P * capacity_);
  dp_->all_gather(mine_.data(), padded_.data(), capacity_);
  std::memcpy(buf, padded_.data(), total_ * sizeof(float));
}

}  // namespace nextron
