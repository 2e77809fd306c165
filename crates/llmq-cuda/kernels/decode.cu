// decode.cu: attention of new rows against a key/value cache (`Backend::attention_decode`).
//
// Layout: qkv [B*T, (Hq + 2 Hkv) Hd] holds T new rows per sequence at positions pos..pos+T;
// the caches are [B, S, Hkv Hd]. `kv_append` stores the new rows' key and value heads into the
// caches (rounded to the cache dtype); `attn_decode` then runs one block per (new row, query
// head, sequence). Each of its DEC_WARPS warps takes cache positions w, w + DEC_WARPS, ... up to
// the row's own position with the online softmax of online_softmax.cuh (lane l holds dims l,
// l+32, ...); warp 0 merges the warps' (max, sum, output) in shared memory. Decoding is a few rows
// against a long cache, so the cache loop is what is spread over the block. Softmax scale
// 1/sqrt(Hd), f32 arithmetic.
#include "common.cuh"
#include "online_softmax.cuh"

#define DEC_WARPS 4

extern "C" __global__ void llmq_kv_append(void* kc, void* vc, int dt_c, const void* qkv, int dt, int B, int T, int S, int pos, int Hq, int Hkv, int Hd) {
    long long kv = (long long)Hkv * Hd;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * T * kv) return;
    long long row = idx / kv;  // b * T + t
    long long c = idx % kv;
    long long b = row / T, t = row % T;
    long long Qw = (long long)(Hq + 2 * Hkv) * Hd;
    long long dst = (b * S + pos + t) * kv + c;
    store_f(kc, dst, dt_c, load_f(qkv, row * Qw + (long long)Hq * Hd + c, dt));
    store_f(vc, dst, dt_c, load_f(qkv, row * Qw + (long long)(Hq + Hkv) * Hd + c, dt));
}

template <int NPL>
LLMQ_DEV void attn_decode(void* out, int dt_out, const void* qkv, int dt, const void* kc, const void* vc, int dt_c, int T, int S, int pos, int Hq, int Hkv,
                          int Hd) {
    __shared__ float sm_m[DEC_WARPS], sm_l[DEC_WARPS];
    __shared__ float sm_o[DEC_WARPS][32 * NPL];
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    long long Qw = (long long)(Hq + 2 * Hkv) * Hd;
    long long kv = (long long)Hkv * Hd;
    int g = h / (Hq / Hkv);
    long long rowq = ((long long)b * T + i) * Qw + (long long)h * Hd;
    OnlineSoftmax<NPL> st;
    st.start(qkv, rowq, dt, Hd, lane);
    float scale = 1.0f / sqrtf((float)Hd);
    int last = pos + i;
    for (int j = w; j <= last; j += DEC_WARPS) {
        long long rk = ((long long)b * S + j) * kv + (long long)g * Hd;
        st.add(kc, rk, vc, rk, dt_c, Hd, scale, lane);
    }
    // a warp that saw no position keeps m = -inf, l = 0, o = 0: weight exp(-inf) = 0 below
    if (lane == 0) {
        sm_m[w] = st.m;
        sm_l[w] = st.l;
    }
#pragma unroll
    for (int k = 0; k < NPL; k++) sm_o[w][lane + 32 * k] = st.o[k];
    __syncthreads();
    if (w != 0) return;
    float M = -INFINITY;
    for (int v = 0; v < DEC_WARPS; v++) M = fmaxf(M, sm_m[v]);
    float L = 0.f, acc[NPL];
#pragma unroll
    for (int k = 0; k < NPL; k++) acc[k] = 0.f;
    for (int v = 0; v < DEC_WARPS; v++) {
        float c = expf(sm_m[v] - M);
        L += sm_l[v] * c;
#pragma unroll
        for (int k = 0; k < NPL; k++) acc[k] += sm_o[v][lane + 32 * k] * c;
    }
    long long rowo = (((long long)b * T + i) * Hq + h) * Hd;
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        if (d < Hd) store_f(out, rowo + d, dt_out, acc[k] / L);
    }
}

extern "C" __global__ void llmq_attn_decode4(void* out, int dt_out, const void* qkv, int dt, const void* kc, const void* vc, int dt_c, int T, int S, int pos, int Hq,
                                             int Hkv, int Hd) {
    attn_decode<4>(out, dt_out, qkv, dt, kc, vc, dt_c, T, S, pos, Hq, Hkv, Hd);
}
extern "C" __global__ void llmq_attn_decode8(void* out, int dt_out, const void* qkv, int dt, const void* kc, const void* vc, int dt_c, int T, int S, int pos, int Hq,
                                             int Hkv, int Hd) {
    attn_decode<8>(out, dt_out, qkv, dt, kc, vc, dt_c, T, S, pos, Hq, Hkv, Hd);
}
