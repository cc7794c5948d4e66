// nextron-bench: forward+backward throughput of the CPU backend for a model config, random weights.
// Prints one JSON line so bench/run_cpu_bench.sh can put it beside transformers + torch measured in the same run.
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "../apps/cli.h"
#include "core/error.h"
#include "core/parallel_for.h"
#include "model/init.h"
#include "model/model.h"

namespace po = boost::program_options;
using namespace nextron;

namespace {

int run(int argc, char** argv) {
  std::string config_path;
  int64_t batch = 1, seq = 256;
  int steps = 5, warmup = 1, threads = 0;
  po::options_description opts("nextron-bench: CPU forward+backward throughput\n\nOptions");
  opts.add_options()("help,h", "show this help")("config", po::value(&config_path)->required(),
                                                 "HF config.json of a qwen3_next model")(
      "batch", po::value(&batch)->default_value(1), "sequences per step")("seq", po::value(&seq)->default_value(256),
                                                                          "tokens per sequence")(
      "steps", po::value(&steps)->default_value(5), "timed steps")("warmup", po::value(&warmup)->default_value(1),
                                                                   "untimed steps first")(
      "threads", po::value(&threads)->default_value(0), "CPU threads (0: all cores)");
  po::variables_map vm;
  if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
  NEXTRON_CHECK(batch > 0 && seq > 0 && steps > 0 && warmup >= 0 && threads >= 0,
                "--batch, --seq and --steps must be positive; --warmup and --threads non-negative");
  if (threads > 0) set_cpu_threads(threads);
  Model model(ModelConfig::from_file(config_path));
  init_parameters(model.table(), model.params().f32(), 1234);
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int64_t> tok(0, model.config().vocab_size - 1);
  std::vector<int64_t> ids(batch * seq);
  for (auto& t : ids) t = tok(rng);
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
