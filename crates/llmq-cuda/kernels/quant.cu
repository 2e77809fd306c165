// quant.cu: fp8 quantisation with current (just-in-time) scaling, its transposing variant, and a
// plain bit-exact transpose.
// scale = FP8_MAX / max(absmax, 1e-10) (448 for e4m3, 57344 for e5m2), out = sat_rne(x * scale),
// descale = 1 / scale: the same IEEE f32 operations as the CPU backend, hence the same bytes.
// Generic transposes go through 32x32 shared-memory tiles (padded by one element against bank
// conflicts) so that both the global reads and writes are coalesced; rows/cols need not be
// multiples of 32.
// Fast kernels (f32/bf16 in, e4m3/e5m2 out, 16-byte aligned):
// - quantize_v: 8 elements per step (16-byte load, 8-byte store), scalar tail.
// - quantize_t_v: 64x64 tiles, rows and cols multiples of 64. Thread (warp w, lane l) reads row
//   l + 32 (w & 1) of the tile, 16 columns at (w >> 1) * 16 (32 bytes of bf16: one whole sector),
//   quantises in registers and writes the 16 bytes into a [col][row] byte tile (a warp writes 32
//   consecutive bytes of one tile row per column: no bank conflicts); then each thread stores 16
//   output bytes (4 threads per 64-byte output row segment) with one 16-byte store.
// - quantize_tp_v: the same tile walk, also storing the plain [rows, cols] quantisation (each
//   thread's 16 bytes with one 16-byte store): the fp8 backward needs both forms of each
//   activation gradient, and one pass reads the bf16 data once instead of twice.
#include "vec.cuh"
#include "common.cuh"

LLMQ_DEV float fp8_scale(int dt_out, const float* absmax) {
    float mx = dt_out == DT_E5M2 ? 57344.0f : 448.0f;
    return mx / fmaxf(absmax[0], 1e-10f);
}

extern "C" __global__ void llmq_quantize(uint8_t* out, int dt_out, float* descale, const void* inp, int dt_in,
                                         const float* absmax, long long n) {
    float scale = fp8_scale(dt_out, absmax);
    if (blockIdx.x == 0 && threadIdx.x == 0) descale[0] = 1.0f / scale;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = load_f(inp, i, dt_in) * scale;
        out[i] = dt_out == DT_E5M2 ? f32_to_e5m2_bits(v) : f32_to_e4m3_bits(v);
    }
}

// inp [rows, cols] -> out [cols, rows]; grid (ceil(cols/32), ceil(rows/32)), block (32, 8).
extern "C" __global__ void llmq_quantize_t(uint8_t* out, int dt_out, float* descale, const void* inp, int dt_in,
                                           const float* absmax, int rows, int cols) {
    __shared__ float tile[32][33];
    float scale = fp8_scale(dt_out, absmax);
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) descale[0] = 1.0f / scale;
    int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        int r = r0 + k, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[k][threadIdx.x] = load_f(inp, (long long)r * cols + c, dt_in);
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        int c = c0 + k, r = r0 + threadIdx.x;
        if (r < rows && c < cols) {
            float v = tile[threadIdx.x][k] * scale;
            out[(long long)c * rows + r] = dt_out == DT_E5M2 ? f32_to_e5m2_bits(v) : f32_to_e4m3_bits(v);
        }
    }
}

template <typename E>
LLMQ_DEV void transpose_tile(E* out, const E* inp, int rows, int cols) {
    __shared__ E tile[32][33];
    int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        int r = r0 + k, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[k][threadIdx.x] = inp[(long long)r * cols + c];
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        int c = c0 + k, r = r0 + threadIdx.x;
        if (r < rows && c < cols) out[(long long)c * rows + r] = tile[threadIdx.x][k];
    }
}

extern "C" __global__ void llmq_transpose8(uint8_t* out, const uint8_t* inp, int rows, int cols) { transpose_tile(out, inp, rows, cols); }
extern "C" __global__ void llmq_transpose16(uint16_t* out, const uint16_t* inp, int rows, int cols) { transpose_tile(out, inp, rows, cols); }
extern "C" __global__ void llmq_transpose32(unsigned* out, const unsigned* inp, int rows, int cols) { transpose_tile(out, inp, rows, cols); }

// ---------------------------------------------------------------------------------------------
// Fast kernels

template <class TI, class TO>
__device__ __forceinline__ void quantize_v(uint8_t* __restrict__ out, float* descale, const void* __restrict__ inp, const float* absmax,
                                           long long n) {
    const float scale = fp8_scale(TO::DT, absmax);
    if (blockIdx.x == 0 && threadIdx.x == 0) descale[0] = 1.0f / scale;
    const long long nch = n >> 3, stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll 2
    for (long long q = t0; q < nch; q += stride) {
        float f[8];
        ld8<TI>(inp, TI::DT, q * 8, 8, f);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] = f[j] * scale;
        st8<TO>(out, TO::DT, q * 8, 8, f);
    }
    for (long long i = nch * 8 + t0; i < n; i += stride) {
        const float v = load_f(inp, i, TI::DT) * scale;
        out[i] = TO::DT == DT_E5M2 ? f32_to_e5m2_bits(v) : f32_to_e4m3_bits(v);
    }
}

// grid (cols / 64, rows / 64), block 256.
// `plain` (may be null): also the untransposed [rows, cols] quantisation.
template <class TI, class TO>
__device__ __forceinline__ void quantize_t_v(uint8_t* __restrict__ out, uint8_t* __restrict__ plain, float* descale,
                                             const void* __restrict__ inp, const float* absmax, int rows, int cols) {
    __shared__ __align__(16) uint8_t tile[64][64];  // [col][row]
    const float scale = fp8_scale(TO::DT, absmax);
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) descale[0] = 1.0f / scale;
    const int c0 = blockIdx.x * 64, r0 = blockIdx.y * 64;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int rr = lane + 32 * (w & 1), cg = (w >> 1) * 16;
    const long long src = (long long)(r0 + rr) * cols + c0 + cg;
    float f0[8], f1[8];
    ld8<TI>(inp, TI::DT, src, 8, f0);
    ld8<TI>(inp, TI::DT, src + 8, 8, f1);
    unsigned packed[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const float v = (j < 8 ? f0[j & 7] : f1[j & 7]) * scale;
        const uint8_t q = TO::DT == DT_E5M2 ? f32_to_e5m2_bits(v) : f32_to_e4m3_bits(v);
        tile[cg + j][rr] = q;
        packed[j >> 2] |= (unsigned)q << (8 * (j & 3));
    }
    if (plain != nullptr) *(uint4*)(plain + src) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    __syncthreads();
    const int cc = threadIdx.x >> 2, part = threadIdx.x & 3;
    const uint4 v = *(const uint4*)&tile[cc][part * 16];
    *(uint4*)(out + (long long)(c0 + cc) * rows + r0 + part * 16) = v;
}

#define QUANT_V(IN, TI, ON, TO)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) llmq_quantize_v_##IN##_##ON(uint8_t* out, float* descale, const void* inp, \
                                                                                   const float* absmax, long long n) {           \
        quantize_v<TI, TO>(out, descale, inp, absmax, n);                                                                       \
    }                                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) llmq_quantize_t_v_##IN##_##ON(uint8_t* out, float* descale, const void* inp, \
                                                                                     const float* absmax, int rows, int cols) {  \
        quantize_t_v<TI, TO>(out, nullptr, descale, inp, absmax, rows, cols);                                                   \
    }                                                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) llmq_quantize_tp_v_##IN##_##ON(uint8_t* out_t, uint8_t* out, float* descale,    \
                                                                                      const void* inp, const float* absmax, int rows, \
                                                                                      int cols) {                                 \
        quantize_t_v<TI, TO>(out_t, out, descale, inp, absmax, rows, cols);                                                     \
    }
QUANT_V(f32, F32T, e4m3, E4M3T)
QUANT_V(f32, F32T, e5m2, E5M2T)
QUANT_V(bf16, BF16T, e4m3, E4M3T)
QUANT_V(bf16, BF16T, e5m2, E5M2T)
