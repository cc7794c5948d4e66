// Causal GQA attention through cuDNN's fused flash attention (host code only: every kernel is cuDNN's). The
// forward and backward are cuDNN graphs of one SDPA node each, described with cudnn-frontend's graph API, built
// (validated, lowered, planned) on the first call of a (shape, scale) and cached, so a training step of a fixed
// shape only executes prebuilt plans.
//
// Layouts: q (B, S, NH, D), k / v (B, S, NKV, D) row-major bf16 are given to cuDNN as logical [B, H, S, D]
// tensors with strides [S * H * D, D, H * D, 1] (no transpose copies); o, dq, dk, dv the same. cuDNN's softmax
// "Stats" output is max + ln(sum exp) of each row of scaled, masked scores in fp32, i.e. exactly the CPU kernel's
// lse; it is bound to lse (B, NH, S) as a packed [B, NH, S, 1] tensor (no conversion). GQA: cuDNN maps query head
// h to kv head h / (NH / NKV) natively, in the forward and in the backward (which sums dk / dv over the group).
// Causal mask: top-left diagonal with right bound 0 (key j visible to query i iff j <= i), as the CPU kernel.
//
// Determinism (opt-in, FusedAttention(stream, {.deterministic_backward = true}), nextron-train --deterministic): by
// default the backward runs cuDNN's default (fastest) algorithm, whose dq is accumulated with atomics and so not
// bitwise reproducible run to run. The deterministic algorithm exists on Hopper but materialises dP in the
// workspace, B x NH x S^2 x 2 bytes (1 GiB at B = 2, NH = 16, S = 4096; ~34 GiB at S = 32k), which is why it is not
// the default. Where cuDNN has no deterministic engine for a shape, the default one runs and a note says so once.
// Every graph built is logged once on stderr with the engine cuDNN chose and its workspace.
//
// Versions: the runtime cuDNN must be of the major version compiled against (9), and a runtime older than the
// headers may lack engines the frontend asks for; both are checked when the first FusedAttention is built.
#include <cudnn.h>

#include "kernels/cuda/attention.h"

// clang-format off
#include <cstring>  // before cudnn_frontend.h: its shim uses std::strlen without including <cstring>
#include <cudnn_frontend.h>
// clang-format on

#include <cstdint>
#include <exception>
#include <functional>
#include <iostream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/cuda/check.h"
#include "core/cuda/device.h"
#include "core/error.h"

namespace nextron::cuda {

namespace fe = cudnn_frontend;
using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

namespace {

// Fixed tensor uids, so each call binds its pointers by uid without keeping the tensor objects around.
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

std::string describe(const AttentionShape& s, float scale) {
  return detail::concat("B=", s.B, " S=", s.S, s.kv_len() != s.S ? detail::concat(" (of ", s.kv_len(), " keys)") : "",
                        " NH=", s.NH, " NKV=", s.NKV, " D=", s.D, " scale=", scale);
}

void check_cudnn(cudnnStatus_t status, const char* call) {
  if (status != CUDNN_STATUS_SUCCESS)
    throw Error(detail::concat("cuDNN error in ", call, ": ", cudnnGetErrorString(status)));
}

// A (B, S, H, D) row-major bf16 tensor as cuDNN's logical [B, H, S, D].
// A (B, L, H, D) row-major bf16 tensor as cuDNN's logical [B, H, L, D] (L: S for queries, kv_len() for keys).
std::vector<int64_t> bhsd_dims(const AttentionShape& s, int64_t H, int64_t L) { return {s.B, H, L, s.D}; }
std::vector<int64_t> bshd_strides(const AttentionShape& s, int64_t H, int64_t L) {
  return {L * H * s.D, s.D, H * s.D, 1};
}

TensorPtr bf16_input(fe::graph::Graph& g, const char* name, int64_t uid, const AttentionShape& s, int64_t H,
                     int64_t L) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim(bhsd_dims(s, H, L))
                      .set_stride(bshd_strides(s, H, L))
                      .set_data_type(fe::DataType_t::BFLOAT16));
}
void bf16_output(const TensorPtr& t, int64_t uid, const AttentionShape& s, int64_t H, int64_t L) {
  t->set_output(true)
      .set_uid(uid)
      .set_dim(bhsd_dims(s, H, L))
      .set_stride(bshd_strides(s, H, L))
      .set_data_type(fe::DataType_t::BFLOAT16);
}
// lse (B, NH, S) fp32 as a packed [B, NH, S, 1] tensor (the only Stats layout cuDNN < 9.26 reads in the backward).
void lse_layout(fe::graph::Tensor_attributes& t, const AttentionShape& s) {
  t.set_uid(kStats)
      .set_dim({s.B, s.NH, s.S, 1})
      .set_stride({s.NH * s.S, s.S, 1, 1})
      .set_data_type(fe::DataType_t::FLOAT);
}

std::shared_ptr<fe::graph::Graph> new_graph() {
  auto g = std::make_shared<fe::graph::Graph>();
  // bf16 in and out, fp32 scores / softmax / accumulation inside.
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

struct BuildStatus {
  bool ok = true;
  bool unsupported = false;  // cuDNN has no engine for this graph on this GPU (vs an internal error)
  std::string message;
};

// validate -> lower to a backend operation graph -> heuristics -> support check -> compile the chosen plan.
BuildStatus build_graph(fe::graph::Graph& g, cudnnHandle_t handle) {
  struct Stage {
    const char* name;
    std::function<fe::error_t()> run;
    bool planning;  // past the frontend's own checks: a failure means "no engine for this graph"
  };
  const Stage stages[] = {
      {"validate", [&] { return g.validate(); }, false},
      {"build_operation_graph", [&] { return g.build_operation_graph(handle); }, false},
      {"create_execution_plans",
       [&] {
         return g.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
       },
       true},
      {"check_support", [&] { return g.check_support(); }, true},
      {"build_plans", [&] { return g.build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE); }, true},
  };
  for (const Stage& stage : stages) {
    BuildStatus r;
    r.ok = false;
    try {
      fe::error_t st = stage.run();
      if (st.is_good()) continue;
      // The frontend reports its own support-surface checks (head dim, strides, ...) as GRAPH_NOT_SUPPORTED from
      // validate; an empty engine list or a plan that does not compile shows up in the planning stages.
      r.unsupported = stage.planning || st.get_code() == fe::error_code_t::GRAPH_NOT_SUPPORTED;
      r.message = detail::concat(stage.name, ": ", st.get_message());
    } catch (const std::exception& e) {  // a few backend paths of the frontend throw instead of returning
      r.unsupported = stage.planning;
      r.message = detail::concat(stage.name, ": ", e.what());
    }
    return r;
  }
  return {};
}

}  // namespace

struct FusedAttention::Impl {
  struct Key {
    AttentionShape shape;
    float scale;
    bool operator<(const Key& o) const {
      if (shape < o.shape) return true;
      if (o.shape < shape) return false;
      return scale < o.scale;
    }
  };
  struct Plan {
    std::shared_ptr<fe::graph::Graph> graph;
    bool deterministic = true;
  };

  cudaStream_t stream = nullptr;
  AttentionOptions options;
  cudnnHandle_t handle = nullptr;
  std::string device;  // "name, memory, sm_XY", for error messages
  std::map<Key, Plan> forward_plans, backward_plans;
  size_t built = 0;
  void* workspace = nullptr;  // shared by every plan (they run one at a time on `stream`)
  int64_t workspace_bytes = 0;

  ~Impl() {
    forward_plans.clear();
    backward_plans.clear();
    if (workspace) cudaFree(workspace);
    if (handle) cudnnDestroy(handle);
  }

  [[noreturn]] void fail(const char* what, const BuildStatus& st, const AttentionShape& s, float scale,
                         const std::string& extra = "") const {
    if (st.unsupported)
      throw AttentionUnsupported(detail::concat(
          "cuDNN fused attention ", what, " does not support ", describe(s, scale), " on ", device, " with cuDNN ",
          cudnnGetVersion(), " (cuDNN needs D a multiple of 8 and at most 256 here): ", st.message, extra));
    throw Error(detail::concat("building the cuDNN fused attention ", what, " graph failed for ", describe(s, scale),
                               " on ", device, ": ", st.message, extra));
  }

  // Grows the shared workspace to the plan's need; allocation happens only while building, never in steady state.
  void reserve_workspace(fe::graph::Graph& g, const AttentionShape& s, float scale) {
    int64_t need = 0;
    fe::error_t st = g.get_workspace_size(need);
    if (st.is_bad())
      throw Error(detail::concat("cuDNN fused attention: workspace query failed for ", describe(s, scale), ": ",
                                 st.get_message()));
    if (need <= workspace_bytes) return;
    if (workspace) {
      // Plans already enqueued on the stream may still use the old buffer.
      NEXTRON_CUDA_CHECK(cudaStreamSynchronize(stream));
      NEXTRON_CUDA_CHECK(cudaFree(workspace));
      workspace = nullptr;
      workspace_bytes = 0;
    }
    NEXTRON_CUDA_CHECK(cudaMalloc(&workspace, static_cast<size_t>(need)));
    workspace_bytes = need;
  }

  // One line per graph built: which engine cuDNN chose, whether the backward is deterministic, its workspace.
  void log_built(const char* what, fe::graph::Graph& g, const AttentionShape& s, float scale, bool deterministic) {
    std::string engine;
    if (g.get_plan_name(engine).is_bad()) engine = "(name unavailable)";
    int64_t need = 0;
    if (g.get_workspace_size(need).is_bad()) need = -1;
    std::cerr << "nextron: cuDNN attention " << what << " " << describe(s, scale) << ": engine " << engine
              << (std::string(what) == "backward" ? (deterministic ? ", deterministic" : ", non-deterministic") : "")
              << ", workspace " << (need < 0 ? std::string("?") : detail::concat(need >> 20, " MiB")) << "\n";
  }

  const Plan& forward_plan(const AttentionShape& s, float scale) {
    const Key key{s, scale};
    if (auto it = forward_plans.find(key); it != forward_plans.end()) return it->second;
    auto g = new_graph();
    TensorPtr q = bf16_input(*g, "q", kQ, s, s.NH, s.S);
    TensorPtr k = bf16_input(*g, "k", kK, s, s.NKV, s.kv_len());
    TensorPtr v = bf16_input(*g, "v", kV, s, s.NKV, s.kv_len());
    auto opts = fe::graph::SDPA_attributes()
                    .set_name("causal_gqa_attention_forward")
                    .set_generate_stats(true)
                    .set_attn_scale(scale);
    // Top-left causal when queries and keys are the same positions; bottom-right when the queries are the last S
    // of kv_len() positions (the same mask then: query i sees keys 0 .. kv_len() - S + i).
    if (s.kv_len() == s.S)
      opts.set_causal_mask(true);
    else
      opts.set_causal_mask_bottom_right(true);
    auto outs = g->sdpa(q, k, v, opts);  // [O, Stats]
    bf16_output(outs[0], kO, s, s.NH, s.S);
    outs[1]->set_output(true);
    lse_layout(*outs[1], s);
    if (BuildStatus st = build_graph(*g, handle); !st.ok) fail("forward", st, s, scale);
    reserve_workspace(*g, s, scale);
    log_built("forward", *g, s, scale, true);
    ++built;
    return forward_plans.emplace(key, Plan{std::move(g), true}).first->second;
  }

  const Plan& backward_plan(const AttentionShape& s, float scale) {
    const Key key{s, scale};
    if (auto it = backward_plans.find(key); it != backward_plans.end()) return it->second;
    std::string deterministic_failure;
    // Deterministic first only when asked for; the default algorithm always.
    std::vector<bool> attempts;
    if (options.deterministic_backward) attempts.push_back(true);
    attempts.push_back(false);
    for (bool deterministic : attempts) {
      auto g = new_graph();
      TensorPtr q = bf16_input(*g, "q", kQ, s, s.NH, s.S);
      TensorPtr k = bf16_input(*g, "k", kK, s, s.NKV, s.kv_len());
      TensorPtr v = bf16_input(*g, "v", kV, s, s.NKV, s.kv_len());
      TensorPtr o = bf16_input(*g, "o", kO, s, s.NH, s.S);
      TensorPtr d_o = bf16_input(*g, "d_o", kDO, s, s.NH, s.S);
      fe::graph::Tensor_attributes lse_attr;
      lse_attr.set_name("lse");
      lse_layout(lse_attr, s);
      TensorPtr lse = g->tensor(lse_attr);
      auto opts = fe::graph::SDPA_backward_attributes()
                      .set_name("causal_gqa_attention_backward")
                      .set_attn_scale(scale)
                      .set_deterministic_algorithm(deterministic);
      if (s.kv_len() == s.S)
        opts.set_causal_mask(true);
      else
        opts.set_causal_mask_bottom_right(true);
      auto grads = g->sdpa_backward(q, k, v, o, d_o, lse, opts);  // [dQ, dK, dV]
      bf16_output(grads[0], kDQ, s, s.NH, s.S);
      bf16_output(grads[1], kDK, s, s.NKV, s.kv_len());
      bf16_output(grads[2], kDV, s, s.NKV, s.kv_len());
      BuildStatus st = build_graph(*g, handle);
      if (!st.ok) {
        if (deterministic) {
          deterministic_failure = st.message;
          continue;
        }
        fail("backward", st, s, scale,
             deterministic_failure.empty() ? std::string()
                                           : detail::concat(" (deterministic algorithm: ", deterministic_failure, ")"));
      }
      if (!deterministic && options.deterministic_backward)
        std::cerr << "nextron: cuDNN has no deterministic attention backward for " << describe(s, scale) << " on "
                  << device << " (" << deterministic_failure
                  << "); using its default algorithm, whose dq is not bitwise reproducible run to run\n";
      reserve_workspace(*g, s, scale);
      log_built("backward", *g, s, scale, deterministic);
      ++built;
      return backward_plans.emplace(key, Plan{std::move(g), deterministic}).first->second;
    }
    throw Error("internal error: FusedAttention::backward_plan fell through");  // the loop returns or throws
  }

  void execute(const Plan& plan, std::unordered_map<int64_t, void*>& pointers, const char* what,
               const AttentionShape& s, float scale) {
    fe::error_t st = plan.graph->execute(handle, pointers, workspace);
    if (st.is_bad())
      throw Error(detail::concat("cuDNN fused attention ", what, " failed to execute for ", describe(s, scale), " on ",
                                 device, ": ", st.get_message()));
    // execute() returns once the plan is enqueued on the handle's stream; a launch error would surface here.
    NEXTRON_CUDA_CHECK(cudaGetLastError());
  }
};

namespace {

void check_shape(const AttentionShape& s, float scale) {
  NEXTRON_CHECK(s.B >= 0 && s.S >= 0 && s.NH > 0 && s.NKV > 0 && s.D > 0 && s.NH % s.NKV == 0,
                "FusedAttention: invalid shape ", describe(s, scale), " (need NH a positive multiple of NKV)");
}

// cuDNN's attention kernels load with 16-byte vectors / TMA; a misaligned pointer is an error, not a slow path.
void check_aligned(const void* p, const char* name, const AttentionShape& s, float scale) {
  NEXTRON_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "FusedAttention: ", name,
                " must be 16-byte aligned for cuDNN (", describe(s, scale), ")");
}

}  // namespace

void check_cudnn_version(size_t runtime, size_t compiled) {
  NEXTRON_CHECK(runtime / 10000 == compiled / 10000, "cuDNN version mismatch: nextron was compiled against cuDNN ",
                cudnn_version_string(compiled), " but loaded ", cudnn_version_string(runtime), ": put a cuDNN ",
                compiled / 10000, ".x library first on the library path (e.g. the lib folder of ",
                "the pip wheel nvidia-cudnn-cu13 in LD_LIBRARY_PATH), or rebuild nextron against the installed one");
  if (runtime < compiled)
    std::cerr << "nextron: warning: cuDNN " << cudnn_version_string(runtime) << " is older than the "
              << cudnn_version_string(compiled)
              << " nextron was compiled against: attention engines added since may be missing (an unsupported shape "
                 "is then reported as such); use cuDNN >= "
              << cudnn_version_string(compiled) << " to be sure\n";
}

std::string cudnn_version_string(size_t v) { return detail::concat(v / 10000, ".", (v % 10000) / 100, ".", v % 100); }

FusedAttention::FusedAttention(cudaStream_t stream, AttentionOptions options) : impl_(std::make_unique<Impl>()) {
  static const bool version_checked = [] {
    check_cudnn_version(cudnnGetVersion(), CUDNN_VERSION);
    return true;
  }();
  (void)version_checked;
  impl_->stream = stream;
  impl_->options = options;
  int dev = 0;
  NEXTRON_CUDA_CHECK(cudaGetDevice(&dev));
  impl_->device = device_description(dev);
  check_cudnn(cudnnCreate(&impl_->handle), "cudnnCreate");
  check_cudnn(cudnnSetStream(impl_->handle, stream), "cudnnSetStream");
}

FusedAttention::~FusedAttention() = default;

size_t FusedAttention::graphs_built() const { return impl_->built; }

void FusedAttention::forward(bf16* o, float* lse, const bf16* q, const bf16* k, const bf16* v, const AttentionShape& s,
                             float scale) {
  check_shape(s, scale);
  if (s.B == 0 || s.S == 0) return;
  const std::pair<const void*, const char*> ptrs[] = {{o, "o"}, {lse, "lse"}, {q, "q"}, {k, "k"}, {v, "v"}};
  for (const auto& [p, name] : ptrs) check_aligned(p, name, s, scale);
  const Impl::Plan& plan = impl_->forward_plan(s, scale);
  std::unordered_map<int64_t, void*> pointers = {
      {kQ, const_cast<bf16*>(q)}, {kK, const_cast<bf16*>(k)}, {kV, const_cast<bf16*>(v)}, {kO, o}, {kStats, lse}};
  impl_->execute(plan, pointers, "forward", s, scale);
}

void FusedAttention::backward(bf16* dq, bf16* dk, bf16* dv, const bf16* d_o, const bf16* q, const bf16* k,
                              const bf16* v, const bf16* o, const float* lse, const AttentionShape& s, float scale) {
  check_shape(s, scale);
  if (s.B == 0 || s.S == 0) return;
  const std::pair<const void*, const char*> ptrs[] = {{dq, "dq"}, {dk, "dk"}, {dv, "dv"}, {d_o, "d_o"}, {q, "q"},
                                                      {k, "k"},   {v, "v"},   {o, "o"},   {lse, "lse"}};
  for (const auto& [p, name] : ptrs) check_aligned(p, name, s, scale);
  const Impl::Plan& plan = impl_->backward_plan(s, scale);
  std::unordered_map<int64_t, void*> pointers = {{kQ, const_cast<bf16*>(q)},
                                                 {kK, const_cast<bf16*>(k)},
                                                 {kV, const_cast<bf16*>(v)},
                                                 {kO, const_cast<bf16*>(o)},
                                                 {kDO, const_cast<bf16*>(d_o)},
                                                 {kStats, const_cast<float*>(lse)},
                                                 {kDQ, dq},
                                                 {kDK, dk},
                                                 {kDV, dv}};
  impl_->execute(plan, pointers, "backward", s, scale);
}

}  // namespace nextron::cuda
