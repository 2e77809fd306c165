// swiglu.cu: out[n, j] = up * silu(gate) with inp[n, :] = [up (D) | gate (D)], and its backward
// dup = dout * silu(g), dgate = dout * up * (sig(g) * (1 + g (1 - sig(g)))). Elementwise; grid
// (ceil(D / blockDim), rows) with a row loop (no 64-bit divisions); sig(g) = 1 / (1 + exp(-g))
// with the accurate expf (no fast math), the same operations as the CPU backend. The optional
// abs-max covers the rounded outputs.
#include "common.cuh"

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
