// Parallel layout: rank order and group membership against hand-written lists following Megatron's
// RankGenerator (order "tp-cp-ep-dp-pp"), grid invariants, and one error message per violated constraint.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>

#include "core/error.h"
#include "model/config.h"
#include "parallel/layout.h"

namespace nextron::test {

namespace {

using Groups = std::vector<std::vector<int>>;

// A MoE model whose sizes divide by most small parallel sizes, so each constraint test violates only its own.
ModelConfig divisible_config() {
  ModelConfig c;
  c.vocab_size = 1024;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_hidden_layers = 8;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 4;
  c.head_dim = 32;
  c.linear_num_key_heads = 8;
  c.linear_num_value_heads = 16;
  c.linear_key_head_dim = 32;
  c.linear_value_head_dim = 32;
  c.num_experts = 16;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 256;
  c.shared_expert_intermediate_size = 256;
  for (int i = 0; i < 8; ++i) {
    c.layer_types.push_back((i + 1) % 4 == 0 ? MixerType::full_attention : MixerType::linear_attention);
  }
  return c;
}

ParallelSizes make_sizes(int tp, int cp, int pp, int ep, int etp) {
  ParallelSizes s;
  s.tp = tp;
  s.cp = cp;
  s.pp = pp;
  s.ep = ep;
  s.etp = etp;
  return s;
}

// Expects Layout(...) to throw exactly one violated constraint whose line contains `needle`.
void expect_one_violation(const ParallelSizes& s, int world, const ModelConfig& c, int64_t seq_len,
                          const std::string& needle) {
  try {
    Layout layout(s, world, c, seq_len);
    ADD_FAILURE() << "expected a violation mentioning '" << needle << "'";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("1 constraint violated"), std::string::npos) << what;
    EXPECT_NE(what.find(needle), std::string::npos) << what;
  }
}

}  // namespace

// World 16, TP 2, CP 1, PP 2, EP 4, ETP 1: dense grid TP2 x DP4 x PP2, expert grid EP4 x EDP2 x PP2.
TEST(Layout, World16Tp2Pp2Ep4MatchesMegatron) {
  const Layout l(make_sizes(2, 1, 2, 4, 1), 16, divisible_config(), 128);
  EXPECT_EQ(l.dp(), 4);
  EXPECT_EQ(l.edp(), 2);
  EXPECT_EQ(l.describe(), "world 16 = TP 2 x CP 1 x DP 4 x PP 2; experts ETP 1 x EP 4 x EDP 2 x PP 2");

  EXPECT_EQ(l.all_groups(Group::tp), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(l.all_groups(Group::dp), (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}}));
  EXPECT_EQ(l.all_groups(Group::pp), (Groups{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14}, {7, 15}}));
  EXPECT_EQ(l.all_groups(Group::model_parallel),
            (Groups{{0, 1, 8, 9}, {2, 3, 10, 11}, {4, 5, 12, 13}, {6, 7, 14, 15}}));
  EXPECT_EQ(l.all_groups(Group::tp_cp), l.all_groups(Group::tp));
  EXPECT_EQ(l.all_groups(Group::dp_cp), l.all_groups(Group::dp));
  EXPECT_EQ(l.group(Group::cp, 5), (std::vector<int>{5}));
  EXPECT_EQ(l.all_groups(Group::ep), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}, {12, 13, 14, 15}}));
  EXPECT_EQ(l.all_groups(Group::edp), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14}, {11, 15}}));
  EXPECT_EQ(l.group(Group::etp, 13), (std::vector<int>{13}));

  // Specific ranks.
  EXPECT_EQ(l.dense_coord(13), (DenseCoord{1, 0, 2, 1}));    // 13 = 1 + 2 * (2 + 4 * 1)
  EXPECT_EQ(l.expert_coord(13), (ExpertCoord{0, 1, 1, 1}));  // 13 = 1 + 4 * (1 + 2 * 1)
  EXPECT_EQ(l.group(Group::tp, 13), (std::vector<int>{12, 13}));
  EXPECT_EQ(l.group(Group::dp, 13), (std::vector<int>{9, 11, 13, 15}));
  EXPECT_EQ(l.group(Group::pp, 13), (std::vector<int>{5, 13}));
  EXPECT_EQ(l.group(Group::ep, 13), (std::vector<int>{12, 13, 14, 15}));
  EXPECT_EQ(l.group(Group::edp, 13), (std::vector<int>{9, 13}));
  EXPECT_EQ(l.group(Group::model_parallel, 13), (std::vector<int>{4, 5, 12, 13}));
  EXPECT_EQ(l.rank_in_group(Group::dp, 13), 2);
  EXPECT_EQ(l.group_index(Group::dp, 13), 3);
  EXPECT_EQ(l.rank_in_group(Group::ep, 6), 2);
  EXPECT_EQ(l.group_index(Group::ep, 6), 1);
}

// The example in Megatron's parallel_state docstring: 16 GPUs, TP 2, PP 4 -> DP 2.
TEST(Layout, MegatronDocstringExample) {
  ModelConfig c = divisible_config();
  c.num_experts = 0;  // dense model
  const Layout l(make_sizes(2, 1, 4, 1, 1), 16, c, 128);
  EXPECT_EQ(l.dp(), 2);
  EXPECT_EQ(l.all_groups(Group::tp), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}}));
  EXPECT_EQ(l.all_groups(Group::dp), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}}));
  EXPECT_EQ(l.all_groups(Group::pp), (Groups{{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}}));
}

// Context parallelism sits between tp and dp: world 8, TP 2, CP 2 -> DP 2.
TEST(Layout, ContextParallelGroups) {
  const Layout l(make_sizes(2, 2, 1, 2, 2), 8, divisible_config(), 64);
  EXPECT_EQ(l.dp(), 2);
  EXPECT_EQ(l.edp(), 2);
  EXPECT_EQ(l.dense_coord(6), (DenseCoord{0, 1, 1, 0}));
  EXPECT_EQ(l.all_groups(Group::cp), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(l.all_groups(Group::tp_cp), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  EXPECT_EQ(l.all_groups(Group::dp), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(l.all_groups(Group::dp_cp), (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}}));
  EXPECT_EQ(l.all_groups(Group::model_parallel), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  // Expert grid ETP 2 x EP 2 x EDP 2.
  EXPECT_EQ(l.all_groups(Group::etp), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  EXPECT_EQ(l.all_groups(Group::ep), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(l.all_groups(Group::edp), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
}

// Invariants over many layouts: coordinates round-trip, every kind partitions the world consistently, and the
// expert grid's PP groups are the dense grid's.
TEST(Layout, GridInvariants) {
  const ModelConfig c = divisible_config();
  const std::vector<std::pair<ParallelSizes, int>> cases = {
      {make_sizes(1, 1, 1, 1, 1), 1},  {make_sizes(2, 1, 2, 4, 1), 16}, {make_sizes(2, 2, 2, 2, 2), 16},
      {make_sizes(4, 1, 2, 8, 1), 32}, {make_sizes(1, 2, 4, 2, 4), 64}, {make_sizes(2, 1, 1, 16, 1), 48},
      {make_sizes(8, 1, 1, 2, 4), 24},
  };
  for (const auto& [s, world] : cases) {
    const Layout l(s, world, c, 256);
    SCOPED_TRACE(l.describe());
    EXPECT_EQ(l.tp() * l.cp() * l.dp() * l.pp(), world);
    EXPECT_EQ(l.etp() * l.ep() * l.edp() * l.pp(), world);
    for (int r = 0; r < world; ++r) {
      EXPECT_EQ(l.dense_rank(l.dense_coord(r)), r);
      EXPECT_EQ(l.expert_rank(l.expert_coord(r)), r);
      EXPECT_EQ(l.dense_coord(r).pp, l.expert_coord(r).pp);
      // The PP group walked in the expert grid.
      std::vector<int> expert_pp;
      ExpertCoord ec = l.expert_coord(r);
      for (ec.pp = 0; ec.pp < l.pp(); ++ec.pp) expert_pp.push_back(l.expert_rank(ec));
      EXPECT_EQ(expert_pp, l.group(Group::pp, r));
    }
    for (Group g : all_group_kinds()) {
      SCOPED_TRACE(group_name(g));
      const Groups groups = l.all_groups(g);
      std::vector<int> seen;
      for (size_t i = 0; i < groups.size(); ++i) {
        ASSERT_EQ(static_cast<int>(groups[i].size()), l.group_size(g));
        if (i > 0) {
          EXPECT_LT(groups[i - 1].front(), groups[i].front());  // ordered by smallest member
        }
        for (size_t k = 0; k < groups[i].size(); ++k) {
          const int r = groups[i][k];
          seen.push_back(r);
          EXPECT_EQ(l.group(g, r), groups[i]);
          EXPECT_EQ(l.group_index(g, r), static_cast<int>(i));
          EXPECT_EQ(l.rank_in_group(g, r), static_cast<int>(k));
        }
      }
      std::sort(seen.begin(), seen.end());
      for (int r = 0; r < world; ++r) ASSERT_EQ(seen[r], r);  // a partition of the world
    }
  }
}

TEST(Layout, DpIsDerivedOrCrossChecked) {
  ParallelSizes s = make_sizes(2, 1, 1, 1, 1);
  s.dp = 4;
  EXPECT_EQ(Layout(s, 8, divisible_config(), 64).dp(), 4);
  s.dp = 3;
  expect_one_violation(s, 8, divisible_config(), 64, "data-parallel size 3 does not match world / (TP*CP*PP)");
}

TEST(Layout, RankOutsideTheWorldIsAnError) {
  const Layout l(make_sizes(2, 1, 1, 1, 1), 4, divisible_config(), 64);
  EXPECT_THROW(l.dense_coord(4), Error);
  EXPECT_THROW(l.group(Group::tp, -1), Error);
  EXPECT_THROW(l.dense_rank(DenseCoord{2, 0, 0, 0}), Error);
}

// One test per constraint: a layout that violates only it, and the message naming it and the fix.
TEST(LayoutConstraints, WorldDivisibleByDenseGrid) {
  expect_one_violation(make_sizes(4, 1, 1, 1, 1), 6, divisible_config(), 64,
                       "world size 6 is not divisible by TP*CP*PP = 4*1*1 = 4: run with a multiple of 4 ranks");
}

TEST(LayoutConstraints, WorldDivisibleByExpertGrid) {
  expect_one_violation(make_sizes(1, 1, 1, 4, 1), 6, divisible_config(), 64,
                       "world size 6 is not divisible by ETP*EP*PP = 1*4*1 = 4");
}

TEST(LayoutConstraints, AttentionHeads) {
  ModelConfig c = divisible_config();
  c.num_attention_heads = 6;
  expect_one_violation(make_sizes(4, 1, 1, 1, 1), 4, c, 64,
                       "num_attention_heads 6 is not divisible by TP 4: choose a tensor-model-parallel-size that "
                       "divides 6 (1, 2, 3, 6)");
}

TEST(LayoutConstraints, KeyValueHeadsDividedOrReplicated) {
  ModelConfig c = divisible_config();
  c.num_key_value_heads = 4;
  EXPECT_NO_THROW(Layout(make_sizes(8, 1, 1, 1, 1), 8, c, 64));  // 8 = 2 x 4: each KV head on 2 ranks
  c.num_key_value_heads = 3;
  expect_one_violation(make_sizes(2, 1, 1, 1, 1), 2, c, 64, "num_key_value_heads 3 does not fit TP 2");
  expect_one_violation(make_sizes(4, 1, 1, 1, 1), 4, c, 64,
                       "TP must divide num_key_value_heads or be a multiple of it (KV heads replicated)");
}

TEST(LayoutConstraints, DeltaNetKeyHeads) {
  ModelConfig c = divisible_config();
  c.linear_num_key_heads = 6;
  expect_one_violation(make_sizes(4, 1, 1, 1, 1), 4, c, 64,
                       "linear_num_key_heads 6 (DeltaNet key-head groups) is not divisible by TP 4");
}

TEST(LayoutConstraints, DenseIntermediateOnlyWithDenseLayers) {
  ModelConfig c = divisible_config();
  c.intermediate_size = 510;
  EXPECT_NO_THROW(Layout(make_sizes(4, 1, 1, 1, 1), 4, c, 64));  // every MLP is MoE
  c.mlp_only_layers = {0};
  expect_one_violation(make_sizes(4, 1, 1, 1, 1), 4, c, 64,
                       "intermediate_size 510 (dense MLP) is not divisible by TP 4");
}

TEST(LayoutConstraints, SharedExpertIntermediate) {
  ModelConfig c = divisible_config();
  c.shared_expert_intermediate_size = 250;
  expect_one_violation(make_sizes(4, 1, 1, 1, 1), 4, c, 64,
                       "shared_expert_intermediate_size 250 is not divisible by TP 4");
}

TEST(LayoutConstraints, Vocab) {
  ModelConfig c = divisible_config();
  c.vocab_size = 1002;
  expect_one_violation(make_sizes(4, 1, 1, 1, 1), 4, c, 64,
                       "vocab_size 1002 is not divisible by TP 4: pad the vocabulary (--make-vocab-size-divisible-by");
  c.padded_vocab_size = 1024;  // padded: the rows split
  EXPECT_NO_THROW(Layout(make_sizes(4, 1, 1, 1, 1), 4, c, 64));
}

TEST(LayoutConstraints, ExpertsPerEpRank) {
  expect_one_violation(make_sizes(1, 1, 1, 3, 1), 3, divisible_config(), 64,
                       "num_experts 16 is not divisible by EP 3: choose an expert-model-parallel-size that divides "
                       "16 (1, 2, 4, 8, 16)");
}

TEST(LayoutConstraints, MoeIntermediate) {
  ModelConfig c = divisible_config();
  c.moe_intermediate_size = 250;
  expect_one_violation(make_sizes(1, 1, 1, 1, 4), 4, c, 64, "moe_intermediate_size 250 is not divisible by ETP 4");
}

TEST(LayoutConstraints, ExpertParallelismNeedsExperts) {
  ModelConfig c = divisible_config();
  c.num_experts = 0;
  expect_one_violation(make_sizes(1, 1, 1, 2, 1), 2, c, 64, "set but the model has no MoE layers");
}

TEST(LayoutConstraints, LayersPerStage) {
  expect_one_violation(make_sizes(1, 1, 3, 1, 1), 3, divisible_config(), 64,
                       "num_hidden_layers 8 is not divisible by PP 3: choose a pipeline-model-parallel-size");
}

TEST(LayoutConstraints, SequenceSplitsIntoEqualSlicesPerCpRank) {
  ParallelSizes contiguous = make_sizes(1, 4, 1, 1, 1);
  contiguous.cp_order = CpOrder::contiguous;
  EXPECT_NO_THROW(Layout(contiguous, 4, divisible_config(), 8));
  EXPECT_NO_THROW(Layout(contiguous, 4, divisible_config(), 100));
  expect_one_violation(contiguous, 4, divisible_config(), 102, "seq_len 102 is not divisible by CP = 4");
  // Zigzag (the default): 2 x CP equal chunks.
  EXPECT_NO_THROW(Layout(make_sizes(1, 4, 1, 1, 1), 4, divisible_config(), 104));
  expect_one_violation(make_sizes(1, 4, 1, 1, 1), 4, divisible_config(), 100,
                       "seq_len 100 is not divisible by 2 x CP = 8");
  // CP 1 needs no split.
  EXPECT_NO_THROW(Layout(make_sizes(1, 1, 1, 1, 1), 1, divisible_config(), 101));
}

// Which tokens each CP rank holds: contiguous slices, or chunks c and 2CP-1-c of 2 CP (written out for CP 4, 16
// tokens per rank: chunks of 8).
TEST(ContextParallelSegments, ZigzagPairsChunkCWithChunk2CpMinus1MinusC) {
  using Seg = std::vector<std::array<int64_t, 4>>;  // chunk, local_begin, global_begin, length
  auto of = [](CpOrder order, int r) {
    Seg out;
    for (const CpSegment& g : cp_segments(order, 4, r, 16))
      out.push_back({g.chunk, g.local_begin, g.global_begin, g.length});
    return out;
  };
  EXPECT_EQ(of(CpOrder::zigzag, 0), (Seg{{0, 0, 0, 8}, {7, 8, 56, 8}}));
  EXPECT_EQ(of(CpOrder::zigzag, 1), (Seg{{1, 0, 8, 8}, {6, 8, 48, 8}}));
  EXPECT_EQ(of(CpOrder::zigzag, 3), (Seg{{3, 0, 24, 8}, {4, 8, 32, 8}}));
  EXPECT_EQ(of(CpOrder::contiguous, 2), (Seg{{2, 0, 32, 16}}));
  // Every position exactly once over the ranks, and the causal work (keys before each query) equal per rank.
  std::vector<int> seen(64, 0);
  std::vector<int64_t> work;
  for (int r = 0; r < 4; ++r) {
    int64_t keys = 0;
    for (const CpSegment& g : cp_segments(CpOrder::zigzag, 4, r, 16))
      for (int64_t t = 0; t < g.length; ++t) {
        ++seen[static_cast<size_t>(g.global_begin + t)];
        keys += g.global_begin + t + 1;
      }
    work.push_back(keys);
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), 64);
  EXPECT_EQ(std::count(work.begin(), work.end(), work[0]), 4) << "zigzag balances causal attention";
  EXPECT_THROW(cp_segments(CpOrder::zigzag, 4, 0, 15), Error);
}

TEST(LayoutConstraints, SizesArePositive) {
  expect_one_violation(make_sizes(0, 1, 1, 1, 1), 4, divisible_config(), 64,
                       "tensor-model-parallel-size (TP) is 0: every parallel size must be >= 1");
}

TEST(LayoutConstraints, EveryViolationIsListed) {
  // TP 3 breaks heads, KV heads, DeltaNet heads, shared expert, vocab; world 4 breaks the dense grid.
  try {
    Layout(make_sizes(3, 1, 1, 1, 1), 4, divisible_config(), 64);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("6 constraints violated (TP 3, CP 1, PP 1, EP 1, ETP 1, world 4):"), std::string::npos) << what;
    for (const char* needle :
         {"world size 4 is not divisible by TP*CP*PP", "num_attention_heads 16", "num_key_value_heads 4",
          "linear_num_key_heads 8", "shared_expert_intermediate_size 256", "vocab_size 1024"}) {
      EXPECT_NE(what.find(std::string("\n  - ") + needle), std::string::npos) << needle << "\n" << what;
    }
  }
}

}  // namespace nextron::test
