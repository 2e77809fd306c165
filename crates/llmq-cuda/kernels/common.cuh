// common.cuh: element encodings shared by every kernel, bit-identical to llmq_core::dtype.
//
// Tensors are passed as raw pointers plus an int dtype code (DT_*), and every kernel loads to
// f32, computes in f32 and stores with round-to-nearest-even. The encoders are written with
// integer arithmetic (bf16) or the hardware cvt with explicit NaN handling (fp8) so that they
// produce exactly the bytes of the Rust functions f32_to_bf16 / f32_to_e4m3 / f32_to_e5m2,
// NaN payloads and signs included (the library intrinsics canonicalise NaNs differently, and on
// sm_80 take a software path). Decoders return the CPU's canonical NaN 0x7FC00000.
// Pitfalls: the build uses -fmad=false so that a*b+c is not contracted into an FMA (the CPU does
// not fuse); kernels that want FMAs call fmaf explicitly. hash_u32 must stay identical to
// llmq_core::dtype::hash_u32 (stochastic rounding of bf16 master weights).
#pragma once
#include <cuda_fp8.h>
#include <stdint.h>

#define DT_F32 0
#define DT_BF16 1
#define DT_E4M3 2
#define DT_E5M2 3
#define DT_I32 4

#define LLMQ_DEV __device__ __forceinline__

// The one dynamic shared-memory array of every kernel (one declaration per translation unit).
extern __shared__ __align__(16) unsigned char llmq_dyn_smem[];

LLMQ_DEV float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(((unsigned)h) << 16); }

// The reference encoder: integer round-to-nearest-even, a transliteration of
// llmq_core::dtype::f32_to_bf16 (a NaN keeps its sign and high payload bits, quiet bit set).
// llmq_encode_selftest (convert.cu) checks the hardware encoders below against it on all 2^32
// inputs.
LLMQ_DEV uint16_t f32_to_bf16_bits_ref(float x) {
    unsigned b = __float_as_uint(x);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((b >> 16) | 0x40u);
    unsigned lsb = (b >> 16) & 1u;
    return (uint16_t)((b + 0x7FFFu + lsb) >> 16);
}

// Hardware encoders (cvt.rn, sm_80+): one instruction per value pair instead of ~8 integer
// operations per value, which matters in the elementwise kernels whose math is close to their
// memory time. The cvt rounds finite values and infinities like the reference but returns the
// canonical NaN 0x7FFF, so NaN inputs (rare) take the reference path.
LLMQ_DEV uint16_t f32_to_bf16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    if (isnan(x)) h = f32_to_bf16_bits_ref(x);
    return h;
}
// lo in bits 0..15, hi in bits 16..31. For values known not to be NaN (attention's P and dS
// fragments); a NaN becomes 0x7FFF.
LLMQ_DEV unsigned bf16x2_bits_finite(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// lo in bits 0..15, hi in bits 16..31, NaNs as the CPU encodes them.
LLMQ_DEV unsigned bf16x2_bits(float lo, float hi) {
    unsigned r = bf16x2_bits_finite(lo, hi);
    if (isnan(lo) || isnan(hi)) r = (unsigned)f32_to_bf16_bits_ref(lo) | ((unsigned)f32_to_bf16_bits_ref(hi) << 16);
    return r;
}

// The IEEE reciprocal (rcp.rn) of x in [1, 2^126) without the slow-path branch that `1.0f / x`
// carries: MUFU.RCP and one Newton step, the compiler's own fast path. Outside that range the
// result is wrong; llmq_encode_selftest checks it against 1.0f / x on every float of the range.
LLMQ_DEV float rcp_rn_fast(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return fmaf(r, -fmaf(x, r, -1.0f), r);
}

LLMQ_DEV unsigned hash_u32(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed ^ (index * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned)(z >> 32);
}

// Stochastic rounding to bf16: add 16 random bits below the bf16 mantissa, truncate.
LLMQ_DEV uint16_t f32_to_bf16_sr(float x, unsigned rand16) {
    if (!isfinite(x)) return f32_to_bf16_bits(x);
    unsigned r = __float_as_uint(x) + (rand16 & 0xFFFFu);
    uint16_t out = (uint16_t)(r >> 16);
    if (isinf(bf16_bits_to_f32(out))) return f32_to_bf16_bits(x);
    return out;
}

LLMQ_DEV uint8_t f32_to_e4m3_bits(float x) {
    if (isnan(x)) return (uint8_t)(((__float_as_uint(x) >> 24) & 0x80u) | 0x7Fu);
    return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}
LLMQ_DEV uint8_t f32_to_e5m2_bits(float x) {
    if (isnan(x)) return (uint8_t)(((__float_as_uint(x) >> 24) & 0x80u) | 0x7Fu);
    return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
}

LLMQ_DEV float e4m3_bits_to_f32(uint8_t v) {
    unsigned s = ((unsigned)v & 0x80u) << 24;
    unsigned mag = v & 0x7Fu;
    if (mag == 0x7Fu) return __uint_as_float(0x7FC00000u);
    unsigned e = mag >> 3, m = mag & 7u;
    float r = (e == 0) ? (float)m * 0.001953125f : __uint_as_float(((e + 120u) << 23) | (m << 20));
    return __uint_as_float(__float_as_uint(r) | s);
}
LLMQ_DEV float e5m2_bits_to_f32(uint8_t v) {
    unsigned s = ((unsigned)v & 0x80u) << 24;
    unsigned mag = v & 0x7Fu;
    unsigned e = mag >> 2, m = mag & 3u;
    if (e == 31u) {
        if (m != 0) return __uint_as_float(0x7FC00000u);
        return __uint_as_float(0x7F800000u | s);
    }
    float r = (e == 0) ? (float)m * 1.52587890625e-05f : __uint_as_float(((e + 112u) << 23) | (m << 21));
    return __uint_as_float(__float_as_uint(r) | s);
}

LLMQ_DEV float load_f(const void* p, long long i, int dt) {
    switch (dt) {
        case DT_F32: return ((const float*)p)[i];
        case DT_BF16: return bf16_bits_to_f32(((const uint16_t*)p)[i]);
        case DT_E4M3: return e4m3_bits_to_f32(((const uint8_t*)p)[i]);
        case DT_E5M2: return e5m2_bits_to_f32(((const uint8_t*)p)[i]);
        default: return (float)((const int*)p)[i];
    }
}

// Stores v rounded to dt and returns the stored value as f32 (for abs-max "after rounding").
LLMQ_DEV float store_f(void* p, long long i, int dt, float v) {
    switch (dt) {
        case DT_F32: ((float*)p)[i] = v; return v;
        case DT_BF16: { uint16_t h = f32_to_bf16_bits(v); ((uint16_t*)p)[i] = h; return bf16_bits_to_f32(h); }
        case DT_E4M3: { uint8_t h = f32_to_e4m3_bits(v); ((uint8_t*)p)[i] = h; return e4m3_bits_to_f32(h); }
        case DT_E5M2: { uint8_t h = f32_to_e5m2_bits(v); ((uint8_t*)p)[i] = h; return e5m2_bits_to_f32(h); }
        default: ((int*)p)[i] = (int)v; return (float)(int)v;
    }
}

LLMQ_DEV float round_to(int dt, float v) {
    switch (dt) {
        case DT_F32: return v;
        case DT_BF16: return bf16_bits_to_f32(f32_to_bf16_bits(v));
        case DT_E4M3: return e4m3_bits_to_f32(f32_to_e4m3_bits(v));
        case DT_E5M2: return e5m2_bits_to_f32(f32_to_e5m2_bits(v));
        default: return (float)(int)v;
    }
}

LLMQ_DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}
LLMQ_DEV double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}
LLMQ_DEV float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, at most 1024); result broadcast to all threads.
// Fixed reduction tree for a given blockDim, hence deterministic. `red` needs 32 floats.
LLMQ_DEV float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.f;
    t = warp_sum(t);
    return t;
}
LLMQ_DEV float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : -INFINITY;
    return warp_max(t);
}

// Abs-max bookkeeping on bit patterns: |x| as bits orders like the float for non-negative
// values and puts NaN above infinity, so a NaN anywhere shows up in the abs-max (as on the CPU,
// and unlike fmaxf, which drops NaNs). Slots are zeroed before the launch; the integer atomicMax
// is exact and order-independent.
LLMQ_DEV unsigned abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }
// The larger |x| of a bf16 pair (bf16x2_bits' layout) as f32 bits, comparable with abs_bits.
LLMQ_DEV unsigned bf16x2_abs_bits(unsigned pair) { return max((pair << 16) & 0x7FFFFFFFu, pair & 0x7FFF0000u); }
LLMQ_DEV void atomic_absmax_bits(float* slot, unsigned bits) { atomicMax((unsigned*)slot, bits); }
// One atomic per warp; every lane of the warp must call it.
LLMQ_DEV void warp_absmax_commit(float* slot, unsigned local_bits) {
    if (slot == nullptr) return;
    unsigned m = __reduce_max_sync(0xFFFFFFFFu, local_bits);
    if ((threadIdx.x & 31) == 0 && m != 0u) atomic_absmax_bits(slot, m);
}

LLMQ_DEV double block_sum_d(double v, double* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    double t = lane < nw ? red[lane] : 0.0;
    return warp_sum_d(t);
}
