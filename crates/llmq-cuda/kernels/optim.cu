// optim.cu: AdamW over a flat parameter buffer in one launch, driven by a segment table passed by
// value (up to 16 segments per launch; the host splits longer tables).
// Thread i of the launch handles element `i` of the concatenated segments: a linear search of the
// (small) prefix table finds its segment s and the element's index e = off[s] + (i - start[s]) in
// the flat buffer. Per element, in f32:
//   g = grad * grad_scale; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g g;
//   p = master - lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd_s * master)
// m, v are stored in their dtypes (RNE); master as f32 or as bf16 with stochastic rounding from
// hash_u32(seed, e) (identical to the CPU); a separate params buffer gets p rounded to its dtype.
// absmax[s] receives max |param as stored| (zeroed by the host before the launch); each thread
// keeps a running max for its current segment and flushes it with one atomicMax when it moves on.
// Pitfall: bias corrections bc1 = 1 - b1^t, bc2 = 1 - b2^t are computed once on the host exactly
// like the CPU backend does and passed in, so both backends use the same f32 constants.
#include "common.cuh"

// Skips the atomic when the slot already holds a larger value (cuts contention on one address).
LLMQ_DEV void flush_absmax(float* slot, unsigned b) {
    if (b > *(volatile unsigned*)slot) atomicMax((unsigned*)slot, b);
}

#define MAX_SEGS 16
struct SegTable {
    long long off[MAX_SEGS];
    long long start[MAX_SEGS + 1];  // prefix sums of the lengths; start[n] = total
    int decay[MAX_SEGS];
    int n;
    int absmax_base;
};

extern "C" __global__ void llmq_adamw(void* params, int dt_p, void* master, int dt_master, const void* grads, int dt_g,
                                      void* m, int dt_m, void* v, int dt_v, float* absmax, SegTable seg,
                                      float lr, float b1, float b2, float eps, float wd, float bc1, float bc2,
                                      float grad_scale, unsigned long long seed, int separate) {
    long long total = seg.start[seg.n];
    long long stride = (long long)gridDim.x * blockDim.x;
    int cur = -1;  // segment of the running abs-max
    unsigned cur_max = 0u;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        int s = 0;
        while (s + 1 < seg.n && i >= seg.start[s + 1]) s++;
        long long e = seg.off[s] + (i - seg.start[s]);
        float g = load_f(grads, e, dt_g) * grad_scale;
        float mm = load_f(m, e, dt_m), vv = load_f(v, e, dt_v);
        mm = b1 * mm + (1.0f - b1) * g;
        vv = b2 * vv + (1.0f - b2) * (g * g);
        store_f(m, e, dt_m, mm);
        store_f(v, e, dt_v, vv);
        float p = load_f(master, e, dt_master);
        float w = seg.decay[s] ? wd : 0.0f;
        float np = p - lr * ((mm / bc1) / (sqrtf(vv / bc2) + eps) + w * p);
        float stored;
        if (dt_master == DT_BF16) {
            uint16_t h = f32_to_bf16_sr(np, hash_u32(seed, (unsigned long long)e) >> 16);
            ((uint16_t*)master)[e] = h;
            stored = bf16_bits_to_f32(h);
        } else {
            stored = store_f(master, e, dt_master, np);
        }
        if (separate) stored = store_f(params, e, dt_p, np);
        if (s != cur) {
            if (absmax != nullptr && cur >= 0) flush_absmax(absmax + seg.absmax_base + cur, cur_max);
            cur = s;
            cur_max = 0u;
        }
        cur_max = max(cur_max, abs_bits(stored));
    }
    if (absmax != nullptr && cur >= 0) flush_absmax(absmax + seg.absmax_base + cur, cur_max);
}
