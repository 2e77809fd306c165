//! The thread collectives (`ThreadComm`): results against a direct computation on random
//! inputs, the reduction order, faults (timeouts naming the missing ranks, mismatched calls,
//! aborts) and their visibility to the stream-order checker.

mod common;
use common::tensor;
use llmq_core::comm::{Comm, ReduceOp, ThreadComm};
use llmq_core::cpu::CpuBackend;
use llmq_core::dtype::{decode_into, encode_into};
use llmq_core::stream_check::StreamChecked;
use llmq_core::{Backend, DType, Mem, MemCategory, Result, Stream, Tensor};
use std::time::{Duration, Instant};

fn random(seed: u64, n: usize) -> Vec<f32> {
    common::Rng::new(seed).vec(n, 2.0)
}

fn values(be: &dyn Backend, t: &Tensor) -> Vec<f32> {
    let mut v = vec![0f32; t.numel()];
    decode_into(t.dtype, &be.download(t).unwrap(), &mut v);
    v
}

/// Runs `f(rank, comm)` on one thread per rank.
fn ranks<T: Send>(world: usize, timeout: Duration, f: impl Fn(usize, &ThreadComm) -> T + Sync) -> Vec<T> {
    let comms = ThreadComm::group(world, timeout);
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().enumerate().map(|(r, c)| { let f = &f; s.spawn(move || f(r, c)) }).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The rounded input of rank r (what a rank holds after storing its random values).
fn held(dtype: DType, r: usize, n: usize) -> Vec<f32> {
    let v = random(r as u64 + 1, n);
    let mut b = vec![0u8; n * dtype.size()];
    encode_into(dtype, &v, &mut b);
    let mut out = vec![0f32; n];
    decode_into(dtype, &b, &mut out);
    out
}

fn round(dtype: DType, v: &[f32]) -> Vec<f32> {
    let mut b = vec![0u8; v.len() * dtype.size()];
    encode_into(dtype, v, &mut b);
    let mut out = vec![0f32; v.len()];
    decode_into(dtype, &b, &mut out);
    out
}

#[test]
fn all_reduce_adds_ranks_in_rank_order_and_rounds_once() {
    for dtype in [DType::F32, DType::BF16] {
        for world in [1, 2, 3, 5] {
            let n = 1000;
            let out = ranks(world, Duration::from_secs(30), |r, c| {
                let mut be = CpuBackend::new();
                let t = tensor(&mut be, dtype, &random(r as u64 + 1, n));
                c.all_reduce(&be, &t, ReduceOp::Sum, Stream::Compute, "x").unwrap();
                let m = tensor(&mut be, dtype, &random(r as u64 + 1, n));
                c.all_reduce(&be, &m, ReduceOp::Max, Stream::Compute, "m").unwrap();
                (values(&be, &t), values(&be, &m))
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| held(dtype, r, n)).collect();
            let sum: Vec<f32> = (0..n).map(|i| inputs.iter().skip(1).fold(inputs[0][i], |a, v| a + v[i])).collect();
            let max: Vec<f32> = (0..n).map(|i| inputs.iter().map(|v| v[i]).fold(f32::NEG_INFINITY, f32::max)).collect();
            for (r, (s, m)) in out.iter().enumerate() {
                assert_eq!(s.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), round(dtype, &sum).iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{dtype} world {world} rank {r}");
                assert_eq!(m, &max, "{dtype} world {world} rank {r}");
            }
        }
    }
}

#[test]
fn reduce_scatter_and_all_gather_move_shards() {
    let (world, s) = (3, 256);
    let out = ranks(world, Duration::from_secs(30), |r, c| {
        let mut be = CpuBackend::new();
        let full = tensor(&mut be, DType::F32, &random(r as u64 + 1, world * s));
        let acc = tensor(&mut be, DType::F32, &random(100 + r as u64, s));
        c.reduce_scatter(&be, &acc, &full, true, Stream::Compute, "acc").unwrap();
        // in place: the rank's range of the full buffer
        c.reduce_scatter(&be, &full.slice(r * s, &[s]), &full, false, Stream::Compute, "in place").unwrap();
        let shard = values(&be, &full.slice(r * s, &[s]));
        let gathered = be.alloc(MemCategory::Other, Mem::Host, DType::F32, &[world * s]).unwrap();
        c.all_gather(&be, &gathered, &full.slice(r * s, &[s]), Stream::Compute, "gather").unwrap();
        (values(&be, &acc), shard, values(&be, &gathered))
    });
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| random(r as u64 + 1, world * s)).collect();
    let total: Vec<f32> = (0..world * s).map(|i| inputs[1..].iter().fold(inputs[0][i], |a, v| a + v[i])).collect();
    for (r, (acc, shard, gathered)) in out.iter().enumerate() {
        let init = random(100 + r as u64, s);
        let want: Vec<f32> = (0..s).map(|i| inputs.iter().fold(init[i], |a, v| a + v[r * s + i])).collect();
        assert_eq!(acc, &want, "rank {r}: accumulate starts from the destination");
        assert_eq!(shard, &total[r * s..(r + 1) * s], "rank {r}");
        assert_eq!(gathered, &total, "rank {r}");
    }
}

#[test]
fn broadcast_send_recv_and_host_reductions() {
    let out = ranks(3, Duration::from_secs(30), |r, c| {
        let mut be = CpuBackend::new();
        let t = tensor(&mut be, DType::BF16, &random(r as u64 + 1, 300));
        c.broadcast(&be, &t, 2, Stream::Compute, "b").unwrap();
        let m = tensor(&mut be, DType::F32, &random(10 + r as u64, 7));
        // a ring: each rank sends to the next and receives from the previous
        c.send(&be, &m, (r + 1) % 3, Stream::Compute, "ring").unwrap();
        c.recv(&be, &m, (r + 2) % 3, Stream::Compute, "ring").unwrap();
        let mut h = [r as f64 + 0.5, -(r as f64)];
        c.all_reduce_host(&mut h, ReduceOp::Sum, "h").unwrap();
        let bytes = c.all_gather_bytes(&vec![r as u8; r + 1], "bytes").unwrap();
        (values(&be, &t), values(&be, &m), h, bytes)
    });
    for (r, (t, m, h, bytes)) in out.iter().enumerate() {
        assert_eq!(t, &held(DType::BF16, 2, 300), "rank {r}: broadcast from 2");
        assert_eq!(m, &random(10 + ((r + 2) % 3) as u64, 7), "rank {r}: received from the previous rank");
        assert_eq!(h, &[0.5 + 1.5 + 2.5, -3.0]);
        assert_eq!(bytes, &vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
    }
}

#[test]
fn a_missing_rank_times_out_naming_the_collective_and_the_rank() {
    let t0 = Instant::now();
    let out: Vec<Result<()>> = ranks(3, Duration::from_millis(300), |r, c| {
        let mut be = CpuBackend::new();
        let t = tensor(&mut be, DType::F32, &[1.0; 8]);
        if r == 2 {
            return Ok(()); // never arrives
        }
        c.all_reduce(&be, &t, ReduceOp::Sum, Stream::Compute, "gradients of block 3")
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
    for e in &out[..2] {
        let e = e.as_ref().unwrap_err().to_string();
        assert!(e.contains("gradients of block 3") && e.contains("rank(s) 2 did not arrive") && e.contains("timed out"), "{e}");
    }
}

#[test]
fn different_collectives_on_different_ranks_are_an_error_on_every_rank() {
    let out: Vec<Result<()>> = ranks(2, Duration::from_secs(30), |r, c| {
        let mut be = CpuBackend::new();
        let t = tensor(&mut be, DType::F32, &[1.0; 8]);
        let what = if r == 0 { "weights of block 0" } else { "weights of block 1" };
        c.broadcast(&be, &t, 0, Stream::Compute, what)
    });
    for e in &out {
        let e = e.as_ref().unwrap_err().to_string();
        assert!(e.contains("different collectives") && e.contains("block 0") && e.contains("block 1"), "{e}");
    }
}

#[test]
fn an_abort_ends_the_waits_of_the_other_ranks() {
    let t0 = Instant::now();
    let out: Vec<Result<()>> = ranks(3, Duration::from_secs(600), |r, c| {
        if r == 1 {
            std::thread::sleep(Duration::from_millis(50));
            c.abort("out of memory in the backward pass");
            return Ok(());
        }
        c.barrier("step end")
    });
    assert!(t0.elapsed() < Duration::from_secs(30));
    for r in [0, 2] {
        let e = out[r].as_ref().unwrap_err().to_string();
        assert!(e.contains("rank 1 failed: out of memory"), "{e}");
    }
}

#[test]
fn wrong_shard_sizes_and_fp8_reductions_are_refused() {
    let out = ranks(2, Duration::from_secs(30), |_, c| {
        let mut be = CpuBackend::new();
        let full = tensor(&mut be, DType::F32, &[1.0; 10]);
        let shard = tensor(&mut be, DType::F32, &[1.0; 4]);
        let a = c.reduce_scatter(&be, &shard, &full, false, Stream::Compute, "g").unwrap_err().to_string();
        let q = be.alloc(MemCategory::Other, Mem::Device, DType::E4M3, &[8]).unwrap();
        let b = c.all_reduce(&be, &q, ReduceOp::Sum, Stream::Compute, "q").unwrap_err().to_string();
        (a, b)
    });
    assert!(out[0].0.contains("must be 2 shards"), "{}", out[0].0);
    assert!(out[0].1.contains("only f32 and bf16"), "{}", out[0].1);
}

#[test]
fn collectives_are_ops_on_their_stream_for_the_order_checker() {
    let out = ranks(1, Duration::from_secs(30), |_, c| {
        let mut be = StreamChecked::new(Box::new(CpuBackend::new()));
        let t = be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[64]).unwrap();
        let u = be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[64]).unwrap();
        be.zero(&t, Stream::Copy).unwrap();
        // the all-reduce reads t on the compute stream without waiting for the copy stream
        let racy = c.all_reduce(&be, &t, ReduceOp::Sum, Stream::Compute, "racy").map_err(|e| e.to_string());
        // ordered through an event: fine
        let ev = be.create_event().unwrap();
        be.zero(&u, Stream::Copy).unwrap();
        be.record(ev, Stream::Copy).unwrap();
        be.wait(Stream::Compute, ev).unwrap();
        let ordered = c.all_reduce(&be, &u, ReduceOp::Sum, Stream::Compute, "ordered").map_err(|e| e.to_string());
        (racy, ordered)
    });
    let (racy, ordered) = &out[0];
    assert!(racy.as_ref().is_err_and(|e| e.contains("collective")), "{racy:?}");
    assert!(ordered.is_ok(), "{ordered:?}");
}

#[test]
fn a_routed_comm_takes_gathers_p2p_and_all_to_all_from_their_own_groups() {
    use llmq_core::comm::RoutedComm;
    use std::sync::Arc;
    // four groups, the base one aborted: gathers, p2p and all-to-all must not touch it, host
    // collectives must
    let group = || ThreadComm::group(2, Duration::from_secs(30));
    let routed: Vec<RoutedComm> = group()
        .into_iter()
        .zip(group())
        .zip(group())
        .zip(group())
        .map(|(((b, g), p), a)| RoutedComm { base: Arc::new(b), gathers: Some(Arc::new(g)), p2p: Some(Arc::new(p)), a2a: Some(Arc::new(a)) })
        .collect();
    routed[1].base.abort("base group closed");
    let out: Vec<(Vec<f32>, Vec<f32>, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = routed
            .iter()
            .enumerate()
            .map(|(r, c)| {
                s.spawn(move || {
                    let mut be = CpuBackend::new();
                    let full = be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[8]).unwrap();
                    let mine = tensor(&mut be, DType::F32, &[r as f32; 4]);
                    c.all_gather(&be, &full, &mine, Stream::Compute, "g").unwrap();
                    let m = tensor(&mut be, DType::F32, &[10.0 + r as f32; 3]);
                    if r == 0 {
                        c.send(&be, &m, 1, Stream::Compute, "p").unwrap();
                    } else {
                        c.recv(&be, &m, 0, Stream::Compute, "p").unwrap();
                    }
                    let src = tensor(&mut be, DType::F32, &[r as f32, r as f32 + 0.5]);
                    let got = be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[2]).unwrap();
                    c.all_to_all(&be, &got, &src, Stream::Compute, "a").unwrap();
                    assert_eq!(values(&be, &got), [0.0, 1.0].map(|x| x + 0.5 * r as f32), "rank {r}: shard r of every rank");
                    let mut h = [r as f64];
                    let e = c.all_reduce_host(&mut h, ReduceOp::Sum, "h").unwrap_err().to_string();
                    (values(&be, &full), values(&be, &m), e)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (full, m, h) in &out {
        assert_eq!(full, &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(m, &[10.0; 3]);
        assert!(h.contains("base group closed"), "{h}");
    }
    assert!(routed[0].describe().contains("all-gather and broadcast") && routed[0].describe().contains("all-to-all"));
}
