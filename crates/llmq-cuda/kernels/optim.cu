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
// The per-step scalars (lr, bc1, bc2, grad_scale, seed) are read from device memory (`sc`, the
// words of llmq_core::AdamStep) so that a captured update (CUDA graph) replays with each step's
// values. Pitfall: bias corrections bc1 = 1 - b1^t, bc2 = 1 - b2^t are computed once on the host
// exactly like the CPU backend does and stored there, so both backends use the same f32 constants.
// Fast kernels adamw_v_<master><m/v><grads> (f32 or bf16 each; params f32 or bf16; every pointer
// 16-byte aligned): no per-element segment search. The launch walks the segments in order; for
// each, the grid strides over the 4-element chunks (aligned to the buffer) that overlap it: a
// chunk wholly inside the segment uses vector loads/stores (16 bytes per f32 tensor, 8 per bf16
// one), the (at most two) chunks at its ends go element by element. Same per-element arithmetic
// as the generic kernel; the segment's abs-max is combined per block (one atomic per block).
#include "common.cuh"
#include "vec.cuh"

// Skips the atomic when the slot already holds a larger value (cuts contention on one address).
LLMQ_DEV void flush_absmax(float* slot, unsigned b) {
    if (b > *(volatile unsigned*)slot) atomicMax((unsigned*)slot, b);
}

// The words of llmq_core::AdamStep: lr, bc1, bc2, grad_scale (f32 bits), seed low, seed high.
struct AdamScalars {
    float lr, bc1, bc2, grad_scale;
    unsigned long long seed;
};
LLMQ_DEV AdamScalars adam_scalars(const unsigned* sc) {
    return AdamScalars{__uint_as_float(sc[0]), __uint_as_float(sc[1]), __uint_as_float(sc[2]), __uint_as_float(sc[3]),
                       (unsigned long long)sc[4] | ((unsigned long long)sc[5] << 32)};
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
                                      const unsigned* sc, float b1, float b2, float eps, float wd, int separate) {
    const AdamScalars s_ = adam_scalars(sc);
    const float lr = s_.lr, bc1 = s_.bc1, bc2 = s_.bc2, grad_scale = s_.grad_scale;
    const unsigned long long seed = s_.seed;
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

// ---------------------------------------------------------------------------------------------
// Fast kernels

template <class T>
LLMQ_DEV void ld4(const void* p, long long i, float (&f)[4]);
template <>
LLMQ_DEV void ld4<F32T>(const void* p, long long i, float (&f)[4]) {
    const float4 v = *(const float4*)((const float*)p + i);
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
}
template <>
LLMQ_DEV void ld4<BF16T>(const void* p, long long i, float (&f)[4]) {
    const uint2 u = *(const uint2*)((const uint16_t*)p + i);
    bf16x2_dec(u.x, f[0], f[1]);
    bf16x2_dec(u.y, f[2], f[3]);
}
// Stores f rounded to T (RNE) and leaves the stored values in f.
template <class T>
LLMQ_DEV void st4(void* p, long long i, float (&f)[4]);
template <>
LLMQ_DEV void st4<F32T>(void* p, long long i, float (&f)[4]) {
    *(float4*)((float*)p + i) = make_float4(f[0], f[1], f[2], f[3]);
}
template <>
LLMQ_DEV void st4<BF16T>(void* p, long long i, float (&f)[4]) {
    uint2 u;
    u.x = bf16x2_enc(f[0], f[1]);
    u.y = bf16x2_enc(f[2], f[3]);
    *(uint2*)((uint16_t*)p + i) = u;
}

// The per-element update of the generic kernel (m, v updated in place, unrounded; returns p').
LLMQ_DEV float adam_math(float graw, float& mm, float& vv, float p, float grad_scale, float b1, float b2, float lr, float eps, float w,
                         float bc1, float bc2) {
    const float g = graw * grad_scale;
    mm = b1 * mm + (1.0f - b1) * g;
    vv = b2 * vv + (1.0f - b2) * (g * g);
    return p - lr * ((mm / bc1) / (sqrtf(vv / bc2) + eps) + w * p);
}

template <class TM, class TS, class TG>
__device__ __forceinline__ void adamw_v(void* params, int dt_p, void* master, const void* grads, void* m, void* v, float* absmax,
                                        const SegTable& seg, float lr, float b1, float b2, float eps, float wd, float bc1, float bc2,
                                        float grad_scale, unsigned long long seed, int separate) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (int s = 0; s < seg.n; s++) {
        const long long off = seg.off[s], end = off + (seg.start[s + 1] - seg.start[s]);
        const float w = seg.decay[s] ? wd : 0.0f;
        unsigned amax = 0u;
        const long long qend = (end + 3) >> 2;
        for (long long q = (off >> 2) + t0; q < qend; q += stride) {
            const long long e0 = q * 4;
            if (e0 >= off && e0 + 4 <= end) {
                float g[4], mm[4], vv[4], p[4], np[4];
                ld4<TG>(grads, e0, g);
                ld4<TS>(m, e0, mm);
                ld4<TS>(v, e0, vv);
                ld4<TM>(master, e0, p);
#pragma unroll
                for (int j = 0; j < 4; j++) np[j] = adam_math(g[j], mm[j], vv[j], p[j], grad_scale, b1, b2, lr, eps, w, bc1, bc2);
                st4<TS>(m, e0, mm);
                st4<TS>(v, e0, vv);
                float stored[4];
                if (TM::DT == DT_BF16) {
                    unsigned short h[4];
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        h[j] = f32_to_bf16_sr(np[j], hash_u32(seed, (unsigned long long)(e0 + j)) >> 16);
                        stored[j] = bf16_bits_to_f32(h[j]);
                    }
                    *(uint2*)((uint16_t*)master + e0) = make_uint2((unsigned)h[0] | ((unsigned)h[1] << 16), (unsigned)h[2] | ((unsigned)h[3] << 16));
                } else {
#pragma unroll
                    for (int j = 0; j < 4; j++) stored[j] = np[j];
                    st4<F32T>(master, e0, stored);
                }
                if (separate) {
#pragma unroll
                    for (int j = 0; j < 4; j++) stored[j] = np[j];
                    if (dt_p == DT_BF16)
                        st4<BF16T>(params, e0, stored);
                    else if (dt_p == DT_F32)
                        st4<F32T>(params, e0, stored);
                    else {
#pragma unroll
                        for (int j = 0; j < 4; j++) stored[j] = store_f(params, e0 + j, dt_p, np[j]);
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; j++) amax = max(amax, abs_bits(stored[j]));
            } else {
                for (int j = 0; j < 4; j++) {
                    const long long e = e0 + j;
                    if (e < off || e >= end) continue;
                    float mm = load_f(m, e, TS::DT), vv = load_f(v, e, TS::DT);
                    const float np = adam_math(load_f(grads, e, TG::DT), mm, vv, load_f(master, e, TM::DT), grad_scale, b1, b2, lr, eps, w,
                                               bc1, bc2);
                    store_f(m, e, TS::DT, mm);
                    store_f(v, e, TS::DT, vv);
                    float stored;
                    if (TM::DT == DT_BF16) {
                        const uint16_t h = f32_to_bf16_sr(np, hash_u32(seed, (unsigned long long)e) >> 16);
                        ((uint16_t*)master)[e] = h;
                        stored = bf16_bits_to_f32(h);
                    } else {
                        stored = store_f(master, e, DT_F32, np);
                    }
                    if (separate) stored = store_f(params, e, dt_p, np);
                    amax = max(amax, abs_bits(stored));
                }
            }
        }
        block_absmax_commit(absmax != nullptr ? absmax + seg.absmax_base + s : nullptr, amax);
    }
}

#define ADAMW_V(MN, TM, SN, TS, GN, TG)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) llmq_adamw_v_##MN##_##SN##_##GN(                                          \
        void* params, int dt_p, void* master, const void* grads, void* m, void* v, float* absmax, SegTable seg,                 \
        const unsigned* sc, float b1, float b2, float eps, float wd, int separate) {                                            \
        const AdamScalars s = adam_scalars(sc);                                                                                  \
        adamw_v<TM, TS, TG>(params, dt_p, master, grads, m, v, absmax, seg, s.lr, b1, b2, eps, wd, s.bc1, s.bc2, s.grad_scale,     \
                            s.seed, separate);                                                                                   \
    }
ADAMW_V(f32, F32T, f32, F32T, f32, F32T)
ADAMW_V(f32, F32T, f32, F32T, bf16, BF16T)
ADAMW_V(f32, F32T, bf16, BF16T, f32, F32T)
ADAMW_V(f32, F32T, bf16, BF16T, bf16, BF16T)
ADAMW_V(bf16, BF16T, f32, F32T, f32, F32T)
ADAMW_V(bf16, BF16T, f32, F32T, bf16, BF16T)
ADAMW_V(bf16, BF16T, bf16, BF16T, f32, F32T)
ADAMW_V(bf16, BF16T, bf16, BF16T, bf16, BF16T)
