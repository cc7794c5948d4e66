// Private to the memory-bound kernels (cast, swiglu, sigmoid_gate, rope, the norms): 16-byte vector loads and
// stores of 8 bf16 or 4 fp32, and the host-side alignment test that chooses a kernel's vector path. A vector path
// converts each element exactly as the scalar path does (to_f32 / to_bf16 of device_utils.cuh), so results are
// bit-identical; only the number of memory instructions changes.
#pragma once

#include <cstdint>

#include "kernels/cuda/device_utils.cuh"

namespace nextron::cuda::vec {

inline constexpr int kBf16 = 8;  // bf16 per 16-byte access
inline constexpr int kF32 = 4;   // fp32 per 16-byte access

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// v[e] = float(p[e]) for e < 8; p 16-byte aligned.
__device__ __forceinline__ void load8(float (&v)[8], const bf16* p) {
  const uint4 r = *reinterpret_cast<const uint4*>(p);
  const bf16* b = reinterpret_cast<const bf16*>(&r);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = to_f32(b[e]);
}
// v[e] = p[e] for e < 8 fp32 (two 16-byte loads); p 16-byte aligned.
__device__ __forceinline__ void load8(float (&v)[8], const float* p) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
// p[e] = bf16(v[e]) for e < 8; p 16-byte aligned.
__device__ __forceinline__ void store8(bf16* p, const float (&v)[8]) {
  __align__(16) bf16 b[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) b[e] = to_bf16(v[e]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(b);
}
// p[e] = v[e] for e < 8 fp32; p 16-byte aligned.
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
// A vector path's accumulate (the scalar path's add_to(p, delta)) loads the old values with load8, forms
// old + delta in one expression, as add_to's inlined body does, and stores with store8: with delta's last product
// and the addition in one expression the compiler may contract them into one FMA on both paths alike (a delta
// stored to an array first might not be contracted, and the two paths would round differently).

// Row reductions of the norms (a warp per row, lane l summing elements l, l + 32, l + 64, ... in order) keep that
// order on their vector path through a per-warp staging buffer of one 256-element chunk: stage_chunk loads the
// chunk [b, b + 256) of a row with one 16-byte load per lane (lane l: elements b + 8 l .. b + 8 l + 7; D a multiple
// of 8, row 16-byte aligned), and after a __syncwarp each lane reads its scalar-path elements b + l + 32 m
// (m = 0 .. 7) back with staged(s, l + 32 m). `s` holds 32 uint4 (512 bytes) per warp.
inline constexpr int kChunk = 256;
__device__ __forceinline__ void stage_chunk(uint4* s, const bf16* row, int64_t b, int64_t D) {
  const int lane = threadIdx.x & 31;
  if (b + 8 * lane < D) s[lane] = *reinterpret_cast<const uint4*>(row + b + 8 * lane);
}
__device__ __forceinline__ float staged(const uint4* s, int k) { return to_f32(reinterpret_cast<const bf16*>(s)[k]); }

// This lane's share of the sum of squares of row xr (D elements), in the scalar path's order (elements lane,
// lane + 32, ...), through the warp's staging buffer s on the vector path; the caller's warp_sum completes it. The
// forward of every norm starts with it.
template <bool kVector>
__device__ __forceinline__ float lane_sum_squares(uint4* s, const bf16* xr, int64_t D) {
  const int lane = threadIdx.x & 31;
  float ss = 0.0f;
  if constexpr (kVector) {
    for (int64_t b = 0; b < D; b += kChunk) {
      stage_chunk(s, xr, b, D);
      __syncwarp();
      for (int m = 0; m < 8; ++m) {
        if (b + lane + 32 * m >= D) break;
        const float v = staged(s, lane + 32 * m);
        ss += v * v;
      }
      __syncwarp();
    }
  } else {
    for (int64_t d = lane; d < D; d += 32) {
      const float v = to_f32(xr[d]);
      ss += v * v;
    }
  }
  return ss;
}

}  // namespace nextron::cuda::vec
