// fp8_swiglu_host.cu: the host side of the fused FP8 up+gate GEMM with the SwiGLU epilogue
// (fp8_swiglu_gemm.cuh): turns pointers and shapes into CUTLASS's kernel `Params` (TMA
// descriptors, tile-scheduler state) and reports the launch geometry. build.rs compiles it into
// a static library that llmq-cuda links (with cudart_stubs.cpp); it contains no device code.
// CUTLASS encodes the TMA descriptors with cuTensorMapEncodeTiled. The crate loads the driver at
// run time (no link-time libcuda), so CUTLASS's direct driver call is routed to the function the
// caller passes in (`encode`): the name is redirected before cuda.h declares it.
// Pitfall: everything here runs on the caller's thread; the redirected call reads `g_encode`
// and writes `g_encode_status`, both thread-local.
#define CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL 1
#define cuTensorMapEncodeTiled llmq_cutlass_encode_tiled
#include <cuda.h>

#include "fp8_swiglu_gemm.cuh"

using llmq_sm90::GemmKernel;

using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                              const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static thread_local EncodeFn g_encode = nullptr;
static thread_local CUresult g_encode_status = CUDA_SUCCESS;

extern "C" CUresult llmq_cutlass_encode_tiled(CUtensorMap* map, CUtensorMapDataType dt, cuuint32_t rank, void* addr,
                                              const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                                              const cuuint32_t* estrides, CUtensorMapInterleave il, CUtensorMapSwizzle sw,
                                              CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob) {
    CUresult r = g_encode == nullptr ? CUDA_ERROR_NOT_INITIALIZED : g_encode(map, dt, rank, addr, dims, strides, box, estrides, il, sw, l2, oob);
    if (r != CUDA_SUCCESS) g_encode_status = r;
    return r;
}

// Mirrored by `SwigluLaunch` in src/sm90.rs (repr(C)).
struct LlmqSwigluLaunch {
    uint64_t x, w, h, amax, descale_x, descale_w;  // device addresses; amax may be 0
    int64_t n, d, k;                                // x [n, k], w [2d, k] interleaved, h [n, d]
    int32_t sm_count;
};
// Mirrored by `SwigluGeometry` in src/sm90.rs.
struct LlmqSwigluGeometry {
    uint64_t params_bytes;
    uint32_t smem_bytes;
    uint32_t block[3];
    uint32_t grid[3];
};

// The parameter block goes by value into the kernel; src/sm90.rs reserves PARAMS_CAP for it.
static_assert(sizeof(typename GemmKernel::Params) <= 4096, "CUTLASS Params exceed src/sm90.rs PARAMS_CAP");

// Status codes (src/sm90.rs names them).
enum : int { kOk = 0, kCannotImplement = 1, kWorkspace = 2, kCapacity = 3, kEncode = 4 };

// Writes the kernel's `Params` (at most `cap` bytes) to `params_out` and the launch geometry to
// `geo`. The caller has checked shapes and alignment.
extern "C" int llmq_fp8_swiglu_prepare(const LlmqSwigluLaunch* in, EncodeFn encode, void* params_out, uint64_t cap,
                                       LlmqSwigluGeometry* geo, int32_t* driver_status) {
    using namespace llmq_sm90;
    int M = int(in->n), N = int(2 * in->d), K = int(in->k);
    // K-major operands: (row stride K, unit stride along K, batch stride unused with L = 1)
    typename GemmKernel::StrideA stride_a = make_stride(int64_t(K), Int<1>{}, int64_t(M) * K);
    typename GemmKernel::StrideB stride_b = make_stride(int64_t(K), Int<1>{}, int64_t(N) * K);
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = in->sm_count;

    typename GemmKernel::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {M, N, K, 1};
    args.mainloop.ptr_A = reinterpret_cast<ElementA const*>(in->x);
    args.mainloop.dA = stride_a;
    args.mainloop.ptr_B = reinterpret_cast<ElementB const*>(in->w);
    args.mainloop.dB = stride_b;
    auto& node = args.epilogue.thread.op_1;
    node.h = reinterpret_cast<__nv_bfloat16*>(in->h);
    node.ldh = in->d;
    node.amax = reinterpret_cast<float*>(in->amax);
    node.descale_a = reinterpret_cast<float const*>(in->descale_x);
    node.descale_b = reinterpret_cast<float const*>(in->descale_w);
    args.hw_info = hw;

    if (!GemmKernel::can_implement(args)) return kCannotImplement;
    if (GemmKernel::get_workspace_size(args) != 0) return kWorkspace;
    if (cap < sizeof(typename GemmKernel::Params)) return kCapacity;

    g_encode = encode;
    g_encode_status = CUDA_SUCCESS;
    typename GemmKernel::Params params = GemmKernel::to_underlying_arguments(args, nullptr);
    g_encode = nullptr;
    *driver_status = int32_t(g_encode_status);
    if (g_encode_status != CUDA_SUCCESS) return kEncode;

    std::memcpy(params_out, &params, sizeof(params));
    dim3 grid = GemmKernel::get_grid_shape(params), block = GemmKernel::get_block_shape();
    geo->params_bytes = sizeof(params);
    geo->smem_bytes = uint32_t(GemmKernel::SharedStorageSize);
    geo->block[0] = block.x, geo->block[1] = block.y, geo->block[2] = block.z;
    geo->grid[0] = grid.x, geo->grid[1] = grid.y, geo->grid[2] = grid.z;
    return kOk;
}
