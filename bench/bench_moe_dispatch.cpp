// nextron-bench-moe: the routed experts of one MoE layer, forward + backward, under expert parallelism (the phased
// all-to-all dispatcher over the job's ranks: EP = world) against EP 1 (every rank runs all experts on its own tokens
// with the fused kernel), measured in the same job on the same tokens and weights. Run it under mpiexec; rank 0
// prints one JSON line with both times (the slowest rank's), their ratio and the all-to-all volume.
//
//   mpiexec -np 4 build/nextron-bench-moe --config configs/models/qwen3-next-tiny.json --tokens 2048
#include <mpi.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <random>

#include "../apps/cli.h"
#include "comm/counting_communicator.h"
#include "comm/mpi_communicator.h"
#include "core/error.h"
#include "core/parallel_for.h"
#include "kernels/cpu_ops.h"
#include "model/init.h"
#include "model/moe.h"

namespace po = boost::program_options;
using namespace nextron;

namespace {

// One MoE layer (the config's first) of a model slice, its weights from the whole model's seeded init.
struct MoeLayer {
  ModelConfig config;
  ParamTable table;
  FlatBuffers flat;
  CpuOps ops;
  std::unique_ptr<SparseMoe> moe;

  MoeLayer(const ModelConfig& whole, const ExpertParallel& ep)
      : config(ep_local_config(whole, ep.size(), ep.rank())), table(config) {
    int64_t layer = 0;
    while (config.mlp_type(layer) != MlpType::sparse_moe) ++layer;
    // The whole model's seeded weights, this rank's experts copied out by name: EP and EP 1 use the same numbers.
    const ParamTable full(whole);
    std::vector<float> all(static_cast<size_t>(full.total_numel()));
    init_parameters(full, all.data(), 1234, 0.02);
    flat.params = Tensor::zeros({table.total_numel()});
    flat.grads = Tensor::zeros({table.total_numel()});
    flat.params_act = flat.params;
    for (const ParamSpec& s : table.specs()) {
      const ParamSpec& f = full.get(s.name);
      const int64_t first = s.kind == ParamKind::expert ? config.first_local_expert() * (f.numel() / f.shape[0]) : 0;
      std::copy_n(all.data() + f.offset + first, s.numel(), flat.params.f32() + s.offset);
    }
    config.shared_expert_intermediate_size = 0;  // the routed experts only (the shared expert is dense work)
    moe = std::make_unique<SparseMoe>(config, ModuleWeights(table, flat, "layers." + std::to_string(layer) + ".mlp."),
                                      ops, TensorParallel{}, ep);
  }

  // Seconds of one forward + backward on x (N, H), the slowest rank's.
  double step(const Tensor& x, const Tensor& dy, Communicator& world) {
    SparseMoe::Saved s;
    Tensor y = Tensor::zeros(x.shape()), dx = Tensor::zeros(x.shape());
    MoeAuxStats aux;
    aux.reset(ops, config.num_experts);
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    moe->forward(s, x, y, aux);
    moe->backward(s, dy, dx, dx, aux, 0.0f);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return dt;
  }
};

int run(int argc, char** argv, Communicator& world) {
  std::string config_path;
  int64_t tokens = 1024;
  int steps = 5, warmup = 1, threads = 1;
  bool force_balance = false;
  po::options_description opts(
      "nextron-bench-moe: routed experts under EP = world vs EP 1 (run under mpiexec)\n\nOptions");
  opts.add_options()("help,h", "show this help")("config", po::value(&config_path)->required(),
                                                 "HF config.json of a qwen3_next model with MoE layers")(
      "tokens", po::value(&tokens)->default_value(1024), "tokens per rank")(
      "steps", po::value(&steps)->default_value(5), "timed steps")("warmup", po::value(&warmup)->default_value(1),
                                                                   "untimed steps first")(
      "threads", po::value(&threads)->default_value(1), "CPU threads per rank")(
      "force-balance", po::bool_switch(&force_balance), "round-robin routing (--moe-router-force-load-balancing)");
  po::variables_map vm;
  if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
  NEXTRON_CHECK(tokens > 0 && steps > 0 && warmup >= 0 && threads > 0,
                "--tokens, --steps and --threads must be positive; --warmup non-negative");
  set_cpu_threads(threads);
  ModelConfig whole = ModelConfig::from_file(config_path);
  whole.force_load_balancing = force_balance;
  NEXTRON_CHECK(whole.num_moe_layers() > 0, config_path, " has no MoE layer");
  NEXTRON_CHECK(whole.num_experts % world.size() == 0, "num_experts ", whole.num_experts, " is not divisible by the ",
                world.size(), " ranks (EP = world)");
  CountingCommunicator counted(world);
  std::unique_ptr<Communicator> ep_comm = counted.split(0, world.rank());
  auto* ep_counter = dynamic_cast<CountingCommunicator*>(ep_comm.get());
  MoeLayer ep(whole, ExpertParallel(ep_comm.get(), ep_comm.get())), ep1(whole, ExpertParallel{});
  const int64_t H = whole.hidden_size;
  std::mt19937_64 rng(99 + world.rank());
  std::normal_distribution<float> d(0.0f, 1.0f);
  Tensor x = Tensor::zeros({tokens, H}), dy = Tensor::zeros({tokens, H});
  for (int64_t i = 0; i < tokens * H; ++i) {
    x.f32()[i] = d(rng);
    dy.f32()[i] = d(rng);
  }
  double t_ep = 0, t_ep1 = 0;
  for (int i = 0; i < warmup + steps; ++i) {
    if (i == warmup) ep_counter->reset_own();
    const double a = ep1.step(x, dy, world), b = ep.step(x, dy, world);
    if (i >= warmup) {
      t_ep1 += a;
      t_ep += b;
    }
  }
  const double bytes = ep_counter->own().bytes_of(CommOp::all_to_all) / steps;
  if (world.rank() == 0)
    std::printf(
        "{\"ep\": %d, \"experts\": %lld, \"top_k\": %lld, \"hidden\": %lld, \"tokens_per_rank\": %lld, "
        "\"threads\": %d, \"ep1_ms\": %.3f, \"ep_ms\": %.3f, \"ep_over_ep1\": %.3f, "
        "\"all_to_all_bytes_per_step_rank0\": %.0f}\n",
        world.size(), static_cast<long long>(whole.num_experts), static_cast<long long>(whole.num_experts_per_tok),
        static_cast<long long>(H), static_cast<long long>(tokens), threads, 1000 * t_ep1 / steps, 1000 * t_ep / steps,
        t_ep / t_ep1, bytes);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  auto world = MpiCommunicator::world();
  const int status = cli::run_main("nextron-bench-moe", [&] { return run(argc, argv, *world); });
  if (status != 0 && mpi.world_size() > 1) abort_all("nextron-bench-moe failed (the error is above)");
  return status;
}
