#include "parallel/context.h"

#include <algorithm>

#include "core/error.h"
#include "parallel/pipeline_layout.h"

namespace nextron {

Layout checked_layout(int world_size, const ParallelSizes& sizes, bool sp, const ModelConfig& config, int64_t seq_len) {
  Layout layout(sizes, world_size, config, seq_len);
  std::vector<std::string> errors;
  auto fail = [&errors](auto&&... parts) { errors.push_back(detail::concat(parts...)); };
  const bool has_linear =
      std::count(config.layer_types.begin(), config.layer_types.end(), MixerType::linear_attention) > 0;
  const int64_t chunk = seq_len / (layout.sizes().cp_order == CpOrder::zigzag ? 2 * layout.cp() : layout.cp());
  if (layout.cp() > 1 && has_linear && chunk < config.linear_conv_kernel_dim - 1)
    fail("context-parallel-size ", layout.cp(), " (", cp_order_name(layout.sizes().cp_order), ") cuts sequences of ",
         seq_len, " tokens into chunks of ", chunk, ", shorter than the Gated DeltaNet conv's ",
         config.linear_conv_kernel_dim - 1,
         "-token left context: use a smaller context-parallel size or longer sequences");
  const bool folded = config.num_moe_layers() > 0 && layout.etp() == 1 && layout.tp() > 1;
  if (config.num_moe_layers() > 0 && layout.etp() != layout.tp() && layout.etp() != 1)
    fail("expert-tensor-parallel-size ", layout.etp(), " with TP ", layout.tp(),
         ": the experts are split like the dense MLP (ETP = TP, the default) or whole on every rank (ETP 1); other "
         "ETPs are not implemented yet");
  if (folded && !sp)
    fail("expert-tensor-parallel-size 1 under TP ", layout.tp(),
         " routes each rank's own sequence shard to whole experts: add --sequence-parallel (as Megatron requires)");
  NEXTRON_CHECK(config.experts_folded == folded, "ParallelContext: ModelConfig::experts_folded must be ", folded,
                " for ETP ", layout.etp(), " under TP ", layout.tp(), " (the trainer sets it)");
  if (sp && layout.tp() > 1 && (seq_len / layout.cp()) % layout.tp() != 0)
    fail("seq_len ", seq_len, layout.cp() > 1 ? detail::concat(" / CP ", layout.cp()) : std::string(),
         " is not divisible by TP ", layout.tp(),
         ": sequence parallelism splits every sequence's tokens over the TP ranks; choose --seq-len a multiple of ",
         int64_t{layout.tp()} * layout.cp());
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

ParallelContext::ParallelContext(Communicator& world, const ParallelSizes& sizes, bool sequence_parallel,
                                 const ModelConfig& config, int64_t seq_len, const DeviceCommFactory& device)
    : world_(world),
      layout_(checked_layout(world.size(), sizes, sequence_parallel, config, seq_len)),
      sp_(sequence_parallel) {
  const int r = world_.rank();
  auto group = [&](Group g) { return world_.split(layout_.group_index(g, r), layout_.rank_in_group(g, r)); };
  tp_ = group(Group::tp);
  dp_ = group(Group::dp);
  pp_ = group(Group::pp);
  ep_ = group(Group::ep);
  edp_ = group(Group::edp);
  cp_ = group(Group::cp);
  dp_cp_ = group(Group::dp_cp);
  NEXTRON_ASSERT(tp_->size() == layout_.tp() && dp_->size() == layout_.dp() && pp_->size() == layout_.pp() &&
                 ep_->size() == layout_.ep() && edp_->size() == layout_.edp());
  if (device) {
    // Every rank makes the same calls in the same order (each is collective over its group).
    if (tp_->size() > 1) tp_dev_ = device(*tp_);
    if (dp_->size() > 1) dp_dev_ = device(*dp_);
    if (pp_->size() > 1) pp_dev_ = device(*pp_);
    if (ep_->size() > 1) ep_dev_ = device(*ep_);
    if (edp_->size() > 1 && own_expert_group()) edp_dev_ = device(*edp_);
    if (cp_->size() > 1) cp_dev_ = device(*cp_);
    if (cp_->size() > 1 && dp_cp_->size() > 1) dp_cp_dev_ = device(*dp_cp_);
  }
  chunks_ = rank_chunks(pipeline_stages(config, layout_.pp(), layout_.vpp(), layout_.sizes().pipeline), layout_.pp(),
                        pp_->rank());
  for (const StageRange& c : chunks_)
    maps_.emplace_back(config, tp_->rank(), layout_.tp(), c, ep_->rank(), ep_->size());
}

ModelComms ParallelContext::model_comms() const {
  ModelComms c;
  c.tp = TensorParallel(&tp_device(), sp_);
  // The loss and the router statistics are means over the global micro-batch: every rank with other tokens.
  c.data_parallel = dp_cp_->size() > 1 ? dp_cp_.get() : nullptr;
  if (cp_->size() > 1) c.cp = ContextParallel(cp_.get(), &cp_device(), layout_.sizes().cp_order);
  if (ep_->size() > 1) c.ep = ExpertParallel(&ep_device(), ep_.get());
  return c;
}

std::vector<float> ParallelContext::gather_full(const std::vector<const float*>& chunk_locals) const {
  NEXTRON_ASSERT(chunk_locals.size() == maps_.size());
  std::vector<float> full(full_table().total_numel(), 0.0f);
  // The dense parameters of DP rank 0 and the routed experts of EDP rank 0 (under EP the DP replicas hold
  // different experts; without it EDP is DP).
  for (size_t c = 0; c < maps_.size(); ++c)
    maps_[c].place_owned(chunk_locals[c], full.data(), dp_cp_->rank() == 0, edp_->rank() == 0);
  world_.all_reduce_sum(full.data(), static_cast<int64_t>(full.size()));
  return full;
}

}  // namespace nextron
