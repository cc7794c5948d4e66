#include "parallel/pipeline_runner.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "model/activation_memory.h"

namespace nextron {

PipelineRunner::PipelineRunner(std::vector<Model*> chunks, PipelineP2P& p2p, int dp_size)
    : chunks_(std::move(chunks)),
      p2p_(p2p),
      dp_size_(dp_size),
      pools_(chunks_.size()),
      free_(chunks_.size()),
      chunk_peak_(chunks_.size(), 0),
      chunk_live_(chunks_.size(), 0) {
  NEXTRON_CHECK(!chunks_.empty(), "a pipeline rank holds at least one model chunk");
  for (const Model* m : chunks_) NEXTRON_ASSERT(m != nullptr);
}

int64_t PipelineRunner::records_host_bytes() const {
  int64_t bytes = 0;
  for (const auto& pool : pools_)
    for (const auto& a : pool) bytes += record_host_bytes(*a);
  return bytes;
}

ModelActivations& PipelineRunner::acquire(int m, int c) {
  const auto key = std::make_pair(m, c);
  NEXTRON_CHECK(!live_.count(key), "pipeline schedule: micro-batch ", m, " on chunk ", c, " is already in flight");
  auto& free = free_.at(c);
  if (free.empty()) {
    pools_[c].push_back(std::make_unique<ModelActivations>());
    free.push_back(pools_[c].back().get());
  }
  ModelActivations* a = free.back();
  free.pop_back();
  live_[key] = a;
  peak_ = std::max(peak_, static_cast<int>(live_.size()));
  chunk_peak_[c] = std::max(chunk_peak_[c], ++chunk_live_[c]);
  return *a;
}

ModelActivations& PipelineRunner::record(int m, int c) {
  const auto it = live_.find({m, c});
  NEXTRON_CHECK(it != live_.end(), "pipeline schedule: micro-batch ", m, " on chunk ", c,
                " has no activation record (its forward or its input has not run)");
  return *it->second;
}

void PipelineRunner::release(int m, int c) {
  const auto it = live_.find({m, c});
  NEXTRON_ASSERT(it != live_.end());
  free_.at(c).push_back(it->second);
  --chunk_live_[c];
  live_.erase(it);
}

double PipelineRunner::rows_before(int c, int64_t N) const {
  const ModelConfig& config = chunks_[c]->config();
  int64_t moe = 0;
  for (int64_t l = 0; l < chunks_[c]->stage().layer_begin; ++l) moe += config.mlp_type(l) == MlpType::sparse_moe;
  return static_cast<double>(moe * chunks_[c]->routed_rows(N));
}

double PipelineRunner::final_rows(int64_t N) const {
  return static_cast<double>(chunks_[0]->config().num_moe_layers() * N * dp_size_);
}

void PipelineRunner::add_messages(const Transfer& t, int64_t B, int64_t S, std::vector<PipeMessage>& out) {
  const int64_t E = chunks_[0]->config().num_experts, N = B * S;
  Model& model = *chunks_.at(t.chunk);
  const bool act = t.kind == TransferKind::activation;
  ModelActivations* a = nullptr;
  Tensor* tensor = nullptr;
  if (t.send && !act) {
    // An input gradient: its record is already free; the buffer waits in the outbox.
    GradientOut& g = outbox_.at({t.microbatch, t.chunk});
    out.push_back({true, PipeTensor::gradient, t.peer, &g.grad});
    if (E > 0) {
      out.push_back({true, PipeTensor::gradient_aux, t.peer, &g.count_sum});
      out.push_back({true, PipeTensor::gradient_aux, t.peer, &g.prob_sum});
    }
    return;
  }
  if (t.send) {
    a = &record(t.microbatch, t.chunk);
    // Sending only reads the tensor; the message API takes one pointer type for both directions.
    tensor = const_cast<Tensor*>(&model.stage_output(*a));
  } else if (act) {
    a = &acquire(t.microbatch, t.chunk);
    tensor = &model.stage_input(*a, B, S);
    if (E > 0) a->aux.reset(model.ops(), E);
    a->aux.total_rows = rows_before(t.chunk, N);
  } else {
    a = &record(t.microbatch, t.chunk);
    tensor = &model.stage_output_grad(*a);
    a->aux.total_rows = final_rows(N);
  }
  out.push_back({t.send, act ? PipeTensor::activation : PipeTensor::gradient, t.peer, tensor});
  if (E > 0) {
    const PipeTensor aux = act ? PipeTensor::activation_aux : PipeTensor::gradient_aux;
    out.push_back({t.send, aux, t.peer, &a->aux.count_sum});
    out.push_back({t.send, aux, t.peer, &a->aux.prob_sum});
  }
}

void PipelineRunner::communicate(const Action& action, int64_t B, int64_t S) {
  // A fixed order of kinds on both sides of every pair (NCCL matches per peer in posting order).
  std::vector<Transfer> transfers = action.transfers;
  std::stable_sort(transfers.begin(), transfers.end(), [](const Transfer& a, const Transfer& b) {
    return static_cast<int>(a.kind) < static_cast<int>(b.kind);
  });
  std::vector<PipeMessage> messages;
  for (const Transfer& t : transfers) add_messages(t, B, S, messages);
  p2p_.exchange(messages);
  // Sent input gradients free their buffers for the next backward.
  for (const Transfer& t : transfers)
    if (t.send && t.kind == TransferKind::gradient) {
      const auto it = outbox_.find({t.microbatch, t.chunk});
      spare_.push_back(std::move(it->second));
      outbox_.erase(it);
    }
}

std::vector<LossValues> PipelineRunner::evaluate(int microbatches, const std::function<MicroBatchTokens(int m)>& tokens,
                                                 int64_t B, int64_t S) {
  NEXTRON_ASSERT(live_.empty());
  std::vector<LossValues> losses;
  for (int m = 0; m < microbatches; ++m)
    for (int c = 0; c < static_cast<int>(chunks_.size()); ++c) {
      Model& model = *chunks_[c];
      const StageRange& stage = model.stage();
      std::vector<PipeMessage> messages;
      if (stage.first) {
        acquire(m, c);
      } else {
        // From the previous virtual stage: the previous rank's chunk c, or (on rank 0) the last rank's chunk c - 1.
        add_messages({false, TransferKind::activation, p2p_.prev(), m, c}, B, S, messages);
        p2p_.exchange(messages);
      }
      ModelActivations& a = record(m, c);
      const MicroBatchTokens t = stage.first || stage.last ? tokens(m) : MicroBatchTokens{};
      const LossValues lv = model.forward_targets(a, t.ids, t.targets, B, S);
      if (stage.last) {
        losses.push_back(lv);
      } else {
        messages.clear();
        add_messages({true, TransferKind::activation, p2p_.next(), m, c}, B, S, messages);
        p2p_.exchange(messages);
      }
      release(m, c);
    }
  return losses;
}

void PipelineRunner::run(const ScheduleSpec& spec, const std::function<MicroBatchTokens(int m)>& tokens, int64_t B,
                         int64_t S, float loss_scale) {
  NEXTRON_CHECK(spec.pp == p2p_.size() && spec.vpp == static_cast<int>(chunks_.size()), "pipeline schedule for PP ",
                spec.pp, " x ", spec.vpp, " chunks on a rank of PP ", p2p_.size(), " holding ", chunks_.size(),
                " chunks");
  if (table_.empty() || spec.pp != spec_.pp || spec.vpp != spec_.vpp || spec.microbatches != spec_.microbatches) {
    table_ = schedule_table(spec);
    check_schedule(spec, table_);
    spec_ = spec;
  }
  NEXTRON_ASSERT(live_.empty());
  peak_ = 0;
  std::fill(chunk_peak_.begin(), chunk_peak_.end(), 0);
  exchange_seconds_ = 0;
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const int64_t N = B * S;
  const bool has_last = chunks_.back()->stage().last;
  // Sized once per run before any forward: the backend writes into these by address until it resolves its reads.
  readouts_.assign(has_last ? spec.microbatches : 0, ScoreReadout{});
  for (const Action& action : table_.at(p2p_.rank())) {
    switch (action.kind) {
      case ActionKind::communicate: {
        const auto t0 = Clock::now();
        communicate(action, B, S);
        exchange_seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
        break;
      }
      case ActionKind::forward: {
        Model& model = *chunks_.at(action.chunk);
        const StageRange& stage = model.stage();
        ModelActivations& a =
            stage.first ? acquire(action.microbatch, action.chunk) : record(action.microbatch, action.chunk);
        const MicroBatchTokens t = stage.first || stage.last ? tokens(action.microbatch) : MicroBatchTokens{};
        ScoreReadout unscored;
        model.forward_scored(a, t.ids, t.targets, B, S, stage.last ? readouts_.at(action.microbatch) : unscored);
        if (stage.last) {
          // The statistics the earlier stages' backward receives are these; their row count is the closed form.
          NEXTRON_ASSERT(model.config().num_experts == 0 || a.aux.total_rows == final_rows(N));
        }
        break;
      }
      case ActionKind::backward: {
        Model& model = *chunks_.at(action.chunk);
        ModelActivations& a = record(action.microbatch, action.chunk);
        if (model.stage().first) {
          model.backward_stage(a, loss_scale);
        } else {
          // The input gradient (and the statistics it carries back) go to a send buffer; the record is free now.
          GradientOut& g = outbox_[{action.microbatch, action.chunk}];
          if (spare_.empty()) {
            ++grad_buffers_;
          } else {
            g = std::move(spare_.back());
            spare_.pop_back();
          }
          model.backward_stage(a, loss_scale, &g.grad);
          if (a.aux.count_sum.defined() && model.config().num_experts > 0) {
            model.ops().f32(g.count_sum, a.aux.count_sum.shape()).copy_from(a.aux.count_sum);
            model.ops().f32(g.prob_sum, a.aux.prob_sum.shape()).copy_from(a.aux.prob_sum);
          }
        }
        release(action.microbatch, action.chunk);
        break;
      }
    }
  }
  NEXTRON_CHECK(live_.empty() && outbox_.empty(), "pipeline schedule left ", live_.size(),
                " micro-batches in flight and ", outbox_.size(), " gradients unsent");
  run_seconds_ = std::chrono::duration<double>(Clock::now() - start).count();
}

std::vector<LossValues> PipelineRunner::losses() {
  if (readouts_.empty()) return {};
  Model& last = *chunks_.back();
  last.ops().resolve_reads();
  return last.loss_values(readouts_);
}

}  // namespace nextron
