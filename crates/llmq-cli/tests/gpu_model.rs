//! Whole-model checks of the CUDA backend against the CPU reference backend. Skips (with a
//! message) where there is no usable GPU.
//!
//! - fp32 numerics: loss and every parameter gradient of a small model of each architecture;
//!   per tensor cosine ≥ 0.9999 and relative L2 error ≤ 1e-3 (fp32 on both sides; differences
//!   come only from summation order and cuBLASLt's fp32 accumulation).
//! - reduced precision: 16 training steps from the same seed on both backends (bf16, fp8 e4m3,
//!   e5m2 activation gradients, gradient accumulation, bf16 gradients, bf16 Adam state); the loss
//!   and the gradient norm agree at every step within bars a few times the observed gaps (the two
//!   backends round at different places inside fused kernels, so trajectories drift slowly).

use llmq_core::cpu::CpuBackend;
use llmq_core::{Arch, Backend, DType, ModelConfig};
use llmq_train::synthetic::MarkovSource;
use llmq_train::*;

fn gpu() -> Option<Box<dyn Backend>> {
    if let Err(reason) = llmq_cuda::cuda_available() {
        llmq_cuda::skip_gpu_test(&format!("no CUDA device: {reason}"));
        return None;
    }
    Some(Box::new(
        llmq_cuda::CudaBackend::new(0, &Default::default()).expect("CUDA backend"),
    ))
}

fn small(arch: Arch, tied: bool) -> ModelConfig {
    let mut c = ModelConfig::tiny(arch, 301);
    c.hidden_size = 96;
    c.intermediate_size = 208; // fp8 needs multiples of 16
    c.num_layers = 2;
    c.num_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = 64; // the tensor-core attention kernels, with RoPE's backward and the abs-maxes fused
    c.tie_word_embeddings = tied;
    c
}

fn config(b: usize, t: usize, steps: u64, precision: Precision) -> TrainConfig {
    TrainConfig {
        batch_size: b,
        seq_len: t,
        grad_accumulation: 1,
        steps,
        schedule: Schedule {
            lr: 3e-3,
            warmup: 2.min(steps),
            total: steps,
            decay: Decay::Cosine,
            final_fraction: 0.1,
            cooldown: 0,
        },
        optim: OptimConfig::default(),
        precision,
        memory: MemoryOptions::default(),
        seed: 7,
        eval_every: 0,
        eval_batches: 1,
        max_bad_steps: 3,
        spike: Default::default(),
        backend: Default::default(),
        world_size: 1,
        z_loss: 0.0,
    }
}

fn trainer(be: Box<dyn Backend>, cfg: &ModelConfig, tc: TrainConfig) -> Trainer {
    let src = MarkovSource::new(cfg.vocab_size, 3);
    let mut tr = Trainer::new(be, cfg, tc, Box::new(src.stream(0)), None).unwrap();
    tr.init_from_scratch().unwrap();
    tr
}

fn cosine_and_rel(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut ab, mut aa, mut bb, mut dd) = (0.0, 0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
        dd += (x - y) * (x - y);
    }
    (
        ab / (aa.sqrt() * bb.sqrt()).max(1e-300),
        dd.sqrt() / aa.sqrt().max(1e-300),
    )
}

#[test]
fn gpu_loss_and_gradients_match_cpu_fp32() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        let Some(be) = gpu() else { return };
        let cfg = small(arch, arch != Arch::Llama);
        let tc = config(2, 67, 1, Precision::fp32());
        let mut g = trainer(be, &cfg, tc.clone());
        let mut c = trainer(Box::new(CpuBackend::new()), &cfg, tc);
        let (lg, _) = g.accumulate_gradients().unwrap();
        let (lc, _) = c.accumulate_gradients().unwrap();
        assert!(
            (lg - lc).abs() < 1e-4 * lc.abs(),
            "{arch:?}: loss gpu {lg} cpu {lc}"
        );
        let gg = g.model().params.grads_f32(g.backend()).unwrap();
        let gc = c.model().params.grads_f32(c.backend()).unwrap();
        for (gi, grp) in c.model().params.layout.groups.iter().enumerate() {
            for e in &grp.entries {
                let r = e.offset..e.offset + e.numel();
                let (cos, rel) = cosine_and_rel(&gc[gi][r.clone()], &gg[gi][r]);
                eprintln!(
                    "{arch:?} {} {:?}: cosine {cos:.6} rel {rel:.2e}",
                    grp.name, e.kind
                );
                assert!(
                    cos >= 0.9999 && rel <= 1e-3,
                    "{arch:?} {} {:?}: cosine {cos} rel {rel}",
                    grp.name,
                    e.kind
                );
            }
        }
        println!("{arch:?}: fp32 loss gpu {lg:.6} cpu {lc:.6}");
    }
}

/// Bars of the GPU-vs-CPU training runs, (loss, gradient norm) relative to the CPU's value at
/// the same step, for one step from the same state (see `train_alike`), by matmul dtype: about
/// 4x the worst gaps an H100 showed over the 16 steps of these runs (2026-12-05: bf16 loss
/// 2.5e-5, norm 6.9e-4; fp8 loss 1.3e-4, norm 6.4e-3).
fn train_bars(precision: Precision) -> (f64, f64) {
    if precision.matmul.is_fp8() { (5e-4, 2.5e-2) } else { (1e-4, 3e-3) }
}
/// Steps per run: enough for the optimizer state (Adam moments, fp8 scales) to matter, few
/// enough that the CPU side of each run takes seconds.
const TRAIN_STEPS: u64 = 16;

/// The same training run on the GPU and on the CPU from the same seed and data: at every step
/// the loss and the gradient norm agree within the bars above. The CPU follows the GPU: after
/// each step it loads the GPU's checkpoint (weights, Adam state, fp8 scales, data position), so
/// each comparison is of one step from the same state — free-running runs drift apart through
/// the updates (on an H100, fp8 gradient norms 10-25% apart after ten steps), which would hide
/// a wrong step behind the drift. Prints every step's gaps and the worst ones before asserting.
fn train_alike(what: &str, arch: Arch, tied: bool, precision: Precision, accumulation: usize) {
    let Some(be) = gpu() else { return };
    let (loss_bar, norm_bar) = train_bars(precision);
    let cfg = small(arch, tied);
    let mut tc = config(4, 64, TRAIN_STEPS, precision);
    tc.grad_accumulation = accumulation;
    let mut g = trainer(be, &cfg, tc.clone());
    let mut c = trainer(Box::new(CpuBackend::new()), &cfg, tc);
    let root = std::env::temp_dir().join(format!("llmq-train-alike-{}-{}", std::process::id(), what.replace([' ', ','], "-")));
    let lineage = llmq_io::ckpt::Lineage::fresh();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
    let (mut worst_loss, mut worst_norm) = ((0.0, 0), (0.0, 0));
    let (mut failures, mut cpu_losses) = (Vec::new(), Vec::new());
    for step in 1..=TRAIN_STEPS {
        let sg = g.train_step().unwrap();
        let sc = c.train_step().unwrap();
        assert!(!sg.skipped && !sc.skipped, "{what} step {step}: an update was skipped (gpu {}, cpu {})", sg.skipped, sc.skipped);
        let (dl, dn) = (rel(sg.loss, sc.loss), rel(sg.grad_norm, sc.grad_norm));
        println!(
            "{what} step {step}: loss gpu {:.6} cpu {:.6} (gap {dl:.2e}) | norm gpu {:.5} cpu {:.5} (gap {dn:.2e})",
            sg.loss, sc.loss, sg.grad_norm, sc.grad_norm
        );
        if !(dl <= loss_bar && dn <= norm_bar) {
            failures.push(format!("step {step}: loss gap {dl:.2e}, norm gap {dn:.2e}"));
        }
        if step == 1 || dl > worst_loss.0 {
            worst_loss = (dl, step);
        }
        if step == 1 || dn > worst_norm.0 {
            worst_norm = (dn, step);
        }
        cpu_losses.push(sc.loss);
        let dir = checkpoint::save(&g, &root, &lineage).unwrap().expect("one rank writes its checkpoint");
        checkpoint::load(&mut c, &dir).unwrap();
    }
    std::fs::remove_dir_all(&root).ok();
    println!(
        "{what}: worst gaps: loss {:.2e} (step {}, bar {loss_bar:.0e}), norm {:.2e} (step {}, bar {norm_bar:.0e})",
        worst_loss.0, worst_loss.1, worst_norm.0, worst_norm.1
    );
    assert!(failures.is_empty(), "{what}: GPU and CPU differ beyond the bars (loss {loss_bar:.0e}, norm {norm_bar:.0e}):\n{}", failures.join("\n"));
    // the comparison means something only if the runs trained: the loss must have fallen
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&cpu_losses[..4]), mean(&cpu_losses[cpu_losses.len() - 4..]));
    assert!(last < first, "{what}: the CPU run did not learn (mean loss of the first 4 steps {first:.5}, of the last 4 {last:.5})");
}

#[test]
fn gpu_and_cpu_train_alike_bf16() {
    train_alike("bf16", Arch::Qwen2, true, Precision::bf16(), 1);
}

#[test]
fn gpu_and_cpu_train_alike_fp8() {
    train_alike("fp8 e4m3", Arch::Qwen3, true, Precision::fp8(), 1);
}

#[test]
fn gpu_and_cpu_train_alike_fp8_e5m2_gradients() {
    train_alike("fp8 e5m2 gradients", Arch::Llama, false, Precision { act_grads: DType::E5M2, ..Precision::fp8() }, 1);
}

#[test]
fn gpu_and_cpu_train_alike_fp8_fast_accumulation() {
    // the CPU sums exactly; the GPU's fp8 matmuls skip the promotion of their partial sums
    train_alike("fp8 fast accumulation", Arch::Qwen2, true, Precision { fp8_fast_accumulation: true, ..Precision::fp8() }, 1);
}

#[test]
fn gpu_and_cpu_train_alike_with_gradient_accumulation() {
    train_alike("fp8, 3 micro-batches", Arch::Qwen2, false, Precision::fp8(), 3);
}

#[test]
fn gpu_and_cpu_train_alike_bf16_gradients() {
    // accumulated over two micro-batches, so the gradients are rounded to bf16 between them
    train_alike("bf16 gradients, 2 micro-batches", Arch::Qwen3, false, Precision { grads: DType::BF16, ..Precision::bf16() }, 2);
}

#[test]
fn gpu_and_cpu_train_alike_bf16_adam_state() {
    train_alike("bf16 Adam m and v", Arch::Llama, true, Precision { opt_m: DType::BF16, opt_v: DType::BF16, ..Precision::bf16() }, 1);
}

/// Every recompute option (and persistent quants, on the device or offloaded, the side-stream
/// weight gradients, offloaded optimizer state staged or updated in place (zero-copy), streamed
/// weights and offloaded gradients, offloaded state in write-combined memory)
/// against the plain run of the same matmul dtype.
#[test]
fn gpu_recompute_is_bitwise_identical() {
    let (fp8, plain) = (Precision::fp8(), MemoryOptions::default());
    let persistent = MemoryOptions { persistent_quants: true, ..plain };
    let overlap = MemoryOptions { wgrad_overlap: true, ..plain };
    let offload = MemoryOptions { offload_master: true, offload_opt_m: true, offload_opt_v: true, ..plain };
    let streamed = MemoryOptions { stream_weights: true, offload_gradients: true, offload_residual: true, ..offload };
    let quants_offloaded = MemoryOptions { persistent_quants: true, offload_quants: true, wgrad_overlap: true, ..plain };
    let quants_streamed = MemoryOptions { persistent_quants: true, offload_quants: true, ..streamed };
    let zero_copy = MemoryOptions { zero_copy: true, ..streamed };
    let write_combined = MemoryOptions { write_combined: true, ..streamed };
    for group in [
        vec![(Precision::bf16(), plain), (Precision::bf16(), offload), (Precision::bf16(), streamed), (Precision::bf16(), zero_copy), (Precision::bf16(), write_combined)],
        vec![(fp8, plain), (fp8, persistent), (fp8, overlap), (fp8, offload), (fp8, streamed), (fp8, zero_copy), (fp8, write_combined), (fp8, quants_offloaded), (fp8, quants_streamed)],
    ] {
        let mut cfg = small(Arch::Qwen3, false);
        cfg.vocab_size = 1024; // the backward temporaries fit in the logits buffer (BackwardScratch)
        let mut base: Option<Vec<(u64, u64)>> = None;
        for (precision, mem) in group {
            for (name, recompute) in Recompute::all_variants() {
                let Some(be) = gpu() else { return };
                let mut tc = config(2, 64, 3, precision);
                tc.memory = MemoryOptions { recompute, ..mem };
                let mut tr = trainer(be, &cfg, tc);
                let h: Vec<(u64, u64)> = (0..3)
                    .map(|_| {
                        let s = tr.train_step().unwrap();
                        (s.loss.to_bits(), s.grad_norm.to_bits())
                    })
                    .collect();
                match &base {
                    None => base = Some(h),
                    Some(b) => assert_eq!(
                        &h, b,
                        "{:?} ({}) recompute {name} changed the numbers on the GPU",
                        precision.matmul,
                        mem.describe()
                    ),
                }
            }
        }
    }
}

/// Generation with the KV cache: the CUDA backend picks the CPU's greedy tokens. Both decoders
/// are fed the CPU's choice at every step (so one disagreement cannot hide the later ones); a
/// different argmax is allowed only where the CPU's two best logits are within rounding of each
/// other. In fp32 the whole greedy continuation of `generate` must be the same.
#[test]
fn generation_picks_the_same_greedy_tokens_as_the_cpu() {
    use llmq_core::ParamLayout;
    use llmq_train::generate::{generate, Decoder};
    use llmq_train::sampling::{argmax, SamplingOptions};
    let Some(mut g) = gpu() else { return };
    for (arch, dtype, margin) in [(Arch::Qwen2, DType::F32, 1e-3), (Arch::Qwen3, DType::BF16, 0.1), (Arch::Llama, DType::BF16, 0.1)] {
        let cfg = small(arch, false);
        let layout = ParamLayout::new(&cfg);
        let groups: Vec<Vec<f32>> =
            (0..layout.groups.len()).map(|gi| llmq_train::init::init_group(&cfg, &layout, 3, gi).into_iter().map(|x| x * 10.0).collect()).collect();
        let mut c = CpuBackend::new();
        let n = 40;
        let prompt: Vec<u32> = (0..19u32).map(|i| (i * 37 + 5) % cfg.vocab_size as u32).collect();
        let mut dc = Decoder::new(&mut c, &cfg, &groups, dtype, prompt.len() + n, 8).unwrap();
        let mut dg = Decoder::new(g.as_mut(), &cfg, &groups, dtype, prompt.len() + n, 8).unwrap();
        let (mut lc, mut lg) = (dc.feed(&c, &prompt, false).unwrap(), dg.feed(g.as_ref(), &prompt, false).unwrap());
        let mut differ = 0;
        for step in 0..n {
            let (tc, tg) = (argmax(&lc), argmax(&lg));
            if tc != tg {
                let mut sorted = lc.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let gap = sorted[0] - sorted[1];
                assert!(gap < margin, "{arch:?} {dtype} step {step}: CPU token {tc}, GPU token {tg}, though the CPU's top-2 gap is {gap}");
                differ += 1;
            }
            lc = dc.feed(&c, &[tc], false).unwrap();
            lg = dg.feed(g.as_ref(), &[tc], false).unwrap();
        }
        println!("{arch:?} {dtype}: {differ} of {n} greedy tokens differ (at near-ties only)");
        if dtype == DType::F32 {
            let opts = SamplingOptions { max_tokens: n, ..Default::default() };
            let (a, _) = generate(&c, &mut dc, &prompt, &opts, &[], &mut |_| true).unwrap();
            let (b, _) = generate(g.as_ref(), &mut dg, &prompt, &opts, &[], &mut |_| true).unwrap();
            assert_eq!(a, b, "{arch:?} fp32 greedy continuation");
        }
    }
}

/// `--cuda-graphs` on the GPU: each block's forward and recompute+backward and the optimizer
/// update run as CUDA graphs (eager on their first call, captured on the second, replayed after)
/// and give bitwise the eager run's losses, gradient norms and weights over 6 steps whose
/// learning rate changes every step (warmup, then decay) with two micro-batches each (so the
/// block graphs replay within a step and the optimizer graph across steps), bf16 and fp8, with
/// and without recomputation.
#[test]
fn gpu_cuda_graphs_are_bitwise_identical() {
    let fp8 = Precision::fp8();
    // (loss, gradient norm, learning rate) bits per step, and the final weights
    type Run = (Vec<(u64, u64, u64)>, Vec<Vec<f32>>);
    let run = |precision: Precision, mem: MemoryOptions| -> Option<Run> {
        let be = gpu()?;
        let mut cfg = small(Arch::Qwen2, false);
        cfg.vocab_size = 1024;
        cfg.num_layers = 3;
        let mut tc = config(2, 64, 6, precision);
        tc.schedule.warmup = 3;
        tc.grad_accumulation = 2;
        tc.memory = mem;
        let mut tr = trainer(be, &cfg, tc);
        let h = (0..6)
            .map(|_| {
                let s = tr.train_step().unwrap();
                (s.loss.to_bits(), s.grad_norm.to_bits(), s.lr.to_bits())
            })
            .collect();
        Some((h, tr.master_weights().unwrap()))
    };
    let block = Recompute { block: true, ..Default::default() };
    for (precision, mem) in [
        (Precision::bf16(), MemoryOptions::default()),
        (Precision::bf16(), MemoryOptions { recompute: block, ..Default::default() }),
        (fp8, MemoryOptions::default()),
        (fp8, MemoryOptions { persistent_quants: true, ..Default::default() }),
        (fp8, MemoryOptions { persistent_quants: true, recompute: block, ..Default::default() }),
    ] {
        let Some(eager) = run(precision, mem) else { return };
        let lrs: std::collections::BTreeSet<u64> = eager.0.iter().map(|h| h.2).collect();
        assert_eq!(lrs.len(), 6, "the learning rate should change every step");
        let graphs = run(precision, MemoryOptions { cuda_graphs: true, ..mem }).unwrap();
        assert_eq!(graphs.0, eager.0, "{:?} ({}): graphs changed the losses or gradient norms on the GPU", precision.matmul, mem.describe());
        assert!(graphs.1 == eager.1, "{:?} ({}): graphs changed the weights on the GPU", precision.matmul, mem.describe());
    }
}
