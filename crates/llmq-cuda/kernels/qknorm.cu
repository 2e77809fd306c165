// qknorm.cu: Qwen3 qk-norm, an RMSNorm over each q head (weight qw[Hd]) and each k head
// (weight kw[Hd]) of the fused qkv tensor [N, (Hq + 2 Hkv) Hd]; v heads are copied.
// One warp per (row, head); lane l owns dims l, l+32, ... . rstd is f32 [N, Hq + Hkv].
// Backward: G blocks, block g handles rows g, g+G, ...; warp w handles heads w, w+nwarps, ...
// Sums of squares and dot products in f64 (like the CPU). Weight gradients accumulate per warp
// in f64 shared memory [nwarps][2][Hd] (no two warps share a
// slot), are summed over warps in fixed order and written as partial[g, 2 Hd] (q then k);
// llmq_colreduce sums the G partials. Deterministic, no atomics. The optional abs-max (absmax
// may be null) covers all of dqkv as stored, v part included: fp8 runs quantise dqkv next.
#include "common.cuh"

extern "C" __global__ void llmq_qknorm_fwd(void* out, int dt_out, float* rstd, const void* qkv, int dt_in,
                                           const void* qw, int dt_qw, const void* kw, int dt_kw,
                                           int N, int Hq, int Hkv, int Hd, float eps) {
    int H = Hq + 2 * Hkv;
    long long gw = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= (long long)N * H) return;
    int n = (int)(gw / H), h = (int)(gw % H);
    long long base = (long long)n * H * Hd + (long long)h * Hd;
    if (h >= Hq + Hkv) {
        for (int d = lane; d < Hd; d += 32) store_f(out, base + d, dt_out, load_f(qkv, base + d, dt_in));
        return;
    }
    const void* w = h < Hq ? qw : kw;
    int dt_w = h < Hq ? dt_qw : dt_kw;
    double ss = 0.0;
    for (int d = lane; d < Hd; d += 32) {
        double v = (double)load_f(qkv, base + d, dt_in);
        ss += v * v;
    }
    ss = warp_sum_d(ss);
    float rs = 1.0f / sqrtf((float)(ss / (double)Hd) + eps);
    if (lane == 0) rstd[(long long)n * (Hq + Hkv) + h] = rs;
    for (int d = lane; d < Hd; d += 32) store_f(out, base + d, dt_out, load_f(qkv, base + d, dt_in) * rs * load_f(w, d, dt_w));
}

// dyn smem: nwarps * 2 * Hd doubles.
extern "C" __global__ void llmq_qknorm_bwd(void* dqkv, int dt_dx, double* partial, const void* dout, int dt_dout,
                                           const void* qkv, int dt_in, const void* qw, int dt_qw, const void* kw, int dt_kw,
                                           const float* rstd, int N, int Hq, int Hkv, int Hd, float* absmax) {
    double* acc = (double*)llmq_dyn_smem;
    unsigned amax = 0u;
    int H = Hq + 2 * Hkv;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    double* my = acc + (long long)w * 2 * Hd;
    for (int d = lane; d < 2 * Hd; d += 32) my[d] = 0.0;
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        for (int h = w; h < H; h += nw) {
            long long base = (long long)n * H * Hd + (long long)h * Hd;
            if (h >= Hq + Hkv) {
                for (int d = lane; d < Hd; d += 32) amax = max(amax, abs_bits(store_f(dqkv, base + d, dt_dx, load_f(dout, base + d, dt_dout))));
                continue;
            }
            bool isq = h < Hq;
            const void* wt = isq ? qw : kw;
            int dt_w = isq ? dt_qw : dt_kw;
            double* slot = my + (isq ? 0 : Hd);
            float rs = rstd[(long long)n * (Hq + Hkv) + h];
            double dot = 0.0;
            for (int d = lane; d < Hd; d += 32) {
                float dy = load_f(dout, base + d, dt_dout);
                float xh = load_f(qkv, base + d, dt_in) * rs;
                dot += (double)((load_f(wt, d, dt_w) * dy) * xh);
                slot[d] += (double)(dy * xh);
            }
            float cm = (float)(warp_sum_d(dot) / (double)Hd);
            for (int d = lane; d < Hd; d += 32) {
                float dy = load_f(dout, base + d, dt_dout);
                float xh = load_f(qkv, base + d, dt_in) * rs;
                amax = max(amax, abs_bits(store_f(dqkv, base + d, dt_dx, rs * (load_f(wt, d, dt_w) * dy - xh * cm))));
            }
        }
    }
    warp_absmax_commit(absmax, amax);
    __syncthreads();
    for (int d = threadIdx.x; d < 2 * Hd; d += blockDim.x) {
        double s = 0.0;
        for (int k = 0; k < nw; k++) s += acc[(long long)k * 2 * Hd + d];
        partial[(long long)blockIdx.x * 2 * Hd + d] = s;
    }
}
