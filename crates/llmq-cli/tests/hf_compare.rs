//! llmq against Hugging Face transformers: random-initialised Qwen2, Qwen3 and Llama models
//! written by `scripts/hf_reference.py` (with their loss and every parameter gradient for one
//! batch) are loaded by llmq, which computes the same loss and gradients on every available
//! backend. Runs where LLMQ_HF_REF points at the script's output (the GPU machine has torch);
//! skips with a message elsewhere.
//!
//! Thresholds: fp32 — loss within 1e-4 relative, per tensor cosine ≥ 0.999 and relative L2 error
//! ≤ 1% (the bar; observed errors are ~1e-5). bf16 weights/activations — cosine ≥ 0.99
//! and relative error ≤ 15%, loss within 1%: bf16 keeps 8 bits of mantissa, so per-element
//! relative errors of 2^-8 compound through ~10 roundings per layer.

use llmq_core::cpu::CpuBackend;
use llmq_core::{Backend, DType};
use llmq_io::data::Batch;
use llmq_io::safetensors::SafeTensorsFile;
use llmq_train::*;
use std::path::Path;

type MakeBackend = Box<dyn Fn() -> Box<dyn Backend>>;

fn backends() -> Vec<(&'static str, MakeBackend)> {
    let mut v: Vec<(&'static str, MakeBackend)> =
        vec![("cpu", Box::new(|| Box::new(CpuBackend::new())))];
    match llmq_cuda::cuda_available() {
        Ok(()) => v.push((
            "cuda",
            Box::new(|| Box::new(llmq_cuda::CudaBackend::new(0, &Default::default()).unwrap())),
        )),
        Err(r) => eprintln!("no CUDA device ({r}): comparing the CPU backend only"),
    }
    v
}

fn compare(dir: &Path, backend: &str, make: &dyn Fn() -> Box<dyn Backend>, precision: Precision) {
    let cfg = llmq_io::hf::load_config(dir).unwrap();
    let weights = llmq_io::hf::load_weights(dir, &cfg).unwrap();
    let batch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json")).unwrap()).unwrap();
    let (b, t) = (
        batch["b"].as_u64().unwrap() as usize,
        batch["t"].as_u64().unwrap() as usize,
    );
    let ints = |k: &str| {
        batch[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect::<Vec<_>>()
    };
    let batch_data = Batch {
        inputs: ints("inputs"),
        targets: ints("targets"),
    };
    let hf_loss = batch["loss"].as_f64().unwrap();

    let shape = RunShape { b, t };
    let mut be = make();
    let model = Model::new(be.as_mut(), &cfg, precision, shape, &MemoryOptions::default()).unwrap();
    let be = be.as_ref();
    model.params.set_master_f32(be, &weights).unwrap();
    model.params.grads.zero(be).unwrap();
    model.set_batch(be, &batch_data).unwrap();
    let valid = batch_data.valid_targets();
    model.forward(be, Some(1.0 / valid as f32)).unwrap();
    model.backward(be).unwrap();
    let loss = model.loss_sum(be).unwrap() / valid as f64;
    let grads = model.params.grads_f32(be).unwrap();

    let fp32 = precision.weights == DType::F32;
    let (min_cos, max_rel, loss_tol) = if fp32 {
        (0.999, 0.01, 1e-4)
    } else {
        (0.99, 0.15, 1e-2)
    };
    let name = format!(
        "{} {backend} {}",
        dir.file_name().unwrap().to_string_lossy(),
        precision.weights
    );
    println!("{name}: loss llmq {loss:.6} hf {hf_loss:.6}");
    assert!(
        (loss - hf_loss).abs() <= loss_tol * hf_loss,
        "{name}: loss {loss} vs {hf_loss}"
    );

    // our gradients under HF names: export them as if they were weights
    let tmp = std::env::temp_dir().join(format!(
        "llmq-hfcmp-{}-{backend}-{}",
        std::process::id(),
        precision.weights
    ));
    llmq_io::hf::export_model(&tmp, &cfg, &grads, DType::F32, None).unwrap();
    let ours = SafeTensorsFile::open(&tmp.join("model.safetensors")).unwrap();
    let theirs = SafeTensorsFile::open(&dir.join("grads.safetensors")).unwrap();
    let mut worst = (1.0f64, 0.0f64);
    for n in theirs.names() {
        let a = theirs.read_f32(n).unwrap();
        let g = ours
            .read_f32(n)
            .unwrap_or_else(|e| panic!("{name}: llmq has no gradient for {n}: {e}"));
        let (mut ab, mut aa, mut gg, mut dd) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(&g) {
            let (x, y) = (x as f64, y as f64);
            ab += x * y;
            aa += x * x;
            gg += y * y;
            dd += (x - y) * (x - y);
        }
        let cos = ab / (aa.sqrt() * gg.sqrt()).max(1e-300);
        let rel = dd.sqrt() / aa.sqrt().max(1e-300);
        worst = (worst.0.min(cos), worst.1.max(rel));
        assert!(
            cos >= min_cos && rel <= max_rel,
            "{name}: {n}: cosine {cos:.6}, relative error {rel:.3e}"
        );
    }
    println!(
        "{name}: {} gradients, worst cosine {:.6}, worst relative error {:.2e}",
        theirs.names().count(),
        worst.0,
        worst.1
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn loss_and_gradients_match_transformers() {
    let Ok(root) = std::env::var("LLMQ_HF_REF") else {
        eprintln!("skipping: LLMQ_HF_REF is not set (run scripts/hf_reference.py where torch and transformers are installed)");
        return;
    };
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("grads.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no reference models under {root}");
    for (backend, make) in backends() {
        for dir in &dirs {
            compare(dir, backend, make.as_ref(), Precision::fp32());
            compare(dir, backend, make.as_ref(), Precision::bf16());
        }
    }
}
