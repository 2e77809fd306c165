// loss.cu: fused softmax cross-entropy, in place over logits [R, V] (f32 or bf16).
// Pass 1 keeps a per-thread online (max m_t, s_t = sum exp(x - m_t) in f64, rescaled when the
// max grows); the block combines M = max m_t, S = sum s_t exp(m_t - M) (f64).
// loss = (M + ln S) - x[t] in f64 as on the CPU (which sums exp(x - M) sequentially: the results
// agree to ~1e-7 relative). Pass 2 overwrites the row with dloss * (exp(x - M) * (1/S) - onehot)
// (the CPU divides by S in f64: last-bit differences).
// z-loss (coefficient z, 0 for none): loss += z lse^2 (f64), gradient = dloss (p c - onehot) with
// c = 1 + 2 z lse rounded to f32, which is exactly 1 for z = 0 (the plain loss, bit for bit).
// Rows with target -100 get loss 0 and a zero row. A target outside 0..V cannot be reported as
// an error from the device: the row's loss and gradient become NaN so that it cannot go unseen.
// Fast kernel (cross_entropy_v_{f32,bf16}): a block (512 threads by default) per row, rows in a
// grid-stride loop. The row splits into a scalar head up to the first 16-byte boundary, 16-byte
// chunks of 8 elements, and a scalar tail, so any V and row alignment works. Pass 1 takes the
// chunk's max first and rescales once per chunk. Nothing is kept in shared memory: the row is
// read twice and written once (3 x 2 bytes per bf16 logit); pass 2 walks the chunks in reverse
// (the end of the row was read last, so it is the likeliest to still be in L2) with evict-first
// loads and stores, so that L2 keeps pass-1 data of the rows in flight.
// Pitfall: the target logit must be read before pass 2 overwrites the row: it is read into a
// register before the barriers of the block reductions.
#include "common.cuh"
#include "vec.cuh"

extern "C" __global__ void llmq_cross_entropy(void* logits, int dt, float* losses, const int* targets, int R, int V, float dloss, float z) {
    __shared__ float red[32];
    __shared__ double redd[32];
    int r = blockIdx.x;
    if (r >= R) return;
    long long base = (long long)r * V;
    int tgt = targets[r];
    if (tgt == -100) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) store_f(logits, base + j, dt, 0.f);
        if (threadIdx.x == 0) losses[r] = 0.f;
        return;
    }
    if (tgt < 0 || tgt >= V) {
        float nan = __uint_as_float(0x7FC00000u);
        for (int j = threadIdx.x; j < V; j += blockDim.x) store_f(logits, base + j, dt, nan);
        if (threadIdx.x == 0) losses[r] = nan;
        return;
    }
    // pass 1: per-thread online (max, sum of exp relative to that max, in f64)
    float m = -INFINITY;
    double s = 0.0;
#pragma unroll 4
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float x = load_f(logits, base + j, dt);
        if (x > m) {
            s = s * (double)expf(m - x);
            m = x;
        }
        if (m != -INFINITY) s += (double)expf(x - m);
    }
    float xt = load_f(logits, base + tgt, dt);
    float M = block_max(m, red);
    double S = block_sum_d(m == -INFINITY ? 0.0 : s * exp((double)m - (double)M), redd);
    double lse = (double)M + log(S);
    if (threadIdx.x == 0) losses[r] = (float)((lse - (double)xt) + (double)z * lse * lse);
    // pass 2: gradient, in place (every thread has read xt before the barriers above)
    float invS = (float)(1.0 / S);
    float c = (float)(1.0 + 2.0 * (double)z * lse);
#pragma unroll 4
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float p = expf(load_f(logits, base + j, dt) - M) * invS;
        store_f(logits, base + j, dt, dloss * (p * c - (j == tgt ? 1.f : 0.f)));
    }
}

// ---------------------------------------------------------------------------------------------
// Fast kernel

LLMQ_DEV void ce_online(float x, float& m, double& s) {
    if (x > m) {
        s = s * (double)expf(m - x);
        m = x;
    }
    if (m != -INFINITY) s += (double)expf(x - m);
}

template <class T>
__device__ __forceinline__ void cross_entropy_v(void* logits, float* losses, const int* targets, int R, int V, float dloss, float z) {
    __shared__ float red[32];
    __shared__ double redd[32];
    const int esz = T::DT == DT_F32 ? 4 : 2;
    for (int r = blockIdx.x; r < R; r += gridDim.x) {
        const long long base = (long long)r * V;
        const unsigned long long addr = (unsigned long long)logits + (unsigned long long)(base * esz);
        const int head = min(V, (int)(((16ull - (addr & 15ull)) & 15ull) / esz));  // scalar elements before the first 16-byte boundary
        const int nb = (V - head) >> 3;                                             // whole chunks
        const int body_end = head + nb * 8;
        const int nscal = head + (V - body_end);  // head + tail scalars
        const long long bb = base + head;          // first chunk element
        const int tgt = targets[r];
        if (tgt == -100 || tgt < 0 || tgt >= V) {
            const float fill = tgt == -100 ? 0.f : __uint_as_float(0x7FC00000u);
            for (int q = threadIdx.x; q < nb; q += blockDim.x) {
                float f[8];
#pragma unroll
                for (int j = 0; j < 8; j++) f[j] = fill;
                st8<T, 1>(logits, T::DT, bb + (long long)q * 8, 8, f);
            }
            for (int k = threadIdx.x; k < nscal; k += blockDim.x) {
                const int e = k < head ? k : body_end + (k - head);
                store_f(logits, base + e, T::DT, fill);
            }
            if (threadIdx.x == 0) losses[r] = fill;
            continue;  // uniform over the block
        }
        // pass 1
        float m = -INFINITY;
        double s = 0.0;
        for (int k = threadIdx.x; k < nscal; k += blockDim.x) {
            const int e = k < head ? k : body_end + (k - head);
            ce_online(load_f(logits, base + e, T::DT), m, s);
        }
#pragma unroll 4
        for (int q = threadIdx.x; q < nb; q += blockDim.x) {
            float f[8];
            ld8<T>(logits, T::DT, bb + (long long)q * 8, 8, f);
            float cm = f[0];
#pragma unroll
            for (int j = 1; j < 8; j++) cm = f[j] > cm ? f[j] : cm;
            if (cm > m) {
                s = s * (double)expf(m - cm);
                m = cm;
            }
            if (m != -INFINITY) {
#pragma unroll
                for (int j = 0; j < 8; j++) s += (double)expf(f[j] - m);
            }
        }
        const float xt = threadIdx.x == 0 ? load_f(logits, base + tgt, T::DT) : 0.f;  // before any pass-2 write
        const float M = block_max(m, red);
        const double S = block_sum_d(m == -INFINITY ? 0.0 : s * exp((double)m - (double)M), redd);
        const double lse = (double)M + log(S);
        if (threadIdx.x == 0) losses[r] = (float)((lse - (double)xt) + (double)z * lse * lse);
        // pass 2 (reverse chunk order), in place
        const float invS = (float)(1.0 / S);
        const float c = (float)(1.0 + 2.0 * (double)z * lse);
        for (int q = nb - 1 - (int)threadIdx.x; q >= 0; q -= blockDim.x) {
            float f[8];
            const long long e0 = bb + (long long)q * 8;
            ld8<T, 1>(logits, T::DT, e0, 8, f);
            const int j0 = head + q * 8;  // column of f[0]
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float p = expf(f[j] - M) * invS;
                f[j] = dloss * (p * c - (j0 + j == tgt ? 1.f : 0.f));
            }
            st8<T, 1>(logits, T::DT, e0, 8, f);
        }
        for (int k = threadIdx.x; k < nscal; k += blockDim.x) {
            const int e = k < head ? k : body_end + (k - head);
            const float p = expf(load_f(logits, base + e, T::DT) - M) * invS;
            store_f(logits, base + e, T::DT, dloss * (p * c - (e == tgt ? 1.f : 0.f)));
        }
        __syncthreads();  // the next row's block_max reuses `red` (and the loss store ordering is irrelevant)
    }
}

extern "C" __global__ void __launch_bounds__(1024) llmq_cross_entropy_v_f32(void* logits, float* losses, const int* targets, int R, int V,
                                                                            float dloss, float z) {
    cross_entropy_v<F32T>(logits, losses, targets, R, V, dloss, z);
}
extern "C" __global__ void __launch_bounds__(1024) llmq_cross_entropy_v_bf16(void* logits, float* losses, const int* targets, int R, int V,
                                                                             float dloss, float z) {
    cross_entropy_v<BF16T>(logits, losses, targets, R, V, dloss, z);
}
