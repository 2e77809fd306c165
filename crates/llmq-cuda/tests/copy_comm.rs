//! `CopyComm` (copy-engine collectives of ranks as threads) against the CPU collectives
//! (`ThreadComm` over CPU backends) with the same random inputs per rank: several ranks on GPU 0
//! (a backend per rank on the same card exercises the same events and copies as one card per
//! rank), and on GPUs 0..N where several are present. Data movement must be bit-exact.
//! Skips without a CUDA device (fails instead under LLMQ_REQUIRE_GPU=1).

mod common;

use common::Rng;
use llmq_core::cpu::CpuBackend;
use llmq_core::{Backend, Comm, DType, Mem, MemCategory, ReduceOp, Stream, Tensor, ThreadComm};
use llmq_cuda::{cuda_available, CopyComm, CudaBackend};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// One rank of a test: its GPU backend and copy collectives, and the CPU reference.
struct Rank {
    r: usize,
    world: usize,
    gpu: CudaBackend,
    cc: CopyComm,
    cpu: CpuBackend,
    tc: ThreadComm,
    rng: Rng,
    failures: Vec<String>,
}

/// A tensor on both sides.
#[derive(Clone, Copy)]
struct T2 {
    c: Tensor,
    g: Tensor,
}

impl Rank {
    fn bytes(&mut self, dtype: DType, n: usize, b: &[u8], mem: Mem) -> T2 {
        let c = self.cpu.alloc(MemCategory::Other, Mem::Device, dtype, &[n]).unwrap();
        let g = self.gpu.alloc(MemCategory::Other, mem, dtype, &[n]).unwrap();
        self.cpu.upload(&c, b).unwrap();
        self.gpu.upload(&g, b).unwrap();
        T2 { c, g }
    }
    fn rand(&mut self, dtype: DType, n: usize) -> T2 {
        let b: Vec<u8> = (0..n * dtype.size()).map(|_| self.rng.next_u64() as u8).collect();
        self.bytes(dtype, n, &b, Mem::Device)
    }
    fn exact(&mut self, name: &str, t: &T2) {
        let (c, g) = (self.cpu.download(&t.c).unwrap(), self.gpu.download(&t.g).unwrap());
        if c != g {
            let first = c.iter().zip(&g).position(|(a, b)| a != b).unwrap();
            self.failures.push(format!("rank {}: {name}: bytes differ from the CPU's from byte {first} of {}", self.r, c.len()));
        }
    }
}

/// Runs `body` on `world` ranks (threads), rank r on GPU `gpus[r % gpus.len()]`, and fails with
/// every rank's failed checks.
fn run(world: usize, gpus: &[usize], body: impl Fn(&mut Rank) + Sync) {
    let copy = ThreadComm::group(world, T);
    let cpu = ThreadComm::group(world, T);
    let failures: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = copy
            .into_iter()
            .zip(cpu)
            .enumerate()
            .map(|(r, (inner, tc))| {
                let body = &body;
                s.spawn(move || {
                    let gpu = CudaBackend::new(gpus[r % gpus.len()], &Default::default()).unwrap();
                    let cc = CopyComm::new(std::sync::Arc::new(inner), &gpu).unwrap();
                    let mut rank = Rank { r, world, gpu, cc, cpu: CpuBackend::new(), tc, rng: Rng::new(1000 + r as u64), failures: vec![] };
                    body(&mut rank);
                    rank.gpu.synchronize().unwrap();
                    rank.failures
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().expect("a rank panicked")).collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn gpu_or_skip() -> bool {
    match cuda_available() {
        Ok(()) => true,
        Err(e) => {
            llmq_cuda::skip_gpu_test(&format!("no CUDA device: {e}"));
            false
        }
    }
}

/// All-gather in and out of place on every stream, broadcast from every root, for every dtype.
fn gathers(k: &mut Rank) {
    for dtype in [DType::F32, DType::BF16, DType::E4M3, DType::I32] {
        for (i, n) in [1usize, 128, 4097, 250_000].into_iter().enumerate() {
            let stream = Stream::ALL[i % 4];
            let src = k.rand(dtype, n);
            let dst = k.rand(dtype, n * k.world);
            k.tc.all_gather(&k.cpu, &dst.c, &src.c, Stream::Compute, "w").unwrap();
            k.cc.all_gather(&k.gpu, &dst.g, &src.g, stream, "w").unwrap();
            k.exact(&format!("all-gather {dtype} x {n} on {stream:?}"), &dst);
            let mine = T2 { c: dst.c.slice(k.r * n, &[n]), g: dst.g.slice(k.r * n, &[n]) };
            let fresh = k.rand(dtype, n);
            k.cpu.copy(&mine.c, &fresh.c, Stream::Compute).unwrap();
            k.gpu.copy(&mine.g, &fresh.g, Stream::Compute).unwrap();
            k.gpu.synchronize().unwrap();
            k.tc.all_gather(&k.cpu, &dst.c, &mine.c, Stream::Compute, "in place").unwrap();
            k.cc.all_gather(&k.gpu, &dst.g, &mine.g, Stream::Compute, "in place").unwrap();
            k.exact(&format!("in-place all-gather {dtype} x {n}"), &dst);
            for root in 0..k.world {
                let t = k.rand(dtype, n);
                k.tc.broadcast(&k.cpu, &t.c, root, Stream::Compute, "b").unwrap();
                k.cc.broadcast(&k.gpu, &t.g, root, stream, "b").unwrap();
                k.exact(&format!("broadcast {dtype} x {n} from {root}"), &t);
            }
        }
    }
}

#[test]
fn two_ranks_on_one_gpu_gather_and_broadcast_like_the_cpu() {
    if gpu_or_skip() {
        run(2, &[0], gathers);
    }
}

#[test]
fn three_ranks_on_one_gpu_gather_and_broadcast_like_the_cpu() {
    if gpu_or_skip() {
        run(3, &[0], gathers);
    }
}

#[test]
fn ranks_on_every_gpu_gather_and_broadcast_like_the_cpu() {
    let n = llmq_cuda::device_count();
    if n < 2 {
        llmq_cuda::skip_gpu_test(&format!("{n} CUDA device(s): two are needed"));
        return;
    }
    let gpus: Vec<usize> = (0..n).collect();
    run(n, &gpus, gathers);
}

/// Send/recv around a ring (even ranks send first), several times in a row (the event rings),
/// from device and pinned host memory.
#[test]
fn send_recv_around_a_ring() {
    if !gpu_or_skip() {
        return;
    }
    run(3, &[0], |k| {
        let (next, prev) = ((k.r + 1) % k.world, (k.r + k.world - 1) % k.world);
        for round in 0..5 {
            let n = 1000 + 77 * round;
            let b: Vec<u8> = (0..n * 2).map(|_| k.rng.next_u64() as u8).collect();
            let mem = if round % 2 == 0 { Mem::Device } else { Mem::Host };
            let mine = k.bytes(DType::BF16, n, &b, mem);
            let theirs = k.rand(DType::BF16, n);
            let stream = Stream::ALL[round % 4];
            let w = format!("round {round}");
            let order = if k.r % 2 == 0 { [true, false] } else { [false, true] };
            for send in order {
                if send {
                    k.tc.send(&k.cpu, &mine.c, next, Stream::Compute, &w).unwrap();
                    k.cc.send(&k.gpu, &mine.g, next, stream, &w).unwrap();
                } else {
                    k.tc.recv(&k.cpu, &theirs.c, prev, Stream::Compute, &w).unwrap();
                    k.cc.recv(&k.gpu, &theirs.g, prev, stream, &w).unwrap();
                }
            }
            k.exact(&format!("recv {w}"), &theirs);
        }
    });
}

/// A rank overwrites its source right after the all-gather, on the same stream: the peers must
/// still receive the old bytes (the done events order the write after their copies).
#[test]
fn a_source_overwritten_after_the_gather_is_read_first() {
    if !gpu_or_skip() {
        return;
    }
    run(2, &[0], |k| {
        let n = 32 << 20; // bytes: long copies, so that an unordered write would land inside them
        let src = k.rand(DType::E4M3, n);
        let dst = k.rand(DType::E4M3, 2 * n);
        for round in 0..3 {
            k.tc.all_gather(&k.cpu, &dst.c, &src.c, Stream::Compute, "w").unwrap();
            k.cc.all_gather(&k.gpu, &dst.g, &src.g, Stream::Copy, "w").unwrap();
            k.gpu.zero(&src.g, Stream::Copy).unwrap();
            k.exact(&format!("gather before the overwrite, round {round}"), &dst);
            let fresh = k.rand(DType::E4M3, n);
            k.cpu.copy(&src.c, &fresh.c, Stream::Compute).unwrap();
            k.gpu.copy(&src.g, &fresh.g, Stream::Copy).unwrap();
        }
    });
}

/// Reductions and host collectives are the thread group's: exact against the CPU.
#[test]
fn reductions_and_host_collectives_match_the_cpu() {
    if !gpu_or_skip() {
        return;
    }
    run(2, &[0], |k| {
        let n = 2 * 4096;
        let v: Vec<f32> = (0..n).map(|_| k.rng.normal(1.0)).collect();
        let b = common::encode(DType::BF16, &v);
        let t = k.bytes(DType::BF16, n, &b, Mem::Device);
        k.tc.all_reduce(&k.cpu, &t.c, ReduceOp::Sum, Stream::Compute, "g").unwrap();
        k.cc.all_reduce(&k.gpu, &t.g, ReduceOp::Sum, Stream::Compute, "g").unwrap();
        k.exact("all-reduce", &t);
        let shard = k.rand(DType::BF16, n / 2);
        k.tc.reduce_scatter(&k.cpu, &shard.c, &t.c, true, Stream::Compute, "g").unwrap();
        k.cc.reduce_scatter(&k.gpu, &shard.g, &t.g, true, Stream::Copy, "g").unwrap();
        k.exact("accumulating reduce-scatter", &shard);
        let mut h = vec![k.r as f64, -1.5 * k.r as f64];
        let mut hc = h.clone();
        k.tc.all_reduce_host(&mut hc, ReduceOp::Max, "h").unwrap();
        k.cc.all_reduce_host(&mut h, ReduceOp::Max, "h").unwrap();
        assert_eq!(h, hc);
        let mine = vec![k.r as u8; 10 + k.r];
        assert_eq!(k.cc.all_gather_bytes(&mine, "x").unwrap(), k.tc.all_gather_bytes(&mine, "x").unwrap());
    });
}

/// `--all-to-all-reduce`: copy-engine all-to-all plus the `reduce_shards` kernel gives the bits
/// of the CPU reduce-scatter (f32 and bf16 gradients, device and pinned host buffers, in and out
/// of place, accumulating, on three streams sharing the staging buffer).
#[test]
fn all_to_all_reduce_matches_the_cpu_reduce_scatter() {
    if !gpu_or_skip() {
        return;
    }
    let gpus: Vec<usize> = (0..llmq_cuda::device_count().clamp(1, 3)).collect();
    run(3, &gpus, |k| {
        for dtype in [DType::F32, DType::BF16] {
            for mem in [Mem::Device, Mem::Host] {
                let s = 128 * 37;
                let n = s * k.world;
                let vals = |k: &mut Rank| common::encode(dtype, &(0..n).map(|_| k.rng.normal(1.0)).collect::<Vec<f32>>());
                let (b1, b2) = (vals(k), vals(k));
                let src = k.bytes(dtype, n, &b1, mem);
                let inplace = k.bytes(dtype, n, &b2, mem);
                let out = k.rand(dtype, s);
                let acc = k.bytes(dtype, s, &common::encode(dtype, &vec![0.25; s]), mem);
                let a2a = llmq_core::all_to_all::AllToAllReduce::alloc(&mut k.gpu, dtype, n).unwrap();
                let mine = T2 { c: inplace.c.slice(k.r * s, &[s]), g: inplace.g.slice(k.r * s, &[s]) };
                for (name, dst, from, accumulate, stream) in [("out of place", out, src, false, Stream::Compute), ("accumulating", acc, src, true, Stream::CopyBack), ("in place", mine, inplace, false, Stream::Copy)] {
                    k.tc.reduce_scatter(&k.cpu, &dst.c, &from.c, accumulate, Stream::Compute, "g").unwrap();
                    a2a.reduce_scatter(&k.cc, &k.gpu, &dst.g, &from.g, accumulate, stream, "g").unwrap();
                    k.gpu.synchronize().unwrap();
                    k.exact(&format!("all-to-all reduce-scatter {dtype} {mem:?} {name}"), &dst);
                }
            }
        }
    });
}

/// The `reduce_shards` kernel against the CPU op: 1 to 5 shards, with and without accumulating.
#[test]
fn reduce_shards_matches_the_cpu() {
    if !gpu_or_skip() {
        return;
    }
    run(1, &[0], |k| {
        for dtype in [DType::F32, DType::BF16] {
            for world in 1..=5 {
                for accumulate in [false, true] {
                    let s = 1000 + world;
                    let b: Vec<u8> = common::encode(dtype, &(0..s * world).map(|i| k.rng.normal(10f32.powi(i as i32 % 5 - 2))).collect::<Vec<f32>>());
                    let staged = k.bytes(dtype, s * world, &b, Mem::Device);
                    let init = common::encode(dtype, &(0..s).map(|_| k.rng.normal(1.0)).collect::<Vec<f32>>());
                    let dst = k.bytes(dtype, s, &init, Mem::Device);
                    k.cpu.reduce_shards(&dst.c, &staged.c, accumulate, Stream::Compute).unwrap();
                    k.gpu.reduce_shards(&dst.g, &staged.g, accumulate, Stream::Side).unwrap();
                    k.gpu.synchronize().unwrap();
                    k.exact(&format!("reduce_shards {dtype} x {world} accumulate {accumulate}"), &dst);
                }
            }
        }
        let (a, b) = (k.rand(DType::F32, 100), k.rand(DType::F32, 250));
        let e = k.gpu.reduce_shards(&a.g, &b.g, false, Stream::Compute).unwrap_err().to_string();
        assert_eq!(e, k.cpu.reduce_shards(&a.c, &b.c, false, Stream::Compute).unwrap_err().to_string());
    });
}

#[test]
fn mismatched_calls_and_arguments_are_errors() {
    if !gpu_or_skip() {
        return;
    }
    run(2, &[0], |k| {
        let a = k.rand(DType::F32, 256);
        let full = k.rand(DType::F32, 512);
        let short = k.rand(DType::F32, 255);
        let e = k.cc.all_gather(&k.gpu, &full.g, &short.g, Stream::Compute, "w").unwrap_err().to_string();
        let ec = k.tc.all_gather(&k.cpu, &full.c, &short.c, Stream::Compute, "w").unwrap_err().to_string();
        assert_eq!(e, ec);
        let e = k.cc.send(&k.gpu, &a.g, k.r, Stream::Compute, "s").unwrap_err().to_string();
        assert!(e.contains("is not another rank of 2"), "{e}");
        let e = k.cc.all_gather(&k.cpu, &full.g, &a.g, Stream::Compute, "w").unwrap_err().to_string();
        assert!(e.contains("belong to the backend cuda:0"), "{e}");
        // rank 0 gathers while rank 1 broadcasts: both fail naming the calls
        let e = if k.r == 0 {
            k.cc.all_gather(&k.gpu, &full.g, &a.g, Stream::Compute, "weights").unwrap_err()
        } else {
            k.cc.broadcast(&k.gpu, &a.g, 0, Stream::Compute, "weights").unwrap_err()
        }
        .to_string();
        assert!(e.contains("different collectives"), "{e}");
    });
}
