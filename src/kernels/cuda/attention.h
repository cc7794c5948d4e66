// Causal GQA attention on the GPU through cuDNN's fused flash attention, built with the cuDNN graph API
// (cudnn-frontend's SDPA nodes). CPU reference: kernels/cpu/attention.h (same layouts, lse definition and GQA
// mapping: query head h reads kv head h / (NH / NKV)).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "core/error.h"
#include "kernels/cuda/common.h"

namespace nextron::cuda {

// Thrown when cuDNN has no engine for a shape on this GPU (as opposed to a bad argument or a cuDNN failure), so
// callers and tests can tell "not supported here" from a bug.
class AttentionUnsupported : public Error {
 public:
  using Error::Error;
};

struct AttentionOptions {
  // cuDNN's deterministic backward (dq bitwise reproducible run to run). Off by default: on Hopper it keeps a dP
  // workspace of B x NH x S^2 x 2 bytes (1 GiB at B = 2, NH = 16, S = 4096).
  bool deterministic_backward = false;
};

// cuDNN's version number (cudnnGetVersion / CUDNN_VERSION, 91900 for 9.19.0) as "9.19.0".
std::string cudnn_version_string(size_t version);
// Throws when the runtime cuDNN's major version differs from the compiled one; warns when it is older.
void check_cudnn_version(size_t runtime, size_t compiled);

struct AttentionShape {
  int64_t B, S, NH, NKV, D;
  // Key positions when the S queries are the last S of more (bottom-right causal: a context-parallel slice against
  // the keys gathered up to its end); 0 means S.
  int64_t Sk = 0;
  int64_t kv_len() const { return Sk > 0 ? Sk : S; }
  auto key() const { return std::tie(B, S, NH, NKV, D, Sk); }
  bool operator<(const AttentionShape& o) const { return key() < o.key(); }
};

// Holds the cuDNN handle and one built forward and backward graph (execution plans) per shape, built on first
// use and reused: steps of a fixed shape build nothing. Workspace: grown once to the largest plan's need.
// Requirements (cuDNN's): D a multiple of 8 and at most 256, every pointer 16-byte aligned; an unsupported shape
// throws AttentionUnsupported naming the shape and the GPU. The backward uses cuDNN's default algorithm, or with
// options.deterministic_backward its deterministic one (bitwise reproducible; on Hopper it keeps a dP workspace of
// about B * NH * S^2 * 2 bytes) where cuDNN has one for the shape, else the default (with a note on stderr). Each
// graph built is logged once on stderr with its engine and workspace. Not thread-safe.
class FusedAttention {
 public:
  explicit FusedAttention(cudaStream_t stream, AttentionOptions options = {});
  ~FusedAttention();
  FusedAttention(const FusedAttention&) = delete;
  FusedAttention& operator=(const FusedAttention&) = delete;

  // q: (B, S, NH, D), k, v: (B, Sk, NKV, D) bf16 (s.kv_len()); o: (B, S, NH, D) bf16 overwritten; lse: (B, NH, S) fp32
  // overwritten (natural-log log-sum-exp of each row of scaled scores, as the CPU kernel).
  void forward(bf16* o, float* lse, const bf16* q, const bf16* k, const bf16* v, const AttentionShape& s, float scale);
  // OVERWRITES dq (B, S, NH, D), dk, dv (B, Sk, NKV, D) bf16 (cuDNN writes its gradients; the caller adds them
  // where it needs accumulation). o and lse from the forward.
  void backward(bf16* dq, bf16* dk, bf16* dv, const bf16* d_o, const bf16* q, const bf16* k, const bf16* v,
                const bf16* o, const float* lse, const AttentionShape& s, float scale);

  // Number of cuDNN graphs built so far (one per direction per distinct (shape, scale)); a repeated call of a
  // shape already seen adds none.
  size_t graphs_built() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nextron::cuda
