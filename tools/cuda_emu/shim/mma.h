// wmma emulation for the block emulator: a/b fragments hold the whole 16x16 tile in every lane; the accumulator
// too, but mma_sync computes (and store_matrix_sync writes) only the 8 elements a lane owns (row lane/2, columns
// 8*(lane%2)..+8), so code that treats fragments as opaque behaves as on hardware while costing 1/32 of the work.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "emu.h"

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256];
};

inline void emu_check(const void* p, unsigned ldm, size_t esize, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * esize) % 16 != 0) {
    std::fprintf(stderr, "wmma %s: misaligned pointer %p or ldm %u\n", what, p, ldm);
    std::abort();
  }
  if (!::emu::in_smem(p, (15 * size_t(ldm) + 16) * esize)) {
    std::fprintf(stderr, "wmma %s: operand %p (ldm %u) not inside the block's shared memory\n", what, p, ldm);
    std::abort();
  }
}

inline float emu_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float emu_f(float v) { return v; }

template <class T, class L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  emu_check(p, ldm, sizeof(T), "load a");
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k)
      f.x[m * 16 + k] = emu_f(std::is_same<L, row_major>::value ? p[m * ldm + k] : p[k * ldm + m]);
}
template <class T, class L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  emu_check(p, ldm, sizeof(T), "load b");
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n)
      f.x[k * 16 + n] = emu_f(std::is_same<L, row_major>::value ? p[k * ldm + n] : p[n * ldm + k]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  emu_check(p, ldm, 4, "load c");
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) f.x[m * 16 + n] = l == mem_row_major ? p[m * ldm + n] : p[n * ldm + m];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& e : f.x) e = v;
}
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  const int lane = ::emu::thread_idx().x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
  float out[256];
  for (int e = 0; e < 256; ++e) out[e] = c.x[e];
  for (int n = c0; n < c0 + 8; ++n) {
    float s = c.x[r * 16 + n];
    for (int k = 0; k < 16; ++k) s += a.x[r * 16 + k] * b.x[k * 16 + n];
    out[r * 16 + n] = s;
  }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  emu_check(p, ldm, 4, "store");
  const int lane = ::emu::thread_idx().x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
  for (int n = c0; n < c0 + 8; ++n) {
    if (l == mem_row_major)
      p[r * ldm + n] = f.x[r * 16 + n];
    else
      p[n * ldm + r] = f.x[r * 16 + n];
  }
}
}  // namespace wmma
}  // namespace nvcuda
