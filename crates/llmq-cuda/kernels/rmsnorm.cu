// rmsnorm.cu: RMSNorm forward (optionally fused with the residual add) and backward.
// Forward: one block per row; the sum of squares is accumulated in f64 (the CPU sums the row
// sequentially in f64: the f32 mean then agrees except in rare rounding ties), rstd =
// 1/sqrt(mean + eps) in f32, out = (x * rstd) * w rounded to out's dtype; the optional abs-max is taken over the rounded
// outputs (one atomicMax per warp on the bit pattern, exact). The fused variant first writes
// res = round(x + delta) and normalises the *rounded* residual so that a later rmsnorm_fwd(res)
// reproduces it bit for bit.
// Backward: one warp per row for dx;
//   g = w*dout, xhat = x*rstd, c = mean(g*xhat) (f64 sum), dx = rstd * (g - xhat * c) (+ dres),
// the same f32 operations as the CPU backend.
// The weight gradient sum_n dout*xhat is a column reduction: block (cx, g) sums rows g, g+G, ...
// of its columns in f64 into partial[g, C]; llmq_colreduce (reduce.cu) then sums the G partials
// in a fixed order into dw. No atomics, so results are deterministic.
// Pitfall: dx may alias dres (in place); each element is read before it is written by the same
// thread.
#include "common.cuh"

// One warp per row (blockDim/32 rows per block): no block-wide barriers, the second pass over
// the row hits L1.
extern "C" __global__ void llmq_rmsnorm_fwd(void* out, int dt_out, float* rstd_out, const void* x, int dt_x,
                                            const void* w, int dt_w, int N, int C, float eps, float* absmax) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    unsigned amax = 0u;
    if (n < N) {
        long long base = (long long)n * C;
        double ss = 0.0;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            double v = (double)load_f(x, base + c, dt_x);
            ss += v * v;
        }
        ss = warp_sum_d(ss);
        float rstd = 1.0f / sqrtf((float)(ss / (double)C) + eps);
        if (lane == 0) rstd_out[n] = rstd;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float v = load_f(x, base + c, dt_x);
            float y = store_f(out, base + c, dt_out, v * rstd * load_f(w, c, dt_w));
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// One warp per row; the second pass re-reads the rounded residual that the same thread stored
// (an L1/L2 hit), which also keeps an in-place call (res_out == x) correct.
extern "C" __global__ void llmq_residual_rmsnorm_fwd(void* res_out, int dt_res, void* out, int dt_out, float* rstd_out,
                                                     const void* x, int dt_x, const void* delta, int dt_d,
                                                     const void* w, int dt_w, int N, int C, float eps, float* absmax) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    unsigned amax = 0u;
    if (n < N) {
        long long base = (long long)n * C;
        double ss = 0.0;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float v = store_f(res_out, base + c, dt_res, load_f(x, base + c, dt_x) + load_f(delta, base + c, dt_d));
            ss += (double)v * (double)v;
        }
        ss = warp_sum_d(ss);
        float rstd = 1.0f / sqrtf((float)(ss / (double)C) + eps);
        if (lane == 0) rstd_out[n] = rstd;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float v = load_f(res_out, base + c, dt_res);  // this thread's own store (x may alias res_out)
            float y = store_f(out, base + c, dt_out, v * rstd * load_f(w, c, dt_w));
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// dx: one warp per row. The weight gradient is a separate column reduction
// (llmq_rmsnorm_dw_partial + llmq_colreduce).
extern "C" __global__ void llmq_rmsnorm_bwd(void* dx, int dt_dx, const void* dout, int dt_dout,
                                            const void* x, int dt_x, const void* w, int dt_w, const float* rstd,
                                            const void* dres, int dt_dres, int N, int C, float* absmax) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    unsigned amax = 0u;
    if (n < N) {
        long long base = (long long)n * C;
        float rs = rstd[n];
        double dot = 0.0;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float dy = load_f(dout, base + c, dt_dout);
            float xh = load_f(x, base + c, dt_x) * rs;
            dot += (double)((load_f(w, c, dt_w) * dy) * xh);
        }
        float cm = (float)(warp_sum_d(dot) / (double)C);
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float dy = load_f(dout, base + c, dt_dout);
            float xh = load_f(x, base + c, dt_x) * rs;
            float g = rs * (load_f(w, c, dt_w) * dy - xh * cm);
            if (dres != nullptr) g = load_f(dres, base + c, dt_dres) + g;
            float y = store_f(dx, base + c, dt_dx, g);
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// partial[g, c] = sum over rows n = g, g+G, ... of dout[n, c] * (x[n, c] * rstd[n]) in f64.
// grid (ceil(C / blockDim), G): threads run along a row, so loads are coalesced.
extern "C" __global__ void llmq_rmsnorm_dw_partial(double* partial, const void* dout, int dt_dout, const void* x, int dt_x,
                                                   const float* rstd, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int g = blockIdx.y, G = gridDim.y;
    if (c >= C) return;
    double s = 0.0;
#pragma unroll 4
    for (int n = g; n < N; n += G) {
        long long i = (long long)n * C + c;
        s += (double)(load_f(dout, i, dt_dout) * (load_f(x, i, dt_x) * rstd[n]));
    }
    partial[(long long)g * C + c] = s;
}
