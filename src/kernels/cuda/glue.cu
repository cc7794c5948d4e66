// Residual adds and column gathers / scatters (see glue.h). Memory-bound: these move each element once and their
// cost is the bandwidth, so no tiling is needed.
//
// Column gathers / scatters have two paths. The vector path (taken when W is a multiple of V = 16 / sizeof(T),
// i.e. 8 bf16 or 4 fp32, and the dense side, dst of a gather / src of a scatter, is 16-byte aligned) gives each
// thread one group of V consecutive dense columns [V g, V g + V) and a stride of rows (grid (groups, row blocks), no
// index division; 64-bit row offsets, 32-bit column indices). The thread reads its V table entries once; when they
// are a run idx[V g + e] = idx[V g] + e starting at a multiple of V, and the indexed side (src of a gather, dst of a
// scatter) is 16-byte aligned with a row width that is a multiple of V, each row moves as one 16-byte load and one
// 16-byte store (the DeltaNet projections' tables are such runs: whole dk / dv wide heads); otherwise its V indexed
// elements move one by one while the dense side still moves as one 16-byte access. Anything else (W not a multiple
// of V, an unaligned dense pointer, widths over 2^31) takes the general path, one thread per element with a
// grid-stride loop. Both paths copy (or add, with the same fp32 sum and one rounding) each element as the other, so
// the results are bit-identical whichever path runs.
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/glue.h"

namespace nextron::cuda {

namespace {

constexpr int kThreads = kElementwiseThreads;

template <typename T>
__global__ void add_kernel(T* y, const T* a, const T* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float s = to_f32(a[i]) + to_f32(b[i]);
    if constexpr (std::is_same_v<T, float>)
      y[i] = s;
    else
      y[i] = to_bf16(s);
  }
}

template <typename T>
__global__ void gather_cols_kernel(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Ws) {
  const int64_t total = N * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / W, j = i % W;
    dst[i] = src[n * Ws + idx[j]];
  }
}

template <typename T>
__global__ void scatter_cols_kernel(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Wd,
                                    bool accumulate) {
  const int64_t total = N * W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / W, j = i % W;
    T* out = dst + n * Wd + idx[j];
    if (accumulate)
      add_to(out, to_f32(src[i]));
    else
      *out = src[i];
  }
}

// The vector path (see the top). Block (tx, ty): x over column groups, y over rows; rows stride by gridDim.y * ty.
constexpr int kVecBytes = 16;

template <typename T>
__global__ void gather_cols_vec_kernel(T* __restrict__ dst, const T* __restrict__ src, const int32_t* __restrict__ idx,
                                       int64_t N, int W, int Ws, bool src_vec) {
  constexpr int V = kVecBytes / sizeof(T);
  const int j0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (j0 >= W) return;
  int c[V];
  bool run = src_vec;
  for (int e = 0; e < V; ++e) {
    c[e] = idx[j0 + e];
    run = run && c[e] == c[0] + e;
  }
  run = run && c[0] % V == 0;
  for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N; n += int64_t(gridDim.y) * blockDim.y) {
    const T* s = src + n * Ws;
    uint4* d = reinterpret_cast<uint4*>(dst + n * W + j0);
    if (run) {
      *d = *reinterpret_cast<const uint4*>(s + c[0]);
    } else {
      __align__(16) T v[V];
      for (int e = 0; e < V; ++e) v[e] = s[c[e]];
      *d = *reinterpret_cast<const uint4*>(v);
    }
  }
}

template <typename T>
__global__ void scatter_cols_vec_kernel(T* __restrict__ dst, const T* __restrict__ src, const int32_t* __restrict__ idx,
                                        int64_t N, int W, int Wd, bool dst_vec, bool accumulate) {
  constexpr int V = kVecBytes / sizeof(T);
  const int j0 = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (j0 >= W) return;
  int c[V];
  bool run = dst_vec;
  for (int e = 0; e < V; ++e) {
    c[e] = idx[j0 + e];
    run = run && c[e] == c[0] + e;
  }
  run = run && c[0] % V == 0;
  for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N; n += int64_t(gridDim.y) * blockDim.y) {
    __align__(16) T v[V];
    *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(src + n * W + j0);
    T* d = dst + n * Wd;
    if (run) {
      uint4* dv = reinterpret_cast<uint4*>(d + c[0]);
      if (accumulate) {
        __align__(16) T o[V];
        *reinterpret_cast<uint4*>(o) = *dv;
        for (int e = 0; e < V; ++e) add_to(o + e, to_f32(v[e]));
        *dv = *reinterpret_cast<const uint4*>(o);
      } else {
        *dv = *reinterpret_cast<const uint4*>(v);
      }
    } else {
      for (int e = 0; e < V; ++e) {
        if (accumulate)
          add_to(d + c[e], to_f32(v[e]));
        else
          d[c[e]] = v[e];
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) == 0; }

// The vector path's launch shape for N rows of `groups` column groups: about kVecBlocks blocks of 256 threads.
constexpr int64_t kVecBlocks = 4096;
struct VecLaunch {
  dim3 grid, block;
};
VecLaunch vec_launch(int64_t N, int64_t groups) {
  const int64_t tx = std::min<int64_t>(kThreads, ceil_div(groups, 32) * 32), ty = kThreads / tx;
  const int64_t bx = ceil_div(groups, tx);
  const int64_t by = std::clamp<int64_t>(kVecBlocks / bx, 1, std::min<int64_t>(ceil_div(N, ty), 65535));
  return {dim3(unsigned(bx), unsigned(by)), dim3(unsigned(tx), unsigned(ty))};
}

// Whether the vector path can run: W a multiple of V, the widths 32-bit, the dense side 16-byte aligned.
template <typename T>
bool vec_ok(const T* dense, int64_t W, int64_t W_indexed) {
  constexpr int64_t V = kVecBytes / sizeof(T);
  return W % V == 0 && W <= INT32_MAX && W_indexed <= INT32_MAX && aligned16(dense);
}

}  // namespace

void add(bf16* y, const bf16* a, const bf16* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  add_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(y, a, b, n);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

void add(float* y, const float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  add_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(y, a, b, n);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

template <typename T>
void gather_cols(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Ws, cudaStream_t stream) {
  if (N * W <= 0) return;
  constexpr int64_t V = kVecBytes / sizeof(T);
  if (vec_ok(dst, W, Ws)) {
    const VecLaunch l = vec_launch(N, W / V);
    gather_cols_vec_kernel<<<l.grid, l.block, 0, stream>>>(dst, src, idx, N, int(W), int(Ws),
                                                           Ws % V == 0 && aligned16(src));
    NEXTRON_CUDA_LAUNCH_CHECK();
    return;
  }
  gather_cols_kernel<<<grid_stride_blocks(N * W), kThreads, 0, stream>>>(dst, src, idx, N, W, Ws);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

template <typename T>
void scatter_cols(T* dst, const T* src, const int32_t* idx, int64_t N, int64_t W, int64_t Wd, bool accumulate,
                  cudaStream_t stream) {
  if (N * W <= 0) return;
  constexpr int64_t V = kVecBytes / sizeof(T);
  if (vec_ok(src, W, Wd)) {
    const VecLaunch l = vec_launch(N, W / V);
    scatter_cols_vec_kernel<<<l.grid, l.block, 0, stream>>>(dst, src, idx, N, int(W), int(Wd),
                                                            Wd % V == 0 && aligned16(dst), accumulate);
    NEXTRON_CUDA_LAUNCH_CHECK();
    return;
  }
  scatter_cols_kernel<<<grid_stride_blocks(N * W), kThreads, 0, stream>>>(dst, src, idx, N, W, Wd, accumulate);
  NEXTRON_CUDA_LAUNCH_CHECK();
}

template void gather_cols<bf16>(bf16*, const bf16*, const int32_t*, int64_t, int64_t, int64_t, cudaStream_t);
template void gather_cols<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t, cudaStream_t);
template void scatter_cols<bf16>(bf16*, const bf16*, const int32_t*, int64_t, int64_t, int64_t, bool, cudaStream_t);
template void scatter_cols<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t, bool, cudaStream_t);

}  // namespace nextron::cuda
