// attention.cu: causal grouped-query attention, forward and backward, never materialising the
// T x T score matrix (flash-attention style online softmax).
//
// Layout: qkv [B*T, (Hq + 2 Hkv) Hd], per row Hq query heads, then Hkv key heads, then Hkv value
// heads; query head h reads kv head h / (Hq / Hkv). out [B*T, Hq Hd], lse f32 [B, Hq, T] (natural
// log-sum-exp of the scaled scores), softmax scale 1/sqrt(Hd).
//
// Two implementations here (the Hopper kernels are in attention_wg.cu / attention_ws.cu):
// * "simple" (any float dtype, Hd <= 256): one warp per query row (forward, dQ) or per key row
//   (dK/dV); lane l holds dims l, l+32, ...; dot products by warp shuffles; the forward is the
//   online softmax of online_softmax.cuh, which the KV-cache decode shares. Slow, obviously
//   correct, used as the fallback and as a cross-check of the fast paths.
// * "mma" (bf16 qkv/out/dout/dqkv, Hd in {64, 128}, 16-byte aligned rows; the `attn3_*` kernels
//   below, the path on compute capability 8.x): tensor cores through mma.sync.m16n8k16 (bf16 in,
//   f32 accumulate), FlashAttention-2 structure. Tiles in padded shared memory (row pitch Hd+8
//   elements, so that 8 rows of 16 bytes hit distinct banks), filled by cp.async in two stages.
//   Score and probability fragments stay in registers: the accumulator layout of S = Q K^T is
//   converted in place into the A-operand layout of P V; the operands that are needed "k-major"
//   are read with ldmatrix.trans. Backward: one kernel per query block computes dQ (and D =
//   rowsum(dO o O)) looping over key tiles, and one kernel per key block computes dK and dV
//   looping over all query heads of its group and all later query tiles. No atomics:
//   deterministic.
// Pitfalls: causal masking is only needed on the diagonal tile (earlier tiles are entirely
// visible, and keys past T only occur in the diagonal tile for valid rows); rows past T are
// computed on zero-filled tiles but never stored; P and dS are rounded to bf16 before their mma,
// as in FlashAttention.
#include "common.cuh"
#include "online_softmax.cuh"

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
    OnlineSoftmax<NPL> st;
    st.start(qkv, rowq + (long long)h * Hd, dt, Hd, lane);
    float scale = 1.0f / sqrtf((float)Hd);
    for (int j = 0; j <= i; j++) {
        long long rowk = ((long long)b * T + j) * Qw;
        st.add(qkv, rowk + (long long)(Hq + g) * Hd, qkv, rowk + (long long)(Hq + Hkv + g) * Hd, dt, Hd, scale, lane);
    }
    long long rowo = (((long long)b * T + i) * Hq + h) * Hd;
#pragma unroll
    for (int k = 0; k < NPL; k++) {
        int d = lane + 32 * k;
        if (d < Hd) store_f(out, rowo + d, dt_out, st.o[k] / st.l);
    }
    if (lane == 0) lse[((long long)b * Hq + h) * T + i] = st.m + logf(st.l);
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

// ------------------------------------------------------------------------------------------
// tensor-core implementation (bf16, Hd 64 or 128)
// ------------------------------------------------------------------------------------------

#define LOG2E 1.4426950408889634f

LLMQ_DEV void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 b16 matrices, transposed; lanes 8i..8i+7 give the row addresses of matrix i.
LLMQ_DEV void ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const uint16_t* p) {
#if __CUDA_ARCH__ >= 800
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a));
#endif
}

LLMQ_DEV void cp_async16(void* sptr, const void* gptr, bool valid) {
#if __CUDA_ARCH__ >= 800
    unsigned s = (unsigned)__cvta_generic_to_shared(sptr);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gptr), "r"(n));
#endif
}
LLMQ_DEV void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
LLMQ_DEV void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

LLMQ_DEV void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const uint16_t* p) {
#if __CUDA_ARCH__ >= 800
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
#endif
}

// ------------------------------------------------------------------------------------------
// tensor-core kernels (bf16, Hd 64 or 128), templated on their tiles:
// * NW warps per block, each warp owns MT m-tiles of 16 rows (MT = 2 halves the shared-memory
//   traffic of the B operands per mma: every ldmatrix'd B fragment feeds MT mmas).
// * K/V (forward, dQ) or Q/dO (dK/dV) tiles are double-buffered with cp.async; the block's own
//   rows (Q, dO or K, V) are loaded once into shared memory, A fragments come from there by
//   ldmatrix (or, with QREG, are kept in registers).
// * Softmax in the log2 domain with the scale folded into one FMA per score
//   (p = 2^(s * log2e/sqrt(Hd) - m)) and the hardware ex2.approx.ftz; the row max is taken over
//   the raw scores.
// * Warps whose rows are entirely masked for a tile skip it (warp-uniform branch; the block still
//   meets at the barriers); only the diagonal tiles are masked.
// * The dQ kernel also computes D = rowsum(dO o O) for its rows (thread per row, fixed order) and
//   stores it for the dK/dV kernel, which therefore runs after it (no separate D pass).
// * dK/dV: one block per (key block, kv head, batch), looping over the query heads of the group
//   and the query tiles at or after the key block, summing in registers: no atomics, no partial
//   buffers, deterministic.
// One configuration per kernel and head size is instantiated at the end of this file; the Rust
// table in src/attention.rs mirrors it (warps, m-tiles, tile widths).
// ------------------------------------------------------------------------------------------

LLMQ_DEV float ex2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ROWS rows [r0, r0 + ROWS) of one head (column offset col, HD wide) into smem [ROWS][HD+8] by
// cp.async (16 bytes per copy); rows >= T are zero-filled. NTH threads take part.
template <int HD, int ROWS, int NTH>
LLMQ_DEV void a3_cp_rows(uint16_t* tile, const uint16_t* base, long long row_stride, int r0, int T, int col) {
    constexpr int CH = HD / 8;
    for (int idx = threadIdx.x; idx < ROWS * CH; idx += NTH) {
        int r = idx / CH, c = idx % CH;
        bool ok = r0 + r < T;
        const uint16_t* src = ok ? base + (long long)(r0 + r) * row_stride + col + c * 8 : base;
        cp_async16(tile + r * (HD + 8) + c * 8, src, ok);
    }
}

// A fragments (row-major 16 x 16 blocks) of MT m-tiles (rows r0 + 16 m ..) x HD from smem.
template <int HD, int MT>
LLMQ_DEV void a3_lda_all(unsigned (&af)[MT][HD / 16][4], const uint16_t* at, int r0, int lane) {
    constexpr int P = HD + 8;
    const uint16_t* ap = at + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * P + (lane >> 4) * 8;
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) ldmatrix_x4(af[m][kk][0], af[m][kk][1], af[m][kk][2], af[m][kk][3], ap + m * 16 * P + kk * 16);
}

// s[m][nt] = A (MT x 16 rows, smem rows r0..) * Bt^T over k = HD, Bt a smem tile whose rows
// nt*8.. are the output columns.
template <int HD, int MT, int NT>
LLMQ_DEV void a3_mma_s_smem(float (&s)[MT][NT][4], const uint16_t* at, int r0, const uint16_t* bt, int lane) {
    constexpr int P = HD + 8;
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) s[m][nt][0] = s[m][nt][1] = s[m][nt][2] = s[m][nt][3] = 0.f;
    const uint16_t* ap = at + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * P + (lane >> 4) * 8;
    const uint16_t* bp = bt + (lane & 7) * P + (lane >> 3) * 8;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk += 2) {
        unsigned a[MT][2][4];
#pragma unroll
        for (int m = 0; m < MT; m++) {
            ldmatrix_x4(a[m][0][0], a[m][0][1], a[m][0][2], a[m][0][3], ap + m * 16 * P + kk * 16);
            ldmatrix_x4(a[m][1][0], a[m][1][1], a[m][1][2], a[m][1][3], ap + m * 16 * P + kk * 16 + 16);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            unsigned b0, b1, b2, b3;
            ldmatrix_x4(b0, b1, b2, b3, bp + nt * 8 * P + kk * 16);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma_bf16(s[m][nt], a[m][0][0], a[m][0][1], a[m][0][2], a[m][0][3], b0, b1);
                mma_bf16(s[m][nt], a[m][1][0], a[m][1][1], a[m][1][2], a[m][1][3], b2, b3);
            }
        }
    }
}

// Same with the A fragments in registers.
template <int HD, int MT, int NT>
LLMQ_DEV void a3_mma_s_regs(float (&s)[MT][NT][4], const unsigned (&af)[MT][HD / 16][4], const uint16_t* bt, int lane) {
    constexpr int P = HD + 8;
    const uint16_t* bp = bt + (lane & 7) * P + (lane >> 3) * 8;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int m = 0; m < MT; m++) s[m][nt][0] = s[m][nt][1] = s[m][nt][2] = s[m][nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk += 2) {
            unsigned b0, b1, b2, b3;
            ldmatrix_x4(b0, b1, b2, b3, bp + nt * 8 * P + kk * 16);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma_bf16(s[m][nt], af[m][kk][0], af[m][kk][1], af[m][kk][2], af[m][kk][3], b0, b1);
                mma_bf16(s[m][nt], af[m][kk + 1][0], af[m][kk + 1][1], af[m][kk + 1][2], af[m][kk + 1][3], b2, b3);
            }
        }
    }
}

// acc[m] (16 x HD) += P[m] (16 x 8 NT, C-layout fragments, rounded to bf16) * Tile (8 NT rows
// (k) x HD, smem, read with ldmatrix.trans).
template <int HD, int MT, int NT>
LLMQ_DEV void a3_mma_pv(float (&acc)[MT][HD / 8][4], const float (&p)[MT][NT][4], const uint16_t* tile, int lane) {
    constexpr int P = HD + 8;
    const uint16_t* tp = tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * P + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++) {
        unsigned a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) {
            a[m][0] = bf16x2_bits_finite(p[m][2 * kk][0], p[m][2 * kk][1]);
            a[m][1] = bf16x2_bits_finite(p[m][2 * kk][2], p[m][2 * kk][3]);
            a[m][2] = bf16x2_bits_finite(p[m][2 * kk + 1][0], p[m][2 * kk + 1][1]);
            a[m][3] = bf16x2_bits_finite(p[m][2 * kk + 1][2], p[m][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt += 2) {
            unsigned b0, b1, b2, b3;
            ldmatrix_x4_trans(b0, b1, b2, b3, tp + kk * 16 * P + dt * 8);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                mma_bf16(acc[m][dt], a[m][0], a[m][1], a[m][2], a[m][3], b0, b1);
                mma_bf16(acc[m][dt + 1], a[m][0], a[m][1], a[m][2], a[m][3], b2, b3);
            }
        }
    }
}

// Forward. Block: BQ = NW*16*MT query rows of one head; grid (ceil(T/BQ), Hq, B), heavy (late)
// tiles first. dyn smem: Q [BQ][HD+8] + 2 stages x (K, V) [BK][HD+8], bf16.
// A bf16 pair stored at dst; returns its abs-max as f32 bits (for the optional fused abs-max).
LLMQ_DEV unsigned a3_put2(uint16_t* dst, float x0, float x1) {
    const unsigned bits = bf16x2_bits(x0, x1);
    *(unsigned*)dst = bits;
    return bf16x2_abs_bits(bits);
}

template <int HD, int NW, int MT, int BK, bool QREG>
LLMQ_DEV void attn3_fwd(uint16_t* out, float* lse, const uint16_t* qkv, int T, int Hq, int Hkv, float* amax) {
    constexpr int P = HD + 8, BQ = NW * 16 * MT, NT = BK / 8, NTH = NW * 32;
    static_assert(NT % 2 == 0, "key tile must be a multiple of 16");
    uint16_t* Qs = (uint16_t*)llmq_dyn_smem;
    uint16_t* KV = Qs + BQ * P;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (Hq / Hkv);
    const long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    const int qb0 = qt * BQ;
    const int nkt = (min(T, qb0 + BQ) - 1) / BK + 1;
    a3_cp_rows<HD, BQ, NTH>(Qs, seq, Qw, qb0, T, h * HD);
    auto load_kv = [&](int kt, int st) {
        a3_cp_rows<HD, BK, NTH>(KV + (2 * st) * BK * P, seq, Qw, kt * BK, T, (Hq + kvh) * HD);
        a3_cp_rows<HD, BK, NTH>(KV + (2 * st + 1) * BK * P, seq, Qw, kt * BK, T, (Hq + Hkv + kvh) * HD);
        cp_async_commit();
    };
    load_kv(0, 0);
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int r0 = w * 16 * MT;
    const int qw0 = qb0 + r0;
    float o[MT][HD / 8][4];
    float mx[MT][2], l[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int i = 0; i < HD / 8; i++) o[m][i][0] = o[m][i][1] = o[m][i][2] = o[m][i][3] = 0.f;
        mx[m][0] = mx[m][1] = -INFINITY;
        l[m][0] = l[m][1] = 0.f;
    }
    unsigned qa[MT][QREG ? HD / 16 : 1][4];
    (void)qa;
    for (int kt = 0; kt < nkt; kt++) {
        const int st = kt & 1;
        if (kt + 1 < nkt) {
            load_kv(kt + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if constexpr (QREG) {
            if (kt == 0) a3_lda_all<HD, MT>(qa, Qs, r0, lane);
        }
        const uint16_t* Ks = KV + (2 * st) * BK * P;
        const uint16_t* Vs = Ks + BK * P;
        const int k0 = kt * BK;
        if (k0 <= qw0 + 16 * MT - 1) {  // some row of this warp sees some key of the tile
            float s[MT][NT][4];
            if constexpr (QREG) {
                a3_mma_s_regs<HD, MT, NT>(s, qa, Ks, lane);
            } else {
                a3_mma_s_smem<HD, MT, NT>(s, Qs, r0, Ks, lane);
            }
            if (k0 + BK - 1 > qw0) {  // diagonal tile: keys after the query are masked
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    const int qa0 = qw0 + 16 * m + g, qa1 = qa0 + 8;
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int key = k0 + nt * 8 + 2 * t + e;
                            if (key > qa0) s[m][nt][e] = -INFINITY;
                            if (key > qa1) s[m][nt][2 + e] = -INFINITY;
                        }
                }
            }
#pragma unroll
            for (int m = 0; m < MT; m++) {
                float n0 = mx[m][0], n1 = mx[m][1];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    n0 = fmaxf(n0, fmaxf(s[m][nt][0], s[m][nt][1]));
                    n1 = fmaxf(n1, fmaxf(s[m][nt][2], s[m][nt][3]));
                }
                n0 = fmaxf(n0, __shfl_xor_sync(0xFFFFFFFFu, n0, 1));
                n0 = fmaxf(n0, __shfl_xor_sync(0xFFFFFFFFu, n0, 2));
                n1 = fmaxf(n1, __shfl_xor_sync(0xFFFFFFFFu, n1, 1));
                n1 = fmaxf(n1, __shfl_xor_sync(0xFFFFFFFFu, n1, 2));
                const float mu0 = n0 == -INFINITY ? 0.f : n0 * sl2, mu1 = n1 == -INFINITY ? 0.f : n1 * sl2;
                const float c0 = ex2_ftz(fmaf(mx[m][0], sl2, -mu0)), c1 = ex2_ftz(fmaf(mx[m][1], sl2, -mu1));
                mx[m][0] = n0;
                mx[m][1] = n1;
                float ls0 = 0.f, ls1 = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    s[m][nt][0] = ex2_ftz(fmaf(s[m][nt][0], sl2, -mu0));
                    s[m][nt][1] = ex2_ftz(fmaf(s[m][nt][1], sl2, -mu0));
                    s[m][nt][2] = ex2_ftz(fmaf(s[m][nt][2], sl2, -mu1));
                    s[m][nt][3] = ex2_ftz(fmaf(s[m][nt][3], sl2, -mu1));
                    ls0 += s[m][nt][0] + s[m][nt][1];
                    ls1 += s[m][nt][2] + s[m][nt][3];
                }
                l[m][0] = fmaf(l[m][0], c0, ls0);
                l[m][1] = fmaf(l[m][1], c1, ls1);
#pragma unroll
                for (int i = 0; i < HD / 8; i++) {
                    o[m][i][0] *= c0;
                    o[m][i][1] *= c0;
                    o[m][i][2] *= c1;
                    o[m][i][3] *= c1;
                }
            }
            a3_mma_pv<HD, MT, NT>(o, s, Vs, lane);
        }
        __syncthreads();
    }
    const long long ostride = (long long)Hq * HD;
    uint16_t* obase = out + (long long)b * T * ostride + (long long)h * HD;
    float* lrow = lse + ((long long)b * Hq + h) * T;
    unsigned am = 0u;
#pragma unroll
    for (int m = 0; m < MT; m++) {
        float l0 = l[m][0], l1 = l[m][1];
        l0 += __shfl_xor_sync(0xFFFFFFFFu, l0, 1);
        l0 += __shfl_xor_sync(0xFFFFFFFFu, l0, 2);
        l1 += __shfl_xor_sync(0xFFFFFFFFu, l1, 1);
        l1 += __shfl_xor_sync(0xFFFFFFFFu, l1, 2);
        const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
        const int qi0 = qw0 + 16 * m + g, qi1 = qi0 + 8;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            const int c = i * 8 + 2 * t;
            if (qi0 < T) am = max(am, a3_put2(obase + (long long)qi0 * ostride + c, o[m][i][0] * inv0, o[m][i][1] * inv0));
            if (qi1 < T) am = max(am, a3_put2(obase + (long long)qi1 * ostride + c, o[m][i][2] * inv1, o[m][i][3] * inv1));
        }
        if (t == 0) {
            if (qi0 < T) lrow[qi0] = (mx[m][0] * sl2 + log2f(l0)) / LOG2E;
            if (qi1 < T) lrow[qi1] = (mx[m][1] * sl2 + log2f(l1)) / LOG2E;
        }
    }
    warp_absmax_commit(amax, am);
}

// sum_j a_j * b_j over 8 bf16 pairs, in order.
LLMQ_DEV float a3_dot8(uint4 x, uint4 y, float acc) {
    const unsigned xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        acc = fmaf(__uint_as_float(xs[i] << 16), __uint_as_float(ys[i] << 16), acc);
        acc = fmaf(__uint_as_float(xs[i] & 0xFFFF0000u), __uint_as_float(ys[i] & 0xFFFF0000u), acc);
    }
    return acc;
}

// Calls f(row, column, a, b) for each pair of adjacent columns a thread holds of a 16 x HD (x MT)
// accumulator in the mma C layout (rows r0 + 16 m + g and + 8, columns 8 i + 2 t), rows < T.
template <int HD, int MT, class F>
LLMQ_DEV void a3_each_pair(int r0, int g, int t, int T, const float (&acc)[MT][HD / 8][4], F f) {
#pragma unroll
    for (int m = 0; m < MT; m++) {
        const int ra = r0 + 16 * m + g, rb = ra + 8;
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            const int c = i * 8 + 2 * t;
            if (ra < T) f(ra, c, acc[m][i][0], acc[m][i][1]);
            if (rb < T) f(rb, c, acc[m][i][2], acc[m][i][3]);
        }
    }
}

// Optional work fused into the backward kernels' bf16 stores of dQ, dK and dV (kernel arguments
// `freqs`, `amax`; null: none of it):
// - freqs (f32 [T][Hd/2][2] = (cos, sin), rope.cu's table): the RoPE backward of dQ and dK, so that
//   dqkv receives the gradient of qkv *before* RoPE, rotated in f32 before the one rounding. Column
//   c < Hd/2 pairs with c + Hd/2, which the mma C layout puts in the same thread (i + Hd/16), so the
//   rotation needs no exchange. Products and sums as rope.cu's backward (y = x c + x' s,
//   y' = x' c - x s, operands already scaled; no FMA contraction under -fmad=false).
// - amax (f32 [1], zeroed by the host): the abs-max of every stored bf16 value (fp8 runs: the QKV
//   backward quantises dqkv with it). One atomic per warp: every lane of the warp must get here.
template <int HD, int MT>
LLMQ_DEV void a3_store_grad(uint16_t* base, long long stride, int r0, int g, int t, int T, const float (&acc)[MT][HD / 8][4], float scale,
                            const float* freqs, float* amax) {
    unsigned am = 0u;
    auto put = [&](int row, int c, float x0, float x1) { am = max(am, a3_put2(base + (long long)row * stride + c, x0, x1)); };
    if (freqs == nullptr) {
        a3_each_pair<HD, MT>(r0, g, t, T, acc, [&](int row, int c, float x0, float x1) { put(row, c, x0 * scale, x1 * scale); });
    } else {
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int row = r0 + 16 * m + g + 4 * e;  // e = 0: rows g, e = 2: rows g + 8
                if (row >= T) continue;
#pragma unroll
                for (int i = 0; i < HD / 16; i++) {
                    const int c = i * 8 + 2 * t;
                    const float4 cs = *(const float4*)(freqs + ((long long)row * (HD / 2) + c) * 2);
                    const float x0 = acc[m][i][e] * scale, x1 = acc[m][i][e + 1] * scale;
                    const float y0 = acc[m][i + HD / 16][e] * scale, y1 = acc[m][i + HD / 16][e + 1] * scale;
                    put(row, c, x0 * cs.x + y0 * cs.y, x1 * cs.z + y1 * cs.w);
                    put(row, c + HD / 2, y0 * cs.x - x0 * cs.y, y1 * cs.z - x1 * cs.w);
                }
            }
    }
    warp_absmax_commit(amax, am);
}

// Iteration space of the dK/dV kernels (here and attention_ws.cu): block (kb * S + split, kvh, b) owns
// the BKV keys of key block kb of kv head kvh and loops over the query tiles (BQ rows) at or
// after its key block of each of the G query heads of the group, numbered it = head in group *
// per_head + tile; part `split` of S takes it in [lo, hi).
struct A3DkvSpace {
    int kb, kvh, G, qt0, per_head, lo, hi;
    LLMQ_DEV A3DkvSpace(int BKV, int BQ, int S, int T, int Hq, int Hkv)
        : kb(blockIdx.x / S), kvh(blockIdx.y), G(Hq / Hkv), qt0(kb * (BKV / BQ)) {
        const int split = blockIdx.x % S;
        per_head = (T + BQ - 1) / BQ - qt0;
        lo = (int)((long long)G * per_head * split / S);
        hi = (int)((long long)G * per_head * (split + 1) / S);
    }
    LLMQ_DEV int head(int it) const { return kvh * G + it / per_head; }
    LLMQ_DEV int qtile(int it) const { return qt0 + it % per_head; }
};

// Epilogue of the dK/dV kernels: this thread's dK, dV accumulators (MT m-tiles of 16 keys from
// key kw0) either as f32 part sums (S > 1, in dqkv's K|V column layout, for
// llmq_attn3_dkv_reduce) or as bf16 into dqkv (dK scaled by 1/sqrt(Hd)), with a3_store_grad's options.
template <int HD, int MT>
LLMQ_DEV void a3_dkv_store(uint16_t* dqkv, float* part, const A3DkvSpace& sp, int S, int kw0, int g, int t, int T, int Hq, int Hkv,
                           const float (&dk)[MT][HD / 8][4], const float (&dv)[MT][HD / 8][4], const float* freqs, float* amax) {
    const int kvh = sp.kvh, b = blockIdx.z;
    if (S > 1) {
        const int pw = 2 * Hkv * HD;
        float* pb = part + ((long long)(blockIdx.x % S) * gridDim.z + b) * T * pw + (long long)kvh * HD;
        a3_each_pair<HD, MT>(kw0, g, t, T, dk, [&](int k, int c, float x0, float x1) { *(float2*)(pb + (long long)k * pw + c) = make_float2(x0, x1); });
        a3_each_pair<HD, MT>(kw0, g, t, T, dv, [&](int k, int c, float x0, float x1) {
            *(float2*)(pb + (long long)k * pw + Hkv * HD + c) = make_float2(x0, x1);
        });
        return;
    }
    const long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    const float scale = 1.0f / sqrtf((float)HD);
    uint16_t* kbase = dqkv + (long long)b * T * Qw + (long long)(Hq + kvh) * HD;
    uint16_t* vbase = dqkv + (long long)b * T * Qw + (long long)(Hq + Hkv + kvh) * HD;
    a3_store_grad<HD, MT>(kbase, Qw, kw0, g, t, T, dk, scale, freqs, amax);
    a3_store_grad<HD, MT>(vbase, Qw, kw0, g, t, T, dv, 1.0f, nullptr, amax);
}

// dQ (and D). Block: BQ = NW*16*MT query rows of one head; grid (ceil(T/BQ), Hq, B).
// dyn smem: Q, dO [BQ][HD+8] + 2 stages x (K, V) [BK][HD+8] (bf16) + L, D [BQ] (f32).
template <int HD, int NW, int MT, int BK, bool QREG>
LLMQ_DEV void attn3_dq(uint16_t* dqkv, float* Dv, const uint16_t* dout, const uint16_t* out, const uint16_t* qkv, const float* lse, int T,
                       int Hq, int Hkv, const float* freqs, float* amax) {
    constexpr int P = HD + 8, BQ = NW * 16 * MT, NT = BK / 8, NTH = NW * 32;
    static_assert(NT % 2 == 0, "key tile must be a multiple of 16");
    uint16_t* Qs = (uint16_t*)llmq_dyn_smem;
    uint16_t* Os = Qs + BQ * P;
    uint16_t* KV = Os + BQ * P;
    float* Ls = (float*)(KV + 4 * BK * P);
    float* Ds = Ls + BQ;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (Hq / Hkv);
    const long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    const long long Ow = (long long)Hq * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    const uint16_t* dseq = dout + (long long)b * T * Ow;
    const int qb0 = qt * BQ;
    const int nkt = (min(T, qb0 + BQ) - 1) / BK + 1;
    a3_cp_rows<HD, BQ, NTH>(Qs, seq, Qw, qb0, T, h * HD);
    a3_cp_rows<HD, BQ, NTH>(Os, dseq, Ow, qb0, T, h * HD);
    auto load_kv = [&](int kt, int st) {
        a3_cp_rows<HD, BK, NTH>(KV + (2 * st) * BK * P, seq, Qw, kt * BK, T, (Hq + kvh) * HD);
        a3_cp_rows<HD, BK, NTH>(KV + (2 * st + 1) * BK * P, seq, Qw, kt * BK, T, (Hq + Hkv + kvh) * HD);
        cp_async_commit();
    };
    load_kv(0, 0);
    // D = rowsum(dO o O) and L (log2 domain) of the block's rows, while the copies run.
    for (int r = threadIdx.x; r < BQ; r += NTH) {
        const int q = qb0 + r;
        float dsum = 0.f, L = INFINITY;
        if (q < T) {
            const long long off = ((long long)b * T + q) * Ow + (long long)h * HD;
            const uint4* x = (const uint4*)(dout + off);
            const uint4* y = (const uint4*)(out + off);
#pragma unroll 4
            for (int j = 0; j < HD / 8; j++) dsum = a3_dot8(x[j], y[j], dsum);
            const long long li = ((long long)b * Hq + h) * T + q;
            Dv[li] = dsum;
            L = lse[li] * LOG2E;
        }
        Ls[r] = L;
        Ds[r] = dsum;
    }
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int r0 = w * 16 * MT;
    const int qw0 = qb0 + r0;
    float dq[MT][HD / 8][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int i = 0; i < HD / 8; i++) dq[m][i][0] = dq[m][i][1] = dq[m][i][2] = dq[m][i][3] = 0.f;
    unsigned qa[MT][QREG ? HD / 16 : 1][4], da[MT][QREG ? HD / 16 : 1][4];
    (void)qa;
    (void)da;
    for (int kt = 0; kt < nkt; kt++) {
        const int st = kt & 1;
        if (kt + 1 < nkt) {
            load_kv(kt + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if constexpr (QREG) {
            if (kt == 0) {
                a3_lda_all<HD, MT>(qa, Qs, r0, lane);
                a3_lda_all<HD, MT>(da, Os, r0, lane);
            }
        }
        const uint16_t* Ks = KV + (2 * st) * BK * P;
        const uint16_t* Vs = Ks + BK * P;
        const int k0 = kt * BK;
        if (k0 <= qw0 + 16 * MT - 1) {
            float s[MT][NT][4], dp[MT][NT][4];
            if constexpr (QREG) {
                a3_mma_s_regs<HD, MT, NT>(s, qa, Ks, lane);
                a3_mma_s_regs<HD, MT, NT>(dp, da, Vs, lane);
            } else {
                a3_mma_s_smem<HD, MT, NT>(s, Qs, r0, Ks, lane);
                a3_mma_s_smem<HD, MT, NT>(dp, Os, r0, Vs, lane);
            }
            const bool diag = k0 + BK - 1 > qw0;
#pragma unroll
            for (int m = 0; m < MT; m++) {
                const int ra = r0 + 16 * m + g;
                const float L0 = Ls[ra], L1 = Ls[ra + 8], D0 = Ds[ra], D1 = Ds[ra + 8];
                const int qa0 = qb0 + ra, qa1 = qa0 + 8;
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float p0 = ex2_ftz(fmaf(s[m][nt][e], sl2, -L0)), p1 = ex2_ftz(fmaf(s[m][nt][2 + e], sl2, -L1));
                        if (diag) {
                            const int key = k0 + nt * 8 + 2 * t + e;
                            if (key > qa0) p0 = 0.f;
                            if (key > qa1) p1 = 0.f;
                        }
                        s[m][nt][e] = p0 * (dp[m][nt][e] - D0);
                        s[m][nt][2 + e] = p1 * (dp[m][nt][2 + e] - D1);
                    }
            }
            a3_mma_pv<HD, MT, NT>(dq, s, Ks, lane);  // dQ += dS K
        }
        __syncthreads();
    }
    a3_store_grad<HD, MT>(dqkv + (long long)b * T * Qw + (long long)h * HD, Qw, qw0, g, t, T, dq, 1.0f / sqrtf((float)HD), freqs, amax);
}

// dK, dV. Block: BKV = NW*16*MT keys of one kv head; grid (ceil(T/BKV) * S, Hkv, B), early (heavy)
// key blocks first; the G query heads of the group x the BQ-row query tiles at or after the key
// block form one iteration space, cut into S contiguous parts (blockIdx.x % S picks one).
// dyn smem: K, V [BKV][HD+8] + 2 stages x (Q, dO) [BQ][HD+8] (bf16) + 2 stages x (L, D) [BQ]
// (f32). Needs D from the dQ kernel.
// S = 1 writes dK, dV (bf16) into dqkv. S > 1 writes each part's f32 sums into
// part[S][B*T][2*Hkv*HD] (the column layout of dqkv's K|V columns) and attn3_dkv_reduce adds the
// S parts in order: more, shorter blocks (GQA leaves only B*Hkv*T/BKV blocks, and the causal
// mask makes early key blocks long), still deterministic.
template <int HD, int NW, int MT, int BQ>
LLMQ_DEV void attn3_dkv(uint16_t* dqkv, float* part, int S, const uint16_t* dout, const uint16_t* qkv, const float* lse, const float* Dv,
                        int T, int Hq, int Hkv, const float* freqs, float* amax) {
    constexpr int P = HD + 8, BKV = NW * 16 * MT, NT = BQ / 8, NTH = NW * 32;
    static_assert(NT % 2 == 0 && BKV % BQ == 0, "query tile must be a multiple of 16 dividing the key block");
    uint16_t* Ks = (uint16_t*)llmq_dyn_smem;
    uint16_t* Vs = Ks + BKV * P;
    uint16_t* QO = Vs + BKV * P;                // [stage][Q | dO][BQ][P]
    float* LD = (float*)(QO + 4 * BQ * P);      // [stage][L | D][BQ]
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const A3DkvSpace sp(BKV, BQ, S, T, Hq, Hkv);
    const int kb = sp.kb, kvh = sp.kvh, b = blockIdx.z, lo = sp.lo, hi = sp.hi;
    const long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    const long long Ow = (long long)Hq * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    const uint16_t* dseq = dout + (long long)b * T * Ow;
    a3_cp_rows<HD, BKV, NTH>(Ks, seq, Qw, kb * BKV, T, (Hq + kvh) * HD);
    a3_cp_rows<HD, BKV, NTH>(Vs, seq, Qw, kb * BKV, T, (Hq + Hkv + kvh) * HD);
    auto load_q = [&](int it, int st) {
        const int h = sp.head(it), qt = sp.qtile(it);
        a3_cp_rows<HD, BQ, NTH>(QO + (2 * st) * BQ * P, seq, Qw, qt * BQ, T, h * HD);
        a3_cp_rows<HD, BQ, NTH>(QO + (2 * st + 1) * BQ * P, dseq, Ow, qt * BQ, T, h * HD);
        const float* lrow = lse + ((long long)b * Hq + h) * T;
        const float* drow = Dv + ((long long)b * Hq + h) * T;
        float* ld = LD + st * 2 * BQ;
        for (int i = threadIdx.x; i < BQ; i += NTH) {
            const int q = qt * BQ + i;
            ld[i] = q < T ? lrow[q] * LOG2E : INFINITY;
            ld[BQ + i] = q < T ? drow[q] : 0.f;
        }
        cp_async_commit();
    };
    if (lo < hi) {
        load_q(lo, 0);  // the K/V copies join the first group
    } else {
        cp_async_commit();  // an empty part: nothing to wait for but the K/V copies
        cp_async_wait<0>();
    }
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int r0 = w * 16 * MT;
    const int kw0 = kb * BKV + r0;
    float dk[MT][HD / 8][4], dv[MT][HD / 8][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
            dk[m][i][0] = dk[m][i][1] = dk[m][i][2] = dk[m][i][3] = 0.f;
            dv[m][i][0] = dv[m][i][1] = dv[m][i][2] = dv[m][i][3] = 0.f;
        }
    for (int it = lo; it < hi; it++) {
        const int st = (it - lo) & 1;
        const int q0 = sp.qtile(it) * BQ;
        if (it + 1 < hi) {
            load_q(it + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (q0 + BQ - 1 >= kw0) {  // some query of the tile sees some key of this warp
            const uint16_t* Qs = QO + (2 * st) * BQ * P;
            const uint16_t* Os = Qs + BQ * P;
            const float* Lq = LD + st * 2 * BQ;
            const float* Dq = Lq + BQ;
            float s[MT][NT][4], dp[MT][NT][4];
            a3_mma_s_smem<HD, MT, NT>(s, Ks, r0, Qs, lane);   // S^T = K Q^T
            a3_mma_s_smem<HD, MT, NT>(dp, Vs, r0, Os, lane);  // dP^T = V dO^T
            const bool diag = q0 < kw0 + 16 * MT - 1;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const int qc = nt * 8 + 2 * t;
                const float2 Lv = *(const float2*)(Lq + qc), Dw = *(const float2*)(Dq + qc);
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float L = e ? Lv.y : Lv.x, D = e ? Dw.y : Dw.x;
                    const int qi = q0 + qc + e;
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        float p0 = ex2_ftz(fmaf(s[m][nt][e], sl2, -L)), p1 = ex2_ftz(fmaf(s[m][nt][2 + e], sl2, -L));
                        if (diag) {
                            const int kj0 = kw0 + 16 * m + g;
                            if (kj0 > qi) p0 = 0.f;
                            if (kj0 + 8 > qi) p1 = 0.f;
                        }
                        s[m][nt][e] = p0;
                        s[m][nt][2 + e] = p1;
                        dp[m][nt][e] = p0 * (dp[m][nt][e] - D);
                        dp[m][nt][2 + e] = p1 * (dp[m][nt][2 + e] - D);
                    }
                }
            }
            a3_mma_pv<HD, MT, NT>(dv, s, Os, lane);   // dV += P^T dO
            a3_mma_pv<HD, MT, NT>(dk, dp, Qs, lane);  // dK += dS^T Q
        }
        __syncthreads();
    }
    a3_dkv_store<HD, MT>(dqkv, part, sp, S, kw0, g, t, T, Hq, Hkv, dk, dv, freqs, amax);
}

// dK|dV columns of dqkv from the S parts of attn3_dkv: dqkv[r][Hq*Hd + c] = bf16(sum_s part[s][r][c]
// (* 1/sqrt(Hd) for the dK half)), s in order, with a3_store_grad's options (freqs: dK columns i and
// i + Hd/2 rotated back at position r % T; amax). A thread per 4 columns (block-stride; with freqs,
// 4 dK columns of a head's first half and their partners), a block per row (grid-stride).
// kv = Hkv * Hd (a multiple of 8).
LLMQ_DEV float4 a3_part_sum(const float* part, int S, int rows, int r, int w, int c) {
    float4 acc = *(const float4*)(part + (long long)r * w + c);
    for (int s = 1; s < S; s++) {
        const float4 v = *(const float4*)(part + ((long long)s * rows + r) * w + c);
        acc.x += v.x, acc.y += v.y, acc.z += v.z, acc.w += v.w;
    }
    return acc;
}
LLMQ_DEV unsigned a3_put4(uint16_t* dst, float a, float b, float c, float d) {
    const unsigned lo = bf16x2_bits(a, b), hi = bf16x2_bits(c, d);
    *(uint2*)dst = make_uint2(lo, hi);
    return max(bf16x2_abs_bits(lo), bf16x2_abs_bits(hi));
}
extern "C" __global__ void __launch_bounds__(128) llmq_attn3_dkv_reduce(uint16_t* dqkv, const float* part, int S, int rows, int kv,
                                                                         int Qw, int col0, float scale, int T, int Hd,
                                                                         const float* freqs, float* amax) {
    unsigned am = 0u;
    const int half = Hd / 2;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        uint16_t* drow = dqkv + (long long)r * Qw + col0;
        // with freqs, the dK half in units of 4 first-half columns; dV (and dK without freqs) as is
        const int c0 = freqs == nullptr ? 0 : kv;
        if (freqs != nullptr) {
            const float* f = freqs + (long long)(r % T) * Hd;
            for (int u = threadIdx.x * 4; u < kv / 2; u += blockDim.x * 4) {
                const int c = (u / half) * Hd + u % half, i = u % half;
                float4 x = a3_part_sum(part, S, rows, r, 2 * kv, c), y = a3_part_sum(part, S, rows, r, 2 * kv, c + half);
                x.x *= scale, x.y *= scale, x.z *= scale, x.w *= scale;
                y.x *= scale, y.y *= scale, y.z *= scale, y.w *= scale;
                const float4 cs0 = *(const float4*)(f + 2 * i), cs1 = *(const float4*)(f + 2 * i + 4);
                am = max(am, a3_put4(drow + c, x.x * cs0.x + y.x * cs0.y, x.y * cs0.z + y.y * cs0.w, x.z * cs1.x + y.z * cs1.y,
                                     x.w * cs1.z + y.w * cs1.w));
                am = max(am, a3_put4(drow + c + half, y.x * cs0.x - x.x * cs0.y, y.y * cs0.z - x.y * cs0.w, y.z * cs1.x - x.z * cs1.y,
                                     y.w * cs1.z - x.w * cs1.w));
            }
        }
        for (int c = c0 + threadIdx.x * 4; c < 2 * kv; c += blockDim.x * 4) {
            const float4 acc = a3_part_sum(part, S, rows, r, 2 * kv, c);
            const float f = c < kv ? scale : 1.0f;
            am = max(am, a3_put4(drow + c, acc.x * f, acc.y * f, acc.z * f, acc.w * f));
        }
    }
    warp_absmax_commit(amax, am);
}

// Instantiations: llmq_attn3_{fwd,dq,dkv}_<HD>. Keep in sync with the table in src/attention.rs
// (warps, m-tiles per warp, tile width; Q in registers and min blocks per SM are set here only).
#define A3_FWD(HD, NW, MT, BK, QREG, MINB)                                                                             \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                                              \
        llmq_attn3_fwd_##HD(uint16_t* out, float* lse, const uint16_t* qkv, int T, int Hq, int Hkv, float* amax) {   \
        attn3_fwd<HD, NW, MT, BK, QREG>(out, lse, qkv, T, Hq, Hkv, amax);                                                    \
    }
#define A3_DQ(HD, NW, MT, BK, QREG, MINB)                                                                              \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                                              \
        llmq_attn3_dq_##HD(uint16_t* dqkv, float* Dv, const uint16_t* dout, const uint16_t* out, const uint16_t* qkv, \
                                   const float* lse, int T, int Hq, int Hkv, const float* freqs, float* amax) {               \
        attn3_dq<HD, NW, MT, BK, QREG>(dqkv, Dv, dout, out, qkv, lse, T, Hq, Hkv, freqs, amax);                              \
    }
#define A3_DKV(HD, NW, MT, BQ, MINB)                                                                                   \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                                              \
        llmq_attn3_dkv_##HD(uint16_t* dqkv, float* part, int S, const uint16_t* dout, const uint16_t* qkv,          \
                                    const float* lse, const float* Dv, int T, int Hq, int Hkv, const float* freqs,           \
                                    float* amax) {                                                                           \
        attn3_dkv<HD, NW, MT, BQ>(dqkv, part, S, dout, qkv, lse, Dv, T, Hq, Hkv, freqs, amax);                               \
    }

// forward: (warps, m-tiles per warp, key tile, Q in registers, min blocks per SM)
A3_FWD(64, 4, 2, 64, true, 2)
A3_FWD(128, 4, 2, 32, false, 2)
// dQ: (warps, m-tiles per warp, key tile, Q/dO in registers, min blocks per SM)
A3_DQ(64, 4, 1, 64, true, 3)
A3_DQ(128, 4, 1, 64, false, 2)
// dK/dV: (warps, m-tiles per warp, query tile, min blocks per SM)
A3_DKV(64, 4, 1, 64, 2)
A3_DKV(128, 4, 1, 32, 2)
