//! `--all-to-all-reduce` on the CPU: the reduce-scatter from an all-to-all into a staging buffer
//! plus `Backend::reduce_shards` gives the bits of `Comm::reduce_scatter` (every gradient dtype,
//! in and out of place, accumulating), its reuse of the staging buffer across streams is
//! ordered for the stream-order checker, and bad buffers are refused naming the call.

use llmq_core::all_to_all::AllToAllReduce;
mod common;
use common::tensor;
use llmq_core::comm::{Comm, ThreadComm};
use llmq_core::cpu::CpuBackend;
use llmq_core::stream_check::StreamChecked;
use llmq_core::{Backend, DType, Mem, MemCategory, Stream, Tensor};
use std::time::Duration;

fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = common::Rng::new(seed);
    // mixed magnitudes, so that the order of the additions shows in the rounding
    (0..n).map(|_| rng.uniform() * 10f32.powi(rng.below(7) as i32 - 3)).collect()
}

fn ranks<T: Send>(world: usize, f: impl Fn(usize, &ThreadComm) -> T + Sync) -> Vec<T> {
    let comms = ThreadComm::group(world, Duration::from_secs(30));
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().enumerate().map(|(r, c)| { let f = &f; s.spawn(move || f(r, c)) }).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One rank's results of the three reduce-scatter forms, by `Comm::reduce_scatter` and by the
/// all-to-all route: (out of place, accumulating, in place) bytes.
type Forms = [Vec<u8>; 3];

fn run_forms(be: &mut dyn Backend, c: &dyn Comm, a2a: Option<&AllToAllReduce>, dtype: DType, r: usize, s: usize) -> Forms {
    let world = c.world();
    let src = tensor(be, dtype, &random(r as u64 + 1, world * s));
    let out = be.alloc(MemCategory::Other, Mem::Device, dtype, &[s]).unwrap();
    let acc = tensor(be, dtype, &random(100 + r as u64, s));
    let inplace = tensor(be, dtype, &random(r as u64 + 1, world * s));
    let mine = inplace.slice(r * s, &[s]);
    // the three calls on three streams, each ordered after the previous one's writes
    let ev = be.create_event().unwrap();
    let calls: [(&Tensor, &Tensor, bool, Stream); 3] = [(&out, &src, false, Stream::Compute), (&acc, &src, true, Stream::CopyBack), (&mine, &inplace, false, Stream::Copy)];
    let mut prev = None;
    for (dst, src, accumulate, stream) in calls {
        if let Some(p) = prev {
            be.record(ev, p).unwrap();
            be.wait(stream, ev).unwrap();
        }
        match a2a {
            Some(a) => a.reduce_scatter(c, be, dst, src, accumulate, stream, "gradients").unwrap(),
            None => c.reduce_scatter(be, dst, src, accumulate, stream, "gradients").unwrap(),
        }
        prev = Some(stream);
    }
    be.synchronize().unwrap();
    [be.download(&out).unwrap(), be.download(&acc).unwrap(), be.download(&mine).unwrap()]
}

#[test]
fn all_to_all_reduce_is_bitwise_the_reduce_scatter() {
    for dtype in [DType::F32, DType::BF16] {
        for world in [2, 3, 4] {
            let s = 384;
            let out = ranks(world, |r, c| {
                let mut be = StreamChecked::new(Box::new(CpuBackend::new()));
                let plain = run_forms(&mut be, c, None, dtype, r, s);
                let a2a = AllToAllReduce::alloc(&mut be, dtype, world * s).unwrap();
                let routed = run_forms(&mut be, c, Some(&a2a), dtype, r, s);
                (plain, routed, be.ops_checked())
            });
            for (r, (plain, routed, checked)) in out.iter().enumerate() {
                for (form, (p, a)) in ["out of place", "accumulating", "in place"].iter().zip(plain.iter().zip(routed)) {
                    assert_eq!(p, a, "{dtype} world {world} rank {r}: {form}");
                }
                assert!(*checked > 0);
            }
            // the inputs differ between ranks, so the shards do too (the test compares real sums)
            assert_ne!(out[0].0[0], out[1].0[0]);
        }
    }
}

#[test]
fn reusing_the_staging_buffer_on_another_stream_waits_for_the_previous_reduction() {
    let out = ranks(2, |r, c| {
        let mut be = StreamChecked::new(Box::new(CpuBackend::new()));
        let a2a = AllToAllReduce::alloc(&mut be, DType::F32, 512).unwrap();
        let src = tensor(&mut be, DType::F32, &random(r as u64, 512));
        let (x, y) = (be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[256]).unwrap(), be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[256]).unwrap());
        a2a.reduce_scatter(c, &be, &x, &src, false, Stream::Compute, "first").unwrap();
        // src is only read on both streams; the staging buffer is written on the second stream
        // after it was read on the first: ordered by the collective's own event
        a2a.reduce_scatter(c, &be, &y, &src, false, Stream::CopyBack, "second").map_err(|e| e.to_string())
    });
    for (r, o) in out.iter().enumerate() {
        assert!(o.is_ok(), "rank {r}: {o:?}");
    }
}

#[test]
fn bad_buffers_are_refused_naming_the_call() {
    let out = ranks(2, |_, c| {
        let mut be = CpuBackend::new();
        let a2a = AllToAllReduce::alloc(&mut be, DType::F32, 256).unwrap();
        let big = tensor(&mut be, DType::F32, &[1.0; 512]);
        let shard = tensor(&mut be, DType::F32, &[1.0; 256]);
        let too_big = a2a.reduce_scatter(c, &be, &shard, &big, false, Stream::Compute, "gradients of block 3").unwrap_err().to_string();
        let bf = tensor(&mut be, DType::BF16, &[1.0; 256]);
        let bf_shard = tensor(&mut be, DType::BF16, &[1.0; 128]);
        let dtype = a2a.reduce_scatter(c, &be, &bf_shard, &bf, false, Stream::Compute, "head").unwrap_err().to_string();
        let odd = tensor(&mut be, DType::F32, &[1.0; 100]);
        let shards = be.reduce_shards(&shard, &odd, false, Stream::Compute).unwrap_err().to_string();
        let overlap = be.reduce_shards(&big.slice(0, &[128]), &big.slice(0, &[256]), false, Stream::Compute).unwrap_err().to_string();
        let q = be.alloc(MemCategory::Other, Mem::Device, DType::E4M3, &[256]).unwrap();
        let q2 = be.alloc(MemCategory::Other, Mem::Device, DType::E4M3, &[256]).unwrap();
        let fp8 = be.reduce_shards(&q.slice(0, &[128]), &q2, false, Stream::Compute).unwrap_err().to_string();
        [too_big, dtype, shards, overlap, fp8]
    });
    let [too_big, dtype, shards, overlap, fp8] = &out[0];
    assert!(too_big.contains("gradients of block 3") && too_big.contains("staging buffer holds fp32 x 256"), "{too_big}");
    assert!(dtype.contains("'head'") && dtype.contains("bf16 x 256"), "{dtype}");
    assert!(shards.contains("whole number"), "{shards}");
    assert!(overlap.contains("overlaps"), "{overlap}");
    assert!(fp8.contains("f32 or both bf16"), "{fp8}");
}

#[test]
fn the_reference_reduction_adds_shards_in_rank_order_and_rounds_once() {
    let mut be = CpuBackend::new();
    // 1 + 2^-24 + 2^-24: rank order gives 1 (each tiny addend rounds away), a tree would not
    let staged = tensor(&mut be, DType::F32, &[1.0, 2f32.powi(-24), 2f32.powi(-24)]);
    let dst = tensor(&mut be, DType::F32, &[0.0]);
    be.reduce_shards(&dst, &staged, false, Stream::Compute).unwrap();
    assert_eq!(be.download(&dst).unwrap(), 1f32.to_le_bytes());
    // accumulating starts from dst: (2^-24 + 2^-24) + 1 ... = 1 + 2^-23 exactly
    let staged = tensor(&mut be, DType::F32, &[2f32.powi(-24), 1.0]);
    let dst = tensor(&mut be, DType::F32, &[2f32.powi(-24)]);
    be.reduce_shards(&dst, &staged, true, Stream::Compute).unwrap();
    assert_eq!(be.download(&dst).unwrap(), (1.0 + 2f32.powi(-23)).to_le_bytes());
}
