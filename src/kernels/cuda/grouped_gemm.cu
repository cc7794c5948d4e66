// The MoE experts' grouped GEMMs through CUTLASS 4's sm90 pointer-array grouped GEMM (TMA loads, wgmma, warp-
// specialized cooperative kernel, persistent tile scheduler over the groups). Compiled for sm_90a only (wgmma and
// TMA descriptor updates are arch-specific); CMakeLists.txt builds this file alone with that target.
//
// CUTLASS's problem, per group: D (M, N) = alpha A (M, K) B (N, K)^T + beta C (M, N), fp32 accumulation. Each
// operand is addressed through a stride over its modes; the mode of stride 1 is its major (contiguous) mode, the
// other carries the run-time leading dimension ld (one int64 per group, grouped_gemm_args.h). The layout tags say
// which: A (M, K) RowMajor = K-major, address A + m ld + k; A ColumnMajor = M-major, A + m + k ld. B is tagged as
// the K x N matrix: ColumnMajor = K-major, B + n ld + k; RowMajor = N-major, B + n + k ld. C/D RowMajor = N-major,
// D + m ld + n.
//
// Our matrices are all row-major: x (R, IN), y (R, OUT) with R = N K rows sorted by expert, expert e's block starting
// at row r0 = offsets[e] with rows_e rows, and W (E, OUT, IN), W_e = w + e OUT IN. Then:
//
//   forward  y_e = x_e W_e^T:  M = rows_e, N = OUT, K = IN.
//            A(m, k) = x[r0 + m][k]  = x + (r0 + m) IN + k        -> K-major, ld IN:  RowMajor
//            B(n, k) = W_e[n][k]     = W_e + n IN + k             -> K-major, ld IN:  ColumnMajor   ("TN")
//            D(m, n) = y[r0 + m][n]  = y + (r0 + m) OUT + n       -> RowMajor, ld OUT, bf16, beta = 0 (no C)
//   dx       dx_e = dy_e W_e:  M = rows_e, N = IN, K = OUT.
//            A(m, k) = dy[r0 + m][k] = dy + (r0 + m) OUT + k      -> K-major, ld OUT: RowMajor
//            B(n, k) = W_e[k][n]     = W_e + k IN + n             -> N-major, ld IN:  RowMajor      ("NN")
//            D(m, n) = dx[r0 + m][n]                              -> RowMajor, ld IN, bf16, beta = 0 (no C):
//            dx is overwritten (no memset first; the rows of all experts cover dx)
//   dw       dw_e += dy_e^T x_e:  M = OUT, N = IN, K = rows_e.
//            A(m, k) = dy[r0 + k][m] = dy + (r0 + k) OUT + m      -> M-major, ld OUT: ColumnMajor
//            B(n, k) = x[r0 + k][n]  = x + (r0 + k) IN + n        -> N-major, ld IN:  RowMajor
//            C = D(m, n) = dw_e[m][n] = dw + e OUT IN + m IN + n  -> RowMajor, ld IN, fp32, beta = 1 (in place)
//
// wgmma reads 16-bit operands from shared memory in either major mode, so the MN-major operands of dx and dw need
// no transposition pass; TMA writes each tile into the swizzled layout the chosen major needs.
//
// Why this is exact at the edges: TMA loads boxes that cross the tensor's extent with zeros and clips stores, so
// rows_e (M, or K of dw) and N need not be tile multiples; a dw group's partial last K tile adds zeros. TMA needs
// 16-byte aligned starts and leading dimensions: with IN and OUT multiples of 8 (bf16) every row start is aligned, so
// every expert block is (checked by grouped_gemm_shapes_supported; CudaOps falls back to cuBLASLt otherwise). An
// expert without rows gets the empty problem (0, 0, k): the group scheduler gives it no tile, so its dw_e is never
// loaded or stored (beta = 1 would otherwise rely on K = 0 reading C and writing it back unchanged).
//
// Nothing is read back to the host: the problem shapes are passed as device memory only (host_problem_shapes =
// nullptr), which the sm90 grouped kernel supports (its TMA descriptors are built on the host with placeholder
// shapes and rewritten on the device per group; the grid is one persistent CTA per SM, from the SM count).
//
// Tiles: 128 x 128 x 64 (K tile = 128 bytes of bf16, the swizzle width), the cooperative schedule (two consumer
// warpgroups split the 128 rows), cluster 1 x 1 x 1 (groups differ in shape, so no TMA multicast across CTAs), as
// many pipeline stages as shared memory holds beside the epilogue's.
#include <cstring>
#include <type_traits>

#include "core/cuda/check.h"
#include "core/error.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/grouped_gemm_args.h"

#if !defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED) || !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "grouped_gemm.cu needs CUDA 12.3 or newer (sm90 grouped GEMM with device-side TMA descriptor updates)"
#endif

namespace nextron::cuda {

namespace {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using Element = cutlass::bfloat16_t;
constexpr int kAlignAB = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements: TMA's 16 bytes

// One grouped GEMM: bf16 A and B with the given layout tags, C/D row-major of ElementD (ElementC void: no source,
// D overwritten).
template <class LayoutA, class LayoutB, class ElementC, class ElementD>
struct Grouped {
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  static constexpr int kAlignC = std::is_void_v<ElementC> ? kAlignD : 128 / cutlass::sizeof_bits<ElementC>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, cutlass::layout::RowMajor*, kAlignC,
      ElementD, cutlass::layout::RowMajor*, kAlignD, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, ElementC, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignAB, Element, LayoutB*, kAlignAB,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Arguments = typename Gemm::Arguments;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
  using PtrC = typename Kernel::CollectiveEpilogue::ElementC;
  using PtrD = typename Kernel::CollectiveEpilogue::ElementD;
};

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
using ForwardGemm = Grouped<RowMajor, ColumnMajor, void, Element>;  // "TN", y overwritten
using DxGemm = Grouped<RowMajor, RowMajor, void, Element>;          // "NN", dx overwritten
using DwGemm = Grouped<ColumnMajor, RowMajor, float, float>;        // MN-major A and B, dw += (C = D)

static_assert(sizeof(typename ProblemShape::UnderlyingProblemShape) == sizeof(GroupedProblem),
              "GroupedProblem must be laid out as cute::Shape<int, int, int>");

// Each stride type must be one int64 (the leading dimension; its other modes static): grouped_gemm_args.h writes
// the strides as int64 arrays.
template <class G>
constexpr bool strides_are_one_int64() {
  return sizeof(typename G::StrideA) == 8 && sizeof(typename G::StrideB) == 8 && sizeof(typename G::StrideC) == 8 &&
         sizeof(typename G::StrideD) == 8;
}
static_assert(strides_are_one_int64<ForwardGemm>() && strides_are_one_int64<DxGemm>() &&
              strides_are_one_int64<DwGemm>());

cutlass::KernelHardwareInfo hardware_info() {
  cutlass::KernelHardwareInfo hw;
  NEXTRON_CUDA_CHECK(cudaGetDevice(&hw.device_id));
  NEXTRON_CUDA_CHECK(cudaDeviceGetAttribute(&hw.sm_count, cudaDevAttrMultiProcessorCount, hw.device_id));
  return hw;
}

// The arguments of one launch over the device arrays (nothing here is dereferenced on the host).
template <class G>
typename G::Arguments arguments(const GroupedGemmArrays& a, int64_t E, float beta,
                                const cutlass::KernelHardwareInfo& hw) {
  typename G::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape =
      ProblemShape{int32_t(E), reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(a.problems),
                   nullptr};  // no host shapes: nothing is read back
  args.mainloop.ptr_A = reinterpret_cast<const Element**>(a.ptr_a);
  args.mainloop.dA = reinterpret_cast<typename G::StrideA*>(a.ld_a);
  args.mainloop.ptr_B = reinterpret_cast<const Element**>(a.ptr_b);
  args.mainloop.dB = reinterpret_cast<typename G::StrideB*>(a.ld_b);
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = beta;
  args.epilogue.ptr_C = beta != 0.0f ? reinterpret_cast<const typename G::PtrC**>(a.ptr_c) : nullptr;
  args.epilogue.dC = reinterpret_cast<typename G::StrideC*>(a.ld_c);
  args.epilogue.ptr_D = reinterpret_cast<typename G::PtrD**>(a.ptr_d);
  args.epilogue.dD = reinterpret_cast<typename G::StrideD*>(a.ld_d);
  args.hw_info = hw;
  return args;
}

// A CUTLASS status as a nextron::Error naming the step.
void check(cutlass::Status st, const char* what) {
  NEXTRON_CHECK(st == cutlass::Status::kSuccess, "grouped GEMM (CUTLASS): ", what,
                " failed: ", cutlassGetStatusString(st));
}

template <class G>
size_t cutlass_workspace_bytes(int64_t E, const cutlass::KernelHardwareInfo& hw) {
  return G::Gemm::get_workspace_size(arguments<G>(GroupedGemmArrays{}, E, 0.0f, hw));
}

int64_t args_region_bytes(int64_t E) { return (grouped_gemm_args_bytes(E) + 255) / 256 * 256; }

// Builds the group arguments from the spec on the device, then runs the grouped GEMM G, all on `stream`.
template <class G>
void run(const GroupedGemmSpec& spec, float beta, const int64_t* offsets, int64_t E, void* workspace,
         int64_t workspace_bytes, cudaStream_t stream) {
  const cutlass::KernelHardwareInfo hw = hardware_info();
  const int64_t region = args_region_bytes(E);
  NEXTRON_CHECK(workspace != nullptr && workspace_bytes >= grouped_gemm_workspace_bytes(E),
                "grouped GEMM: workspace of ", workspace_bytes, " bytes, ", grouped_gemm_workspace_bytes(E),
                " needed (grouped_gemm_workspace_bytes)");
  const GroupedGemmArrays a = grouped_gemm_args_carve(workspace, E);
  grouped_gemm_build_args(a, spec, offsets, E, stream);
  typename G::Arguments args = arguments<G>(a, E, beta, hw);
  typename G::Gemm gemm;
  check(gemm.can_implement(args), "can_implement");
  void* cutlass_ws = static_cast<char*>(workspace) + region;
  NEXTRON_CHECK(size_t(workspace_bytes - region) >= G::Gemm::get_workspace_size(args), "grouped GEMM: workspace");
  check(gemm.initialize(args, cutlass_ws, stream), "initialize");
  check(gemm.run(stream), "run");
  NEXTRON_CUDA_CHECK(cudaGetLastError());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The leading dimension the kernel reads from an int64 written into stride type S: its one int64 mode.
template <class S>
int64_t dynamic_stride(const S& s) {
  if constexpr (std::is_same_v<std::decay_t<decltype(get<0>(s))>, int64_t>)
    return get<0>(s);
  else
    return get<1>(s);
}

template <class S>
bool stride_roundtrip() {
  static_assert(std::is_trivially_copyable_v<S>);
  const int64_t want = 0x123456789a;
  S s{};
  std::memcpy(static_cast<void*>(&s), &want, sizeof(want));
  return dynamic_stride(s) == want;
}

template <class G>
bool strides_roundtrip() {
  return stride_roundtrip<typename G::StrideA>() && stride_roundtrip<typename G::StrideB>() &&
         stride_roundtrip<typename G::StrideC>() && stride_roundtrip<typename G::StrideD>();
}

}  // namespace

bool grouped_gemm_device_supported() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

bool grouped_gemm_shapes_supported(int64_t IN, int64_t OUT, std::initializer_list<const void*> pointers) {
  if (IN <= 0 || OUT <= 0 || IN % kAlignAB != 0 || OUT % kAlignAB != 0) return false;
  if (IN >= (int64_t(1) << 31) || OUT >= (int64_t(1) << 31)) return false;
  for (const void* p : pointers)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

int64_t grouped_gemm_workspace_bytes(int64_t E) {
  const cutlass::KernelHardwareInfo hw = hardware_info();
  size_t ws = cutlass_workspace_bytes<ForwardGemm>(E, hw);
  ws = std::max(ws, cutlass_workspace_bytes<DxGemm>(E, hw));
  ws = std::max(ws, cutlass_workspace_bytes<DwGemm>(E, hw));
  return args_region_bytes(E) + int64_t(ws);
}

void grouped_gemm_forward(bf16* y, const bf16* x, const bf16* w, const int64_t* offsets, int64_t E, int64_t IN,
                          int64_t OUT, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  if (E == 0) return;
  NEXTRON_CHECK(grouped_gemm_shapes_supported(IN, OUT, {y, x, w}), "grouped GEMM: IN ", IN, " / OUT ", OUT,
                " not multiples of 8 or operands not 16-byte aligned");
  run<ForwardGemm>(grouped_forward_spec(y, x, w, IN, OUT), 0.0f, offsets, E, workspace, workspace_bytes, stream);
}

void grouped_gemm_backward(bf16* dx, float* dw, const bf16* dy, const bf16* x, const bf16* w, const int64_t* offsets,
                           int64_t E, int64_t IN, int64_t OUT, void* workspace, int64_t workspace_bytes,
                           cudaStream_t stream) {
  if (E == 0) return;
  NEXTRON_CHECK(grouped_gemm_shapes_supported(IN, OUT, {dx, dw, dy, x, w}), "grouped GEMM: IN ", IN, " / OUT ", OUT,
                " not multiples of 8 or operands not 16-byte aligned");
  // The two launches share the workspace: the second's argument build is ordered after the first GEMM on the stream.
  if (dx) run<DxGemm>(grouped_dx_spec(dx, dy, w, IN, OUT), 0.0f, offsets, E, workspace, workspace_bytes, stream);
  if (dw) run<DwGemm>(grouped_dw_spec(dw, dy, x, IN, OUT), 1.0f, offsets, E, workspace, workspace_bytes, stream);
}

const char* grouped_gemm_layout_mismatch() {
  typename ProblemShape::UnderlyingProblemShape shape{3, 5, 7};
  GroupedProblem p{};
  std::memcpy(&p, static_cast<const void*>(&shape), sizeof(p));
  if (p.m != 3 || p.n != 5 || p.k != 7) return "GroupedProblem is not laid out as cute::Shape<int, int, int> (m, n, k)";
  if (!strides_roundtrip<ForwardGemm>()) return "a stride of the forward (TN) GEMM is not its int64 leading dimension";
  if (!strides_roundtrip<DxGemm>()) return "a stride of the dx (NN) GEMM is not its int64 leading dimension";
  if (!strides_roundtrip<DwGemm>()) return "a stride of the dw GEMM is not its int64 leading dimension";
  return "";
}

}  // namespace nextron::cuda
