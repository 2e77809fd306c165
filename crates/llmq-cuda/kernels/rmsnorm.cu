// rmsnorm.cu: RMSNorm forward (optionally fused with the residual add) and backward.
// Numerics (all paths): the row's sum of squares is accumulated in f64 (the CPU sums the row
// sequentially in f64: the f32 mean then agrees except in rare rounding ties), rstd =
// 1/sqrt(mean + eps) in f32, out = (x * rstd) * w rounded to out's dtype; the optional abs-max is
// taken over the rounded outputs. The fused variant first writes res = round(x + delta) and
// normalises the *rounded* residual. Backward: g = w*dout, xhat = x*rstd, c = mean(g*xhat) (f64
// sum), dx = rstd * (g - xhat * c) (+ dres): the same f32 operations as the CPU backend.
//
// Fast ("v") kernels, used for every shape: a team of W warps (W = 1, 2, 4, 8; 8 warps per
// block) owns one row; lane l of the team owns the 8-element chunks l, l + 32W, ... (at most 4,
// kept in registers between the two passes, so each row is read once). Row sums: warp shuffle
// tree, then the W warp sums in fixed order through shared memory with a named barrier per team.
// The summation order depends only on C (through W), never on dtypes or pointer alignment:
// typed instantiations (f32, bf16: 16-byte vector access) and the AnyT one (runtime dtypes,
// misaligned or partial chunks) give the same rstd, so residual_rmsnorm_fwd and a later
// rmsnorm_fwd(res) agree bit for bit whichever instantiations they get.
// Backward weight gradient, two stages, no atomics: each lane sums dout*xhat of its columns over
// the rows its team handles (about 4, f32, in shared memory), the teams of a block are added in
// fixed order in f64 and written as partial[block, C]; llmq_colreduce32 then sums the G partial
// rows in a fixed order (G depends on N and C only, so results are the same bits on every call
// and every device).
// The original warp-per-row kernels (one element per lane) run where the team kernels do not
// apply: rows wider than 8192 (forward) or 4096 (backward: its dw sums in shared memory).
// Pitfall: dx may alias dres and res_out may alias x (in place); every element is read before
// the same thread writes it, so nothing here may be __restrict__.
#include "common.cuh"
#include "vec.cuh"

// One warp per row (blockDim/32 rows per block): no block-wide barriers, the second pass over
// the row hits L1.
extern "C" __global__ void llmq_rmsnorm_fwd(void* out, int dt_out, float* rstd_out, const void* x, int dt_x,
                                            const void* w, int dt_w, int N, int C, float eps, float* absmax) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    unsigned amax = 0u;
    if (n < N) {
        long long base = (long long)n * C;
        double ss = 0.0;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            double v = (double)load_f(x, base + c, dt_x);
            ss += v * v;
        }
        ss = warp_sum_d(ss);
        float rstd = 1.0f / sqrtf((float)(ss / (double)C) + eps);
        if (lane == 0) rstd_out[n] = rstd;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float v = load_f(x, base + c, dt_x);
            float y = store_f(out, base + c, dt_out, v * rstd * load_f(w, c, dt_w));
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// One warp per row; the second pass re-reads the rounded residual that the same thread stored
// (an L1/L2 hit), which also keeps an in-place call (res_out == x) correct.
extern "C" __global__ void llmq_residual_rmsnorm_fwd(void* res_out, int dt_res, void* out, int dt_out, float* rstd_out,
                                                     const void* x, int dt_x, const void* delta, int dt_d,
                                                     const void* w, int dt_w, int N, int C, float eps, float* absmax) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    unsigned amax = 0u;
    if (n < N) {
        long long base = (long long)n * C;
        double ss = 0.0;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float v = store_f(res_out, base + c, dt_res, load_f(x, base + c, dt_x) + load_f(delta, base + c, dt_d));
            ss += (double)v * (double)v;
        }
        ss = warp_sum_d(ss);
        float rstd = 1.0f / sqrtf((float)(ss / (double)C) + eps);
        if (lane == 0) rstd_out[n] = rstd;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float v = load_f(res_out, base + c, dt_res);  // this thread's own store (x may alias res_out)
            float y = store_f(out, base + c, dt_out, v * rstd * load_f(w, c, dt_w));
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// dx: one warp per row. The weight gradient is a separate column reduction
// (llmq_rmsnorm_dw_partial + llmq_colreduce).
extern "C" __global__ void llmq_rmsnorm_bwd(void* dx, int dt_dx, const void* dout, int dt_dout,
                                            const void* x, int dt_x, const void* w, int dt_w, const float* rstd,
                                            const void* dres, int dt_dres, int N, int C, float* absmax) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    unsigned amax = 0u;
    if (n < N) {
        long long base = (long long)n * C;
        float rs = rstd[n];
        double dot = 0.0;
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float dy = load_f(dout, base + c, dt_dout);
            float xh = load_f(x, base + c, dt_x) * rs;
            dot += (double)((load_f(w, c, dt_w) * dy) * xh);
        }
        float cm = (float)(warp_sum_d(dot) / (double)C);
#pragma unroll 4
        for (int c = lane; c < C; c += 32) {
            float dy = load_f(dout, base + c, dt_dout);
            float xh = load_f(x, base + c, dt_x) * rs;
            float g = rs * (load_f(w, c, dt_w) * dy - xh * cm);
            if (dres != nullptr) g = load_f(dres, base + c, dt_dres) + g;
            float y = store_f(dx, base + c, dt_dx, g);
            amax = max(amax, abs_bits(y));
        }
    }
    warp_absmax_commit(absmax, amax);
}

// partial[g, c] = sum over rows n = g, g+G, ... of dout[n, c] * (x[n, c] * rstd[n]) in f64.
// grid (ceil(C / blockDim), G): threads run along a row, so loads are coalesced.
extern "C" __global__ void llmq_rmsnorm_dw_partial(double* partial, const void* dout, int dt_dout, const void* x, int dt_x,
                                                   const float* rstd, int N, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int g = blockIdx.y, G = gridDim.y;
    if (c >= C) return;
    double s = 0.0;
#pragma unroll 4
    for (int n = g; n < N; n += G) {
        long long i = (long long)n * C + c;
        s += (double)(load_f(dout, i, dt_dout) * (load_f(x, i, dt_x) * rstd[n]));
    }
    partial[(long long)g * C + c] = s;
}

// ---------------------------------------------------------------------------------------------
// Fast kernels (see the top of the file)

#define RMS_THREADS 256
#define RMS_CPL 4  // chunks (of 8 elements) per lane

LLMQ_DEV void team_sync(int team, int W) { asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(W * 32) : "memory"); }

// f64 sum over a team of W warps: warp tree, then warps 0..W-1 in order. red: 64 doubles.
LLMQ_DEV double team_sum_d(double v, double* red, int team, int W) {
    v = warp_sum_d(v);
    if (W == 1) return v;
    int wt = (threadIdx.x >> 5) - team * W;
    if ((threadIdx.x & 31) == 0) red[team * 8 + wt] = v;
    team_sync(team, W);
    double t = 0.0;
    for (int k = 0; k < W; k++) t += red[team * 8 + k];
    team_sync(team, W);  // all have read before the next call writes
    return t;
}

template <class T, bool RES>
__device__ __forceinline__ void rms_fwd_v(void* res_out, int dt_res, void* out, int dt_out, float* rstd_out, const void* x, int dt_x,
                        const void* delta, int dt_d, const void* w, int dt_w, int N, int C, float eps, float* absmax, int W) {
    __shared__ double red[64];
    const int tw = 32 * W, team = threadIdx.x / tw, tl = threadIdx.x - team * tw;
    const int n = blockIdx.x * (blockDim.x / tw) + team;
    const int nc = (C + 7) >> 3;
    unsigned amax = 0u;
    if (n < N) {  // uniform per team: the team barriers stay inside
        const long long base = (long long)n * C;
        float v[RMS_CPL][8];
        // Every load of the row first, without a branch per chunk (a lane past the row's end
        // re-reads the last chunk and ignores it): behind a branch each, a chunk's loads waited
        // for the previous chunk's arithmetic, and the residual store (which may alias x) kept
        // the compiler from hoisting them.
#pragma unroll
        for (int k = 0; k < RMS_CPL; k++) {
            const int c8 = min(k * tw + tl, nc - 1);
            const int nv = min(8, C - c8 * 8);
            ld8<T>(x, dt_x, base + c8 * 8, nv, v[k]);
            if (RES) {
                float d[8];
                ld8<T>(delta, dt_d, base + c8 * 8, nv, d);
#pragma unroll
                for (int j = 0; j < 8; j++) v[k][j] = v[k][j] + d[j];
            }
        }
        double ss = 0.0;
#pragma unroll
        for (int k = 0; k < RMS_CPL; k++) {
            const int c8 = k * tw + tl;
            if (c8 < nc) {
                if (RES) st8<T>(res_out, dt_res, base + c8 * 8, min(8, C - c8 * 8), v[k]);  // v: the rounded residual
#pragma unroll
                for (int j = 0; j < 8; j++) ss += (double)v[k][j] * (double)v[k][j];
            }
        }
        ss = team_sum_d(ss, red, team, W);
        const float rs = 1.0f / sqrtf((float)(ss / (double)C) + eps);
        if (tl == 0) rstd_out[n] = rs;
#pragma unroll
        for (int k = 0; k < RMS_CPL; k++) {
            const int c8 = k * tw + tl;
            if (c8 < nc) {
                const int nv = min(8, C - c8 * 8);
                float wv[8], y[8];
                ld8<AnyT>(w, dt_w, c8 * 8, nv, wv);
#pragma unroll
                for (int j = 0; j < 8; j++) y[j] = v[k][j] * rs * wv[j];
                amax = max(amax, st8<T>(out, dt_out, base + c8 * 8, nv, y));
            }
        }
    }
    block_absmax_commit(absmax, amax);
}

// Backward: lane l of the team owns the chunks l, l + 32W, ... of its rows; pass 2 reads dout and
// x again (L1/L2 hits: the team read them a moment before). The lane's dw sums (f32, rows in
// order) live in shared memory, not registers, so that four blocks fit per SM: at 128 registers
// (row cache and sums in registers) two did, and the kernel was latency-bound at 24% occupancy.
// Their layout is float4 [2][nc]: elements 0-3 of chunk c8 at [0][c8], 4-7 at [1][c8], so a
// warp's update is two conflict-free 16-byte accesses per chunk. (Element-wise at c8 * 8 + j,
// lanes 32 bytes apart hit the same bank 8 ways: 96 us per 16k x 1536 call, 2.1 TB/s.)
template <class T>
__device__ __forceinline__ void rms_bwd_v(void* dx, int dt_dx, const void* dout, int dt_dout, const void* x, int dt_x,
                                          const void* w, int dt_w, const float* rstd, const void* dres, int dt_dres,
                                          double* partial, int N, int C, float* absmax, int W) {
    __shared__ double red[64];
    const int tw = 32 * W, teams = blockDim.x / tw, team = threadIdx.x / tw, tl = threadIdx.x - team * tw;
    const int nc = (C + 7) >> 3;
    float4* acc = (float4*)llmq_dyn_smem + (long long)team * 2 * nc;  // this team's dw sums (dyn smem: teams x 2 x nc float4)
    for (int i = tl; i < 2 * nc; i += tw) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    unsigned amax = 0u;
    // f(c8, nv, dy, xv, wv) for each chunk c8 of the row at `base` that this lane owns. (Loading
    // two or four chunks ahead, as the forward does, spills at the 64-register bound of four
    // blocks per SM.)
    auto each_chunk = [&](long long base, auto&& f) {
#pragma unroll
        for (int k = 0; k < RMS_CPL; k++) {
            const int c8 = k * tw + tl;
            if (c8 < nc) {
                const int nv = min(8, C - c8 * 8);
                float dy[8], xv[8], wv[8];
                ld8<T>(dout, dt_dout, base + c8 * 8, nv, dy);
                ld8<T>(x, dt_x, base + c8 * 8, nv, xv);
                ld8<AnyT>(w, dt_w, c8 * 8, nv, wv);
                f(c8, nv, dy, xv, wv);
            }
        }
    };
    for (int n = blockIdx.x * teams + team; n < N; n += gridDim.x * teams) {
        const long long base = (long long)n * C;
        const float rs = rstd[n];
        double dot = 0.0;
        each_chunk(base, [&](int c8, int, const float(&dy)[8], const float(&xv)[8], const float(&wv)[8]) {
            float dw[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float xh = xv[j] * rs;
                dot += (double)((wv[j] * dy[j]) * xh);
                dw[j] = dy[j] * xh;  // 0 past C (ld8 fills zeros there); never read back
            }
            float4 lo = acc[c8], hi = acc[nc + c8];
            lo.x += dw[0], lo.y += dw[1], lo.z += dw[2], lo.w += dw[3];
            hi.x += dw[4], hi.y += dw[5], hi.z += dw[6], hi.w += dw[7];
            acc[c8] = lo;
            acc[nc + c8] = hi;
        });
        const float cm = (float)(team_sum_d(dot, red, team, W) / (double)C);
        each_chunk(base, [&](int c8, int nv, const float(&dy)[8], const float(&xv)[8], const float(&wv)[8]) {
            float g[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float xh = xv[j] * rs;
                g[j] = rs * (wv[j] * dy[j] - xh * cm);
            }
            if (dres != nullptr) {
                float r[8];
                ld8<T>(dres, dt_dres, base + c8 * 8, nv, r);
#pragma unroll
                for (int j = 0; j < 8; j++) g[j] = r[j] + g[j];
            }
            amax = max(amax, st8<T>(dx, dt_dx, base + c8 * 8, nv, g));
        });
    }
    // dw: each column's team sums added in team order 0, 1, ... in f64, one partial row per block
    __syncthreads();
    const float* acc0 = (const float*)llmq_dyn_smem;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const int at = (((c & 7) >> 2) * nc + (c >> 3)) * 4 + (c & 3);  // element c in the float4 [2][nc] layout
        double v = 0.0;
        for (int t = 0; t < teams; t++) v += (double)acc0[(long long)t * 8 * nc + at];
        partial[(long long)blockIdx.x * C + c] = v;
    }
    block_absmax_commit(absmax, amax);
}

#define RMS_V_ENTRIES(SUF, T)                                                                                              \
    extern "C" __global__ void __launch_bounds__(RMS_THREADS) llmq_rmsnorm_fwd_v_##SUF(                                    \
        void* out, int dt_out, float* rstd, const void* x, int dt_x, const void* w, int dt_w, int N, int C, float eps,      \
        float* absmax, int W) {                                                                                             \
        rms_fwd_v<T, false>(nullptr, 0, out, dt_out, rstd, x, dt_x, nullptr, 0, w, dt_w, N, C, eps, absmax, W);            \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(RMS_THREADS) llmq_residual_rmsnorm_fwd_v_##SUF(                           \
        void* res_out, int dt_res, void* out, int dt_out, float* rstd, const void* x, int dt_x, const void* delta, int dt_d, \
        const void* w, int dt_w, int N, int C, float eps, float* absmax, int W) {                                          \
        rms_fwd_v<T, true>(res_out, dt_res, out, dt_out, rstd, x, dt_x, delta, dt_d, w, dt_w, N, C, eps, absmax, W);       \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(RMS_THREADS, 4) llmq_rmsnorm_bwd_v_##SUF(                                    \
        void* dx, int dt_dx, const void* dout, int dt_dout, const void* x, int dt_x, const void* w, int dt_w,               \
        const float* rstd, const void* dres, int dt_dres, double* partial, int N, int C, float* absmax, int W) {           \
        rms_bwd_v<T>(dx, dt_dx, dout, dt_dout, x, dt_x, w, dt_w, rstd, dres, dt_dres, partial, N, C, absmax, W);           \
    }

RMS_V_ENTRIES(f32, F32T)
RMS_V_ENTRIES(bf16, BF16T)
RMS_V_ENTRIES(any, AnyT)
