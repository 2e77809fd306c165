//! Data parallelism on the CPU (ranks as threads, each backend under the stream-order checker):
//! ZeRO levels and memory options never change the numbers at a given number of ranks; N ranks agree with one rank running N times the
//! accumulation within a stated tolerance; faults on one rank stop or skip on every rank.
//!
//! The data: rank r of N takes chunks r, r + N, r + 2N, ... of one sequence of chunks, so N
//! ranks with A micro-batches of B see, per step, the same chunks as one rank with N·A.

mod common;

use common::*;
use llmq_core::cpu::CpuBackend;
use llmq_core::stream_check::StreamChecked;
use llmq_core::{Comm, DType, ModelConfig, Result};
use llmq_io::data::{Batch, BatchSource};
use llmq_train::ranks::{all_ok, run_ranks};
use llmq_train::*;
use std::sync::Arc;
use std::time::Duration;

/// Pre-generated chunks of the Markov corpus, rank-strided.
struct Chunks {
    chunks: Arc<Vec<(Vec<i32>, Vec<i32>)>>,
    rank: usize,
    world: usize,
    next: usize,
}

impl BatchSource for Chunks {
    fn next_batch(&mut self, b: usize, t: usize) -> Result<Batch> {
        let mut batch = Batch { inputs: vec![], targets: vec![] };
        for _ in 0..b {
            let (i, tg) = &self.chunks[(self.rank + self.next * self.world) % self.chunks.len()];
            assert_eq!(i.len(), t);
            batch.inputs.extend(i);
            batch.targets.extend(tg);
            self.next += 1;
        }
        Ok(batch)
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "next": self.next })
    }
    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        self.next = s["next"].as_u64().unwrap() as usize;
        Ok(())
    }
    fn epoch(&self) -> f64 {
        0.0
    }
    fn describe(&self) -> String {
        "chunks".into()
    }
}

fn chunks(cfg: &ModelConfig, t: usize, n: usize) -> Arc<Vec<(Vec<i32>, Vec<i32>)>> {
    let mut s = llmq_train::synthetic::MarkovSource::new(cfg.vocab_size, 99).stream(0);
    Arc::new((0..n).map(|_| s.next_batch(1, t).unwrap()).map(|b| (b.inputs, b.targets)).collect())
}

/// What a run produced: (loss, norm) per step and the final master weights, bit patterns.
#[derive(Debug, PartialEq)]
struct Trace {
    steps: Vec<(u64, u64)>,
    master: Vec<Vec<u32>>,
}

/// Trains `steps` steps on `world` ranks; returns rank 0's trace (after checking that every
/// rank saw the same losses, norms and weights).
fn train(cfg: &ModelConfig, tc: &TrainConfig, world: usize, steps: u64) -> Trace {
    let data = chunks(cfg, tc.seq_len, 64);
    let tc = TrainConfig { world_size: world, ..tc.clone() };
    let traces = all_ok(run_ranks(world, Duration::from_secs(60), |comm: Arc<dyn Comm>| {
        let src = Chunks { chunks: data.clone(), rank: comm.rank(), world, next: 0 };
        // every collective and copy is checked for its ordering against the other streams
        let be = Box::new(StreamChecked::new(Box::new(CpuBackend::new())));
        let mut tr = Trainer::new_rank(be, cfg, tc.clone(), Box::new(src), None, Some(comm))?;
        tr.init_from_scratch()?;
        let mut steps_out = vec![];
        for _ in 0..steps {
            let st = tr.train_step()?;
            steps_out.push((st.loss.to_bits(), st.grad_norm.to_bits()));
        }
        let master = tr.master_weights()?.iter().map(|g| g.iter().map(|x| x.to_bits()).collect()).collect();
        Ok(Trace { steps: steps_out, master })
    }))
    .unwrap();
    for (r, t) in traces.iter().enumerate().skip(1) {
        assert_eq!(t, &traces[0], "rank {r} differs from rank 0");
    }
    traces.into_iter().next().unwrap()
}

fn with_memory(tc: &TrainConfig, f: impl Fn(&mut MemoryOptions)) -> TrainConfig {
    let mut t = tc.clone();
    f(&mut t.memory);
    t
}

fn precisions() -> Vec<(&'static str, Precision)> {
    vec![
        ("fp32", Precision::fp32()),
        ("bf16 with fp32 master", Precision { weights: DType::BF16, matmul: DType::BF16, ..Precision::fp32() }),
        ("bf16 everywhere (stochastic rounding)", Precision { master: DType::BF16, grads: DType::BF16, opt_m: DType::BF16, opt_v: DType::BF16, ..Precision::bf16() }),
        ("e4m3", Precision::fp8()),
    ]
}

#[test]
fn a_group_of_one_rank_is_the_single_device_trainer() {
    let cfg = tiny(llmq_core::Arch::Qwen2, false);
    let tc = train_config(2, 16, 2, 3);
    let single = {
        let src = Chunks { chunks: chunks(&cfg, 16, 64), rank: 0, world: 1, next: 0 };
        let mut tr = Trainer::new(Box::new(CpuBackend::new()), &cfg, tc.clone(), Box::new(src), None).unwrap();
        tr.init_from_scratch().unwrap();
        let steps = (0..3).map(|_| tr.train_step().map(|s| (s.loss.to_bits(), s.grad_norm.to_bits())).unwrap()).collect();
        let master = tr.master_weights().unwrap().iter().map(|g| g.iter().map(|x| x.to_bits()).collect()).collect();
        Trace { steps, master }
    };
    assert_eq!(train(&cfg, &tc, 1, 3), single);
}

#[test]
fn zero_levels_give_identical_numbers() {
    let cfg = tiny(llmq_core::Arch::Qwen3, false);
    for (name, precision) in precisions() {
        for (world, accum) in [(2, 1), (3, 2)] {
            let tc = TrainConfig { precision, ..train_config(2, 16, accum, 3) };
            let zero1 = train(&cfg, &tc, world, 3);
            assert!(zero1.steps.iter().all(|&(l, n)| f64::from_bits(l).is_finite() && f64::from_bits(n) > 0.0), "{name}: {zero1:?}");
            let zero2 = train(&cfg, &with_memory(&tc, |m| m.shard_gradients = true), world, 3);
            assert_eq!(zero1, zero2, "{name}, {world} ranks x {accum}: ZeRO-2 differs from ZeRO-1");
            let zero3 = train(&cfg, &with_memory(&tc, |m| { m.shard_gradients = true; m.shard_weights = true }), world, 3);
            assert_eq!(zero1, zero3, "{name}, {world} ranks x {accum}: ZeRO-3 differs from ZeRO-1");
            if precision.matmul.is_fp8() {
                // each rank quantises its shard with the global abs-maxes; e4m3 bytes are gathered
                let quants = train(&cfg, &with_memory(&tc, |m| { m.shard_weights = true; m.persistent_quants = true }), world, 3);
                assert_eq!(zero1, quants, "{name}, {world} ranks x {accum}: ZeRO-3 with persistent quants differs from ZeRO-1");
            }
            // --all-to-all-reduce: the same reduce-scatters by all-to-all plus a local reduction
            let a2a1 = train(&cfg, &with_memory(&tc, |m| m.all_to_all_reduce = true), world, 3);
            assert_eq!(zero1, a2a1, "{name}, {world} ranks x {accum}: ZeRO-1 with --all-to-all-reduce differs");
            let a2a3 = train(&cfg, &with_memory(&tc, |m| { m.shard_gradients = true; m.shard_weights = true; m.all_to_all_reduce = true }), world, 3);
            assert_eq!(zero1, a2a3, "{name}, {world} ranks x {accum}: ZeRO-3 with --all-to-all-reduce differs");
        }
    }
}

#[test]
fn zero_works_with_every_memory_option() {
    let cfg = tiny(llmq_core::Arch::Llama, true);
    for (name, precision) in [precisions()[1], precisions()[3]] {
        for accum in [1, 2] {
            let tc = TrainConfig { precision, ..train_config(2, 16, accum, 2) };
            let plain = train(&cfg, &tc, 2, 2);
            let variants: Vec<(&str, TrainConfig)> = vec![
                ("recompute block + offloaded optimizer state", with_memory(&tc, |m| {
                    m.recompute.block = true;
                    m.offload_master = true;
                    m.offload_opt_m = true;
                    m.offload_opt_v = true;
                })),
                ("offloaded optimizer state updated in place (zero-copy)", with_memory(&tc, |m| {
                    m.offload_opt_m = true;
                    m.offload_opt_v = true;
                    m.zero_copy = true;
                })),
                ("ZeRO-2 + offloaded gradients and residuals", with_memory(&tc, |m| {
                    m.shard_gradients = true;
                    m.offload_gradients = true;
                    m.offload_residual = true;
                })),
                ("ZeRO-3 + streamed weight shards", with_memory(&tc, |m| {
                    m.shard_weights = true;
                    m.stream_weights = true;
                    m.offload_master = true;
                })),
                ("ZeRO-1 + streamed weights + offloaded gradients", with_memory(&tc, |m| {
                    m.stream_weights = true;
                    m.offload_gradients = true;
                })),
                ("--all-to-all-reduce + ZeRO-1 + offloaded gradients", with_memory(&tc, |m| {
                    m.all_to_all_reduce = true;
                    m.offload_gradients = true;
                })),
                ("--all-to-all-reduce + ZeRO-2 + offloaded gradients", with_memory(&tc, |m| {
                    m.all_to_all_reduce = true;
                    m.shard_gradients = true;
                    m.offload_gradients = true;
                })),
            ];
            let mut variants = variants;
            if precision.matmul.is_fp8() {
                // fp8 weights quantised per shard and gathered as e4m3 bytes
                variants.push(("ZeRO-3 + persistent quants", with_memory(&tc, |m| {
                    m.shard_weights = true;
                    m.persistent_quants = true;
                })));
                variants.push(("ZeRO-3 + persistent quants offloaded, streamed weight shards", with_memory(&tc, |m| {
                    m.shard_weights = true;
                    m.stream_weights = true;
                    m.persistent_quants = true;
                    m.offload_quants = true;
                    m.recompute.block = true;
                })));
                variants.push(("ZeRO-1 + persistent quants offloaded", with_memory(&tc, |m| {
                    m.persistent_quants = true;
                    m.offload_quants = true;
                })));
            }
            for (what, t) in variants {
                assert_eq!(train(&cfg, &t, 2, 2), plain, "{name} x {accum}: {what}");
            }
        }
    }
}

#[test]
fn ranks_agree_with_one_rank_running_their_micro_batches() {
    let cfg = tiny(llmq_core::Arch::Qwen2, false);
    // f32 numerics: the per-step sums differ only in how the micro-batch gradients are grouped
    // ((g0 + g1) + (g2 + g3) against ((g0 + g1) + g2) + g3), a few ulps of f32
    for (world, accum) in [(2, 1), (2, 2), (4, 1)] {
        let tc = train_config(2, 16, accum, 4);
        let ranks = train(&cfg, &tc, world, 4);
        let one = train(&cfg, &TrainConfig { grad_accumulation: accum * world, ..tc.clone() }, 1, 4);
        for (i, (a, b)) in ranks.steps.iter().zip(&one.steps).enumerate() {
            let (la, lb) = (f64::from_bits(a.0), f64::from_bits(b.0));
            let (na, nb) = (f64::from_bits(a.1), f64::from_bits(b.1));
            assert!((la - lb).abs() <= 1e-5 * lb.abs(), "{world} x {accum}, step {}: loss {la} vs {lb}", i + 1);
            assert!((na - nb).abs() <= 1e-4 * nb.abs(), "{world} x {accum}, step {}: norm {na} vs {nb}", i + 1);
        }
        // the first step's loss is the same forward pass over the same chunks
        assert!((f64::from_bits(ranks.steps[0].0) - f64::from_bits(one.steps[0].0)).abs() < 1e-12);
    }
}

#[test]
fn a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank() {
    let cfg = tiny(llmq_core::Arch::Qwen2, false);
    let tc = TrainConfig { world_size: 2, ..train_config(2, 16, 1, 3) };
    let data = chunks(&cfg, 16, 64);
    let out = all_ok(run_ranks(2, Duration::from_secs(60), |comm: Arc<dyn Comm>| {
        let rank = comm.rank();
        let src = Chunks { chunks: data.clone(), rank, world: 2, next: 0 };
        let mut tr = Trainer::new_rank(Box::new(CpuBackend::new()), &cfg, tc.clone(), Box::new(src), None, Some(comm))?;
        tr.init_from_scratch()?;
        let before = tr.master_weights()?;
        let t0 = std::time::Instant::now();
        let (loss, _) = tr.accumulate_gradients()?;
        if rank == 1 {
            // a NaN in rank 1's shard of the reduced gradient of the last group
            let gi = tr.model().params.layout.groups.len() - 1;
            let g = tr.model().params.own_grads(gi);
            let mut vals = llmq_train::params::download_f32(tr.backend(), &g)?;
            vals[0] = f32::NAN;
            llmq_train::params::upload_f32(tr.backend(), &g, &vals)?;
        }
        let st = tr.finish_step(loss, t0)?;
        let after = tr.master_weights()?;
        Ok((st.skipped, st.grad_norm.is_nan(), before == after, tr.optimizer().updates()))
    }))
    .unwrap();
    assert_eq!(out, vec![(true, true, true, 0); 2]);
}

#[test]
fn a_failing_rank_stops_the_others_instead_of_hanging() {
    let cfg = tiny(llmq_core::Arch::Qwen2, false);
    let tc = TrainConfig { world_size: 2, ..train_config(2, 16, 1, 3) };
    let data = chunks(&cfg, 16, 64);
    let t0 = std::time::Instant::now();
    let res = run_ranks(2, Duration::from_secs(600), |comm: Arc<dyn Comm>| {
        let rank = comm.rank();
        let src = Chunks { chunks: data.clone(), rank, world: 2, next: 0 };
        let mut tr = Trainer::new_rank(Box::new(CpuBackend::new()), &cfg, tc.clone(), Box::new(src), None, Some(comm))?;
        tr.init_from_scratch()?;
        tr.train_step()?;
        if rank == 1 {
            return Err(llmq_core::Error::Config("rank 1 ran out of data".into()));
        }
        tr.train_step().map(|_| ())
    });
    assert!(t0.elapsed() < Duration::from_secs(60), "waited for the timeout");
    let e0 = res[0].as_ref().unwrap_err().to_string();
    assert!(e0.contains("rank 1 failed") && e0.contains("ran out of data"), "{e0}");
    let e = all_ok(res).unwrap_err().to_string();
    assert!(e.contains("rank 1 ran out of data") && !e.contains("failed: "), "{e}");
}

/// A token file of the Markov corpus (64 chunks of 16 + 1 tokens and more).
fn token_file(cfg: &ModelConfig, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmq_zero_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = llmq_train::synthetic::MarkovSource::new(cfg.vocab_size, 5).stream(0);
    let tokens = s.next_batch(1, 64 * 17 + 1).unwrap().inputs;
    let f = dir.join("train.bin");
    llmq_io::tokfile::write_token_file(&f, &tokens, None, Some(cfg.vocab_size as u32)).unwrap();
    f
}

/// Steps of `world` ranks on the token file: optionally resumed from `from`, optionally saving
/// a checkpoint under `save` at the end; returns the (loss, norm) bits of each step.
fn run_on_file(cfg: &ModelConfig, tc: &TrainConfig, world: usize, file: &std::path::Path, steps: u64, from: Option<&std::path::Path>, save: Option<&std::path::Path>) -> Vec<(f64, f64)> {
    let tc = TrainConfig { world_size: world, ..tc.clone() };
    let out = all_ok(run_ranks(world, Duration::from_secs(60), |comm: Arc<dyn Comm>| {
        let opts = llmq_io::loader::LoaderOptions { rank: comm.rank(), world_size: world, ..llmq_io::loader::LoaderOptions::train(tc.seq_len, 11) };
        let data = llmq_io::loader::TokenLoader::new(&[file.to_path_buf()], opts)?;
        let mut tr = Trainer::new_rank(Box::new(CpuBackend::new()), cfg, tc.clone(), Box::new(data), None, Some(comm))?;
        tr.init_from_scratch()?;
        if let Some(dir) = from {
            llmq_train::checkpoint::load(&mut tr, dir)?;
        }
        let mut v = vec![];
        for _ in 0..steps {
            let st = tr.train_step()?;
            v.push((st.loss, st.grad_norm));
        }
        if let Some(root) = save {
            llmq_train::checkpoint::save(&tr, root, &llmq_io::ckpt::Lineage::fresh())?;
        }
        Ok(v)
    }))
    .unwrap();
    out.into_iter().next().unwrap()
}

#[test]
fn a_checkpoint_of_two_ranks_resumes_under_one_two_and_four() {
    let cfg = tiny(llmq_core::Arch::Qwen3, false);
    let file = token_file(&cfg, "resume");
    let root = file.parent().unwrap().join("ckpt");
    let tc = TrainConfig { precision: Precision { weights: DType::BF16, matmul: DType::BF16, ..Precision::fp32() }, ..train_config(2, 16, 2, 4) };
    let straight = run_on_file(&cfg, &tc, 2, &file, 4, None, None);
    let first = run_on_file(&cfg, &tc, 2, &file, 2, None, Some(&root));
    assert_eq!(first[..], straight[..2]);
    let dir = llmq_io::ckpt::checkpoint_dir(&root, 2);
    // the same two ranks under ZeRO-3: bitwise
    let zero3 = TrainConfig { memory: MemoryOptions { shard_gradients: true, shard_weights: true, ..tc.memory }, ..tc.clone() };
    assert_eq!(run_on_file(&cfg, &zero3, 2, &file, 2, Some(&dir), None)[..], straight[2..], "2 ranks, ZeRO-3");
    // one rank with 4 micro-batches, four ranks with one: the same chunks per step, the sums
    // grouped differently
    for (world, accum) in [(1, 4), (4, 1)] {
        let other = TrainConfig { grad_accumulation: accum, ..tc.clone() };
        let resumed = run_on_file(&cfg, &other, world, &file, 2, Some(&dir), None);
        for (i, ((la, na), (lb, nb))) in resumed.iter().zip(&straight[2..]).enumerate() {
            assert!((la - lb).abs() <= 1e-4 * lb.abs() && (na - nb).abs() <= 1e-3 * nb.abs(), "{world} ranks, step {}: ({la}, {na}) vs ({lb}, {nb})", i + 3);
        }
    }
    // the same ranks with another accumulation would change the step: refused, naming the fix
    let wrong = TrainConfig { grad_accumulation: 1, ..tc.clone() };
    let e = all_ok(run_ranks(2, Duration::from_secs(60), |comm: Arc<dyn Comm>| {
        let opts = llmq_io::loader::LoaderOptions { rank: comm.rank(), world_size: 2, ..llmq_io::loader::LoaderOptions::train(16, 11) };
        let data = llmq_io::loader::TokenLoader::new(std::slice::from_ref(&file), opts)?;
        let mut tr = Trainer::new_rank(Box::new(CpuBackend::new()), &cfg, TrainConfig { world_size: 2, ..wrong.clone() }, Box::new(data), None, Some(comm))?;
        llmq_train::checkpoint::load(&mut tr, &dir).map(|_| ())
    }))
    .unwrap_err()
    .to_string();
    assert!(e.contains("2 x 2 = 4, now 1 x 2 = 2") && e.contains("--grad-accumulation 2"), "{e}");
}

#[test]
fn the_all_to_all_staging_buffer_is_in_the_memory_plan() {
    use llmq_core::{Mem, MemCategory};
    let cfg = tiny(llmq_core::Arch::Qwen3, false);
    for (world, shard_gradients) in [(2, false), (3, true)] {
        let tc = TrainConfig { world_size: world, ..with_memory(&train_config(2, 16, 1, 1), |m| m.shard_gradients = shard_gradients) };
        let a2a = with_memory(&tc, |m| m.all_to_all_reduce = true);
        let grads = |tc: &TrainConfig| {
            let plan = llmq_train::plan::MemoryPlan::new(&cfg, tc, 0).unwrap();
            plan.by_category().into_iter().filter(|(c, m, _)| *c == MemCategory::Gradients && *m == Mem::Device).map(|(_, _, b)| b).sum::<usize>()
        };
        // one device buffer of the largest group, padded to whole shards
        let largest = llmq_core::ParamLayout::new(&cfg).groups.iter().map(|g| llmq_core::shard_len(g.numel, world) * world).max().unwrap();
        assert_eq!(grads(&a2a) - grads(&tc), largest * tc.precision.grads.size(), "{world} ranks, ZeRO-2 {shard_gradients}");
    }
}

/// One collective: its kind, dtype, name and bytes.
type Moved = (&'static str, DType, String, usize);

/// Records the bytes each all-gather and broadcast moves, around another rank.
struct Counting {
    inner: Arc<dyn Comm>,
    moved: std::sync::Mutex<Vec<Moved>>,
}

impl Counting {
    fn note(&self, kind: &'static str, t: &llmq_core::Tensor, what: &str) {
        self.moved.lock().unwrap().push((kind, t.dtype, what.to_string(), t.bytes()));
    }
}

impl Comm for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn all_reduce(&self, be: &dyn llmq_core::Backend, t: &llmq_core::Tensor, op: llmq_core::ReduceOp, s: llmq_core::Stream, what: &str) -> Result<()> {
        self.inner.all_reduce(be, t, op, s, what)
    }
    fn reduce_scatter(&self, be: &dyn llmq_core::Backend, dst: &llmq_core::Tensor, src: &llmq_core::Tensor, acc: bool, s: llmq_core::Stream, what: &str) -> Result<()> {
        self.inner.reduce_scatter(be, dst, src, acc, s, what)
    }
    fn all_gather(&self, be: &dyn llmq_core::Backend, dst: &llmq_core::Tensor, src: &llmq_core::Tensor, s: llmq_core::Stream, what: &str) -> Result<()> {
        self.note("all-gather", dst, what);
        self.inner.all_gather(be, dst, src, s, what)
    }
    fn broadcast(&self, be: &dyn llmq_core::Backend, t: &llmq_core::Tensor, root: usize, s: llmq_core::Stream, what: &str) -> Result<()> {
        self.note("broadcast", t, what);
        self.inner.broadcast(be, t, root, s, what)
    }
    fn send(&self, be: &dyn llmq_core::Backend, t: &llmq_core::Tensor, peer: usize, s: llmq_core::Stream, what: &str) -> Result<()> {
        self.inner.send(be, t, peer, s, what)
    }
    fn recv(&self, be: &dyn llmq_core::Backend, t: &llmq_core::Tensor, peer: usize, s: llmq_core::Stream, what: &str) -> Result<()> {
        self.inner.recv(be, t, peer, s, what)
    }
    fn all_reduce_host(&self, vals: &mut [f64], op: llmq_core::ReduceOp, what: &str) -> Result<()> {
        self.inner.all_reduce_host(vals, op, what)
    }
    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        self.inner.all_gather_bytes(bytes, what)
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
}

#[test]
fn zero3_with_persistent_quants_gathers_block_matrices_as_e4m3_bytes_only() {
    let cfg = tiny(llmq_core::Arch::Qwen2, true);
    let (name, precision) = precisions().into_iter().find(|(_, p)| p.matmul.is_fp8()).expect("an fp8 precision");
    let tc = TrainConfig { precision, world_size: 2, ..train_config(2, 16, 1, 3) };
    let tc = with_memory(&tc, |m| {
        m.shard_gradients = true;
        m.shard_weights = true;
        m.persistent_quants = true;
    });
    let data = chunks(&cfg, tc.seq_len, 64);
    // steps 1 and 2 plain, step 3 with --log-amax 3 (which reads the bf16 matrices)
    let runs = all_ok(run_ranks(2, Duration::from_secs(60), |comm: Arc<dyn Comm>| {
        let counting = Arc::new(Counting { inner: comm.clone(), moved: Default::default() });
        let src = Chunks { chunks: data.clone(), rank: comm.rank(), world: 2, next: 0 };
        let be = Box::new(StreamChecked::new(Box::new(CpuBackend::new())));
        let mut tr = Trainer::new_rank(be, &cfg, tc.clone(), Box::new(src), None, Some(counting.clone() as Arc<dyn Comm>))?;
        tr.init_from_scratch()?;
        tr.log_fp8_health(3)?;
        let mut per_step = vec![];
        let mut steps = vec![];
        for _ in 0..3 {
            let st = tr.train_step()?;
            steps.push((st.loss.to_bits(), st.grad_norm.to_bits()));
            per_step.push(std::mem::take(&mut *counting.moved.lock().unwrap()));
        }
        Ok((steps, per_step))
    }))
    .unwrap();
    let reference = train(&cfg, &with_memory(&tc, |m| m.persistent_quants = false), 2, 3);
    assert_eq!(runs[0].0, reference.steps, "{name}: ZeRO-3 with persistent quants and --log-amax differs from ZeRO-3");

    let layout = llmq_core::ParamLayout::new(&cfg);
    let group = &layout.groups[layout.block_group(0)];
    let (matrices, small): (Vec<_>, Vec<_>) = group.entries.iter().partition(|e| llmq_train::fp8::WEIGHTS.contains(&e.kind));
    let matrix_bytes: usize = matrices.iter().map(|e| e.numel()).sum();
    let small_bytes: usize = small.iter().map(|e| e.numel() * 2).sum();
    assert!(small_bytes > 0 && matrix_bytes > 10 * small_bytes, "{small_bytes} {matrix_bytes}");
    for (step, moved) in runs[0].1.iter().enumerate() {
        let bytes = |f: &dyn Fn(&Moved) -> bool| moved.iter().filter(|m| f(m)).map(|m| m.3).sum::<usize>();
        let fp8 = bytes(&|m| m.1 == DType::E4M3 && m.2.starts_with("fp8 weights of block"));
        let fetches = fp8 / (2 * llmq_core::comm::shard_len(group.numel, 2));
        assert!(fp8 > 0 && fetches >= cfg.num_layers, "step {}: {moved:?}", step + 1);
        let whole = bytes(&|m| m.0 == "all-gather" && m.2.starts_with("weights of block"));
        let pieces = bytes(&|m| m.0 == "broadcast" && m.1 == DType::BF16);
        if step < 2 {
            // the bf16 state a gathered block brings: its norms and biases, nothing else
            assert_eq!(whole, 0, "step {}: whole bf16 blocks gathered: {moved:?}", step + 1);
            assert_eq!(pieces, fetches * small_bytes, "step {}: {moved:?}", step + 1);
        } else {
            assert!(whole > 0 && pieces == 0, "step 3 (--log-amax): the bf16 matrices must be gathered: {moved:?}");
        }
    }
}
