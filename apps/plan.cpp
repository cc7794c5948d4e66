// nextron-plan: rank the parallel layouts of a model on a cluster (docs/planner.md).
//   nextron-plan --model-config configs/models/qwen3-next-80b-a3b.json --cluster configs/clusters/h100-dgx.json
//                --gpus 8,64,512 --seq-len 4096 --global-batch-size 1024
// For every GPU count: every valid layout (TP, CP, PP, VPP, EP; SP with TP; micro-batch; recomputation) with its
// memory per rank, bytes per optimizer step per process group and estimated step time, fastest first; layouts that
// do not fit in memory last (or left out with --fitting-only).
#include <boost/program_options.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli.h"
#include "core/error.h"
#include "model/flops.h"
#include "plan/planner.h"

namespace po = boost::program_options;
using namespace nextron;
using namespace nextron::plan;

namespace {

constexpr const char* kUsage =
    "nextron-plan: every valid parallel layout of a model on a cluster, with memory per rank, communication per\n"
    "optimizer step per group and an estimated step time, fastest first (docs/planner.md)\n"
    "  nextron-plan --model-config CONFIG.json --cluster configs/clusters/h100-dgx.json --gpus 8,64,512 \\\n"
    "    --seq-len 4096 --global-batch-size 1024 [--micro-batch 1,2] [--recompute none,selective,full]\n"
    "  nextron-plan ... --layout TP1,CP1,PP4,VPP3,EP32 --gpus 128   (one layout: every figure)\n";

template <typename T>
std::vector<T> parse_list(const std::string& text, const char* option) {
  std::vector<T> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if constexpr (std::is_same_v<T, std::string>) {
      out.push_back(item);
    } else {
      size_t used = 0;
      long long v = 0;
      try {
        v = std::stoll(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      NEXTRON_CHECK(used == item.size() && v > 0, "--", option, " \"", text,
                    "\": give positive whole numbers separated by commas, e.g. 8,64,512");
      out.push_back(static_cast<T>(v));
    }
  }
  NEXTRON_CHECK(!out.empty(), "--", option, " is empty: give one or more values separated by commas");
  return out;
}

// "TP1,CP1,PP4,VPP3,EP32,SP,MB1" -> the sizes of one layout.
Candidate parse_layout(const std::string& text, int world) {
  Candidate c;
  c.world = world;
  for (const std::string& item : parse_list<std::string>(text, "layout")) {
    size_t digits = item.find_first_of("0123456789");
    const std::string key = item.substr(0, digits);
    if (key == "SP" && digits == std::string::npos) {
      c.sequence_parallel = true;
      continue;
    }
    NEXTRON_CHECK(digits != std::string::npos, "--layout item \"", item,
                  "\": give NAMEnumber with NAME one of TP CP PP VPP EP, or SP");
    const int v = std::stoi(item.substr(digits));
    if (key == "TP")
      c.sizes.tp = v;
    else if (key == "CP")
      c.sizes.cp = v;
    else if (key == "PP")
      c.sizes.pp = v;
    else if (key == "VPP")
      c.sizes.vpp = v;
    else if (key == "EP")
      c.sizes.ep = v;
    else
      throw Error(detail::concat("--layout item \"", item, "\": the names are TP CP PP VPP EP and SP"));
  }
  c.sizes.etp = c.sizes.tp;
  if (c.sizes.tp > 1) c.sequence_parallel = true;
  return c;
}

double gib(double bytes) { return bytes / double(1ull << 30); }

void print_table(std::FILE* out, const std::vector<Plan>& plans, int world, const Cluster& cluster, size_t top) {
  std::fprintf(out, "\n== %d GPUs (%s): %zu valid layouts, %zu fit in %.0f GiB ==\n", world, cluster.name.c_str(),
               plans.size(),
               static_cast<size_t>(std::count_if(plans.begin(), plans.end(), [](const Plan& p) { return p.fits; })),
               gib(cluster.memory_bytes));
  std::fprintf(out, "%-4s %-44s %7s %7s %7s %7s %4s %9s %9s %9s %9s %9s %9s %8s %10s %6s\n", "#", "layout", "w+g GiB",
               "opt GiB", "act GiB", "tot GiB", "fit", "tp GB", "cp GB", "dp_cp GB", "pp GB", "ep GB", "edp GB",
               "step s", "tokens/s", "MFU");
  for (size_t i = 0; i < plans.size() && i < top; ++i) {
    const Plan& p = plans[i];
    const RankMemory& m = p.largest.memory;
    const AxisBytes& b = p.max_bytes;
    std::fprintf(out,
                 "%-4zu %-44s %7.2f %7.2f %7.2f %7.2f %4s %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %8.3f %10.0f %5.1f%%\n",
                 i + 1, p.layout.describe().c_str(), gib(double(m.weights + m.grads + m.buffers)),
                 gib(double(m.optimizer)), gib(double(m.activations + m.scratch)), gib(double(m.total())),
                 p.fits ? "yes" : "NO", b[Axis::tp] / 1e9, b[Axis::cp] / 1e9, b[Axis::dp_cp] / 1e9, b[Axis::pp] / 1e9,
                 b[Axis::ep] / 1e9, b[Axis::edp] / 1e9, p.step_s, p.tokens_per_s, 100 * p.mfu);
  }
}

void print_detail(std::FILE* out, const Plan& p, const Cluster& cluster) {
  const RankMemory& m = p.largest.memory;
  std::fprintf(out, "\nlayout %s (DP %d, EDP %d, %lld micro-batches per step)\n", p.layout.describe().c_str(), p.dp,
               p.edp, static_cast<long long>(p.microbatches));
  const double mib = double(1 << 20);
  std::fprintf(out,
               "memory of the largest rank (pp %d, cp %d): weights %.3f MiB, grads %.3f, optimizer %.3f, buffers "
               "%.3f, activations %.3f, scratch %.3f, total %.3f MiB = %lld bytes (%s %.0f GiB)\n",
               p.largest.pp_rank, p.largest.cp_rank, double(m.weights) / mib, double(m.grads) / mib,
               double(m.optimizer) / mib, double(m.buffers) / mib, double(m.activations) / mib, double(m.scratch) / mib,
               double(m.total()) / mib, static_cast<long long>(m.total()), p.fits ? "fits" : "does NOT fit",
               gib(cluster.memory_bytes));
  std::fprintf(out, "bytes per step (max over ranks / rank 0):");
  for (int a = 0; a < kAxes; ++a)
    std::fprintf(out, " %s %.4g/%.4g", axis_name(static_cast<Axis>(a)), p.max_bytes.bytes[a], p.rank0.bytes.bytes[a]);
  std::fprintf(out, "\ntime: compute %.4f s, recompute %.4f, bubble %.4f, optimizer %.4f, comm", p.compute_s,
               p.recompute_s, p.bubble_s, p.optimizer_s);
  for (int a = 0; a < kAxes; ++a)
    if (p.comm_s[a] > 0) std::fprintf(out, " %s %.4f", axis_name(static_cast<Axis>(a)), p.comm_s[a]);
  std::fprintf(out, "\nstep %.4f s, %.0f tokens/s, %.1f tokens/s/GPU, MFU %.1f%% (%.1f TFLOP/s per GPU)\n", p.step_s,
               p.tokens_per_s, p.tokens_per_s / p.layout.world, 100 * p.mfu, p.mfu * cluster.peak_flops / 1e12);
}

void write_csv(std::ofstream& csv, const std::vector<Plan>& plans) {
  for (const Plan& p : plans) {
    const RankMemory& m = p.largest.memory;
    const ParallelSizes& s = p.layout.sizes;
    csv << p.layout.world << ',' << s.tp << ',' << (p.layout.sequence_parallel ? 1 : 0) << ',' << s.cp << ',' << s.pp
        << ',' << s.vpp << ',' << s.ep << ',' << s.etp << ',' << p.dp << ',' << p.edp << ',' << p.layout.micro_batch
        << ',' << p.layout.recompute_name << ',' << m.weights << ',' << m.grads << ',' << m.optimizer << ','
        << m.buffers << ',' << m.activations << ',' << m.scratch << ',' << m.total() << ',' << (p.fits ? 1 : 0);
    for (int a = 0; a < kAxes; ++a) csv << ',' << p.max_bytes.bytes[a];
    for (int a = 0; a < kAxes; ++a) csv << ',' << p.rank0.bytes.bytes[a];
    csv << ',' << p.compute_s << ',' << p.recompute_s << ',' << p.bubble_s << ',' << p.optimizer_s;
    for (int a = 0; a < kAxes; ++a) csv << ',' << p.comm_s[a];
    csv << ',' << p.step_s << ',' << p.tokens_per_s << ',' << p.mfu << '\n';
  }
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_main("nextron-plan", [&]() -> int {
    po::options_description opts(std::string(kUsage) + "\nOptions");
    std::string model, cluster_path, gpus, micro, recompute = "none,selective,full", csv_path, layout;
    int64_t seq_len = 0, global_batch = 0, vocab_div = 128;
    double efficiency = 0.5;
    int top = 20;
    SearchSpace space;
    Cluster manual;
    manual.name = "command line";
    double gpn = 0, mem_gib = 0, peak = 0, intra = 0, inter = 0, hbm = 3350;
    std::string device = "cuda";
    // clang-format off
    opts.add_options()
      ("help,h", "this help")
      ("model-config", po::value(&model)->required(), "the model's HF config.json (configs/models/)")
      ("cluster", po::value(&cluster_path), "cluster description (configs/clusters/*.json); or the five options below")
      ("gpus-per-node", po::value(&gpn), "accelerators per node (without --cluster)")
      ("gpu-memory-gib", po::value(&mem_gib), "memory per accelerator, GiB (without --cluster)")
      ("peak-tflops", po::value(&peak), "dense peak of the training dtype per accelerator, TFLOP/s (without --cluster)")
      ("intra-node-gbps", po::value(&intra), "bandwidth per accelerator per direction inside a node, GB/s")
      ("inter-node-gbps", po::value(&inter), "bandwidth per accelerator per direction between nodes, GB/s")
      ("hbm-gbps", po::value(&hbm)->default_value(3350), "memory bandwidth (the optimizer step), GB/s")
      ("device", po::value(&device)->default_value("cuda"), "backend without --cluster: cuda (bf16) or cpu (fp32)")
      ("gpus", po::value(&gpus)->required(), "GPU counts, comma-separated, e.g. 8,64,512")
      ("seq-len", po::value(&seq_len)->required(), "tokens per sequence")
      ("global-batch-size", po::value(&global_batch)->required(), "sequences per optimizer step")
      ("micro-batch", po::value(&micro)->default_value("1"), "micro-batch sizes to consider, comma-separated")
      ("recompute", po::value(&recompute)->default_value("none,selective,full"),
       "recomputation options to consider: none, selective (core_attn layernorm moe_act shared_experts), full")
      ("efficiency", po::value(&efficiency)->default_value(0.5),
       "the achievable fraction of the peak for the model's GEMMs (0 < f <= 1)")
      ("make-vocab-size-divisible-by", po::value(&vocab_div)->default_value(128), "as nextron-train")
      ("top", po::value(&top)->default_value(20), "rows printed per GPU count")
      ("csv", po::value(&csv_path), "also write every evaluated layout to this CSV file")
      ("fitting-only", "leave out the layouts that do not fit in memory")
      ("layout", po::value(&layout), "evaluate one layout only, e.g. TP1,CP1,PP4,VPP3,EP32 (SP is on with TP > 1)")
      ("max-tp", po::value(&space.max_tp)->default_value(8), "largest TP considered")
      ("max-pp", po::value(&space.max_pp)->default_value(16), "largest PP considered")
      ("max-cp", po::value(&space.max_cp)->default_value(8), "largest CP considered")
      ("max-ep", po::value(&space.max_ep)->default_value(64), "largest EP considered")
      ("max-vpp", po::value(&space.max_vpp)->default_value(4), "largest VPP considered");
    // clang-format on
    po::variables_map vm;
    if (!cli::parse_or_help(argc, argv, opts, vm)) return 0;
    NEXTRON_CHECK(efficiency > 0 && efficiency <= 1, "--efficiency ", efficiency, ": give a fraction in (0, 1]");
    NEXTRON_CHECK(top > 0, "--top ", top, ": give a positive number of rows");
    Cluster cluster;
    const bool manual_given = vm.count("gpus-per-node") || vm.count("gpu-memory-gib") || vm.count("peak-tflops") ||
                              vm.count("intra-node-gbps") || vm.count("inter-node-gbps");
    if (!cluster_path.empty()) {
      NEXTRON_CHECK(!manual_given, "--cluster and --gpus-per-node/--gpu-memory-gib/--peak-tflops/--intra-node-gbps/",
                    "--inter-node-gbps both given: use one of them");
      cluster = load_cluster(cluster_path);
    } else {
      NEXTRON_CHECK(gpn > 0 && mem_gib > 0 && peak > 0 && intra > 0 && inter > 0,
                    "no cluster: give --cluster configs/clusters/h100-dgx.json, or all of --gpus-per-node, "
                    "--gpu-memory-gib, --peak-tflops, --intra-node-gbps and --inter-node-gbps (positive)");
      NEXTRON_CHECK(device == "cuda" || device == "cpu", "--device ", device, ": cuda or cpu");
      std::ostringstream j;
      j << "{\"name\": \"command line\", \"gpus_per_node\": " << gpn << ", \"gpu_memory_gib\": " << mem_gib
        << ", \"peak_tflops\": " << peak << ", \"intra_node_gbps\": " << intra << ", \"inter_node_gbps\": " << inter
        << ", \"hbm_gbps\": " << hbm << ", \"device\": \"" << device << "\"}";
      cluster = cluster_from_json(j.str(), "the command line");
    }
    Workload w;
    {
      std::ifstream probe(model);
      NEXTRON_CHECK(probe.good(), "--model-config ", model,
                    ": no such file (configs/models/ has the Qwen3-Next configs)");
    }
    NEXTRON_CHECK(seq_len > 0 && global_batch > 0, "--seq-len and --global-batch-size must be positive");
    w.config = ModelConfig::from_file(model);
    {
      const ModelSize ms = model_size(w.config);
      std::printf("%s: %.4g parameters (%.4g active per token), %.4g training FLOPs per token at seq %lld\n",
                  model.c_str(), double(ms.total), double(ms.active), training_flops_per_token(w.config, seq_len),
                  static_cast<long long>(seq_len));
    }
    w.seq_len = seq_len;
    w.global_batch = global_batch;
    w.vocab_divisible_by = vocab_div;
    space.micro_batches = parse_list<int64_t>(micro, "micro-batch");
    space.recompute = parse_list<std::string>(recompute, "recompute");
    for (const std::string& r : space.recompute) recompute_preset(r);  // names the choices on a typo
    const std::vector<int> counts = parse_list<int>(gpus, "gpus");
    std::ofstream csv;
    if (!csv_path.empty()) {
      csv.open(csv_path);
      NEXTRON_CHECK(csv.good(), "--csv ", csv_path, ": cannot write there (an existing, writable directory?)");
      csv << "gpus,tp,sp,cp,pp,vpp,ep,etp,dp,edp,micro_batch,recompute,weights_bytes,grads_bytes,optimizer_bytes,"
             "buffer_bytes,activation_bytes,scratch_bytes,total_bytes,fits";
      for (const char* k : {"max", "rank0"})
        for (int a = 0; a < kAxes; ++a) csv << ',' << k << '_' << axis_name(static_cast<Axis>(a)) << "_bytes";
      csv << ",compute_s,recompute_s,bubble_s,optimizer_s";
      for (int a = 0; a < kAxes; ++a) csv << ",comm_" << axis_name(static_cast<Axis>(a)) << "_s";
      csv << ",step_s,tokens_per_s,mfu\n";
    }
    int failures = 0;
    for (int world : counts) {
      std::vector<Plan> plans;
      if (!layout.empty()) {
        Candidate c = parse_layout(layout, world);
        c.micro_batch = space.micro_batches.front();
        c.recompute_name = space.recompute.front();
        c.recompute = recompute_preset(c.recompute_name);
        const std::string err = layout_error(w, c);
        NEXTRON_CHECK(err.empty(), "--layout ", c.describe(), " at ", world, " GPUs is not valid:\n", err);
        plans.push_back(evaluate(w, c, cluster, efficiency));
        print_table(stdout, plans, world, cluster, 1);
        print_detail(stdout, plans.front(), cluster);
      } else {
        plans = enumerate(w, world, space, cluster, efficiency);
        if (vm.count("fitting-only"))
          plans.erase(std::remove_if(plans.begin(), plans.end(), [](const Plan& p) { return !p.fits; }), plans.end());
        if (plans.empty() || !plans.front().fits) {
          std::fprintf(stderr,
                       "nextron-plan: %d GPUs: no layout fits in %.0f GiB per GPU (%zu valid layouts): use more GPUs, "
                       "raise --max-tp/--max-pp/--max-ep/--max-cp, add --recompute full, or a smaller "
                       "--micro-batch / --seq-len\n",
                       world, gib(cluster.memory_bytes), plans.size());
          ++failures;
        }
        print_table(stdout, plans, world, cluster, static_cast<size_t>(top));
        if (!plans.empty()) print_detail(stdout, plans.front(), cluster);
      }
      if (csv.is_open()) write_csv(csv, plans);
    }
    return failures > 0 ? 1 : 0;
  });
}
