#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/train_checkpoint.h"
#include "core/error.h"
#include "core/metrics.h"
#include "core/parallel_for.h"
#include "core/peak_flops.h"
#include "model/flops.h"
#include "model/init.h"
#include "optim/grad_clip.h"

namespace nextron {

namespace {
// Set by SIGINT/SIGTERM: the loop finishes the current step, saves a checkpoint and exits.
volatile std::sig_atomic_t g_stop_requested = 0;
void request_stop(int) { g_stop_requested = 1; }
}  // namespace

Trainer::Trainer(const TrainOptions& options, SampleFn source) : opt_(options), sample_(std::move(source)) {
  opt_.validate(/*need_data=*/!sample_);
  if (opt_.threads > 0) set_cpu_threads(opt_.threads);
  const ModelConfig config =
      opt_.init_from.empty() ? ModelConfig::from_file(opt_.model_config) : read_hf_config(opt_.init_from);
  model_ = std::make_unique<Model>(config);
  if (opt_.init_from.empty())
    init_parameters(model_->table(), model_->params().f32(), opt_.init_seed, opt_.initializer_range);
  else
    load_hf_weights(opt_.init_from, model_->table(), model_->params().f32());

  if (!sample_) {
    stream_ = std::make_unique<SampleStream>(opt_.data, opt_.seq_len, opt_.valid_fraction, opt_.data_seed);
    for (int d = 0; d < stream_->num_datasets(); ++d) check_vocab(stream_->dataset(d), config.vocab_size);
    sample_ = [this](int64_t index, int64_t* out) { stream_->train_sample(index, out); };
  }

  if (opt_.lr.decay_steps == 0) opt_.lr.decay_steps = opt_.train_steps;
  schedule_ = std::make_unique<LrSchedule>(opt_.lr);
  adam_ = std::make_unique<AdamW>(model_->table(), FlatRange{0, model_->table().total_numel()}, opt_.adam);

  if (opt_.resume != "none" && !opt_.save_dir.empty()) {
    if (opt_.resume == "auto") {
      if (auto dir = find_latest_checkpoint(opt_.save_dir)) resume_from(*dir);
    } else {
      resume_from(opt_.resume);
    }
  } else if (opt_.resume != "none" && opt_.resume != "auto") {
    resume_from(opt_.resume);
  }
}

Trainer::~Trainer() = default;

StepRecord Trainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t M = opt_.micro_batch, S = opt_.seq_len, accum = opt_.global_batch / opt_.micro_batch;
  rows_.resize(M * (S + 1));
  ids_.resize(M * S);
  targets_.resize(M * S);
  model_->zero_grad();
  StepRecord rec;
  for (int64_t a = 0; a < accum; ++a) {
    for (int64_t r = 0; r < M; ++r) sample_(position_++, rows_.data() + r * (S + 1));
    for (int64_t r = 0; r < M; ++r)
      for (int64_t t = 0; t < S; ++t) {
        ids_[r * S + t] = rows_[r * (S + 1) + t];
        targets_[r * S + t] = rows_[r * (S + 1) + t + 1];
      }
    const LossValues lv = model_->forward_targets(ids_.data(), targets_.data(), M, S);
    NEXTRON_CHECK(std::isfinite(lv.loss), "loss is ", lv.loss, " at step ", step_,
                  "; training diverged (lower --lr, raise --lr-warmup-steps or check the data)");
    model_->backward(1.0f / static_cast<float>(accum));
    rec.loss += lv.loss / static_cast<double>(accum);
    rec.lm_loss += lv.lm_loss / static_cast<double>(accum);
    rec.aux_loss += lv.aux_loss / static_cast<double>(accum);
    rec.tokens += M * S;
  }
  const FlatRange all{0, model_->table().total_numel()};
  float* grads = model_->grads().f32();
  rec.grad_norm = std::sqrt(grad_sq_sum(grads, all));
  NEXTRON_CHECK(std::isfinite(rec.grad_norm), "gradient norm is ", rec.grad_norm, " at step ", step_,
                "; training diverged (lower --lr or enable --clip-grad)");
  if (opt_.clip_grad > 0) {
    const double c = clip_coefficient(rec.grad_norm, opt_.clip_grad);
    if (c < 1.0) scale_grads(grads, all, static_cast<float>(c));
  }
  rec.lr = schedule_->lr_at(step_);
  adam_->step(model_->params().f32(), grads, rec.lr);
  ++step_;
  consumed_tokens_ += rec.tokens;
  rec.step = step_;
  rec.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rec;
}

double Trainer::validate() {
  NEXTRON_CHECK(stream_ && stream_->num_valid_samples() > 0,
                "no validation samples: raise --valid-fraction or use more data");
  const int64_t M = opt_.micro_batch, S = opt_.seq_len, nvalid = stream_->num_valid_samples();
  rows_.resize(M * (S + 1));
  ids_.resize(M * S);
  targets_.resize(M * S);
  double total = 0;
  for (int64_t it = 0; it < opt_.eval_iters; ++it) {
    for (int64_t r = 0; r < M; ++r) stream_->valid_sample((it * M + r) % nvalid, rows_.data() + r * (S + 1));
    for (int64_t r = 0; r < M; ++r)
      for (int64_t t = 0; t < S; ++t) {
        ids_[r * S + t] = rows_[r * (S + 1) + t];
        targets_[r * S + t] = rows_[r * (S + 1) + t + 1];
      }
    total += model_->forward_targets(ids_.data(), targets_.data(), M, S).lm_loss;
  }
  return total / static_cast<double>(opt_.eval_iters);
}

std::string Trainer::save_checkpoint() {
  NEXTRON_CHECK(!opt_.save_dir.empty(), "saving a checkpoint needs --save DIR");
  OptimizerShard shard;
  shard.range = adam_->range();
  shard.exp_avg = adam_->exp_avg().f32();
  shard.exp_avg_sq = adam_->exp_avg_sq().f32();
  shard.steps_taken = adam_->steps_taken();
  shard.hyper = adam_->hyper();
  TrainState st;
  st.step = step_;
  st.data_position = position_;
  st.consumed_tokens = consumed_tokens_;
  // Every random choice of a run derives from these seeds and the data position (no dropout, deterministic
  // kernels), so they are the whole RNG state.
  st.rng_state = nlohmann::json{{"init_seed", opt_.init_seed}, {"data_seed", opt_.data_seed}}.dump();
  st.scheduler = {{"style", lr_decay_style_name(opt_.lr.style)},
                  {"lr", opt_.lr.lr},
                  {"min_lr", opt_.lr.min_lr},
                  {"warmup_steps", opt_.lr.warmup_steps},
                  {"decay_steps", opt_.lr.decay_steps}};
  st.args = {{"seq_len", opt_.seq_len},           {"micro_batch", opt_.micro_batch},
             {"global_batch", opt_.global_batch}, {"train_steps", opt_.train_steps},
             {"data_seed", opt_.data_seed},       {"valid_fraction", opt_.valid_fraction},
             {"clip_grad", opt_.clip_grad}};
  if (stream_) st.args["data_fingerprint"] = std::to_string(stream_->fingerprint());
  return save_train_checkpoint(opt_.save_dir, model_->config(), model_->table(), model_->params().f32(), shard, st,
                               opt_.keep_last);
}

void Trainer::resume_from(const std::string& dir) {
  const LoadedCheckpoint ck = load_train_checkpoint(dir, model_->config(), model_->table(), model_->params().f32(),
                                                    adam_->range(), adam_->exp_avg().f32(), adam_->exp_avg_sq().f32());
  // The sample order must be the one the checkpoint was trained on, or "the next sample" means nothing.
  const auto& a = ck.state.args;
  auto same = [&](const char* key, const nlohmann::json& now) {
    NEXTRON_CHECK(!a.contains(key) || a[key] == now, "checkpoint ", dir, " was trained with ", key, " = ",
                  a.contains(key) ? a[key].dump() : "?", " but this run has ", now.dump(),
                  "; resume with the same setting or start a new --save directory");
  };
  same("seq_len", opt_.seq_len);
  same("micro_batch", opt_.micro_batch);
  same("global_batch", opt_.global_batch);
  same("data_seed", opt_.data_seed);
  same("valid_fraction", opt_.valid_fraction);
  if (stream_) same("data_fingerprint", std::to_string(stream_->fingerprint()));
  adam_->set_steps_taken(ck.steps_taken);
  step_ = ck.state.step;
  position_ = ck.state.data_position;
  consumed_tokens_ = ck.state.consumed_tokens;
  std::fprintf(stderr, "resumed from %s at step %lld (sample %lld)\n", dir.c_str(), static_cast<long long>(step_),
               static_cast<long long>(position_));
}

void Trainer::export_hf(const std::string& dir) const {
  save_hf_checkpoint(dir, model_->config(), model_->table(), model_->params().f32());
}

void Trainer::run() {
  const ModelConfig& c = model_->config();
  const double flops_per_token = training_flops_per_token(c, opt_.seq_len);
  const double peak = opt_.peak_tflops > 0 ? opt_.peak_tflops * 1e12 : measure_cpu_peak_flops(cpu_threads());
  std::string metrics_path = opt_.metrics_path;
  if (metrics_path.empty() && !opt_.save_dir.empty()) {
    std::filesystem::create_directories(opt_.save_dir);
    metrics_path = (std::filesystem::path(opt_.save_dir) / "metrics.jsonl").string();
  }
  std::unique_ptr<MetricsLog> metrics;
  if (!metrics_path.empty()) metrics = std::make_unique<MetricsLog>(metrics_path);
  std::printf(
      "nextron-train: %lld parameters, %lld layers (%s), %lld steps of %lld x %lld tokens; %.3g training "
      "FLOPs/token; MFU against %.3g TFLOP/s%s\n",
      static_cast<long long>(model_->table().total_numel()), static_cast<long long>(c.num_hidden_layers),
      c.num_moe_layers() ? "MoE" : "dense", static_cast<long long>(opt_.train_steps),
      static_cast<long long>(opt_.global_batch), static_cast<long long>(opt_.seq_len), flops_per_token, peak / 1e12,
      opt_.peak_tflops > 0 ? "" : " (measured CPU fp32 GEMM peak)");
  if (step_ > 0) std::printf("continuing at step %lld\n", static_cast<long long>(step_));
  const int64_t first_step = step_;
  std::fflush(stdout);

  g_stop_requested = 0;
  auto old_int = std::signal(SIGINT, request_stop);
  auto old_term = std::signal(SIGTERM, request_stop);
  ProgressBar bar(opt_.train_steps, std::cerr, step_);
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  while (step_ < opt_.train_steps && !g_stop_requested) {
    const StepRecord r = step();
    StepMetrics m;
    m.step = r.step;
    m.total_steps = opt_.train_steps;
    m.loss = r.loss;
    m.lm_loss = r.lm_loss;
    m.aux_loss = r.aux_loss;
    m.lr = r.lr;
    m.grad_norm = r.grad_norm;
    m.tokens_per_s = static_cast<double>(r.tokens) / r.seconds;
    m.mfu = model_flops_utilization(m.tokens_per_s, flops_per_token, peak);
    m.seconds = elapsed();
    m.tokens = consumed_tokens_;
    if (metrics) metrics->write(m);
    if (opt_.progress) bar.update(m);
    if (step_ % opt_.log_interval == 0 || step_ == opt_.train_steps) {
      if (opt_.progress) bar.clear();
      std::printf("%s\n", format_step_line(m).c_str());
      std::fflush(stdout);
    }
    if (opt_.eval_interval > 0 && (step_ % opt_.eval_interval == 0 || step_ == opt_.train_steps)) {
      ValidMetrics v;
      v.step = step_;
      v.valid_loss = validate();
      v.seconds = elapsed();
      v.tokens = consumed_tokens_;
      if (metrics) metrics->write(v);
      if (opt_.progress) bar.clear();
      std::printf("%s\n", format_valid_line(v).c_str());
      std::fflush(stdout);
    }
    if (opt_.save_interval > 0 && step_ % opt_.save_interval == 0 && step_ < opt_.train_steps) {
      const std::string dir = save_checkpoint();
      if (opt_.progress) bar.clear();
      std::printf("saved %s\n", dir.c_str());
    }
  }
  if (opt_.progress) bar.finish();
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  if (g_stop_requested) std::printf("stop requested: saving at step %lld\n", static_cast<long long>(step_));
  if (step_ == first_step)
    std::printf("nothing to train: the checkpoint is already at step %lld of %lld (raise --train-steps to go on)\n",
                static_cast<long long>(step_), static_cast<long long>(opt_.train_steps));
  else if (!opt_.save_dir.empty())
    std::printf("saved %s\n", save_checkpoint().c_str());
  if (!opt_.export_hf.empty() && !g_stop_requested) {
    export_hf(opt_.export_hf);
    std::printf("exported HF checkpoint %s\n", opt_.export_hf.c_str());
  }
  std::fflush(stdout);
}

}  // namespace nextron
