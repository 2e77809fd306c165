// reduce.cu: abs-max, sum of squares, column sums, and the fixed-order reduction of per-block
// partial rows used by every deterministic weight-gradient reduction.
// absmax: grid-stride per-thread max, one atomicMax per warp on the float bit pattern into a
//   zeroed slot (max is order-independent, so this is deterministic).
// sum of squares: pass 1 with a fixed grid of G blocks, thread i sums elements i, i + G*bd, ...
//   in f64, block tree reduction -> partial[g]; pass 2 (one block) sums partial[0..G) in a fixed
//   tree and writes out[slot] as f32. Same bits on every call.
// colsum: block g sums rows g, g+G, ... per column (thread per column, rows in order, f64) ->
//   partial[g, C]; llmq_colreduce adds the G partial rows in order 0..G-1 in f64 and stores (or
//   accumulates) once. The CPU sums rows strictly in order in f64; both round the f64 sum once,
//   so results agree except in rare rounding ties.
#include "common.cuh"

extern "C" __global__ void llmq_absmax(float* out, const void* inp, int dt, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    unsigned m = 0u;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) m = max(m, abs_bits(load_f(inp, i, dt)));
    warp_absmax_commit(out, m);
}

extern "C" __global__ void llmq_sumsq_partial(double* partial, const void* inp, int dt, long long n) {
    __shared__ double red[32];
    long long stride = (long long)gridDim.x * blockDim.x;
    double s = 0.0;
#pragma unroll 8
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double v = (double)load_f(inp, i, dt);
        s += v * v;
    }
    s = warp_sum_d(s);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) red[w] = s;
    __syncthreads();
    if (w == 0) {
        double t = lane < nw ? red[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) partial[blockIdx.x] = t;
    }
}

// One block of 32 * k threads.
extern "C" __global__ void llmq_sumsq_final(float* out, int slot, const double* partial, int G) {
    __shared__ double red[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) s += partial[i];
    s = warp_sum_d(s);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) red[w] = s;
    __syncthreads();
    if (w == 0) {
        double t = lane < nw ? red[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) out[slot] = (float)t;
    }
}

// grid (ceil(C / blockDim), G)
extern "C" __global__ void llmq_colsum_partial(double* partial, const void* inp, int dt, int R, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int g = blockIdx.y, G = gridDim.y;
    if (c >= C) return;
    double s = 0.0;
    for (int r = g; r < R; r += G) s += (double)load_f(inp, (long long)r * C + c, dt);
    partial[(long long)g * C + c] = s;
}

// out[c] (+)= sum_{g < G} partial[g * ld + c], g in increasing order, in f64; the sum (plus the
// old value when accumulating) is rounded once to f32, then to out's dtype (as the CPU does).
extern "C" __global__ void llmq_colreduce(void* out, int dt_out, const double* partial, int G, int C, int ld, int accumulate) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s = 0.0;
    for (int g = 0; g < G; g++) s += partial[(long long)g * ld + c];
    if (accumulate) s = (double)load_f(out, c, dt_out) + s;
    store_f(out, c, dt_out, (float)s);
}
