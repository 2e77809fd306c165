// embedding.cu: token embedding lookup and its deterministic backward.
// Forward: one block per token row n, threads over the C columns; out[n,:] = table[ids[n],:].
// An id outside 0..V writes a NaN row (the GPU cannot return an error synchronously).
// Backward: dtable[v,:] += sum of dout[n,:] over the n with ids[n] == v, in increasing n, without
// atomics. One block per token n: it first scans ids[0..n) and exits unless n is the first
// occurrence of its id; the surviving block then scans ids[n..N) in chunks of blockDim, compacts
// the matches of each chunk in order (warp ballots + per-warp prefix counts) and adds their rows
// into an f32 accumulator row kept in shared memory (thread t owns columns t, t+blockDim, ...),
// started from dtable's value and stored once at the end. Cost O(N^2 / blockDim) id compares.
#include "common.cuh"

extern "C" __global__ void llmq_embedding_fwd(void* out, int dt_out, const int* ids, const void* table, int dt_tab,
                                              int N, int C, int V) {
    int n = blockIdx.x;
    if (n >= N) return;
    int id = ids[n];
    bool ok = id >= 0 && id < V;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = ok ? load_f(table, (long long)id * C + c, dt_tab) : __uint_as_float(0x7FC00000u);
        store_f(out, (long long)n * C + c, dt_out, v);
    }
}

extern "C" __global__ void llmq_embedding_bwd(void* dtable, int dt_tab, const int* ids, const void* dout, int dt_dout,
                                              int N, int C, int V) {
    float* acc = (float*)llmq_dyn_smem;  // [C]
    __shared__ int match[1024];
    __shared__ int warp_cnt[32];
    int n = blockIdx.x;
    if (n >= N) return;
    int id = ids[n];
    if (id < 0 || id >= V) return;
    // 1) is n the first occurrence of id?
    for (int base = 0; base < n; base += blockDim.x) {
        int m = base + threadIdx.x;
        int hit = (m < n && ids[m] == id) ? 1 : 0;
        if (__syncthreads_or(hit)) return;
    }
    for (int c = threadIdx.x; c < C; c += blockDim.x) acc[c] = load_f(dtable, (long long)id * C + c, dt_tab);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    // 2) accumulate matching rows in increasing order
    for (int base = n; base < N; base += blockDim.x) {
        int m = base + threadIdx.x;
        bool hit = m < N && ids[m] == id;
        unsigned ball = __ballot_sync(0xFFFFFFFFu, hit);
        if (lane == 0) warp_cnt[w] = __popc(ball);
        __syncthreads();
        int off = 0, total = 0;
        for (int i = 0; i < nw; i++) {
            if (i < w) off += warp_cnt[i];
            total += warp_cnt[i];
        }
        if (hit) match[off + __popc(ball & ((1u << lane) - 1u))] = m;
        __syncthreads();
        for (int k = 0; k < total; k++) {
            long long row = (long long)match[k] * C;
            for (int c = threadIdx.x; c < C; c += blockDim.x) acc[c] = acc[c] + load_f(dout, row + c, dt_dout);
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < C; c += blockDim.x) store_f(dtable, (long long)id * C + c, dt_tab, acc[c]);
}
