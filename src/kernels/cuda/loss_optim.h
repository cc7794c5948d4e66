// Fused cross-entropy and the optimizer's flat-buffer kernels on the GPU (CPU references:
// kernels/cpu/cross_entropy.h, optim/adamw.h, optim/grad_clip.h).
#pragma once

#include <utility>
#include <vector>

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// Cross-entropy on bf16 logits (N, V) without materialising probabilities: one block per row computes max and
// sum(exp) online in fp32. targets: (N) int64 in [0, V) or -100 (ignored). Overwrites lse (N) fp32 and row_loss
// (N) fp32 (0 for ignored rows); a target outside [0, V) that is not -100 sets *bad_target (device int64, may be
// nullptr; the caller zeroes it beforehand) to its row + 1 (the largest such row + 1 when there are several:
// deterministic), and that row is treated as ignored (loss 0, zero gradient). The loss sum and count are reduced
// by the caller (sum_f64 below).
void cross_entropy_forward(float* row_loss, float* lse, const bf16* logits, const int64_t* targets, int64_t N,
                           int64_t V, int64_t* bad_target, cudaStream_t stream);

// Vocab-parallel cross-entropy (kernels/cpu/cross_entropy.h, Megatron's): a rank holds the logit columns of ids
// [vocab_begin, vocab_begin + V_local) of a vocabulary of V_full ids, and the loss is assembled from three numbers
// per row and rank instead of gathering the (N, V_full) logits.
// 1. Per rank, over its columns: logits (N, V_local) bf16. Overwrites stats (3, N) fp32: [0] the row max m, [1] the
//    sum of exp(x - m) (fp32, online as the forward above), [2] fp32 of the target's logit when this rank holds the
//    target, else 0 (ignored targets, and those of other ranks).
void cross_entropy_partial(float* stats, const bf16* logits, const int64_t* targets, int64_t N, int64_t V_local,
                           int64_t vocab_begin, cudaStream_t stream);
// 2. From the P ranks' stats (P, 3, N) fp32, all-gathered by the caller: lse = M + log(sum_r s_r exp(m_r - M)) with
//    M the largest m_r, row_loss = lse - sum_r target logit_r (0 on ignored rows), in double like the CPU, rounded
//    to fp32. One thread per row. Overwrites lse and row_loss (N) (row_loss may be nullptr). A target outside
//    [0, V_full) that is not -100 sets *bad_target (may be nullptr; zeroed by the caller) to the largest such row
//    + 1, and that row is treated as ignored, as in cross_entropy_forward.
void cross_entropy_combine(float* row_loss, float* lse, const float* stats, int64_t P, const int64_t* targets,
                           int64_t N, int64_t V_full, int64_t* bad_target, cudaStream_t stream);

// dlogits (N, V_local) bf16 of the logit columns [vocab_begin, vocab_begin + V_local) of a vocabulary of V_full ids
// (the whole vocabulary: vocab_begin 0, V_local = V_full = V). OVERWRITES every row with scale * (softmax - onehot)
// over those columns, with the -1 only when the target is one of them; rows whose target is outside [0, V_full)
// (ignored, or bad) are zero (the logits gradient is always a fresh buffer; writing instead of accumulating saves a
// read of N V_local elements). lse: (N) fp32 of the whole vocabulary (the forward's, or combine's). dlogits may
// equal logits (in place: the logits are not needed afterwards).
void cross_entropy_backward(bf16* dlogits, const bf16* logits, const float* lse, const int64_t* targets, float scale,
                            int64_t N, int64_t V_local, int64_t vocab_begin, int64_t V_full, cudaStream_t stream);

// *out = sum of x[0..n) in double, deterministic (a fixed grid and element-to-thread assignment, independent of
// timing and of the device). out: device double. scratch: device memory of sum_scratch_bytes(n) bytes (today a
// constant 8 KiB whatever n is).
size_t sum_scratch_bytes(int64_t n);
void sum_f64(double* out, const float* x, int64_t n, void* scratch, cudaStream_t stream);
// *out = sum of x[i]^2 over the given ranges (offsets into x), in double, deterministic. For the global gradient
// norm. ranges: host vector of [begin, end) pairs (any order, may be empty). scratch: sum_scratch_bytes(total)
// bytes, total = the sum of the ranges' sizes.
void sum_squares_f64(double* out, const float* x, const std::vector<std::pair<int64_t, int64_t>>& ranges, void* scratch,
                     cudaStream_t stream);
// x[0..n) *= scale (gradient clipping).
void scale_inplace(float* x, int64_t n, float scale, cudaStream_t stream);

// One AdamW update of n elements, exactly optim/adamw.h's arithmetic in fp32 (decoupled decay first, then the
// moments, then the bias-corrected step). decay_ranges: device array of n_decay_ranges int64 pairs [begin, end),
// the decayed element ranges relative to `params`, sorted and disjoint (optim/adamw.h's decay_ranges(), flat ranges
// clipped to the updated range and shifted by its begin; uploaded once by the caller). params_bf16: when not nullptr,
// also writes bf16(params) (the GEMM shadow). The hyperparameters are doubles (AdamWHyper's values, as torch's Python
// floats): the per-step scalars (1 - lr wd, 1 - beta1, the bias corrections) are formed from them in double on the host
// and rounded to fp32 exactly as optim/adamw.cpp does; fp32 fields would change them (float(1 - 0.9) != 1 - 0.9f).
struct AdamWStep {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // 1-based
};
void adamw_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, bf16* params_bf16, int64_t n,
                const int64_t* decay_ranges, int64_t n_decay_ranges, const AdamWStep& h, cudaStream_t stream);

}  // namespace nextron::cuda
