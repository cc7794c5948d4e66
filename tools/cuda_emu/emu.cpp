// Block emulator runtime + CUDA runtime stubs (host memory stands in for device memory).
#include "emu.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace nextron::cuda {
int device_count() { return 1; }
std::string device_description(int) { return "emulator"; }
}  // namespace nextron::cuda

namespace emu {
uint3 g_blockIdx;
dim3 g_blockDim, g_gridDim;
size_t g_smem_bytes = 0;
static std::map<const void*, int> g_max_dyn_smem;

namespace {
enum State { kRun, kBar, kWarpBar, kDone };
// Minimal x86-64 context switch (callee-saved registers + stack pointer); no signal-mask syscalls.
extern "C" void emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
)");
struct Fiber {
  void* sp = nullptr;
  std::vector<char> stack;
  State state = kRun;
  void* fake_stack = nullptr;
};
std::vector<Fiber> fibers;
void* sched_sp = nullptr;
int cur = -1;
const std::function<void()>* body = nullptr;
unsigned char* smem_buf = nullptr;
const size_t kStack = 256 * 1024;
const void* sched_stack_bottom = nullptr;
size_t sched_stack_size = 0;

void to_sched(State s) {
  Fiber& f = fibers[cur];
  f.state = s;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(s == kDone ? nullptr : &f.fake_stack, sched_stack_bottom, sched_stack_size);
#endif
  emu_switch(&f.sp, sched_sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

[[noreturn]] void entry() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &sched_stack_bottom, &sched_stack_size);
#endif
  (*body)();
  to_sched(kDone);
  std::abort();
}
}  // namespace

struct Copy {
  void* dst;
  const void* src;
  size_t n;
};
struct Pipe {
  std::vector<std::vector<Copy>> committed;
  std::vector<Copy> open;
};
static std::vector<Pipe> pipes;
static bool async_early() {
  static int v = -1;
  if (v < 0) v = std::getenv("EMU_ASYNC") && std::string(std::getenv("EMU_ASYNC")) == "early";
  return v;
}
void async_copy(void* dst, const void* src, size_t n) {
  if (!in_smem(dst, n) || reinterpret_cast<uintptr_t>(dst) % n || reinterpret_cast<uintptr_t>(src) % n) {
    std::fprintf(stderr, "cp.async: bad destination or alignment\n");
    std::abort();
  }
  if (async_early())
    std::memcpy(dst, src, n);
  else
    pipes[cur].open.push_back({dst, src, n});
}
void async_commit() {
  Pipe& p = pipes[cur];
  p.committed.push_back(std::move(p.open));
  p.open.clear();
}
void async_wait(size_t prior) {
  Pipe& p = pipes[cur];
  while (p.committed.size() > prior) {
    for (const Copy& c : p.committed.front()) std::memcpy(c.dst, c.src, c.n);
    p.committed.erase(p.committed.begin());
  }
}

static int g_n = 0;  // threads per block
static std::vector<unsigned> wmask;
static std::vector<std::array<unsigned char, 16>> xch;
static std::map<void*, unsigned> shared_gen;
unsigned g_block_gen = 0;

uint3 thread_idx() {
  const unsigned t = unsigned(cur), bx = g_blockDim.x, by = g_blockDim.y;
  return make_uint3(t % bx, t / bx % by, t / (bx * by));
}
int lane_id() { return cur & 31; }
void syncthreads() { to_sched(kBar); }
void warp_barrier(unsigned mask) {
  wmask[cur] = mask;
  to_sched(kWarpBar);
}
void* xch_slot(int lane) { return xch[(cur & ~31) + lane].data(); }
static std::map<std::string, int> warned;
void warn(const char* what) {
  if (warned[what]++ < 3) std::fprintf(stderr, "emulator WARNING: %s (block %u, thread %d)\n", what, g_blockIdx.x, cur);
}
unsigned char* smem() { return smem_buf; }
bool in_smem(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= smem_buf && c + bytes <= smem_buf + g_smem_bytes;
}
void shared_init(void* p, size_t bytes) {
  auto it = shared_gen.find(p);
  if (it != shared_gen.end() && it->second == g_block_gen) return;
  shared_gen[p] = g_block_gen;
  std::memset(p, 0xff, bytes);
}

static void fail(const char* what) {
  std::fprintf(stderr, "emulator: %s (block %u,%u,%u, threads:", what, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
  for (size_t i = 0; i < fibers.size(); ++i) std::fprintf(stderr, " %d", int(fibers[i].state));
  std::fprintf(stderr, ")\n");
  std::abort();
}

// The opt-in limit of dynamic shared memory per block: sm_90's 227 KB; EMU_SMEM_OPTIN=<bytes> imitates another GPU
// (an A100: 167936), EMU_NOSMEMLIMIT lifts it.
static int smem_optin() {
  if (std::getenv("EMU_NOSMEMLIMIT")) return 1 << 30;
  if (std::getenv("EMU_SMEM_OPTIN")) return std::atoi(std::getenv("EMU_SMEM_OPTIN"));
  return 232448;
}

static void run_block(int n) {
  ++g_block_gen;
  smem_buf = static_cast<unsigned char*>(std::aligned_alloc(128, (g_smem_bytes + 127) / 128 * 128 + 128));
  std::memset(smem_buf, 0xff, g_smem_bytes);  // NaN pattern: reading unwritten smem poisons results
#if EMU_ASAN
  const size_t alloc_bytes = (g_smem_bytes + 127) / 128 * 128 + 128;
  __asan_poison_memory_region(smem_buf + g_smem_bytes, alloc_bytes - g_smem_bytes);  // overruns of dynamic smem trap
#endif
  pipes.assign(n, Pipe{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
#if EMU_ASAN
    __asan_unpoison_memory_region(f.stack.data(), f.stack.size());
#endif
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack.data()) + f.stack.size()) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 64);
    for (int r = 0; r < 6; ++r) sp[r] = nullptr;
    sp[6] = reinterpret_cast<void*>(&entry);
    sp[7] = nullptr;
    f.sp = sp;
    f.state = kRun;
  }
  for (;;) {
    static const int sched =
        std::getenv("EMU_SCHED") ? std::atoi(std::getenv("EMU_SCHED")) : 0;  // 0 fwd, 1 rev, 2 rand
    static unsigned rng = 12345;
    std::vector<int> order(n);
    for (int t = 0; t < n; ++t) order[t] = sched == 1 ? n - 1 - t : t;
    if (sched == 2)
      for (int t = n - 1; t > 0; --t) {
        rng = rng * 1103515245u + 12345u;
        std::swap(order[t], order[(rng >> 8) % unsigned(t + 1)]);
      }
    for (int t : order) {
      if (fibers[t].state != kRun) continue;
      cur = t;
#if EMU_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, fibers[t].stack.data(), fibers[t].stack.size());
#endif
      emu_switch(&sched_sp, fibers[t].sp);
#if EMU_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    }
    int done = 0, bar = 0;
    for (int t = 0; t < n; ++t) {
      done += fibers[t].state == kDone;
      bar += fibers[t].state == kBar;
    }
    if (done == n) break;
    bool released = false;
    for (int w = 0; w * 32 < n; ++w) {
      const int lanes = std::min(32, n - w * 32);
      const unsigned exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      for (int l = 0; l < lanes; ++l) {
        Fiber& f = fibers[w * 32 + l];
        if (f.state != kWarpBar) continue;
        const unsigned m = wmask[w * 32 + l];
        if (m & ~exist) fail("warp-sync mask names lanes that do not exist");
        bool ok = true, exited = false;
        for (int i = 0; i < lanes; ++i) {
          if (!(m >> i & 1u)) continue;
          const Fiber& g = fibers[w * 32 + i];
          if (g.state == kDone)
            exited = true;
          else if (g.state != kWarpBar || wmask[w * 32 + i] != m)
            ok = false;
        }
        if (!ok) continue;
        if (exited) warn("warp-sync mask names exited lanes");
        for (int i = 0; i < lanes; ++i)
          if ((m >> i & 1u) && fibers[w * 32 + i].state == kWarpBar) fibers[w * 32 + i].state = kRun;
        released = true;
      }
    }
    if (released) continue;
    if (bar == n) {
      for (int t = 0; t < n; ++t) fibers[t].state = kRun;
      continue;
    }
    if (bar > 0 && bar + done == n) fail("__syncthreads reached by only part of the block (others exited)");
    fail("deadlock: warp barrier not reached by all lanes of its mask, or mixed barriers");
  }
  for (auto& p : pipes) {
    bool pending = !p.open.empty();
    for (auto& g : p.committed) pending = pending || !g.empty();
    if (pending) fail("cp.async copies still pending at kernel end");
  }
#if EMU_ASAN
  __asan_unpoison_memory_region(smem_buf, alloc_bytes);
#endif
  std::free(smem_buf);
  smem_buf = nullptr;
}

void run_grid(const void* fn, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& b) {
  const long long nt = (long long)block.x * block.y * block.z;
  if (nt <= 0 || nt > 1024 || block.z > 64) fail("unsupported block shape");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    fail("bad grid (zero-sized or too large)");
  if (fn && smem_bytes > 48 * 1024 && int(smem_bytes) > g_max_dyn_smem[fn] && !std::getenv("EMU_NOSMEMLIMIT"))
    fail("dynamic smem above the attribute set");
  if (smem_bytes > size_t(smem_optin())) fail("dynamic smem above the device's opt-in limit (EMU_SMEM_OPTIN)");
  const int n = int(nt);
  g_n = n;
  if (std::getenv("EMU_TRACE"))
    std::fprintf(stderr, "launch grid %u,%u,%u block %u,%u,%u smem %zu\n", grid.x, grid.y, grid.z, block.x, block.y,
                 block.z, smem_bytes);
  g_blockDim = block;
  g_gridDim = grid;
  g_smem_bytes = smem_bytes;
  body = &b;
  fibers.resize(n);
  wmask.assign(n, 0);
  xch.assign(n, {});
  for (auto& f : fibers)
    if (f.stack.size() != kStack) f.stack.resize(kStack);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx0 = 0; bx0 < grid.x; ++bx0) {
        static const bool rev_blocks = std::getenv("EMU_SCHED") && std::atoi(std::getenv("EMU_SCHED")) > 0;
        const unsigned bx = rev_blocks ? grid.x - 1 - bx0 : bx0;
        g_blockIdx = make_uint3(bx, by, bz);
        run_block(n);
      }
  cur = -1;
}
}  // namespace emu

// ---- CUDA runtime stubs ----
extern "C" {
cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n ? n : 1);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* d, int v, size_t n) {
  std::memset(d, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) {
  std::memset(d, v, n);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin)
    *v = emu::smem_optin();
  else if (a == cudaDevAttrMultiProcessorCount)
    *v = 132;
  else
    *v = 0;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* fn, cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) emu::g_max_dyn_smem[fn] = v;
  return cudaSuccess;
}
}
