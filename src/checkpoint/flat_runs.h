// Pieces of the whole model's flat layout (the single-device parameter table's order, every tensor row-major in its
// HF shape) held in a rank's buffers, the compact form in which a sharded checkpoint indexes them, and the copies
// that move the elements one layout stored into the buffers of another.
//
// A rank's tensor-parallel slice of a tensor split along its last dimension is one run per row: the rows of an
// [H, NH*D] output projection at TP 8 are H runs of NH*D/8 elements, H*NH*D apart in the full layout. A RunGroup
// stores such a slice as one record (first run, count, stride, repeats), so an index has a few records per tensor
// and rank, whatever its shape; a ZeRO shard's cut through a group leaves at most three (a partial row, whole rows, a
// partial row).
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace nextron {

// Full flat elements [full_offset, +count) are buffer elements [local_offset, +count).
struct FlatRun {
  int64_t full_offset = 0;
  int64_t local_offset = 0;
  int64_t count = 0;
};

// Runs r = 0 .. repeats-1: full flat [first + r * stride, +count) are buffer [local + r * count, +count).
struct RunGroup {
  int64_t first = 0;
  int64_t count = 0;
  int64_t stride = 0;  // >= count when repeats > 1 (the runs do not overlap); == count for a single run
  int64_t repeats = 1;
  int64_t local = 0;
  int64_t numel() const { return count * repeats; }
  int64_t span_end() const { return first + (repeats - 1) * stride + count; }  // one past the last element
};

// Whether `g` lies inside a flat layout of `total` elements: count > 0, repeats >= 1, stride >= count and every run
// within [0, total) (checked without overflow, so a damaged index cannot wrap around).
bool group_fits(const RunGroup& g, int64_t total);

// Groups `runs` (in their order, empty runs dropped): consecutive runs join a group while they follow it in the
// buffer, have its count and advance in the full layout by its stride. Adjacent runs that are contiguous in both
// spaces are merged first.
std::vector<RunGroup> group_runs(const std::vector<FlatRun>& runs);

// A copy of `count` elements from position `source` of a stored group's data (0 = its first element) to position
// `dest` of the reader's buffer.
struct RunCopy {
  int64_t source = 0;
  int64_t dest = 0;
  int64_t count = 0;
};

// The copies from one stored group, all within one parameter's elements.
struct GroupCopies {
  int have = 0;  // index into the `have` groups
  std::vector<RunCopy> copies;
  int64_t source_begin = 0, source_end = 0;  // the stored data they read: [source_begin, source_end)
};

// Where `need` (the reader's groups) intersects `have` (the stored groups, disjoint), parameter by parameter:
// param_offsets are the table's sorted start offsets and total its size. Returns the copies of each parameter in
// order (so a reader holds at most one parameter's worth of stored data at a time) and sets *uncovered to the first
// parameter index with a needed element that no stored group holds (-1 when every needed element is covered).
std::vector<std::vector<GroupCopies>> plan_copies(const std::vector<int64_t>& param_offsets, int64_t total,
                                                  const std::vector<RunGroup>& have, const std::vector<RunGroup>& need,
                                                  int* uncovered);
// The same for parameters that need not be contiguous: params[p] is parameter p's [begin, end), sorted and
// disjoint; elements between them (the table's alignment gaps, ParamTable::kAlign) belong to no parameter and are
// neither needed nor copied.
std::vector<std::vector<GroupCopies>> plan_copies(const std::vector<FlatRange>& params, int64_t total,
                                                  const std::vector<RunGroup>& have, const std::vector<RunGroup>& need,
                                                  int* uncovered);

}  // namespace nextron
