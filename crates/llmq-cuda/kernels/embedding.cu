// embedding.cu: token embedding lookup and its deterministic backward.
// Forward: one block per token row n, threads over the C columns; out[n,:] = table[ids[n],:].
// An id outside 0..V writes a NaN row (the GPU cannot return an error synchronously).
// Backward: dtable[v,:] += sum of dout[n,:] over the n with ids[n] == v, in increasing n, without
// atomics. The keys (id << 32 | n) are sorted (bitonic: shared-memory tiles plus global steps for
// the long strides, see below; an invalid id sorts last and is skipped), so that each id's rows
// stand together in increasing n; embedding_bwd_sorted then gives each run of equal ids to one
// block, whose threads own columns and add the run's rows in order from dtable's value (f32
// sums, one rounding per element), in O(N log^2 N). The keys live in the scratch buffer, which
// bounds N (2^24 rows); the op refuses more.
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

// Bitonic sort of P keys (P the power of two >= N; keys past N are padding ~0, after every real
// key) in two kernels, so that neither N nor the speed is limited by one block:
// - embedding_sort_tile: one block of 1024 threads per tile of L keys (a power of two <= P; dyn
//   smem L x 8 bytes). With fill = 1 it builds the tile's keys from ids and runs the stages of
//   sizes 2 .. L; with fill = 0 it reads the tile and runs the strides L/2 .. 1 of the one stage
//   of size `size` (> L) whose longer strides embedding_sort_step did. Directions come from the
//   global index, so the tiles are pieces of the one network over all P keys.
// - embedding_sort_step: one compare-exchange step (stride >= L) over all P keys in global memory.
// The network, hence the sorted keys, does not depend on L. (One block sorting all 16384 keys of
// a 16 x 1024 micro-batch took 180-200 us; 2048-key tiles spread the work over the GPU.)

// Compare-exchange of pair t of the step (size, stride) on keys k, whose first key has the global
// index base (the direction comes from the global index).
LLMQ_DEV void bitonic_pair(unsigned long long* k, int base, int t, int size, int stride) {
    const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
    const bool up = ((base + lo) & size) == 0;
    const unsigned long long a = k[lo], b = k[hi];
    if ((a > b) == up) {
        k[lo] = b;
        k[hi] = a;
    }
}

LLMQ_DEV void bitonic_stage(unsigned long long* k, int L, int base, int size, int stride0) {
    for (int stride = stride0; stride > 0; stride >>= 1) {
        for (int t = threadIdx.x; t < L / 2; t += blockDim.x) bitonic_pair(k, base, t, size, stride);
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(1024) llmq_embedding_sort_tile(unsigned long long* keys, const int* ids, int N, int V, int L,
                                                                            int fill, int size) {
    unsigned long long* k = (unsigned long long*)llmq_dyn_smem;
    const int base = blockIdx.x * L;
    for (int i = threadIdx.x; i < L; i += blockDim.x) {
        unsigned long long key = ~0ull;  // padding: after every real key
        const int g = base + i;
        if (!fill) {
            key = keys[g];
        } else if (g < N) {
            const int id = ids[g];
            const unsigned hi = (id >= 0 && id < V) ? (unsigned)id : 0xFFFFFFFFu;
            key = ((unsigned long long)hi << 32) | (unsigned)g;
        }
        k[i] = key;
    }
    __syncthreads();
    if (fill) {
        for (int sz = 2; sz <= L; sz <<= 1) bitonic_stage(k, L, base, sz, sz >> 1);
    } else {
        bitonic_stage(k, L, base, size, L >> 1);
    }
    for (int i = threadIdx.x; i < L; i += blockDim.x) keys[base + i] = k[i];
}

// One thread per pair of the step (size, stride) over all P keys.
extern "C" __global__ void llmq_embedding_sort_step(unsigned long long* keys, int P, int size, int stride) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < P / 2) bitonic_pair(keys, 0, t, size, stride);
}

// grid N: block i works only if sorted key i starts a run of its id.
extern "C" __global__ void llmq_embedding_bwd_sorted(void* dtable, int dt_tab, const unsigned long long* keys, const void* dout, int dt_dout,
                                                     int N, int C, int V) {
    const int i = blockIdx.x;
    const unsigned id = (unsigned)(keys[i] >> 32);
    if (id >= (unsigned)V) return;
    if (i > 0 && (unsigned)(keys[i - 1] >> 32) == id) return;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = load_f(dtable, (long long)id * C + c, dt_tab);
        for (int j = i; j < N && (unsigned)(keys[j] >> 32) == id; j++) acc = acc + load_f(dout, (long long)(unsigned)keys[j] * C + c, dt_dout);
        store_f(dtable, (long long)id * C + c, dt_tab, acc);
    }
}
