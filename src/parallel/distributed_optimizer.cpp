#include "parallel/distributed_optimizer.h"

#include <algorithm>
#include <cstring>

#include "model/param_table.h"

namespace nextron {

namespace {

FlatRange shard_of(FlatRange segment, int dp_size, int dp_rank) {
  const int64_t total = segment.size(), cap = (total + dp_size - 1) / dp_size;
  return {segment.begin + std::min(total, dp_rank * cap), segment.begin + std::min(total, (dp_rank + 1) * cap)};
}

FlatRange whole_if_empty(FlatRange segment, const ParamTable& table) {
  return segment.size() > 0 ? segment : FlatRange{0, table.total_numel()};
}

Tensor slice(const Tensor& flat, int64_t begin, int64_t n) { return Tensor::view_of(flat, begin, {n}); }

}  // namespace

DistributedOptimizer::DistributedOptimizer(const ParamTable& table, Communicator* dp, Communicator* dp_host,
                                           const AdamWHyper& h, Ops& ops, FlatRange segment)
    : dp_(dp && dp->size() > 1 ? dp : nullptr),
      dp_host_(dp_ ? (dp_host ? dp_host : dp_) : nullptr),
      ops_(ops),
      segment_(whole_if_empty(segment, table)),
      total_(segment_.size()),
      capacity_((total_ + (dp_ ? dp_->size() : 1) - 1) / (dp_ ? dp_->size() : 1)),
      shard_(shard_of(segment_, dp_ ? dp_->size() : 1, dp_ ? dp_->rank() : 0)),
      adam_(table, shard_, h, &ops) {}

void DistributedOptimizer::reduce_scatter_grads(Tensor& grads) {
  if (!dp_) return;
  const int64_t P = dp_->size();
  // reduce_scatter exchanges equal blocks: pad the flat buffer to P * capacity (the padding stays zero).
  ops_.f32_zeroed(padded_, {P * capacity_});
  slice(padded_, 0, total_).copy_from(slice(grads, segment_.begin, total_));
  ops_.f32(mine_, {capacity_});
  dp_->reduce_scatter_sum(padded_.f32(), mine_.f32(), capacity_);
  slice(grads, shard_.begin, shard_.size()).copy_from(slice(mine_, 0, shard_.size()));
}

double DistributedOptimizer::shard_sq_sum(const Tensor& grads, const std::vector<FlatRange>& counted) const {
  std::vector<FlatRange> mine;
  for (const FlatRange& c : counted) {
    const FlatRange r{std::max(c.begin, shard_.begin), std::min(c.end, shard_.end)};
    if (r.size() > 0) mine.push_back(r);
  }
  return ops_.sum_squares(grads, mine);
}

void DistributedOptimizer::scale_shard(Tensor& grads, float s) const { ops_.scale(grads, shard_, s); }

void DistributedOptimizer::step(Tensor& params, const Tensor& grads, double lr, Tensor* params_act) {
  // Without DP the update writes the activation-dtype copy of its range directly; with DP that copy is refreshed
  // after the all-gather, for every rank's shard.
  adam_.step(params, grads, lr, dp_ ? nullptr : params_act);
  all_gather(params);
  if (dp_ && params_act && params_act->raw() != params.raw()) ops_.cast(*params_act, params);
}

void DistributedOptimizer::all_gather(Tensor& buf) {
  if (!dp_) return;
  const int64_t P = dp_->size();
  ops_.f32_zeroed(mine_, {capacity_});
  slice(mine_, 0, shard_.size()).copy_from(slice(buf, shard_.begin, shard_.size()));
  ops_.f32(padded_, {P * capacity_});
  dp_->all_gather(mine_.f32(), padded_.f32(), capacity_);
  slice(buf, segment_.begin, total_).copy_from(slice(padded_, 0, total_));
}

void DistributedOptimizer::all_gather_host(float* buf) {
  if (!dp_host_) return;
  const int64_t P = dp_host_->size();
  mine_host_.assign(capacity_, 0.0f);
  std::memcpy(mine_host_.data(), buf + shard_.begin, shard_.size() * sizeof(float));
  padded_host_.resize(P * capacity_);
  dp_host_->all_gather(mine_host_.data(), padded_host_.data(), capacity_);
  std::memcpy(buf + segment_.begin, padded_host_.data(), total_ * sizeof(float));
}

}  // namespace nextron
