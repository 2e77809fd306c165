// convert.cu: dtype conversion dst = convert(src) over n elements (grid-stride loop).
// Decode to f32 exactly, encode with the shared RNE / saturating encoders of common.cuh, so the
// bytes equal the CPU backend's. Pitfall: n can exceed 2^31, so indices are 64-bit.
#include "common.cuh"

extern "C" __global__ void llmq_convert(void* dst, int dt_dst, const void* src, int dt_src, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        store_f(dst, i, dt_dst, load_f(src, i, dt_src));
    }
}
