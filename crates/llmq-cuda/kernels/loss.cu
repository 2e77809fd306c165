// loss.cu: fused softmax cross-entropy, in place over logits [R, V] (f32 or bf16).
// One block per row. Pass 1 keeps a per-thread online (max m_t, s_t = sum exp(x - m_t) in f64,
// rescaled when the max grows); the block combines M = max m_t, S = sum s_t exp(m_t - M) (f64).
// loss = (M + ln S) - x[t] in f64 as on the CPU (which sums exp(x - M) sequentially: the results
// agree to ~1e-7 relative). Pass 2 overwrites the row with dloss * (exp(x - M) * (1/S) - onehot)
// (the CPU divides by S in f64: last-bit differences). Two passes; the row stays in L2.
// Rows with target -100 get loss 0 and a zero row. A target outside 0..V cannot be reported as
// an error from the device: the row's loss and gradient become NaN so that it cannot go unseen.
// Pitfall: the target logit must be read before pass 2 overwrites the row (it is read into a
// register by every thread before the barrier inside block_sum).
#include "common.cuh"

extern "C" __global__ void llmq_cross_entropy(void* logits, int dt, float* losses, const int* targets, int R, int V, float dloss) {
    __shared__ float red[32];
    __shared__ double redd[32];
    int r = blockIdx.x;
    if (r >= R) return;
    long long base = (long long)r * V;
    int tgt = targets[r];
    if (tgt == -100) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) store_f(logits, base + j, dt, 0.f);
        if (threadIdx.x == 0) losses[r] = 0.f;
        return;
    }
    if (tgt < 0 || tgt >= V) {
        float nan = __uint_as_float(0x7FC00000u);
        for (int j = threadIdx.x; j < V; j += blockDim.x) store_f(logits, base + j, dt, nan);
        if (threadIdx.x == 0) losses[r] = nan;
        return;
    }
    // pass 1: per-thread online (max, sum of exp relative to that max, in f64)
    float m = -INFINITY;
    double s = 0.0;
#pragma unroll 4
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float x = load_f(logits, base + j, dt);
        if (x > m) {
            s = s * (double)expf(m - x);
            m = x;
        }
        if (m != -INFINITY) s += (double)expf(x - m);
    }
    float xt = load_f(logits, base + tgt, dt);
    float M = block_max(m, red);
    double S = block_sum_d(m == -INFINITY ? 0.0 : s * exp((double)m - (double)M), redd);
    if (threadIdx.x == 0) losses[r] = (float)(((double)M + log(S)) - (double)xt);
    // pass 2: gradient, in place (every thread has read xt before the barriers above)
    float invS = (float)(1.0 / S);
#pragma unroll 4
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float p = expf(load_f(logits, base + j, dt) - M) * invS;
        store_f(logits, base + j, dt, dloss * (p - (j == tgt ? 1.f : 0.f)));
    }
}
