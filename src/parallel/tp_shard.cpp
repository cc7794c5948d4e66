#include "parallel/tp_shard.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace nextron {

namespace {
// The whole model's table is the single-device layout (checkpoints, HF): no expert split, no folding.
ModelConfig single_device(ModelConfig c) {
  c.experts_folded = false;
  c.expert_parallel_size = 1;
  c.expert_parallel_rank = 0;
  return c;
}
}  // namespace

TpShardMap::TpShardMap(const ModelConfig& full_config, int tp_rank, int tp_size, const StageRange& stage, int ep_rank,
                       int ep_size)
    : full_config_(full_config),
      local_config_(ep_local_config(tp_local_config(full_config, tp_size), ep_size, ep_rank)),
      rank_(tp_rank),
      size_(tp_size),
      full_(single_device(full_config_)),
      local_(local_config_, stage) {
  NEXTRON_CHECK(tp_rank >= 0 && tp_rank < tp_size, "TP rank ", tp_rank, " outside [0, ", tp_size, ")");
  // The stage's parameters keep their global names: each local one is the full parameter of the same name.
  // The full table is the unpadded model's (what checkpoints and HF hold); the local one has this rank's slice of
  // the padded vocabulary, whose padded rows map to nothing (they stay zero).
  int64_t local_end = 0;
  for (const ParamSpec& l : local_.specs()) {
    const ParamSpec& f = full_.get(l.name);
    // The alignment gap after an entry (ParamTable::kAlign) maps to nothing, like padded vocabulary rows.
    if (l.offset > local_end) padding_.push_back({local_end, l.offset});
    local_end = l.offset + l.numel();
    if (l.name == "embed_tokens" || l.name == "lm_head") {
      // Vocabulary rows: rank r holds padded ids [r Vl, (r + 1) Vl), of which those below vocab_size are real.
      const int64_t Vl = l.shape[0], H = l.shape[1], V = f.shape[0];
      const int64_t begin = rank_ * Vl, real = std::clamp<int64_t>(V - begin, 0, Vl);
      if (real > 0) runs_.push_back({f.offset + begin * H, l.offset, real * H, true});
      if (real < Vl) padding_.push_back({l.offset + real * H, l.offset + Vl * H});
      continue;
    }
    NEXTRON_ASSERT(f.name == l.name && f.shape.size() == l.shape.size());
    const bool expert = f.kind == ParamKind::expert;
    // A routed expert tensor (E, ...) holds this rank's El experts from global index first_local_expert() on.
    const int64_t E = expert ? f.shape[0] : 1, El = expert ? l.shape[0] : 1,
                  first = expert ? local_config_.first_local_expert() : 0;
    if (f.tp_dim < 0 || l.tp_dim < 0 || size_ == 1) {  // replicated (or whole: folded experts)
      NEXTRON_ASSERT(std::equal(f.shape.begin() + 1, f.shape.end(), l.shape.begin() + 1) &&
                     (expert || f.shape == l.shape));
      // Folded experts are whole on every TP rank, each rank's copy reduced over EDP (which spans the TP ranks) or
      // holding other experts: each rank stands for its elements.
      const bool owner = (f.tp_dim >= 0 && l.tp_dim >= 0) || rank_ == 0 || (expert && full_config_.experts_folded);
      runs_.push_back({f.offset + first * (f.numel() / E), l.offset, l.numel(), owner, expert});
      continue;
    }
    const int d = f.tp_dim;
    int64_t outer = 1, inner = 1;
    for (int k = 0; k < d; ++k) outer *= f.shape[k];
    for (size_t k = d + 1; k < f.shape.size(); ++k) inner *= f.shape[k];
    const std::vector<int64_t> parts = f.tp_parts.empty() ? std::vector<int64_t>{f.shape[d]} : f.tp_parts;
    // Per block: where this rank's rows start in the full block, how many, and whether it owns them.
    struct Piece {
      int64_t full_start, local_start, rows;
      bool owner;
    };
    std::vector<Piece> pieces;
    int64_t full_start = 0, local_start = 0;
    for (int64_t part : parts) {
      NEXTRON_ASSERT(part % f.tp_unit == 0);
      const int64_t units = part / f.tp_unit;
      Piece p{};
      if (units >= size_) {
        NEXTRON_CHECK(part % size_ == 0, "parameter ", f.name, ": block of ", part, " rows is not divisible by TP ",
                      size_);
        p = {full_start + rank_ * (part / size_), local_start, part / size_, true};
      } else {
        NEXTRON_CHECK(size_ % units == 0, "parameter ", f.name, ": ", units, " units cannot be replicated over TP ",
                      size_);
        const int64_t per_unit = size_ / units;  // ranks sharing one unit
        p = {full_start + (rank_ / per_unit) * f.tp_unit, local_start, f.tp_unit, rank_ % per_unit == 0};
      }
      pieces.push_back(p);
      full_start += part;
      local_start += p.rows;
    }
    NEXTRON_ASSERT(local_start == l.shape[d]);
    // `outer` counts the full tensor's leading rows; a routed expert tensor's local ones are El / E of them, starting
    // at its first expert.
    const int64_t local_outer = outer / E * El, outer_start = first * (outer / E);
    for (int64_t o = 0; o < local_outer; ++o)
      for (const Piece& p : pieces)
        runs_.push_back({f.offset + ((outer_start + o) * f.shape[d] + p.full_start) * inner,
                         l.offset + (o * l.shape[d] + p.local_start) * inner, p.rows * inner, p.owner, expert});
  }
  // Every local element is in exactly one run or one padding range.
  int64_t covered = 0;
  size_t pad = 0;
  auto skip_padding = [&] {
    while (pad < padding_.size() && padding_[pad].begin == covered) covered = padding_[pad++].end;
  };
  for (const TpRun& r : runs_) {
    skip_padding();
    NEXTRON_ASSERT(r.local_offset == covered);
    covered += r.count;
    if (!r.owner) continue;
    if (!owned_.empty() && owned_.back().end == r.local_offset)
      owned_.back().end += r.count;
    else
      owned_.push_back({r.local_offset, r.local_offset + r.count});
  }
  if (local_.total_numel() > local_end) padding_.push_back({local_end, local_.total_numel()});  // the last gap
  skip_padding();
  NEXTRON_ASSERT(covered == local_.total_numel() && pad == padding_.size());
}

void TpShardMap::scatter(const float* full, float* local) const {
  for (const TpRun& r : runs_) std::memcpy(local + r.local_offset, full + r.full_offset, r.count * sizeof(float));
}

void TpShardMap::fill_local(
    float* local,
    const std::function<void(const ParamSpec& full, int64_t first, int64_t count, float* out)>& fill) const {
  // Runs come in local order, and within one local parameter their full offsets stay inside one full parameter.
  std::vector<const ParamSpec*> by_offset;
  for (const ParamSpec& s : full_.specs()) by_offset.push_back(&s);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const ParamSpec* a, const ParamSpec* b) { return a->offset < b->offset; });
  for (const TpRun& r : runs_) {
    auto it = std::upper_bound(by_offset.begin(), by_offset.end(), r.full_offset,
                               [](int64_t off, const ParamSpec* s) { return off < s->offset; });
    NEXTRON_ASSERT(it != by_offset.begin());
    const ParamSpec& f = **(it - 1);
    NEXTRON_ASSERT(r.full_offset + r.count <= f.offset + f.numel());
    fill(f, r.full_offset - f.offset, r.count, local + r.local_offset);
  }
}

void TpShardMap::place_owned(const float* local, float* full, bool dense, bool experts) const {
  for (const TpRun& r : runs_)
    if (r.owner && (r.expert ? experts : dense))
      std::memcpy(full + r.full_offset, local + r.local_offset, r.count * sizeof(float));
}

void TpShardMap::place_owned_range(const float* local, int64_t begin, int64_t count, float* out, bool dense,
                                   bool experts) const {
  const int64_t end = begin + count;
  for (const TpRun& r : runs_) {
    if (!r.owner || !(r.expert ? experts : dense)) continue;
    const int64_t lo = std::max(begin, r.full_offset), hi = std::min(end, r.full_offset + r.count);
    if (lo < hi)
      std::memcpy(out + (lo - begin), local + r.local_offset + (lo - r.full_offset), (hi - lo) * sizeof(float));
  }
}

void TpShardMap::place_all(const float* local, float* full) const {
  for (const TpRun& r : runs_) std::memcpy(full + r.full_offset, local + r.local_offset, r.count * sizeof(float));
}

}  // namespace nextron
