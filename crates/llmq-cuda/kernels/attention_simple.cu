// attention_simple.cu: the "simple" attention kernels (attention.cuh has the layout and the
// overview): any float dtype, Hd <= 256; one warp per query row (forward, dQ) or per key row
// (dK/dV); lane l holds dims l, l+32, ...; dot products by warp shuffles.
#include "attention.cuh"

// ------------------------------------------------------------------------------------------
// simple implementation
// ------------------------------------------------------------------------------------------

template <int NPL>
LLMQ_DEV void attn_fwd_simple(void* out, int dt_out, float* lse, const void* qkv, int dt, int B, int T, int Hq, int Hkv, int Hd) {
    int nw = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int i = blockIdx.x * nw + w, h = blockIdx.y, b = blockIdx.z;
    if (i >= T) return;
    long long Qw = (long long)(Hq + 2 * Hkv) * Hd;
    int g = h / (Hq / Hkv);
    long long rowq = ((long long)b * T + i) * Qw;
    float q[NPL], o[NPL];
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        q[k] = d < Hd ? load_f(qkv, rowq + (long long)h * Hd + d, dt) : 0.f;
        o[k] = 0.f;
    }
    float scale = 1.0f / sqrtf((float)Hd);
    float m = -INFINITY, l = 0.f;
    for (int j = 0; j <= i; j++) {
        long long rowk = ((long long)b * T + j) * Qw;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < NPL; k++) {
            int d = lane + 32 * k;
            if (d < Hd) s += q[k] * load_f(qkv, rowk + (long long)(Hq + g) * Hd + d, dt);
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int k = 0; k < NPL; k++) {
            int d = lane + 32 * k;
            if (d < Hd) o[k] = o[k] * corr + p * load_f(qkv, rowk + (long long)(Hq + Hkv + g) * Hd + d, dt);
        }
        m = mn;
    }
    long long rowo = (((long long)b * T + i) * Hq + h) * Hd;
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        if (d < Hd) store_f(out, rowo + d, dt_out, o[k] / l);
    }
    if (lane == 0) lse[((long long)b * Hq + h) * T + i] = m + logf(l);
}

extern "C" __global__ void llmq_attn_fwd_simple4(void* out, int dt_out, float* lse, const void* qkv, int dt, int B, int T, int Hq, int Hkv, int Hd) {
    attn_fwd_simple<4>(out, dt_out, lse, qkv, dt, B, T, Hq, Hkv, Hd);
}
extern "C" __global__ void llmq_attn_fwd_simple8(void* out, int dt_out, float* lse, const void* qkv, int dt, int B, int T, int Hq, int Hkv, int Hd) {
    attn_fwd_simple<8>(out, dt_out, lse, qkv, dt, B, T, Hq, Hkv, Hd);
}

// Dv[b, h, t] = sum_d dout[n, h, d] * out[n, h, d]; one warp per (n, h).
extern "C" __global__ void llmq_attn_bwd_d(float* Dv, const void* dout, int dt_do, const void* out, int dt_o, int B, int T, int Hq, int Hd) {
    long long gw = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= (long long)B * T * Hq) return;
    int h = (int)(gw % Hq);
    long long n = gw / Hq;
    long long base = gw * Hd;
    float s = 0.f;
    for (int d = lane; d < Hd; d += 32) s += load_f(dout, base + d, dt_do) * load_f(out, base + d, dt_o);
    s = warp_sum(s);
    int b = (int)(n / T), t = (int)(n % T);
    if (lane == 0) Dv[((long long)b * Hq + h) * T + t] = s;
}

template <int NPL>
LLMQ_DEV void attn_bwd_dq_simple(void* dqkv, int dt_dx, const void* dout, int dt_do, const void* qkv, int dt, const float* lse,
                                 const float* Dv, int B, int T, int Hq, int Hkv, int Hd) {
    int nw = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int i = blockIdx.x * nw + w, h = blockIdx.y, b = blockIdx.z;
    if (i >= T) return;
    long long Qw = (long long)(Hq + 2 * Hkv) * Hd;
    int g = h / (Hq / Hkv);
    long long rowq = ((long long)b * T + i) * Qw;
    long long rowo = (((long long)b * T + i) * Hq + h) * Hd;
    float q[NPL], dO[NPL], dq[NPL];
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        q[k] = d < Hd ? load_f(qkv, rowq + (long long)h * Hd + d, dt) : 0.f;
        dO[k] = d < Hd ? load_f(dout, rowo + d, dt_do) : 0.f;
        dq[k] = 0.f;
    }
    float scale = 1.0f / sqrtf((float)Hd);
    long long li = ((long long)b * Hq + h) * T + i;
    float L = lse[li], Di = Dv[li];
    for (int j = 0; j <= i; j++) {
        long long rowk = ((long long)b * T + j) * Qw;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int k = 0; k < NPL; k++) {
            int d = lane + 32 * k;
            if (d < Hd) {
                s += q[k] * load_f(qkv, rowk + (long long)(Hq + g) * Hd + d, dt);
                dp += dO[k] * load_f(qkv, rowk + (long long)(Hq + Hkv + g) * Hd + d, dt);
            }
        }
        s = warp_sum(s) * scale;
        dp = warp_sum(dp);
        float p = expf(s - L);
        float ds = p * (dp - Di);
#pragma unroll
        for (int k = 0; k < NPL; k++) {
            int d = lane + 32 * k;
            if (d < Hd) dq[k] += ds * load_f(qkv, rowk + (long long)(Hq + g) * Hd + d, dt);
        }
    }
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        if (d < Hd) store_f(dqkv, rowq + (long long)h * Hd + d, dt_dx, dq[k] * scale);
    }
}

template <int NPL>
LLMQ_DEV void attn_bwd_dkv_simple(void* dqkv, int dt_dx, const void* dout, int dt_do, const void* qkv, int dt, const float* lse,
                                  const float* Dv, int B, int T, int Hq, int Hkv, int Hd) {
    int nw = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int j = blockIdx.x * nw + w, g = blockIdx.y, b = blockIdx.z;
    if (j >= T) return;
    long long Qw = (long long)(Hq + 2 * Hkv) * Hd;
    int G = Hq / Hkv;
    long long rowk = ((long long)b * T + j) * Qw;
    float kk[NPL], vv[NPL], dk[NPL], dv[NPL];
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        kk[k] = d < Hd ? load_f(qkv, rowk + (long long)(Hq + g) * Hd + d, dt) : 0.f;
        vv[k] = d < Hd ? load_f(qkv, rowk + (long long)(Hq + Hkv + g) * Hd + d, dt) : 0.f;
        dk[k] = 0.f;
        dv[k] = 0.f;
    }
    float scale = 1.0f / sqrtf((float)Hd);
    for (int h = g * G; h < (g + 1) * G; h++) {
        for (int i = j; i < T; i++) {
            long long rowq = ((long long)b * T + i) * Qw + (long long)h * Hd;
            long long rowo = (((long long)b * T + i) * Hq + h) * Hd;
            long long li = ((long long)b * Hq + h) * T + i;
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int k = 0; k < NPL; k++) {
                int d = lane + 32 * k;
                if (d < Hd) {
                    s += load_f(qkv, rowq + d, dt) * kk[k];
                    dp += load_f(dout, rowo + d, dt_do) * vv[k];
                }
            }
            s = warp_sum(s) * scale;
            dp = warp_sum(dp);
            float p = expf(s - lse[li]);
            float ds = p * (dp - Dv[li]);
#pragma unroll
            for (int k = 0; k < NPL; k++) {
                int d = lane + 32 * k;
                if (d < Hd) {
                    dv[k] += p * load_f(dout, rowo + d, dt_do);
                    dk[k] += ds * load_f(qkv, rowq + d, dt);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        if (d < Hd) {
            store_f(dqkv, rowk + (long long)(Hq + g) * Hd + d, dt_dx, dk[k] * scale);
            store_f(dqkv, rowk + (long long)(Hq + Hkv + g) * Hd + d, dt_dx, dv[k]);
        }
    }
}

#define SIMPLE_BWD_ENTRY(NPL)                                                                                                \
    extern "C" __global__ void llmq_attn_bwd_dq_simple##NPL(void* dqkv, int dt_dx, const void* dout, int dt_do, const void* qkv, \
                                                            int dt, const float* lse, const float* Dv, int B, int T, int Hq, int Hkv, \
                                                            int Hd) {                                                        \
        attn_bwd_dq_simple<NPL>(dqkv, dt_dx, dout, dt_do, qkv, dt, lse, Dv, B, T, Hq, Hkv, Hd);                              \
    }                                                                                                                        \
    extern "C" __global__ void llmq_attn_bwd_dkv_simple##NPL(void* dqkv, int dt_dx, const void* dout, int dt_do, const void* qkv, \
                                                             int dt, const float* lse, const float* Dv, int B, int T, int Hq, int Hkv, \
                                                             int Hd) {                                                       \
        attn_bwd_dkv_simple<NPL>(dqkv, dt_dx, dout, dt_do, qkv, dt, lse, Dv, B, T, Hq, Hkv, Hd);                             \
    }
SIMPLE_BWD_ENTRY(4)
SIMPLE_BWD_ENTRY(8)
