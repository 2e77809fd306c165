// attention_wg.cu: attention with Hopper warpgroup MMAs (wgmma, sm_90a only).
//
// Instantiated for Hd 64 (the forward and dQ of compute capability 9.0; the dK/dV kernel and all
// of Hd 128 are the warp-specialised ones of attention_ws.cu, which share the pieces below).
// Same algorithms and contracts as the mma.sync kernels in attention.cu: the forward writes lse;
// the dQ kernel also writes D = rowsum(dO o O) for the dK/dV kernel. No atomics: deterministic.
// Structure: each warpgroup (128 threads; NWG = 1 or 2 per block) owns 64 query rows and
// computes every product with wgmma on shared-memory tiles in the swizzled ct layout of
// wgmma.cuh; P and dS stay in registers and feed the second products as A fragments; the
// warpgroups of a block share the tiles they loop over.
// Pipelining: ST shared-memory stages filled by cp.async, PD tiles fetched ahead, one barrier
// per iteration with the prefetch issued after it. With ST = 2 (PD = 1) each warp waits for its
// iteration's last wgmma before the next barrier, after which the prefetch refills the previous
// iteration's stage. With ST >= 3 that last product (P V or dQ) completes under the next
// iteration's first products (deferred wait), so the prefetch may only refill the stage of two
// iterations back (PD = ST - 2); a warpgroup that skips an iteration waits for its deferred
// product there.
// Pitfalls: all four warps of a warpgroup must execute every wgmma, so masking is per element
// and skipping is per warpgroup (attention.cu skips per warp). In the backward kernels P and dS go to
// arrays of their own, never back into the S / dP accumulators: writing into accumulator
// registers between wgmmas makes ptxas serialise every wgmma of the kernel (its advisory C7515,
// "non wgmma instructions defining accumulator registers"; build with -Xptxas -v to see it).
// Fixing that took the backward from 0.445 to 0.414 ms (Hd 64) and 0.698 to 0.645 ms (Hd 128)
// per layer at B16 T1024. The forward still writes P into S in place and is flagged: a version
// with P in an array of its own needs more registers and ran slower (Hd 64: 0.137 against
// 0.131 ms, Hd 128: 0.212 against 0.200 ms).
#include "common.cuh"
#include "wgmma.cuh"

// C[64][64] (f32, row-major) = A[64][64] (row-major, M x K) * B[64][64] (row-major, K x N)
// through one wgmma form: mode bit 0 = B MN-major (else K-major), bit 1 = A from registers
// (else from shared memory). The (LBO, SBO) pairs are arguments so that a test can tell which
// order the hardware wants.
extern "C" __global__ void __launch_bounds__(128) llmq_wg_selftest(float* c, const uint16_t* a, const uint16_t* b, int mode, int lbo_a, int sbo_a,
                                                                    int lbo_b, int sbo_b) {
#ifdef LLMQ_WGMMA
    __shared__ __align__(1024) uint16_t As[ct_elems(64, 64)], Bs[ct_elems(64, 64)];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
    const bool bmn = mode & 1, areg = mode & 2;
    for (int i = tid; i < 64 * 64; i += 128) {
        const int r = i / 64, col = i % 64;
        As[ct_off(64, r, col)] = a[i];
        if (bmn) Bs[ct_off(64, r, col)] = b[i];  // rows = k
        else Bs[ct_off(64, col, r)] = b[i];      // rows = n
    }
    wg_proxy_fence();
    __syncthreads();
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; i++) d[i] = 0.f;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        const unsigned long long db = wg_desc(bmn ? Bs + kk * 16 * 64 : Bs + kk * 16, lbo_b, sbo_b);
        if (areg) {
            const int ra = 16 * w + g, c0 = 16 * kk + 2 * t;
            const unsigned af[4] = {*(const unsigned*)(a + ra * 64 + c0), *(const unsigned*)(a + (ra + 8) * 64 + c0),
                                    *(const unsigned*)(a + ra * 64 + c0 + 8), *(const unsigned*)(a + (ra + 8) * 64 + c0 + 8)};
            if (bmn) wg_rs<64, 1>(d, af, db, 1);
            else wg_rs<64, 0>(d, af, db, 1);
        } else {
            const unsigned long long da = wg_desc(As + kk * 16, lbo_a, sbo_a);
            if (bmn) wg_ss<64, 1>(d, da, db, 1);
            else wg_ss<64, 0>(d, da, db, 1);
        }
    }
    wg_commit();
    wg_wait<0>();
    wg_keep(d);
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            c[(16 * w + g) * 64 + 8 * j + 2 * t + e] = d[4 * j + e];
            c[(16 * w + g + 8) * 64 + 8 * j + 2 * t + e] = d[4 * j + 2 + e];
        }
#else
    __trap();
#endif
}

#ifdef LLMQ_WGMMA
// Shared by the forward and dQ kernels, which loop over the key blocks of one query tile.
// The K and V tiles of key block kt into stage kt % ST where kt < nkt. Always commits a cp.async
// group (maybe empty), which keeps the wait counts uniform.
template <int HD, int BK, int NTH, int ST>
LLMQ_DEV void a4_load_kv(uint16_t* KV, const uint16_t* seq, long long Qw, int kt, int nkt, int T, int Hq, int Hkv, int kvh) {
    constexpr int KT = ct_elems(BK, HD);
    if (kt < nkt) {
        uint16_t* dst = KV + 2 * (kt % ST) * KT;
        wg_cp_rows<HD, BK, NTH>(dst, seq, Qw, kt * BK, T, (Hq + kvh) * HD);
        wg_cp_rows<HD, BK, NTH>(dst + KT, seq, Qw, kt * BK, T, (Hq + Hkv + kvh) * HD);
    }
    cp_async_commit();
}

// Waits for key block kt's stage (the PD - 1 younger cp.async groups may stay in flight), makes
// it visible to every warp's wgmma (async proxy) and returns its K tile (V follows at + KT).
template <int HD, int BK, int ST, int PD>
LLMQ_DEV const uint16_t* a4_kv_ready(const uint16_t* KV, int kt) {
    cp_async_wait<PD - 1>();
    wg_proxy_fence();
    __syncthreads();
    return KV + 2 * (kt % ST) * ct_elems(BK, HD);
}

// acc (64 x HD per warpgroup) += A Bs: A is the f32 64 x BK tile in p (P or dS), packed to bf16
// A fragments in registers; Bs is the ct [BK][HD] tile read MN-major (V, or K for dQ). Without
// DEFER the product is complete on return; with DEFER the caller's next wg_wait completes it.
template <int HD, int BK, bool DEFER, int NA, int NP>
LLMQ_DEV void a4_acc_rs(float (&acc)[NA], const float (&p)[NP], const uint16_t* Bs) {
    unsigned af[BK / 16][4];
#pragma unroll
    for (int c = 0; c < BK / 16; c++) wg_pack_a(af[c], p, c);
    wg_fence();
#pragma unroll
    for (int c = 0; c < BK / 16; c++) wg_rs<HD, 1>(acc, af[c], wg_desc_mn(Bs, BK, c), 1);
    wg_commit();
    if constexpr (!DEFER) {
        wg_wait<0>();
        wg_keep(acc);
    }
}

// ---- Pieces shared by the wgmma kernels here and the warp-specialised ones (attention_ws.cu),
// so that both do the same arithmetic in the same order (their outputs are bit-identical).

// Online-softmax state of this thread's two rows in the forward kernels.
struct A4Rows {
    float mx0 = -INFINITY, mx1 = -INFINITY, l0 = 0.f, l1 = 0.f;
};

// Key tile k0 (BK keys) of S (rows q0 = qw0 + g, q1 = q0 + 8; qw0 = the warp's first row): masks
// the keys after each query, updates the running maxima and returns the log2-domain offsets mu
// of the new maxima and the factors c that rescale the old sums and outputs.
template <int BK, int NS>
LLMQ_DEV void a4_fwd_max(float (&s)[NS], int k0, int qw0, int q0, int q1, int t, float sl2, A4Rows& r, float& mu0, float& mu1, float& c0,
                         float& c1) {
    if (k0 + BK - 1 > qw0) {  // diagonal tile: keys after the query are masked
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int key = k0 + nt * 8 + 2 * t + e;
                if (key > q0) s[4 * nt + e] = -INFINITY;
                if (key > q1) s[4 * nt + 2 + e] = -INFINITY;
            }
    }
    float n0 = r.mx0, n1 = r.mx1;
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++) {
        n0 = fmaxf(n0, fmaxf(s[4 * nt], s[4 * nt + 1]));
        n1 = fmaxf(n1, fmaxf(s[4 * nt + 2], s[4 * nt + 3]));
    }
    n0 = fmaxf(n0, __shfl_xor_sync(0xFFFFFFFFu, n0, 1));
    n0 = fmaxf(n0, __shfl_xor_sync(0xFFFFFFFFu, n0, 2));
    n1 = fmaxf(n1, __shfl_xor_sync(0xFFFFFFFFu, n1, 1));
    n1 = fmaxf(n1, __shfl_xor_sync(0xFFFFFFFFu, n1, 2));
    mu0 = n0 == -INFINITY ? 0.f : n0 * sl2;
    mu1 = n1 == -INFINITY ? 0.f : n1 * sl2;
    c0 = ex2_ftz(fmaf(r.mx0, sl2, -mu0));
    c1 = ex2_ftz(fmaf(r.mx1, sl2, -mu1));
    r.mx0 = n0;
    r.mx1 = n1;
}

// P = 2^(S sl2 - mu) for the eight scores of k-step cc (keys 16 cc .. 16 cc + 15) in the order of
// an A fragment (wg_pack_a), adding them to the row sums in key order.
template <int NS>
LLMQ_DEV void a4_fwd_p8(float (&p8)[8], const float (&s)[NS], int cc, float sl2, float mu0, float mu1, float& ls0, float& ls1) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int nt = 2 * cc + j;
        p8[4 * j] = ex2_ftz(fmaf(s[4 * nt], sl2, -mu0));
        p8[4 * j + 1] = ex2_ftz(fmaf(s[4 * nt + 1], sl2, -mu0));
        p8[4 * j + 2] = ex2_ftz(fmaf(s[4 * nt + 2], sl2, -mu1));
        p8[4 * j + 3] = ex2_ftz(fmaf(s[4 * nt + 3], sl2, -mu1));
        ls0 += p8[4 * j] + p8[4 * j + 1];
        ls1 += p8[4 * j + 2] + p8[4 * j + 3];
    }
}

// The sums and outputs rescaled to the new maxima, plus this tile's row sums.
template <int NO>
LLMQ_DEV void a4_fwd_rescale(float (&o)[NO], A4Rows& r, float c0, float c1, float ls0, float ls1) {
    r.l0 = fmaf(r.l0, c0, ls0);
    r.l1 = fmaf(r.l1, c1, ls1);
#pragma unroll
    for (int i = 0; i < NO / 4; i++) {
        o[4 * i] *= c0;
        o[4 * i + 1] *= c0;
        o[4 * i + 2] *= c1;
        o[4 * i + 3] *= c1;
    }
}

// Epilogue of the forward kernels: O / l in bf16 and lse of rows q0, q1 (those < T); with amax
// (f32 [1], zeroed by the host), the abs-max of the stored O (one atomic per warp).
template <int HD, int NO>
LLMQ_DEV void a4_fwd_store(uint16_t* out, float* lse, const float (&o)[NO], A4Rows r, float sl2, int q0, int q1, int t, int T, int Hq, int b,
                           int h, float* amax) {
    const long long ostride = (long long)Hq * HD;
    uint16_t* obase = out + (long long)b * T * ostride + (long long)h * HD;
    float* lrow = lse + ((long long)b * Hq + h) * T;
    r.l0 += __shfl_xor_sync(0xFFFFFFFFu, r.l0, 1);
    r.l0 += __shfl_xor_sync(0xFFFFFFFFu, r.l0, 2);
    r.l1 += __shfl_xor_sync(0xFFFFFFFFu, r.l1, 1);
    r.l1 += __shfl_xor_sync(0xFFFFFFFFu, r.l1, 2);
    const float inv0 = 1.0f / r.l0, inv1 = 1.0f / r.l1;
    unsigned am = 0u;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        const int c = i * 8 + 2 * t;
        if (q0 < T) am = max(am, a3_put2(obase + (long long)q0 * ostride + c, o[4 * i] * inv0, o[4 * i + 1] * inv0));
        if (q1 < T) am = max(am, a3_put2(obase + (long long)q1 * ostride + c, o[4 * i + 2] * inv1, o[4 * i + 3] * inv1));
    }
    if (t == 0) {
        if (q0 < T) lrow[q0] = (r.mx0 * sl2 + log2f(r.l0)) / LOG2E;
        if (q1 < T) lrow[q1] = (r.mx1 * sl2 + log2f(r.l1)) / LOG2E;
    }
    warp_absmax_commit(amax, am);
}

// dQ kernels: D = rowsum(dO o O) and L (log2 domain) of rows [lo, hi) of the query tile at qb0,
// shared by `nwarps` warps (this one: `warp`), one row per LPR = HD / 8 lanes (coalesced 16-byte
// chunks, partial dots added in a fixed butterfly order); D also into Dv for the dK/dV kernel.
// Rows past T: D = 0, L = inf.
template <int HD>
LLMQ_DEV void a4_dq_rowstats(float* Ls, float* Ds, float* Dv, const uint16_t* dout, const uint16_t* out, const float* lse, int lo, int hi,
                             int warp, int nwarps, int qb0, int T, int Hq, int b, int h) {
    constexpr int LPR = HD / 8, RPW = 32 / LPR;
    const int lane = threadIdx.x & 31, j = lane % LPR;
    const long long Ow = (long long)Hq * HD;
    for (int r = lo + warp * RPW + lane / LPR; r < hi; r += nwarps * RPW) {
        const int q = qb0 + r;
        float dsum = 0.f;
        if (q < T) {
            const long long off = ((long long)b * T + q) * Ow + (long long)h * HD;
            dsum = a3_dot8(((const uint4*)(dout + off))[j], ((const uint4*)(out + off))[j], 0.f);
        }
#pragma unroll
        for (int m = LPR / 2; m > 0; m >>= 1) dsum += __shfl_xor_sync(0xFFFFFFFFu, dsum, m);
        if (j == 0) {
            float L = INFINITY;
            if (q < T) {
                const long long li = ((long long)b * Hq + h) * T + q;
                Dv[li] = dsum;
                L = lse[li] * LOG2E;
            }
            Ls[r] = L;
            Ds[r] = dsum;
        }
    }
}

// dQ kernels: P of key tile k0 (BK keys) for rows q0, q1 into pd (keys after the query: 0).
template <int BK, int NS>
LLMQ_DEV void a4_dq_p(float (&pd)[NS], const float (&s)[NS], int k0, int q0, int q1, int t, float sl2, float L0, float L1, bool diag) {
#pragma unroll
    for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            float p0 = ex2_ftz(fmaf(s[4 * nt + e], sl2, -L0)), p1 = ex2_ftz(fmaf(s[4 * nt + 2 + e], sl2, -L1));
            if (diag) {
                const int key = k0 + nt * 8 + 2 * t + e;
                if (key > q0) p0 = 0.f;
                if (key > q1) p1 = 0.f;
            }
            pd[4 * nt + e] = p0;
            pd[4 * nt + 2 + e] = p1;
        }
}

// dQ kernels: dS = P o (dP - D) in place of P.
template <int NS>
LLMQ_DEV void a4_dq_ds(float (&pd)[NS], const float (&dp)[NS], float D0, float D1) {
#pragma unroll
    for (int nt = 0; nt < NS / 4; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            pd[4 * nt + e] *= dp[4 * nt + e] - D0;
            pd[4 * nt + 2 + e] *= dp[4 * nt + 2 + e] - D1;
        }
}

// dQ kernels' epilogue: dQ (scaled by 1/sqrt(Hd)) in bf16 into dqkv, rows from this warp's
// first row qw0 (those < T), with a3_store_grad's options (RoPE backward, abs-max).
template <int HD, int NO>
LLMQ_DEV void a4_dq_store(uint16_t* dqkv, const float (&dq)[NO], int qw0, int g, int t, int T, int Hq, int Hkv, int b, int h, const float* freqs,
                          float* amax) {
    const long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    a3_store_grad<HD, 1>(dqkv + (long long)b * T * Qw + (long long)h * HD, Qw, qw0, g, t, T, *reinterpret_cast<const float(*)[1][HD / 8][4]>(dq),
                         1.0f / sqrtf((float)HD), freqs, amax);
}

// dK/dV kernels: P^T of query tile q0 (BQ queries, lse in Lq) for this thread's keys kw0 + g and
// kw0 + g + 8 (keys after the query: 0).
template <int BQ, int NS>
LLMQ_DEV void a4_dkv_pt(float (&pt)[NS], const float (&s)[NS], const float* Lq, int q0, int kw0, int g, int t, float sl2, bool diag) {
#pragma unroll
    for (int nt = 0; nt < BQ / 8; nt++) {
        const int qc = nt * 8 + 2 * t;
        const float2 Lv = *(const float2*)(Lq + qc);
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const float L = (e ? Lv.y : Lv.x) * LOG2E;
            const int qi = q0 + qc + e;
            float p0 = ex2_ftz(fmaf(s[4 * nt + e], sl2, -L)), p1 = ex2_ftz(fmaf(s[4 * nt + 2 + e], sl2, -L));
            if (diag) {
                if (kw0 + g > qi) p0 = 0.f;
                if (kw0 + g + 8 > qi) p1 = 0.f;
            }
            pt[4 * nt + e] = p0;
            pt[4 * nt + 2 + e] = p1;
        }
    }
}

// dK/dV kernels: dS^T = P^T o (dP^T - D) (D of the tile's queries in Dq), packed with P^T into
// the A fragments of the dK and dV products 16 queries at a time, so that P^T, dP^T and dS^T die
// chunk by chunk (as whole arrays they spilled Hd 128 at 240 registers).
template <int NS, int NC>
LLMQ_DEV void a4_dkv_pack(unsigned (&pa)[NC][4], unsigned (&sa)[NC][4], const float (&pt)[NS], const float (&dpt)[NS], const float* Dq, int t) {
#pragma unroll
    for (int cc = 0; cc < NC; cc++) {
        float p8[8], d8[8];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int nt = 2 * cc + j;
            const float2 Dw = *(const float2*)(Dq + nt * 8 + 2 * t);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float D = (k & 1) ? Dw.y : Dw.x;
                p8[4 * j + k] = pt[4 * nt + k];
                d8[4 * j + k] = pt[4 * nt + k] * (dpt[4 * nt + k] - D);
            }
        }
        wg_pack_a(pa[cc], p8, 0);
        wg_pack_a(sa[cc], d8, 0);
    }
}

// dQ (and D). Block: NWG warpgroups x 64 query rows of one head (BQ); grid (ceil(T/BQ), Hq, B),
// late (heavy) tiles first; the K/V tiles are shared by the warpgroups. ST stages of K/V tiles
// in flight. dyn smem (from a 1024-byte boundary): Q, dO ct [BQ][HD] + ST x (K, V) ct [BK][HD] (bf16) + L,
// D [BQ] (f32).
template <int HD, int BK, int NWG, int ST>
LLMQ_DEV void attn4_dq(uint16_t* dqkv, float* Dv, const uint16_t* dout, const uint16_t* out, const uint16_t* qkv, const float* lse, int T,
                       int Hq, int Hkv, const float* freqs, float* amax) {
    constexpr int BQ = 64 * NWG, NTH = 128 * NWG, NS = BK / 2, NO = HD / 2;
    static_assert(ST >= 2, "at least two stages");
    constexpr bool DEFER = ST >= 3;
    constexpr int PD = DEFER ? ST - 2 : ST - 1;
    constexpr int QT = ct_elems(BQ, HD), KT = ct_elems(BK, HD);
    uint16_t* Qs = ct_align(llmq_dyn_smem);
    uint16_t* Os = Qs + QT;
    uint16_t* KV = Os + QT;  // [stage][K | V][KT]
    float* Ls = (float*)(KV + 2 * ST * KT);
    float* Ds = Ls + BQ;
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, wg = threadIdx.x >> 7, g = lane >> 2, t = lane & 3;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (Hq / Hkv);
    const long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    const long long Ow = (long long)Hq * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    const uint16_t* dseq = dout + (long long)b * T * Ow;
    const int qb0 = qt * BQ;
    const int nkt = (min(T, qb0 + BQ) - 1) / BK + 1;
    wg_cp_rows<HD, BQ, NTH>(Qs, seq, Qw, qb0, T, h * HD);
    wg_cp_rows<HD, BQ, NTH>(Os, dseq, Ow, qb0, T, h * HD);
    auto load_kv = [&](int kt) { a4_load_kv<HD, BK, NTH, ST>(KV, seq, Qw, kt, nkt, T, Hq, Hkv, kvh); };
#pragma unroll
    for (int i = 0; i < PD; i++) load_kv(i);  // the Q/dO copies join the first group
    // D and L of the block's rows while the copies run
    a4_dq_rowstats<HD>(Ls, Ds, Dv, dout, out, lse, 0, BQ, threadIdx.x >> 5, NTH / 32, qb0, T, Hq, b, h);
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int ra = 64 * wg + 16 * w + g;  // this thread's rows: ra, ra + 8
    const int q0 = qb0 + ra, q1 = q0 + 8;
    const int wq_last = qb0 + 64 * wg + 63;  // the warpgroup's last query
    float dq[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) dq[i] = 0.f;
    for (int kt = 0; kt < nkt; kt++) {
        const uint16_t* Ks = a4_kv_ready<HD, BK, ST, PD>(KV, kt);
        const uint16_t* Vs = Ks + KT;
        const int k0 = kt * BK;
        const bool active = k0 <= wq_last;  // warpgroup-uniform: all four warps issue or skip together
        float s[NS], dp[NS];
        if (active) {
            wg_fence();
            wg_gemm_kmajor<HD, BK>(s, Qs, BQ, 64 * wg, Ks);
            wg_gemm_kmajor<HD, BK>(dp, Os, BQ, 64 * wg, Vs);
        }
        load_kv(kt + PD);  // into a stage every warp has finished with (see PD)
        if (!active) {
            wg_wait<0>();
            continue;
        }
        const float L0 = Ls[ra], L1 = Ls[ra + 8], D0 = Ds[ra], D1 = Ds[ra + 8];
        wg_wait<1>();
        wg_keep(s);
        const bool diag = k0 + BK - 1 > qb0 + 64 * wg + 16 * w;
        float pd[NS];  // P, then dS (not in s: see the pitfalls above)
        a4_dq_p<BK>(pd, s, k0, q0, q1, t, sl2, L0, L1, diag);
        wg_wait<0>();
        wg_keep(dp);
        a4_dq_ds(pd, dp, D0, D1);
        a4_acc_rs<HD, BK, DEFER>(dq, pd, Ks);  // dQ += dS K (deferred: completes under the next S and dP, wg_wait<1> there)
    }
    wg_wait<0>();
    wg_keep(dq);
    cp_async_wait<0>();
    a4_dq_store<HD>(dqkv, dq, qb0 + 64 * wg + 16 * w, g, t, T, Hq, Hkv, b, h, freqs, amax);
}

// Forward (online softmax, as attn3_fwd). Block: NWG warpgroups x 64 query rows of one head;
// grid (ceil(T/BQ), Hq, B), late (heavy) tiles first; K/V tiles shared by the warpgroups, ST
// stages in flight. dyn smem (from a 1024-byte boundary): Q ct [BQ][HD] + ST x (K, V) ct
// [BK][HD]. The P V product of iteration kt completes under the next S = Q K^T (wg_wait<0>
// there, before O is rescaled).
template <int HD, int BK, int NWG, int ST>
LLMQ_DEV void attn4_fwd(uint16_t* out, float* lse, const uint16_t* qkv, int T, int Hq, int Hkv, float* amax) {
    constexpr int BQ = 64 * NWG, NTH = 128 * NWG, NS = BK / 2, NO = HD / 2;
    static_assert(ST >= 2, "at least two stages");
    constexpr bool DEFER = ST >= 3;
    constexpr int PD = DEFER ? ST - 2 : ST - 1;
    constexpr int QT = ct_elems(BQ, HD), KT = ct_elems(BK, HD);
    uint16_t* Qs = ct_align(llmq_dyn_smem);
    uint16_t* KV = Qs + QT;  // [stage][K | V][KT]
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, wg = threadIdx.x >> 7, g = lane >> 2, t = lane & 3;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (Hq / Hkv);
    const long long Qw = (long long)(Hq + 2 * Hkv) * HD;
    const uint16_t* seq = qkv + (long long)b * T * Qw;
    const int qb0 = qt * BQ;
    const int nkt = (min(T, qb0 + BQ) - 1) / BK + 1;
    wg_cp_rows<HD, BQ, NTH>(Qs, seq, Qw, qb0, T, h * HD);
    auto load_kv = [&](int kt) { a4_load_kv<HD, BK, NTH, ST>(KV, seq, Qw, kt, nkt, T, Hq, Hkv, kvh); };
#pragma unroll
    for (int i = 0; i < PD; i++) load_kv(i);
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int qw0 = qb0 + 64 * wg + 16 * w;  // this warp's rows; this thread's: qw0 + g, qw0 + g + 8
    const int q0 = qw0 + g, q1 = q0 + 8;
    const int wq_last = qb0 + 64 * wg + 63;
    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.f;
    A4Rows rows;
    for (int kt = 0; kt < nkt; kt++) {
        const uint16_t* Ks = a4_kv_ready<HD, BK, ST, PD>(KV, kt);
        const uint16_t* Vs = Ks + KT;
        const int k0 = kt * BK;
        const bool active = k0 <= wq_last;
        float s[NS];
        if (active) {
            wg_fence();
            wg_gemm_kmajor<HD, BK>(s, Qs, BQ, 64 * wg, Ks);
        }
        load_kv(kt + PD);
        if (!active) {
            wg_wait<0>();
            continue;
        }
        wg_wait<0>();
        wg_keep(s);
        wg_keep(o);
        float mu0, mu1, c0, c1, ls0 = 0.f, ls1 = 0.f;
        a4_fwd_max<BK>(s, k0, qw0, q0, q1, t, sl2, rows, mu0, mu1, c0, c1);
#pragma unroll
        for (int cc = 0; cc < BK / 16; cc++) {  // P into S in place (see the header)
            float p8[8];
            a4_fwd_p8(p8, s, cc, sl2, mu0, mu1, ls0, ls1);
#pragma unroll
            for (int k = 0; k < 8; k++) s[8 * cc + k] = p8[k];
        }
        a4_fwd_rescale(o, rows, c0, c1, ls0, ls1);
        a4_acc_rs<HD, BK, DEFER>(o, s, Vs);  // O += P V
    }
    wg_wait<0>();
    wg_keep(o);
    cp_async_wait<0>();
    a4_fwd_store<HD>(out, lse, o, rows, sl2, q0, q1, t, T, Hq, b, h, amax);
}

#define A4_BODY(call) call
#else
#define A4_BODY(call) __trap()
#endif

// Instantiations: llmq_attn4_{fwd,dq}_64, the Hd 64 forward and dQ of compute capability 9.0
// (Hd 128 and every dK/dV run the warp-specialised kernels of attention_ws.cu). Keep in sync with
// the table in src/attention_wg.rs (keys per tile, warpgroups, stages).
#define A4_FWD(HD, BK, NWG, ST, MINB)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB)                                                          \
        llmq_attn4_fwd_##HD(uint16_t* out, float* lse, const uint16_t* qkv, int T, int Hq, int Hkv, float* amax) {           \
        A4_BODY((attn4_fwd<HD, BK, NWG, ST>(out, lse, qkv, T, Hq, Hkv, amax)));                                              \
    }
#define A4_DQ(HD, BK, NWG, ST, MINB)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MINB)                                                          \
        llmq_attn4_dq_##HD(uint16_t* dqkv, float* Dv, const uint16_t* dout, const uint16_t* out, const uint16_t* qkv,         \
                           const float* lse, int T, int Hq, int Hkv, const float* freqs, float* amax) {                     \
        A4_BODY((attn4_dq<HD, BK, NWG, ST>(dqkv, Dv, dout, out, qkv, lse, T, Hq, Hkv, freqs, amax)));                        \
    }

// (keys per tile, warpgroups, stages, min blocks per SM)
A4_FWD(64, 64, 2, 3, 2)
A4_DQ(64, 64, 1, 2, 3)
