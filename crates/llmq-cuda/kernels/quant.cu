// quant.cu: fp8 quantisation with current (just-in-time) scaling, its transposing variant, and a
// plain bit-exact transpose.
// scale = FP8_MAX / max(absmax, 1e-10) (448 for e4m3, 57344 for e5m2), out = sat_rne(x * scale),
// descale = 1 / scale: the same IEEE f32 operations as the CPU backend, hence the same bytes.
// Transposes go through 32x32 shared-memory tiles (padded by one element against bank
// conflicts) so that both the global reads and writes are coalesced; rows/cols need not be
// multiples of 32.
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
