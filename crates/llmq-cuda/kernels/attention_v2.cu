// attention_v2.cu: tensor-core attention, version 2 (bf16, Hd 64 or 128; attention.cuh has the
// layout and what the versions share). Blocks of 4 warps, 64 query rows (16 per warp) x 64-key
// tiles in padded shared memory (row pitch Hd+8 elements, so that 8 rows of 16 bytes hit distinct
// banks). Kept as a cross-check of version 3 (`LLMQ_CUDA_ATTN=v2`).
#include "attention.cuh"

#define ATT_BQ 64
#define ATT_BK 64
#define ATT_THREADS 128

// A fragments of 16 rows (r0 .. r0+15, rows >= T zero) x HD columns straight from global memory.
template <int HD>
LLMQ_DEV void load_afrag_global(unsigned (&af)[HD / 16][4], const uint16_t* base, long long row_stride, int r0, int T, int lane) {
    int g = lane >> 2, t = lane & 3;
    int ra = r0 + g, rb = r0 + g + 8;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        int c = kk * 16 + 2 * t;
        af[kk][0] = ra < T ? *(const unsigned*)(base + (long long)ra * row_stride + c) : 0u;
        af[kk][1] = rb < T ? *(const unsigned*)(base + (long long)rb * row_stride + c) : 0u;
        af[kk][2] = ra < T ? *(const unsigned*)(base + (long long)ra * row_stride + c + 8) : 0u;
        af[kk][3] = rb < T ? *(const unsigned*)(base + (long long)rb * row_stride + c + 8) : 0u;
    }
}

// ------------------------------------------------------------------------------------------
// tensor-core implementation, version 2: the next K/V (or Q/dO) tile
// fetched by cp.async into a second shared-memory stage while the current one is computed
// (zero-fill for rows past T), B operands (and the dK/dV kernel's A operands) read with
// ldmatrix instead of 32-bit loads, and hardware bf16x2 conversion of P and dS.
// Pipelining pitfall: the barrier at the end of each iteration keeps the next prefetch from
// overwriting a stage that another warp is still reading.
// ------------------------------------------------------------------------------------------

template <int HD>
LLMQ_DEV void load_tile_async(uint16_t* tile, const uint16_t* base, long long row_stride, int r0, int T, int col) {
    constexpr int CH = HD / 8;
    for (int idx = threadIdx.x; idx < 64 * CH; idx += blockDim.x) {
        int r = idx / CH, c = idx % CH;
        bool ok = r0 + r < T;
        const uint16_t* src = ok ? base + (long long)(r0 + r) * row_stride + col + c * 8 : base;
        cp_async16(tile + r * (HD + 8) + c * 8, src, ok);
    }
}

// S[16 x 64] = A (registers) * Bt^T, B fragments by ldmatrix (two k-steps per instruction).
template <int HD>
LLMQ_DEV void mma_rows_x_tile2(float (&s)[8][4], const unsigned (&af)[HD / 16][4], const uint16_t* bt, int lane) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
        const uint16_t* rowp = bt + (nt * 8 + (lane & 7)) * (HD + 8) + (lane >> 3) * 8;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk += 2) {
            unsigned b0, b1, b2, b3;
            ldmatrix_x4(b0, b1, b2, b3, rowp + kk * 16);
            mma_bf16(s[nt], af[kk][0], af[kk][1], af[kk][2], af[kk][3], b0, b1);
            mma_bf16(s[nt], af[kk + 1][0], af[kk + 1][1], af[kk + 1][2], af[kk + 1][3], b2, b3);
        }
    }
}

// S[16 x 64] = A (smem rows r0..r0+15) * Bt^T, A and B fragments by ldmatrix.
template <int HD>
LLMQ_DEV void mma_smemrows_x_tile2(float (&s)[8][4], const uint16_t* atile, int r0, const uint16_t* bt, int lane) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    const uint16_t* arow = atile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * (HD + 8) + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk += 2) {
        unsigned a[2][4];
        ldmatrix_x4(a[0][0], a[0][1], a[0][2], a[0][3], arow + kk * 16);
        ldmatrix_x4(a[1][0], a[1][1], a[1][2], a[1][3], arow + kk * 16 + 16);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            unsigned b0, b1, b2, b3;
            ldmatrix_x4(b0, b1, b2, b3, bt + (nt * 8 + (lane & 7)) * (HD + 8) + (lane >> 3) * 8 + kk * 16);
            mma_bf16(s[nt], a[0][0], a[0][1], a[0][2], a[0][3], b0, b1);
            mma_bf16(s[nt], a[1][0], a[1][1], a[1][2], a[1][3], b2, b3);
        }
    }
}

template <int HD>
LLMQ_DEV void mma_p_x_tile2(float (&acc)[HD / 8][4], const float (&p)[8][4], const uint16_t* tile, int lane) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        unsigned a0 = bf16x2_bits_finite(p[2 * kk][0], p[2 * kk][1]);
        unsigned a1 = bf16x2_bits_finite(p[2 * kk][2], p[2 * kk][3]);
        unsigned a2 = bf16x2_bits_finite(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        unsigned a3 = bf16x2_bits_finite(p[2 * kk + 1][2], p[2 * kk + 1][3]);
        int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt += 2) {
            unsigned b0, b1, b2, b3;
            ldmatrix_x4_trans(b0, b1, b2, b3, tile + row * (HD + 8) + dt * 8 + (lane >> 4) * 8);
            mma_bf16(acc[dt], a0, a1, a2, a3, b0, b1);
            mma_bf16(acc[dt + 1], a0, a1, a2, a3, b2, b3);
        }
    }
}

// dyn smem: 4 tiles (2 stages of K, V).
template <int HD>
LLMQ_DEV void attn_fwd_mma2(uint16_t* out, float* lse, const uint16_t* qkv, int B, int T, int Hq, int Hkv) {
    constexpr int TS = ATT_BK * (HD + 8);
    uint16_t* smem = (uint16_t*)llmq_dyn_smem;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int nqt = gridDim.x;
    int qt = nqt - 1 - blockIdx.x;
    int h = blockIdx.y, b = blockIdx.z;
    int kvh = h / (Hq / Hkv);
    long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    int q0 = qt * ATT_BQ + w * 16;
    auto load_kv = [&](int kt, int st) {
        load_tile_async<HD>(smem + (2 * st) * TS, seq, Qw, kt * ATT_BK, T, (Hq + kvh) * HD);
        load_tile_async<HD>(smem + (2 * st + 1) * TS, seq, Qw, kt * ATT_BK, T, (Hq + Hkv + kvh) * HD);
        cp_async_commit();
    };
    load_kv(0, 0);
    unsigned qa[HD / 16][4];
    load_afrag_global<HD>(qa, seq + (long long)h * HD, Qw, q0, T, lane);
    const float sl2 = LOG2E / sqrtf((float)HD);
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    int qi0 = q0 + g, qi1 = q0 + g + 8;
    for (int kt = 0; kt <= qt; kt++) {
        int st = kt & 1;
        if (kt < qt) {
            load_kv(kt + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint16_t* Ks = smem + (2 * st) * TS;
        const uint16_t* Vs = smem + (2 * st + 1) * TS;
        float s[8][4];
        mma_rows_x_tile2<HD>(s, qa, Ks, lane);
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            int k0 = kt * ATT_BK + nt * 8 + 2 * t;
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float v0 = s[nt][e] * sl2, v1 = s[nt][2 + e] * sl2;
                if (kt == qt) {
                    if (k0 + e > qi0) v0 = -INFINITY;
                    if (k0 + e > qi1) v1 = -INFINITY;
                }
                s[nt][e] = v0;
                s[nt][2 + e] = v1;
                mx0 = fmaxf(mx0, v0);
                mx1 = fmaxf(mx1, v1);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xFFFFFFFFu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xFFFFFFFFu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
        float c0 = exp2f(m0 - mu0), c1 = exp2f(m1 - mu1);
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            o[i][0] *= c0;
            o[i][1] *= c0;
            o[i][2] *= c1;
            o[i][3] *= c1;
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - mu0);
            s[nt][1] = exp2f(s[nt][1] - mu0);
            s[nt][2] = exp2f(s[nt][2] - mu1);
            s[nt][3] = exp2f(s[nt][3] - mu1);
            l0 += s[nt][0] + s[nt][1];
            l1 += s[nt][2] + s[nt][3];
        }
        m0 = mn0;
        m1 = mn1;
        mma_p_x_tile2<HD>(o, s, Vs, lane);
        __syncthreads();
    }
    l0 += __shfl_xor_sync(0xFFFFFFFFu, l0, 1);
    l0 += __shfl_xor_sync(0xFFFFFFFFu, l0, 2);
    l1 += __shfl_xor_sync(0xFFFFFFFFu, l1, 1);
    l1 += __shfl_xor_sync(0xFFFFFFFFu, l1, 2);
    float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    long long ostride = (long long)Hq * HD;
    uint16_t* obase = out + (long long)b * T * ostride + (long long)h * HD;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        int c = i * 8 + 2 * t;
        if (qi0 < T) *(unsigned*)(obase + (long long)qi0 * ostride + c) = bf16x2_bits(o[i][0] * inv0, o[i][1] * inv0);
        if (qi1 < T) *(unsigned*)(obase + (long long)qi1 * ostride + c) = bf16x2_bits(o[i][2] * inv1, o[i][3] * inv1);
    }
    if (t == 0) {
        float* lrow = lse + ((long long)b * Hq + h) * T;
        if (qi0 < T) lrow[qi0] = (m0 + log2f(l0)) / LOG2E;
        if (qi1 < T) lrow[qi1] = (m1 + log2f(l1)) / LOG2E;
    }
}

// dQ, pipelined. dyn smem: 4 tiles (2 stages of K, V).
template <int HD>
LLMQ_DEV void attn_bwd_dq_mma2(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const float* lse, const float* Dv,
                               int B, int T, int Hq, int Hkv) {
    constexpr int TS = ATT_BK * (HD + 8);
    uint16_t* smem = (uint16_t*)llmq_dyn_smem;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int nqt = gridDim.x;
    int qt = nqt - 1 - blockIdx.x;
    int h = blockIdx.y, b = blockIdx.z;
    int kvh = h / (Hq / Hkv);
    long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    long long Ow = (long long)Hq * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    auto load_kv = [&](int kt, int st) {
        load_tile_async<HD>(smem + (2 * st) * TS, seq, Qw, kt * ATT_BK, T, (Hq + kvh) * HD);
        load_tile_async<HD>(smem + (2 * st + 1) * TS, seq, Qw, kt * ATT_BK, T, (Hq + Hkv + kvh) * HD);
        cp_async_commit();
    };
    load_kv(0, 0);
    int q0 = qt * ATT_BQ + w * 16;
    unsigned qa[HD / 16][4], da[HD / 16][4];
    load_afrag_global<HD>(qa, seq + (long long)h * HD, Qw, q0, T, lane);
    load_afrag_global<HD>(da, dout + (long long)b * T * Ow + (long long)h * HD, Ow, q0, T, lane);
    int qi0 = q0 + g, qi1 = q0 + g + 8;
    const float* lrow = lse + ((long long)b * Hq + h) * T;
    const float* drow = Dv + ((long long)b * Hq + h) * T;
    float L0 = qi0 < T ? lrow[qi0] * LOG2E : INFINITY, L1 = qi1 < T ? lrow[qi1] * LOG2E : INFINITY;
    float D0 = qi0 < T ? drow[qi0] : 0.f, D1 = qi1 < T ? drow[qi1] : 0.f;
    const float sl2 = LOG2E / sqrtf((float)HD);
    float dq[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    for (int kt = 0; kt <= qt; kt++) {
        int st = kt & 1;
        if (kt < qt) {
            load_kv(kt + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint16_t* Ks = smem + (2 * st) * TS;
        const uint16_t* Vs = smem + (2 * st + 1) * TS;
        float s[8][4], dp[8][4];
        mma_rows_x_tile2<HD>(s, qa, Ks, lane);
        mma_rows_x_tile2<HD>(dp, da, Vs, lane);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            int k0 = kt * ATT_BK + nt * 8 + 2 * t;
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float p0 = exp2f(s[nt][e] * sl2 - L0), p1 = exp2f(s[nt][2 + e] * sl2 - L1);
                if (kt == qt) {
                    if (k0 + e > qi0) p0 = 0.f;
                    if (k0 + e > qi1) p1 = 0.f;
                }
                s[nt][e] = p0 * (dp[nt][e] - D0);
                s[nt][2 + e] = p1 * (dp[nt][2 + e] - D1);
            }
        }
        mma_p_x_tile2<HD>(dq, s, Ks, lane);
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf((float)HD);
    uint16_t* qbase = dqkv + (long long)b * T * Qw + (long long)h * HD;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        int c = i * 8 + 2 * t;
        if (qi0 < T) *(unsigned*)(qbase + (long long)qi0 * Qw + c) = bf16x2_bits(dq[i][0] * scale, dq[i][1] * scale);
        if (qi1 < T) *(unsigned*)(qbase + (long long)qi1 * Qw + c) = bf16x2_bits(dq[i][2] * scale, dq[i][3] * scale);
    }
}

// dK, dV, pipelined. dyn smem: K, V tiles + 2 stages of (Q, dO) tiles + 2 stages of 2 x 64 floats.
template <int HD>
LLMQ_DEV void attn_bwd_dkv_mma2(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const float* lse, const float* Dv,
                                int B, int T, int Hq, int Hkv) {
    constexpr int TS = ATT_BK * (HD + 8);
    uint16_t* smem = (uint16_t*)llmq_dyn_smem;
    uint16_t* Ks = smem;
    uint16_t* Vs = smem + TS;
    float* LD = (float*)(smem + 6 * TS);  // [stage][L 64 | D 64]
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int kt = blockIdx.x;
    int kvh = blockIdx.y, b = blockIdx.z;
    int G = Hq / Hkv;
    long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    long long Ow = (long long)Hq * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    const uint16_t* dseq = dout + (long long)b * T * Ow;
    int nqt = (T + ATT_BQ - 1) / ATT_BQ;
    int per_head = nqt - kt;
    int total = G * per_head;
    load_tile_async<HD>(Ks, seq, Qw, kt * ATT_BK, T, (Hq + kvh) * HD);
    load_tile_async<HD>(Vs, seq, Qw, kt * ATT_BK, T, (Hq + Hkv + kvh) * HD);
    auto load_q = [&](int it, int st) {
        int h = kvh * G + it / per_head, qt = kt + it % per_head;
        load_tile_async<HD>(smem + (2 + 2 * st) * TS, seq, Qw, qt * ATT_BQ, T, h * HD);
        load_tile_async<HD>(smem + (3 + 2 * st) * TS, dseq, Ow, qt * ATT_BQ, T, h * HD);
        const float* lrow = lse + ((long long)b * Hq + h) * T;
        const float* drow = Dv + ((long long)b * Hq + h) * T;
        float* ld = LD + st * 2 * ATT_BQ;
        for (int i = threadIdx.x; i < ATT_BQ; i += blockDim.x) {
            int q = qt * ATT_BQ + i;
            ld[i] = q < T ? lrow[q] * LOG2E : INFINITY;
            ld[ATT_BQ + i] = q < T ? drow[q] : 0.f;
        }
        cp_async_commit();
    };
    load_q(0, 0);  // the K/V copies join the first group
    const float sl2 = LOG2E / sqrtf((float)HD);
    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
        dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
    }
    int r0 = w * 16;
    int kj0 = kt * ATT_BK + r0 + g, kj1 = kj0 + 8;
    for (int it = 0; it < total; it++) {
        int st = it & 1;
        int qt = kt + it % per_head;
        if (it + 1 < total) {
            load_q(it + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint16_t* Qs = smem + (2 + 2 * st) * TS;
        const uint16_t* Os = smem + (3 + 2 * st) * TS;
        const float* Ls = LD + st * 2 * ATT_BQ;
        const float* Ds = Ls + ATT_BQ;
        float s[8][4], dp[8][4];
        mma_smemrows_x_tile2<HD>(s, Ks, r0, Qs, lane);
        mma_smemrows_x_tile2<HD>(dp, Vs, r0, Os, lane);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int qc = nt * 8 + 2 * t + e;
                int qi = qt * ATT_BQ + qc;
                float L = Ls[qc], Dq = Ds[qc];
                float p0 = exp2f(s[nt][e] * sl2 - L), p1 = exp2f(s[nt][2 + e] * sl2 - L);
                if (qt == kt) {
                    if (kj0 > qi) p0 = 0.f;
                    if (kj1 > qi) p1 = 0.f;
                }
                s[nt][e] = p0;
                s[nt][2 + e] = p1;
                dp[nt][e] = p0 * (dp[nt][e] - Dq);
                dp[nt][2 + e] = p1 * (dp[nt][2 + e] - Dq);
            }
        }
        mma_p_x_tile2<HD>(dv, s, Os, lane);
        mma_p_x_tile2<HD>(dk, dp, Qs, lane);
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf((float)HD);
    uint16_t* kbase = dqkv + (long long)b * T * Qw + (long long)(Hq + kvh) * HD;
    uint16_t* vbase = dqkv + (long long)b * T * Qw + (long long)(Hq + Hkv + kvh) * HD;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        int c = i * 8 + 2 * t;
        if (kj0 < T) {
            *(unsigned*)(kbase + (long long)kj0 * Qw + c) = bf16x2_bits(dk[i][0] * scale, dk[i][1] * scale);
            *(unsigned*)(vbase + (long long)kj0 * Qw + c) = bf16x2_bits(dv[i][0], dv[i][1]);
        }
        if (kj1 < T) {
            *(unsigned*)(kbase + (long long)kj1 * Qw + c) = bf16x2_bits(dk[i][2] * scale, dk[i][3] * scale);
            *(unsigned*)(vbase + (long long)kj1 * Qw + c) = bf16x2_bits(dv[i][2], dv[i][3]);
        }
    }
}

#define MMA2_ENTRY(HD)                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) llmq_attn_fwd_mma2_##HD(uint16_t* out, float* lse, const uint16_t* qkv, \
                                                                                    int B, int T, int Hq, int Hkv) {          \
        attn_fwd_mma2<HD>(out, lse, qkv, B, T, Hq, Hkv);                                                                      \
    }                                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) llmq_attn_bwd_dq_mma2_##HD(                                     \
        uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const float* lse, const float* Dv, int B, int T, int Hq, int Hkv) { \
        attn_bwd_dq_mma2<HD>(dqkv, dout, qkv, lse, Dv, B, T, Hq, Hkv);                                                        \
    }                                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) llmq_attn_bwd_dkv_mma2_##HD(                                    \
        uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const float* lse, const float* Dv, int B, int T, int Hq, int Hkv) { \
        attn_bwd_dkv_mma2<HD>(dqkv, dout, qkv, lse, Dv, B, T, Hq, Hkv);                                                       \
    }
MMA2_ENTRY(64)
MMA2_ENTRY(128)
