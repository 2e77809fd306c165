// swiglu.cu: out[n, j] = up * silu(gate) with inp[n, :] = [up (D) | gate (D)], and its backward
// dup = dout * silu(g), dgate = dout * up * (sig(g) * (1 + g (1 - sig(g)))). Elementwise, with
// sig(g) = 1 / (1 + exp(-g)) using the accurate expf (no fast math): the same operations as the
// CPU backend. The optional abs-max covers the rounded outputs.
// Fast kernels (swiglu_{fwd,bwd}_v_{f32,bf16}; all tensors of one dtype, D % 8 == 0, 16-byte
// aligned): a grid-stride loop over 8-element chunks of the output; the (row, chunk) position is
// advanced incrementally (no 64-bit division per chunk). Up, gate (and dout) chunks are 16-byte
// loads, outputs 16-byte stores. Otherwise the original scalar kernels (grid (ceil(D/256), rows)
// with a row loop) run.
// Outputs never alias inputs (op contract), so the fast kernels use __restrict__.
#include "common.cuh"
#include "vec.cuh"

extern "C" __global__ void llmq_swiglu_fwd(void* out, int dt_out, const void* inp, int dt_in, long long N, int D, float* absmax) {
    unsigned amax = 0u;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < D) {
        for (long long n = blockIdx.y; n < N; n += gridDim.y) {
            float up = load_f(inp, n * 2 * D + j, dt_in), g = load_f(inp, n * 2 * D + D + j, dt_in);
            float sig = 1.0f / (1.0f + expf(-g));
            float y = store_f(out, n * D + j, dt_out, up * (g * sig));
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

extern "C" __global__ void llmq_swiglu_bwd(void* dinp, int dt_dinp, const void* dout, int dt_dout, const void* inp, int dt_in,
                                           long long N, int D, float* absmax) {
    unsigned amax = 0u;
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < D) {
        for (long long n = blockIdx.y; n < N; n += gridDim.y) {
            float up = load_f(inp, n * 2 * D + j, dt_in), g = load_f(inp, n * 2 * D + D + j, dt_in);
            float dy = load_f(dout, n * D + j, dt_dout);
            float sig = 1.0f / (1.0f + expf(-g));
            float silu = g * sig;
            float dsilu = sig * (1.0f + g * (1.0f - sig));
            float a = store_f(dinp, n * 2 * D + j, dt_dinp, dy * silu);
            float b = store_f(dinp, n * 2 * D + D + j, dt_dinp, dy * up * dsilu);
            amax = max(amax, max(abs_bits(a), abs_bits(b)));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// ---------------------------------------------------------------------------------------------
// Fast kernels

// Position (row n, chunk j) of the first chunk of this thread and the per-step advance.
struct ChunkWalk {
    long long n, sq;
    int j, sr, dc;
    LLMQ_DEV ChunkWalk(long long q0, long long stride, int dc_) : dc(dc_) {
        n = q0 / dc;
        j = (int)(q0 - n * dc);
        sq = stride / dc;
        sr = (int)(stride - sq * dc);
    }
    LLMQ_DEV void step() {
        n += sq;
        j += sr;
        if (j >= dc) {
            j -= dc;
            n++;
        }
    }
};

// sig[k] = 1 / (1 + expf(-g[k])) with the IEEE reciprocal, bit for bit. `1.0f / x` compiles to a
// fast path behind a per-value branch to a slow path (x >= 2^126, inf, NaN); eight such branches
// per chunk serialised the kernel (each a convergence region). Here the branch is taken once per
// chunk: x = 1 + e >= 1 always, and below 2^126 rcp_rn_fast (common.cuh) is the whole computation.
LLMQ_DEV void sigmoid8(const float (&g)[8], float (&sig)[8]) {
    float x[8];
    bool fast = true;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        x[k] = 1.0f + expf(-g[k]);
        fast = fast && x[k] < 0x1p126f;
    }
    if (fast) {
#pragma unroll
        for (int k = 0; k < 8; k++) sig[k] = rcp_rn_fast(x[k]);
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) sig[k] = 1.0f / x[k];
    }
}

template <class T>
__device__ __forceinline__ void swiglu_fwd_v(void* __restrict__ out, const void* __restrict__ inp, long long N, int D, float* absmax) {
    const int dc = D >> 3;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned amax = 0u;
    if (dc > 0) {
        ChunkWalk cw(q, stride, dc);
        for (; cw.n < N; cw.step()) {
            const long long ib = cw.n * 2 * D + (long long)cw.j * 8;
            float up[8], g[8], sig[8], y[8];
            ld8<T>(inp, T::DT, ib, 8, up);
            ld8<T>(inp, T::DT, ib + D, 8, g);
            sigmoid8(g, sig);
#pragma unroll
            for (int k = 0; k < 8; k++) y[k] = up[k] * (g[k] * sig[k]);
            amax = max(amax, st8<T>(out, T::DT, cw.n * D + (long long)cw.j * 8, 8, y));
        }
    }
    block_absmax_commit(absmax, amax);
}

template <class T>
__device__ __forceinline__ void swiglu_bwd_v(void* __restrict__ dinp, const void* __restrict__ dout, const void* __restrict__ inp,
                                             long long N, int D, float* absmax) {
    const int dc = D >> 3;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned amax = 0u;
    if (dc > 0) {
        ChunkWalk cw(q, stride, dc);
        for (; cw.n < N; cw.step()) {
            const long long ib = cw.n * 2 * D + (long long)cw.j * 8;
            float up[8], g[8], dy[8], sig[8], a[8], b[8];
            ld8<T>(inp, T::DT, ib, 8, up);
            ld8<T>(inp, T::DT, ib + D, 8, g);
            ld8<T>(dout, T::DT, cw.n * D + (long long)cw.j * 8, 8, dy);
            sigmoid8(g, sig);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float silu = g[k] * sig[k];
                const float dsilu = sig[k] * (1.0f + g[k] * (1.0f - sig[k]));
                a[k] = dy[k] * silu;
                b[k] = dy[k] * up[k] * dsilu;
            }
            amax = max(amax, st8<T>(dinp, T::DT, ib, 8, a));
            amax = max(amax, st8<T>(dinp, T::DT, ib + D, 8, b));
        }
    }
    block_absmax_commit(absmax, amax);
}

extern "C" __global__ void __launch_bounds__(256) llmq_swiglu_fwd_v_f32(void* out, const void* inp, long long N, int D, float* absmax) {
    swiglu_fwd_v<F32T>(out, inp, N, D, absmax);
}
extern "C" __global__ void __launch_bounds__(256) llmq_swiglu_fwd_v_bf16(void* out, const void* inp, long long N, int D, float* absmax) {
    swiglu_fwd_v<BF16T>(out, inp, N, D, absmax);
}
extern "C" __global__ void __launch_bounds__(256) llmq_swiglu_bwd_v_f32(void* dinp, const void* dout, const void* inp, long long N, int D,
                                                                        float* absmax) {
    swiglu_bwd_v<F32T>(dinp, dout, inp, N, D, absmax);
}
extern "C" __global__ void __launch_bounds__(256) llmq_swiglu_bwd_v_bf16(void* dinp, const void* dout, const void* inp, long long N, int D,
                                                                         float* absmax) {
    swiglu_bwd_v<BF16T>(dinp, dout, inp, N, D, absmax);
}
