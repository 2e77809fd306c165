// rope.cu: rotate-half (NeoX/HF) rotary embedding on the q and k heads of qkv [N, (Hq+2Hkv) Hd];
// v heads are copied. freqs f32 [T, Hd/2, 2] = (cos, sin); row n has position n % T.
// Forward: y[i] = x[i] c - x[i+Hd/2] s, y[i+Hd/2] = x[i+Hd/2] c + x[i] s.
// Backward is the transpose (rotation by -angle): y[i] = x[i] c + x[i+Hd/2] s,
// y[i+Hd/2] = x[i+Hd/2] c - x[i] s. Plain f32 products and sums (no FMA contraction): bit-exact
// with the CPU. The optional abs-max covers the whole (rounded) output, v part included.
// Generic kernel: one thread per (row, head, pair i). Fast kernel (rope_v_{f32,bf16}; Hd % 16
// == 0, one dtype, 16-byte aligned, fewer than 2^31 chunks): one thread per (row, head, 8
// pairs): two 16-byte loads (x[i..i+8], x[i+Hd/2..]), four 16-byte loads of (cos, sin) (a
// small table that stays in L1/L2), two 16-byte stores; 32-bit index arithmetic.
// In place (out == inp) works: every element is read before the same thread writes it.
// Optional bias [Q] (forward; dtype dt_bias, null: none): x = inp + bias in f32 before the
// rotation, v heads included (the QKV matmul's bias, fused here; the CPU adds it the same way).
#include "common.cuh"
#include "vec.cuh"

extern "C" __global__ void llmq_rope(void* out, int dt_out, const void* inp, int dt_in, const float* freqs,
                                     int N, int T, int Hq, int Hkv, int Hd, int backward, const void* bias, int dt_bias,
                                     float* absmax) {
    int H = Hq + 2 * Hkv, half = Hd / 2;
    long long total = (long long)N * H * half;
    long long stride = (long long)gridDim.x * blockDim.x;
    unsigned amax = 0u;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        int i = (int)(idx % half);
        long long nh = idx / half;
        int h = (int)(nh % H);
        int n = (int)(nh / H);
        long long base = nh * Hd;
        float x1 = load_f(inp, base + i, dt_in), x2 = load_f(inp, base + i + half, dt_in);
        if (bias != nullptr) {
            x1 += load_f(bias, (long long)h * Hd + i, dt_bias);
            x2 += load_f(bias, (long long)h * Hd + i + half, dt_bias);
        }
        float y1, y2;
        if (h >= Hq + Hkv) {
            y1 = x1;
            y2 = x2;
        } else {
            int t = n % T;
            float c = freqs[((long long)t * half + i) * 2], s = freqs[((long long)t * half + i) * 2 + 1];
            if (!backward) {
                y1 = x1 * c - x2 * s;
                y2 = x2 * c + x1 * s;
            } else {
                y1 = x1 * c + x2 * s;
                y2 = x2 * c - x1 * s;
            }
        }
        y1 = store_f(out, base + i, dt_out, y1);
        y2 = store_f(out, base + i + half, dt_out, y2);
        amax = max(amax, max(abs_bits(y1), abs_bits(y2)));
    }
    warp_absmax_commit(absmax, amax);
}

// ---------------------------------------------------------------------------------------------
// Fast kernel

template <class T>
__device__ __forceinline__ void rope_v(void* out, const void* inp, const float* freqs, int N, int Tn, int Hq, int Hkv, int Hd,
                                       int backward, const void* bias, int dt_bias, float* absmax) {
    const unsigned H = Hq + 2 * Hkv, half = Hd / 2, hc = half >> 3, rc = H * hc;
    const unsigned total = (unsigned)N * rc;
    const unsigned stride = gridDim.x * blockDim.x;
    unsigned amax = 0u;
    for (unsigned q = blockIdx.x * blockDim.x + threadIdx.x; q < total; q += stride) {
        const unsigned n = q / rc, rem = q - n * rc, h = rem / hc, i8 = rem - h * hc;
        const long long base = ((long long)n * H + h) * Hd + i8 * 8;
        float x1[8], x2[8];
        ld8<T>(inp, T::DT, base, 8, x1);
        ld8<T>(inp, T::DT, base + half, 8, x2);
        if (bias != nullptr) {
            const int bc = h * Hd + i8 * 8;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                x1[j] += load_f(bias, bc + j, dt_bias);
                x2[j] += load_f(bias, bc + half + j, dt_bias);
            }
        }
        if (h < (unsigned)(Hq + Hkv)) {
            const float4* fp = (const float4*)(freqs + ((long long)(n % (unsigned)Tn) * half + i8 * 8) * 2);
            float cs[16];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float4 v = fp[k];
                cs[4 * k] = v.x, cs[4 * k + 1] = v.y, cs[4 * k + 2] = v.z, cs[4 * k + 3] = v.w;
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float c = cs[2 * j], s = cs[2 * j + 1], a = x1[j], b = x2[j];
                if (!backward) {
                    x1[j] = a * c - b * s;
                    x2[j] = b * c + a * s;
                } else {
                    x1[j] = a * c + b * s;
                    x2[j] = b * c - a * s;
                }
            }
        }
        amax = max(amax, st8<T>(out, T::DT, base, 8, x1));
        amax = max(amax, st8<T>(out, T::DT, base + half, 8, x2));
    }
    block_absmax_commit(absmax, amax);
}

extern "C" __global__ void __launch_bounds__(256) llmq_rope_v_f32(void* out, const void* inp, const float* freqs, int N, int Tn, int Hq,
                                                                  int Hkv, int Hd, int backward, const void* bias, int dt_bias,
                                                                  float* absmax) {
    rope_v<F32T>(out, inp, freqs, N, Tn, Hq, Hkv, Hd, backward, bias, dt_bias, absmax);
}
extern "C" __global__ void __launch_bounds__(256) llmq_rope_v_bf16(void* out, const void* inp, const float* freqs, int N, int Tn, int Hq,
                                                                   int Hkv, int Hd, int backward, const void* bias, int dt_bias,
                                                                   float* absmax) {
    rope_v<BF16T>(out, inp, freqs, N, Tn, Hq, Hkv, Hd, backward, bias, dt_bias, absmax);
}
