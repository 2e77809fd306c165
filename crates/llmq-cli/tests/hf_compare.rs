//! llmq against Hugging Face transformers: small Qwen2, Qwen3 and Llama models (one with
//! Llama-3.1 rope scaling), trained a little and written by `scripts/hf_reference.py` with their
//! loss and every parameter gradient for one batch, are loaded by llmq, which computes the same
//! loss and gradients on every available backend. Runs where LLMQ_HF_REF points at the script's
//! output (the GPU machine has torch); prints SKIPPED elsewhere (fails under LLMQ_REQUIRE_GPU=1, as
//! the GPU runners set).
//!
//! Bars: fp32 — the constants below, ~15x the observed errors. bf16 working weights and
//! activations — a few times what bf16 rounding does to the reference itself: the script runs the
//! same batch through a bf16 copy of the model and records its loss and per-tensor gradient
//! errors against fp32 (with floors for tensors where that copy happens to round luckily).

use llmq_core::cpu::CpuBackend;
use llmq_core::config::RopeScaling;
use llmq_core::{Backend, DType, ModelConfig};
use llmq_io::data::Batch;
use llmq_io::safetensors::SafeTensorsFile;
use llmq_train::*;
use std::collections::HashMap;
use std::path::Path;

// Observed with the CPU backend against transformers 5.17 / torch 2.11 on the CPU (the script's
// trained references): fp32 loss gaps 1.7e-7 .. 1.9e-6 relative, per-tensor gradient errors up to
// 1.3e-5 (Qwen3's q_norm); bf16 loss gaps 5.6e-4 .. 2.4e-3 under bars of 3.9e-3 .. 7.9e-3, the
// gradient error nearest its bar at 36% of it. Each run prints its gaps and the tensor nearest
// its bar.
/// fp32 loss, relative: ~15x the largest observed gap.
const FP32_LOSS_REL: f64 = 3e-5;
/// fp32 per-tensor relative L2 error of the gradients: ~15x the largest observed (differences
/// come only from summation order in attention, the matmuls' accumulation and the reductions).
const FP32_GRAD_REL: f64 = 2e-4;
/// fp32 per-tensor cosine: 1 - cos is about half the squared error component orthogonal to the
/// gradient, so an error at the relative bar, all of it off-direction, gives 1 - 2e-8.
const FP32_MIN_COS: f64 = 1.0 - 2e-8;
/// bf16: llmq's gap to the fp32 reference may be this many times the reference's own bf16 gap.
/// llmq keeps fp32 master weights, gradients and reductions where the bf16 copy of the reference
/// runs everything in bf16, so its gradient errors are expected below the copy's; the loss is one
/// number, which either side may round luckily close: hence the floor below.
const BF16_FACTOR: f64 = 4.0;
/// bf16 loss floor, relative: 2^-8, one bf16 rounding step of the loss value itself.
const BF16_LOSS_FLOOR: f64 = 1.0 / 256.0;
/// bf16 gradient floor, relative L2: 2^-9 (bf16's unit roundoff) grown through the ~10 roundings
/// per layer of the two layers and the head, ~2^-9 * sqrt(25) = 1%, doubled.
const BF16_GRAD_FLOOR: f64 = 2e-2;
/// The rope-scaled reference must test the scaling: llmq without it misses the reference's fp32
/// loss by more than this many fp32 loss bars.
const SCALING_EFFECT: f64 = 100.0;

type MakeBackend = Box<dyn Fn() -> Box<dyn Backend>>;

fn backends() -> Vec<(&'static str, MakeBackend)> {
    let mut v: Vec<(&'static str, MakeBackend)> = vec![("cpu", Box::new(|| Box::new(CpuBackend::new())))];
    match llmq_cuda::cuda_available() {
        Ok(()) => v.push(("cuda", Box::new(|| Box::new(llmq_cuda::CudaBackend::new(0, &Default::default()).unwrap())))),
        Err(r) => llmq_cuda::skip_gpu_test(&format!("the CUDA comparison (no CUDA device: {r}); comparing the CPU backend only")),
    }
    v
}

/// One reference directory: the model as llmq parses it, the batch, and what the script measured.
struct Reference {
    name: String,
    dir: std::path::PathBuf,
    cfg: ModelConfig,
    weights: Vec<Vec<f32>>,
    batch: Batch,
    shape: RunShape,
    loss: f64,
    bf16_loss: f64,
    bf16_grad_rel: HashMap<String, f64>,
}

fn load(dir: &Path) -> Reference {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let cfg = llmq_io::hf::load_config(dir).unwrap();
    // the parser falls back to 10000 without the field: a reference at that value would not show
    // a parsing slip (scripts/hf_reference.py writes 50000)
    assert_ne!(cfg.rope_theta, 10000.0, "{name}: the reference must not use the parser's default rope_theta");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json")).unwrap()).unwrap();
    let num = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("{name}: batch.json has no number `{k}` (regenerate it with scripts/hf_reference.py)"));
    let ints = |k: &str| j[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect::<Vec<_>>();
    // the scaling the script gave transformers, against what llmq parsed from the saved config.json
    let expected = match &j["rope_scaling"] {
        serde_json::Value::Null => None,
        s => Some(RopeScaling {
            factor: s["factor"].as_f64().unwrap(),
            low_freq_factor: s["low_freq_factor"].as_f64().unwrap(),
            high_freq_factor: s["high_freq_factor"].as_f64().unwrap(),
            original_max_position_embeddings: s["original_max_position_embeddings"].as_u64().unwrap() as usize,
        }),
    };
    assert_eq!(cfg.rope_scaling, expected, "{name}: the rope scaling parsed from config.json");
    let bf16_grad_rel = j["bf16_grad_rel"]
        .as_object()
        .unwrap_or_else(|| panic!("{name}: batch.json has no `bf16_grad_rel` (regenerate it with scripts/hf_reference.py)"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    Reference {
        weights: llmq_io::hf::load_weights(dir, &cfg).unwrap(),
        batch: Batch { inputs: ints("inputs"), targets: ints("targets") },
        shape: RunShape { b: num("b") as usize, t: num("t") as usize },
        loss: num("loss"),
        bf16_loss: num("bf16_loss"),
        bf16_grad_rel,
        cfg,
        dir: dir.to_path_buf(),
        name,
    }
}

/// llmq's mean loss and parameter gradients (flat groups) for the reference batch.
fn loss_and_grads(r: &Reference, cfg: &ModelConfig, make: &dyn Fn() -> Box<dyn Backend>, precision: Precision) -> (f64, Vec<Vec<f32>>) {
    let mut be = make();
    let model = Model::new(be.as_mut(), cfg, precision, r.shape, &MemoryOptions::default()).unwrap();
    let be = be.as_ref();
    model.params.set_weights_f32(be, &r.weights).unwrap();
    model.params.grads.zero(be).unwrap();
    model.set_batch(be, &r.batch).unwrap();
    let valid = r.batch.valid_targets();
    model.forward(be, Some(1.0 / valid as f32)).unwrap();
    model.backward(be).unwrap();
    let loss = model.loss_sum(be).unwrap() / valid as f64;
    (loss, model.params.grads_f32(be).unwrap())
}

/// The gradient tensors of both sides, by name: an error naming every tensor only one side has.
fn same_tensor_names(theirs: &[&str], ours: &[&str]) -> Result<Vec<String>, String> {
    let (mut t, mut o) = (theirs.to_vec(), ours.to_vec());
    t.sort_unstable();
    o.sort_unstable();
    let missing: Vec<_> = t.iter().filter(|n| o.binary_search(n).is_err()).collect();
    let extra: Vec<_> = o.iter().filter(|n| t.binary_search(n).is_err()).collect();
    if missing.is_empty() && extra.is_empty() && t.len() == o.len() {
        Ok(t.into_iter().map(String::from).collect())
    } else {
        Err(format!("llmq lacks {missing:?}, only llmq has {extra:?} ({} reference and {} llmq tensors)", t.len(), o.len()))
    }
}

fn cosine_and_rel(a: &[f32], g: &[f32]) -> (f64, f64) {
    let (mut ab, mut aa, mut gg, mut dd) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(g) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        gg += y * y;
        dd += (x - y) * (x - y);
    }
    (ab / (aa.sqrt() * gg.sqrt()).max(1e-300), dd.sqrt() / aa.sqrt().max(1e-300))
}

fn compare(r: &Reference, backend: &str, make: &dyn Fn() -> Box<dyn Backend>, precision: Precision) {
    let (loss, grads) = loss_and_grads(r, &r.cfg, make, precision);
    let fp32 = precision.weights == DType::F32;
    let name = format!("{} {backend} {}", r.name, precision.weights);
    let loss_bar = if fp32 { FP32_LOSS_REL } else { (BF16_FACTOR * (r.bf16_loss - r.loss).abs() / r.loss).max(BF16_LOSS_FLOOR) };
    let loss_gap = (loss - r.loss).abs() / r.loss;
    println!(
        "{name}: loss llmq {loss:.6} hf {:.6}: relative gap {loss_gap:.2e} (bar {loss_bar:.2e}; the reference's bf16 copy: {:.2e})",
        r.loss,
        (r.bf16_loss - r.loss).abs() / r.loss
    );
    assert!(loss_gap <= loss_bar, "{name}: loss {loss} vs {}: relative gap {loss_gap:.3e} above {loss_bar:.3e}", r.loss);

    // our gradients under HF names: export them as if they were weights
    let tmp = std::env::temp_dir().join(format!("llmq-hfcmp-{}-{}-{backend}-{}", std::process::id(), r.name, precision.weights));
    llmq_io::hf::export_model(&tmp, &r.cfg, &grads, DType::F32, None).unwrap();
    let ours = SafeTensorsFile::open(&tmp.join("model.safetensors")).unwrap();
    let theirs = SafeTensorsFile::open(&r.dir.join("grads.safetensors")).unwrap();
    let names = same_tensor_names(&theirs.names().collect::<Vec<_>>(), &ours.names().collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("{name}: the gradient tensors differ: {e}"));
    let (mut worst_cos, mut worst_rel, mut worst_ratio) = ((1.0f64, ""), (0.0f64, ""), (0.0f64, ""));
    for n in &names {
        assert_eq!(theirs.info(n).unwrap().shape, ours.info(n).unwrap().shape, "{name}: {n}: gradient shapes differ");
        let (a, g) = (theirs.read_f32(n).unwrap(), ours.read_f32(n).unwrap());
        assert_eq!(a.len(), g.len(), "{name}: {n}: gradient lengths differ");
        let (cos, rel) = cosine_and_rel(&a, &g);
        let (min_cos, max_rel) = if fp32 {
            (FP32_MIN_COS, FP32_GRAD_REL)
        } else {
            let hf = *r.bf16_grad_rel.get(n).unwrap_or_else(|| panic!("{name}: batch.json has no bf16 error for {n}"));
            let bar = (BF16_FACTOR * hf).max(BF16_GRAD_FLOOR);
            ((1.0 - bar * bar).sqrt(), bar)
        };
        if cos < worst_cos.0 {
            worst_cos = (cos, n);
        }
        if rel > worst_rel.0 {
            worst_rel = (rel, n);
        }
        if rel / max_rel > worst_ratio.0 {
            worst_ratio = (rel / max_rel, n);
        }
        assert!(cos >= min_cos && rel <= max_rel, "{name}: {n}: cosine {cos:.9} (bar {min_cos:.9}), relative error {rel:.3e} (bar {max_rel:.3e})");
    }
    println!(
        "{name}: {} gradients, worst cosine {:.9} ({}), worst relative error {:.2e} ({}), closest to its bar: {} at {:.0}% of it",
        names.len(),
        worst_cos.0,
        worst_cos.1,
        worst_rel.0,
        worst_rel.1,
        worst_ratio.1,
        100.0 * worst_ratio.0
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The rope-scaled reference tests the scaling: without it, llmq's loss misses the reference.
fn scaling_matters(r: &Reference) {
    let mut plain = r.cfg.clone();
    plain.rope_scaling = None;
    let (loss, _) = loss_and_grads(r, &plain, &|| Box::new(CpuBackend::new()), Precision::fp32());
    let gap = (loss - r.loss).abs() / r.loss;
    println!("{}: without the rope scaling llmq's loss is {loss:.6}, relative gap {gap:.2e}", r.name);
    assert!(
        gap > SCALING_EFFECT * FP32_LOSS_REL,
        "{}: the rope scaling barely changes the loss (gap {gap:.2e} without it): the case does not test it",
        r.name
    );
}

#[test]
fn loss_and_gradients_match_transformers() {
    let Ok(root) = std::env::var("LLMQ_HF_REF") else {
        llmq_cuda::skip_gpu_test("LLMQ_HF_REF is not set (run scripts/hf_reference.py where torch and transformers are installed)");
        return;
    };
    let mut dirs: Vec<_> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("grads.safetensors").exists()).collect();
    dirs.sort();
    let refs: Vec<Reference> = dirs.iter().map(|d| load(d)).collect();
    assert!(!refs.is_empty(), "no reference models under {root}");
    let scaled: Vec<&Reference> = refs.iter().filter(|r| r.cfg.rope_scaling.is_some()).collect();
    assert!(!scaled.is_empty(), "no reference under {root} has rope scaling: regenerate them with scripts/hf_reference.py");
    for r in &refs {
        // trained references: far below the ~ln(V) of a random model, so the loss bars can fail
        let uniform = (r.cfg.vocab_size as f64).ln();
        assert!(r.loss < 0.5 * uniform, "{}: reference loss {:.3} is near ln(V) = {uniform:.3}: the model was not trained", r.name, r.loss);
    }
    for r in scaled {
        scaling_matters(r);
    }
    for (backend, make) in backends() {
        for r in &refs {
            compare(r, backend, make.as_ref(), Precision::fp32());
            compare(r, backend, make.as_ref(), Precision::bf16());
        }
    }
}

#[test]
fn a_missing_or_extra_gradient_tensor_fails_the_comparison() {
    let theirs = ["lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"];
    assert_eq!(same_tensor_names(&theirs, &["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"]).unwrap().len(), 3);
    let missing = same_tensor_names(&theirs, &["model.norm.weight", "model.embed_tokens.weight"]).unwrap_err();
    assert!(missing.contains("llmq lacks [\"lm_head.weight\"]"), "{missing}");
    let extra = same_tensor_names(&theirs[1..], &theirs).unwrap_err();
    assert!(extra.contains("only llmq has [\"lm_head.weight\"]"), "{extra}");
    // a duplicated name on one side is not a match either
    assert!(same_tensor_names(&theirs, &["lm_head.weight", "lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"]).is_err());
}
