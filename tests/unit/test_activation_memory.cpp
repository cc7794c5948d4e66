// Activation memory (model/activation_memory.h): one micro-batch's record, measured as the growth of live memory
// (Tensor storage, core/tensor.h, plus the record's host vectors) while a fresh record runs its forward and backward
// on a warmed-up stage, equals the closed form byte for byte, on every fixture, for the whole model and for first,
// middle (where the model has three layers) and last pipeline stages (with their output gradients), without
// recomputation and with every full and selective option. A record that kept one tensor more or less than the formula
// says fails here; so does a recomputation that does not save what it claims.
#include <gtest/gtest.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "../golden/fixtures.h"
#include "checkpoint/hf_checkpoint.h"
#include "model/activation_memory.h"
#include "model/model.h"

namespace nextron::test {

namespace {

void copy_aux(const Ops& ops, MoeAuxStats& dst, const MoeAuxStats& src) {
  ops.f32(dst.count_sum, src.count_sum.shape());
  ops.f32(dst.prob_sum, src.prob_sum.shape());
  dst.count_sum.copy_from(src.count_sum);
  dst.prob_sum.copy_from(src.prob_sum);
  dst.total_rows = src.total_rows;
}

// Stages as layer counts, e.g. {1, 2, 1}: embedding + layer 0 | layers 1-2 | layer 3 + loss.
std::vector<StageRange> split(const std::vector<int64_t>& counts) {
  std::vector<StageRange> stages;
  int64_t begin = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    stages.push_back({begin, begin + counts[i], i == 0, i + 1 == counts.size()});
    begin += counts[i];
  }
  return stages;
}

struct Chain {
  std::vector<std::unique_ptr<Model>> stages;
  int64_t B = 2, S = 29;
  std::vector<int64_t> ids, targets;

  // one_rank: the stages are the virtual-pipeline chunks of one rank, sharing their layer scratch (as the trainer's).
  Chain(const ModelConfig& config, const std::vector<StageRange>& ranges, const RecomputeOptions& recompute,
        bool one_rank = false) {
    auto pool = one_rank ? std::make_shared<LayerScratchPool>() : nullptr;
    for (const StageRange& r : ranges) {
      stages.push_back(std::make_unique<Model>(config, ModelComms{}, nullptr, r, pool));
      stages.back()->set_recompute(recompute);
    }
    for (int64_t i = 0; i < B * S; ++i) {
      ids.push_back((i * 29 + 5) % config.vocab_size);
      targets.push_back(i % 7 == 3 ? -100 : (i * 11 + 4) % config.vocab_size);
    }
  }
  // Stage k's forward into `a`, its input (and router statistics) taken from `prev`, the record of stage k - 1.
  void forward(size_t k, ModelActivations& a, const ModelActivations* prev) {
    Model& m = *stages[k];
    if (k > 0) {
      m.stage_input(a, B, S).copy_from(stages[k - 1]->stage_output(*prev));
      // As the pipeline runner: router statistics travel only where the model has experts.
      if (m.config().num_experts > 0) copy_aux(m.ops(), a.aux, prev->aux);
    }
    m.forward_targets(a, ids.data(), targets.data(), B, S);
  }
  // Stage k's backward of `a`, its output gradient taken from stage k + 1's input gradient (kept outside the records,
  // as the pipeline runner's send buffers).
  std::vector<Tensor> input_grads;
  void backward(size_t k, ModelActivations& a, const ModelActivations& last) {
    Model& m = *stages[k];
    input_grads.resize(stages.size());
    if (k + 1 < stages.size()) {
      if (m.config().num_experts > 0) copy_aux(m.ops(), a.aux, last.aux);
      m.stage_output_grad(a).copy_from(input_grads[k + 1]);
    }
    m.backward_stage(a, 0.5f, k > 0 ? &input_grads[k] : nullptr);
  }
};

int64_t live_bytes() { return live_tensor_bytes(Device::cpu); }

// Every recomputation option: none, full (uniform 1 and 2, block 1), each selective module alone and together.
std::vector<RecomputeOptions> every_recompute_option() {
  return {{},
          {"full", "uniform", 1, {}},
          {"full", "uniform", 2, {}},
          {"full", "block", 1, {}},
          {"selective", "", 0, {"core_attn"}},
          {"selective", "", 0, {"layernorm"}},
          {"selective", "", 0, {"mlp"}},
          {"selective", "", 0, {"moe"}},
          {"selective", "", 0, {"moe_act"}},
          {"selective", "", 0, {"shared_experts"}},
          {"selective", "", 0, {"core_attn", "layernorm", "moe_act", "shared_experts"}}};
}

}  // namespace

class ActivationMemory : public ::testing::TestWithParam<std::string> {};

TEST_P(ActivationMemory, AFreshRecordHoldsWhatTheFormulaSays) {
  const std::string dir = std::string(NEXTRON_FIXTURES_DIR) + "/" + GetParam();
  const ModelConfig config = read_hf_config(dir);
  const int64_t L = config.num_hidden_layers;
  const std::vector<RecomputeOptions> options = every_recompute_option();
  const std::vector<int64_t> stages = L >= 3 ? std::vector<int64_t>{1, L - 2, 1} : std::vector<int64_t>{1, L - 1};
  for (const std::vector<int64_t>& counts : {std::vector<int64_t>{L}, stages}) {
    for (const RecomputeOptions& recompute : options) {
      std::string name = recompute.granularity + " " + recompute.method;
      for (const auto& m : recompute.modules) name += " " + m;
      SCOPED_TRACE(name + (counts.size() == 1 ? " whole model" : " stages"));
      const std::vector<StageRange> ranges = split(counts);
      Chain chain(config, ranges, recompute);
      const size_t P = ranges.size();
      // A warm-up micro-batch through every stage allocates the layers' and the model's scratch.
      std::vector<ModelActivations> warm(P);
      for (size_t k = 0; k < P; ++k) chain.forward(k, warm[k], k ? &warm[k - 1] : nullptr);
      for (size_t k = P; k-- > 0;) chain.backward(k, warm[k], warm.back());
      // Then a fresh record per stage: what it adds to live memory through its forward and backward is the record.
      for (size_t k = 0; k < P; ++k) {
        SCOPED_TRACE(ranges[k].describe(config));
        ModelActivations fresh;
        const int64_t before = live_bytes();
        chain.forward(k, fresh, k ? &warm[k - 1] : nullptr);
        chain.backward(k, fresh, warm.back());
        const int64_t measured = live_bytes() - before + record_host_bytes(fresh);
        ActivationShape shape;
        shape.B = chain.B;
        shape.S = chain.S;
        shape.pipeline = P > 1;
        const ActivationBytes want =
            activation_record_bytes(chain.stages[k]->local_config(), ranges[k], shape, recompute);
        EXPECT_EQ(measured, want.total());
      }
    }
  }
}

// The stage's buffers outside its records (scratch_bytes): everything a warmed-up chain of stages holds beyond the
// parameters, gradients, the warm-up records and the chain's own input-gradient buffers, measured from before the
// models exist, equals the closed form byte for byte on every fixture, whole model and stages, every recomputation
// option. A module that gains (or loses) a scratch tensor the formula does not list fails here.
TEST_P(ActivationMemory, TheScratchHoldsWhatTheFormulaSays) {
  const std::string dir = std::string(NEXTRON_FIXTURES_DIR) + "/" + GetParam();
  const ModelConfig config = read_hf_config(dir);
  const int64_t L = config.num_hidden_layers;
  const std::vector<RecomputeOptions> options = every_recompute_option();
  const std::vector<int64_t> stages = L >= 3 ? std::vector<int64_t>{1, L - 2, 1} : std::vector<int64_t>{1, L - 1};
  // The whole model, the stages of separate ranks, and the stages as the chunks of one rank (one scratch per kind).
  for (const auto& [counts, one_rank] :
       {std::pair{std::vector<int64_t>{L}, false}, std::pair{stages, false}, std::pair{stages, true}}) {
    for (const RecomputeOptions& recompute : options) {
      std::string name = recompute.granularity + " " + recompute.method;
      for (const auto& m : recompute.modules) name += " " + m;
      SCOPED_TRACE(name + (counts.size() == 1 ? " whole model" : one_rank ? " chunks of one rank" : " stages"));
      const std::vector<StageRange> ranges = split(counts);
      const size_t P = ranges.size();
      const int64_t before = live_bytes();
      {
        Chain chain(config, ranges, recompute, one_rank);
        std::vector<ModelActivations> warm(P);
        for (size_t k = 0; k < P; ++k) chain.forward(k, warm[k], k ? &warm[k - 1] : nullptr);
        for (size_t k = P; k-- > 0;) chain.backward(k, warm[k], warm.back());
        ActivationShape shape;
        shape.B = chain.B;
        shape.S = chain.S;
        shape.pipeline = P > 1;
        int64_t kept = 0, want = 0;
        SharedScratchCount counted;  // the chunks of one rank count their shared scratch once
        for (size_t k = 0; k < P; ++k) {
          const Model& m = *chain.stages[k];
          const ActivationBytes record = activation_record_bytes(m.local_config(), ranges[k], shape, recompute);
          kept += 8 * m.table().total_numel() + record.total() - record.host;  // f32 parameters and gradients
          if (k > 0) kept += chain.input_grads[k].nbytes();
          const ScratchBytes scratch =
              scratch_bytes(m.local_config(), ranges[k], shape, recompute, one_rank ? &counted : nullptr);
          EXPECT_EQ(scratch.transient, 0);
          want += scratch.total();
        }
        EXPECT_EQ(live_bytes() - before - kept, want);
      }
      EXPECT_EQ(live_bytes(), before);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ActivationMemory, ::testing::ValuesIn(fixture_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

// Recomputation saves what it says: on the hybrid MoE fixture every option keeps strictly less than none, and full
// recomputation of every layer keeps only the stage's layer inputs (no layer record at all).
TEST(ActivationMemoryFormula, RecomputationKeepsLess) {
  const ModelConfig config = read_hf_config(std::string(NEXTRON_FIXTURES_DIR) + "/hybrid_moe");
  const StageRange whole = StageRange::whole(config);
  ActivationShape shape;
  shape.B = 1;
  shape.S = 64;
  const int64_t none = activation_record_bytes(config, whole, shape, {}).total();
  for (const std::string& m : recomputable_modules()) {
    const int64_t less = activation_record_bytes(config, whole, shape, {"selective", "", 0, {m}}).total();
    EXPECT_LT(less, none) << m;
  }
  const ActivationBytes full =
      activation_record_bytes(config, whole, shape, {"full", "uniform", config.num_hidden_layers, {}});
  for (int64_t b : full.layers) EXPECT_EQ(b, 0);
  EXPECT_EQ(full.io, 2 * 64 * config.hidden_size * 4 + 64 * 8 + 2 * config.num_experts * 4);
}

}  // namespace nextron::test

namespace nextron::test {

// Under context parallelism a rank's record holds its Sl = S / CP tokens plus what the exchange adds (the conv halo,
// the DeltaNet states, attention's keys and values gathered up to the rank's last chunk). Contiguous slices gather
// (rank + 1) Sl keys; zigzag ranks (chunks r and 2CP-1-r of Sl / 2) gather (2 CP - r) Sl / 2, between (CP + 1) Sl / 2
// and CP Sl: as many keys on the busiest rank (rank 0 instead of the last), a smaller spread; its DeltaNet layers keep
// two chunks' states and halos and 2 CP transitions (host). For the 1B config at S = 4096 (bf16) every rank's record
// stays within 1.15 x record(S) / CP at CP 2, 4 and 8 (measured, contiguous / zigzag: 1.046 / 1.050, 1.060 / 1.072,
// 1.103 / 1.144): memory per rank falls as 1 / CP.
TEST(ActivationMemoryFormula, ContextParallelRecordsFallAsOneOverCp) {
  const ModelConfig config =
      ModelConfig::from_file(std::string(NEXTRON_SOURCE_DIR) + "/configs/models/qwen3-next-1b.json");
  const StageRange whole = StageRange::whole(config);
  ActivationShape shape;
  shape.B = 1;
  shape.S = 4096;
  shape.device = Device::cuda;
  const double one = static_cast<double>(activation_record_bytes(config, whole, shape, {}).total());
  for (const int64_t cp : {2, 4, 8}) {
    double worst_of[2] = {0, 0}, spread_of[2] = {0, 0};
    for (const CpOrder order : {CpOrder::contiguous, CpOrder::zigzag}) {
      ActivationShape part = shape;
      part.S = shape.S / cp;
      part.cp = cp;
      part.cp_order = order;
      double worst = 0, least = 1e30;
      for (int64_t r = 0; r < cp; ++r) {
        part.cp_rank = r;
        const double b = static_cast<double>(activation_record_bytes(config, whole, part, {}).total());
        worst = std::max(worst, b);
        least = std::min(least, b);
      }
      std::printf("CP %lld %s: the largest record %.1f MiB, %.3f of record(S) / CP (record(S) = %.1f MiB)\n",
                  static_cast<long long>(cp), cp_order_name(order), worst / (1 << 20),
                  worst / (one / static_cast<double>(cp)), one / (1 << 20));
      EXPECT_LT(worst, 1.15 * one / static_cast<double>(cp)) << "CP " << cp;
      EXPECT_GT(least, one / static_cast<double>(cp)) << "CP " << cp << ": the exchange adds something";
      worst_of[order == CpOrder::zigzag] = worst;
      spread_of[order == CpOrder::zigzag] = worst - least;
    }
    EXPECT_LT(worst_of[1], 1.05 * worst_of[0]) << "CP " << cp << ": zigzag's busiest rank gathers as many keys";
    EXPECT_LT(spread_of[1], spread_of[0]) << "CP " << cp << ": zigzag balances the ranks";
  }
}

}  // namespace nextron::test
