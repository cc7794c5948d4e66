// checkpoint/flat_runs: group_runs on the patterns tensor and ZeRO sharding produce (a dim-1 slice's rows become one
// strided group, contiguous runs merge, a ZeRO cut leaves at most three groups), and plan_copies checked element by
// element against a brute-force reference on random layouts: random parameter tables, the whole model stored as
// TP-like column slices cut by random ZeRO ranges over several shards, and random needs (runs across parameters,
// rows of other slices, repeated elements), with parts of the stored data missing for the `uncovered` result.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/flat_runs.h"

namespace nextron::test {

namespace {

std::string str(const RunGroup& g) {
  return "{first " + std::to_string(g.first) + ", count " + std::to_string(g.count) + ", stride " +
         std::to_string(g.stride) + ", repeats " + std::to_string(g.repeats) + ", local " + std::to_string(g.local) +
         "}";
}

bool same(const RunGroup& a, const RunGroup& b) {
  return a.first == b.first && a.count == b.count && a.stride == b.stride && a.repeats == b.repeats &&
         a.local == b.local;
}

void expect_groups(const std::vector<RunGroup>& got, const std::vector<RunGroup>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(same(got[i], want[i])) << i << ": " << str(got[i]);
}

// (buffer position, full element) pairs of runs or groups, sorted.
std::vector<std::pair<int64_t, int64_t>> elements(const std::vector<FlatRun>& runs) {
  std::vector<std::pair<int64_t, int64_t>> e;
  for (const FlatRun& r : runs)
    for (int64_t i = 0; i < r.count; ++i) e.emplace_back(r.local_offset + i, r.full_offset + i);
  std::sort(e.begin(), e.end());
  return e;
}
std::vector<std::pair<int64_t, int64_t>> elements(const std::vector<RunGroup>& groups) {
  std::vector<std::pair<int64_t, int64_t>> e;
  for (const RunGroup& g : groups)
    for (int64_t r = 0; r < g.repeats; ++r)
      for (int64_t i = 0; i < g.count; ++i) e.emplace_back(g.local + r * g.count + i, g.first + r * g.stride + i);
  std::sort(e.begin(), e.end());
  return e;
}

// The runs of `runs` (packed in a buffer) that fall in buffer positions [a, b), re-based to start at buffer 0.
std::vector<FlatRun> cut(const std::vector<FlatRun>& runs, int64_t a, int64_t b) {
  std::vector<FlatRun> out;
  for (const FlatRun& r : runs) {
    const int64_t lo = std::max(a, r.local_offset), hi = std::min(b, r.local_offset + r.count);
    if (lo < hi) out.push_back(FlatRun{r.full_offset + (lo - r.local_offset), lo - a, hi - lo});
  }
  return out;
}

int64_t uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {  // [lo, hi]
  return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
}

}  // namespace

TEST(FlatRuns, RowsOfADimOneSliceAreOneGroup) {
  // A [5, 12] tensor at offset 100, TP 3: rank 1 holds columns [4, 8) of every row.
  std::vector<FlatRun> runs;
  for (int64_t r = 0; r < 5; ++r) runs.push_back(FlatRun{100 + r * 12 + 4, 20 + r * 4, 4});
  expect_groups(group_runs(runs), {RunGroup{104, 4, 12, 5, 20}});
  // The next tensor, [3, 10] at 160, its columns [5, 9): a group of its own (its rows do not continue the first
  // group's progression).
  for (int64_t r = 0; r < 3; ++r) runs.push_back(FlatRun{160 + r * 10 + 5, 40 + r * 4, 4});
  expect_groups(group_runs(runs), {RunGroup{104, 4, 12, 5, 20}, RunGroup{165, 4, 10, 3, 40}});
  // Runs that happen to continue the progression (element 164 = 104 + 5 * 12) join the group, whatever tensor
  // they belong to: a group is only an arithmetic progression of runs.
  runs.resize(5);
  runs.push_back(FlatRun{164, 40, 4});
  expect_groups(group_runs(runs), {RunGroup{104, 4, 12, 6, 20}});
  // TP 1: whole rows are contiguous in both spaces and merge into one run.
  runs.clear();
  for (int64_t r = 0; r < 5; ++r) runs.push_back(FlatRun{100 + r * 12, r * 12, 12});
  expect_groups(group_runs(runs), {RunGroup{100, 60, 60, 1, 0}});
}

TEST(FlatRuns, ContiguousRunsMergeAndEmptyRunsAreDropped) {
  expect_groups(group_runs({FlatRun{0, 0, 3}, FlatRun{9, 9, 0}, FlatRun{3, 3, 5}, FlatRun{8, 8, 2}}),
                {RunGroup{0, 10, 10, 1, 0}});
  // Contiguous in the full layout but not in the buffer, or the other way round: not merged.
  const auto g = group_runs({FlatRun{0, 0, 3}, FlatRun{3, 4, 3}, FlatRun{10, 7, 2}});
  EXPECT_EQ(elements(g), elements(std::vector<FlatRun>{FlatRun{0, 0, 3}, FlatRun{3, 4, 3}, FlatRun{10, 7, 2}}));
  EXPECT_EQ(g.size(), 3u);
  // A run going backwards in the full layout starts a new group.
  expect_groups(group_runs({FlatRun{50, 0, 4}, FlatRun{10, 4, 4}}),
                {RunGroup{50, 4, 4, 1, 0}, RunGroup{10, 4, 4, 1, 4}});
  EXPECT_TRUE(group_runs({}).empty());
  EXPECT_TRUE(group_runs({FlatRun{5, 0, 0}}).empty());
}

TEST(FlatRuns, AZeroCutThroughAGroupLeavesAtMostThreeGroups) {
  // Rank 1 of TP 3 on a [10, 12] tensor: 10 rows of 4, 12 apart; ZeRO ranges over its 40-element buffer.
  std::vector<FlatRun> rows;
  for (int64_t r = 0; r < 10; ++r) rows.push_back(FlatRun{r * 12 + 4, r * 4, 4});
  // [6, 30): the end of row 1, rows 2 to 6, the start of row 7.
  expect_groups(group_runs(cut(rows, 6, 30)),
                {RunGroup{12 + 4 + 2, 2, 2, 1, 0}, RunGroup{24 + 4, 4, 12, 5, 2}, RunGroup{84 + 4, 2, 2, 1, 22}});
  // Every cut: at most three groups, holding exactly the cut's elements.
  for (int64_t a = 0; a <= 40; ++a)
    for (int64_t b = a; b <= 40; ++b) {
      const std::vector<FlatRun> part = cut(rows, a, b);
      const std::vector<RunGroup> g = group_runs(part);
      EXPECT_LE(g.size(), 3u) << a << " " << b;
      EXPECT_EQ(elements(g), elements(part)) << a << " " << b;
      for (const RunGroup& x : g) {
        EXPECT_GT(x.count, 0);
        EXPECT_GE(x.repeats, 1);
        EXPECT_TRUE(x.repeats == 1 ? x.stride == x.count : x.stride >= x.count) << str(x);
      }
    }
}

TEST(FlatRuns, UncoveredNamesTheFirstParameterWithAMissingElement) {
  // Parameters [0, 10), [10, 30), [30, 40); elements [20, 30) of the second are not stored.
  const std::vector<int64_t> offsets{0, 10, 30};
  const std::vector<RunGroup> have = group_runs({FlatRun{30, 0, 10}, FlatRun{0, 10, 20}});
  int uncovered = 7;
  plan_copies(offsets, 40, have, group_runs({FlatRun{0, 0, 10}, FlatRun{30, 10, 10}, FlatRun{12, 20, 8}}), &uncovered);
  EXPECT_EQ(uncovered, -1);
  plan_copies(offsets, 40, have, group_runs({FlatRun{5, 0, 30}}), &uncovered);
  EXPECT_EQ(uncovered, 1);
  plan_copies(offsets, 40, have, group_runs({FlatRun{35, 0, 5}, FlatRun{29, 5, 1}}), &uncovered);
  EXPECT_EQ(uncovered, 1);  // the first parameter in table order, not in the order of the needs
  plan_copies(offsets, 40, {}, group_runs({FlatRun{30, 0, 1}}), &uncovered);
  EXPECT_EQ(uncovered, 2);
  plan_copies(offsets, 40, {}, {}, &uncovered);
  EXPECT_EQ(uncovered, -1);
  // A row group needing one element of each of the three parameters: the missing one is the second's.
  plan_copies(offsets, 40, have, {RunGroup{5, 1, 17, 3, 0}}, &uncovered);  // elements 5, 22, 39
  EXPECT_EQ(uncovered, 1);
}

// Random layouts against an element-by-element reference.
TEST(FlatRuns, PlanCopiesMatchesABruteForceReference) {
  std::mt19937_64 rng(20240607);
  int with_uncovered = 0;
  for (int trial = 0; trial < 200; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    // A parameter table: 1-D and 2-D tensors, now and then an empty one.
    struct Param {
      int64_t offset, rows, cols;
    };
    std::vector<Param> params;
    int64_t total = 0;
    for (int64_t p = 0, n = uniform(rng, 1, 8); p < n; ++p) {
      const int64_t rows = rng() % 8 == 0 ? 0 : uniform(rng, 1, 9), cols = rng() % 3 == 0 ? 1 : uniform(rng, 1, 13);
      params.push_back(Param{total, rows, cols});
      total += rows * cols;
    }
    std::vector<int64_t> offsets;
    for (const Param& p : params) offsets.push_back(p.offset);
    if (total == 0) continue;

    // Stored: T TP-like ranks, each holding a column slice of every tensor (uneven; a 1-D tensor whole on one of
    // them), each rank's buffer cut into Z ZeRO ranges, one shard per (rank, range).
    const int64_t T = uniform(rng, 1, 4), Z = uniform(rng, 1, 3);
    std::vector<RunGroup> have;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<FlatRun> runs;
      int64_t at = 0;
      for (const Param& p : params) {
        int64_t c0 = 0, c1 = 0;
        if (p.cols == 1) {
          if (p.offset % T == t) c1 = 1;
        } else {
          c0 = p.cols * t / T;
          c1 = p.cols * (t + 1) / T;
        }
        for (int64_t r = 0; r < p.rows && c1 > c0; ++r, at += c1 - c0)
          runs.push_back(FlatRun{p.offset + r * p.cols + c0, at, c1 - c0});
      }
      std::vector<int64_t> cuts{0, at};
      for (int64_t z = 1; z < Z; ++z) cuts.push_back(uniform(rng, 0, at));
      std::sort(cuts.begin(), cuts.end());
      for (size_t z = 0; z + 1 < cuts.size(); ++z)
        for (const RunGroup& g : group_runs(cut(runs, cuts[z], cuts[z + 1]))) have.push_back(g);
    }
    // Now and then, part of the model is missing: a stored group dropped. Stored groups come in any order.
    if (rng() % 3 == 0 && !have.empty()) have.erase(have.begin() + static_cast<std::ptrdiff_t>(rng() % have.size()));
    std::shuffle(have.begin(), have.end(), rng);
    std::vector<std::vector<int64_t>> have_data;  // the full elements each stored group holds, in its order
    std::vector<bool> stored(static_cast<size_t>(total), false);
    for (const RunGroup& g : have) {
      std::vector<int64_t> data;
      for (int64_t r = 0; r < g.repeats; ++r)
        for (int64_t i = 0; i < g.count; ++i) data.push_back(g.first + r * g.stride + i);
      for (int64_t x : data) {
        ASSERT_FALSE(stored[static_cast<size_t>(x)]) << "the stored layout overlaps itself";
        stored[static_cast<size_t>(x)] = true;
      }
      have_data.push_back(std::move(data));
    }

    // Needed: random runs (across parameter boundaries), the rows of a column slice of a 2-D tensor, a hand-made
    // group with stride == count, elements needed twice; packed in a buffer in a random order.
    std::vector<FlatRun> need_runs;
    int64_t at = 0;
    for (int64_t k = uniform(rng, 0, 4); k > 0; --k) {
      const int64_t count = uniform(rng, 1, std::max<int64_t>(1, total / 2));
      const int64_t first = uniform(rng, 0, total - count);
      need_runs.push_back(FlatRun{first, at, count});
      at += count;
    }
    std::vector<RunGroup> need;
    for (const Param& p : params) {
      if (p.rows == 0 || p.cols < 2 || rng() % 2 != 0) continue;
      const int64_t c0 = uniform(rng, 0, p.cols - 1), c1 = uniform(rng, c0 + 1, p.cols);
      for (int64_t r = 0; r < p.rows; ++r, at += c1 - c0)
        need_runs.push_back(FlatRun{p.offset + r * p.cols + c0, at, c1 - c0});
    }
    std::shuffle(need_runs.begin(), need_runs.end(), rng);
    need = group_runs(need_runs);
    if (rng() % 2 == 0) {
      const int64_t count = uniform(rng, 1, 3), repeats = uniform(rng, 2, 4);
      if (count * repeats <= total) {
        const int64_t first = uniform(rng, 0, total - count * repeats);
        need.push_back(RunGroup{first, count, count, repeats, at});
        at += count * repeats;
      }
    }
    // Reference: buffer position -> full element.
    std::vector<int64_t> want(static_cast<size_t>(at), -1);
    for (const auto& [pos, x] : elements(need)) want[static_cast<size_t>(pos)] = x;
    int expect_uncovered = -1;
    for (size_t p = 0; p < params.size() && expect_uncovered < 0; ++p)
      for (int64_t x : want)
        if (x >= params[p].offset && x < params[p].offset + params[p].rows * params[p].cols &&
            !stored[static_cast<size_t>(x)]) {
          expect_uncovered = static_cast<int>(p);
          break;
        }
    with_uncovered += expect_uncovered >= 0;

    int uncovered = -2;
    const auto plan = plan_copies(offsets, total, have, need, &uncovered);
    EXPECT_EQ(uncovered, expect_uncovered);
    ASSERT_EQ(plan.size(), params.size());
    // Apply the copies: every needed, stored element arrives exactly once, nothing else is written.
    std::vector<int64_t> got(static_cast<size_t>(at), -1);
    std::vector<int> writes(static_cast<size_t>(at), 0);
    for (size_t p = 0; p < plan.size(); ++p) {
      const int64_t lo = params[p].offset, hi = lo + params[p].rows * params[p].cols;
      for (const GroupCopies& gc : plan[p]) {
        ASSERT_GE(gc.have, 0);
        ASSERT_LT(gc.have, static_cast<int>(have.size()));
        const std::vector<int64_t>& data = have_data[static_cast<size_t>(gc.have)];
        EXPECT_FALSE(gc.copies.empty());
        EXPECT_LE(0, gc.source_begin);
        EXPECT_LT(gc.source_begin, gc.source_end);
        EXPECT_LE(gc.source_end, static_cast<int64_t>(data.size()));
        for (const RunCopy& c : gc.copies) {
          ASSERT_GT(c.count, 0);
          ASSERT_LE(gc.source_begin, c.source);
          ASSERT_LE(c.source + c.count, gc.source_end);
          ASSERT_LE(0, c.dest);
          ASSERT_LE(c.dest + c.count, at);
          for (int64_t i = 0; i < c.count; ++i) {
            const int64_t x = data[static_cast<size_t>(c.source + i)];
            EXPECT_TRUE(lo <= x && x < hi) << "parameter " << p << "'s copies move element " << x;
            got[static_cast<size_t>(c.dest + i)] = x;
            ++writes[static_cast<size_t>(c.dest + i)];
          }
        }
      }
    }
    for (size_t i = 0; i < want.size(); ++i) {
      const bool deliverable = want[i] >= 0 && stored[static_cast<size_t>(want[i])];
      EXPECT_EQ(writes[i], deliverable ? 1 : 0) << "buffer position " << i;
      if (deliverable) {
        EXPECT_EQ(got[i], want[i]) << "buffer position " << i;
      }
    }
  }
  EXPECT_GT(with_uncovered, 10);  // the missing-data path was exercised
}

}  // namespace nextron::test
