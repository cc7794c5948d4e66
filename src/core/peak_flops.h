// The peak FLOP/s used as the MFU denominator on CPU: a measured fp32 GEMM rate, not a datasheet figure.
#pragma once

namespace nextron {

// Measures this machine's fp32 GEMM rate in FLOP/s with `threads` threads (<= 0: OpenBLAS's current thread
// count, by default every core): repeated 1024 x 1024 x 1024 sgemm calls through nextron::cpu::gemm (OpenBLAS) for
// about 0.3 s after one warm-up call, reporting the fastest call. MFU on CPU is therefore relative to what the BLAS
// achieves on a large square GEMM here (the best any of our matmuls can do), not to the processor's theoretical peak;
// the trainer's --peak-tflops flag overrides the measurement (use it for a datasheet peak or a fixed denominator). The
// OpenMP and OpenBLAS thread counts are restored before returning.
double measure_cpu_peak_flops(int threads);

}  // namespace nextron
