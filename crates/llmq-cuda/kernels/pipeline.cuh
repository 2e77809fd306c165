// pipeline.cuh: Hopper (sm_90a) primitives for producer/consumer kernels: mbarriers, TMA tile
// loads, named barriers and register reallocation between warpgroups.
//
// mbarrier phases: a barrier initialised with count n completes a phase when n arrivals (and,
// for TMA, the expected transaction bytes) are in; waiters name the phase by its parity (0 for
// the first, then alternating). A "full" barrier per stage says the stage's tiles have landed
// (TMA: one arrive.expect_tx plus the bytes); an "empty" barrier says every consumer has finished
// reading the stage. TMA writes through the async proxy, which wgmma also reads through, so no
// proxy fence is needed between a TMA load and the wgmma that reads it.
// Pitfalls: initialise barriers before any thread uses them (mbar_init, then __syncthreads);
// the tensor map must live in kernel parameter space (__grid_constant__) or global memory;
// setmaxnreg's totals across the block must fit the register file the block was launched with.
#pragma once

// A CUtensorMap (opaque, 128 bytes, 64-byte aligned) passed by value as a kernel parameter.
struct alignas(64) TmaDesc {
    unsigned long long v[16];
};

#ifdef LLMQ_WGMMA

LLMQ_DEV unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

LLMQ_DEV void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
LLMQ_DEV void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// One arrival that also expects `bytes` of TMA transactions in the current phase.
LLMQ_DEV void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// Blocks until the phase of parity `parity` has completed.
LLMQ_DEV void mbar_wait(unsigned long long* bar, unsigned parity) {
    const unsigned a = smem_u32(bar);
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(a), "r"(parity)
            : "memory");
    } while (!done);
}

// Box (c0, c1, c2) of a 3-D tensor map into shared memory; completes bytes on `bar`.
LLMQ_DEV void tma_load_3d(void* dst, const TmaDesc* map, int c0, int c1, int c2, unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(smem_u32(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
}
LLMQ_DEV void tma_prefetch_desc(const TmaDesc* map) { asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory"); }

// Named barriers (ids 1..15; 0 is __syncthreads): n threads in all, a multiple of 32.
LLMQ_DEV void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
LLMQ_DEV void named_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

// Per-thread register budget of the calling warpgroup (all its threads execute it).
template <int N>
LLMQ_DEV void regs_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
LLMQ_DEV void regs_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Pins A-fragment registers read by an in-flight wgmma until after its wg_wait (else ptxas may
// reuse them early and serialise every wgmma of the kernel: advisory C7513).
template <int N>
LLMQ_DEV void wg_keep_frags(unsigned (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}
#endif
