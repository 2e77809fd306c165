// loss.cu: fused softmax cross-entropy, in place over logits [R, V] (f32 or bf16).
// One block per row, as the CPU backend computes it: M = max x; e = exp(x - M) in f32;
// S = sum e in f64 (block tree instead of the CPU's sequential order); loss = (M + ln S) - x[t]
// in f64; the row is overwritten with dloss * (f32(e / S) - onehot). Three passes over the row
// (max, sum, write); the row stays in L2 between them.
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
    // pass 1: row max
    float m = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, load_f(logits, base + j, dt));
    float xt = load_f(logits, base + tgt, dt);
    float M = block_max(m, red);
    // pass 2: S = sum exp(x - M) in f64
    double s = 0.0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += (double)expf(load_f(logits, base + j, dt) - M);
    double S = block_sum_d(s, redd);
    if (threadIdx.x == 0) losses[r] = (float)(((double)M + log(S)) - (double)xt);
    // pass 3: gradient, in place (every thread has read xt before the barriers above)
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float e = expf(load_f(logits, base + j, dt) - M);
        float p = (float)((double)e / S);
        store_f(logits, base + j, dt, dloss * (p - (j == tgt ? 1.f : 0.f)));
    }
}
