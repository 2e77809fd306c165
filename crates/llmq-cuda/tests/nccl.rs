//! `NcclComm` against the CPU collectives (`ThreadComm`) on the same random inputs: a
//! communicator of one rank on GPU 0 (data movement bit-exact, one-rank reductions exact), the
//! argument errors (which must read as the CPU collectives' do), the join timeout, abort, and,
//! where two GPUs are present, every collective over two ranks (threads) plus a collective timeout.
//! Skips without a CUDA device or without NCCL (fails instead under LLMQ_REQUIRE_GPU=1).

mod common;

use common::{decode, Pair, Rng, T2};
use llmq_core::cpu::CpuBackend;
use llmq_core::{Backend, Comm, DType, Mem, MemCategory, ReduceOp, Stream, ThreadComm};
use llmq_cuda::{nccl_available, CudaBackend, NcclComm};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
const DTYPES: [DType; 5] = [DType::F32, DType::BF16, DType::E4M3, DType::E5M2, DType::I32];

/// A pair of backends, a one-rank NCCL communicator on the GPU and a one-rank CPU group.
fn setup(seed: u64) -> Option<(Pair, NcclComm, ThreadComm)> {
    let p = Pair::new(seed)?;
    if let Err(e) = nccl_available() {
        llmq_cuda::skip_gpu_test(&format!("NCCL unavailable: {e}"));
        return None;
    }
    let id = NcclComm::unique_id().expect("unique_id");
    let nc = NcclComm::new(&p.gpu, &id, 0, 1, T).expect("NcclComm::new");
    let tc = ThreadComm::group(1, T).pop().unwrap();
    Some((p, nc, tc))
}

/// Random values with NaN, infinities, signed zeros and extremes mixed in.
fn awkward(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = rng.vec(n, 2.0);
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 1e-40, 3e38, -3e38];
    for (i, s) in specials.iter().enumerate().take(n) {
        v[(i * 37) % n] = *s;
    }
    v
}

fn rand_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Both results of one call: equal errors or both Ok.
fn same_err(name: &str, c: llmq_core::Result<()>, g: llmq_core::Result<()>) {
    match (c, g) {
        (Err(c), Err(g)) => assert_eq!(c.to_string(), g.to_string(), "{name}: the errors differ"),
        (c, g) => panic!("{name}: cpu {c:?}, nccl {g:?}: both must fail"),
    }
}

/// Runs everywhere: without NCCL (or the driver) the calls that would load it are errors naming
/// what is missing, never a panic in the library loader.
#[test]
fn a_missing_nccl_is_an_error_naming_it() {
    match nccl_available() {
        Err(why) => {
            let e = NcclComm::unique_id().expect_err("unique_id without NCCL").to_string();
            assert!(e.contains("NCCL is missing") && e.contains(&why), "{e}");
        }
        Ok(()) => assert!(NcclComm::unique_id().is_ok(), "NCCL loads, so an id can be made"),
    }
}

#[test]
fn an_id_is_128_bytes() {
    let b: Vec<u8> = (0..128).map(|i| i as u8).collect();
    assert_eq!(llmq_cuda::NcclId::from_bytes(&b).unwrap().0.to_vec(), b);
    let e = llmq_cuda::NcclId::from_bytes(&b[..127]).unwrap_err().to_string();
    assert!(e.contains("an NCCL id of 127 bytes received, expected 128"), "{e}");
}

#[test]
fn describes_itself_as_nccl_of_one_rank() {
    let Some((_p, nc, _tc)) = setup(1) else { return };
    assert!(nc.describe().starts_with("nccl "), "{}", nc.describe());
    assert_eq!((nc.rank(), nc.world()), (0, 1));
    assert!(nc.nccl_version() >= 20000, "{}", nc.nccl_version());
}

#[test]
fn all_reduce_matches_the_cpu_exactly_on_every_stream() {
    let Some((mut p, nc, tc)) = setup(2) else { return };
    for (i, &stream) in Stream::ALL.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            for op in [ReduceOp::Sum, ReduceOp::Max] {
                for n in [1, 7, 4096 + 3, 300_001] {
                    let v = awkward(&mut p.rng, n);
                    let t = p.vals(dtype, &[n], &v);
                    tc.all_reduce(&p.cpu, &t.c, op, Stream::Compute, "x").unwrap();
                    nc.all_reduce(&p.gpu, &t.g, op, stream, "x").unwrap();
                    p.exact(&format!("all-reduce {op:?} {dtype} x {n} on {stream:?} ({i})"), &t);
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_matches_the_cpu_in_and_out_of_place() {
    let Some((mut p, nc, tc)) = setup(3) else { return };
    for dtype in [DType::F32, DType::BF16] {
        for n in [1, 128, 1000, 65_537] {
            let v = awkward(&mut p.rng, n);
            let src = p.vals(dtype, &[n], &v);
            let dst = p.out(dtype, &[n]);
            tc.reduce_scatter(&p.cpu, &dst.c, &src.c, false, Stream::Compute, "g").unwrap();
            nc.reduce_scatter(&p.gpu, &dst.g, &src.g, false, Stream::CopyBack, "g").unwrap();
            p.exact(&format!("reduce-scatter {dtype} x {n}"), &dst);
            p.exact(&format!("reduce-scatter {dtype} x {n}: src untouched"), &src);
            // dst = rank 0's range of src itself
            let whole = T2 { c: src.c.slice(0, &[n]), g: src.g.slice(0, &[n]) };
            tc.reduce_scatter(&p.cpu, &whole.c, &src.c, false, Stream::Compute, "g").unwrap();
            nc.reduce_scatter(&p.gpu, &whole.g, &src.g, false, Stream::Copy, "g").unwrap();
            p.exact(&format!("in-place reduce-scatter {dtype} x {n}"), &src);
        }
    }
}

#[test]
fn accumulating_reduce_scatter_is_refused_naming_the_call() {
    let Some((mut p, nc, _tc)) = setup(4) else { return };
    let src = p.rand(DType::F32, &[256], 1.0);
    let dst = p.rand(DType::F32, &[256], 1.0);
    let before = p.gpu.download(&dst.g).unwrap();
    let e = nc.reduce_scatter(&p.gpu, &dst.g, &src.g, true, Stream::Compute, "gradients of block 2").unwrap_err().to_string();
    assert!(e.contains("reduce-scatter 'gradients of block 2' with accumulate"), "{e}");
    assert_eq!(p.gpu.download(&dst.g).unwrap(), before, "a refused call must leave dst alone");
}

#[test]
fn all_gather_and_broadcast_move_every_dtype_bit_exactly() {
    let Some((mut p, nc, tc)) = setup(5) else { return };
    for dtype in DTYPES {
        for n in [1, 129, 70_001] {
            let b = rand_bytes(&mut p.rng, n * dtype.size());
            let src = p.bytes(dtype, &[n], &b);
            let dst = p.out(dtype, &[n]);
            tc.all_gather(&p.cpu, &dst.c, &src.c, Stream::Compute, "w").unwrap();
            nc.all_gather(&p.gpu, &dst.g, &src.g, Stream::Copy, "w").unwrap();
            p.exact(&format!("all-gather {dtype} x {n}"), &dst);
            // src = rank 0's range of dst
            tc.all_gather(&p.cpu, &src.c, &src.c.slice(0, &[n]), Stream::Compute, "w").unwrap();
            nc.all_gather(&p.gpu, &src.g, &src.g.slice(0, &[n]), Stream::Side, "w").unwrap();
            p.exact(&format!("in-place all-gather {dtype} x {n}"), &src);
            let t = p.bytes(dtype, &[n], &b);
            tc.broadcast(&p.cpu, &t.c, 0, Stream::Compute, "b").unwrap();
            nc.broadcast(&p.gpu, &t.g, 0, Stream::Compute, "b").unwrap();
            p.exact(&format!("broadcast {dtype} x {n}"), &t);
            assert_eq!(p.gpu.download(&t.g).unwrap(), b, "broadcast from the only rank changes nothing");
        }
    }
}

#[test]
fn collectives_on_pinned_host_tensors() {
    let Some((mut p, nc, _tc)) = setup(6) else { return };
    let n = 10_000;
    let b = rand_bytes(&mut p.rng, n * 2);
    let src = p.gpu.alloc(MemCategory::Other, Mem::Host, DType::BF16, &[n]).unwrap();
    let dst = p.gpu.alloc(MemCategory::Other, Mem::Device, DType::BF16, &[n]).unwrap();
    p.gpu.upload(&src, &b).unwrap();
    nc.all_gather(&p.gpu, &dst, &src, Stream::Copy, "host shard").unwrap();
    assert_eq!(p.gpu.download(&dst).unwrap(), b);
    let back = p.gpu.alloc(MemCategory::Other, Mem::Host, DType::BF16, &[n]).unwrap();
    nc.all_gather(&p.gpu, &back, &dst, Stream::CopyBack, "to host").unwrap();
    assert_eq!(p.gpu.download(&back).unwrap(), b);
}

#[test]
fn wrong_arguments_read_as_the_cpu_collectives_errors() {
    let Some((mut p, nc, tc)) = setup(7) else { return };
    let a = p.rand(DType::F32, &[256], 1.0);
    let short = p.rand(DType::F32, &[255], 1.0);
    let bf = p.rand(DType::BF16, &[256], 1.0);
    let e4 = p.bytes(DType::E4M3, &[256], &[1u8; 256]);
    let i32s = p.i32s(&[256], &[3; 256]);
    let (c, g) = (&p.cpu, &p.gpu);
    same_err("reduce-scatter sizes", tc.reduce_scatter(c, &short.c, &a.c, false, Stream::Compute, "g"), nc.reduce_scatter(g, &short.g, &a.g, false, Stream::Compute, "g"));
    same_err("reduce-scatter dtypes", tc.reduce_scatter(c, &bf.c, &a.c, false, Stream::Compute, "g"), nc.reduce_scatter(g, &bf.g, &a.g, false, Stream::Compute, "g"));
    same_err("all-gather sizes", tc.all_gather(c, &a.c, &short.c, Stream::Compute, "w"), nc.all_gather(g, &a.g, &short.g, Stream::Compute, "w"));
    same_err("all-gather dtypes", tc.all_gather(c, &a.c, &bf.c, Stream::Compute, "w"), nc.all_gather(g, &a.g, &bf.g, Stream::Compute, "w"));
    same_err("send to self", tc.send(c, &a.c, 0, Stream::Compute, "s"), nc.send(g, &a.g, 0, Stream::Compute, "s"));
    same_err("recv from self", tc.recv(c, &a.c, 0, Stream::Compute, "r"), nc.recv(g, &a.g, 0, Stream::Compute, "r"));
    same_err("send to a rank outside", tc.send(c, &a.c, 3, Stream::Compute, "s"), nc.send(g, &a.g, 3, Stream::Compute, "s"));
    same_err("recv from a rank outside", tc.recv(c, &a.c, 3, Stream::Compute, "r"), nc.recv(g, &a.g, 3, Stream::Compute, "r"));
    for t in [&e4.g, &i32s.g] {
        let e = nc.all_reduce(g, t, ReduceOp::Sum, Stream::Compute, "q").unwrap_err().to_string();
        assert!(e.contains("only f32 and bf16 are reduced"), "{e}");
    }
    let e = nc.broadcast(g, &a.g, 1, Stream::Compute, "b").unwrap_err().to_string();
    assert!(e.contains("root 1 is not a rank of 1"), "{e}");
    // the communicator still works after refused calls
    nc.all_reduce(g, &a.g, ReduceOp::Sum, Stream::Compute, "after").unwrap();
    p.gpu.synchronize().unwrap();
}

#[test]
fn another_backend_is_refused() {
    let Some((mut p, nc, _tc)) = setup(8) else { return };
    let a = p.rand(DType::F32, &[128], 1.0);
    let cpu = CpuBackend::new();
    let e = nc.all_reduce(&cpu, &a.g, ReduceOp::Sum, Stream::Compute, "grads").unwrap_err().to_string();
    assert!(e.contains("all-reduce Sum 'grads'") && e.contains("belongs to the backend cuda:0"), "{e}");
}

#[test]
fn host_collectives_match_the_cpu() {
    let Some((mut p, nc, tc)) = setup(9) else { return };
    for n in [0, 1, 5, 131_072, 300_000] {
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let v: Vec<f64> = awkward(&mut p.rng, n.max(1)).iter().take(n).map(|&x| x as f64 * 1.000_000_1).collect();
            let (mut a, mut b) = (v.clone(), v.clone());
            tc.all_reduce_host(&mut a, op, "loss").unwrap();
            nc.all_reduce_host(&mut b, op, "loss").unwrap();
            let bits = |x: &[f64]| x.iter().map(|v| if v.is_nan() { u64::MAX } else { v.to_bits() }).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "host all-reduce {op:?} of {n} values");
        }
    }
    let mut nan = [f64::NAN, 1.0];
    nc.all_reduce_host(&mut nan, ReduceOp::Max, "nan").unwrap();
    assert!(nan[0].is_nan() && nan[1] == 1.0, "{nan:?}: a NaN survives Max");
    nc.barrier("barrier").unwrap();
    for n in [0, 1, 1000, (1 << 20) + 17, 3 << 20] {
        let b = rand_bytes(&mut p.rng, n);
        assert_eq!(nc.all_gather_bytes(&b, "ckpt").unwrap(), tc.all_gather_bytes(&b, "ckpt").unwrap(), "gather of {n} bytes");
        assert_eq!(nc.gather_bytes(&b, 0, "ckpt").unwrap(), tc.gather_bytes(&b, 0, "ckpt").unwrap(), "gather to 0 of {n} bytes");
    }
    let e = nc.gather_bytes(&[1], 1, "ckpt").unwrap_err().to_string();
    assert!(e.contains("root 1 is not a rank of 1"), "{e}");
}

#[test]
fn abort_fails_every_later_call_with_its_reason() {
    let Some((mut p, nc, _tc)) = setup(10) else { return };
    let a = p.rand(DType::F32, &[128], 1.0);
    nc.abort("out of memory in block 4");
    let e = nc.all_reduce(&p.gpu, &a.g, ReduceOp::Sum, Stream::Compute, "x").unwrap_err().to_string();
    assert!(e.contains("rank 0 failed: out of memory in block 4"), "{e}");
    let e = nc.barrier("b").unwrap_err().to_string();
    assert!(e.contains("out of memory in block 4"), "{e}");
}

#[test]
fn a_rank_that_never_joins_times_out_naming_the_join() {
    let Some(p) = Pair::new(11) else { return };
    if let Err(e) = nccl_available() {
        llmq_cuda::skip_gpu_test(&format!("NCCL unavailable: {e}"));
        return;
    }
    let id = NcclComm::unique_id().unwrap();
    let t = Instant::now();
    let e = NcclComm::new(&p.gpu, &id, 0, 2, Duration::from_secs(3)).err().expect("rank 1 never joins").to_string();
    assert!(t.elapsed() < Duration::from_secs(30), "the join took {:?}", t.elapsed());
    assert!(e.contains("joining the NCCL communicator as rank 0 of 2"), "{e}");
    p.gpu.synchronize().expect("the backend works after the failed join");
}

/// Two ranks as threads on GPUs 0 and 1, against two CPU ranks: every collective, send/recv, and
/// a collective that one rank never calls (the other times out naming it).
#[test]
fn two_gpus_match_two_cpu_ranks() {
    if llmq_cuda::device_count() < 2 || nccl_available().is_err() {
        llmq_cuda::skip_gpu_test("two CUDA devices and NCCL are needed");
        return;
    }
    let id = NcclComm::unique_id().unwrap();
    let tcs = ThreadComm::group(2, T);
    let done = std::sync::Barrier::new(2);
    let results: Vec<Vec<(String, Vec<u8>)>> = std::thread::scope(|s| {
        let done = &done;
        let hs: Vec<_> = tcs.into_iter().enumerate().map(|(r, tc)| s.spawn(move || two_rank_body(r, id, tc, done))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, res) in results.iter().enumerate() {
        for (name, diff) in res {
            assert!(diff.is_empty(), "rank {r}: {name}: {}", String::from_utf8_lossy(diff));
        }
    }
}

/// One rank of `two_gpus_match_two_cpu_ranks`: (check, failure message or empty) pairs.
/// Rank 1 keeps its communicator until rank 0 has seen its timeout (`done`), so that rank 0's
/// error is its own watchdog's and not a reaction to rank 1 leaving.
fn two_rank_body(r: usize, id: llmq_cuda::NcclId, tc: ThreadComm, done: &std::sync::Barrier) -> Vec<(String, Vec<u8>)> {
    let mut gpu = CudaBackend::new(r, &Default::default()).unwrap();
    let mut cpu = CpuBackend::new();
    let nc = NcclComm::new(&gpu, &id, r, 2, Duration::from_secs(10)).unwrap();
    let mut rng = Rng::new(100 + r as u64);
    let mut out = Vec::new();
    fn pair(cpu: &mut CpuBackend, gpu: &mut CudaBackend, dtype: DType, n: usize, bytes: &[u8]) -> T2 {
        let c = cpu.alloc(MemCategory::Other, Mem::Device, dtype, &[n]).unwrap();
        let g = gpu.alloc(MemCategory::Other, Mem::Device, dtype, &[n]).unwrap();
        cpu.upload(&c, bytes).unwrap();
        gpu.upload(&g, bytes).unwrap();
        T2 { c, g }
    }
    fn check(name: String, t: &T2, cpu: &CpuBackend, gpu: &CudaBackend) -> (String, Vec<u8>) {
        let (c, g) = (cpu.download(&t.c).unwrap(), gpu.download(&t.g).unwrap());
        let diff = if c == g { vec![] } else { format!("{:?} vs {:?}", &decode(t.c.dtype, &c)[..4], &decode(t.g.dtype, &g)[..4]).into_bytes() };
        (name, diff)
    }
    let n = 2 * 1280;
    // values whose sums are exact in f32 and bf16 (small integers), so any order gives the CPU's bits
    let ints: Vec<f32> = (0..n).map(|_| (rng.below(64) as f32) - 32.0).collect();
    let cases: Vec<(&str, T2, T2)> = [DType::F32, DType::BF16]
        .iter()
        .map(|&d| {
            let b = common::encode(d, &ints);
            ("sum", pair(&mut cpu, &mut gpu, d, n, &b), pair(&mut cpu, &mut gpu, d, n / 2, &vec![0u8; n / 2 * d.size()]))
        })
        .collect();
    for (name, full, shard) in &cases {
        tc.reduce_scatter(&cpu, &shard.c, &full.c, false, Stream::Compute, name).unwrap();
        nc.reduce_scatter(&gpu, &shard.g, &full.g, false, Stream::Copy, name).unwrap();
        out.push(check(format!("reduce-scatter {}", full.c.dtype), shard, &cpu, &gpu));
        tc.all_gather(&cpu, &full.c, &shard.c, Stream::Compute, name).unwrap();
        nc.all_gather(&gpu, &full.g, &shard.g, Stream::Copy, name).unwrap();
        out.push(check(format!("all-gather {}", full.c.dtype), full, &cpu, &gpu));
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            tc.all_reduce(&cpu, &full.c, op, Stream::Compute, name).unwrap();
            nc.all_reduce(&gpu, &full.g, op, Stream::Compute, name).unwrap();
            out.push(check(format!("all-reduce {op:?} {}", full.c.dtype), full, &cpu, &gpu));
        }
        tc.broadcast(&cpu, &full.c, 1, Stream::Compute, name).unwrap();
        nc.broadcast(&gpu, &full.g, 1, Stream::Side, name).unwrap();
        out.push(check(format!("broadcast {}", full.c.dtype), full, &cpu, &gpu));
    }
    // send/recv: rank 0 sends then receives, rank 1 receives then sends (NCCL does not buffer)
    let b = rand_bytes(&mut rng, 5000);
    let mine = pair(&mut cpu, &mut gpu, DType::E4M3, 5000, &b);
    let theirs = pair(&mut cpu, &mut gpu, DType::E4M3, 5000, &[0u8; 5000]);
    let peer = 1 - r;
    let sr = |first_send: bool| -> llmq_core::Result<()> {
        if first_send {
            tc.send(&cpu, &mine.c, peer, Stream::Compute, "p2p")?;
            nc.send(&gpu, &mine.g, peer, Stream::Compute, "p2p")?;
            tc.recv(&cpu, &theirs.c, peer, Stream::Compute, "p2p")?;
            nc.recv(&gpu, &theirs.g, peer, Stream::Compute, "p2p")
        } else {
            tc.recv(&cpu, &theirs.c, peer, Stream::Compute, "p2p")?;
            nc.recv(&gpu, &theirs.g, peer, Stream::Compute, "p2p")?;
            tc.send(&cpu, &mine.c, peer, Stream::Compute, "p2p")?;
            nc.send(&gpu, &mine.g, peer, Stream::Compute, "p2p")
        }
    };
    sr(r == 0).unwrap();
    out.push(check("send/recv".into(), &theirs, &cpu, &gpu));
    let mut h = vec![r as f64 + 0.5, -(r as f64), f64::NAN * (r as f64)];
    let mut hc = h.clone();
    tc.all_reduce_host(&mut hc, ReduceOp::Max, "h").unwrap();
    nc.all_reduce_host(&mut h, ReduceOp::Max, "h").unwrap();
    out.push(("host all-reduce Max".into(), if format!("{h:?}") == format!("{hc:?}") { vec![] } else { format!("{h:?} vs {hc:?}").into_bytes() }));
    let mine_b = rand_bytes(&mut rng, 1000 * (r + 1));
    let g1 = nc.all_gather_bytes(&mine_b, "cfg").unwrap();
    let g2 = tc.all_gather_bytes(&mine_b, "cfg").unwrap();
    out.push(("gather bytes".into(), if g1 == g2 { vec![] } else { b"differ".to_vec() }));
    // lengths that differ by rank and span several chunks of the staging buffer
    let big = rand_bytes(&mut rng, (700 << 10) * (r + 1) + 3);
    for root in 0..2 {
        let g1 = nc.gather_bytes(&big, root, "ckpt").unwrap();
        let g2 = tc.gather_bytes(&big, root, "ckpt").unwrap();
        out.push((format!("gather to {root}"), if g1 == g2 && g1.is_some() == (r == root) { vec![] } else { b"differ".to_vec() }));
    }
    // rank 1 never calls this one: rank 0 times out naming it; then both see the abort
    nc.barrier("before the timeout").unwrap();
    if r == 0 {
        let t = Instant::now();
        // the barrier queues behind the stuck all-reduce; the watchdog aborts the latter first
        let res = nc.all_reduce(&gpu, &cases[0].1.g, ReduceOp::Sum, Stream::Compute, "the lonely one").and_then(|_| nc.barrier("after"));
        let e = res.err().map(|e| e.to_string()).unwrap_or_default();
        let ok = e.contains("all-reduce Sum 'the lonely one' did not finish within the timeout") && t.elapsed() < Duration::from_secs(60);
        out.push(("timeout".into(), if ok { vec![] } else { format!("{e} after {:?}", t.elapsed()).into_bytes() }));
    }
    done.wait();
    out
}
