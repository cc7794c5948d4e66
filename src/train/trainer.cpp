#include "train/trainer.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "checkpoint/hf_checkpoint.h"
#include "checkpoint/save_dir.h"
#include "checkpoint/train_checkpoint.h"
#include "core/error.h"
#include "core/metrics.h"
#include "core/parallel_for.h"
#include "core/peak_flops.h"
#include "generate/generator.h"
#include "generate/prompts.h"
#include "model/flops.h"
#include "model/init.h"
#include "model/param_table.h"
#include "optim/grad_clip.h"
#include "train/stop_grace.h"

namespace nextron {

namespace {
// The time between a stop signal and SIGKILL below which a --save run is told how to raise it (stop_grace.h).
constexpr double kStopGraceWantedSeconds = 60;

// Set by SIGINT/SIGTERM/SIGUSR1: the loop finishes the current step, saves a checkpoint and exits.
volatile std::sig_atomic_t g_stop_requested = 0;
volatile std::sig_atomic_t g_stop_signal = 0;

// Numbers in messages: %g keeps a diverging value short ("6.02e+37", not 38 digits).
std::string short_number(double v) {
  char s[32];
  std::snprintf(s, sizeof s, "%.4g", v);
  return s;
}

// What to try when training diverged. Clipping is only suggested when it is off: with it on, a lower learning
// rate is what helps.
std::string divergence_advice(const TrainOptions& o) {
  const std::string lr = "lower --lr (now " + short_number(o.lr.lr) + ")";
  if (o.clip_grad > 0) return lr + " or raise --lr-warmup-steps, or check the data";
  return "enable --clip-grad (e.g. 1.0), " + lr + " or raise --lr-warmup-steps, or check the data";
}

// One line of the start-up housekeeping in the log.
void note(const std::string& line) {
  std::printf("nextron-train: %s\n", line.c_str());
  std::fflush(stdout);
}

// Elements [offset, offset + n) of a flat f32 buffer on any device, as a host vector (and back).
std::vector<float> to_host(const Tensor& flat, int64_t offset, int64_t n) {
  std::vector<float> out(n);
  if (n == 0) return out;
  if (flat.device() == Device::cpu) {
    std::copy_n(flat.f32() + offset, n, out.data());
  } else {
    Tensor host = Tensor::zeros({n});
    host.copy_from(Tensor::view_of(flat, offset, {n}));
    std::copy_n(host.f32(), n, out.data());
  }
  return out;
}
// The same appended to `out` without a second host copy (device buffers come over in slices of 16 Mi elements):
// the checkpoint's copies of a rank's buffers are the only memory a save adds.
void append_host(const Tensor& flat, int64_t offset, int64_t n, std::vector<float>& out) {
  const size_t at = out.size();
  out.resize(at + static_cast<size_t>(n));
  if (flat.device() == Device::cpu) {
    std::copy_n(flat.f32() + offset, n, out.data() + at);
    return;
  }
  constexpr int64_t kSlice = int64_t{1} << 24;
  for (int64_t done = 0; done < n; done += kSlice) {
    const int64_t k = std::min(kSlice, n - done);
    Tensor host = Tensor::zeros({k});
    host.copy_from(Tensor::view_of(flat, offset + done, {k}));
    std::copy_n(host.f32(), k, out.data() + at + static_cast<size_t>(done));
  }
}
void from_host(Tensor& flat, int64_t offset, const float* src, int64_t n) {
  if (n == 0) return;
  if (flat.device() == Device::cpu) {
    std::copy_n(src, n, flat.f32() + offset);
    return;
  }
  Tensor host = Tensor::zeros({n});
  std::copy_n(src, n, host.f32());
  Tensor dst = Tensor::view_of(flat, offset, {n});
  dst.copy_from(host);
}
void request_stop(int sig) {
  g_stop_requested = 1;
  g_stop_signal = sig;
}

// SIGINT, SIGTERM and SIGUSR1 request a stop while this lives: from the first step to the end of the final save, so a
// second signal (Slurm's scancel after its --signal, an impatient ^C) can never kill a rank in the middle of a save.
// The previous handlers come back at restore() or when the run leaves by an exception.
class StopSignals {
 public:
  StopSignals() {
    g_stop_requested = 0;
    g_stop_signal = 0;
    old_int_ = std::signal(SIGINT, request_stop);
    old_term_ = std::signal(SIGTERM, request_stop);
    // Open MPI's mpirun forwards SIGUSR1 to every rank at once (SIGINT / SIGTERM only after
    // odls_base_sigkill_timeout, and kills the ranks that much later): `kill -USR1 <mpirun>` is the prompt way to
    // stop a job with a save.
    old_usr1_ = std::signal(SIGUSR1, request_stop);
  }
  ~StopSignals() { restore(); }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  void restore() {
    if (restored_) return;
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
    std::signal(SIGUSR1, old_usr1_);
    restored_ = true;
  }

 private:
  using Handler = void (*)(int);
  Handler old_int_ = SIG_DFL, old_term_ = SIG_DFL, old_usr1_ = SIG_DFL;
  bool restored_ = false;
};
}  // namespace

Trainer::Trainer(const TrainOptions& options, SampleFn source, Communicator* world, TrainBackend backend)
    : opt_(options), sample_(std::move(source)) {
  opt_.validate(/*need_data=*/!sample_);
  if (!opt_.export_hf.empty()) opt_.export_hf = strip_trailing_separators(opt_.export_hf);
  if (opt_.threads > 0) set_cpu_threads(opt_.threads);
  ModelConfig config =
      opt_.init_from.empty() ? ModelConfig::from_file(opt_.model_config) : read_hf_config(opt_.init_from);
  {
    // Megatron's vocabulary padding: the embedding and lm_head hold a multiple of divisible_by x TP rows, so any
    // vocabulary splits over TP (rows past vocab_size are padding: model/config.h).
    const int64_t multiple = opt_.vocab_divisible_by * std::max(1, opt_.parallel.tp);
    config.padded_vocab_size = (config.vocab_size + multiple - 1) / multiple * multiple;
  }
  config.force_load_balancing = opt_.force_load_balancing;
  config.expert_capacity_factor = std::isnan(opt_.expert_capacity_factor) ? 0.0 : opt_.expert_capacity_factor;
  config.drop_by_position = opt_.token_drop_policy == "position";
  config.pad_to_capacity = opt_.pad_to_capacity;
  {
    // Before the model's first buffer: refuse what this machine cannot hold, naming the fields that make it large.
    // Each rank holds whole-model buffers today (initialisation, checkpoints), so the check is per process.
    MemoryNeed need;
    if (opt_.device == "cuda")
      need = {2 * kWeightsBytesPerParam, "host fp32 weights (initial values and this rank's copy)", 0};
    else
      need.activation_bytes = activation_bytes_lower_bound(config, opt_.micro_batch, opt_.seq_len);
    check_fits_in_memory(config, need);
  }
  ParallelSizes sizes = opt_.parallel;
  if (sizes.etp == 0) sizes.etp = sizes.tp;  // Megatron's default: experts follow TP
  // MoE parallel folding: ETP 1 under TP keeps each expert whole and routes each rank's own sequence shard.
  config.experts_folded = sizes.etp == 1 && sizes.tp > 1 && config.num_moe_layers() > 0;
  if (opt_.layers_per_virtual_stage > 0) {
    // Megatron's other spelling of VPP: layers per model chunk.
    const int64_t per_rank = sizes.pp > 0 ? config.num_hidden_layers / sizes.pp : 0;
    NEXTRON_CHECK(sizes.vpp == 1, "--num-layers-per-virtual-pipeline-stage and --virtual-pipeline-model-parallel-size ",
                  "both set: give one of them");
    NEXTRON_CHECK(sizes.pp > 1 && per_rank % opt_.layers_per_virtual_stage == 0,
                  "--num-layers-per-virtual-pipeline-stage ", opt_.layers_per_virtual_stage, " does not divide the ",
                  per_rank, " layers of each of the PP ", sizes.pp, " pipeline ranks: choose a divisor of ", per_rank,
                  " (and PP >= 2)");
    sizes.vpp = static_cast<int>(per_rank / opt_.layers_per_virtual_stage);
  }
  const bool cuda_backend = backend.ops && backend.ops->device() == Device::cuda;
  if (world && world->size() > 1) {
    // Gradients, TP activations and pipeline messages live on the GPU there: those groups move device memory
    // (NCCL). The model's data-parallel group stays MPI: it sums host statistics (loss normaliser, MoE load).
    NEXTRON_CHECK(!cuda_backend || backend.device_comm, "a parallel run on a GPU needs a device communicator (NCCL)");
    DeviceCommFactory device = cuda_backend ? backend.device_comm : DeviceCommFactory{};
    if (opt_.log_step_stats) {
      // Every group split from a counting world counts and times its calls; the device groups are made from the
      // MPI group inside and counted on their own.
      counting_world_ = std::make_unique<CountingCommunicator>(*world);
      world = counting_world_.get();
      if (device)
        device = [make = device](Communicator& mpi) -> std::unique_ptr<Communicator> {
          auto* counted = dynamic_cast<CountingCommunicator*>(&mpi);
          return std::make_unique<CountingCommunicator>(make(counted ? counted->inner() : mpi), nullptr);
        };
    }
    ctx_ = std::make_unique<ParallelContext>(*world, sizes, opt_.sequence_parallel, config, opt_.seq_len, device);
  } else {
    const Layout one(sizes, 1, config, opt_.seq_len);  // the same checks (and messages) as a parallel run
    NEXTRON_CHECK(sizes.tp == 1 && sizes.pp == 1 && sizes.cp == 1 && sizes.ep == 1 && one.vpp() == 1,
                  "a parallel layout needs that many MPI ranks: start with mpirun -np <TP*PP*CP*DP>");
  }
  const int64_t per_step = opt_.micro_batch * dp_size();
  NEXTRON_CHECK(opt_.global_batch % per_step == 0, "--global-batch-size (", opt_.global_batch,
                ") must be a multiple of --micro-batch-size x data-parallel size (", opt_.micro_batch, " x ", dp_size(),
                " = ", per_step, ")");
  // The pipeline schedule of a step (at PP 1: forward and backward of each micro-batch in turn). Checked here, on
  // every rank alike, so a micro-batch count the interleaved schedule cannot run stops the job before any
  // communication.
  schedule_spec_ = {ctx_ ? ctx_->layout().pp() : 1, ctx_ ? ctx_->layout().vpp() : 1,
                    static_cast<int>(opt_.global_batch / per_step)};
  schedule_spec_.validate();
  // Before the model is built: a mistake in an output path costs seconds, not a training run.
  on_rank0([&] { prepare_outputs(); });
  if (opt_.sample_interval > 0) {
    NEXTRON_CHECK(sizes.tp == 1 && sizes.pp == 1 && sizes.cp == 1 && sizes.ep == 1,
                  "--sample-interval generates on one rank, which needs the whole model (TP = PP = CP = EP = 1; "
                  "data parallelism is fine): drop it and sample from the saved checkpoints with nextron-generate");
    on_rank0([&] {
      // Read and tokenized once, before the model is built, so a bad prompt file costs seconds.
      std::vector<PromptSpec> prompts = read_prompt_file(opt_.sample_prompts, "--sample-prompts");
      sample_tokenizer_ = make_tokenizer(opt_.sample_tokenizer);
      sample_ids_ = prompt_ids(prompts, sample_tokenizer_.get());
      for (size_t i = 0; i < prompts.size(); ++i) {
        sample_texts_.push_back(prompts[i].text.value_or(""));
        for (int64_t id : sample_ids_[i])
          NEXTRON_CHECK(id >= 0 && id < config.vocab_size, "--sample-prompts prompt ", i + 1, ": token id ", id,
                        " is outside the model's vocabulary [0, ", config.vocab_size, ")");
        const int64_t n = static_cast<int64_t>(sample_ids_[i].size());
        NEXTRON_CHECK(n > 0, "--sample-prompts prompt ", i + 1, " encodes to no tokens: remove it");
        NEXTRON_CHECK(n + opt_.sample_max_new_tokens <= config.max_position_embeddings, "--sample-prompts prompt ",
                      i + 1, " has ", n, " tokens; with --sample-max-new-tokens ", opt_.sample_max_new_tokens,
                      " it exceeds the model's ", config.max_position_embeddings,
                      " positions (max_position_embeddings): shorten it or lower --sample-max-new-tokens");
      }
    });
  }
  if (is_logger() && opt_.sequence_parallel && sizes.tp == 1)
    note("--sequence-parallel has no effect at tensor-parallel size 1 and is ignored");
  if (is_logger() && opt_.seq_len > config.max_position_embeddings)
    note(detail::concat("--seq-len ", opt_.seq_len, " exceeds the model's max_position_embeddings (",
                        config.max_position_embeddings,
                        "): RoPE positions beyond it were never trained; raise it in config.json if that is intended"));

  NEXTRON_CHECK((opt_.device == "cuda") == cuda_backend, "--device ", opt_.device, " but the backend given is ",
                backend.ops ? backend.ops->name() : "cpu", " (internal: build the TrainBackend from the option)");
  if (!ctx_) solo_map_ = std::make_unique<TpShardMap>(config, 0, 1);
  const ModelComms comms = ctx_ ? ctx_->model_comms() : ModelComms{};
  const int num_chunks = ctx_ ? ctx_->num_chunks() : 1;
  // The rank's virtual-pipeline chunks run one at a time: their layers of one kind share one scratch.
  auto layer_scratch = std::make_shared<LayerScratchPool>();
  for (int c = 0; c < num_chunks; ++c) {
    Chunk chunk;
    chunk.model =
        std::make_unique<Model>(config, comms, backend.ops, ctx_ ? ctx_->chunk(c) : StageRange{}, layer_scratch);
    chunk.model->set_recompute(opt_.recompute);
    chunk.model->set_expert_load_logging(opt_.moe_per_layer_logging);
    if (ctx_) chunk.tp_sync = std::make_unique<TpGradSync>(ctx_->shard_map(c), comms.tp, chunk.model->ops());
    chunks_.push_back(std::move(chunk));
  }
  {
    // Each rank fills only its chunks' elements, never the whole model: a random start from the counter-based init
    // (model/init.h, the same numbers as one process), or --init-from from just those elements' bytes in the HF files.
    std::unique_ptr<HfSliceReader> hf;
    if (!opt_.init_from.empty()) hf = std::make_unique<HfSliceReader>(opt_.init_from, full_table());
    for (int c = 0; c < num_chunks; ++c) {
      Model& m = *chunks_[c].model;
      std::vector<float> local(m.table().total_numel(), 0.0f);
      shard_map(c).fill_local(local.data(), [&](const ParamSpec& f, int64_t first, int64_t count, float* out) {
        if (hf)
          hf->read(f, first, count, out);
        else
          init_parameter_elements(f, first, count, out, opt_.init_seed, opt_.initializer_range);
      });
      from_host(m.params(), 0, local.data(), static_cast<int64_t>(local.size()));
      m.params_changed();
    }
  }
  std::vector<Model*> models;
  for (Chunk& c : chunks_) models.push_back(c.model.get());
  p2p_ = std::make_unique<PipelineP2P>(ctx_ ? &ctx_->pp_device() : nullptr);
  runner_ = std::make_unique<PipelineRunner>(models, *p2p_, dp_size() * cp_size());

  if (!sample_) {
    stream_ = std::make_unique<SampleStream>(opt_.data, opt_.seq_len, opt_.valid_fraction, opt_.data_seed);
    for (int d = 0; d < stream_->num_datasets(); ++d) check_vocab(stream_->dataset(d), config.vocab_size);
    sample_ = [this](int64_t index, int64_t* out) { stream_->train_sample(index, out); };
  }

  if (opt_.lr.decay_steps == 0) opt_.lr.decay_steps = opt_.train_steps;
  schedule_ = std::make_unique<LrSchedule>(opt_.lr);
  for (Chunk& c : chunks_) {
    const ParamTable& table = c.model->table();
    const bool own_group = ctx_ && ctx_->own_expert_group() && c.model->config().num_moe_layers() > 0;
    const FlatRange experts = own_group ? table.expert_range() : FlatRange{};
    if (experts.size() > 0) {
      // Under EP the DP replicas hold different experts, and folded experts reduce over EDP, which spans the TP
      // ranks: the dense parameters shard over DP (x CP), the experts over EDP.
      c.opts.push_back(std::make_unique<DistributedOptimizer>(table, &ctx_->dp_cp_device(), &ctx_->dp_cp(), opt_.adam,
                                                              c.model->ops(), FlatRange{0, experts.begin}));
      c.opts.push_back(std::make_unique<DistributedOptimizer>(table, &ctx_->edp_device(), &ctx_->edp(), opt_.adam,
                                                              c.model->ops(), experts));
    } else {
      // The dense gradients sum over every rank with other tokens of the same parameters: DP x CP.
      c.opts.push_back(std::make_unique<DistributedOptimizer>(
          table, ctx_ ? &ctx_->dp_cp_device() : nullptr, ctx_ ? &ctx_->dp_cp() : nullptr, opt_.adam, c.model->ops()));
    }
  }

  std::optional<std::string> resume_dir;
  if (opt_.resume == "auto" && !opt_.save_dir.empty())
    resume_dir = find_latest_checkpoint(opt_.save_dir, ctx_ ? &ctx_->world() : nullptr);
  else if (opt_.resume != "none" && opt_.resume != "auto")
    resume_dir = opt_.resume;
  if (resume_dir) {
    if (is_logger() && !opt_.init_from.empty())
      note("--init-from " + opt_.init_from + " is ignored: resuming from " + *resume_dir +
           ", whose weights replace it (use a new --save directory to start from --init-from)");
    resume_from(*resume_dir);
  }
}

void Trainer::write_samples() {
  if (!is_logger()) return;  // no collectives: the other ranks go on to the next step
  GenerateOptions g;
  g.max_new_tokens = opt_.sample_max_new_tokens;
  g.max_positions = model().config().max_position_embeddings;
  g.batch_size = static_cast<int64_t>(sample_ids_.size());
  if (const auto eos = sample_tokenizer_->eos_id()) g.eos_ids = {*eos};
  const std::vector<Generation> out = generate(
      model(), sample_ids_, g, [&](const std::vector<int64_t>& ids) { return sample_tokenizer_->decode(ids); });
  const std::string path = (std::filesystem::path(opt_.save_dir) / "samples.jsonl").string();
  std::ofstream f(path, std::ios::app);
  for (size_t i = 0; i < out.size(); ++i) {
    nlohmann::json j;
    j["step"] = step_;
    j["index"] = i;
    j["prompt"] = sample_texts_[i];
    j["prompt_ids"] = out[i].prompt;
    j["ids"] = out[i].ids;
    j["text"] = out[i].text;
    j["finish_reason"] = out[i].finish_reason;
    f << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  f.flush();
  NEXTRON_CHECK(f.good(), "writing the samples to ", path, " failed (disk full?)");
  std::printf("samples at step %lld: %s\n", static_cast<long long>(step_), path.c_str());
  std::fflush(stdout);
}

void Trainer::prepare_outputs() {
  const std::string metrics = !opt_.metrics_path.empty() ? opt_.metrics_path
                              : opt_.save_dir.empty()
                                  ? std::string()
                                  : (std::filesystem::path(opt_.save_dir) / "metrics.jsonl").string();
  // Every check before anything is created or removed, so a refused run leaves no trace.
  if (!opt_.save_dir.empty()) check_save_path(opt_.save_dir);
  if (!metrics.empty()) check_metrics_path(metrics);
  if (!opt_.export_hf.empty()) check_export_path(opt_.export_hf, opt_.save_dir, metrics);
  if (opt_.save_dir.empty()) {
    for (const std::string& line : remove_stale_leftovers("", opt_.export_hf)) note(line);
    return;
  }
  if (opt_.overwrite_save && opt_.resume != "auto" && opt_.resume != "none") {
    auto normal = [](const std::string& p) {
      return std::filesystem::path(strip_trailing_separators(std::filesystem::absolute(p).lexically_normal().string()));
    };
    const std::filesystem::path save = normal(opt_.save_dir), resume = normal(opt_.resume);
    NEXTRON_CHECK(std::mismatch(save.begin(), save.end(), resume.begin(), resume.end()).first != save.end(),
                  "--overwrite-save would delete the checkpoint given to --resume (", opt_.resume,
                  "); resume it into a new --save directory instead");
  }
  save_lock_ = std::make_unique<SaveDirLock>(opt_.save_dir);
  if (!save_lock_->previous_holder().empty())
    note("took over the lock of " + opt_.save_dir + " from a run that ended without releasing it (" +
         save_lock_->previous_holder() + ")");
  for (const std::string& line : remove_stale_leftovers(opt_.save_dir, opt_.export_hf)) note(line);
  if (opt_.overwrite_save) {
    // Only the default metrics file lives in --save; an explicit --metrics file is the user's to manage.
    for (const std::string& line : clear_save_dir(opt_.save_dir, opt_.metrics_path.empty() ? metrics : "")) note(line);
    return;
  }
  const std::vector<std::string> old = existing_checkpoints(opt_.save_dir);
  NEXTRON_CHECK(opt_.resume != "none" || old.empty(), "--resume none, but --save '", opt_.save_dir, "' already holds ",
                old.size(), " checkpoint(s) of an earlier run (newest: ", old.empty() ? "" : old.front(),
                "): this run's checkpoints would land beside them, a later --resume auto would continue the old run "
                "and keep-last would delete the new run's. Use a new --save directory, or add --overwrite-save to "
                "delete the old checkpoints (and its metrics.jsonl) and start over");
}

Trainer::~Trainer() = default;

std::vector<StepStats::Group> Trainer::group_tallies() const {
  std::vector<StepStats::Group> out;
  if (!ctx_ || !counting_world_) return out;
  const ParallelContext& c = *ctx_;
  auto add = [&](const char* name, Communicator& host, Communicator& device) {
    if (host.size() <= 1) return;
    StepStats::Group g{name, 0, 0, 0};
    auto take = [&g](const Communicator& comm) {
      if (const auto* counted = dynamic_cast<const CountingCommunicator*>(&comm)) {
        g.bytes += counted->own().total_bytes();
        g.seconds += counted->own().seconds;
      }
    };
    take(host);
    if (&device != &host) take(device);
    out.push_back(g);
  };
  add("tp", c.tp(), c.tp_device());
  add("cp", c.cp(), c.cp_device());
  add("dp", c.dp(), c.dp_device());
  add("dp_cp", c.dp_cp(), c.dp_cp_device());
  add("pp", c.pp(), c.pp_device());
  add("ep", c.ep(), c.ep_device());
  add("edp", c.edp(), c.own_expert_group() ? c.edp_device() : c.edp());
  add("world", c.world(), c.world());
  return out;
}

MicroBatchTokens Trainer::take_local_tokens(int64_t M, int64_t S) {
  // Under context parallelism this rank holds its CP segments of every row (one slice, or the zigzag's two chunks),
  // one after the other.
  const int64_t Sl = S / cp_size();
  const std::vector<CpSegment> segments = cp_segments(opt_.parallel.cp_order, cp_size(), cp_rank(), Sl);
  for (int64_t r = 0; r < M; ++r)
    for (const CpSegment& g : segments)
      for (int64_t t = 0; t < g.length; ++t) {
        ids_[r * Sl + g.local_begin + t] = rows_[r * (S + 1) + g.global_begin + t];
        targets_[r * Sl + g.local_begin + t] = rows_[r * (S + 1) + g.global_begin + t + 1];
      }
  return MicroBatchTokens{ids_.data(), targets_.data()};
}

StepRecord Trainer::step() {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t M = opt_.micro_batch, S = opt_.seq_len, D = dp_size(), accum = schedule_spec_.microbatches;
  const int64_t Sl = S / cp_size();  // under context parallelism this rank's tokens of every row
  rows_.resize(M * (S + 1));
  ids_.resize(M * Sl);
  targets_.resize(M * Sl);
  for (Chunk& c : chunks_) {
    c.model->zero_grad();
    if (opt_.moe_per_layer_logging) c.model->reset_expert_load();
  }
  StepRecord rec;
  const std::vector<StepStats::Group> tally0 = group_tallies();
  const Device device = chunks_.front().model->ops().device();
  if (opt_.log_step_stats) reset_peak_tensor_bytes(device);
  // Global micro-batch m holds samples [position + m M D, +M D); this DP rank reads its M consecutive rows.
  auto tokens = [&](int m) {
    const int64_t first = position_ + (m * D + dp_rank()) * M;
    for (int64_t r = 0; r < M; ++r) sample_(first + r, rows_.data() + r * (S + 1));
    return take_local_tokens(M, S);
  };
  runner_->run(schedule_spec_, tokens, M, Sl, 1.0f / static_cast<float>(accum));
  const auto t_fb = std::chrono::steady_clock::now();
  const std::vector<StepStats::Group> tally1 = group_tallies();
  if (schedule_spec_.pp > 1) rec.pipeline_bubble = runner_->exchange_seconds() / runner_->run_seconds();
  if (opt_.moe_per_layer_logging) rec.expert_load = gather_expert_load();
  // The gradient norm is the step's one wait for the device (CUDA): the losses and the input checks of the
  // forward (token ids, targets, expert indices) are read in the same wait (Ops::resolve_reads), so they are
  // taken after it.
  double sq = 0;
  for (size_t c = 0; c < chunks_.size(); ++c) {
    Chunk& chunk = chunks_[c];
    Tensor& grads = chunk.model->grads();
    if (chunk.tp_sync) chunk.tp_sync->run(grads);
    for (auto& o : chunk.opts) {
      o->reduce_scatter_grads(grads);
      sq += o->shard_sq_sum(grads, shard_map(static_cast<int>(c)).owned_ranges());
    }
  }
  // sum_squares resolved this rank's reads; a no-op unless a rank's optimizers had nothing to sum.
  for (Chunk& chunk : chunks_) chunk.model->ops().resolve_reads();
  if (ctx_) ctx_->world().all_reduce_sum(&sq, 1);
  const std::vector<LossValues> losses = runner_->losses();
  double sums[3] = {0, 0, 0};  // loss, lm_loss, aux_loss summed over the micro-batches (on the last stage)
  for (const LossValues& lv : losses) {
    sums[0] += lv.loss;
    sums[1] += lv.lm_loss;
    sums[2] += lv.aux_loss;
  }
  // The last pipeline stage scored the micro-batches; every rank learns the losses (and stops together on a NaN).
  if (ctx_ && ctx_->layout().pp() > 1) ctx_->pp().all_reduce_sum(sums, 3);
  rec.loss = sums[0] / static_cast<double>(accum);
  rec.lm_loss = sums[1] / static_cast<double>(accum);
  rec.aux_loss = sums[2] / static_cast<double>(accum);
  rec.tokens = accum * M * D * S;
  // step_ counts the steps completed; the log numbers this one step_ + 1.
  NEXTRON_CHECK(
      std::isfinite(rec.loss), "loss is ", short_number(rec.loss), " at step ", step_ + 1,
      step_ > 0 ? " (the gradient norm of step " + std::to_string(step_) + " was " + short_number(last_grad_norm_) + ")"
                : std::string(),
      "; training diverged: ", divergence_advice(opt_));
  position_ += opt_.global_batch;
  rec.grad_norm = std::sqrt(sq);
  NEXTRON_CHECK(std::isfinite(rec.grad_norm), "gradient norm is ", short_number(rec.grad_norm), " at step ", step_ + 1,
                "; training diverged: ", divergence_advice(opt_));
  last_grad_norm_ = rec.grad_norm;
  const double clip = opt_.clip_grad > 0 ? clip_coefficient(rec.grad_norm, opt_.clip_grad) : 1.0;
  rec.lr = schedule_->lr_at(step_);
  for (Chunk& chunk : chunks_) {
    for (auto& o : chunk.opts) {
      if (clip < 1.0) o->scale_shard(chunk.model->grads(), static_cast<float>(clip));
      o->step(chunk.model->params(), chunk.model->grads(), rec.lr, &chunk.model->params_act());
    }
  }
  ++step_;
  consumed_tokens_ += rec.tokens;
  rec.step = step_;
  const auto t_end = std::chrono::steady_clock::now();
  rec.seconds = std::chrono::duration<double>(t_end - t0).count();
  if (opt_.log_step_stats)
    rec.stats = step_stats(tally0, tally1, std::chrono::duration<double>(t_fb - t0).count(),
                           std::chrono::duration<double>(t_end - t_fb).count(), device);
  return rec;
}

nlohmann::json to_json(const StepStats& st) {
  nlohmann::json comm = nlohmann::json::object();
  double fb_comm = 0;
  for (const StepStats::Group& g : st.groups) {
    if (g.bytes == 0 && g.seconds == 0) continue;  // a group this layout does not use (e.g. EDP when it is DP)
    comm[g.name] = {
        {"bytes", g.bytes}, {"seconds", g.seconds}, {"forward_backward_seconds", g.forward_backward_seconds}};
    fb_comm += g.forward_backward_seconds;
  }
  // Compute: the forward/backward phase less its time in communication calls (pipeline waits included there).
  return {{"forward_backward_seconds", st.forward_backward},
          {"compute_seconds", std::max(0.0, st.forward_backward - fb_comm)},
          {"optimizer_seconds", st.optimizer},
          {"comm", comm},
          {"peak_tensor_bytes", st.peak_tensor_bytes},
          {"max_rss_bytes", st.max_rss_bytes}};
}

StepStats Trainer::step_stats(const std::vector<StepStats::Group>& before, const std::vector<StepStats::Group>& mid,
                              double forward_backward, double optimizer, Device device) {
  StepStats st;
  st.forward_backward = forward_backward;
  st.optimizer = optimizer;
  const std::vector<StepStats::Group> after = group_tallies();
  for (size_t i = 0; i < after.size(); ++i)
    st.groups.push_back({after[i].name, after[i].bytes - before[i].bytes, after[i].seconds - before[i].seconds,
                         mid[i].seconds - before[i].seconds});
  // Peak memory of every rank (one small all-gather, after the tallies: it is not part of the step).
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double mine[2] = {static_cast<double>(peak_tensor_bytes(device)), static_cast<double>(usage.ru_maxrss) * 1024};
  const int n = ctx_ ? ctx_->layout().world_size() : 1;
  std::vector<double> all(static_cast<size_t>(2 * n));
  if (ctx_)
    ctx_->world().all_gather(mine, all.data(), 2, DType::f64);
  else
    std::copy_n(mine, 2, all.begin());
  for (int r = 0; r < n; ++r) {
    st.peak_tensor_bytes.push_back(all[static_cast<size_t>(2 * r)]);
    st.max_rss_bytes.push_back(all[static_cast<size_t>(2 * r + 1)]);
  }
  return st;
}

std::vector<ExpertLoad> Trainer::gather_expert_load() {
  const ModelConfig& c = config();
  const int64_t E = c.num_experts, W = E + 1;  // per layer: E counts and the dropped slots
  std::vector<int64_t> moe_layers;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    if (c.mlp_type(l) == MlpType::sparse_moe) moe_layers.push_back(l);
  // One (layers, E + 1) buffer: each DP replica's TP rank 0 adds the layers of its stages (TP ranks route the same
  // rows; EP ranks route different rows and are DP replicas), and a world sum completes it on every rank.
  std::vector<double> all(moe_layers.size() * static_cast<size_t>(W), 0.0);
  // (Folded experts: every TP rank routes its own rows, so every rank adds.)
  if (!ctx_ || ctx_->tp_rank() == 0 || c.experts_folded)
    for (Chunk& chunk : chunks_)
      for (const ExpertLoad& load : chunk.model->expert_load()) {
        const size_t row =
            static_cast<size_t>(std::find(moe_layers.begin(), moe_layers.end(), load.layer) - moe_layers.begin());
        for (int64_t e = 0; e < E; ++e) all[row * W + e] += load.tokens[e];
        all[row * W + E] += load.dropped;
      }
  if (ctx_) ctx_->world().all_reduce_sum(all.data(), static_cast<int64_t>(all.size()));
  std::vector<ExpertLoad> out;
  for (size_t i = 0; i < moe_layers.size(); ++i)
    out.push_back({moe_layers[i], std::vector<float>(all.begin() + i * W, all.begin() + i * W + E), all[i * W + E]});
  return out;
}

const ParamTable& Trainer::full_table() const { return shard_map(0).full_table(); }

const TpShardMap& Trainer::shard_map(int c) const { return ctx_ ? ctx_->shard_map(c) : *solo_map_; }

std::vector<float> Trainer::gather_chunks(const std::vector<std::vector<float>>& locals) const {
  if (!ctx_) {
    std::vector<float> full(full_table().total_numel(), 0.0f);
    solo_map_->place_owned(locals.front().data(), full.data());
    return full;
  }
  std::vector<const float*> ptrs;
  for (const auto& l : locals) ptrs.push_back(l.data());
  return ctx_->gather_full(ptrs);
}

std::vector<float> Trainer::full_params() {
  std::vector<std::vector<float>> locals;
  for (Chunk& c : chunks_) locals.push_back(to_host(c.model->params(), 0, c.model->table().total_numel()));
  return gather_chunks(locals);
}

std::vector<float> Trainer::full_grads() {
  std::vector<std::vector<float>> locals;
  for (Chunk& c : chunks_) {
    locals.push_back(to_host(c.model->grads(), 0, c.model->table().total_numel()));
    for (auto& o : c.opts) o->all_gather_host(locals.back().data());
  }
  return gather_chunks(locals);
}

void Trainer::on_rank0(const std::function<void()>& body) {
  std::string error;
  if (is_logger()) {
    try {
      body();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (!ctx_) {
    if (!error.empty()) throw Error(error);
    return;
  }
  double failed = error.empty() ? 0 : 1;
  ctx_->world().all_reduce_sum(&failed, 1);
  if (failed > 0) throw Error(error.empty() ? "rank 0 failed (its message is in its error output)" : error);
}

double Trainer::validate() {
  NEXTRON_CHECK(stream_ && stream_->num_valid_samples() > 0,
                "no validation samples: raise --valid-fraction or use more data");
  const int64_t M = opt_.micro_batch, S = opt_.seq_len, D = dp_size(), nvalid = stream_->num_valid_samples();
  const int64_t Sl = S / cp_size();  // this CP rank's tokens of every row
  rows_.resize(M * (S + 1));
  ids_.resize(M * Sl);
  targets_.resize(M * Sl);
  // Validation micro-batch `it` is M x DP rows; the loss is already the mean over all of them.
  auto tokens = [&](int it) {
    const int64_t first = (it * D + dp_rank()) * M;
    for (int64_t r = 0; r < M; ++r) stream_->valid_sample((first + r) % nvalid, rows_.data() + r * (S + 1));
    return take_local_tokens(M, S);
  };
  double total = 0;
  for (const LossValues& lv : runner_->evaluate(static_cast<int>(opt_.eval_iters), tokens, M, Sl)) total += lv.lm_loss;
  // The last pipeline stage scored them.
  if (ctx_ && ctx_->layout().pp() > 1) ctx_->pp().all_reduce_sum(&total, 1);
  return total / static_cast<double>(opt_.eval_iters);
}

// A background save: the host copies its shard points into, the save, and the thread writing the shard.
struct Trainer::PendingSave {
  std::vector<float> params, m, v;  // the rank's local parameters of every chunk (where it writes any); its moments
  std::unique_ptr<CheckpointSave> save;
  std::thread writer;
  std::atomic<bool> written{false};
  ~PendingSave() {
    if (writer.joinable()) writer.join();
  }
};

std::string Trainer::finish_background_save(bool wait) {
  if (!pending_save_) return {};  // the same on every rank: saves are collective
  if (!wait) {
    double busy = pending_save_->written.load() ? 0 : 1;
    if (ctx_) ctx_->world().all_reduce_sum(&busy, 1);
    if (busy > 0) return {};
  }
  const std::unique_ptr<PendingSave> job = std::move(pending_save_);
  job->writer.join();
  return job->save->finish();
}

std::string Trainer::save_checkpoint(bool background) {
  NEXTRON_CHECK(!opt_.save_dir.empty(), "saving a checkpoint needs --save DIR");
  finish_background_save(/*wait=*/true);  // one save at a time
  auto job = std::make_unique<PendingSave>();
  // Every rank writes only the elements it owns (docs/formats.md): its TP slice of its stages' parameters, from one
  // data-parallel replica (DP rank 0; EDP rank 0 for routed experts), and its ZeRO shard of the moments (TP-replicated
  // elements from their owning TP rank). Host copies of the rank's own buffers only.
  const bool dense_owner = !ctx_ || ctx_->dp_cp().rank() == 0, expert_owner = !ctx_ || ctx_->edp().rank() == 0;
  std::vector<float>&params = job->params, &m = job->m, &v = job->v;
  size_t local_numel = 0, shard_numel = 0;
  for (Chunk& c : chunks_) {
    local_numel += static_cast<size_t>(c.model->table().total_numel());
    for (auto& o : c.opts) shard_numel += static_cast<size_t>(o->adam().range().size());
  }
  params.reserve(local_numel);  // address space only: pages are touched by the copies actually made
  m.reserve(shard_numel);
  v.reserve(shard_numel);
  CheckpointShard shard;
  for (size_t c = 0; c < chunks_.size(); ++c) {
    const std::vector<TpRun>& runs = shard_map(static_cast<int>(c)).runs();
    Model& model = *chunks_[c].model;
    const auto base = static_cast<int64_t>(params.size());
    const size_t before = shard.param_runs.size();
    for (const TpRun& r : runs)
      if (r.owner && (r.expert ? expert_owner : dense_owner))
        shard.param_runs.push_back(FlatRun{r.full_offset, base + r.local_offset, r.count});
    // A rank that writes none of the chunk's parameters (another data-parallel replica's) copies none of them.
    if (shard.param_runs.size() > before) append_host(model.params(), 0, model.table().total_numel(), params);
    for (auto& o : chunks_[c].opts) {
      const AdamW& adam = o->adam();
      const FlatRange sr = adam.range();
      const auto mbase = static_cast<int64_t>(m.size());
      append_host(adam.exp_avg(), 0, sr.size(), m);
      append_host(adam.exp_avg_sq(), 0, sr.size(), v);
      for (const TpRun& r : runs) {
        const int64_t lo = std::max(sr.begin, r.local_offset), hi = std::min(sr.end, r.local_offset + r.count);
        if (r.owner && lo < hi)
          shard.moment_runs.push_back(FlatRun{r.full_offset + (lo - r.local_offset), mbase + (lo - sr.begin), hi - lo});
      }
    }
  }
  shard.params = params.data();
  shard.exp_avg = m.data();
  shard.exp_avg_sq = v.data();
  const AdamW& adam = chunks_.front().opts.front()->adam();
  shard.steps_taken = adam.steps_taken();
  shard.hyper = adam.hyper();
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
  if (ctx_) {
    const ParallelSizes& z = ctx_->layout().sizes();
    st.args["layout"] = {{"tp", z.tp}, {"pp", z.pp},   {"vpp", z.vpp}, {"cp", z.cp},
                         {"ep", z.ep}, {"etp", z.etp}, {"dp", z.dp},   {"sequence_parallel", opt_.sequence_parallel}};
  }
  if (stream_) st.args["data_fingerprint"] = std::to_string(stream_->fingerprint());
  // Fault injection for the stop-signal tests (tools/test_train_mpi_signal.py): a save that takes this long.
  if (const char* delay = std::getenv("NEXTRON_FAULT_SAVE_DELAY_S"); delay != nullptr && is_logger())
    std::this_thread::sleep_for(std::chrono::duration<double>(std::atof(delay)));
  // ... and for the kill test (tools/test_checkpoint_kill.py): a pause after every stage of the save on every rank,
  // so that kills at random moments land inside saves.
  if (const char* delay = std::getenv("NEXTRON_FAULT_SAVE_STAGE_DELAY_S"))
    detail::set_train_checkpoint_hook(
        [s = std::atof(delay)](const std::string&) { std::this_thread::sleep_for(std::chrono::duration<double>(s)); });
  job->save = std::make_unique<CheckpointSave>(ctx_ ? &ctx_->world() : nullptr, opt_.save_dir, config(), full_table(),
                                               shard, st, opt_.keep_last);
  if (!background) {
    job->save->write_shard();
    return job->save->finish();
  }
  // The writer touches only the job's host copies and its own file (no MPI, no HDF5).
  job->writer = std::thread([save = job->save.get(), written = &job->written] {
    save->write_shard();
    written->store(true);
  });
  pending_save_ = std::move(job);
  return pending_save_->save->dir();
}

void Trainer::resume_from(const std::string& dir) {
  // Every rank reads just the stored run groups that intersect what it holds (a shared file system), whatever layout
  // wrote them: all its parameters (TP-replicated elements too) and the moments of its ZeRO shards.
  std::unique_ptr<TrainCheckpointReader> reader;
  std::vector<std::vector<float>> params(chunks_.size()), m, v;  // per chunk; per optimizer
  std::string error;
  try {
    reader = std::make_unique<TrainCheckpointReader>(dir);
    reader->check_model(config(), full_table());
    for (size_t c = 0; c < chunks_.size(); ++c) {
      const std::vector<TpRun>& runs = shard_map(static_cast<int>(c)).runs();
      std::vector<FlatRun> need;
      for (const TpRun& r : runs) need.push_back(FlatRun{r.full_offset, r.local_offset, r.count});
      params[c].assign(static_cast<size_t>(chunks_[c].model->table().total_numel()), 0.0f);
      reader->read_params(need, params[c].data());
      for (auto& o : chunks_[c].opts) {
        const FlatRange sr = o->adam().range();
        need.clear();
        for (const TpRun& r : runs) {
          const int64_t lo = std::max(sr.begin, r.local_offset), hi = std::min(sr.end, r.local_offset + r.count);
          if (lo < hi) need.push_back(FlatRun{r.full_offset + (lo - r.local_offset), lo - sr.begin, hi - lo});
        }
        m.emplace_back(static_cast<size_t>(sr.size()), 0.0f);
        v.emplace_back(static_cast<size_t>(sr.size()), 0.0f);
        reader->read_moments(need, m.back().data(), v.back().data());
      }
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  if (ctx_) {
    double failed = error.empty() ? 0 : 1;
    ctx_->world().all_reduce_sum(&failed, 1);
    if (failed > 0 && error.empty()) error = "another rank could not read checkpoint " + dir;
  }
  if (!error.empty()) throw Error(error);
  const LoadedCheckpoint& ck = reader->loaded();
  // The sample order must be the one the checkpoint was trained on, or "the next sample" means nothing.
  const auto& a = ck.state.args;
  auto same = [&](const char* key, const nlohmann::json& now) {
    NEXTRON_CHECK(!a.contains(key) || a[key] == now, "checkpoint ", dir, " was trained with ", key, " = ",
                  a.contains(key) ? a[key].dump() : "?", " but this run has ", now.dump(),
                  "; resume with the same setting or start a new --save directory");
  };
  // The micro-batch size and the layout may change: samples are consumed in global order, global_batch per step.
  same("seq_len", opt_.seq_len);
  same("global_batch", opt_.global_batch);
  same("data_seed", opt_.data_seed);
  same("valid_fraction", opt_.valid_fraction);
  if (stream_) same("data_fingerprint", std::to_string(stream_->fingerprint()));
  size_t o_index = 0;
  for (size_t c = 0; c < chunks_.size(); ++c) {
    Model& model = *chunks_[c].model;
    from_host(model.params(), 0, params[c].data(), static_cast<int64_t>(params[c].size()));
    for (auto& o : chunks_[c].opts) {
      AdamW& adam = o->adam();
      from_host(adam.exp_avg(), 0, m[o_index].data(), adam.range().size());
      from_host(adam.exp_avg_sq(), 0, v[o_index].data(), adam.range().size());
      adam.set_steps_taken(ck.steps_taken);
      ++o_index;
    }
    model.params_changed();
  }
  step_ = ck.state.step;
  position_ = ck.state.data_position;
  consumed_tokens_ = ck.state.consumed_tokens;
  if (is_logger())
    std::fprintf(stderr, "resumed from %s at step %lld (sample %lld)\n", dir.c_str(), static_cast<long long>(step_),
                 static_cast<long long>(position_));
}

void Trainer::export_hf(const std::string& dir) {
  // Streamed one HF tensor at a time: each rank keeps only its local parameters, every tensor is completed by a world
  // sum of the owners' elements (dense ones from DP rank 0, experts from EDP rank 0), and rank 0 writes it.
  std::vector<std::vector<float>> locals;
  for (Chunk& c : chunks_) locals.push_back(to_host(c.model->params(), 0, c.model->table().total_numel()));
  const bool dense_owner = !ctx_ || ctx_->dp_cp().rank() == 0, expert_owner = !ctx_ || ctx_->edp().rank() == 0;
  const HfPieceSource source = [&](const ParamSpec& f, const HfPiece& piece, float* out) {
    const int64_t begin = f.offset + piece.offset, n = shape_numel(piece.shape);
    for (size_t c = 0; c < chunks_.size(); ++c)
      shard_map(static_cast<int>(c)).place_owned_range(locals[c].data(), begin, n, out, dense_owner, expert_owner);
    if (ctx_) ctx_->world().all_reduce_sum(out, n);
  };
  const std::string error = stream_hf_checkpoint(dir, config(), full_table(), source, {}, is_logger());
  on_rank0([&] { NEXTRON_CHECK(error.empty(), error); });
}

void Trainer::run() {
  const ModelConfig& c = config();
  const double flops_per_token = training_flops_per_token(c, opt_.seq_len);
  const bool log = is_logger();
  const int world = ctx_ ? ctx_->layout().world_size() : 1;
  // MFU's denominator: the peak of all ranks (rank 0 measures its own and assumes identical ranks).
  const double peak =
      world * (opt_.peak_tflops > 0 ? opt_.peak_tflops * 1e12 : (log ? measure_cpu_peak_flops(cpu_threads()) : 1.0));
  std::string metrics_path = log ? opt_.metrics_path : "";
  if (log && metrics_path.empty() && !opt_.save_dir.empty()) {
    std::filesystem::create_directories(opt_.save_dir);
    metrics_path = (std::filesystem::path(opt_.save_dir) / "metrics.jsonl").string();
  }
  std::unique_ptr<MetricsLog> metrics;
  if (!metrics_path.empty()) metrics = std::make_unique<MetricsLog>(metrics_path);
  if (log)
    std::printf(
        "nextron-train: %lld parameters, %lld layers (%s), %lld steps of %lld x %lld tokens; %.3g training "
        "FLOPs/token; MFU against %.3g TFLOP/s%s\n",
        static_cast<long long>(full_table().parameters()), static_cast<long long>(c.num_hidden_layers),
        c.num_moe_layers() ? "MoE" : "dense", static_cast<long long>(opt_.train_steps),
        static_cast<long long>(opt_.global_batch), static_cast<long long>(opt_.seq_len), flops_per_token, peak / 1e12,
        opt_.peak_tflops > 0 ? "" : " (measured CPU fp32 GEMM peak)");
  if (log && ctx_)
    std::printf("parallel layout: %s%s\n", ctx_->layout().describe().c_str(),
                opt_.sequence_parallel && ctx_->layout().tp() > 1 ? ", sequence parallel" : "");
  if (log && step_ > 0) std::printf("continuing at step %lld\n", static_cast<long long>(step_));
  const int64_t first_step = step_;
  std::fflush(stdout);

  // A stop signal must leave the ranks the time to save: say so before step 1 where the launcher will not, and
  // after a save that took longer than the launcher allows.
  const StopGrace grace = stop_grace_from_env();
  bool grace_warned = false;
  if (log && !opt_.save_dir.empty()) {
    const std::string note = stop_grace_note(grace, kStopGraceWantedSeconds);
    if (!note.empty()) {
      std::fprintf(stderr, "%s\n", note.c_str());
      grace_warned = true;
    }
  }
  auto timed_save = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string dir = save_checkpoint();
    const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (log && !grace_warned && grace.seconds >= 0 && took > 0.5 * grace.seconds) {
      std::fprintf(stderr,
                   "warning: saving took %.1f s, and %s kills the ranks %g s after they receive Ctrl-C or "
                   "SIGTERM: %s\n",
                   took, grace.launcher.c_str(), grace.seconds, grace.advice.c_str());
      grace_warned = true;
    }
    return dir;
  };

  StopSignals signals;
  const bool progress = opt_.progress && log;
  ProgressBar bar(opt_.train_steps, std::cerr, step_);
  // A signal may reach the ranks at different steps: they agree after every step, so all stop at the same one.
  auto stop_agreed = [&] {
    double stop = g_stop_requested ? 1 : 0;
    if (ctx_) ctx_->world().all_reduce_sum(&stop, 1);
    return stop > 0;
  };
  bool stop = false;
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  while (step_ < opt_.train_steps && !stop) {
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
    m.pipeline_bubble = r.pipeline_bubble;
    if (r.stats) m.breakdown = to_json(*r.stats);
    m.seconds = elapsed();
    m.tokens = consumed_tokens_;
    if (metrics) metrics->write(m);
    if (metrics && !r.expert_load.empty()) {
      ExpertLoadMetrics load;
      load.step = r.step;
      for (const ExpertLoad& layer : r.expert_load) {
        load.layers.push_back(layer.layer);
        load.tokens.push_back(layer.tokens);
        load.dropped.push_back(layer.dropped);
      }
      metrics->write(load);
    }
    if (progress) bar.update(m);
    if (log && (step_ % opt_.log_interval == 0 || step_ == opt_.train_steps)) {
      if (progress) bar.clear();
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
      if (progress) bar.clear();
      if (log) std::printf("%s\n", format_valid_line(v).c_str());
      std::fflush(stdout);
    }
    if (opt_.sample_interval > 0 && (step_ % opt_.sample_interval == 0 || step_ == opt_.train_steps)) {
      if (progress) bar.clear();
      write_samples();
    }
    // A background save completes at the first step boundary where every rank's shard is written.
    if (const std::string dir = finish_background_save(/*wait=*/false); !dir.empty()) {
      if (progress) bar.clear();
      if (log) std::printf("saved %s (written in the background)\n", dir.c_str());
    }
    if (opt_.save_interval > 0 && step_ % opt_.save_interval == 0 && step_ < opt_.train_steps) {
      if (progress) bar.clear();
      if (opt_.async_save) {
        const std::string dir = save_checkpoint(/*background=*/true);
        if (log) std::printf("saving %s in the background\n", dir.c_str());
      } else {
        const std::string dir = timed_save();
        if (log) std::printf("saved %s\n", dir.c_str());
      }
    }
    stop = stop_agreed();
  }
  if (progress) bar.finish();
  if (const std::string dir = finish_background_save(/*wait=*/true); !dir.empty() && log)
    std::printf("saved %s (written in the background)\n", dir.c_str());
  if (log && stop) std::printf("stop requested: saving at step %lld\n", static_cast<long long>(step_));
  // A signal after the last step stops nothing: the run is complete and exports as usual.
  stopped_early_ = stop && step_ < opt_.train_steps;
  if (step_ == first_step) {
    if (log)
      std::printf("nothing to train: the checkpoint is already at step %lld of %lld (raise --train-steps to go on)\n",
                  static_cast<long long>(step_), static_cast<long long>(opt_.train_steps));
  } else if (!opt_.save_dir.empty()) {
    const std::string dir = timed_save();
    if (log) std::printf("saved %s\n", dir.c_str());
  }
  // Saved: from here a signal acts as it did before the run (the HF export below writes OUT.partial and renames it,
  // so an interrupted export leaves no half-written checkpoint).
  signals.restore();
  if (stopped_early_ && log) {
    std::printf("stopped early by %s at step %lld of %lld%s\n",
                g_stop_signal == SIGINT    ? "SIGINT"
                : g_stop_signal == SIGUSR1 ? "SIGUSR1"
                                           : "SIGTERM",
                static_cast<long long>(step_), static_cast<long long>(opt_.train_steps),
                opt_.save_dir.empty() ? " (no --save: nothing was saved)"
                                      : "; rerun the same command to continue from the checkpoint");
    // Not exported: --export-hf means the final weights, and an export here would make the resumed run, which
    // refuses a non-empty --export-hf target at start-up, fail; a signal also usually comes with a short grace
    // period that a large export would overrun.
    if (!opt_.export_hf.empty())
      std::printf("--export-hf %s skipped: the run has not reached --train-steps (the run that finishes exports)\n",
                  opt_.export_hf.c_str());
  }
  if (!opt_.export_hf.empty() && !stopped_early_) {
    export_hf(opt_.export_hf);
    if (log) std::printf("exported HF checkpoint %s\n", opt_.export_hf.c_str());
  }
  std::fflush(stdout);
}

}  // namespace nextron
