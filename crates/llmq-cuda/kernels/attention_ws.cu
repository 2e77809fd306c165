// attention_ws.cu: warp-specialised causal GQA attention forward for Hopper (sm_90a only),
// FlashAttention-3's structure.
//
// Same contract and arithmetic as attn4_fwd in attention_wg.cu, the Hd 64 forward (out in bf16,
// lse; online softmax in the log2 domain, P rounded to bf16 for the P V product).
// Block: 384 threads = one producer warpgroup + two consumer warpgroups, 128 query rows of one
// head (64 per consumer); grid (ceil(T/128), Hq, B), late (heavy) query tiles first.
// Producer: its first thread loads the Q tile once and the K and V tiles of each key block into
// ST shared-memory stages with TMA (tensor maps over qkv viewed as [B][T][W], so rows past T
// arrive as zeros), each stage announced by its "full" mbarrier; it refills a stage after its
// "empty" mbarrier has seen all eight consumer warps. setmaxnreg hands registers from the
// producer (40 per thread) to the consumers (232).
// Consumers: per key block, S = Q K^T (wgmma, operands in shared memory), masked online softmax
// with P packed to bf16 A fragments in registers of their own, O rescaled, O += P V. The two
// consumers take turns issuing their products (named barriers 1 and 2): while one warpgroup's
// GEMM runs on the tensor cores, the other computes its softmax. In attn4_fwd one block-wide
// barrier per key block kept both warpgroups in step, so both ran their softmax at the same time
// and the tensor pipe idled (Nsight Compute: ~30% busy, no eligible warp in 63% of cycles).
// The dK/dV and dQ kernels (attn5_dkv, attn5_dq, further down) are built the same way.
// Pitfalls: every named-barrier sync must meet exactly one arrival of the other warpgroup (the
// second consumer makes the first arrival up front and skips its last one); a consumer that has
// nothing to do for a key block (all its keys masked) still takes its turns and releases the
// stage; setmaxnreg needs the block launched at 168 registers per thread (__launch_bounds__(384,
// 1)) and 128 x 40 + 256 x 232 <= 65536.
#include "common.cuh"
#include "wgmma.cuh"
#include "pipeline.cuh"

#ifdef LLMQ_WGMMA
constexpr int WS_PRODUCER_REGS = 40, WS_CONSUMER_REGS = 232;
// the dK/dV kernel's consumers hold dK and dV (Hd floats per thread) besides S^T, dP^T and P^T:
// at 232 registers Hd 128 spilled (and ptxas serialised its wgmmas, C7512)
constexpr int WS_DKV_PRODUCER_REGS = 24, WS_DKV_CONSUMER_REGS = 240;

// One ct tile (R rows x HD columns, kernels/wgmma.cuh) of head column `col` from rows [row, row
// + R) of sequence b: HD / 64 TMA boxes of R rows x 64 columns (128-byte swizzle = the ct layout).
template <int HD, int R>
LLMQ_DEV void ws_load_tile(uint16_t* dst, const TmaDesc* map, int col, int row, int b, unsigned long long* bar) {
#pragma unroll
    for (int c = 0; c < HD / 64; c++) tma_load_3d(dst + c * R * 64, map, col + 64 * c, row, b, bar);
}

// The mbarriers of a block, at `p` (8-byte aligned): `once` for the tiles loaded once (one TMA
// arrival), ST "full" barriers (full_count arrivals each) and ST "empty" ones (one arrival per
// consumer warp). init: thread 0 initialises them, then the block barrier makes them visible.
template <int ST>
struct WsBars {
    unsigned long long *once, *full, *empty;
    LLMQ_DEV explicit WsBars(void* p) : once((unsigned long long*)p), full(once + 1), empty(once + 1 + ST) {}
    LLMQ_DEV void init(unsigned full_count) const {
        if (threadIdx.x == 0) {
            mbar_init(once, 1);
            for (int s = 0; s < ST; s++) {
                mbar_init(full + s, full_count);
                mbar_init(empty + s, 8);
            }
            asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        }
        __syncthreads();
    }
};

// The producer warpgroup gives up registers; true for its first `n` threads, which go on to load
// (the others return).
template <int REGS>
LLMQ_DEV bool ws_producer(int n) {
    regs_dec<REGS>();
    return threadIdx.x < n;
}

// Producer loop of the kernels that stream key blocks (forward, dQ): the K and V tiles of key
// block kt into stage kt % ST, after the consumers have released that stage.
template <int HD, int BK, int ST>
LLMQ_DEV void ws_produce_kv(uint16_t* KV, const TmaDesc* map, unsigned long long* full, unsigned long long* empty, int nkt, int Hq, int Hkv,
                            int kvh, int b) {
    constexpr int KT = ct_elems(BK, HD);
    for (int kt = 0; kt < nkt; kt++) {
        const int st = kt % ST;
        if (kt >= ST) mbar_wait(empty + st, (kt / ST - 1) & 1);
        mbar_expect_tx(full + st, 2 * KT * 2);
        uint16_t* Ks = KV + 2 * st * KT;
        ws_load_tile<HD, BK>(Ks, map, (Hq + kvh) * HD, kt * BK, b, full + st);
        ws_load_tile<HD, BK>(Ks + KT, map, (Hq + Hkv + kvh) * HD, kt * BK, b, full + st);
    }
}

// The warpgroup index, through a shuffle so that ptxas knows it is warp-uniform (else it treats
// the consumer path as divergent and serialises every wgmma: advisory C7518).
LLMQ_DEV int ws_warpgroup() { return __shfl_sync(0xFFFFFFFFu, (int)(threadIdx.x >> 7), 0); }

// Coordinates of a block that owns query tile qt (BQ rows) of head h in sequence b and streams
// the nkt key blocks (BK keys) up to its last row; late (heavy) tiles first.
struct WsQTile {
    int qt, h, b, kvh, qb0, nkt;
};
template <int BQ, int BK>
LLMQ_DEV WsQTile ws_qtile(int T, int Hq, int Hkv) {
    WsQTile q;
    q.qt = gridDim.x - 1 - blockIdx.x;
    q.h = blockIdx.y;
    q.b = blockIdx.z;
    q.kvh = q.h / (Hq / Hkv);
    q.qb0 = q.qt * BQ;
    q.nkt = (min(T, q.qb0 + BQ) - 1) / BK + 1;
    return q;
}

// Consumer side of a stage: this warp's arrival on its "empty" barrier.
LLMQ_DEV void ws_release(unsigned long long* empty) {
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(empty);
}

template <int HD, int BK, int ST>
LLMQ_DEV void attn5_fwd(const TmaDesc* mq, const TmaDesc* mkv, uint16_t* out, float* lse, int T, int Hq, int Hkv, float* amax) {
    constexpr int BQ = 128, NS = BK / 2, NO = HD / 2, NC = BK / 16;
    constexpr int QT = ct_elems(BQ, HD), KT = ct_elems(BK, HD);
    uint16_t* Qs = ct_align(llmq_dyn_smem);
    uint16_t* KV = Qs + QT;  // [stage][K | V][KT]
    const WsBars<ST> bar(KV + 2 * ST * KT);
    unsigned long long *qfull = bar.once, *full = bar.full, *empty = bar.empty;
    const int wg = ws_warpgroup();
    const auto [qt, h, b, kvh, qb0, nkt] = ws_qtile<BQ, BK>(T, Hq, Hkv);
    bar.init(1);
    if (wg == 0) {
        if (!ws_producer<WS_PRODUCER_REGS>(1)) return;
        tma_prefetch_desc(mq);
        tma_prefetch_desc(mkv);
        mbar_expect_tx(qfull, QT * 2);
        ws_load_tile<HD, BQ>(Qs, mq, h * HD, qb0, b, qfull);
        ws_produce_kv<HD, BK, ST>(KV, mkv, full, empty, nkt, Hq, Hkv, kvh, b);
        return;
    }
    regs_inc<WS_CONSUMER_REGS>();
    const int c = wg - 1;  // consumer index: query rows 64 c .. 64 c + 63 of the tile
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, g = lane >> 2, t = lane & 3;
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int qw0 = qb0 + 64 * c + 16 * w;  // this warp's rows; this thread's: qw0 + g, qw0 + g + 8
    const int q0 = qw0 + g, q1 = q0 + 8;
    const int wq_last = qb0 + 64 * c + 63;
    const int my_turn = 1 + c, their_turn = 2 - c;
    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.f;
    A4Rows rows;
    mbar_wait(qfull, 0);
    if (c == 1) named_arrive(1, 256);  // the first consumer issues first
    for (int kt = 0; kt < nkt; kt++) {
        const int st = kt % ST;
        const uint16_t* Ks = KV + 2 * st * KT;
        const uint16_t* Vs = Ks + KT;
        const int k0 = kt * BK;
        const bool active = k0 <= wq_last;  // warpgroup-uniform
        mbar_wait(full + st, (kt / ST) & 1);
        float s[NS];
        named_sync(my_turn, 256);
        if (active) {
            wg_fence();
            wg_gemm_kmajor<HD, BK>(s, Qs, BQ, 64 * c, Ks);
        }
        named_arrive(their_turn, 256);
        unsigned pa[NC][4];
        wg_wait<0>();  // outside the branch: ptxas must see every GEMM result waited for
        if (active) {
            wg_keep(s);
            float mu0, mu1, c0, c1, ls0 = 0.f, ls1 = 0.f;
            a4_fwd_max<BK>(s, k0, qw0, q0, q1, t, sl2, rows, mu0, mu1, c0, c1);
#pragma unroll
            for (int cc = 0; cc < NC; cc++) {  // P in A fragments of its own (not in s: C7515)
                float p8[8];
                a4_fwd_p8(p8, s, cc, sl2, mu0, mu1, ls0, ls1);
                wg_pack_a(pa[cc], p8, 0);
            }
            a4_fwd_rescale(o, rows, c0, c1, ls0, ls1);
        }
        named_sync(my_turn, 256);
        if (active) {
            wg_fence();
#pragma unroll
            for (int cc = 0; cc < NC; cc++) wg_rs<HD, 1>(o, pa[cc], wg_desc_mn(Vs, BK, cc), 1);  // O += P V
            wg_commit();
        }
        if (c == 0 || kt + 1 < nkt) named_arrive(their_turn, 256);
        wg_wait<0>();
        wg_keep(o);
        if (active) wg_keep_frags(pa);
        ws_release(empty + st);
    }
    a4_fwd_store<HD>(out, lse, o, rows, sl2, q0, q1, t, T, Hq, b, h, amax);
}

// dK, dV: the iteration space, parts and epilogue of attn3_dkv (A3DkvSpace, a3_dkv_store) with
// wgmma products, a producer warp and turn-taking consumers as in attn5_fwd. Block: 384 threads; the two consumers own 64 keys each
// (128 per block, BKV); grid (ceil(T/BKV) * S, Hkv, B). The producer warp loads the block's K and
// V once, then per iteration the Q and dO tiles (TMA) and the lse and D rows (plain loads by its
// 32 lanes, zero past T, each lane one of the 32 arrivals on the stage's "full" barrier).
// dyn smem (from a 1024-byte boundary): K, V ct [BKV][HD] + ST x (Q, dO) ct [64][HD] + ST x
// (lse, D) [64] f32 + mbarriers. Needs D from the dQ kernel.
template <int HD, int ST>
LLMQ_DEV void attn5_dkv(const TmaDesc* mqkv, const TmaDesc* mdo, uint16_t* dqkv, float* part, int S, const float* lse, const float* Dv, int T,
                        int Hq, int Hkv, const float* freqs, float* amax) {
    constexpr int BQ = 64, BKV = 128, NS = BQ / 2, NO = HD / 2, NC = BQ / 16;
    constexpr int KT = ct_elems(BKV, HD), QT = ct_elems(BQ, HD);
    uint16_t* Ks = ct_align(llmq_dyn_smem);
    uint16_t* Vs = Ks + KT;
    uint16_t* QO = Vs + KT;                  // [stage][Q | dO][QT]
    float* LD = (float*)(QO + 2 * ST * QT);  // [stage][L | D][BQ]
    const WsBars<ST> bar(LD + 2 * ST * BQ);
    unsigned long long *kvfull = bar.once, *full = bar.full, *empty = bar.empty;
    const int wg = ws_warpgroup();
    const int lane = threadIdx.x & 31;
    const A3DkvSpace sp(BKV, BQ, S, T, Hq, Hkv);
    const int kb = sp.kb, kvh = sp.kvh, b = blockIdx.z, lo = sp.lo, hi = sp.hi;
    bar.init(32);
    if (wg == 0) {  // producer: warp 0
        if (!ws_producer<WS_DKV_PRODUCER_REGS>(32)) return;
        if (lane == 0) {
            tma_prefetch_desc(mqkv);
            tma_prefetch_desc(mdo);
            mbar_expect_tx(kvfull, 2 * KT * 2);
#pragma unroll
            for (int c = 0; c < HD / 64; c++)
#pragma unroll
                for (int r = 0; r < BKV / 64; r++) {
                    tma_load_3d(Ks + c * BKV * 64 + r * 64 * 64, mqkv, (Hq + kvh) * HD + 64 * c, kb * BKV + 64 * r, b, kvfull);
                    tma_load_3d(Vs + c * BKV * 64 + r * 64 * 64, mqkv, (Hq + Hkv + kvh) * HD + 64 * c, kb * BKV + 64 * r, b, kvfull);
                }
        }
        for (int it = lo; it < hi; it++) {
            const int st = (it - lo) % ST, n = (it - lo) / ST;
            if (n > 0) mbar_wait(empty + st, (n - 1) & 1);
            const int h = sp.head(it), qt = sp.qtile(it);
            // rows past T get L = D = 0: their Q and dO rows arrive as zeros, so P = 1 meets dP =
            // D = 0 and dO = 0 and contributes exactly nothing
            const float* lrow = lse + ((long long)b * Hq + h) * T;
            const float* drow = Dv + ((long long)b * Hq + h) * T;
            float* ld = LD + st * 2 * BQ;
            for (int i = lane; i < BQ; i += 32) {
                const int q = qt * BQ + i;
                ld[i] = q < T ? lrow[q] : 0.f;
                ld[BQ + i] = q < T ? drow[q] : 0.f;
            }
            __syncwarp();
            if (lane == 0) {
                mbar_expect_tx(full + st, 2 * QT * 2);
                ws_load_tile<HD, BQ>(QO + (2 * st) * QT, mqkv, h * HD, qt * BQ, b, full + st);
                ws_load_tile<HD, BQ>(QO + (2 * st + 1) * QT, mdo, h * HD, qt * BQ, b, full + st);
            } else {
                mbar_arrive(full + st);
            }
        }
        return;
    }
    regs_inc<WS_DKV_CONSUMER_REGS>();
    const int c = wg - 1;
    const int w = (threadIdx.x >> 5) & 3, g = lane >> 2, t = lane & 3;
    const int my_turn = 1 + c, their_turn = 2 - c;
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int kwg0 = kb * BKV + 64 * c;  // the warpgroup's first key
    const int kw0 = kwg0 + 16 * w;       // this warp's keys; this thread's: kw0 + g, kw0 + g + 8
    float dk[NO], dv[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) dk[i] = dv[i] = 0.f;
    mbar_wait(kvfull, 0);
    if (c == 1 && hi > lo) named_arrive(1, 256);  // the first consumer issues first
    for (int it = lo; it < hi; it++) {
        const int st = (it - lo) % ST;
        const int q0 = sp.qtile(it) * BQ;
        const uint16_t* Qs = QO + (2 * st) * QT;
        const uint16_t* Os = Qs + QT;
        const float* Lq = LD + st * 2 * BQ;
        const float* Dq = Lq + BQ;
        const bool active = q0 + BQ - 1 >= kwg0;  // warpgroup-uniform
        mbar_wait(full + st, ((it - lo) / ST) & 1);
        // Hd 128: three turns per iteration: S^T; dP^T; dV and dK. Issuing dP^T only after P^T
        // is computed keeps S^T, dP^T and P^T from being live at once, and dP^T reuses S^T's
        // accumulator array (as separate arrays ptxas kept both allocated: Hd 128 spilled at 240
        // registers and its wgmmas were serialised, C7512); the other warpgroup's products fill
        // the tensor pipe meanwhile. Hd 64 has the registers to issue S^T and dP^T together
        // (JOINT: two turns).
        constexpr bool JOINT = HD <= 64;
        float s[NS], dp[NS];  // S^T (then dP^T unless JOINT), dP^T (JOINT)
        named_sync(my_turn, 256);
        if (active) {
            wg_fence();
            wg_gemm_kmajor<HD, BQ>(s, Ks, BKV, 64 * c, Qs);  // S^T = K Q^T
            if constexpr (JOINT) {
                wg_gemm_kmajor<HD, BQ>(dp, Vs, BKV, 64 * c, Os);  // dP^T = V dO^T
            }
        }
        named_arrive(their_turn, 256);
        const bool diag = q0 < kw0 + 15;
        float pt[NS];  // P^T (not in s: C7515)
        wg_wait<JOINT ? 1 : 0>();
        if (active) {
            wg_keep(s);
            a4_dkv_pt<BQ>(pt, s, Lq, q0, kw0, g, t, sl2, diag);
        }
        if constexpr (!JOINT) {
            named_sync(my_turn, 256);
            if (active) {
                wg_fence();
                wg_gemm_kmajor<HD, BQ>(s, Vs, BKV, 64 * c, Os);  // dP^T = V dO^T
            }
            named_arrive(their_turn, 256);
        }
        wg_wait<0>();
        unsigned pa[NC][4], sa[NC][4];
        if (active) {
            if constexpr (JOINT) {
                wg_keep(dp);
                a4_dkv_pack(pa, sa, pt, dp, Dq, t);
            } else {
                wg_keep(s);
                a4_dkv_pack(pa, sa, pt, s, Dq, t);
            }
        }
        named_sync(my_turn, 256);
        if (active) {
            wg_fence();
#pragma unroll
            for (int cc = 0; cc < NC; cc++) wg_rs<HD, 1>(dv, pa[cc], wg_desc_mn(Os, BQ, cc), 1);  // dV += P^T dO
#pragma unroll
            for (int cc = 0; cc < NC; cc++) wg_rs<HD, 1>(dk, sa[cc], wg_desc_mn(Qs, BQ, cc), 1);  // dK += dS^T Q
            wg_commit();
        }
        if (c == 0 || it + 1 < hi) named_arrive(their_turn, 256);
        wg_wait<0>();
        wg_keep(dv);
        wg_keep(dk);
        if (active) {
            wg_keep_frags(pa);
            wg_keep_frags(sa);
        }
        ws_release(empty + st);
    }
    a3_dkv_store<HD, 1>(dqkv, part, sp, S, kw0, g, t, T, Hq, Hkv, *reinterpret_cast<const float(*)[1][HD / 8][4]>(dk),
                        *reinterpret_cast<const float(*)[1][HD / 8][4]>(dv), freqs, amax);
}

// dQ (and D): the structure of attn4_dq with two warpgroups and 64-key tiles (its arithmetic in
// the same order, so bit-identical to it) with a producer warp and turn-taking consumers. Block:
// 384 threads, 128 query rows of one head (64 per consumer); grid (ceil(T/128), Hq, B), late
// (heavy) tiles first. The producer's first thread loads Q and dO once and the K/V tiles of each
// key block into ST stages (TMA); meanwhile each consumer computes D = rowsum(dO o O) and L of
// its 64 rows from global memory (into Dv for the dK/dV kernel, and shared memory). Two turns
// per key block: S = Q K^T with dP = dO V^T, then dQ += dS K.
// dyn smem (from a 1024-byte boundary): Q, dO ct [128][HD] + ST x (K, V) ct [64][HD] + L, D [128]
// f32 + mbarriers.
template <int HD, int ST>
LLMQ_DEV void attn5_dq(const TmaDesc* mqkv, const TmaDesc* mdo, uint16_t* dqkv, float* Dv, const uint16_t* dout, const uint16_t* out,
                       const float* lse, int T, int Hq, int Hkv, const float* freqs, float* amax) {
    constexpr int BQ = 128, BK = 64, NS = BK / 2, NO = HD / 2;
    constexpr int QT = ct_elems(BQ, HD), KT = ct_elems(BK, HD);
    uint16_t* Qs = ct_align(llmq_dyn_smem);
    uint16_t* Os = Qs + QT;
    uint16_t* KV = Os + QT;  // [stage][K | V][KT]
    float* Ls = (float*)(KV + 2 * ST * KT);
    float* Ds = Ls + BQ;
    const WsBars<ST> bar(Ds + BQ);
    unsigned long long *qfull = bar.once, *full = bar.full, *empty = bar.empty;
    const int wg = ws_warpgroup();
    const auto [qt, h, b, kvh, qb0, nkt] = ws_qtile<BQ, BK>(T, Hq, Hkv);
    bar.init(1);
    if (wg == 0) {
        if (!ws_producer<WS_PRODUCER_REGS>(1)) return;
        tma_prefetch_desc(mqkv);
        tma_prefetch_desc(mdo);
        mbar_expect_tx(qfull, 2 * QT * 2);
#pragma unroll
        for (int c = 0; c < HD / 64; c++)
#pragma unroll
            for (int r = 0; r < BQ / 64; r++) {
                tma_load_3d(Qs + c * BQ * 64 + r * 64 * 64, mqkv, h * HD + 64 * c, qb0 + 64 * r, b, qfull);
                tma_load_3d(Os + c * BQ * 64 + r * 64 * 64, mdo, h * HD + 64 * c, qb0 + 64 * r, b, qfull);
            }
        ws_produce_kv<HD, BK, ST>(KV, mqkv, full, empty, nkt, Hq, Hkv, kvh, b);
        return;
    }
    regs_inc<WS_CONSUMER_REGS>();
    const int c = wg - 1;
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3, g = lane >> 2, t = lane & 3;
    const int my_turn = 1 + c, their_turn = 2 - c;
    // D and L of this warpgroup's rows
    a4_dq_rowstats<HD>(Ls, Ds, Dv, dout, out, lse, 64 * c, 64 * c + 64, w, 4, qb0, T, Hq, b, h);
    named_sync(3 + c, 128);  // this warpgroup's L and D rows are in shared memory
    const float sl2 = LOG2E / sqrtf((float)HD);
    const int ra = 64 * c + 16 * w + g;  // this thread's rows: ra, ra + 8
    const int q0 = qb0 + ra, q1 = q0 + 8;
    const int wq_last = qb0 + 64 * c + 63;
    const float L0 = Ls[ra], L1 = Ls[ra + 8], D0 = Ds[ra], D1 = Ds[ra + 8];
    float dq[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) dq[i] = 0.f;
    mbar_wait(qfull, 0);
    if (c == 1) named_arrive(1, 256);  // the first consumer issues first
    for (int kt = 0; kt < nkt; kt++) {
        const int st = kt % ST;
        const uint16_t* Ks = KV + 2 * st * KT;
        const uint16_t* Vs = Ks + KT;
        const int k0 = kt * BK;
        const bool active = k0 <= wq_last;  // warpgroup-uniform
        mbar_wait(full + st, (kt / ST) & 1);
        float s[NS], dp[NS];
        named_sync(my_turn, 256);
        if (active) {
            wg_fence();
            wg_gemm_kmajor<HD, BK>(s, Qs, BQ, 64 * c, Ks);
            wg_gemm_kmajor<HD, BK>(dp, Os, BQ, 64 * c, Vs);
        }
        named_arrive(their_turn, 256);
        const bool diag = k0 + BK - 1 > qb0 + 64 * c + 16 * w;
        float pd[NS];  // P, then dS (not in s: C7515)
        wg_wait<1>();
        if (active) {
            wg_keep(s);
            a4_dq_p<BK>(pd, s, k0, q0, q1, t, sl2, L0, L1, diag);
        }
        wg_wait<0>();
        unsigned af[BK / 16][4];
        if (active) {
            wg_keep(dp);
            a4_dq_ds(pd, dp, D0, D1);
#pragma unroll
            for (int cc = 0; cc < BK / 16; cc++) wg_pack_a(af[cc], pd, cc);
        }
        named_sync(my_turn, 256);
        if (active) {
            wg_fence();
#pragma unroll
            for (int cc = 0; cc < BK / 16; cc++) wg_rs<HD, 1>(dq, af[cc], wg_desc_mn(Ks, BK, cc), 1);  // dQ += dS K
            wg_commit();
        }
        if (c == 0 || kt + 1 < nkt) named_arrive(their_turn, 256);
        wg_wait<0>();
        wg_keep(dq);
        if (active) wg_keep_frags(af);
        ws_release(empty + st);
    }
    a4_dq_store<HD>(dqkv, dq, qb0 + 64 * c + 16 * w, g, t, T, Hq, Hkv, b, h, freqs, amax);
}
#define A5_BODY(call) call
#else
#define A5_BODY(call) __trap()
#endif

// Instantiations llmq_attn5_fwd_<HD>: keep in sync with the table in src/attention_wg.rs (keys
// per tile, stages). mq: Q boxes (64 columns x 128 rows), mkv: K/V boxes
// (64 columns x BK rows), both over qkv as [B][T][(Hq + 2 Hkv) HD] bf16.
#define A5_FWD(HD, BK, ST)                                                                                               \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                                     \
        llmq_attn5_fwd_##HD(const __grid_constant__ TmaDesc mq, const __grid_constant__ TmaDesc mkv, uint16_t* out, \
                                    float* lse, int T, int Hq, int Hkv, float* amax) {                                       \
        A5_BODY((attn5_fwd<HD, BK, ST>(&mq, &mkv, out, lse, T, Hq, Hkv, amax)));                                             \
    }
A5_FWD(128, 128, 2)

// llmq_attn5_dkv_<HD>: keep in sync with the table in src/attention_wg.rs (stages).
// mqkv: boxes of 64 columns x 64 rows over qkv, mdo: the same over dout [B][T][Hq HD].
#define A5_DKV(HD, ST)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                                     \
        llmq_attn5_dkv_##HD(const __grid_constant__ TmaDesc mqkv, const __grid_constant__ TmaDesc mdo, uint16_t* dqkv, \
                                    float* part, int S, const float* lse, const float* Dv, int T, int Hq, int Hkv,             \
                                    const float* freqs, float* amax) {                                                         \
        A5_BODY((attn5_dkv<HD, ST>(&mqkv, &mdo, dqkv, part, S, lse, Dv, T, Hq, Hkv, freqs, amax)));                            \
    }
A5_DKV(64, 2)
A5_DKV(128, 3)

// llmq_attn5_dq_<HD>: keep in sync with the table in src/attention_wg.rs (stages).
#define A5_DQ(HD, ST)                                                                                                    \
    extern "C" __global__ void __launch_bounds__(384, 1)                                                                     \
        llmq_attn5_dq_##HD(const __grid_constant__ TmaDesc mqkv, const __grid_constant__ TmaDesc mdo, uint16_t* dqkv,  \
                                   float* Dv, const uint16_t* dout, const uint16_t* out, const float* lse, int T, int Hq,      \
                                   int Hkv, const float* freqs, float* amax) {                                               \
        A5_BODY((attn5_dq<HD, ST>(&mqkv, &mdo, dqkv, Dv, dout, out, lse, T, Hq, Hkv, freqs, amax)));                         \
    }
A5_DQ(128, 2)
