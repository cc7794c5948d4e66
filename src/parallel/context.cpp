#include "parallel/context.h"

#include "core/error.h"

namespace nextron {

namespace {

Layout checked_layout(const Communicator& world, const ParallelSizes& sizes, bool sp, const ModelConfig& config,
                      int64_t seq_len) {
  Layout layout(sizes, world.size(), config, seq_len);
  std::vector<std::string> errors;
  auto fail = [&errors](auto&&... parts) { errors.push_back(detail::concat(parts...)); };
  if (layout.pp() > 1)
    fail("pipeline-model-parallel-size ", layout.pp(), ": pipeline parallelism is not implemented yet; use 1");
  if (layout.cp() > 1)
    fail("context-parallel-size ", layout.cp(), ": context parallelism is not implemented yet; use 1");
  if (layout.ep() > 1)
    fail("expert-model-parallel-size ", layout.ep(), ": expert parallelism is not implemented yet; use 1");
  if (config.num_moe_layers() > 0 && layout.etp() != layout.tp())
    fail("expert-tensor-parallel-size ", layout.etp(), " differs from TP ", layout.tp(),
         ": without expert parallelism the experts are split like the dense MLP; leave it unset (it follows TP)");
  if (sp && layout.tp() > 1 && seq_len % layout.tp() != 0)
    fail("seq_len ", seq_len, " is not divisible by TP ", layout.tp(),
         ": sequence parallelism splits every sequence's tokens over the TP ranks; choose --seq-len a multiple of ",
         layout.tp());
  if (config.attention_bias && layout.tp() > 1)
    fail("attention_bias with TP ", layout.tp(),
         ": the row-parallel o_proj bias is not implemented under tensor parallelism; use TP 1");
  if (!errors.empty()) {
    std::string msg = "parallel layout: not supported (" + layout.describe() + "):";
    for (const auto& e : errors) msg += "\n  - " + e;
    throw Error(msg);
  }
  return layout;
}

}  // namespace

ParallelContext::ParallelContext(Communicator& world, const ParallelSizes& sizes, bool sequence_parallel,
                                 const ModelConfig& config, int64_t seq_len)
    : world_(world),
      layout_(checked_layout(world, sizes, sequence_parallel, config, seq_len)),
      sp_(sequence_parallel),
      map_(config, layout_.dense_coord(world.rank()).tp, layout_.tp()) {
  const int r = world_.rank();
  tp_ = world_.split(layout_.group_index(Group::tp, r), layout_.rank_in_group(Group::tp, r));
  dp_ = world_.split(layout_.group_index(Group::dp, r), layout_.rank_in_group(Group::dp, r));
  NEXTRON_ASSERT(tp_->rank() == map_.tp_rank() && tp_->size() == layout_.tp() && dp_->size() == layout_.dp());
}

ModelComms ParallelContext::model_comms() const {
  ModelComms c;
  c.tp = TensorParallel(tp_.get(), sp_);
  c.data_parallel = dp_->size() > 1 ? dp_.get() : nullptr;
  return c;
}

std::vector<float> ParallelContext::gather_full(const float* local) const {
  std::vector<float> full(map_.full_table().total_numel(), 0.0f);
  if (dp_->rank() == 0) map_.place_owned(local, full.data());
  world_.all_reduce_sum(full.data(), static_cast<int64_t>(full.size()));
  return full;
}

}  // namespace nextron
