#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <utility>

#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/load_balancing.h"
#include "kernels/cpu_ops.h"

namespace nextron {

namespace {

// The host copy of a small f32 device tensor (statistics, per-row losses).
std::vector<float> to_host(const Ops& ops, const Tensor& t) {
  std::vector<float> v(t.numel());
  ops.download(v.data(), t, v.size() * sizeof(float));
  return v;
}

}  // namespace

Model::Model(const ModelConfig& config, const ModelComms& comms, std::shared_ptr<Ops> ops, const StageRange& stage,
             std::shared_ptr<LayerScratchPool> scratch)
    : config_(config),
      local_config_(ep_local_config(tp_local_config(config, comms.tp.size()), comms.ep.size(), comms.ep.rank())),
      comms_(comms),
      ops_(ops ? std::move(ops) : std::make_shared<CpuOps>()),
      stage_(stage),
      table_(local_config_, stage),
      pool_(scratch ? std::move(scratch) : std::make_shared<LayerScratchPool>()) {
  config_.validate();
  stage_.layer_end = stage_.end(config_);
  ops_->f32(flat_.params, {table_.total_numel()});
  ops_->f32(flat_.grads, {table_.total_numel()});
  if (ops_->act_dtype() == DType::f32)
    flat_.params_act = flat_.params;
  else
    ops_->act(flat_.params_act, {table_.total_numel()});
  // Layers of one kind (mixer x MLP) share their scratch (DecoderLayer::Scratch): one copy per kind, not per layer.
  for (int64_t i = stage_.layer_begin; i < stage_.layer_end; ++i) {
    auto& shared = pool_->kinds[{local_config_.layer_types[i], local_config_.mlp_type(i)}];
    if (!shared) shared = std::make_shared<DecoderLayer::Scratch>();
    layers_.push_back(std::make_unique<DecoderLayer>(local_config_, i, table_, flat_, *ops_, comms_.tp, comms_.ep,
                                                     &comms_.cp, shared));
  }
  set_recompute({});
  const VocabShard shard = vocab_shard();
  if (shard.begin + shard.size > config_.vocab_size) {
    std::vector<float> mask(static_cast<size_t>(shard.size), 0.0f);
    for (int64_t j = std::max<int64_t>(0, config_.vocab_size - shard.begin); j < shard.size; ++j)
      mask[static_cast<size_t>(j)] = -1e30f;
    ops_->f32(vocab_mask_.w, {shard.size});
    ops_->upload(vocab_mask_.w, mask.data(), mask.size() * sizeof(float));
    vocab_mask_.w_act = vocab_mask_.w;
  }
}

void Model::set_recompute(const RecomputeOptions& options) {
  options.validate();
  groups_ = recompute_groups(options, static_cast<int64_t>(layers_.size()));
  size_t widest = 0;
  for (const RecomputeGroup& g : groups_)
    if (g.recompute) widest = std::max(widest, static_cast<size_t>(g.end - g.begin));
  // The pool may serve other chunks with wider groups: it only grows.
  if (rc_saved_.size() < widest) rc_saved_.resize(widest);
  if (rc_hidden_.size() < widest) rc_hidden_.resize(widest);
  for (auto& layer : layers_) layer->set_recompute(options);
}

void Model::set_expert_load_logging(bool on) {
  for (auto& layer : layers_)
    if (layer->moe()) layer->moe()->set_load_logging(on);
}

void Model::reset_expert_load() {
  for (auto& layer : layers_)
    if (layer->moe()) layer->moe()->reset_load();
}

std::vector<ExpertLoad> Model::expert_load() const {
  std::vector<ExpertLoad> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const SparseMoe* moe = layers_[i]->moe();
    if (!moe) continue;
    std::vector<float> counts(static_cast<size_t>(config_.num_experts), 0.0f);
    if (moe->load().defined()) counts = to_host(*ops_, moe->load());
    out.push_back({stage_.layer_begin + static_cast<int64_t>(i), std::move(counts), moe->dropped()});
  }
  return out;
}

void Model::forward_group(const RecomputeGroup& g, const Tensor& x, Tensor& out, int64_t B, int64_t S,
                          MoeAuxStats& aux) {
  const int64_t Nl = comms_.tp.local_rows(B * S), H = config_.hidden_size;
  const Tensor* in = &x;
  for (int64_t i = g.begin; i < g.end; ++i) {
    const size_t k = static_cast<size_t>(i - g.begin);
    Tensor& o = i + 1 == g.end ? out : ops_->act(rc_hidden_[k], {Nl, H});
    layers_[i]->forward(rc_saved_[k], *in, o, B, S, aux);
    in = &o;
  }
}

void Model::params_changed() {
  if (flat_.params_act.raw() != flat_.params.raw()) ops_->cast(flat_.params_act, flat_.params);
}

Tensor Model::logits(const ModelActivations& a) const {
  const Tensor& logits = a.logits;
  if (logits.device() == Device::cpu && logits.dtype() == DType::f32) return logits;
  Tensor act_host = Tensor::zeros(logits.shape(), logits.dtype());
  act_host.copy_from(logits);
  if (act_host.dtype() == DType::f32) return act_host;
  NEXTRON_ASSERT(act_host.dtype() == DType::bf16);
  Tensor out = Tensor::zeros(logits.shape());
  const uint16_t* src = act_host.data<uint16_t>();
  float* dst = out.f32();
  for (int64_t i = 0; i < out.numel(); ++i) dst[i] = bf16_to_f32(src[i]);
  return out;
}

InferenceCache Model::new_inference_cache(int64_t batch, int64_t capacity) const {
  NEXTRON_CHECK(batch > 0 && capacity > 0, "generation: the cache needs at least one slot and one position, got ",
                batch, " slots of ", capacity);
  const ModelConfig& c = local_config_;
  InferenceCache cache;
  cache.batch = batch;
  cache.capacity = capacity;
  cache.length.assign(static_cast<size_t>(batch), 0);
  cache.layers.resize(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    LayerCache& l = cache.layers[i];
    if (c.layer_types[stage_.layer_begin + static_cast<int64_t>(i)] == MixerType::full_attention) {
      ops_->act(l.k, {batch, capacity, c.num_key_value_heads, c.head_dim});
      ops_->act(l.v, {batch, capacity, c.num_key_value_heads, c.head_dim});
    } else {
      // Zero window and state: a sequence's first conv inputs see the causal zero padding, its recurrence S_0 = 0.
      ops_->act(l.conv, {batch, c.linear_conv_kernel_dim - 1, c.conv_dim()});
      ops_->f32(l.state, {batch, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim});
    }
  }
  return cache;
}

std::vector<float> Model::forward_cached(InferenceCache& cache, int64_t first_slot, const int64_t* ids, int64_t B,
                                         int64_t S) {
  NEXTRON_CHECK(stage_.is_whole(config_) && !comms_.tp.active() && !comms_.cp.active() && !comms_.ep.active(),
                "generation runs the whole model on one process (no tensor, pipeline, context or expert "
                "parallelism); load the checkpoint into a one-process model (nextron-generate does)");
  NEXTRON_CHECK(B > 0 && S > 0, "generation: batch and new tokens must be positive, got B=", B, " S=", S);
  NEXTRON_CHECK(first_slot >= 0 && first_slot + B <= cache.batch, "generation: slots [", first_slot, ", ",
                first_slot + B, ") are outside the cache's ", cache.batch);
  NEXTRON_CHECK(cache.layers.size() == layers_.size(), "generation: the cache was built for ", cache.layers.size(),
                " layers, the model has ", layers_.size());
  Ops& ops = *ops_;
  const int64_t N = B * S, H = config_.hidden_size, V = local_config_.vocab_size;
  const std::vector<int64_t> lengths(cache.length.begin() + first_slot, cache.length.begin() + first_slot + B);
  for (int64_t b = 0; b < B; ++b)
    NEXTRON_CHECK(lengths[static_cast<size_t>(b)] + S <= cache.capacity, "generation: sequence ", first_slot + b,
                  " would reach ", lengths[static_cast<size_t>(b)] + S, " tokens, more than the cache's capacity ",
                  cache.capacity, "; build the cache with more positions");
  ops.upload(ops.i64(gen_ids_, {N}), ids, N * sizeof(int64_t));
  Tensor* x = &ops.act(gen_a_, {N, H});
  Tensor* y = &ops.act(gen_b_, {N, H});
  ops.embedding_forward(*x, ModuleWeights(table_, flat_, "").p("embed_tokens"), gen_ids_, vocab_shard());
  for (size_t i = 0; i < layers_.size(); ++i) {
    // The layer's cache entries for these slots (views: the layer writes straight into the cache).
    const LayerCache& whole = cache.layers[i];
    LayerCache slots;
    for (auto [dst, src] : {std::pair<Tensor*, const Tensor*>{&slots.conv, &whole.conv},
                            {&slots.state, &whole.state},
                            {&slots.k, &whole.k},
                            {&slots.v, &whole.v}})
      if (src->defined()) *dst = src->slice0(first_slot, first_slot + B);
    layers_[i]->forward_cached(slots, lengths, *x, *y, B, S);
    std::swap(x, y);
  }
  // Only each sequence's last position is scored.
  Tensor& last = ops.act(gen_last_, {B, H});
  for (int64_t b = 0; b < B; ++b) last.copy_elements_from(b * H, *x, (b * S + S - 1) * H, H);
  const ModuleWeights top(table_, flat_, "");
  Tensor& h = ops.act(gen_norm_, {B, H});
  ops.rmsnorm_forward(h, ops.f32(gen_rstd_, {B}), last, top.p("norm"), config_.rms_norm_eps);
  Tensor& logits = ops.act(gen_logits_, {B, V});
  ops.linear_forward(logits, h, top.p("lm_head"), vocab_mask_.w.defined() ? &vocab_mask_ : nullptr);
  ops.resolve_reads();  // the embedding's id check, before the logits are used
  std::vector<float> all(static_cast<size_t>(B * V));
  if (logits.dtype() == DType::f32) {
    ops.download(all.data(), logits, all.size() * sizeof(float));
  } else {
    Tensor& f = ops.f32(gen_logits_f32_, {B, V});
    ops.cast(f, logits);
    ops.download(all.data(), f, all.size() * sizeof(float));
  }
  const int64_t Vr = config_.vocab_size;  // the real vocabulary (padded columns dropped)
  std::vector<float> out(static_cast<size_t>(B * Vr));
  for (int64_t b = 0; b < B; ++b) std::copy_n(all.begin() + b * V, Vr, out.begin() + b * Vr);
  for (int64_t b = 0; b < B; ++b) cache.length[static_cast<size_t>(first_slot + b)] += S;
  return out;
}

VocabShard Model::vocab_shard() const {
  const int64_t Vl = local_config_.vocab_size;
  return {comms_.tp.rank() * Vl, Vl, Vl * comms_.tp.size()};
}

Tensor& Model::stage_input(ModelActivations& a, int64_t B, int64_t S) {
  NEXTRON_CHECK(!stage_.first, "stage_input: the first stage computes its input from token ids");
  a.hidden.resize(layers_.size() + 1);
  return ops_->act(a.hidden[0], {comms_.tp.local_rows(B * S), config_.hidden_size});
}

const Tensor& Model::stage_output(const ModelActivations& a) const {
  NEXTRON_CHECK(!stage_.last && a.hidden.size() == layers_.size() + 1,
                "stage_output: only a stage without the loss has an output, after its forward");
  return a.hidden.back();
}

void Model::forward_body(ModelActivations& a, const int64_t* ids, int64_t B, int64_t S) {
  NEXTRON_CHECK(B > 0 && S > 0, "forward: batch and sequence length must be positive, got B=", B, " S=", S);
  const TensorParallel& tp = comms_.tp;
  Ops& ops = *ops_;
  const int64_t N = B * S, H = config_.hidden_size, V = local_config_.vocab_size,
                L = static_cast<int64_t>(layers_.size());
  NEXTRON_CHECK(!tp.sequence_parallel() || N % tp.size() == 0, "sequence parallelism splits the ", N,
                " tokens of a micro-batch over TP ", tp.size(), ": choose a sequence length divisible by TP");
  const int64_t Nl = tp.local_rows(N);
  a.B = B;
  a.S = S;
  a.hidden.resize(L + 1);
  a.layers.resize(L);
  MoeAuxStats& aux = a.aux;
  if (stage_.first) {
    NEXTRON_CHECK(ids != nullptr, "forward: the first stage needs token ids");
    ops.upload(ops.i64(a.ids_dev, {N}), ids, N * sizeof(int64_t));
    Tensor& h0 = ops.act(a.hidden[0], {Nl, H});
    const ParamRef embed = ModuleWeights(table_, flat_, "").p("embed_tokens");
    if (tp.active()) {
      // Each rank looks up the ids of its vocab rows; the region exit sums (or reduce-scatters) the partial rows.
      Tensor& e = ops.act(embed_region_, {N, H});
      ops.embedding_forward(e, embed, a.ids_dev, vocab_shard());
      tp.exit_forward(e, h0, N, H);
    } else {
      ops.embedding_forward(h0, embed, a.ids_dev, vocab_shard());
    }
    aux.reset(ops, config_.num_experts);
  } else {
    NEXTRON_CHECK(a.hidden[0].numel() == Nl * H, "forward: a stage after the first reads its input from ",
                  "stage_input(), which holds ", a.hidden[0].numel(), " values for ", Nl, " x ", H);
    // The router statistics arrive with the activations (set_aux_stats): the load-balancing loss is one sum over
    // every MoE layer of the model, whichever stage holds it.
    NEXTRON_CHECK(config_.num_experts == 0 || a.aux.count_sum.numel() == config_.num_experts,
                  "forward: a stage after the first needs the router statistics of the stages before it");
  }
  for (const RecomputeGroup& g : groups_) {
    if (g.recompute) {
      // Only the group's input (and output: the next group's input) stay in the record.
      forward_group(g, a.hidden[g.begin], ops.act(a.hidden[g.end], {Nl, H}), B, S, aux);
      continue;
    }
    for (int64_t i = g.begin; i < g.end; ++i)
      layers_[i]->forward(a.layers[i], a.hidden[i], ops.act(a.hidden[i + 1], {Nl, H}), B, S, aux);
  }
  if (!stage_.last) return;
  if (local_config_.experts_folded && comms_.tp.active() && aux.total_rows > 0) {
    // Folded experts: each TP rank routed its own sequence shard, so the micro-batch's statistics are their sum
    // (every rank routed the same number of rows).
    comms_.tp.sum(aux.count_sum);
    comms_.tp.sum(aux.prob_sum);
    aux.total_rows *= comms_.tp.size();
  }
  if (comms_.data_parallel && aux.total_rows > 0) {
    // The load-balancing loss of the global micro-batch: sum the statistics of every data-parallel replica.
    // The data-parallel group sums on the host (MPI): one wait for both statistics (and whatever else is pending).
    const int64_t E = config_.num_experts;
    std::vector<float> counts(E), probs(E);
    ops.read_later(counts.data(), aux.count_sum, E * sizeof(float));
    ops.read_later(probs.data(), aux.prob_sum, E * sizeof(float));
    ops.resolve_reads();
    std::vector<double> stats(2 * E + 1);
    for (int64_t e = 0; e < E; ++e) {
      stats[e] = counts[e];
      stats[E + e] = probs[e];
    }
    stats[2 * E] = aux.total_rows;
    comms_.data_parallel->all_reduce_sum(stats.data(), 2 * E + 1);
    for (int64_t e = 0; e < E; ++e) {
      counts[e] = static_cast<float>(stats[e]);
      probs[e] = static_cast<float>(stats[E + e]);
    }
    ops.upload(aux.count_sum, counts.data(), E * sizeof(float));
    ops.upload(aux.prob_sum, probs.data(), E * sizeof(float));
    aux.total_rows = stats[2 * E];
  }
  const ModuleWeights top(table_, flat_, "");
  Tensor& fh = ops.act(a.final_h, {Nl, H});
  ops.rmsnorm_forward(fh, ops.f32(a.final_rstd, {Nl}), a.hidden[L], top.p("norm"), config_.rms_norm_eps);
  a.final_h_region = tp.enter_forward(ops, fh, a.final_h_full, N, H);
  ops.linear_forward(ops.act(a.logits, {B, S, V}), a.final_h_region, top.p("lm_head"),
                     vocab_mask_.w.defined() ? &vocab_mask_ : nullptr);
}

void Model::score(ModelActivations& a, ScoreReadout& out) {
  Ops& ops = *ops_;
  const int64_t N = a.B * a.S;
  out = ScoreReadout{};
  ops.f32(a.row_loss, {N});
  ops.f32(a.lse, {N});
  ops.upload(ops.i64(a.targets_dev, {N}), a.targets.data(), N * sizeof(int64_t));
  const TensorParallel& tp = comms_.tp;
  if (tp.active()) {
    // Vocab-parallel: three numbers per row and rank cross the TP group instead of the (N, V) logits.
    ops.cross_entropy_partial(ops.f32(ce_stats_, {3, N}), a.logits, a.targets_dev, vocab_shard());
    tp.all_gather(ce_stats_, ops.f32(ce_stats_all_, {tp.size(), 3, N}));
    ops.cross_entropy_combine(&out.loss_sum, a.row_loss, a.lse, ce_stats_all_, a.targets_dev, config_.vocab_size);
  } else {
    ops.cross_entropy_forward(&out.loss_sum, a.row_loss, a.lse, a.logits, a.targets_dev);
  }
  double count = static_cast<double>(
      std::count_if(a.targets.begin(), a.targets.end(), [](int64_t t) { return t != cpu::kIgnoreIndex; }));
  // The mean is over the global micro-batch's scored tokens (the gradient is then a plain sum over replicas): the
  // backward needs the count now; the loss sum is summed in loss_values.
  if (comms_.data_parallel) comms_.data_parallel->all_reduce_sum(&count, 1);
  out.tokens = static_cast<int64_t>(count);
  a.loss = LossValues{};
  a.loss.tokens = out.tokens;
  if (a.aux.total_rows > 0) {
    const int64_t E = a.aux.count_sum.numel();
    out.aux_counts.resize(E);
    out.aux_probs.resize(E);
    out.aux_rows = a.aux.total_rows;
    ops.read_later(out.aux_counts.data(), a.aux.count_sum, E * sizeof(float));
    ops.read_later(out.aux_probs.data(), a.aux.prob_sum, E * sizeof(float));
  }
}

std::vector<LossValues> Model::loss_values(const std::vector<ScoreReadout>& readouts) const {
  std::vector<double> sums;
  for (const ScoreReadout& r : readouts) sums.push_back(r.loss_sum);
  if (comms_.data_parallel && !sums.empty())
    comms_.data_parallel->all_reduce_sum(sums.data(), static_cast<int64_t>(sums.size()));
  std::vector<LossValues> out;
  for (size_t m = 0; m < readouts.size(); ++m) {
    const ScoreReadout& r = readouts[m];
    LossValues v;
    v.tokens = r.tokens;
    v.lm_loss = r.tokens > 0 ? sums[m] / static_cast<double>(r.tokens) : 0.0;
    if (r.aux_rows > 0)
      v.aux_loss = cpu::aux_loss_value(r.aux_counts.data(), r.aux_probs.data(), r.aux_rows, config_.num_experts);
    v.loss = v.lm_loss + config_.router_aux_loss_coef * v.aux_loss;
    out.push_back(v);
  }
  return out;
}

LossValues Model::forward(ModelActivations& a, const int64_t* ids, const int64_t* labels, int64_t B, int64_t S) {
  forward_body(a, ids, B, S);
  a.targets.clear();
  a.loss = LossValues{};
  if (!labels || !stage_.last) {
    ops_->resolve_reads();  // the embedding's id check: a forward without the loss still reports bad ids
    return a.loss;
  }
  // transformers' shift: position s is scored against labels[s + 1]; the last position of a row has no target.
  a.targets.assign(B * S, -100);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s + 1 < S; ++s) a.targets[b * S + s] = labels[b * S + s + 1];
  score(a, a.readout);
  ops_->resolve_reads();
  a.loss = loss_values(a.readout);
  return a.loss;
}

LossValues Model::forward_targets(ModelActivations& a, const int64_t* ids, const int64_t* targets, int64_t B,
                                  int64_t S) {
  forward_body(a, ids, B, S);
  a.loss = LossValues{};
  if (!stage_.last) {  // a stage without the loss keeps no targets; its backward starts from the output gradient
    a.targets.clear();
    ops_->resolve_reads();
    return a.loss;
  }
  a.targets.assign(targets, targets + B * S);
  score(a, a.readout);
  ops_->resolve_reads();
  a.loss = loss_values(a.readout);
  return a.loss;
}

void Model::forward_scored(ModelActivations& a, const int64_t* ids, const int64_t* targets, int64_t B, int64_t S,
                           ScoreReadout& out) {
  forward_body(a, ids, B, S);
  a.loss = LossValues{};
  out = ScoreReadout{};
  if (!stage_.last) {
    a.targets.clear();
    return;
  }
  a.targets.assign(targets, targets + B * S);
  score(a, out);
}

std::vector<double> Model::per_sequence_loss(const ModelActivations& a) const {
  const int64_t B = a.B, S = a.S;
  std::vector<double> out(B, std::numeric_limits<double>::quiet_NaN());
  if (a.targets.empty()) return out;
  const std::vector<float> row_loss = to_host(*ops_, a.row_loss);
  const float* rl = row_loss.data();
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    int64_t n = 0;
    for (int64_t t = 0; t < S; ++t)
      if (a.targets[b * S + t] != -100) {
        s += rl[b * S + t];
        ++n;
      }
    if (n > 0) out[b] = s / static_cast<double>(n);
  }
  return out;
}

void Model::set_routing_replay(RoutingReplay* replay) {
  for (size_t i = 0; i < layers_.size(); ++i)
    if (SparseMoe* moe = layers_[i]->moe())
      moe->set_routing_replay(replay, stage_.layer_begin + static_cast<int64_t>(i));
}

void Model::backward(const ModelActivations& a, float loss_scale) {
  NEXTRON_CHECK(stage_.last, "backward: a stage without the loss starts from its output gradient (backward_stage)");
  NEXTRON_CHECK(!a.targets.empty(), "backward() needs a forward() with labels first");
  backward_from(a, nullptr, loss_scale);
}

Tensor& Model::stage_output_grad(ModelActivations& a) {
  NEXTRON_CHECK(!stage_.last, "stage_output_grad: the last stage's backward starts from the loss");
  return ops_->act(a.d_output, {comms_.tp.local_rows(a.B * a.S), config_.hidden_size});
}

void Model::backward_stage(ModelActivations& a, float loss_scale, Tensor* input_grad) {
  if (stage_.last) {
    NEXTRON_CHECK(!a.targets.empty(), "backward() needs a forward() with labels first");
    backward_from(a, nullptr, loss_scale);
  } else {
    NEXTRON_CHECK(a.d_output.numel() == comms_.tp.local_rows(a.B * a.S) * config_.hidden_size,
                  "backward_stage: fill stage_output_grad() with the gradient of this stage's output first");
    backward_from(a, &a.d_output, loss_scale);
  }
  if (!stage_.first) {
    Tensor& out = input_grad ? *input_grad : a.d_input;
    ops_->act(out, dhidden_a_.shape());
    out.copy_from(dhidden_a_);
  }
}

const Tensor& Model::stage_input_grad(const ModelActivations& a) const {
  NEXTRON_CHECK(!stage_.first, "stage_input_grad: the first stage's input is token ids");
  return a.d_input;
}

void Model::backward_from(const ModelActivations& a, const Tensor* d_output, float loss_scale) {
  const TensorParallel& tp = comms_.tp;
  Ops& ops = *ops_;
  const int64_t N = a.B * a.S, Nl = tp.local_rows(N), H = config_.hidden_size, V = local_config_.vocab_size,
                L = static_cast<int64_t>(layers_.size());
  const ModuleWeights top(table_, flat_, "");
  const float d_aux = loss_scale * static_cast<float>(config_.router_aux_loss_coef);
  if (d_output) {
    ops.act(dhidden_a_, {Nl, H});
    dhidden_a_.copy_from(*d_output);
  } else {
    Tensor& dlogits = ops.act(dlogits_, {N, V});
    if (a.loss.tokens > 0) {
      const double scale = loss_scale / static_cast<double>(a.loss.tokens);
      ops.cross_entropy_backward(dlogits, a.logits, a.lse, a.targets_dev, scale, vocab_shard());
    } else {
      ops.zero(dlogits);
    }
    Tensor& dfh = ops.act_zeroed(dfinal_h_, {N, H});
    ops.linear_backward(&dfh, top.p("lm_head"), nullptr, dlogits, a.final_h_region);
    Tensor* dfh_local = &dfh;
    if (tp.active()) {
      Tensor& d = ops.act_zeroed(dfinal_h_local_, {Nl, H});
      tp.enter_backward(ops, dfh, d, dscratch_, N, H);
      dfh_local = &d;
    }
    ops.act_zeroed(dhidden_a_, {Nl, H});
    ops.rmsnorm_backward(&dhidden_a_, top.p("norm"), *dfh_local, a.hidden[L], a.final_rstd);
  }
  for (auto g = groups_.rbegin(); g != groups_.rend(); ++g) {
    if (g->recompute) {
      // Rerun the group's forward from its input; its router statistics are not counted again.
      rc_aux_.reset(ops, config_.num_experts);
      rc_aux_.counts_load = false;
      forward_group(*g, a.hidden[g->begin], ops.act(rc_out_, {Nl, H}), a.B, a.S, rc_aux_);
    }
    for (int64_t i = g->end - 1; i >= g->begin; --i) {
      ops.act_zeroed(dhidden_b_, {Nl, H});
      const DecoderLayer::Saved& saved = g->recompute ? rc_saved_[static_cast<size_t>(i - g->begin)] : a.layers[i];
      layers_[i]->backward(saved, dhidden_a_, dhidden_b_, a.aux, d_aux);
      std::swap(dhidden_a_, dhidden_b_);
    }
  }
  if (!stage_.first) return;  // dhidden_a_ is the gradient of the stage input
  const ParamRef embed = top.p("embed_tokens");
  // Under TP every rank needs the gradient of all N rows for its vocab rows (a gather under SP).
  ops.embedding_backward(embed, tp.exit_backward(ops, dhidden_a_, dembed_full_, N, H), a.ids_dev, vocab_shard());
}

}  // namespace nextron
