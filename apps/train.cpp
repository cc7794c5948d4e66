// nextron-train: pretrain a Qwen3-Next model on one process or as an MPI job, on the CPU backend or on GPUs
// (--device cuda: one GPU per rank, the node-local rank's GPU):
//   mpirun -np 8 nextron-train --tensor-model-parallel-size 2 --sequence-parallel ...   (TP 2 x DP 4)
// Options come from the command line and, optionally, a config file (--config-file, "name = value" lines with
// the same option names); the command line wins.
#include <boost/program_options.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "cli.h"
#include "comm/mpi_communicator.h"
#include "core/error.h"
#include "train/trainer.h"
#ifdef NEXTRON_HAVE_CUDA
#include "comm/cuda/nccl_communicator.h"
#include "core/cuda/device.h"
#include "kernels/cuda/cuda_ops.h"
#endif

namespace po = boost::program_options;
using namespace nextron;

namespace {

// Exit status of a run stopped by SIGINT/SIGTERM/SIGUSR1 before --train-steps: it saved a checkpoint and skipped
// --export-hf; distinct from 0 so that a job script or scheduler does not take it for a finished run.
constexpr int kExitStopped = 3;

constexpr const char* kUsage =
    "nextron-train: pretrain a Qwen3-Next model, on one process or as an MPI job (one rank per GPU with --device "
    "cuda)\n"
    "  nextron-train --model-config CONFIG.json --data DATA.h5 [options]\n"
    "  mpirun -np 8 nextron-train --tensor-model-parallel-size 2 --sequence-parallel ... (or launch/nextron-mpirun,\n"
    "  launch/ for Slurm; README)\n";

constexpr const char* kExitStatusHelp =
    "Exit status: 0 trained to --train-steps (or nothing was left to train) and exported; 1 an error (nothing is\n"
    "trained after an error found at start-up); 3 stopped early by SIGINT, SIGTERM or SIGUSR1: a checkpoint was\n"
    "saved (with --save) and --export-hf skipped; rerun the same command to continue and finish. Under mpirun,\n"
    "`kill -USR1 <mpirun pid>` reaches every rank at once (see docs/reliability.md).\n";

// "path" or "path:weight" (Megatron's blend syntax is "weight path"; a colon form keeps one value per flag).
DatasetSpec parse_data(const std::string& s) {
  DatasetSpec d;
  const auto colon = s.rfind(':');
  if (colon != std::string::npos && colon + 1 < s.size()) {
    try {
      size_t used = 0;
      d.weight = std::stod(s.substr(colon + 1), &used);
      NEXTRON_CHECK(used == s.size() - colon - 1, "bad weight");
      d.path = s.substr(0, colon);
      return d;
    } catch (const std::exception&) {
      // not a weight: the colon belongs to the path
    }
  }
  d.path = s;
  return d;
}

#ifdef NEXTRON_HAVE_CUDA
// The rank's index on its node (Open MPI, Slurm), for one GPU per rank; the world rank when neither says.
int local_rank(Communicator* world) {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"})
    if (const char* v = std::getenv(var)) return std::atoi(v);
  return world ? world->rank() : 0;
}
#endif

TrainBackend make_backend(const TrainOptions& o, Communicator* world) {
  if (o.device == "cpu") return {};
#ifdef NEXTRON_HAVE_CUDA
  const int gpus = cuda::device_count();
  NEXTRON_CHECK(gpus > 0,
                "--device cuda: no GPU is visible on this node (check the driver and "
                "CUDA_VISIBLE_DEVICES), or use --device cpu");
  const int gpu = local_rank(world);
  NEXTRON_CHECK(gpu < gpus, "--device cuda: node-local rank ", gpu, " has no GPU of its own (", gpus,
                " visible): start at most ", gpus, " ranks per node");
  TrainBackend b;
  auto ops = std::make_shared<CudaOps>(gpu, CudaOpsOptions{.deterministic = o.deterministic});
  b.ops = ops;
  // The NCCL groups share the backend's stream: a collective follows the kernels that wrote its buffers.
  b.device_comm = [gpu, stream = ops->stream()](Communicator& mpi) -> std::unique_ptr<Communicator> {
    auto* m = dynamic_cast<MpiCommunicator*>(&mpi);
    NEXTRON_CHECK(m != nullptr, "a device communicator is built from an MPI communicator");
    return NcclCommunicator::create(*m, gpu, stream);
  };
  return b;
#else
  (void)world;
  throw Error(
      "--device cuda: this nextron-train was built without the CUDA backend (no nvcc at configure time); "
      "rebuild on a machine with the CUDA toolkit, or use --device cpu");
#endif
}

int run(int argc, char** argv, Communicator* world) {
  TrainOptions o;
  std::vector<std::string> data;
  std::string config_file, decay_style, cp_order = "zigzag";
  po::options_description general("General");
  general.add_options()("help,h", "show this help")("config-file", po::value(&config_file),
                                                    "read options from this file (name = value per line)");
  po::options_description model("Model");
  model.add_options()("model-config", po::value(&o.model_config), "HF config.json: train from random weights")(
      "init-from", po::value(&o.init_from), "HF checkpoint directory: start from its weights")(
      "init-seed", po::value(&o.init_seed)->default_value(o.init_seed), "seed of the random initialisation")(
      "initializer-range", po::value(&o.initializer_range)->default_value(o.initializer_range),
      "std of the normal initialisation of matrices and embeddings");
  po::options_description dat("Data");
  dat.add_options()("data", po::value(&data)->composing(),
                    "tokenized HDF5 dataset (tools/preprocess.py), optionally PATH:WEIGHT; repeat to blend")(
      "seq-len", po::value(&o.seq_len)->default_value(o.seq_len), "tokens per training sequence")(
      "valid-fraction", po::value(&o.valid_fraction)->default_value(o.valid_fraction),
      "fraction of each dataset's samples held out for validation")(
      "data-seed", po::value(&o.data_seed)->default_value(o.data_seed), "seed of the sample order");
  po::options_description batch("Batch and optimizer");
  batch.add_options()("micro-batch-size", po::value(&o.micro_batch)->default_value(o.micro_batch),
                      "sequences per forward/backward")(
      "global-batch-size", po::value(&o.global_batch)->default_value(o.global_batch),
      "sequences per optimizer step (a multiple of the micro-batch size; the rest is gradient accumulation)")(
      "train-steps", po::value(&o.train_steps)->default_value(o.train_steps), "optimizer steps in total")(
      "lr", po::value(&o.lr.lr)->default_value(3e-4), "peak learning rate")(
      "min-lr", po::value(&o.lr.min_lr)->default_value(3e-5), "learning rate at the end of the decay")(
      "lr-warmup-steps", po::value(&o.lr.warmup_steps)->default_value(0),
      "linear warmup from 0 (Megatron convention: step s uses lr * s / warmup)")(
      "lr-decay-steps", po::value(&o.lr.decay_steps)->default_value(0), "decay length (0: --train-steps)")(
      "lr-decay-style", po::value(&decay_style)->default_value("cosine"), "cosine, linear or constant")(
      "weight-decay", po::value(&o.adam.weight_decay)->default_value(0.1), "AdamW decoupled weight decay")(
      "decay-all", po::bool_switch(&o.adam.decay_all),
      "also decay norms, biases, A_log and dt_bias (by default they are not decayed)")(
      "adam-beta1", po::value(&o.adam.beta1)->default_value(0.9), "AdamW beta1")(
      "adam-beta2", po::value(&o.adam.beta2)->default_value(0.95), "AdamW beta2")(
      "adam-eps", po::value(&o.adam.eps)->default_value(1e-8), "AdamW epsilon")(
      "clip-grad", po::value(&o.clip_grad)->default_value(o.clip_grad), "global gradient-norm clip (0: off)");
  po::options_description ckpt("Checkpoints");
  ckpt.add_options()("save", po::value(&o.save_dir), "checkpoint directory (also holds metrics.jsonl)")(
      "save-interval", po::value(&o.save_interval)->default_value(0), "save every N steps (0: only at exit)")(
      "keep-last", po::value(&o.keep_last)->default_value(o.keep_last), "checkpoints kept")(
      "async-save", po::bool_switch(&o.async_save),
      "write --save-interval checkpoints in the background: the steps go on while each rank writes its shard, and "
      "the checkpoint completes (manifest, rename) at a later step; holds a host copy of the rank's parameters and "
      "moment shards meanwhile. The final checkpoint is written before exit as usual")(
      "resume", po::value(&o.resume)->default_value("auto"),
      "auto (newest complete checkpoint in --save, if any), none (refused when --save already holds checkpoints: "
      "use a new --save or --overwrite-save), or a checkpoint directory")(
      "overwrite-save", po::bool_switch(&o.overwrite_save),
      "start over in --save: delete its checkpoints and its metrics.jsonl at start-up (nothing there is resumed)")(
      "export-hf", po::value(&o.export_hf),
      "write the final weights as an HF checkpoint here (a new or empty directory, checked at start-up)");
  po::options_description par("Parallelism (start N ranks with mpirun -np N; data parallel = N / (TP*CP*PP))");
  par.add_options()("tensor-model-parallel-size", po::value(&o.parallel.tp)->default_value(1),
                    "TP: split heads, DeltaNet key-head groups, MLP channels and vocab over this many ranks")(
      "sequence-parallel", po::bool_switch(&o.sequence_parallel),
      "with TP: split the residual stream and norms along the sequence (all-gather / reduce-scatter)")(
      "pipeline-model-parallel-size", po::value(&o.parallel.pp)->default_value(1),
      "PP: split the layers into this many stages, run by the 1F1B schedule")(
      "virtual-pipeline-model-parallel-size", po::value(&o.parallel.vpp)->default_value(1),
      "VPP: model chunks per pipeline rank (interleaved 1F1B; micro-batches per step must be a multiple of PP)")(
      "num-layers-per-virtual-pipeline-stage", po::value(&o.layers_per_virtual_stage)->default_value(0),
      "the same as a layer count per chunk: VPP = layers / PP / this (0: use --virtual-pipeline-model-parallel-size)")(
      "pipeline-model-parallel-layout", po::value(&o.parallel.pipeline.layout),
      "uneven stages, Megatron's string: stages split by '|', E embedding, t decoder layer, L loss, x*n and (...)*n "
      "repeat, e.g. \"Ettt|tL\"; PP x VPP stages in virtual-stage order (sets VPP)")(
      "decoder-first-pipeline-num-layers", po::value(&o.parallel.pipeline.first_stage_layers)->default_value(0),
      "layers of the first pipeline stage (the other stages split the rest evenly; 0: even split)")(
      "decoder-last-pipeline-num-layers", po::value(&o.parallel.pipeline.last_stage_layers)->default_value(0),
      "layers of the last pipeline stage (0: even split)")(
      "moe-expert-capacity-factor", po::value(&o.expert_capacity_factor),
      "cap every expert at ceil(factor x tokens x top-k / experts) slots per micro-batch and rank, dropping the rest "
      "(unset: dropless)")(
      "moe-token-drop-policy", po::value(&o.token_drop_policy)->default_value(o.token_drop_policy),
      "which slots an expert over capacity keeps: probs (highest routing weights) or position (earliest tokens)")(
      "moe-pad-expert-input-to-capacity", po::bool_switch(&o.pad_to_capacity),
      "fill every expert up to its capacity with zero rows (static shapes; needs --moe-expert-capacity-factor)")(
      "moe-per-layer-logging", po::bool_switch(&o.moe_per_layer_logging),
      "log every MoE layer's tokens per expert and max/mean imbalance each step to metrics.jsonl (kind expert_load; "
      "tools/plot_metrics.py --expert-load draws it)")(
      "moe-router-force-load-balancing", po::bool_switch(&o.force_load_balancing),
      "assign every token's experts round-robin so each expert gets the same rows (throughput and communication "
      "studies only: the router is not trained)")(
      "make-vocab-size-divisible-by", po::value(&o.vocab_divisible_by)->default_value(o.vocab_divisible_by),
      "pad the embedding and lm_head to a multiple of this x TP rows (padded logits stay out of the softmax; "
      "checkpoints and HF exports hold the real vocabulary)")(
      "recompute-granularity", po::value(&o.recompute.granularity),
      "activation recomputation: full (whole layers keep only their input) or selective (--recompute-modules)")(
      "recompute-method", po::value(&o.recompute.method),
      "full: uniform (groups of --recompute-num-layers layers) or block (the first --recompute-num-layers layers of "
      "each stage)")("recompute-num-layers", po::value(&o.recompute.num_layers)->default_value(0),
                     "full: see --recompute-method")(
      "recompute-modules", po::value(&o.recompute.modules)->multitoken(),
      "selective: modules recomputed in backward: core_attn (attention / delta-rule core), layernorm, mlp (dense "
      "MLP), moe (sparse MoE block), moe_act (experts' SwiGLU), shared_experts")(
      "context-parallel-size", po::value(&o.parallel.cp)->default_value(1),
      "CP: every sequence split over CP ranks (Gated DeltaNet passes its state between them, attention all-gathers "
      "keys and values)")("context-parallel-order", po::value(&cp_order)->default_value(cp_order),
                          "zigzag: 2 x CP equal chunks, rank c holds chunks c and 2CP-1-c (balanced causal attention; "
                          "--seq-len a multiple of 2 x CP); contiguous: CP equal slices (--seq-len a multiple of CP)")(
      "expert-model-parallel-size", po::value(&o.parallel.ep)->default_value(1),
      "EP: ranks sharing the routed experts (E / EP each; all-to-all token dispatch)")(
      "expert-tensor-parallel-size", po::value(&o.parallel.etp)->default_value(0),
      "ETP (0: the same as TP; without EP it must equal TP)");
  po::options_description log("Logging");
  log.add_options()("log-interval", po::value(&o.log_interval)->default_value(1), "steps between log lines")(
      "log-step-stats", po::bool_switch(&o.log_step_stats),
      "metrics.jsonl gets each step's time split (compute, each process group's communication, optimizer), the bytes "
      "rank 0 sent per group and every rank's peak memory (tools/sweep.py reads them)")(
      "eval-interval", po::value(&o.eval_interval)->default_value(0), "steps between validations (0: none)")(
      "eval-iters", po::value(&o.eval_iters)->default_value(o.eval_iters), "micro-batches per validation")(
      "sample-interval", po::value(&o.sample_interval)->default_value(0),
      "steps between greedy samples appended to SAVE/samples.jsonl (0: none; needs the whole model per rank)")(
      "sample-prompts", po::value(&o.sample_prompts),
      "prompts for --sample-interval: JSON Lines ({\"text\"} or {\"ids\"}) if .jsonl, else one text per line")(
      "sample-tokenizer", po::value(&o.sample_tokenizer)->default_value(o.sample_tokenizer),
      "tokenizer of the samples' text: byte or the data's HF tokenizer.json")(
      "sample-max-new-tokens", po::value(&o.sample_max_new_tokens)->default_value(o.sample_max_new_tokens),
      "tokens generated per sample prompt")("metrics", po::value(&o.metrics_path),
                                            "JSON Lines metrics file (default: SAVE/metrics.jsonl)")(
      "peak-tflops", po::value(&o.peak_tflops)->default_value(0),
      "peak FLOP/s for MFU, in TFLOP/s (0: measure this CPU's fp32 GEMM rate)")(
      "threads", po::value(&o.threads)->default_value(0), "CPU threads (0: all cores)")(
      "device", po::value(&o.device)->default_value(o.device),
      "cpu (fp32) or cuda (bf16 on GPUs, one per MPI rank: the node-local rank's GPU)")(
      "deterministic", po::bool_switch(&o.deterministic),
      "cuda: bitwise reproducible runs (cuDNN's deterministic attention backward, which needs a B x NH x S^2 x 2-byte "
      "workspace); the CPU backend is always deterministic")("no-progress", "no progress bar on the terminal");
  po::options_description all;
  all.add(general).add(model).add(dat).add(batch).add(par).add(ckpt).add(log);

  po::variables_map vm;
  cli::parse(argc, argv, all, vm);
  if (vm.count("help")) {
    if (!world || world->rank() == 0) std::cout << kUsage << all << "\n" << kExitStatusHelp;
    return 0;
  }
  if (vm.count("config-file")) {
    const std::string path = vm["config-file"].as<std::string>();
    std::ifstream f(path);
    NEXTRON_CHECK(f.good(), "cannot open --config-file '", path, "'");
    const po::parsed_options parsed = po::parse_config_file(f, all);
    for (const auto& opt : parsed.options)
      NEXTRON_CHECK(opt.string_key != "config-file", "--config-file '", path,
                    "' sets config-file: config files do not nest; put all options in one file (the command line "
                    "still overrides it)");
    po::store(parsed, vm);  // values already given on the command line win
  }
  po::notify(vm);
  o.lr.style = parse_lr_decay_style(decay_style);
  NEXTRON_CHECK(cp_order == "zigzag" || cp_order == "contiguous", "--context-parallel-order '", cp_order,
                "': use zigzag (the default) or contiguous");
  o.parallel.cp_order = cp_order == "zigzag" ? CpOrder::zigzag : CpOrder::contiguous;
  o.progress = !vm.count("no-progress");
  for (const auto& d : data) o.data.push_back(parse_data(d));
  o.validate();
  Trainer trainer(o, {}, world, make_backend(o, world));
  trainer.run();
  return trainer.stopped_early() ? kExitStopped : 0;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  if (mpi.world_size() == 1) return nextron::cli::run_main("nextron-train", [&] { return run(argc, argv, nullptr); });
  // In a job, an error on any rank ends the whole job (the other ranks may be waiting in a collective): the rank
  // reports it and aborts. Errors every rank finds at start-up (options, layout) are reported by every rank.
  auto world = MpiCommunicator::world();
  const int status = nextron::cli::run_main("nextron-train", [&] { return run(argc, argv, world.get()); });
  // Every rank agrees on a stop (run() does), so a stopped job ends normally with its own status on every rank.
  if (status != 0 && status != kExitStopped) abort_all("nextron-train failed (the error is above)");
  return status;
}
