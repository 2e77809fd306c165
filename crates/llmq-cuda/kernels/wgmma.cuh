// wgmma.cuh: Hopper warpgroup matrix multiply (sm_90a) for the attention kernels.
//
// One warpgroup (4 warps, 128 threads) computes D[64][N] (+)= A[64][16] * B[16][N] per
// instruction, asynchronously: issue (wg_fence first), commit a group, wait for groups. A comes
// from shared memory (descriptor) or from registers; B always from shared memory.
//
// Shared-memory tiles ("ct" tiles, 128-byte swizzle): a tile of R rows x W bf16 columns (W a
// multiple of 64) is stored as W/64 sub-tiles of R rows x 128 bytes; the 16-byte chunk c
// (columns 8c..8c+7 of the sub-tile) of row r sits at chunk position c ^ (r % 8) of its row.
// Eight rows form a 1024-byte swizzle atom; tiles start 1024-byte aligned (ct_align). The same
// tile serves both operand forms:
//   K-major (rows = M or N, columns = K): k-step kk starts in sub-tile kk / 4, 32 * (kk % 4)
//     bytes into the row (the hardware applies the XOR to the final address); SBO (next 8 rows)
//     = 1024; LBO unused.
//   MN-major (rows = K, columns = N; transpose bit set, bf16 only): k-step kk starts at row
//     16 kk; SBO (next 8 rows along K) = 1024, LBO (next 64 columns along N) = R * 128.
// Why swizzled: Nsight Compute showed the unswizzled canonical layout ("interleaved" 8 x 16-byte
// core matrices) at 3x the ideal shared-memory wavefronts for the wgmma operand reads; the
// swizzle also makes a quarter-warp's 16-byte cp.async stores of one row hit all 32 banks.
// tests/attention.rs checks every form against the CPU with `llmq_wg_selftest`.
//
// Register fragments (per warp w of the warpgroup, lane = 4 g + t): the accumulator of
// m64nN has N/2 floats, d[4 j + 0, 1] at row 16 w + g, columns 8 j + 2 t + {0, 1}, and
// d[4 j + 2, 3] at row 16 w + g + 8; an A fragment (k16) is four bf16x2 registers in the
// mma.sync m16n8k16 order, so accumulator columns 16 c .. 16 c + 15 convert to the A fragment of
// k-step c by packing d[8 c .. 8 c + 7] pairwise (wg_pack_a).
// Pitfalls: smem written by ordinary stores or cp.async must be fenced into the async proxy
// (wg_proxy_fence) before the barrier that precedes the wgmma; registers read by an in-flight
// wgmma must not be touched until wg_wait, and the compiler must not move accesses across it
// (wg_keep on the accumulators).
#pragma once

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LLMQ_WGMMA 1
#endif

// Descriptor of a 128-byte-swizzled operand at smem (LBO, SBO in bytes).
LLMQ_DEV unsigned long long wg_desc(const void* smem, unsigned lbo, unsigned sbo) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    return (unsigned long long)((a & 0x3FFFF) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
// bf16 elements of a ct tile of R rows x W columns (a multiple of 1024 bytes when R % 8 == 0).
__host__ __device__ constexpr int ct_elems(int R, int W) { return R * W; }
// Element offset of (row r, column col) in a ct tile with R rows.
LLMQ_DEV int ct_off(int R, int r, int col) { return (col / 64) * R * 64 + r * 64 + ((((col % 64) / 8) ^ (r & 7)) * 8) + col % 8; }
// The dynamic shared memory rounded up to 1024 bytes (the launch adds 1024 bytes of room).
LLMQ_DEV uint16_t* ct_align(unsigned char* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    return (uint16_t*)(p + ((1024 - (a & 1023)) & 1023));
}
// Descriptor of k-step kk of a ct tile (R rows) used K-major, from row r0 (a multiple of 8).
LLMQ_DEV unsigned long long wg_desc_k(const uint16_t* tile, int R, int kk, int r0) {
    return wg_desc(tile + (kk / 4) * R * 64 + r0 * 64 + (kk % 4) * 16, 16, 1024);
}
// Descriptor of k-step kk (rows 16 kk ..) of a ct tile (R rows) used MN-major.
LLMQ_DEV unsigned long long wg_desc_mn(const uint16_t* tile, int R, int kk) {
    return wg_desc(tile + kk * 16 * 64, R * 128, 1024);
}

LLMQ_DEV void wg_fence() {
#ifdef LLMQ_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
LLMQ_DEV void wg_commit() {
#ifdef LLMQ_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
LLMQ_DEV void wg_wait() {
#ifdef LLMQ_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
LLMQ_DEV void wg_proxy_fence() {
#ifdef LLMQ_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Pins the accumulator registers at this point of the program (after wg_wait).
template <int N>
LLMQ_DEV void wg_keep(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// A fragment of k-step c from accumulator columns 16 c .. 16 c + 15 (bf16, round to nearest).
template <int N>
LLMQ_DEV void wg_pack_a(unsigned (&a)[4], const float (&d)[N], int c) {
    a[0] = bf16x2_bits_finite(d[8 * c + 0], d[8 * c + 1]);
    a[1] = bf16x2_bits_finite(d[8 * c + 2], d[8 * c + 3]);
    a[2] = bf16x2_bits_finite(d[8 * c + 4], d[8 * c + 5]);
    a[3] = bf16x2_bits_finite(d[8 * c + 6], d[8 * c + 7]);
}

// One f32 by cp.async (zero-filled where !valid).
LLMQ_DEV void cp_async4(void* sptr, const void* gptr, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(sptr);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gptr), "r"(valid ? 4 : 0));
#endif
}

// ROWS rows [r0, r0 + ROWS) of one head (column offset col, HD wide) into a ct tile by cp.async;
// rows >= T are zero-filled. Consecutive threads copy consecutive chunks of a row: each
// quarter-warp reads 128 contiguous bytes and writes one swizzled 128-byte row (all banks).
template <int HD, int ROWS, int NTH>
LLMQ_DEV void wg_cp_rows(uint16_t* tile, const uint16_t* base, long long row_stride, int r0, int T, int col) {
    constexpr int CH = HD / 8;
    static_assert(ROWS % 8 == 0 && HD % 64 == 0, "ct tiles need 8-row groups and 64-column sub-tiles");
    static_assert(ROWS * CH % NTH == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < ROWS * CH / NTH; i++) {  // unrolled: the index maths folds into constants
        const int idx = threadIdx.x + i * NTH, r = idx / CH, c = idx % CH;
        const bool ok = r0 + r < T;
        const uint16_t* src = ok ? base + (long long)(r0 + r) * row_stride + col + c * 8 : base;
        cp_async16(tile + (c / 8) * ROWS * 64 + r * 64 + (((c % 8) ^ (r & 7)) * 8), src, ok);
    }
}

#include "wgmma_ops.cuh"

// D (+)= A * B with N chosen at compile time; TB: B is MN-major (transpose bit).
template <int N, int TB>
LLMQ_DEV void wg_ss(float* d, unsigned long long da, unsigned long long db, int acc) {
    static_assert(N == 32 || N == 64 || N == 128, "wgmma N");
    if constexpr (N == 32) wg_ss_n32<TB>(d, da, db, acc);
    else if constexpr (N == 64) wg_ss_n64<TB>(d, da, db, acc);
    else wg_ss_n128<TB>(d, da, db, acc);
}
template <int N, int TB>
LLMQ_DEV void wg_rs(float* d, const unsigned (&a)[4], unsigned long long db, int acc) {
    static_assert(N == 32 || N == 64 || N == 128, "wgmma N");
    if constexpr (N == 32) wg_rs_n32<TB>(d, a, db, acc);
    else if constexpr (N == 64) wg_rs_n64<TB>(d, a, db, acc);
    else wg_rs_n128<TB>(d, a, db, acc);
}

// acc (64 x N) = A[ra0 .. ra0 + 63][0 .. K) B[0 .. N)[0 .. K)^T: both operands K-major ct tiles (A
// with RA rows, B with N rows), K / 16 k-steps, one commit group (wg_fence first).
template <int K, int N>
LLMQ_DEV void wg_gemm_kmajor(float* acc, const uint16_t* A, int RA, int ra0, const uint16_t* B) {
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) wg_ss<N, 0>(acc, wg_desc_k(A, RA, kk, ra0), wg_desc_k(B, N, kk, 0), kk > 0);
    wg_commit();
}
