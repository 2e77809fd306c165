// attention.cuh: what the attention kernels share. Causal grouped-query attention, forward and
// backward, never materialising the T x T score matrix (flash-attention style online softmax).
//
// Layout: qkv [B*T, (Hq + 2 Hkv) Hd], per row Hq query heads, then Hkv key heads, then Hkv value
// heads; query head h reads kv head h / (Hq / Hkv). out [B*T, Hq Hd], lse f32 [B, Hq, T] (natural
// log-sum-exp of the scaled scores), softmax scale 1/sqrt(Hd).
//
// Implementations (src/attention.rs and src/attention_wg.rs choose among them):
// * attention_simple.cu (any float dtype, Hd <= 256): one warp per query row (forward, dQ) or per
//   key row (dK/dV). Slow, obviously correct: the fallback and a cross-check of the fast paths.
// * attention_v2.cu and attention_v3.cu (bf16, Hd in {64, 128}, 16-byte aligned rows): tensor
//   cores through mma.sync.m16n8k16 (bf16 in, f32 accumulate), FlashAttention-2 structure; v3 is
//   the default before compute capability 9.0, v2 is kept as a cross-check.
// * attention_wg.cu (wgmma) and attention_ws.cu (warp-specialised, TMA): compute capability 9.0.
// Common to the tensor-core versions: score and probability fragments stay in registers (the
// accumulator layout of S = Q K^T is converted in place into the A-operand layout of P V);
// operands needed "k-major" are read with ldmatrix.trans; softmax in the log2 domain; backward:
// D = rowsum(dO o O), then one kernel for dQ over key tiles and one for dK and dV over the query
// heads of a group and the later query tiles. No atomics: deterministic.
// Pitfalls: causal masking is only needed on the diagonal tile (earlier tiles are entirely
// visible, and keys past T only occur in the diagonal tile for valid rows); rows past T are
// computed on zero-filled tiles but never stored; P and dS are rounded to bf16 before their mma,
// as in FlashAttention.
//
// This header: the mma.sync / ldmatrix / cp.async primitives, and the v3 helpers that the wgmma
// and warp-specialised kernels reuse (stores of gradients with their fused RoPE and abs-max, the
// dK/dV iteration space).
#pragma once
#include "common.cuh"

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

LLMQ_DEV float ex2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// A bf16 pair stored at dst; returns its abs-max as f32 bits (for the optional fused abs-max).
LLMQ_DEV unsigned a3_put2(uint16_t* dst, float x0, float x1) {
    const unsigned bits = bf16x2_bits(x0, x1);
    *(unsigned*)dst = bits;
    return bf16x2_abs_bits(bits);
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

// Iteration space of the dK/dV kernels (v3 and wgmma): block (kb * S + split, kvh, b) owns
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

