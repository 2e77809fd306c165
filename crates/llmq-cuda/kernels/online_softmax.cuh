// online_softmax.cuh: one warp's online-softmax attention over key/value rows, shared by the
// simple attention forward (attention.cu) and the KV-cache decode (decode.cu).
//
// A warp holds one query row: lane l keeps dims l, l+32, ..., l+32(NPL-1) of q and of the output
// accumulator o (dims past Hd are zero and never loaded). `add` folds in one key/value row: the
// score s = scale * q.k (a warp_sum of the lanes' partial dot products), then the running max m,
// the running sum l of exp(s - m) and o are rescaled by exp(m_old - m_new), as in FlashAttention.
// The output row is o / l, the row's natural log-sum-exp m + log(l).
// Pitfalls: before the first row m = -inf and l = 0; the first `add` gives corr = exp(-inf) = 0,
// so the state must start at o = 0 (0 * 0, never NaN). A state that saw no row keeps m = -inf,
// which a caller merging several warps' states must weigh by exp(-inf - M) = 0. Both kernels run
// this one sequence of f32 operations (the build disables FMA contraction), so a row folded over
// the same keys rounds alike in both.
#pragma once
#include "common.cuh"

template <int NPL>
struct OnlineSoftmax {
    float q[NPL], o[NPL];
    float m, l;

    // q[d] = x[off + d] for the lane's dims d < Hd; an empty state.
    LLMQ_DEV void start(const void* x, long long off, int dt, int Hd, int lane) {
#pragma unroll
        for (int k = 0; k < NPL; k++) {
            int d = lane + 32 * k;
            q[k] = d < Hd ? load_f(x, off + d, dt) : 0.f;
            o[k] = 0.f;
        }
        m = -INFINITY;
        l = 0.f;
    }

    // Folds in the key row kx[ko + d] and the value row vx[vo + d] (d < Hd, dtype dt_kv).
    LLMQ_DEV void add(const void* kx, long long ko, const void* vx, long long vo, int dt_kv, int Hd, float scale, int lane) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < NPL; k++) {
            int d = lane + 32 * k;
            if (d < Hd) s += q[k] * load_f(kx, ko + d, dt_kv);
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int k = 0; k < NPL; k++) {
            int d = lane + 32 * k;
            if (d < Hd) o[k] = o[k] * corr + p * load_f(vx, vo + d, dt_kv);
        }
        m = mn;
    }
};
