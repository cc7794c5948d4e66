// CUDA block emulator: runs the CUDA kernels and their tests (tests/cuda) on the CPU, for sessions without a GPU.
// A development aid (tools/cuda_emu/README.md), not a substitute for the GPU run: see its limits there.
// Blocks run one after another; the threads of a block are cooperative fibers switched at __syncthreads,
// __syncwarp and warp-level intrinsics (shuffles, match, ballot).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>

namespace emu {
extern uint3 g_blockIdx;
extern dim3 g_blockDim, g_gridDim;
extern size_t g_smem_bytes;
extern unsigned g_block_gen;
uint3 thread_idx();
int lane_id();
void syncthreads();
void warp_barrier(unsigned mask);
void* xch_slot(int lane);  // 16-byte exchange slot of `lane` in the current warp
void warn(const char* what);
unsigned char* smem();
bool in_smem(const void* p, size_t bytes);
void shared_init(void* p, size_t bytes);  // fill a static __shared__ array with 0xff once per block
void run_grid(const void* fn, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

struct Cfg {
  dim3 grid, block;
  size_t smem = 0;
  cudaStream_t stream = 0;
};
template <class L>
void launch_l(Cfg c, const L& body) {
  run_grid(nullptr, c.grid, c.block, c.smem, std::function<void()>(body));
}

// mode: 0 idx, 1 up, 2 down, 3 xor
template <class T>
T shfl(unsigned mask, T v, int mode, int arg, int width) {
  static_assert(sizeof(T) <= 16, "shfl type too big");
  const int lane = lane_id();
  if (!(mask >> lane & 1u)) warn("shfl by a lane not in its own mask");
  std::memcpy(xch_slot(lane), &v, sizeof(T));
  warp_barrier(mask);
  const int base = lane / width * width;
  int src = lane;
  if (mode == 0)
    src = base + (arg % width);
  else if (mode == 1)
    src = (lane - base) >= arg ? lane - arg : lane;
  else if (mode == 2)
    src = (lane - base) + arg < width ? lane + arg : lane;
  else {
    src = lane ^ arg;
    if (src / width > lane / width || src > 31) src = lane;
  }
  T r;
  if (!(mask >> src & 1u)) {
    warn("shfl reads a lane not in the mask (undefined value)");
    std::memset(&r, 0xff, sizeof(T));
  } else {
    std::memcpy(&r, xch_slot(src), sizeof(T));
  }
  warp_barrier(mask);
  return r;
}
template <class T>
unsigned match_any(unsigned mask, T v) {
  const int lane = lane_id();
  uint64_t key = 0;
  std::memcpy(&key, &v, sizeof(T));
  std::memcpy(xch_slot(lane), &key, 8);
  warp_barrier(mask);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) {
      uint64_t o;
      std::memcpy(&o, xch_slot(l), 8);
      if (o == key) r |= 1u << l;
    }
  warp_barrier(mask);
  return r;
}
inline unsigned ballot(unsigned mask, int pred) {
  const int lane = lane_id();
  const uint64_t key = pred != 0;
  std::memcpy(xch_slot(lane), &key, 8);
  warp_barrier(mask);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) {
      uint64_t o;
      std::memcpy(&o, xch_slot(l), 8);
      if (o) r |= 1u << l;
    }
  warp_barrier(mask);
  return r;
}
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)
#define __syncthreads() ::emu::syncthreads()
inline void emu_syncwarp(unsigned m = 0xffffffffu) { ::emu::warp_barrier(m); }
#define __syncwarp(...) emu_syncwarp(__VA_ARGS__)
#define __shfl_sync(m, v, s, ...) ::emu::shfl(m, v, 0, s, __VA_ARGS__ + 0 ?: 32)
#define __shfl_up_sync(m, v, s, ...) ::emu::shfl(m, v, 1, s, __VA_ARGS__ + 0 ?: 32)
#define __shfl_down_sync(m, v, s, ...) ::emu::shfl(m, v, 2, s, __VA_ARGS__ + 0 ?: 32)
#define __shfl_xor_sync(m, v, s, ...) ::emu::shfl(m, v, 3, s, __VA_ARGS__ + 0 ?: 32)
#define __match_any_sync(m, v) ::emu::match_any(m, v)
#define __ballot_sync(m, p) ::emu::ballot(m, p)
#define __any_sync(m, p) (::emu::ballot(m, p) != 0u)
#define __all_sync(m, p) (::emu::ballot(m, p) == (m))
#undef __launch_bounds__
#define __launch_bounds__(...)

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { float r = a * b; asm("" : "+x"(r)); return r; }  // never fused
inline float __fadd_rn(float a, float b) { float r = a + b; asm("" : "+x"(r)); return r; }
inline float __fsub_rn(float a, float b) { float r = a - b; asm("" : "+x"(r)); return r; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { double r = a + b; asm("" : "+x"(r)); return r; }
inline double __dmul_rn(double a, double b) { double r = a * b; asm("" : "+x"(r)); return r; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float x) {
  int r;
  std::memcpy(&r, &x, 4);
  return r;
}
inline float __int_as_float(int x) {
  float r;
  std::memcpy(&r, &x, 4);
  return r;
}
inline unsigned __float_as_uint(float x) {
  unsigned r;
  std::memcpy(&r, &x, 4);
  return r;
}
inline float __uint_as_float(unsigned x) {
  float r;
  std::memcpy(&r, &x, 4);
  return r;
}

// Atomics: fibers only switch at barriers, so a plain read-modify-write is atomic here.
template <class T, class U>
inline T atomicAdd(T* p, U v) {
  const T o = *p;
  *p = T(o + v);
  return o;
}
template <class T, class U>
inline T atomicSub(T* p, U v) {
  const T o = *p;
  *p = T(o - v);
  return o;
}
template <class T, class U>
inline T atomicMax(T* p, U v) {
  const T o = *p;
  *p = o > T(v) ? o : T(v);
  return o;
}
template <class T, class U>
inline T atomicMin(T* p, U v) {
  const T o = *p;
  *p = o < T(v) ? o : T(v);
  return o;
}
template <class T, class U>
inline T atomicExch(T* p, U v) {
  const T o = *p;
  *p = T(v);
  return o;
}
template <class T, class U, class V>
inline T atomicCAS(T* p, U cmp, V v) {
  const T o = *p;
  if (o == T(cmp)) *p = T(v);
  return o;
}
template <class T, class U>
inline T atomicOr(T* p, U v) {
  const T o = *p;
  *p = T(o | v);
  return o;
}
template <class T, class U>
inline T atomicAnd(T* p, U v) {
  const T o = *p;
  *p = T(o & v);
  return o;
}

// Device min/max overloads (CUDA provides these for mixed integer and floating types).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(a) : C(b);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) > C(b) ? C(a) : C(b);
}
