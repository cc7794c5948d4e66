#include "checkpoint/flat_runs.h"

#include <algorithm>

#include "core/error.h"

namespace nextron {

namespace {

int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// The rows [r0, r1) of `g` that share an element with [a, b).
std::pair<int64_t, int64_t> rows_touching(const RunGroup& g, int64_t a, int64_t b) {
  if (a >= b || g.numel() == 0) return {0, 0};
  // Row r is [g.first + r * s, +count): it touches [a, b) iff g.first + r * s < b and g.first + r * s + count > a.
  const int64_t r0 = std::max<int64_t>(0, floor_div(a - g.first - g.count, g.stride) + 1);
  const int64_t r1 = std::min(g.repeats, ceil_div(b - g.first, g.stride));
  return {r0, std::max(r0, r1)};
}

// Calls f(row, lo, hi) for every row of `g` clipped to [a, b), where non-empty.
template <typename F>
void for_rows(const RunGroup& g, int64_t a, int64_t b, F&& f) {
  const auto [r0, r1] = rows_touching(g, a, b);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = g.first + r * g.stride;
    const int64_t lo = std::max(a, begin), hi = std::min(b, begin + g.count);
    if (lo < hi) f(r, lo, hi);
  }
}

void append(std::vector<RunCopy>& out, const RunCopy& c) {
  if (!out.empty() && out.back().source + out.back().count == c.source && out.back().dest + out.back().count == c.dest)
    out.back().count += c.count;
  else
    out.push_back(c);
}

}  // namespace

bool group_fits(const RunGroup& g, int64_t total) {
  if (g.first < 0 || g.first >= total || g.count <= 0 || g.count > total - g.first || g.repeats < 1 ||
      g.stride < g.count)
    return false;
  // The last run [first + (repeats - 1) * stride, +count) must end by total.
  return g.repeats - 1 <= (total - g.first - g.count) / g.stride;
}

std::vector<RunGroup> group_runs(const std::vector<FlatRun>& runs) {
  std::vector<FlatRun> merged;
  for (const FlatRun& r : runs) {
    NEXTRON_CHECK(r.count >= 0 && r.full_offset >= 0 && r.local_offset >= 0, "group_runs: a run [", r.full_offset,
                  ", +", r.count, ") at ", r.local_offset, " has a negative field");
    if (r.count == 0) continue;
    if (!merged.empty() && merged.back().full_offset + merged.back().count == r.full_offset &&
        merged.back().local_offset + merged.back().count == r.local_offset)
      merged.back().count += r.count;
    else
      merged.push_back(r);
  }
  std::vector<RunGroup> groups;
  for (const FlatRun& r : merged) {
    if (!groups.empty()) {
      RunGroup& g = groups.back();
      if (g.local + g.numel() == r.local_offset && g.count == r.count) {
        if (g.repeats == 1 && r.full_offset >= g.first + g.count) {
          g.stride = r.full_offset - g.first;
          g.repeats = 2;
          continue;
        }
        if (g.repeats > 1 && r.full_offset == g.first + g.repeats * g.stride) {
          ++g.repeats;
          continue;
        }
      }
    }
    groups.push_back(RunGroup{r.full_offset, r.count, r.count, 1, r.local_offset});
  }
  return groups;
}

std::vector<std::vector<GroupCopies>> plan_copies(const std::vector<int64_t>& param_offsets, int64_t total,
                                                  const std::vector<RunGroup>& have, const std::vector<RunGroup>& need,
                                                  int* uncovered) {
  std::vector<FlatRange> params;
  for (size_t p = 0; p < param_offsets.size(); ++p)
    params.push_back({param_offsets[p], p + 1 < param_offsets.size() ? param_offsets[p + 1] : total});
  return plan_copies(params, total, have, need, uncovered);
}

std::vector<std::vector<GroupCopies>> plan_copies(const std::vector<FlatRange>& params, int64_t total,
                                                  const std::vector<RunGroup>& have, const std::vector<RunGroup>& need,
                                                  int* uncovered) {
  const size_t P = params.size();
  std::vector<int64_t> param_offsets;
  for (const FlatRange& r : params) param_offsets.push_back(r.begin);
  auto param_end = [&](size_t p) { return params[p].end; };
  auto param_of = [&](int64_t x) {
    return static_cast<size_t>(std::upper_bound(param_offsets.begin(), param_offsets.end(), x) -
                               param_offsets.begin()) -
           1;
  };
  // The groups touching each parameter's elements.
  auto buckets = [&](const std::vector<RunGroup>& groups) {
    std::vector<std::vector<int>> b(P);
    for (size_t i = 0; i < groups.size(); ++i) {
      const RunGroup& g = groups[i];
      NEXTRON_CHECK(group_fits(g, total), "a checkpoint run group [", g.first, ", +", g.count, " x ", g.repeats,
                    " every ", g.stride, ") is not inside the model's ", total, " elements");
      for (size_t p = param_of(g.first), last = param_of(g.span_end() - 1); p <= last; ++p)
        b[p].push_back(static_cast<int>(i));
    }
    return b;
  };
  const auto have_in = buckets(have), need_in = buckets(need);
  *uncovered = -1;
  std::vector<std::vector<GroupCopies>> plan(P);
  for (size_t p = 0; p < P; ++p) {
    const int64_t lo = param_offsets[p], hi = param_end(p);
    int64_t needed = 0, delivered = 0;
    for (int n : need_in[p]) for_rows(need[n], lo, hi, [&](int64_t, int64_t a, int64_t b) { needed += b - a; });
    if (needed == 0) continue;
    for (int h : have_in[p]) {
      const RunGroup& hg = have[h];
      GroupCopies gc;
      gc.have = h;
      for (int n : need_in[p]) {
        const RunGroup& ng = need[n];
        for_rows(ng, lo, hi, [&](int64_t r, int64_t a, int64_t b) {
          for_rows(hg, a, b, [&](int64_t q, int64_t x, int64_t y) {
            append(gc.copies, RunCopy{q * hg.count + (x - (hg.first + q * hg.stride)),
                                      ng.local + r * ng.count + (x - (ng.first + r * ng.stride)), y - x});
          });
        });
      }
      if (gc.copies.empty()) continue;
      gc.source_begin = gc.copies.front().source;
      gc.source_end = gc.copies.front().source;
      for (const RunCopy& c : gc.copies) {
        gc.source_begin = std::min(gc.source_begin, c.source);
        gc.source_end = std::max(gc.source_end, c.source + c.count);
        delivered += c.count;
      }
      plan[p].push_back(std::move(gc));
    }
    if (delivered != needed && *uncovered < 0) *uncovered = static_cast<int>(p);
  }
  return plan;
}

}  // namespace nextron
