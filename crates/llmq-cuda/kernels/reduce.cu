// reduce.cu: abs-max, sum of squares, column sums, and the fixed-order reduction of per-block
// partial rows used by every deterministic weight-gradient reduction.
// absmax: grid-stride per-thread max of |x| as bits (NaN sorts above inf, so it propagates as on
//   the CPU), block max, then one atomicMax on the float bit pattern into a zeroed slot (max is
//   order-independent, so this is deterministic).
// sum of squares: pass 1 with a fixed grid of G blocks, thread i sums its elements in f64, block
//   tree reduction -> partial[g]; pass 2 (one block) sums partial[0..G) in a fixed tree and
//   writes out[slot] as f32. Same bits on every call.
// colsum: block g sums rows g, g+G, ... per column in f64 -> partial[g, C]; a column reduction
//   adds the G partial rows in a fixed order in f64 and stores (or accumulates) once. The CPU
//   sums rows strictly in order in f64; both round the f64 sum once, so results agree except in
//   rare rounding ties.
// reduce_shards: the local reduction of a reduce-scatter from all-to-all copies (--all-to-all-
//   reduce): out[i] (+)= staged[0][i] + staged[1][i] + ... in f32, strictly in rank order and
//   rounded once, the order every Comm defines (llmq_core::comm), so the bits match NCCL-free
//   host reductions and the CPU. Plain adds (nvcc does not contract a + b into an FMA); dst may
//   be mapped pinned host memory (offloaded gradients).
// The "v" kernels are the dtype-specialised versions (8 elements per 16-byte access, scalar tail
// for sizes not a multiple of 8; the host checks alignment): absmax_v, sumsq_partial_v,
// colsum_partial_v (thread = 8 columns x every 8th row of its block's row set, f64 registers,
// fixed-order combine of the 8 row slots in shared memory) and colreduce32 (32 columns x 32 row
// slots per block instead of one thread walking all G partials). The scalar originals stay as
// the fallback for other dtypes/alignments.
#include "common.cuh"
#include "vec.cuh"

extern "C" __global__ void llmq_reduce_shards(void* dst, int dt, const void* staged, long long S, int world, int accumulate) {
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < S; i += stride) {
        int r = accumulate ? 0 : 1;
        float acc = accumulate ? load_f(dst, i, dt) : load_f(staged, i, dt);
        for (; r < world; r++) acc += load_f(staged, (long long)r * S + i, dt);
        store_f(dst, i, dt, acc);
    }
}

extern "C" __global__ void llmq_absmax(float* out, const void* inp, int dt, long long n) {
    long long stride = (long long)gridDim.x * blockDim.x;
    unsigned m = 0u;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) m = max(m, abs_bits(load_f(inp, i, dt)));
    warp_absmax_commit(out, m);
}

extern "C" __global__ void llmq_sumsq_partial(double* partial, const void* inp, int dt, long long n) {
    __shared__ double red[32];
    long long stride = (long long)gridDim.x * blockDim.x;
    double s = 0.0;
#pragma unroll 8
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double v = (double)load_f(inp, i, dt);
        s += v * v;
    }
    s = block_sum_d(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// One block of 32 * k threads.
extern "C" __global__ void llmq_sumsq_final(float* out, int slot, const double* partial, int G) {
    __shared__ double red[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < G; i += blockDim.x) s += partial[i];
    s = block_sum_d(s, red);
    if (threadIdx.x == 0) out[slot] = (float)s;
}

// grid (ceil(C / blockDim), G)
extern "C" __global__ void llmq_colsum_partial(double* partial, const void* inp, int dt, int R, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int g = blockIdx.y, G = gridDim.y;
    if (c >= C) return;
    double s = 0.0;
    for (int r = g; r < R; r += G) s += (double)load_f(inp, (long long)r * C + c, dt);
    partial[(long long)g * C + c] = s;
}

// out[c] (+)= sum_{g < G} partial[g * ld + c], g in increasing order, in f64; the sum (plus the
// old value when accumulating) is rounded once to f32, then to out's dtype (as the CPU does).
extern "C" __global__ void llmq_colreduce(void* out, int dt_out, const double* partial, int G, int C, int ld, int accumulate) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s = 0.0;
    for (int g = 0; g < G; g++) s += partial[(long long)g * ld + c];
    if (accumulate) s = (double)load_f(out, c, dt_out) + s;
    store_f(out, c, dt_out, (float)s);
}

// ---------------------------------------------------------------------------------------------
// Fast kernels

// out[c] (+)= sum_{g < G} partial[g * ld + c]. Block (32, 32) per 32 columns: thread (x, y) sums
// rows y, y + 32, ... in order (f64), then y = 0 adds the 32 slot sums in order 0..31; the sum
// (plus the old value when accumulating) is rounded once to f32, then to out's dtype.
// (With 8 slots, C / 32 blocks of 8 warps left most SMs idle: 6.5-10 us per call for G = 512 to
// 1024 partial rows, latency-bound.)
extern "C" __global__ void __launch_bounds__(1024) llmq_colreduce32(void* out, int dt_out, const double* partial, int G, int C, int ld,
                                                                    int accumulate) {
    __shared__ double s[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    double v = 0.0;
    if (c < C) {
#pragma unroll 8
        for (int g = threadIdx.y; g < G; g += 32) v += partial[(long long)g * ld + c];
    }
    s[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        double t = 0.0;
#pragma unroll
        for (int k = 0; k < 32; k++) t += s[k][threadIdx.x];
        if (accumulate) t = (double)load_f(out, c, dt_out) + t;
        store_f(out, c, dt_out, (float)t);
    }
}

template <class T>
__device__ __forceinline__ void absmax_v(float* out, const void* inp, long long n) {
    const long long nch = n >> 3, stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned m = 0u;
#pragma unroll 4
    for (long long q = t0; q < nch; q += stride) {
        float f[8];
        ld8<T>(inp, T::DT, q * 8, 8, f);
        m = max(m, absmax8(f));
    }
    for (long long i = nch * 8 + t0; i < n; i += stride) m = max(m, abs_bits(load_f(inp, i, T::DT)));
    block_absmax_commit(out, m);
}
extern "C" __global__ void __launch_bounds__(256) llmq_absmax_v_f32(float* out, const void* inp, long long n) { absmax_v<F32T>(out, inp, n); }
extern "C" __global__ void __launch_bounds__(256) llmq_absmax_v_bf16(float* out, const void* inp, long long n) { absmax_v<BF16T>(out, inp, n); }

// Fixed grid (G blocks of 256, chosen by the host independently of the device).
template <class T>
__device__ __forceinline__ void sumsq_partial_v(double* partial, const void* inp, long long n) {
    __shared__ double red[32];
    const long long nch = n >> 3, stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    double s = 0.0;
#pragma unroll 4
    for (long long q = t0; q < nch; q += stride) {
        float f[8];
        ld8<T>(inp, T::DT, q * 8, 8, f);
#pragma unroll
        for (int j = 0; j < 8; j++) s += (double)f[j] * (double)f[j];
    }
    for (long long i = nch * 8 + t0; i < n; i += stride) {
        double v = (double)load_f(inp, i, T::DT);
        s += v * v;
    }
    s = block_sum_d(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
extern "C" __global__ void __launch_bounds__(256) llmq_sumsq_partial_v_f32(double* partial, const void* inp, long long n) {
    sumsq_partial_v<F32T>(partial, inp, n);
}
extern "C" __global__ void __launch_bounds__(256) llmq_sumsq_partial_v_bf16(double* partial, const void* inp, long long n) {
    sumsq_partial_v<BF16T>(partial, inp, n);
}

// grid (ceil(C / 256), G), block (32, 8); C % 8 == 0. Thread (x, y) of block (bx, g) owns the
// 8 columns of chunk bx * 32 + x and the rows g * 8 + y + k * 8G (k = 0, 1, ...), summed in
// increasing order in f64; the 8 row slots are added in order 0..7 -> partial[g, C].
template <class T>
__device__ __forceinline__ void colsum_partial_v(double* partial, const void* inp, int R, int C) {
    __shared__ double s[8][32][9];
    const int nc = C >> 3, cc = blockIdx.x * 32 + threadIdx.x, g = blockIdx.y, G = gridDim.y;
    double acc[8];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.0;
    if (cc < nc) {
#pragma unroll 4
        for (int r = g * 8 + threadIdx.y; r < R; r += 8 * G) {
            float f[8];
            ld8<T>(inp, T::DT, (long long)r * C + cc * 8, 8, f);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] += (double)f[j];
        }
    }
#pragma unroll
    for (int j = 0; j < 8; j++) s[threadIdx.y][threadIdx.x][j] = acc[j];
    __syncthreads();
    const int t = threadIdx.y * 32 + threadIdx.x, x = t >> 3, j = t & 7;
    const int c = (blockIdx.x * 32 + x) * 8 + j;
    if (c < C) {
        double v = 0.0;
#pragma unroll
        for (int y = 0; y < 8; y++) v += s[y][x][j];
        partial[(long long)g * C + c] = v;
    }
}
extern "C" __global__ void __launch_bounds__(256) llmq_colsum_partial_v_f32(double* partial, const void* inp, int R, int C) {
    colsum_partial_v<F32T>(partial, inp, R, C);
}
extern "C" __global__ void __launch_bounds__(256) llmq_colsum_partial_v_bf16(double* partial, const void* inp, int R, int C) {
    colsum_partial_v<BF16T>(partial, inp, R, C);
}
