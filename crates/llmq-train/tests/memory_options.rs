//! Memory options never change the numbers: every recompute setting gives bitwise-identical
//! losses, gradient norms and weights to the plain run; gradient accumulation over k
//! micro-batches matches one k-times-larger batch to float tolerance; a checkpoint resumes under
//! other memory and speed options.

mod common;
use common::*;
use llmq_core::{Arch, DType};
use llmq_train::{MemoryOptions, Precision, Recompute};

fn run(cfg: &llmq_core::ModelConfig, mut tc: llmq_train::TrainConfig, mem: MemoryOptions) -> (Vec<(u64, u64)>, Vec<Vec<f32>>) {
    tc.memory = mem;
    let mut tr = trainer(cfg, tc);
    let mut hist = vec![];
    for _ in 0..3 {
        let s = tr.train_step().unwrap();
        hist.push((s.loss.to_bits(), s.grad_norm.to_bits()));
    }
    let w = tr.master_weights().unwrap();
    (hist, w)
}

#[test]
fn recompute_options_are_bitwise_identical() {
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Llama] {
        for precision in [Precision::fp32(), Precision::bf16()] {
            let mut cfg = tiny(arch, arch != Arch::Llama);
            cfg.vocab_size = 160; // the backward temporaries fit in the logits buffer
            let mut tc = train_config(2, 8, 2, 3);
            tc.precision = precision;
            let (base, wbase) = run(&cfg, tc.clone(), MemoryOptions::default());
            for (name, recompute) in Recompute::all_variants() {
                let (h, w) = run(&cfg, tc.clone(), MemoryOptions { recompute, ..Default::default() });
                assert_eq!(h, base, "{arch:?} {:?} recompute {name}: losses/norms differ", precision.weights);
                assert!(w == wbase, "{arch:?} recompute {name}: weights differ");
            }
        }
    }
}

/// The optimizer's update of host-resident state, staged through device slots (the default)
/// or in place over mapped host memory (`zero_copy`), in ordinary or write-combined pinned
/// memory, gives the bits of the resident update, for every role the optimizer may find on the
/// host, with fp32 and bf16 optimizer state.
#[test]
fn staged_and_zero_copy_optimizer_updates_are_bitwise_identical() {
    let mut cfg = tiny(Arch::Qwen3, true);
    cfg.num_layers = 5; // each of the two slots per role serves more than one block
    for precision in [Precision::bf16(), Precision { opt_m: DType::BF16, opt_v: DType::BF16, ..Precision::bf16() }] {
        let tc = train_config(2, 8, 2, 3);
        let tc = llmq_train::TrainConfig { precision, ..tc };
        let (base, wbase) = run(&cfg, tc.clone(), MemoryOptions::default());
        let opt = MemoryOptions { offload_master: true, offload_opt_m: true, offload_opt_v: true, ..Default::default() };
        let all = MemoryOptions { stream_weights: true, offload_gradients: true, ..opt };
        for mem in [opt, MemoryOptions { offload_opt_v: false, ..opt }, MemoryOptions { stream_weights: true, ..Default::default() }, all] {
            for (zero_copy, write_combined) in [(false, false), (true, false), (false, true), (true, true)] {
                let mem = MemoryOptions { zero_copy, write_combined, ..mem };
                let (h, w) = run(&cfg, tc.clone(), mem);
                assert_eq!(h, base, "{:?} m, {}: losses/norms differ", precision.opt_m, mem.describe());
                assert!(w == wbase, "{}: weights differ", mem.describe());
            }
        }
    }
}

/// Blocks captured as graphs (`--cuda-graphs`; on the CPU each block's ops are recorded on its
/// first call and replayed from the record afterwards) give bitwise the plain run's losses,
/// gradient norms, weights and evaluation loss, over steps with a warmup and a decay of the
/// learning rate and two micro-batches each, under recomputation (which the backward graphs
/// hold).
#[test]
fn cuda_graphs_are_bitwise_identical() {
    let graphs = |tr: &mut llmq_train::Trainer| {
        let mut hist = vec![];
        for _ in 0..5 {
            let s = tr.train_step().unwrap();
            hist.push((s.loss.to_bits(), s.grad_norm.to_bits(), s.lr.to_bits()));
        }
        let eval = tr.evaluate().unwrap().unwrap().to_bits();
        (hist, eval, tr.master_weights().unwrap())
    };
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Llama] {
        for precision in [Precision::fp32(), Precision::bf16()] {
            let mut cfg = tiny(arch, arch != Arch::Llama);
            cfg.vocab_size = 160;
            cfg.num_layers = 3;
            let mut tc = train_config(2, 8, 2, 5);
            tc.precision = precision;
            let base = graphs(&mut trainer(&cfg, tc.clone()));
            let lrs: std::collections::BTreeSet<u64> = base.0.iter().map(|h| h.2).collect();
            assert_eq!(lrs.len(), 5, "the learning rate should change every step");
            for recompute in [Recompute::default(), Recompute { block: true, ..Default::default() }, Recompute { att: true, swiglu: true, ..Default::default() }] {
                tc.memory = MemoryOptions { recompute, cuda_graphs: true, ..Default::default() };
                let g = graphs(&mut trainer(&cfg, tc.clone()));
                assert_eq!(g.0, base.0, "{arch:?} {:?} {}: losses/norms differ with graphs", precision.weights, recompute.describe());
                assert_eq!(g.1, base.1, "{arch:?}: eval loss differs with graphs");
                assert!(g.2 == base.2, "{arch:?}: weights differ with graphs");
            }
        }
    }
}

/// `--cuda-graphs` refuses the options whose per-block state a graph cannot hold, naming both.
#[test]
fn cuda_graphs_refuse_streamed_offloaded_and_sharded_blocks() {
    let g = MemoryOptions { cuda_graphs: true, ..Default::default() };
    let p = Precision::fp8();
    g.validate(&p).unwrap();
    for (mem, want) in [
        (MemoryOptions { stream_weights: true, ..g }, "--stream-weights"),
        (MemoryOptions { offload_gradients: true, ..g }, "--offload-gradients"),
        (MemoryOptions { offload_residual: true, ..g }, "--offload-residual"),
        (MemoryOptions { shard_gradients: true, ..g }, "ZeRO-2"),
        (MemoryOptions { shard_weights: true, ..g }, "ZeRO-3"),
        (MemoryOptions { wgrad_overlap: true, ..g }, "--no-wgrad-overlap"),
        (MemoryOptions { persistent_quants: true, offload_quants: true, ..g }, "--offload-quants"),
    ] {
        let e = mem.validate(&p).unwrap_err().to_string();
        assert!(e.contains("--cuda-graphs") && e.contains(want), "{want}: {e}");
    }
    let mut tc = train_config(2, 8, 1, 1);
    tc.precision = p;
    tc.memory = g;
    let mut tr = trainer(&tiny(Arch::Qwen3, false), tc);
    let e = tr.log_fp8_health(1).unwrap_err().to_string();
    assert!(e.contains("--log-amax") && e.contains("--cuda-graphs"), "{e}");
}

/// A run that does not choose gets graphs only on one GPU, up to the measured micro-batch work
/// (lower for fp8, which gives up its second-stream weight gradients for them), and only where
/// its options allow them; `llmq plan` shows the same through the flags (plan_cmd.rs).
#[test]
fn graphs_by_default_only_where_measured_faster() {
    let auto = MemoryOptions { graphs_by_default: true, wgrad_overlap: true, ..Default::default() };
    let on = |mut m: MemoryOptions, gpu: bool, one_rank: bool, fp8: bool, work: f64| (m.default_graphs(gpu, one_rank, fp8, work), m);
    let (turned, m) = on(auto, true, true, true, 1.6e9);
    assert!(turned && m.cuda_graphs && !m.wgrad_overlap);
    m.validate(&Precision::fp8()).unwrap();
    assert!(on(auto, true, true, false, 3.4e9).0);
    for (gpu, one_rank, fp8, work) in [(false, true, false, 1e6), (true, false, false, 1e6), (true, true, true, 2.5e9), (true, true, false, 4.3e9)] {
        let (turned, m) = on(auto, gpu, one_rank, fp8, work);
        assert!(!turned && m == auto, "{gpu} {one_rank} {fp8} {work}");
    }
    let chosen = MemoryOptions { graphs_by_default: false, ..auto };
    assert!(!on(chosen, true, true, false, 1e6).0);
    let residual = MemoryOptions { offload_residual: true, ..auto };
    assert_eq!(on(residual, true, true, false, 1e6), (false, residual));
}

#[test]
fn gradient_accumulation_matches_a_larger_batch() {
    let cfg = tiny(Arch::Qwen3, false);
    let mut big = trainer(&cfg, train_config(4, 8, 1, 1));
    let mut small = trainer(&cfg, train_config(2, 8, 2, 1));
    let (lb, _) = big.accumulate_gradients().unwrap();
    let (ls, _) = small.accumulate_gradients().unwrap();
    assert!((lb - ls).abs() < 1e-5 * lb.abs(), "loss {lb} vs {ls}");
    let gb = big.model().params.grads_f32(big.backend()).unwrap();
    let gs = small.model().params.grads_f32(small.backend()).unwrap();
    for (a, b) in gb.iter().flatten().zip(gs.iter().flatten()) {
        assert!((a - b).abs() <= 1e-5 + 1e-3 * a.abs().max(b.abs()), "{a} vs {b}");
    }
    let nb = big.grad_norm().unwrap();
    assert!(nb > 0.0);
    assert!((nb - small.grad_norm().unwrap()).abs() < 1e-4 * nb);
}

#[test]
fn bf16_master_weights_train() {
    let cfg = tiny(Arch::Qwen2, true);
    let mut tc = train_config(2, 8, 1, 5);
    tc.precision = Precision { master: DType::BF16, ..Precision::bf16() };
    let mut tr = trainer(&cfg, tc);
    let first = tr.train_step().unwrap().loss;
    let mut last = first;
    for _ in 0..4 {
        last = tr.train_step().unwrap().loss;
    }
    assert!(last.is_finite() && last < first, "{first} -> {last}");
}

/// A checkpoint resumes under other memory and speed options (recompute, offloaded persistent quants,
/// side-stream weight gradients) and continues bitwise as the run that wrote it; another
/// precision is refused, naming the field.
#[test]
fn checkpoints_resume_under_other_memory_and_speed_options() {
    let cfg = tiny(Arch::Qwen3, false);
    let fp8 = Precision::fp8();
    let tc = |precision: Precision, mem: MemoryOptions| {
        let mut tc = train_config(2, 16, 2, 4);
        tc.precision = precision;
        tc.memory = mem;
        tc
    };
    let dir = std::env::temp_dir().join(format!("llmq-resume-options-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bits = |tr: &mut llmq_train::Trainer| {
        let s = tr.train_step().unwrap();
        (s.loss.to_bits(), s.grad_norm.to_bits())
    };
    let overlap = MemoryOptions { wgrad_overlap: true, ..Default::default() };
    let mut a = trainer(&cfg, tc(fp8, overlap));
    bits(&mut a);
    bits(&mut a);
    let saved = llmq_train::checkpoint::save(&a, &dir, &llmq_io::ckpt::Lineage::fresh()).unwrap().unwrap();
    let straight: Vec<_> = (0..2).map(|_| bits(&mut a)).collect();
    let (_, recompute) = Recompute::all_variants().into_iter().last().unwrap();
    let other = MemoryOptions { recompute, persistent_quants: true, offload_quants: true, offload_master: true, offload_opt_m: true, offload_opt_v: true, ..Default::default() };
    let mut b = trainer(&cfg, tc(fp8, other));
    llmq_train::checkpoint::load(&mut b, &saved).unwrap();
    let resumed: Vec<_> = (0..2).map(|_| bits(&mut b)).collect();
    assert_eq!(resumed, straight, "resumed under other options, the run continued differently");
    let mut c = trainer(&cfg, tc(Precision { act_grads: DType::E5M2, ..fp8 }, overlap));
    let e = llmq_train::checkpoint::load(&mut c, &saved).unwrap_err().to_string();
    assert!(e.contains("precision.act_grads"), "{e}");
    let mut d = trainer(&cfg, tc(Precision { fp8_fast_accumulation: true, ..fp8 }, overlap));
    let e = llmq_train::checkpoint::load(&mut d, &saved).unwrap_err().to_string();
    assert!(e.contains("precision.fp8_fast_accumulation"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backend's kernel choices are compared on resume like the precision: a checkpoint written
/// before they existed counts as made with today's defaults, any other choice is refused by name.
#[test]
fn resume_compares_the_backend_options() {
    let cfg = tiny(Arch::Llama, true);
    let tc = train_config(2, 16, 1, 4);
    let tr = trainer(&cfg, tc.clone());
    let state = |train: serde_json::Value| serde_json::json!({"model": cfg, "train": train, "world_size": 1});
    let mut old = serde_json::to_value(&tc).unwrap();
    old.as_object_mut().unwrap().remove("backend");
    // (nor fp8 fast accumulation: every sum was promoted)
    old["precision"].as_object_mut().unwrap().remove("fp8_fast_accumulation").expect("the field is written");
    llmq_train::checkpoint::check_compatible(&state(old), &cfg, &tr).unwrap();
    llmq_train::checkpoint::check_compatible(&state(serde_json::to_value(&tc).unwrap()), &cfg, &tr).unwrap();
    let mut other = tc.clone();
    other.backend.attention = llmq_core::AttentionKernels::Mma;
    let e = llmq_train::checkpoint::check_compatible(&state(serde_json::to_value(&other).unwrap()), &cfg, &tr).unwrap_err().to_string();
    assert!(e.contains("train.backend.attention") && e.contains("mma"), "{e}");
}

/// Persistent fp8 weights kept in pinned host memory and streamed per block (`--offload-quants`),
/// alone and with the bf16 weights streamed too, under recomputation, the side-stream weight
/// gradients and offloaded gradients: the same losses, norms and weights as the plain fp8 run.
/// Five layers, two micro-batches: each device slot is reused within a pass and across them.
#[test]
fn offloaded_fp8_weights_are_bitwise_identical() {
    let mut cfg = tiny(Arch::Qwen3, true);
    cfg.num_layers = 5;
    cfg.vocab_size = 160;
    for grads in [DType::E4M3, DType::E5M2] {
        let mut tc = train_config(2, 16, 2, 3);
        tc.precision = Precision { act_grads: grads, ..Precision::fp8() };
        let base = run(&cfg, tc.clone(), MemoryOptions::default());
        let none = Recompute::default();
        let off = MemoryOptions { persistent_quants: true, offload_quants: true, ..Default::default() };
        for recompute in [none, Recompute { block: true, ..none }, Recompute { ffn: true, att: true, ..none }, Recompute { fp8_inputs: true, ..none }] {
            for (sw, og, overlap) in [(false, false, false), (false, false, true), (true, false, true), (true, true, false)] {
                let mem = MemoryOptions { recompute, stream_weights: sw, offload_gradients: og, wgrad_overlap: overlap, ..off };
                let (h, w) = run(&cfg, tc.clone(), mem);
                assert_eq!(h, base.0, "{grads} {}: losses/norms differ", mem.describe());
                assert!(w == base.1, "{grads} {}: weights differ", mem.describe());
            }
        }
    }
    let e = MemoryOptions { offload_quants: true, ..Default::default() }.validate(&Precision::fp8()).unwrap_err().to_string();
    assert!(e.contains("--offload-quants") && e.contains("--persistent-quants"), "{e}");
}
