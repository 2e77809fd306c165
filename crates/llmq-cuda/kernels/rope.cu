// rope.cu: rotate-half (NeoX/HF) rotary embedding on the q and k heads of qkv [N, (Hq+2Hkv) Hd];
// v heads are copied. freqs f32 [T, Hd/2, 2] = (cos, sin); row n has position n % T.
// Forward: y[i] = x[i] c - x[i+Hd/2] s, y[i+Hd/2] = x[i+Hd/2] c + x[i] s.
// Backward is the transpose (rotation by -angle): y[i] = x[i] c + x[i+Hd/2] s,
// y[i+Hd/2] = x[i+Hd/2] c - x[i] s. One thread per (row, head, pair i); the optional abs-max
// covers the whole (rounded) output, v part included.
#include "common.cuh"

extern "C" __global__ void llmq_rope(void* out, int dt_out, const void* inp, int dt_in, const float* freqs,
                                     int N, int T, int Hq, int Hkv, int Hd, int backward, float* absmax) {
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
