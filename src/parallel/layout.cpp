#include "parallel/layout.h"

#include <array>
#include <sstream>

#include "core/error.h"

namespace nextron {

namespace {

// Which grid a group lives in and which of its four dimensions vary within the group.
// Dense dims: {tp, cp, dp, pp}; expert dims: {etp, ep, edp, pp}.
struct GroupSpec {
  bool expert;
  std::array<bool, 4> mask;
};

GroupSpec spec_of(Group g) {
  switch (g) {
    case Group::tp:
      return {false, {true, false, false, false}};
    case Group::cp:
      return {false, {false, true, false, false}};
    case Group::dp:
      return {false, {false, false, true, false}};
    case Group::pp:
      return {false, {false, false, false, true}};
    case Group::tp_cp:
      return {false, {true, true, false, false}};
    case Group::dp_cp:
      return {false, {false, true, true, false}};
    case Group::model_parallel:
      return {false, {true, false, false, true}};
    case Group::etp:
      return {true, {true, false, false, false}};
    case Group::ep:
      return {true, {false, true, false, false}};
    case Group::edp:
      return {true, {false, false, true, false}};
  }
  throw Error("internal error: unknown parallel Group");
}

// Divisors of n up to `limit`, as "1, 2, 4" for messages.
std::string divisors(int64_t n, int64_t limit = 64) {
  std::ostringstream os;
  bool first = true;
  for (int64_t d = 1; d <= n && d <= limit; ++d) {
    if (n % d != 0) continue;
    os << (first ? "" : ", ") << d;
    first = false;
  }
  return os.str();
}

}  // namespace

const char* group_name(Group g) {
  switch (g) {
    case Group::tp:
      return "tp";
    case Group::cp:
      return "cp";
    case Group::dp:
      return "dp";
    case Group::pp:
      return "pp";
    case Group::tp_cp:
      return "tp-cp";
    case Group::dp_cp:
      return "dp-cp";
    case Group::model_parallel:
      return "tp-pp (model parallel)";
    case Group::ep:
      return "ep";
    case Group::etp:
      return "etp";
    case Group::edp:
      return "edp";
  }
  return "?";
}

const std::vector<Group>& all_group_kinds() {
  static const std::vector<Group> kinds = {
      Group::tp, Group::cp,  Group::dp, Group::pp, Group::tp_cp, Group::dp_cp, Group::model_parallel,
      Group::ep, Group::etp, Group::edp};
  return kinds;
}

Layout::Layout(const ParallelSizes& sizes, int world_size, const ModelConfig& config, int64_t seq_len)
    : sizes_(sizes), world_(world_size) {
  std::vector<std::string> errors;
  auto fail = [&errors](auto&&... parts) { errors.push_back(detail::concat(parts...)); };

  const ParallelSizes& s = sizes;
  bool sizes_ok = world_size >= 1;
  if (world_size < 1) fail("world size ", world_size, " must be >= 1: start the job with at least one rank");
  const std::array<std::pair<const char*, int>, 5> named = {{{"tensor-model-parallel-size (TP)", s.tp},
                                                             {"pipeline-model-parallel-size (PP)", s.pp},
                                                             {"context-parallel-size (CP)", s.cp},
                                                             {"expert-model-parallel-size (EP)", s.ep},
                                                             {"expert-tensor-parallel-size (ETP)", s.etp}}};
  for (const auto& [name, value] : named) {
    if (value < 1) {
      fail(name, " is ", value, ": every parallel size must be >= 1 (use 1 to disable that parallelism)");
      sizes_ok = false;
    }
  }
  if (s.vpp < 1) {
    fail("virtual-pipeline-model-parallel-size is ", s.vpp, ": it must be >= 1 (1: no interleaving)");
    sizes_ok = false;
  } else if (s.vpp > 1 && s.pp < 2) {
    fail("virtual-pipeline-model-parallel-size ", s.vpp, " with PP ", s.pp,
         ": interleaving splits each pipeline rank's layers into chunks and needs PP >= 2; unset it or raise PP");
  }
  if (s.dp < 0) fail("data-parallel size ", s.dp, " must be >= 0 (0: derived from the world size)");

  if (sizes_ok) {
    const int64_t dense_mp = int64_t{s.tp} * s.cp * s.pp;
    const int64_t expert_mp = int64_t{s.etp} * s.ep * s.pp;
    if (world_size % dense_mp != 0) {
      fail("world size ", world_size, " is not divisible by TP*CP*PP = ", s.tp, "*", s.cp, "*", s.pp, " = ", dense_mp,
           ": run with a multiple of ", dense_mp, " ranks, or choose TP, CP and PP whose product divides ", world_size,
           " (", divisors(world_size), ")");
    } else {
      const int derived = static_cast<int>(world_size / dense_mp);
      if (s.dp != 0 && s.dp != derived) {
        fail("data-parallel size ", s.dp, " does not match world / (TP*CP*PP) = ", world_size, " / ", dense_mp, " = ",
             derived, ": leave it unset (derived) or run with ", int64_t{s.dp} * dense_mp, " ranks");
      }
      sizes_.dp = derived;
    }
    if (world_size % expert_mp != 0) {
      fail("world size ", world_size, " is not divisible by ETP*EP*PP = ", s.etp, "*", s.ep, "*", s.pp, " = ",
           expert_mp, ": run with a multiple of ", expert_mp, " ranks, or choose ETP, EP and PP whose product divides ",
           world_size, " (", divisors(world_size), ")");
    } else {
      edp_ = static_cast<int>(world_size / expert_mp);
    }

    // Which layer kinds the model has (an unresolved layer plan counts as both mixers).
    bool any_full = config.layer_types.empty(), any_linear = config.layer_types.empty();
    for (MixerType t : config.layer_types) (t == MixerType::full_attention ? any_full : any_linear) = true;
    const bool any_moe = config.num_moe_layers() > 0;
    const bool any_dense = config.num_moe_layers() < config.num_hidden_layers;
    const int64_t tp = s.tp;

    if (any_full && config.num_attention_heads % tp != 0) {
      fail("num_attention_heads ", config.num_attention_heads, " is not divisible by TP ", tp,
           ": choose a tensor-model-parallel-size that divides ", config.num_attention_heads, " (",
           divisors(config.num_attention_heads), ")");
    }
    const int64_t nkv = config.num_key_value_heads;
    if (any_full && nkv > 0 && nkv % tp != 0 && !(nkv < tp && tp % nkv == 0)) {
      fail("num_key_value_heads ", nkv, " does not fit TP ", tp,
           ": TP must divide num_key_value_heads or be a multiple of it (KV heads replicated); choose TP among ",
           divisors(nkv), " or a multiple of ", nkv);
    }
    if (any_linear && config.linear_num_key_heads % tp != 0) {
      fail("linear_num_key_heads ", config.linear_num_key_heads, " (DeltaNet key-head groups) is not divisible by TP ",
           tp, ": choose a tensor-model-parallel-size that divides ", config.linear_num_key_heads, " (",
           divisors(config.linear_num_key_heads), ")");
    }
    if (any_dense && config.intermediate_size % tp != 0) {
      fail("intermediate_size ", config.intermediate_size, " (dense MLP) is not divisible by TP ", tp,
           ": choose a tensor-model-parallel-size that divides ", config.intermediate_size);
    }
    if (any_moe && config.shared_expert_intermediate_size % tp != 0) {
      fail("shared_expert_intermediate_size ", config.shared_expert_intermediate_size, " is not divisible by TP ", tp,
           ": choose a tensor-model-parallel-size that divides ", config.shared_expert_intermediate_size);
    }
    if (config.padded_vocab() % tp != 0) {
      fail("vocab_size ", config.padded_vocab(), " is not divisible by TP ", tp,
           ": pad the vocabulary (--make-vocab-size-divisible-by, e.g. 128) or choose a tensor-model-parallel-size "
           "that divides ",
           config.padded_vocab(), " (", divisors(config.padded_vocab()), ")");
    }
    if (any_moe) {
      if (config.num_experts % s.ep != 0) {
        fail("num_experts ", config.num_experts, " is not divisible by EP ", s.ep,
             ": choose an expert-model-parallel-size that divides ", config.num_experts, " (",
             divisors(config.num_experts), ")");
      }
      if (config.moe_intermediate_size % s.etp != 0) {
        fail("moe_intermediate_size ", config.moe_intermediate_size, " is not divisible by ETP ", s.etp,
             ": choose an expert-tensor-parallel-size that divides ", config.moe_intermediate_size);
      }
    } else if (s.ep > 1 || s.etp > 1) {
      fail("EP ", s.ep, " / ETP ", s.etp, " set but the model has no MoE layers",
           ": use expert-model-parallel-size 1 and expert-tensor-parallel-size 1 for a dense model");
    }
    if (s.pipeline.uneven()) {
      // The split says where every layer goes; it is checked whole (and sets VPP when it is a layout string).
      try {
        sizes_.vpp = pipeline_chunks(s.pipeline, s.pp, s.vpp);
        pipeline_stages(config, s.pp, sizes_.vpp, s.pipeline);
      } catch (const Error& e) {
        fail(e.what());
      }
    } else if (config.num_hidden_layers % s.pp != 0) {
      fail("num_hidden_layers ", config.num_hidden_layers, " is not divisible by PP ", s.pp,
           ": choose a pipeline-model-parallel-size that divides ", config.num_hidden_layers, " (",
           divisors(config.num_hidden_layers), ")");
    } else if (s.vpp > 1 && config.num_hidden_layers % (int64_t{s.pp} * s.vpp) != 0) {
      fail("num_hidden_layers ", config.num_hidden_layers, " is not divisible by PP x VPP = ", s.pp, " x ", s.vpp,
           " (the interleaved schedule gives every rank VPP equal chunks): choose a "
           "virtual-pipeline-model-parallel-size "
           "that divides ",
           config.num_hidden_layers / s.pp, " (", divisors(config.num_hidden_layers / s.pp), ")");
    }
    if (seq_len < 1) {
      fail("seq_len ", seq_len, " must be >= 1: set --seq-len");
    } else if (s.cp > 1 && s.cp_order == CpOrder::contiguous && seq_len % s.cp != 0) {
      fail("seq_len ", seq_len, " is not divisible by CP = ", s.cp,
           " (context parallelism gives every CP rank an equal slice of each sequence): choose --seq-len a multiple "
           "of ",
           s.cp, " or a context-parallel-size dividing ", seq_len);
    } else if (s.cp > 1 && s.cp_order == CpOrder::zigzag && seq_len % (2 * s.cp) != 0) {
      fail("seq_len ", seq_len, " is not divisible by 2 x CP = ", 2 * s.cp,
           " (zigzag context parallelism cuts every sequence into 2 x CP equal chunks, two per CP rank): choose "
           "--seq-len a multiple of ",
           2 * s.cp, ", a context-parallel-size with 2 x CP dividing ", seq_len,
           ", or --context-parallel-order contiguous (CP equal slices, unbalanced attention work)");
    }
  }

  if (!errors.empty()) {
    std::ostringstream os;
    os << "parallel layout: " << errors.size() << (errors.size() == 1 ? " constraint" : " constraints")
       << " violated (TP " << s.tp << ", CP " << s.cp << ", PP " << s.pp << ", EP " << s.ep << ", ETP " << s.etp
       << ", world " << world_size << "):";
    for (const std::string& e : errors) os << "\n  - " << e;
    throw Error(os.str());
  }
}

void Layout::check_rank(int rank) const {
  NEXTRON_CHECK(rank >= 0 && rank < world_, "parallel layout: rank ", rank, " is outside the world [0, ", world_, ")");
}

DenseCoord Layout::dense_coord(int rank) const {
  check_rank(rank);
  DenseCoord c;
  c.tp = rank % sizes_.tp;
  rank /= sizes_.tp;
  c.cp = rank % sizes_.cp;
  rank /= sizes_.cp;
  c.dp = rank % sizes_.dp;
  c.pp = rank / sizes_.dp;
  return c;
}

ExpertCoord Layout::expert_coord(int rank) const {
  check_rank(rank);
  ExpertCoord c;
  c.etp = rank % sizes_.etp;
  rank /= sizes_.etp;
  c.ep = rank % sizes_.ep;
  rank /= sizes_.ep;
  c.edp = rank % edp_;
  c.pp = rank / edp_;
  return c;
}

int Layout::dense_rank(const DenseCoord& c) const {
  NEXTRON_CHECK(c.tp >= 0 && c.tp < sizes_.tp && c.cp >= 0 && c.cp < sizes_.cp && c.dp >= 0 && c.dp < sizes_.dp &&
                    c.pp >= 0 && c.pp < sizes_.pp,
                "parallel layout: dense coordinate (tp ", c.tp, ", cp ", c.cp, ", dp ", c.dp, ", pp ", c.pp,
                ") is outside the grid ", describe());
  return c.tp + sizes_.tp * (c.cp + sizes_.cp * (c.dp + sizes_.dp * c.pp));
}

int Layout::expert_rank(const ExpertCoord& c) const {
  NEXTRON_CHECK(c.etp >= 0 && c.etp < sizes_.etp && c.ep >= 0 && c.ep < sizes_.ep && c.edp >= 0 && c.edp < edp_ &&
                    c.pp >= 0 && c.pp < sizes_.pp,
                "parallel layout: expert coordinate (etp ", c.etp, ", ep ", c.ep, ", edp ", c.edp, ", pp ", c.pp,
                ") is outside the grid ", describe());
  return c.etp + sizes_.etp * (c.ep + sizes_.ep * (c.edp + edp_ * c.pp));
}

namespace {

int rank_of(const std::array<int, 4>& dims, const std::array<int, 4>& coord) {
  int r = 0;
  for (int i = 3; i >= 0; --i) r = r * dims[i] + coord[i];
  return r;
}

}  // namespace

std::vector<int> Layout::group(Group g, int rank) const {
  const GroupSpec spec = spec_of(g);
  std::array<int, 4> dims, coord;
  if (spec.expert) {
    const ExpertCoord c = expert_coord(rank);
    dims = {sizes_.etp, sizes_.ep, edp_, sizes_.pp};
    coord = {c.etp, c.ep, c.edp, c.pp};
  } else {
    const DenseCoord c = dense_coord(rank);
    dims = {sizes_.tp, sizes_.cp, sizes_.dp, sizes_.pp};
    coord = {c.tp, c.cp, c.dp, c.pp};
  }
  // Enumerate the masked dimensions in mixed radix, the lowest (fastest-varying) first, as Megatron does.
  int n = 1;
  for (int i = 0; i < 4; ++i) {
    if (spec.mask[i]) {
      n *= dims[i];
      coord[i] = 0;
    }
  }
  std::vector<int> members;
  members.reserve(n);
  for (int k = 0; k < n; ++k) {
    int rest = k;
    for (int i = 0; i < 4; ++i) {
      if (!spec.mask[i]) continue;
      coord[i] = rest % dims[i];
      rest /= dims[i];
    }
    members.push_back(rank_of(dims, coord));
  }
  return members;
}

int Layout::group_size(Group g) const {
  const GroupSpec spec = spec_of(g);
  const std::array<int, 4> dims = spec.expert ? std::array<int, 4>{sizes_.etp, sizes_.ep, edp_, sizes_.pp}
                                              : std::array<int, 4>{sizes_.tp, sizes_.cp, sizes_.dp, sizes_.pp};
  int n = 1;
  for (int i = 0; i < 4; ++i) n *= spec.mask[i] ? dims[i] : 1;
  return n;
}

int Layout::group_index(Group g, int rank) const {
  // Groups ordered by their smallest member = the unmasked coordinates read in mixed radix, lowest dim fastest.
  const GroupSpec spec = spec_of(g);
  std::array<int, 4> dims, coord;
  if (spec.expert) {
    const ExpertCoord c = expert_coord(rank);
    dims = {sizes_.etp, sizes_.ep, edp_, sizes_.pp};
    coord = {c.etp, c.ep, c.edp, c.pp};
  } else {
    const DenseCoord c = dense_coord(rank);
    dims = {sizes_.tp, sizes_.cp, sizes_.dp, sizes_.pp};
    coord = {c.tp, c.cp, c.dp, c.pp};
  }
  int index = 0;
  for (int i = 3; i >= 0; --i) {
    if (!spec.mask[i]) index = index * dims[i] + coord[i];
  }
  return index;
}

int Layout::rank_in_group(Group g, int rank) const {
  const std::vector<int> members = group(g, rank);
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i] == rank) return static_cast<int>(i);
  }
  throw Error("internal error: a rank is missing from its own group");
}

std::vector<std::vector<int>> Layout::all_groups(Group g) const {
  const int count = world_ / group_size(g);
  std::vector<std::vector<int>> groups(count);
  for (int r = 0; r < world_; ++r) {
    const int idx = group_index(g, r);
    if (groups[idx].empty()) groups[idx] = group(g, r);
  }
  return groups;
}

std::string Layout::describe() const {
  return detail::concat("world ", world_, " = TP ", sizes_.tp, " x CP ", sizes_.cp, " x DP ", sizes_.dp, " x PP ",
                        sizes_.pp, "; experts ETP ", sizes_.etp, " x EP ", sizes_.ep, " x EDP ", edp_, " x PP ",
                        sizes_.pp, sizes_.vpp > 1 ? detail::concat(" (VPP ", sizes_.vpp, " chunks per rank)") : "");
}

}  // namespace nextron
