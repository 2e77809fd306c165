//! The memory planner on every built-in shape: for each card size, either the plan (possibly
//! with options the planner suggests) fits by its own accounting, or nothing tried fits and the
//! refusal says so; offloading and a memory limit hold on a real (CPU) backend.

mod common;
use common::*;
use llmq_core::cpu::CpuBackend;
use llmq_core::{Arch, DType, Mem, ModelConfig};
use llmq_train::plan::{options_that_fit, MemoryPlan};
use llmq_train::{MemoryOptions, Precision, Recompute, TrainConfig};

const GIB: u64 = 1 << 30;

fn reference_setting(cfg: &ModelConfig) -> TrainConfig {
    let mut tc = train_config(8, 1024, 64, 10);
    tc.precision = Precision { master: DType::BF16, opt_m: DType::BF16, opt_v: DType::BF16, grads: DType::BF16, ..Precision::fp8() };
    assert!(tc.seq_len <= cfg.max_position_embeddings);
    tc
}

#[test]
fn every_builtin_shape_either_fits_or_is_refused_with_a_reason() {
    let limits = [8, 12, 16, 24, 48, 80];
    let started = std::time::Instant::now();
    for name in ModelConfig::BUILTIN_NAMES.iter().filter(|n| **n != "tiny") {
        let cfg = ModelConfig::builtin(name).unwrap();
        let tc = reference_setting(&cfg);
        let plan = MemoryPlan::new(&cfg, &tc, 192 << 20).unwrap();
        // the parameter-shaped state alone (bf16 weights, gradients, m and v: 8 bytes per
        // parameter) is a lower bound of the plain plan
        assert!(plan.device_peak() as f64 >= 8.0 * cfg.num_params() as f64, "{name}");
        for gib in limits {
            let limit = gib * GIB;
            if plan.fits(Some(limit)) {
                continue;
            }
            for (opt, peak) in options_that_fit(&cfg, &tc, 192 << 20, limit, 8) {
                assert!(peak as u64 <= limit, "{name} {gib} GiB: {opt} reported as fitting at {peak}");
            }
        }
    }
    // qwen2.5-72b included: planning is pure bookkeeping
    assert!(started.elapsed().as_secs_f64() < 10.0, "planning took {:?}", started.elapsed());
}

#[test]
fn small_models_fit_a_16_gib_card_with_the_suggested_options() {
    let cfg = ModelConfig::builtin("qwen2.5-0.5b").unwrap();
    let mut tc = reference_setting(&cfg);
    tc.batch_size = 64;
    tc.grad_accumulation = 8;
    let plan = MemoryPlan::new(&cfg, &tc, 0).unwrap();
    assert!(!plan.fits(Some(16 * GIB)));
    let fit = options_that_fit(&cfg, &tc, 0, 16 * GIB, 8);
    assert!(!fit.is_empty(), "nothing fits 0.5B at 16 GiB");
    assert!(fit.iter().any(|(o, _)| o.contains("--recompute-block")), "{fit:?}");
}

/// The CPU backend under a device limit equal to the plan's peak trains with offloaded optimizer
/// state; one byte less is refused at allocation, and the host accounting holds what moved.
#[test]
fn the_device_high_water_mark_stays_under_the_limit() {
    let cfg = tiny(Arch::Qwen2, false);
    let mut tc = train_config(2, 16, 2, 2);
    tc.precision = Precision::bf16();
    tc.memory = MemoryOptions { offload_master: true, offload_opt_m: true, offload_opt_v: true, recompute: Recompute { block: true, ..Default::default() }, ..Default::default() };
    let plan = MemoryPlan::new(&cfg, &tc, 0).unwrap();
    let limit = plan.device_peak();
    let mut tr = trainer_on(Box::new(CpuBackend::with_limit(limit)), &cfg, tc.clone());
    tr.train_step().unwrap();
    let host: usize = tr.backend().memory_by_category().iter().filter(|m| m.1 == Mem::Host).map(|m| m.2).sum();
    assert_eq!(host, plan.host_total());
    let src = llmq_train::synthetic::MarkovSource::new(cfg.vocab_size, 99);
    let e = llmq_train::Trainer::new(Box::new(CpuBackend::with_limit(limit - 1)), &cfg, tc, Box::new(src.stream(0)), None).err().expect("one byte under the plan allocated");
    assert!(e.to_string().contains("limit"), "{e}");
}

/// Offloaded optimizer state, streamed weights and offloaded gradients (over two micro-batches,
/// under several recompute options) give the same losses, norms and weights as the plain run.
#[test]
fn offloading_and_streaming_are_bitwise_neutral() {
    for precision in [Precision::bf16(), Precision::fp8()] {
        // five layers: every device slot is reused within a pass
        let mut cfg = tiny(Arch::Qwen3, true);
        cfg.num_layers = 5;
        let run = |mem: MemoryOptions| {
            let mut tc = train_config(2, 16, 2, 3);
            tc.precision = precision;
            tc.memory = mem;
            let mut tr = trainer(&cfg, tc);
            let h: Vec<(u64, u64)> = (0..3).map(|_| tr.train_step().unwrap()).map(|s| (s.loss.to_bits(), s.grad_norm.to_bits())).collect();
            (h, tr.master_weights().unwrap())
        };
        let base = run(MemoryOptions::default());
        for (m, o, v) in [(true, false, false), (false, true, false), (false, false, true), (true, true, true)] {
            let got = run(MemoryOptions { offload_master: m, offload_opt_m: o, offload_opt_v: v, ..Default::default() });
            assert!(got == base, "{:?} offload master {m} m {o} v {v} changed the numbers", precision.matmul);
        }
        let none = Recompute::default();
        for recompute in [none, Recompute { block: true, ..none }, Recompute { ffn: true, att: true, ..none }, Recompute { fp8_inputs: true, ..none }] {
            for (sw, og, res) in [(true, false, false), (false, true, false), (false, false, true), (true, true, true)] {
                for pq in [false, precision.matmul.is_fp8()] {
                    let mem = MemoryOptions { recompute, stream_weights: sw, offload_gradients: og, offload_residual: res, persistent_quants: pq, offload_opt_m: og, ..Default::default() };
                    let got = run(mem);
                    assert!(got == base, "{:?} {} changed the numbers", precision.matmul, mem.describe());
                }
            }
        }
    }
}

/// The step-time model against capped runs measured on one H100 (the third on an H200;
/// docs/BENCHMARKS.md, fourteenth and thirteenth rounds: qwen2.5 from scratch, T=1024, e4m3 matmuls, bf16 state, 131,072 or
/// 65,536 tokens per step): each estimate within 10% of the measured step (the issue asks for
/// 20%), and `--auto-memory` at 16 GiB picks the fastest measured 7B plan.
#[test]
fn estimates_match_the_measured_capped_runs() {
    use llmq_train::plan::{auto_memory, estimate_step_seconds, DeviceSpeeds};
    let rc = |block| Recompute { block, ffn: !block, att: !block, ..Recompute::default() };
    let offload = MemoryOptions { offload_opt_m: true, offload_opt_v: true, stream_weights: true, offload_gradients: true, wgrad_overlap: false, ..MemoryOptions::default() };
    #[rustfmt::skip]
    let runs = [
        ("qwen2.5-7b", 8, 16, MemoryOptions { recompute: rc(true), persistent_quants: true, offload_quants: true, offload_residual: true, ..offload }, 11.131),
        ("qwen2.5-7b", 16, 8, MemoryOptions { recompute: rc(true), offload_residual: true, zero_copy: true, ..offload }, 9.701),
        ("qwen2.5-7b", 8, 16, MemoryOptions { recompute: rc(true), zero_copy: true, ..offload }, 13.290),
        ("qwen2.5-14b", 8, 8, MemoryOptions { recompute: rc(false), offload_residual: true, ..offload }, 15.666),
    ];
    for (name, b, accum, memory, measured) in runs {
        let cfg = ModelConfig::builtin(name).unwrap();
        let mut tc = reference_setting(&cfg);
        (tc.batch_size, tc.grad_accumulation, tc.memory) = (b, accum, memory);
        tc.validate(&cfg).unwrap();
        let plan = MemoryPlan::new(&cfg, &tc, 192 << 20).unwrap();
        let est = estimate_step_seconds(&cfg, &tc, &plan, DeviceSpeeds::h200(true));
        assert!((est / measured - 1.0).abs() < 0.10, "{name} B={b} x {accum} {}: estimate {est:.2} s, measured {measured} s", tc.memory.describe());
    }
    let cfg = ModelConfig::builtin("qwen2.5-7b").unwrap();
    let mut tc = reference_setting(&cfg);
    (tc.batch_size, tc.grad_accumulation) = (8, 16);
    let chosen = auto_memory(&cfg, &tc, 192 << 20, 16 * GIB, None, DeviceSpeeds::h200(true)).unwrap().config;
    assert_eq!((chosen.batch_size, chosen.memory.zero_copy), (16, true), "{}", llmq_train::plan::memory_flags(&chosen));
}
