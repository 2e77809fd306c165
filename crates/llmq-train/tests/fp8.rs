//! The FP8 pipeline on the CPU backend (same scales and rounding as the GPU): memory options
//! stay bitwise-neutral, gradients stay close to the bf16 run, and training quality matches.

mod common;
use common::*;
use llmq_core::{Arch, DType};
use llmq_train::{MemoryOptions, Precision, Recompute};

fn history(cfg: &llmq_core::ModelConfig, precision: Precision, mem: MemoryOptions, steps: usize) -> Vec<(u64, u64)> {
    let mut tc = train_config(2, 16, 2, steps as u64);
    tc.precision = precision;
    tc.memory = mem;
    let mut tr = trainer(cfg, tc);
    (0..steps)
        .map(|_| {
            let s = tr.train_step().unwrap();
            (s.loss.to_bits(), s.grad_norm.to_bits())
        })
        .collect()
}

#[test]
fn fp8_recompute_persistent_quants_and_wgrad_overlap_are_bitwise_identical() {
    for arch in [Arch::Qwen2, Arch::Qwen3] {
        let mut cfg = tiny(arch, arch == Arch::Qwen2);
        cfg.vocab_size = 160; // the backward temporaries fit in the logits buffer
        for grads in [DType::E4M3, DType::E5M2] {
            let p = Precision { act_grads: grads, ..Precision::fp8() };
            let plain = MemoryOptions::default();
            let base = history(&cfg, p, plain, 3);
            let pq = history(&cfg, p, MemoryOptions { persistent_quants: true, ..plain }, 3);
            assert_eq!(pq, base, "{arch:?} {grads}: persistent quants changed the numbers");
            // weights quantised at each use inside the captured blocks (graphs by default for small micro-batches)
            let requant = history(&cfg, p, MemoryOptions { cuda_graphs: true, ..plain }, 3);
            assert_eq!(requant, base, "{arch:?} {grads}: graphs without persistent quants changed the numbers");
            for (name, recompute) in Recompute::all_variants() {
                let mem = MemoryOptions { recompute, ..plain };
                assert_eq!(history(&cfg, p, mem, 3), base, "{arch:?} {grads}: recompute {name} changed the numbers");
                let overlap = MemoryOptions { wgrad_overlap: true, ..mem };
                assert_eq!(history(&cfg, p, overlap, 3), base, "{arch:?} {grads}: wgrad overlap with recompute {name} changed the numbers");
                let graphs = MemoryOptions { cuda_graphs: true, persistent_quants: true, ..mem };
                assert_eq!(history(&cfg, p, graphs, 3), base, "{arch:?} {grads}: graphs with recompute {name} changed the numbers");
            }
            // and fp8 really differs from bf16 (the pipeline is engaged)
            assert_ne!(history(&cfg, Precision::bf16(), plain, 1)[0], base[0]);
        }
    }
}

/// Per-tensor cosine between fp8 and bf16 gradients of the same model and batch. Threshold
/// 0.98: e4m3 keeps 3 mantissa bits (relative rounding error up to 2^-4 per element), but the
/// errors are unbiased and average out over the K ≥ 16 terms of every dot product, so gradient
/// directions stay within a few degrees; the observed minimum is printed.
#[test]
fn fp8_gradients_are_close_to_bf16() {
    let mut cfg = tiny(Arch::Qwen2, false);
    cfg.hidden_size = 64;
    cfg.intermediate_size = 96;
    cfg.head_dim = 16;
    let grads = |p: Precision| {
        let mut tc = train_config(4, 32, 1, 1);
        tc.precision = p;
        let mut tr = trainer(&cfg, tc);
        tr.accumulate_gradients().unwrap();
        (tr.model().params.grads_f32(tr.backend()).unwrap(), tr.model().params.layout.clone())
    };
    let (gb, layout) = grads(Precision::bf16());
    for act_grads in [DType::E4M3, DType::E5M2] {
        let (g8, _) = grads(Precision { act_grads, ..Precision::fp8() });
        let mut worst = 1.0f64;
        for (gi, g) in layout.groups.iter().enumerate() {
            for e in &g.entries {
                let r = e.offset..e.offset + e.numel();
                let (a, b) = (&gb[gi][r.clone()], &g8[gi][r]);
                let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let cos = dot / (na * nb);
                println!("{act_grads} {} {:?}: cosine {cos:.5}", g.name, e.kind);
                worst = worst.min(cos);
                assert!(cos > 0.98, "{act_grads} {} {:?}: cosine {cos}", g.name, e.kind);
            }
        }
        println!("{act_grads}: worst per-tensor cosine vs bf16 {worst:.5}");
    }
}

/// From the same seed and data, the fp8 run's loss stays within 1.5% of the bf16 run's after
/// 300 steps on the embedded corpus (mean of the last 20 step losses, to average batch noise).
#[test]
fn fp8_training_tracks_bf16_for_300_steps() {
    let mut cfg = llmq_core::ModelConfig::tiny(Arch::Qwen2, 128);
    cfg.num_layers = 2;
    let run = |p: Precision| {
        let mut tc = train_config(8, 64, 1, 300);
        tc.precision = p;
        tc.schedule.lr = 3e-3;
        tc.schedule.warmup = 20;
        let mut tr = trainer(&cfg, tc);
        let losses: Vec<f64> = (0..300).map(|_| tr.train_step().unwrap().loss).collect();
        losses[280..].iter().sum::<f64>() / 20.0
    };
    let bf = run(Precision::bf16());
    let f8 = run(Precision::fp8());
    println!("final loss: bf16 {bf:.4}, fp8 {f8:.4} ({:+.2}%)", 100.0 * (f8 - bf) / bf);
    assert!(bf < 4.0, "bf16 run did not learn: {bf}");
    assert!((f8 - bf).abs() <= 0.015 * bf, "fp8 {f8} vs bf16 {bf}");
}

/// fp8 runs keep a block matmul input only as the fp8 transpose the weight gradient reads, where
/// nothing is recomputed from its bf16 form: per layer and token, ln1, ln2 and the SwiGLU output
/// (2 C + D bf16) are not kept, and their one forward buffer each is a backward-only temporary.
/// `--recompute-fp8-inputs` drops the transposes of inputs kept in bf16 anyway (the attention
/// output).
#[test]
fn fp8_runs_do_not_keep_bf16_inputs_that_only_feed_fp8_matmuls() {
    use llmq_core::MemCategory;
    use llmq_train::acts::Keep;
    let cfg = tiny(Arch::Qwen2, false);
    let activation_bytes = |p: Precision, rc: Recompute| {
        let mut tc = train_config(2, 16, 1, 1);
        tc.precision = p;
        tc.memory.recompute = rc;
        let tr = trainer(&cfg, tc);
        let a = &tr.model().acts;
        let modes = [a.ln1.keep(), a.att.keep(), a.ln2.keep(), a.sw.keep(), a.up_gate.keep()];
        // the fp8-only values live in backward-only gradient temporaries: ln1 and ln2 in d_ln,
        // the SwiGLU output in d_sw
        for (slot, home) in [(&a.ln1, a.d_ln), (&a.ln2, a.d_ln), (&a.sw, a.d_sw)] {
            if slot.keep() == Keep::Fp8Only {
                assert_eq!((slot.at(0), slot.at(1)), (home, home));
            }
        }
        let bytes = |cat: MemCategory| -> usize { tr.backend().memory_by_category().iter().filter(|m| m.0 == cat).map(|m| m.2).sum() };
        (modes, bytes(MemCategory::Activations))
    };
    let (f, p) = (Keep::Fp8Only, Keep::PerLayer);
    let (fp8_modes, fp8_bytes) = activation_bytes(Precision::fp8(), Recompute::default());
    assert_eq!(fp8_modes, [f, p, f, f, p]);
    let (bf16_modes, bf16_bytes) = activation_bytes(Precision::bf16(), Recompute::default());
    assert_eq!(bf16_modes, [p; 5]);
    let (requant_modes, requant_bytes) = activation_bytes(Precision::fp8(), Recompute { fp8_inputs: true, ..Recompute::default() });
    assert_eq!(requant_modes, fp8_modes);
    // recomputing QKV needs ln1 in bf16; recomputing up+gate needs ln2
    let (qkv_modes, _) = activation_bytes(Precision::fp8(), Recompute { qkv: true, ..Recompute::default() });
    assert_eq!(qkv_modes, [p, p, f, f, p]);
    let (ffn_modes, _) = activation_bytes(Precision::fp8(), Recompute { ffn: true, ..Recompute::default() });
    assert_eq!(ffn_modes[2], p);
    // against bf16: (2 C + D) bf16 per token and layer not kept; the fp8 transposes
    // (C + Aw + C + D bytes) and 80 bytes of abs-maxes and descales per layer kept
    let (l, n, c, d, aw) = (cfg.num_layers, 2 * 16, cfg.hidden_size, cfg.intermediate_size, cfg.attn_width());
    assert_eq!(bf16_bytes + l * n * (2 * c + aw + d) + 80 * l, fp8_bytes + l * n * (2 * c + d) * 2);
    // --recompute-fp8-inputs: the attention output's transpose (Aw bytes) not kept
    assert_eq!(fp8_bytes - requant_bytes, l * n * aw);
}

/// The backward pass's largest temporaries (up+gate gradient [N, 2D], fp8 gradient scratch 2 x
/// [N, 2D]) live in the logits buffer when it is large enough, as it is for real vocabularies.
#[test]
fn backward_temporaries_live_in_the_logits_buffer() {
    use llmq_core::MemCategory;
    let mut cfg = tiny(Arch::Qwen2, false);
    let temporaries = |cfg: &llmq_core::ModelConfig, p: Precision, own: bool| {
        let mut tc = train_config(2, 16, 1, 1);
        tc.precision = p;
        tc.memory.recompute.own_backward_temporaries = own;
        let tr = trainer(cfg, tc);
        let used = tr.model().acts.bwd_scratch.used();
        (tr.backend().memory_by_category().iter().filter(|m| m.0 == MemCategory::Temporaries).map(|m| m.2).sum::<usize>(), used)
    };
    let (n, d) = (2 * 16, cfg.intermediate_size);
    // a vocabulary of 37: the logits buffer (N x 37 bf16) is too small for the up+gate gradient
    // (N x 2D bf16), not for one fp8 gradient scratch (N x 2D bytes); requests are first-fit
    let (shared, used) = temporaries(&cfg, Precision::fp8(), false);
    assert!(n * 37 * 2 < n * 2 * d * 2 && n * 37 * 2 >= n * 2 * d);
    assert_eq!((temporaries(&cfg, Precision::fp8(), true).0 - shared, used), (n * 2 * d, n * 2 * d));
    cfg.vocab_size = 160;
    for p in [Precision::bf16(), Precision::fp8()] {
        let (shared, used) = temporaries(&cfg, p, false);
        let (own, _) = temporaries(&cfg, p, true);
        let act = p.weights.size();
        let expect = n * 2 * d * act + if p.matmul.is_fp8() { 2 * n * 2 * d * p.act_grads.size() } else { 0 };
        assert_eq!(own - shared, expect, "{:?}", p.matmul);
        assert!(used >= expect && used <= expect + 512);
    }
}

#[test]
fn fp8_health_reports_every_quantised_tensor_without_changing_the_numbers() {
    let cfg = tiny(Arch::Qwen3, false);
    let tc = llmq_train::TrainConfig { precision: Precision::fp8(), ..train_config(2, 16, 2, 4) };
    let log_path = std::env::temp_dir().join(format!("llmq_fp8_health_{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log_path);
    let mut plain = trainer(&cfg, tc.clone());
    let mut watched = trainer(&cfg, tc);
    watched.log_fp8_health(2).unwrap();
    watched.set_log(llmq_train::log::JsonLog::open(&log_path).unwrap());
    for _ in 0..4 {
        let (a, b) = (plain.train_step().unwrap(), watched.train_step().unwrap());
        assert_eq!((a.loss.to_bits(), a.grad_norm.to_bits()), (b.loss.to_bits(), b.grad_norm.to_bits()));
    }
    let recs: Vec<serde_json::Value> =
        std::fs::read_to_string(&log_path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v["type"] == "fp8_health").collect();
    assert_eq!(recs.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 4]);
    for r in &recs {
        let t = r["tensors"].as_array().unwrap();
        // weight, activation and gradient of 4 matmuls in each of 2 layers
        assert_eq!(t.len(), 3 * 4 * cfg.num_layers, "{r}");
        for x in t {
            let (amax, scale) = (x["amax"].as_f64().unwrap(), x["scale"].as_f64().unwrap());
            assert!(amax > 0.0 && (scale * amax - 448.0).abs() < 1e-3 * 448.0, "{x}");
            assert_eq!(x["saturated"].as_f64(), Some(0.0), "current scaling never saturates: {x}");
            assert!((0.0..0.5).contains(&x["flushed"].as_f64().unwrap()), "{x}");
        }
    }
    // a bf16 run has nothing to report on
    let mut bf16 = trainer(&cfg, llmq_train::TrainConfig { precision: Precision::bf16(), ..train_config(2, 16, 1, 1) });
    assert!(bf16.log_fp8_health(2).unwrap_err().to_string().contains("--matmul-dtype e4m3"));
    let _ = std::fs::remove_file(&log_path);
}
