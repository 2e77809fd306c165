// vec.cuh: dtype-specialised chunk access for the memory-bound kernels ("v" kernels).
//
// A chunk is 8 consecutive elements. A tag type picks the element type at compile time, so the
// kernels dispatch on dtype once per launch (the host picks the instantiation):
//   F32T  - two 16-byte loads/stores per chunk      BF16T - one 16-byte load/store
//   E4M3T, E5M2T - one 8-byte load/store            AnyT  - runtime dtype code (see below)
// Typed tags need a 16-byte aligned chunk start (8 for fp8) and a whole chunk: the host checks
// pointer alignment and sizes before it picks a typed kernel. AnyT takes the runtime dtype code
// and works per chunk: a whole, aligned chunk of f32/bf16/fp8 goes through the typed path, any
// other (a partial chunk of `nv` < 8 valid elements, a misaligned one, i32) element by element;
// invalid elements read as 0 and are never written.
// Loads decode exactly like load_f; stores round like store_f (RNE, saturating fp8, the same
// encoders) and overwrite the values with what was stored, returning max |stored| as abs bits
// (the "abs-max after rounding" of the op contract; NaN sorts above everything).
// The cache-hint variant H = 1 uses ld/st.global.cs (evict-first: data read or written for the
// last time), to keep L2 for data that will be read again.
// Pitfall: nothing here is __restrict__: in-place ops (residual add, rope, cross-entropy, the
// rmsnorm backward with dx == dres) rely on every element being read before the same thread
// writes it.
#pragma once
#include "common.cuh"

struct F32T {
    static constexpr int DT = DT_F32;
};
struct BF16T {
    static constexpr int DT = DT_BF16;
};
struct E4M3T {
    static constexpr int DT = DT_E4M3;
};
struct E5M2T {
    static constexpr int DT = DT_E5M2;
};
struct AnyT {
    static constexpr int DT = -1;
};

template <int H>
LLMQ_DEV uint4 vld(const uint4* p) {
    if (H == 1) return __ldcs(p);
    return *p;
}
template <int H>
LLMQ_DEV float4 vld(const float4* p) {
    if (H == 1) return __ldcs(p);
    return *p;
}
template <int H>
LLMQ_DEV void vst(uint4* p, uint4 v) {
    if (H == 1)
        __stcs(p, v);
    else
        *p = v;
}
template <int H>
LLMQ_DEV void vst(float4* p, float4 v) {
    if (H == 1)
        __stcs(p, v);
    else
        *p = v;
}

LLMQ_DEV void bf16x2_dec(unsigned u, float& a, float& b) {
    a = __uint_as_float(u << 16);
    b = __uint_as_float(u & 0xFFFF0000u);
}
// Packs two values rounded to bf16 (RNE) and writes the rounded values back.
LLMQ_DEV unsigned bf16x2_enc(float& a, float& b) {
    unsigned u = bf16x2_bits(a, b);
    a = __uint_as_float(u << 16);
    b = __uint_as_float(u & 0xFFFF0000u);
    return u;
}
LLMQ_DEV unsigned absmax8(const float (&f)[8]) {
    unsigned m = 0u;
#pragma unroll
    for (int j = 0; j < 8; j++) m = max(m, abs_bits(f[j]));
    return m;
}

// ---- loads: f[0..8) = elements i .. i+8 of p ----
template <class T, int H = 0>
LLMQ_DEV void ld8(const void* p, int dt, long long i, int nv, float (&f)[8]);

template <>
LLMQ_DEV void ld8<F32T, 0>(const void* p, int, long long i, int, float (&f)[8]) {
    const float4* q = (const float4*)((const float*)p + i);
    float4 a = vld<0>(q), b = vld<0>(q + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
template <>
LLMQ_DEV void ld8<F32T, 1>(const void* p, int, long long i, int, float (&f)[8]) {
    const float4* q = (const float4*)((const float*)p + i);
    float4 a = vld<1>(q), b = vld<1>(q + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
LLMQ_DEV void bf16x8_dec(uint4 u, float (&f)[8]) {
    bf16x2_dec(u.x, f[0], f[1]);
    bf16x2_dec(u.y, f[2], f[3]);
    bf16x2_dec(u.z, f[4], f[5]);
    bf16x2_dec(u.w, f[6], f[7]);
}
template <>
LLMQ_DEV void ld8<BF16T, 0>(const void* p, int, long long i, int, float (&f)[8]) {
    bf16x8_dec(vld<0>((const uint4*)((const uint16_t*)p + i)), f);
}
template <>
LLMQ_DEV void ld8<BF16T, 1>(const void* p, int, long long i, int, float (&f)[8]) {
    bf16x8_dec(vld<1>((const uint4*)((const uint16_t*)p + i)), f);
}
template <>
LLMQ_DEV void ld8<E4M3T, 0>(const void* p, int, long long i, int, float (&f)[8]) {
    uint2 u = *(const uint2*)((const uint8_t*)p + i);
#pragma unroll
    for (int j = 0; j < 4; j++) f[j] = e4m3_bits_to_f32((uint8_t)(u.x >> (8 * j)));
#pragma unroll
    for (int j = 0; j < 4; j++) f[4 + j] = e4m3_bits_to_f32((uint8_t)(u.y >> (8 * j)));
}
template <>
LLMQ_DEV void ld8<E5M2T, 0>(const void* p, int, long long i, int, float (&f)[8]) {
    uint2 u = *(const uint2*)((const uint8_t*)p + i);
#pragma unroll
    for (int j = 0; j < 4; j++) f[j] = e5m2_bits_to_f32((uint8_t)(u.x >> (8 * j)));
#pragma unroll
    for (int j = 0; j < 4; j++) f[4 + j] = e5m2_bits_to_f32((uint8_t)(u.y >> (8 * j)));
}

LLMQ_DEV int dt_bytes(int dt) { return dt == DT_BF16 ? 2 : (dt == DT_E4M3 || dt == DT_E5M2) ? 1 : 4; }

template <>
LLMQ_DEV void ld8<AnyT, 0>(const void* p, int dt, long long i, int nv, float (&f)[8]) {
    if (nv == 8) {
        unsigned long long a = (unsigned long long)p + (unsigned long long)(i * dt_bytes(dt));
        bool al16 = (a & 15ull) == 0, al8 = (a & 7ull) == 0;
        if (dt == DT_F32 && al16) return ld8<F32T, 0>(p, dt, i, 8, f);
        if (dt == DT_BF16 && al16) return ld8<BF16T, 0>(p, dt, i, 8, f);
        if (dt == DT_E4M3 && al8) return ld8<E4M3T, 0>(p, dt, i, 8, f);
        if (dt == DT_E5M2 && al8) return ld8<E5M2T, 0>(p, dt, i, 8, f);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) f[j] = j < nv ? load_f(p, i + j, dt) : 0.f;
}

// ---- stores: rounds f to the element type, stores it, leaves the stored values in f and
// returns their max abs bits ----
template <class T, int H = 0>
LLMQ_DEV unsigned st8(void* p, int dt, long long i, int nv, float (&f)[8]);

template <>
LLMQ_DEV unsigned st8<F32T, 0>(void* p, int, long long i, int, float (&f)[8]) {
    float4* q = (float4*)((float*)p + i);
    vst<0>(q, make_float4(f[0], f[1], f[2], f[3]));
    vst<0>(q + 1, make_float4(f[4], f[5], f[6], f[7]));
    return absmax8(f);
}
template <>
LLMQ_DEV unsigned st8<F32T, 1>(void* p, int, long long i, int, float (&f)[8]) {
    float4* q = (float4*)((float*)p + i);
    vst<1>(q, make_float4(f[0], f[1], f[2], f[3]));
    vst<1>(q + 1, make_float4(f[4], f[5], f[6], f[7]));
    return absmax8(f);
}
LLMQ_DEV uint4 bf16x8_enc(float (&f)[8]) {
    uint4 u;
    u.x = bf16x2_enc(f[0], f[1]);
    u.y = bf16x2_enc(f[2], f[3]);
    u.z = bf16x2_enc(f[4], f[5]);
    u.w = bf16x2_enc(f[6], f[7]);
    return u;
}
template <>
LLMQ_DEV unsigned st8<BF16T, 0>(void* p, int, long long i, int, float (&f)[8]) {
    vst<0>((uint4*)((uint16_t*)p + i), bf16x8_enc(f));
    return absmax8(f);
}
template <>
LLMQ_DEV unsigned st8<BF16T, 1>(void* p, int, long long i, int, float (&f)[8]) {
    vst<1>((uint4*)((uint16_t*)p + i), bf16x8_enc(f));
    return absmax8(f);
}
// fp8 stores: 8 bytes at once; f receives the stored (rounded) values
template <bool E5M2>
LLMQ_DEV unsigned st8_fp8(void* p, long long i, float (&f)[8]) {
    uint2 u = make_uint2(0u, 0u);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        uint8_t b = E5M2 ? f32_to_e5m2_bits(f[j]) : f32_to_e4m3_bits(f[j]);
        f[j] = E5M2 ? e5m2_bits_to_f32(b) : e4m3_bits_to_f32(b);
        if (j < 4)
            u.x |= (unsigned)b << (8 * j);
        else
            u.y |= (unsigned)b << (8 * (j - 4));
    }
    *(uint2*)((uint8_t*)p + i) = u;
    return absmax8(f);
}
template <>
LLMQ_DEV unsigned st8<E4M3T, 0>(void* p, int, long long i, int, float (&f)[8]) {
    return st8_fp8<false>(p, i, f);
}
template <>
LLMQ_DEV unsigned st8<E5M2T, 0>(void* p, int, long long i, int, float (&f)[8]) {
    return st8_fp8<true>(p, i, f);
}
template <>
LLMQ_DEV unsigned st8<AnyT, 0>(void* p, int dt, long long i, int nv, float (&f)[8]) {
    if (nv == 8) {
        unsigned long long a = (unsigned long long)p + (unsigned long long)(i * dt_bytes(dt));
        bool al16 = (a & 15ull) == 0, al8 = (a & 7ull) == 0;
        if (dt == DT_F32 && al16) return st8<F32T, 0>(p, dt, i, 8, f);
        if (dt == DT_BF16 && al16) return st8<BF16T, 0>(p, dt, i, 8, f);
        if (dt == DT_E4M3 && al8) return st8<E4M3T, 0>(p, dt, i, 8, f);
        if (dt == DT_E5M2 && al8) return st8<E5M2T, 0>(p, dt, i, 8, f);
    }
    unsigned m = 0u;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        if (j < nv) {
            f[j] = store_f(p, i + j, dt, f[j]);
            m = max(m, abs_bits(f[j]));
        }
    }
    return m;
}

// Block-wide abs-max commit: the block's max of `bits`, then one atomicMax (skipped when the
// slot already holds at least as much: cuts same-address contention to a few atomics per
// launch). Every thread of the block must call it (it has barriers); blockDim a multiple of 32.
LLMQ_DEV void block_absmax_commit(float* slot, unsigned bits) {
    __shared__ unsigned am_red[32];
    if (slot == nullptr) return;
    int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int nthreads = blockDim.x * blockDim.y * blockDim.z;
    int lane = t & 31, w = t >> 5, nw = nthreads >> 5;
    unsigned m = __reduce_max_sync(0xFFFFFFFFu, bits);
    __syncthreads();  // am_red may still be read by a previous call
    if (lane == 0) am_red[w] = m;
    __syncthreads();
    if (w == 0) {
        m = lane < nw ? am_red[lane] : 0u;
        m = __reduce_max_sync(0xFFFFFFFFu, m);
        if (lane == 0 && m != 0u && m > *(volatile unsigned*)slot) atomicMax((unsigned*)slot, m);
    }
}
