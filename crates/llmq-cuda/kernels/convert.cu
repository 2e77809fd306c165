// convert.cu: dtype conversion dst = convert(src) over n elements (grid-stride loop).
// Decode to f32 exactly, encode with the shared RNE / saturating encoders of common.cuh, so the
// bytes equal the CPU backend's. Pitfall: n can exceed 2^31, so indices are 64-bit.
// Fast kernels convert_v_<src>_<dst> for every pair of f32/bf16/e4m3/e5m2 (both pointers 16-byte
// aligned, checked by the host): 8 elements per step with vector loads/stores (16 bytes for
// bf16, 2 x 16 for f32, 8 for fp8), the last n % 8 elements one by one. The generic kernel
// (runtime dtype switch per element) handles the rest (unaligned pointers, equal dtypes).
#include "common.cuh"
#include "vec.cuh"

extern "C" __global__ void llmq_convert(void* dst, int dt_dst, const void* src, int dt_src, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f(dst, i, dt_dst, load_f(src, i, dt_src));
    }
}

template <class TS, class TD>
__device__ __forceinline__ void convert_v(void* __restrict__ dst, const void* __restrict__ src, long long n) {
    const long long nch = n >> 3, stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll 2
    for (long long q = t0; q < nch; q += stride) {
        float f[8];
        ld8<TS>(src, TS::DT, q * 8, 8, f);
        st8<TD>(dst, TD::DT, q * 8, 8, f);
    }
    for (long long i = nch * 8 + t0; i < n; i += stride) store_f(dst, i, TD::DT, load_f(src, i, TS::DT));
}

#define CONVERT_V(SN, ST, DN, DTAG)                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) llmq_convert_v_##SN##_##DN(void* dst, const void* src, long long n) { \
        convert_v<ST, DTAG>(dst, src, n);                                                                              \
    }
CONVERT_V(f32, F32T, bf16, BF16T)
CONVERT_V(f32, F32T, e4m3, E4M3T)
CONVERT_V(f32, F32T, e5m2, E5M2T)
CONVERT_V(bf16, BF16T, f32, F32T)
CONVERT_V(bf16, BF16T, e4m3, E4M3T)
CONVERT_V(bf16, BF16T, e5m2, E5M2T)
CONVERT_V(e4m3, E4M3T, f32, F32T)
CONVERT_V(e4m3, E4M3T, bf16, BF16T)
CONVERT_V(e4m3, E4M3T, e5m2, E5M2T)
CONVERT_V(e5m2, E5M2T, f32, F32T)
CONVERT_V(e5m2, E5M2T, bf16, BF16T)
CONVERT_V(e5m2, E5M2T, e4m3, E4M3T)

// Row bias for matmuls: out[r, c] = (accumulate ? out[r, c] : 0) + bias[c], rounded once.
// cuBLASLt's BIAS epilogue picked algorithms 6x slower than plain ones for the QKV shapes on the
// H200, so a matmul with a bias writes the bias here first and then runs with beta = 1; both
// compute round(A·B + bias) with an f32 sum, so the numbers are those of the epilogue.
// Pitfall: the generic kernel's 64-bit `i % cols` per element made it cost as much as the QKV
// matmul itself; bias_rows_v (below) has no division.
extern "C" __global__ void llmq_bias_rows(void* out, int dt_out, const void* bias, int dt_bias, long long rows, int cols,
                                          int accumulate) {
    long long n = rows * cols, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float b = load_f(bias, i % cols, dt_bias);
        store_f(out, i, dt_out, accumulate ? load_f(out, i, dt_out) + b : b);
    }
}

// Fast row bias: cols a multiple of 8, out 16-byte aligned. Thread x of the grid owns column chunk
// x (8 columns, whose bias it loads once) and walks rows blockIdx.y, + gridDim.y, ...
// grid (ceil(cols / 8 / 128), row blocks), block 128.
template <class TO>
__device__ __forceinline__ void bias_rows_v(void* out, const void* bias, int dt_bias, int rows, int cols, int accumulate) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch * 8 >= cols) return;
    float b[8];
#pragma unroll
    for (int j = 0; j < 8; j++) b[j] = load_f(bias, ch * 8 + j, dt_bias);
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const long long i = (long long)r * cols + ch * 8;
        float f[8];
        if (accumulate) {
            ld8<TO>(out, TO::DT, i, 8, f);
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] += b[j];
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = b[j];
        }
        st8<TO>(out, TO::DT, i, 8, f);
    }
}
extern "C" __global__ void __launch_bounds__(128) llmq_bias_rows_v_f32(void* out, const void* bias, int dt_bias, int rows, int cols, int acc) {
    bias_rows_v<F32T>(out, bias, dt_bias, rows, cols, acc);
}
extern "C" __global__ void __launch_bounds__(128) llmq_bias_rows_v_bf16(void* out, const void* bias, int dt_bias, int rows, int cols, int acc) {
    bias_rows_v<BF16T>(out, bias, dt_bias, rows, cols, acc);
}

// Exhaustive selftest of the hardware encoders against their references (tests/ops.rs): every
// f32 bit pattern b through f32_to_bf16_bits and bf16x2_bits (x paired with ~x, so NaN halves
// meet non-NaN ones), and rcp_rn_fast(x) against 1.0f / x for every x in [1, 2^126).
// res[0] counts mismatches, res[1] keeps the smallest mismatching pattern (host sets ~0).
extern "C" __global__ void llmq_encode_selftest(unsigned* res) {
    unsigned bad = 0u, first = 0xFFFFFFFFu;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
        const unsigned b = (unsigned)i;
        const float x = __uint_as_float(b), y = __uint_as_float(~b);
        const unsigned want = (unsigned)f32_to_bf16_bits_ref(x) | ((unsigned)f32_to_bf16_bits_ref(y) << 16);
        bool ok = f32_to_bf16_bits(x) == (want & 0xFFFFu) && bf16x2_bits(x, y) == want;
        if (b >= 0x3F800000u && b < 0x7E800000u) ok = ok && __float_as_uint(rcp_rn_fast(x)) == __float_as_uint(1.0f / x);
        if (!ok) {
            bad++;
            first = min(first, b);
        }
    }
    if (bad != 0u) {
        atomicAdd(&res[0], bad);
        atomicMin(&res[1], first);
    }
}
