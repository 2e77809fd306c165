// attention_v3.cu: tensor-core attention, version 3 (attention.cuh has the layout and what the
// versions share).
#include "attention.cuh"

// ------------------------------------------------------------------------------------------
// tensor-core implementation, version 3 (bf16, Hd 64 or 128): configurable tiles.
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
// The kernels are instantiated for the configurations listed at the end of this file; the Rust
// table in src/attention.rs mirrors that list (index, warps, m-tiles, tile widths).
// ------------------------------------------------------------------------------------------

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

// Instantiations: llmq_attn3_{fwd,dq,dkv}_<HD>_<index>. Keep in sync with the tables in
// src/attention.rs (same index: warps, m-tiles per warp, tile width, Q in registers).
#define A3_FWD(HD, IDX, NW, MT, BK, QREG, MINB)                                                                             \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                                              \
        llmq_attn3_fwd_##HD##_##IDX(uint16_t* out, float* lse, const uint16_t* qkv, int T, int Hq, int Hkv, float* amax) {   \
        attn3_fwd<HD, NW, MT, BK, QREG>(out, lse, qkv, T, Hq, Hkv, amax);                                                    \
    }
#define A3_DQ(HD, IDX, NW, MT, BK, QREG, MINB)                                                                              \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                                              \
        llmq_attn3_dq_##HD##_##IDX(uint16_t* dqkv, float* Dv, const uint16_t* dout, const uint16_t* out, const uint16_t* qkv, \
                                   const float* lse, int T, int Hq, int Hkv, const float* freqs, float* amax) {               \
        attn3_dq<HD, NW, MT, BK, QREG>(dqkv, Dv, dout, out, qkv, lse, T, Hq, Hkv, freqs, amax);                              \
    }
#define A3_DKV(HD, IDX, NW, MT, BQ, MINB)                                                                                   \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB)                                                              \
        llmq_attn3_dkv_##HD##_##IDX(uint16_t* dqkv, float* part, int S, const uint16_t* dout, const uint16_t* qkv,          \
                                    const float* lse, const float* Dv, int T, int Hq, int Hkv, const float* freqs,           \
                                    float* amax) {                                                                           \
        attn3_dkv<HD, NW, MT, BQ>(dqkv, part, S, dout, qkv, lse, Dv, T, Hq, Hkv, freqs, amax);                               \
    }

// forward: (warps, m-tiles per warp, key tile, Q in registers, min blocks per SM)
A3_FWD(64, 0, 4, 2, 64, true, 2)
A3_FWD(64, 1, 4, 1, 64, true, 3)
A3_FWD(64, 2, 8, 1, 64, true, 2)
A3_FWD(64, 3, 4, 2, 32, true, 3)
A3_FWD(128, 0, 4, 2, 32, false, 2)
A3_FWD(128, 1, 4, 1, 64, true, 3)
A3_FWD(128, 2, 8, 1, 64, false, 2)
A3_FWD(128, 3, 4, 1, 64, false, 3)
// dQ: (warps, m-tiles per warp, key tile, Q/dO in registers, min blocks per SM)
A3_DQ(64, 0, 4, 2, 32, false, 2)
A3_DQ(64, 1, 4, 1, 64, true, 3)
A3_DQ(64, 2, 8, 1, 64, false, 2)
A3_DQ(64, 3, 4, 1, 64, true, 2)
A3_DQ(128, 0, 4, 2, 16, false, 2)
A3_DQ(128, 1, 4, 1, 64, false, 2)
A3_DQ(128, 2, 8, 1, 32, false, 2)
A3_DQ(128, 3, 4, 1, 32, false, 3)
// dK/dV: (warps, m-tiles per warp, query tile, min blocks per SM)
A3_DKV(64, 0, 2, 2, 32, 4)
A3_DKV(64, 1, 4, 1, 64, 2)
A3_DKV(64, 2, 4, 2, 32, 2)
A3_DKV(64, 3, 4, 1, 32, 3)
A3_DKV(128, 0, 4, 1, 32, 2)
A3_DKV(128, 1, 2, 1, 32, 4)
A3_DKV(128, 2, 8, 1, 32, 1)
A3_DKV(128, 3, 4, 1, 16, 3)
