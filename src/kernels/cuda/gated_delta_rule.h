// Chunked gated delta rule on the GPU (CPU reference: kernels/cpu/gated_delta_rule.h, same recurrence, layouts and
// GQA mapping: value head j reads key head j / (Hv / Hk) without materialising repeated q/k).
//
// q, k: (B, S, Hk, dk) bf16, already L2-normalised; v: (B, S, Hv, dv) bf16; g (log-decay, <= 0), beta:
// (B, S, Hv) fp32; o: (B, S, Hv, dv) bf16. States (B, Hv, dk, dv) fp32. Chunks of 64 tokens (the last one may be
// partial: any S >= 1). Within a chunk, cumulative g, decay factors exp(G_i - G_j) and the state are fp32; the
// products with bf16 q/k/v accumulate in fp32. Head dims: any dk, dv in [1, 256] (Qwen3-Next: 128); the kernels
// work on multiples of 16, so other widths (the small test models' 8) run zero-padded to the next multiple of 16,
// which leaves every result unchanged (padded key columns add nothing to K K^T, Q K^T or k^T h, and padded value
// columns stay zero), at the cost of copies in and out. Wider dims throw nextron::Error naming the constraint.
#pragma once

#include <vector>

#include "kernels/cpu/gated_delta_rule.h"  // GdrShape
#include "kernels/cuda/common.h"

namespace nextron::cuda {

using cpu::GdrShape;

// The forward's intermediates the backward reads (per chunk and value head: the cumulative decays Gc, W, U, the new
// values Vn and the state entering the chunk h_c: dk / dv + 2 + dk / 64 (B, S, Hv, dv) bf16 tensors, 5 at
// dk = dv = 128): the bytes of `save` / `saved` below. A training forward may keep them for its backward, which then
// skips its recomputation (prepare and the sequential state pass: 9 of its 46.5 tensor-sized passes).
size_t gated_delta_rule_saved_bytes(const GdrShape& s);
// Bytes of device scratch the forward / backward need for shape s (the caller allocates it once and reuses it);
// less when every call passes `save` / `saved` (caller_keeps_intermediates).
size_t gated_delta_rule_workspace_bytes(const GdrShape& s, bool caller_keeps_intermediates = false);

// Overwrites o and final_state (nullptr to skip). initial_state: nullptr = zero. save (nullptr to skip): receives
// the intermediates (gated_delta_rule_saved_bytes) for the backward.
void gated_delta_rule_forward(bf16* o, float* final_state, const bf16* q, const bf16* k, const bf16* v, const float* g,
                              const float* beta, const float* initial_state, const GdrShape& s, float scale, void* save,
                              void* workspace, cudaStream_t stream);
// Accumulates dq, dk, dv (bf16), dg, dbeta, d_initial_state (fp32) (each may be nullptr) from d_o (required) and
// d_final_state (nullptr = zero). saved: what the forward of the same q, k, v, g, beta and initial state wrote to
// its `save` (read only), or nullptr: the backward recomputes it from the inputs. Either way the same bits (the
// same kernels compute the intermediates); deterministic (no atomics whose order varies between runs).
void gated_delta_rule_backward(bf16* dq, bf16* dk, bf16* dv, float* dg, float* dbeta, float* d_initial_state,
                               const bf16* d_o, const float* d_final_state, const bf16* q, const bf16* k, const bf16* v,
                               const float* g, const float* beta, const float* initial_state, const GdrShape& s,
                               float scale, const void* saved, void* workspace, cudaStream_t stream);

// HBM traffic account: the global-memory bytes each kernel of the forward / backward reads and writes as the code
// is written, with every optional pointer given (initial / final state and their gradients, all gradients), in two
// measures:
//   read_bytes / write_bytes: every block's loads and stores counted, even where the L2 cache would serve a re-read
//     (the same k rows loaded by each value head's block, the same W rows by each column-tile block of dv);
//   distinct_read_bytes / distinct_write_bytes: each tensor region the kernel touches counted once (what HBM moves
//     if every re-read within the kernel hits L2; across kernels, everything counts again).
// For head dims that are not multiples of 16, the account of the padded shape (the pad / unpad copies of
// gated_delta_rule.cu not included). The per-kernel tables are next to the kernels (gated_delta_rule_fwd.cu,
// gated_delta_rule_bwd.cu); the totals and the before / after figures are in docs/cuda.md.
struct GdrKernelTraffic {
  const char* kernel;
  size_t read_bytes, write_bytes;
  size_t distinct_read_bytes, distinct_write_bytes;
};
std::vector<GdrKernelTraffic> gated_delta_rule_forward_hbm_account(const GdrShape& s);
// saved: the backward given the forward's intermediates (no recomputed prepare and state pass).
std::vector<GdrKernelTraffic> gated_delta_rule_backward_hbm_account(const GdrShape& s, bool saved = false);
size_t gated_delta_rule_forward_hbm_bytes(const GdrShape& s);  // sum of the forward account (block loads)
size_t gated_delta_rule_backward_hbm_bytes(const GdrShape& s, bool saved = false);  // same, backward

// One decoding step (generation; kernels/cuda/gated_delta_rule_step.cu): q, k (B, Hk, dk), v, o (B, Hv, dv) bf16;
// g, beta (B, Hv) fp32; state (B, Hv, dk, dv) fp32 is read and overwritten with the state after the token. dk <= 256.
void gated_delta_rule_step(bf16* o, float* state, const bf16* q, const bf16* k, const bf16* v, const float* g,
                           const float* beta, int64_t B, int64_t Hk, int64_t Hv, int64_t dk, int64_t dv, float scale,
                           cudaStream_t stream);

}  // namespace nextron::cuda
