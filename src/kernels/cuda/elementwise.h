// Elementwise and small fused kernels on the GPU (CPU references: kernels/cpu/{rope,conv1d,gdn_gates,
// sigmoid_gate,swiglu,embedding}.h; same math, dtypes per kernels/cuda/common.h), and dtype casts.
#pragma once

#include "kernels/cuda/common.h"

namespace nextron::cuda {

// Casts n elements (the bf16 weight shadow of the fp32 master buffer, and test plumbing).
void cast_f32_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t stream);
void cast_bf16_to_f32(float* out, const bf16* in, int64_t n, cudaStream_t stream);

// Partial RoPE, rotate-half. cos, sin: (S, rotary_dim) fp32 tables computed on the host by cpu::rope_tables and
// uploaded once per sequence length. x, y: (B, S, NH, D) bf16 (y may equal x).
void rope_forward(bf16* y, const bf16* x, const float* cos, const float* sin, int64_t B, int64_t S, int64_t NH,
                  int64_t D, int64_t rotary_dim, cudaStream_t stream);
// Accumulates dx += R^T dy (dx must not alias dy).
void rope_backward(bf16* dx, const bf16* dy, const float* cos, const float* sin, int64_t B, int64_t S, int64_t NH,
                   int64_t D, int64_t rotary_dim, cudaStream_t stream);

// Depthwise causal conv1d + SiLU. x: (B, S, C) bf16; w: (C, KC) fp32; y: B S C bf16, the plain (B, S, C) when
// c1 = c2 = C, else split at channels c1 <= c2 into row-major blocks (B S, c1), (B S, c2 - c1), (B S, C - c2) one
// after another (cpu::conv_out_index). Overwrites y.
void conv1d_silu_forward(bf16* y, const bf16* x, const float* w, int64_t B, int64_t S, int64_t C, int64_t KC,
                         int64_t c1, int64_t c2, cudaStream_t stream);
// Accumulates dx (B, S, C) bf16 and dw (C, KC) fp32 (each may be nullptr) from dy (laid out as y); dw reduced
// deterministically.
void conv1d_silu_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const float* w, int64_t B, int64_t S,
                          int64_t C, int64_t KC, int64_t c1, int64_t c2, cudaStream_t stream);

// DeltaNet gates: beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias) (torch softplus, threshold 20).
// b, a: (N, Hv) bf16; A_log, dt_bias: (Hv) fp32; beta, g: (N, Hv) fp32, overwritten.
void gdn_gates_forward(float* beta, float* g, const bf16* b, const bf16* a, const float* A_log, const float* dt_bias,
                       int64_t N, int64_t Hv, cudaStream_t stream);
// Accumulates db, da (N, Hv) bf16, dA_log, ddt_bias (Hv) fp32 (each may be nullptr) from dbeta, dg (N, Hv) fp32
// (nullptr = zero). dA_log / ddt_bias reduced deterministically.
void gdn_gates_backward(bf16* db, bf16* da, float* dA_log, float* ddt_bias, const float* dbeta, const float* dg,
                        const bf16* b, const bf16* a, const float* A_log, const float* dt_bias, int64_t N, int64_t Hv,
                        cudaStream_t stream);

// y = x * sigmoid(gate); x, y: (N, D) bf16 (y may equal x); gate: (N, G) bf16, D % G == 0, gate column j scales
// x columns [j D/G, (j+1) D/G). ld_gate: the row stride of gate in elements (G when dense; the attention gate is
// read in place from the q projection with a larger stride).
void sigmoid_gate_forward(bf16* y, const bf16* x, const bf16* gate, int64_t N, int64_t D, int64_t G, int64_t ld_gate,
                          cudaStream_t stream);
// Accumulates dx (N, D) and dgate (N, G; row stride ld_gate) (each may be nullptr).
void sigmoid_gate_backward(bf16* dx, bf16* dgate, const bf16* dy, const bf16* x, const bf16* gate, int64_t N, int64_t D,
                           int64_t G, int64_t ld_gate, cudaStream_t stream);

// h = silu(gate) * up; gu: (N, 2I) rows [gate | up] bf16; h: (N, I) bf16, overwritten.
void swiglu_forward(bf16* h, const bf16* gu, int64_t N, int64_t I, cudaStream_t stream);
// Accumulates dgu (N, 2I) from dh (N, I).
// accumulate false: dgu is overwritten (not read), as accumulating into zeros would leave it, bit for bit.
void swiglu_backward(bf16* dgu, const bf16* dh, const bf16* gu, int64_t N, int64_t I, cudaStream_t stream,
                     bool accumulate = true);

// The embedding table holds V_local rows, the ids [vocab_begin, vocab_begin + V_local) of a vocabulary of V_full ids
// (kernels/vocab_shard.h: begin 0, V_local = V_full for the whole vocabulary; one TP rank's slice otherwise).
// out (N, H) bf16: out[n] = bf16(table[ids[n] - vocab_begin]) for the ids held, zeros for the other ids (the sum
// over the ranks is the full lookup). table: (V_local, H) fp32 master rows; ids: (N) int64 on the device. An id
// outside [0, V_full) writes zeros and sets *bad_id (device int64, may be nullptr) to a nonzero code unless it is
// already nonzero: id + 1 for an id >= V_full, the id itself for a negative id (so -1 does not read as 0 = all
// fine); the caller zeroes it, checks it once per step instead of synchronising here, and decodes
// id = code > 0 ? code - 1 : code.
void embedding_forward(bf16* out, const float* table, const int64_t* ids, int64_t N, int64_t H, int64_t V_local,
                       int64_t vocab_begin, int64_t V_full, int64_t* bad_id, cudaStream_t stream);
// Accumulates dtable[ids[n] - vocab_begin] += dout[n] for the ids held (fp32, deterministic: rows with the same id
// summed in token order, no atomics). dtable: (V_local, H). sorted_rows / row_offsets: scratch of N and
// V_local + 1 int64 built here on the device. Ids not held (another rank's, or outside the vocabulary: the forward
// reports those) are skipped.
void embedding_backward(float* dtable, const bf16* dout, const int64_t* ids, int64_t N, int64_t H, int64_t V_local,
                        int64_t vocab_begin, int64_t* scratch_sorted_rows, int64_t* scratch_row_offsets,
                        cudaStream_t stream);

}  // namespace nextron::cuda
