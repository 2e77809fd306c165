// rmsnorm.cu: RMSNorm forward (optionally fused with the residual add) and backward.
// Forward: one block per row; the sum of squares is accumulated in f64 (the CPU sums the row
// sequentially in f64: the f32 mean then agrees except in rare rounding ties), rstd =
// 1/sqrt(mean + eps) in f32, out = (x * rstd) * w rounded to out's dtype; the optional abs-max is taken over the rounded
// outputs (one atomicMax per warp on the bit pattern, exact). The fused variant first writes
// res = round(x + delta) and normalises the *rounded* residual so that a later rmsnorm_fwd(res)
// reproduces it bit for bit.
// Backward: G blocks (G fixed by the host from N and C), block g handles rows g, g+G, ...;
//   g = w*dout, xhat = x*rstd, c = mean(g*xhat) (f64 sum), dx = rstd * (g - xhat * c) (+ dres),
// the same f32 operations as the CPU backend.
// The weight gradient sum_n dout*xhat is accumulated per block in f64 shared memory (thread t owns
// columns t, t+blockDim, ...) and written as partial[g, C]; llmq_colreduce (reduce.cu) then sums
// the G partials in a fixed order into dw. No atomics, so results are deterministic.
// Pitfall: dx may alias dres (in place); each element is read before it is written by the same
// thread.
#include "common.cuh"

extern "C" __global__ void llmq_rmsnorm_fwd(void* out, int dt_out, float* rstd_out, const void* x, int dt_x,
                                            const void* w, int dt_w, int N, int C, float eps, float* absmax) {
    __shared__ double red[32];
    int n = blockIdx.x;
    if (n >= N) return;
    long long base = (long long)n * C;
    double ss = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double v = (double)load_f(x, base + c, dt_x);
        ss += v * v;
    }
    ss = block_sum_d(ss, red);
    float rstd = 1.0f / sqrtf((float)(ss / (double)C) + eps);
    if (threadIdx.x == 0) rstd_out[n] = rstd;
    unsigned amax = 0u;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = load_f(x, base + c, dt_x);
        float y = store_f(out, base + c, dt_out, v * rstd * load_f(w, c, dt_w));
        amax = max(amax, abs_bits(y));
    }
    warp_absmax_commit(absmax, amax);
}

// Requires C <= 8 * blockDim (values kept in registers between the two passes).
extern "C" __global__ void llmq_residual_rmsnorm_fwd(void* res_out, int dt_res, void* out, int dt_out, float* rstd_out,
                                                     const void* x, int dt_x, const void* delta, int dt_d,
                                                     const void* w, int dt_w, int N, int C, float eps, float* absmax) {
    __shared__ double red[32];
    int n = blockIdx.x;
    if (n >= N) return;
    long long base = (long long)n * C;
    float r[8];
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int c = threadIdx.x + k * blockDim.x;
        r[k] = 0.f;
        if (c < C) {
            float v = store_f(res_out, base + c, dt_res, load_f(x, base + c, dt_x) + load_f(delta, base + c, dt_d));
            r[k] = v;
            ss += (double)v * (double)v;
        }
    }
    ss = block_sum_d(ss, red);
    float rstd = 1.0f / sqrtf((float)(ss / (double)C) + eps);
    if (threadIdx.x == 0) rstd_out[n] = rstd;
    unsigned amax = 0u;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int c = threadIdx.x + k * blockDim.x;
        if (c < C) {
            float y = store_f(out, base + c, dt_out, r[k] * rstd * load_f(w, c, dt_w));
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// dyn smem: C doubles (weight-gradient accumulator).
extern "C" __global__ void llmq_rmsnorm_bwd(void* dx, int dt_dx, double* partial, const void* dout, int dt_dout,
                                            const void* x, int dt_x, const void* w, int dt_w, const float* rstd,
                                            const void* dres, int dt_dres, int N, int C, float* absmax) {
    double* dwacc = (double*)llmq_dyn_smem;
    __shared__ double red[32];
    for (int c = threadIdx.x; c < C; c += blockDim.x) dwacc[c] = 0.0;
    unsigned amax = 0u;
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        long long base = (long long)n * C;
        float rs = rstd[n];
        double dot = 0.0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float dy = load_f(dout, base + c, dt_dout);
            float xh = load_f(x, base + c, dt_x) * rs;
            dot += (double)((load_f(w, c, dt_w) * dy) * xh);
            dwacc[c] += (double)(dy * xh);
        }
        float cm = (float)(block_sum_d(dot, red) / (double)C);
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float dy = load_f(dout, base + c, dt_dout);
            float xh = load_f(x, base + c, dt_x) * rs;
            float g = rs * (load_f(w, c, dt_w) * dy - xh * cm);
            if (dres != nullptr) g = load_f(dres, base + c, dt_dres) + g;
            float y = store_f(dx, base + c, dt_dx, g);
            amax = max(amax, abs_bits(y));
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) partial[(long long)blockIdx.x * C + c] = dwacc[c];
    warp_absmax_commit(absmax, amax);
}
