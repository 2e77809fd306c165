// fp8_swiglu_gemm.cuh: the CUTLASS sm90a FP8 GEMM whose epilogue computes SwiGLU, shared by the
// device translation unit (fp8_swiglu_gemm.cu, the kernel) and the host one (fp8_swiglu_host.cu,
// its launch parameters), so that both see the same `Params` layout.
//
// Algorithm: acc[n, c] = sum_k x[n, k] * w[c, k] (e4m3 x e4m3, f32 accumulation with CUTLASS's
// FP8 promotion every 4 k-blocks, like cuBLASLt without fast accumulation), TMA warp-specialised
// cooperative mainloop (128 x 256 x 128 tiles, two consumer warpgroups, persistent tile
// scheduler). The weight's rows are interleaved by the caller (row 2j = up row j, row 2j + 1 =
// gate row j), so output columns 2j and 2j + 1 are one SwiGLU pair. The wgmma accumulator keeps
// two adjacent columns of a row as consecutive values of one thread, so every pair sits in one
// thread's fragment and the epilogue needs no data exchange.
// Epilogue (SwiGluStore, an epilogue-visitor node over the accumulator): per pair, up and gate are
// scaled by descale_a * descale_b and rounded to bf16 (what the unfused path's bf16 up_gate output
// holds), h = up * (gate * sig) with sig = 1 / (1 + expf(-gate)) (swiglu.cu's arithmetic; see
// sigmoid below), h is rounded to bf16 and stored to h[n, j] directly from registers (no shared memory: the output
// tile is half as wide as the accumulator tile, so the collective's TMA store does not fit; C and
// D are void). The abs-max of the stored values is reduced per warp and committed with one
// atomicMax on the f32 bits (non-negative floats order like their bits; NaN bits sort above inf,
// so a NaN propagates), skipped when the slot already holds at least as much.
// Pitfalls: the tile scheduler and TMA need K % 16 == 0 (16-byte row strides) and 16-byte
// aligned operands; rows past N and columns past 2D are zero-filled by TMA and masked by the
// residue check here. Compile for sm_90a only (wgmma, TMA, setmaxnreg).
#pragma once

#include <cuda_bf16.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace llmq_sm90 {

using namespace cute;

// 1 / (1 + expf(-g)) without the per-value branch to the division's slow path (x >= 2^126), which
// made each value a convergence region in swiglu.cu (see sigmoid8 there); the epilogue does not
// overlap the MMAs of its own warpgroups, so its instructions count. For x = 1 + e^-g in
// [1, 2^126) this is MUFU.RCP plus one Newton step, bit for bit the IEEE reciprocal (common.cuh's
// rcp_rn_fast, checked exhaustively by llmq_encode_selftest); above, x is scaled by 2^-64 first
// (the result is then subnormal and may differ from IEEE in its last bit); x = inf gives 0, NaN
// stays NaN.
CUTLASS_DEVICE float rcp_approx_newton(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return fmaf(r, -fmaf(x, r, -1.0f), r);
}
CUTLASS_DEVICE float sigmoid(float g) {
    float x = 1.0f + expf(-g);
    if (x < 0x1p126f) return rcp_approx_newton(x);
    if (isinf(x)) return 0.0f;
    return rcp_approx_newton(x * 0x1p-64f) * 0x1p-64f;
}

struct SwiGluStore {
    // The element type the collective sizes its (unused) smem copies for, in place of void D.
    using ElementAux = cutlass::bfloat16_t;

    struct SharedStorage {};
    struct Arguments {
        __nv_bfloat16* h = nullptr;  // [N, D] row-major, leading dimension ldh
        int64_t ldh = 0;
        float* amax = nullptr;  // nullable
        float const* descale_a = nullptr;
        float const* descale_b = nullptr;
    };
    using Params = Arguments;

    template <class ProblemShape>
    static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) { return args; }
    template <class ProblemShape>
    static bool can_implement(ProblemShape const&, Arguments const& args) {
        return args.h != nullptr && args.descale_a != nullptr && args.descale_b != nullptr;
    }
    template <class ProblemShape>
    static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
    template <class ProblemShape>
    static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                                cutlass::CudaHostAdapter* = nullptr) {
        return cutlass::Status::kSuccess;
    }

    CUTLASS_HOST_DEVICE SwiGluStore() {}
    CUTLASS_HOST_DEVICE SwiGluStore(Params const& params, SharedStorage const&) : params(params) {}
    Params params;

    CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
    CUTLASS_DEVICE bool is_C_load_needed() const { return false; }
    template <class... Args>
    CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::ProducerLoadArgs<Args...> const&) {
        return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
    }

    template <class CTensor, class Residue>
    struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
        // The collective's coordinate tensor and residue are relative to this thread's first
        // accumulator element (origin = (M, N) - residue); the bounds check uses them as they are.
        CTensor tCcD;      // (CPY, CPY_M, CPY_N, EPI_M, EPI_N)
        Residue residue;
        int64_t row0, col0;  // absolute (row, column) of the thread's first accumulator element
        __nv_bfloat16* h;
        int64_t ldh;
        float scale;
        float* amax;
        unsigned amax_bits = 0u;

        CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor tCcD, Residue residue, int64_t row0, int64_t col0, __nv_bfloat16* h, int64_t ldh,
                                              float scale, float* amax)
            : tCcD(tCcD), residue(residue), row0(row0), col0(col0), h(h), ldh(ldh), scale(scale), amax(amax) {}

        template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
        CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
                                  cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
            static_assert(FragmentSize % 2 == 0, "SwiGLU pairs need an even fragment");
            Tensor c = tCcD(_, _, _, epi_m, epi_n);
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < FragmentSize; i += 2) {
                auto crd = c(epi_v * FragmentSize + i);  // the up value; gate is element i + 1, column + 1
                if (elem_less(crd, residue)) {
                    float up = __bfloat162float(__float2bfloat16_rn(float(frg_input[i]) * scale));
                    float g = __bfloat162float(__float2bfloat16_rn(float(frg_input[i + 1]) * scale));
                    __nv_bfloat16 y = __float2bfloat16_rn(up * (g * sigmoid(g)));
                    h[(row0 + get<0>(crd)) * ldh + (col0 + get<1>(crd)) / 2] = y;
                    amax_bits = max(amax_bits, __float_as_uint(__bfloat162float(y)) & 0x7FFFFFFFu);
                }
            }
            return frg_input;
        }

        // Every consumer thread calls end() once per tile (no early return above), so the
        // warp-wide reduction sees all 32 lanes.
        CUTLASS_DEVICE void end() {
            if (amax == nullptr) return;
            unsigned m = __reduce_max_sync(0xFFFFFFFFu, amax_bits);
            if ((threadIdx.x & 31) == 0 && m != 0u && m > *reinterpret_cast<volatile unsigned*>(amax)) {
                atomicMax(reinterpret_cast<unsigned*>(amax), m);
            }
        }
    };

    template <bool ReferenceSrc, class... Args>
    CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
        auto [M, N, K, L] = args.problem_shape_mnkl;
        int64_t row0 = int64_t(M) - get<0>(args.residue_tCcD);
        int64_t col0 = int64_t(N) - get<1>(args.residue_tCcD);
        float scale = *params.descale_a * *params.descale_b;
        return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(args.residue_tCcD)>(
            args.tCcD, args.residue_tCcD, row0, col0, params.h, params.ldh, scale, params.amax);
    }
};

using ElementA = cutlass::float_e4m3_t;  // activations [N, K], K contiguous
using ElementB = cutlass::float_e4m3_t;  // interleaved up/gate weight [2D, K], K contiguous
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
constexpr int kAlignment = 16;  // elements: 16 bytes, what TMA needs of row strides
using TileShape = Shape<_128, _256, _128>;
using ClusterShape = Shape<_1, _1, _1>;

using FusionCallbacks = cutlass::epilogue::fusion::Sm90EVT<SwiGluStore, cutlass::epilogue::fusion::Sm90AccFetch>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::RowMajor, 8,
    void, cutlass::layout::RowMajor, 8,
    cutlass::epilogue::TmaWarpSpecializedCooperative, FusionCallbacks>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementA, LayoutA, kAlignment, ElementB, LayoutB, kAlignment, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;

}  // namespace llmq_sm90
