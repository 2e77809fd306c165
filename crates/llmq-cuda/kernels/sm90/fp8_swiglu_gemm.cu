// fp8_swiglu_gemm.cu: the device side of the fused FP8 up+gate GEMM with the SwiGLU epilogue
// (algorithm and pitfalls: fp8_swiglu_gemm.cuh). Compiled by build.rs for sm_90a alone into its
// own cubin: CUTLASS's sm90 collectives use wgmma, TMA and setmaxnreg, which no other target has,
// and one target keeps the instantiation to one compile (~40 s, ~3 GB of nvcc memory).
// The kernel takes CUTLASS's `Params` by value (built on the host by fp8_swiglu_host.cu, whose
// TMA descriptors must live in parameter space: __grid_constant__); blockDim, dynamic shared
// memory and the grid come from the host side too.
#include "fp8_swiglu_gemm.cuh"

using llmq_sm90::GemmKernel;

extern "C" __global__ void __launch_bounds__(GemmKernel::MaxThreadsPerBlock, GemmKernel::MinBlocksPerMultiprocessor)
llmq_fp8_swiglu_gemm(const __grid_constant__ GemmKernel::Params params) {
    extern __shared__ char smem[];
    GemmKernel op;
    op(params, smem);
}
