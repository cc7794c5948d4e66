// nextron-bench: forward+backward throughput of the CPU backend for a model config, random weights.
// Prints one JSON line so bench/run_cpu_bench.sh can put it beside transformers + torch measured in the same run.
// --roofline instead counts one training step through CountingOps (kernels/counting_ops.h) and prints, per op, the
// launches, FLOPs, HBM bytes and host syncs it would cost on a GPU, the time they imply on an H100 / H200, and the
// measured CPU time (docs/benchmarks.md, "Roofline and counted costs").
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>

#include "../apps/cli.h"
#include "core/error.h"
#include "core/parallel_for.h"
#include "kernels/counting_ops.h"
#include "kernels/cpu_ops.h"
#include "model/init.h"
#include "model/model.h"
#include "optim/adamw.h"

namespace po = boost::program_options;
using namespace nextron;

namespace {

// One training step as the trainer's single-process path takes it, counted: zero grads, forward with the loss (its
// values deferred reads), backward, the gradient norm (sum_squares, which resolves them) and AdamW through the Ops
// (unless `optimizer` is false: the AdamW moments take 8 bytes per parameter of host memory), after `warmup` uncounted
// steps (the first step allocates and uploads the RoPE tables; with --warmup 0 the counted step is that first one,
// whose counts differ only by the rope_tables call).
void roofline(const ModelConfig& config, const std::string& config_path, int64_t batch, int64_t seq, int warmup,
              bool optimizer, const std::vector<int64_t>& ids) {
  auto ops = std::make_shared<CountingOps>(std::make_shared<CpuOps>(), /*time_calls=*/true);
  Model model(config, {}, ops);
  init_parameters(model.table(), model.params().f32(), 1234);
  model.params_changed();
  AdamWHyper h;
  h.weight_decay = 0.1;
  const FlatRange all{0, model.table().total_numel()};
  std::unique_ptr<AdamW> opt = optimizer ? std::make_unique<AdamW>(model.table(), all, h, ops.get()) : nullptr;
  // Aligned targets (position t scored against ids[t + 1], the row's last position ignored), and the loss read as
  // the trainer reads it: deferred to the step's one wait (the gradient norm, or a resolve without the optimizer).
  std::vector<int64_t> targets(ids.size(), -100);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t + 1 < seq; ++t) targets[b * seq + t] = ids[b * seq + t + 1];
  ModelActivations acts;
  ScoreReadout readout;
  double step_s = 0;
  for (int i = 0; i <= warmup; ++i) {
    if (i == warmup) ops->reset();
    const auto t0 = std::chrono::steady_clock::now();
    model.zero_grad();
    model.forward_scored(acts, ids.data(), targets.data(), batch, seq, readout);
    model.backward(acts);
    if (opt) {
      ops->sum_squares(model.grads(), {all});
      opt->step(model.params(), model.grads(), 1e-4, &model.params_act());
    } else {
      ops->resolve_reads();
    }
    step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::printf(
      "roofline: %s, B=%lld S=%lld, one training step (forward, backward%s) after %d warm-up step(s); CPU "
      "step %.3f s on %d threads\n",
      config_path.c_str(), static_cast<long long>(batch), static_cast<long long>(seq),
      optimizer ? ", gradient norm, AdamW" : "", warmup, step_s, cpu_threads());
  std::printf("%s", roofline_table(*ops).c_str());
}

int run(int argc, char** argv) {
  std::string config_path;
  int64_t batch = 1, seq = 256;
  int steps = 5, warmup = 1, threads = 0;
  bool count_roofline = false, no_optimizer = false;
  po::options_description opts("nextron-bench: CPU forward+backward throughput\n\nOptions");
  opts.add_options()("help,h", "show this help")("config", po::value(&config_path)->required(),
                                                 "HF config.json of a qwen3_next model")(
      "batch", po::value(&batch)->default_value(1), "sequences per step")("seq", po::value(&seq)->default_value(256),
                                                                          "tokens per sequence")(
      "steps", po::value(&steps)->default_value(5), "timed steps")("warmup", po::value(&warmup)->default_value(1),
                                                                   "untimed steps first")(
      "threads", po::value(&threads)->default_value(0), "CPU threads (0: all cores)")(
      "roofline", po::bool_switch(&count_roofline),
      "count one training step (after --warmup steps) through CountingOps and print per op: calls, launches, "
      "GFLOP, HBM MB and host syncs on a GPU, the implied H100 / H200 time (max(FLOPs / peak, bytes / bandwidth) "
      "per call, summed) and the measured CPU time; instead of the throughput")(
      "no-optimizer", po::bool_switch(&no_optimizer),
      "--roofline: leave the gradient norm and AdamW out of the step (their moments need 8 bytes of host memory per "
      "parameter)");
  po::variables_map vm;
  if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
  NEXTRON_CHECK(batch > 0 && seq > 0 && steps > 0 && warmup >= 0 && threads >= 0,
                "--batch, --seq and --steps must be positive; --warmup and --threads non-negative");
  if (threads > 0) set_cpu_threads(threads);
  const ModelConfig config = ModelConfig::from_file(config_path);
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int64_t> tok(0, config.vocab_size - 1);
  std::vector<int64_t> ids(batch * seq);
  for (auto& t : ids) t = tok(rng);
  if (count_roofline) {
    roofline(config, config_path, batch, seq, warmup, !no_optimizer, ids);
    return 0;
  }
  Model model(config);
  init_parameters(model.table(), model.params().f32(), 1234);
  double total = 0;
  for (int i = 0; i < warmup + steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    model.zero_grad();
    model.forward(ids.data(), ids.data(), batch, seq);
    model.backward();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i >= warmup) total += dt;
  }
  const double ms = 1000.0 * total / steps;
  std::printf("{\"tokens_per_s\": %.2f, \"ms_per_step\": %.3f, \"threads\": %d}\n",
              static_cast<double>(batch * seq) * steps / total, ms, cpu_threads());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return nextron::cli::run_main("nextron-bench", [&] { return run(argc, argv); });
}
