// Emulator self-test kernels (scratch).
#include <cstdio>
__global__ void k_shfl(int* out) {
  const int lane = threadIdx.x & 31;
  int v = lane * 10;
  out[threadIdx.x * 6 + 0] = __shfl_up_sync(0xffffffffu, v, 3);
  out[threadIdx.x * 6 + 1] = __shfl_down_sync(0xffffffffu, v, 5);
  out[threadIdx.x * 6 + 2] = __shfl_sync(0xffffffffu, v, 7);
  out[threadIdx.x * 6 + 3] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x * 6 + 4] = int(__match_any_sync(0xffffffffu, lane % 3));
  out[threadIdx.x * 6 + 5] = int(__ballot_sync(0xffffffffu, lane & 1));
}
__global__ void k_2d(int* out) {
  __shared__ int s[4][32];
  s[threadIdx.y][threadIdx.x] = threadIdx.y * 100 + threadIdx.x + blockIdx.x * 1000;
  __syncthreads();
  out[blockIdx.x * 128 + threadIdx.y * 32 + threadIdx.x] = s[3 - threadIdx.y][31 - threadIdx.x];
}
__global__ void k_nosync(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = 1.0f;
  out[threadIdx.x] = s[63 - threadIdx.x];  // race: no __syncthreads
}
int main() {
  int a[64 * 6];
  k_shfl<<<1, 64>>>(a);
  int bad = 0;
  for (int t = 0; t < 64; ++t) {
    int l = t & 31, v = l * 10;
    int e[6] = {l >= 3 ? v - 30 : v, l + 5 < 32 ? v + 50 : v, 70, (l ^ 1) * 10, 0, int(0xaaaaaaaau)};
    for (int m = 0; m < 32; ++m) if (m % 3 == l % 3) e[4] |= 1 << m;
    for (int i = 0; i < 6; ++i) if (a[t * 6 + i] != e[i]) { printf("shfl t%d i%d got %d want %d\n", t, i, a[t*6+i], e[i]); bad++; }
  }
  int b[256];
  k_2d<<<2, dim3(32, 4)>>>(b);
  for (int bx = 0; bx < 2; ++bx) for (int y = 0; y < 4; ++y) for (int x = 0; x < 32; ++x)
    if (b[bx*128+y*32+x] != (3-y)*100 + (31-x) + bx*1000) { bad++; }
  float c[64];
  k_nosync<<<1, 64>>>(c);
  int nan = 0;
  for (float f : c) nan += f != f;
  printf("selftest: %d errors; unsynchronised read saw %d NaN of 64 (expect > 0)\n", bad, nan);
}
