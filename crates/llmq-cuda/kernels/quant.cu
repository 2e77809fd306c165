// quant.cu: fp8 quantisation with current (just-in-time) scaling, its transposing variant, and a
// plain bit-exact transpose.
// scale = FP8_MAX / max(absmax, 1e-10) (448 for e4m3, 57344 for e5m2), out = sat_rne(x * scale),
// descale = 1 / scale: the same IEEE f32 operations as the CPU backend, hence the same bytes.
// Generic transposes go through 32x32 shared-memory tiles (padded by one element against bank
// conflicts) so that both the global reads and writes are coalesced; rows/cols need not be
// multiples of 32.
// Fast kernels (f32/bf16 in, e4m3/e5m2 out, 16-byte aligned):
// - quantize_v: 8 elements per step (16-byte load, 8-byte store), scalar tail.
// - quantize_t<R>_v (R = 64, 128): R x 64 tiles, rows % R == 0 and cols % 64 == 0 (see there);
//   quantize_tp<R>_v also stores the plain [rows, cols] quantisation in the same pass: the fp8
//   backward needs both forms of each activation gradient, and one pass reads the bf16 data once
//   instead of twice. Earlier versions: 16 one-byte shared stores per thread (~2.7 TB/s); then
//   64 x 64 tiles of 4 x 4 elements per thread whose 8-byte loads waited one by one behind the
//   plain stores (3.26 TB/s at 16k x 4864; the 128-row form of this one: 3.75).
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

// f[0..4) * scale quantised, packed little-endian into a word.
template <class TO>
LLMQ_DEV unsigned quant4(const float* f, float scale) {
    unsigned w = 0u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float v = f[j] * scale;
        w |= (unsigned)(TO::DT == DT_E5M2 ? f32_to_e5m2_bits(v) : f32_to_e4m3_bits(v)) << (8 * j);
    }
    return w;
}
// Byte j of each of q0..q3 (four rows of one column), as one word.
LLMQ_DEV unsigned column_word(unsigned q0, unsigned q1, unsigned q2, unsigned q3, int j) {
    const unsigned sel = j | ((4 + j) << 4);
    return __byte_perm(__byte_perm(q0, q1, sel), __byte_perm(q2, q3, sel), 0x5410);
}

// grid (cols / 64, rows / R), block 2R threads: an R x 64 tile per block (R = 64 or 128).
// Thread t loads columns 8 (t % 8) .. + 7 of rows 4 (t / 8) .. + 3 with four 16-byte loads
// issued together (a warp reads four whole 128-byte row segments per load), stores its 8 plain
// bytes per row when `plain` is set, and puts one word (4 rows of one column) per column into
// a [col][R / 4 + 1] word tile (odd stride: 2-way conflicts on the writes, none on the reads);
// then each output row (a column, R bytes) is stored by R / 16 threads with 16-byte stores, in
// two rounds of 32 columns. All loads come before any store: a plain store may alias a later
// load for all the compiler knows, and the first version, storing between its loads, waited
// for each load in turn.
template <int R, class TI, class TO>
__device__ __forceinline__ void quantize_t_v(uint8_t* __restrict__ out, uint8_t* __restrict__ plain, float* descale,
                                             const void* __restrict__ inp, const float* absmax, int rows, int cols) {
    constexpr int WS = R / 4 + 1;  // words per column in the tile
    __shared__ unsigned tile[64 * WS];
    const float scale = fp8_scale(TO::DT, absmax);
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) descale[0] = 1.0f / scale;
    const int c0 = blockIdx.x * 64, r0 = blockIdx.y * R;
    const int c8 = (threadIdx.x & 7) * 8, rq = threadIdx.x >> 3;
    float f[4][8];
#pragma unroll
    for (int i = 0; i < 4; i++) ld8<TI>(inp, TI::DT, (long long)(r0 + 4 * rq + i) * cols + c0 + c8, 8, f[i]);
    unsigned q[4][2];  // q[i][h]: columns c8 + 4h .. + 3 of row 4 rq + i
#pragma unroll
    for (int i = 0; i < 4; i++) {
        q[i][0] = quant4<TO>(f[i], scale);
        q[i][1] = quant4<TO>(f[i] + 4, scale);
        if (plain != nullptr) *(uint2*)(plain + (long long)(r0 + 4 * rq + i) * cols + c0 + c8) = make_uint2(q[i][0], q[i][1]);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) tile[(c8 + j) * WS + rq] = column_word(q[0][j >> 2], q[1][j >> 2], q[2][j >> 2], q[3][j >> 2], j & 3);
    __syncthreads();
    constexpr int TPR = R / 16;  // threads per output row
    const int cc = threadIdx.x / TPR, part = threadIdx.x % TPR;
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int col = cc + 32 * k;
        const unsigned* src = tile + col * WS + part * 4;
        *(uint4*)(out + (long long)(c0 + col) * rows + r0 + part * 16) = make_uint4(src[0], src[1], src[2], src[3]);
    }
}

// The transposed-only and the plain + transposed entry points for R-row tiles (2R threads).
#define QUANT_T_ENTRIES(R, IN, TI, ON, TO)                                                                                    \
    extern "C" __global__ void __launch_bounds__(2 * R) llmq_quantize_t##R##_v_##IN##_##ON(                                    \
        uint8_t* out, float* descale, const void* inp, const float* absmax, int rows, int cols) {                              \
        quantize_t_v<R, TI, TO>(out, nullptr, descale, inp, absmax, rows, cols);                                                \
    }                                                                                                                           \
    extern "C" __global__ void __launch_bounds__(2 * R) llmq_quantize_tp##R##_v_##IN##_##ON(                                   \
        uint8_t* out_t, uint8_t* out, float* descale, const void* inp, const float* absmax, int rows, int cols) {              \
        quantize_t_v<R, TI, TO>(out_t, out, descale, inp, absmax, rows, cols);                                                  \
    }

#define QUANT_V(IN, TI, ON, TO)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) llmq_quantize_v_##IN##_##ON(uint8_t* out, float* descale, const void* inp, \
                                                                                   const float* absmax, long long n) {           \
        quantize_v<TI, TO>(out, descale, inp, absmax, n);                                                                       \
    }                                                                                                                           \
    QUANT_T_ENTRIES(64, IN, TI, ON, TO)                                                                                         \
    QUANT_T_ENTRIES(128, IN, TI, ON, TO)
QUANT_V(f32, F32T, e4m3, E4M3T)
QUANT_V(f32, F32T, e5m2, E5M2T)
QUANT_V(bf16, BF16T, e4m3, E4M3T)
QUANT_V(bf16, BF16T, e5m2, E5M2T)
