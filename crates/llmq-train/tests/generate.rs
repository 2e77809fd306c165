//! Generation: the cached decoder against the training model's forward pass, greedy decoding
//! against the argmax of full-sequence logits, sampling options and their errors.

mod common;

use common::{all_tiny, tiny};
use llmq_core::cpu::CpuBackend;
use llmq_core::{Arch, DType, ModelConfig, ParamLayout};
use llmq_io::data::Batch;
use llmq_train::generate::{generate, load_source, Decoder, Stop};
use llmq_train::params::download_f32;
use llmq_train::sampling::{argmax, Sampler, SamplingOptions};
use llmq_train::{MemoryOptions, Model, Precision, RunShape};

fn weights(cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let layout = ParamLayout::new(cfg);
    (0..layout.groups.len()).map(|gi| llmq_train::init::init_group(cfg, &layout, seed, gi)).collect()
}

/// Larger-than-init weights, so that the logits differ clearly from token to token.
fn sharp_weights(cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    weights(cfg, seed).into_iter().map(|g| g.into_iter().map(|x| x * 20.0).collect()).collect()
}

fn tokens(n: usize, v: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % v as u32).collect()
}

/// Per-row cross-entropy log-sum-exp(x) - x[target] in f64 from f32 logits.
fn row_losses(logits: &[f32], v: usize, targets: &[u32]) -> Vec<f64> {
    logits
        .chunks(v)
        .zip(targets)
        .map(|(row, &t)| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            lse - row[t as usize] as f64
        })
        .collect()
}

#[test]
fn decoder_matches_the_training_forward_for_every_architecture() {
    let t = 11;
    for (name, cfg) in all_tiny() {
        let groups = weights(&cfg, 5);
        let seq = tokens(t + 1, cfg.vocab_size, 3);
        let (inputs, targets) = (&seq[..t], &seq[1..]);
        // the training model's per-row losses (f32 run)
        let mut be = CpuBackend::new();
        let model = Model::new(&mut be, &cfg, Precision::fp32(), RunShape { b: 1, t }, &MemoryOptions::default()).unwrap();
        model.params.set_weights_f32(&be, &groups).unwrap();
        model.weights_changed(&be).unwrap();
        let batch = Batch { inputs: inputs.iter().map(|&x| x as i32).collect(), targets: targets.iter().map(|&x| x as i32).collect() };
        model.set_batch(&be, &batch).unwrap();
        model.forward(&be, None).unwrap();
        let want = download_f32(&be, &model.acts.losses).unwrap();

        // all rows at once, in pieces of 4 rows, and one token at a time
        let mut dec = Decoder::new(&mut be, &cfg, &groups, DType::F32, t, 4).unwrap();
        let all = dec.feed(&be, inputs, true).unwrap();
        let got = row_losses(&all, cfg.vocab_size, targets);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - *w as f64).abs() <= 1e-5 * (1.0 + g.abs()), "{name}: row {i}: decoder loss {g}, training forward {w}");
        }
        dec.reset();
        for (i, &tok) in inputs.iter().enumerate() {
            let row = dec.feed(&be, &[tok], false).unwrap();
            let full = &all[i * cfg.vocab_size..(i + 1) * cfg.vocab_size];
            for (j, (a, b)) in row.iter().zip(full).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{name}: position {i}, logit {j}: one token at a time {a}, whole sequence {b}");
            }
        }
        assert_eq!(dec.position(), t);
        let e = dec.feed(&be, &[0], false).unwrap_err().to_string();
        assert!(e.contains("11 positions used + 1 new exceed the 11"), "{e}");
    }
}

#[test]
fn greedy_continuation_is_fixed_and_is_the_argmax_of_the_full_forward() {
    for (arch, dtype) in [(Arch::Qwen2, DType::F32), (Arch::Qwen3, DType::BF16), (Arch::Llama, DType::BF16)] {
        let cfg = tiny(arch, false);
        let groups = sharp_weights(&cfg, 8);
        let mut be = CpuBackend::new();
        let prompt = tokens(5, cfg.vocab_size, 1);
        let opts = SamplingOptions { max_tokens: 12, ..Default::default() };
        let mut dec = Decoder::new(&mut be, &cfg, &groups, dtype, 32, 3).unwrap();
        let mut seen = vec![];
        let (first, stop) = generate(&be, &mut dec, &prompt, &opts, &[], &mut |t| {
            seen.push(t);
            true
        })
        .unwrap();
        assert_eq!((first.len(), stop), (12, Stop::MaxTokens));
        assert_eq!(seen, first, "tokens are reported as they come");
        // a second call on the same decoder and one on a new decoder give the same tokens
        let (again, _) = generate(&be, &mut dec, &prompt, &opts, &[], &mut |_| true).unwrap();
        let mut dec2 = Decoder::new(&mut be, &cfg, &groups, dtype, 17, 8).unwrap();
        let (other, _) = generate(&be, &mut dec2, &prompt, &opts, &[], &mut |_| true).unwrap();
        assert_eq!((&again, &other), (&first, &first), "{arch:?} {dtype}");
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(distinct.len() > 1, "{arch:?}: a degenerate continuation {first:?} would not test much");
        // each generated token is the argmax of the full forward's logits at its position
        let seq: Vec<u32> = prompt.iter().chain(&first).copied().collect();
        dec2.reset();
        let all = dec2.feed(&be, &seq[..seq.len() - 1], true).unwrap();
        let v = cfg.vocab_size;
        for (i, &tok) in first.iter().enumerate() {
            let row = prompt.len() - 1 + i;
            assert_eq!(argmax(&all[row * v..(row + 1) * v]), tok, "{arch:?} {dtype}: generated token {i}");
        }
        // generation stops at the end-of-sequence token, which is not returned
        let (cut, stop) = generate(&be, &mut dec2, &prompt, &opts, &[first[3]], &mut |_| true).unwrap();
        let at = first.iter().position(|&t| t == first[3]).unwrap();
        assert_eq!((cut.as_slice(), stop), (&first[..at], Stop::Eos));
        // the caller can stop it, and the decoder's length bounds it
        let (two, stop) = generate(&be, &mut dec2, &prompt, &opts, &[], &mut |_| false).unwrap();
        assert_eq!((two.as_slice(), stop), (&first[..1], Stop::Caller));
        let mut short = Decoder::new(&mut be, &cfg, &groups, dtype, 8, 8).unwrap();
        let (three, stop) = generate(&be, &mut short, &prompt, &opts, &[], &mut |_| true).unwrap();
        assert_eq!((three.as_slice(), stop), (&first[..4], Stop::Length));
    }
}

#[test]
fn sampling_is_seeded_and_respects_top_k_and_top_p() {
    // probabilities 0.5, 0.25, 0.125, 0.0625, ... at temperature 1
    let logits: Vec<f32> = (0..8).map(|i| -(i as f32) * std::f32::consts::LN_2).collect();
    let draw = |opts: SamplingOptions, n: usize| -> Vec<u32> {
        let mut s = Sampler::new(&opts);
        (0..n).map(|_| s.sample(&logits).unwrap()).collect()
    };
    let base = SamplingOptions { temperature: 1.0, seed: 7, ..Default::default() };
    let a = draw(base.clone(), 4000);
    assert_eq!(a, draw(base.clone(), 4000), "same seed, same tokens");
    assert_ne!(a, draw(SamplingOptions { seed: 8, ..base.clone() }, 4000), "another seed, other tokens");
    let freq = |v: &[u32], t: u32| v.iter().filter(|&&x| x == t).count() as f64 / v.len() as f64;
    let total: f64 = (0..8).map(|i| 0.5f64.powi(i + 1)).sum();
    for t in 0..3 {
        let p = 0.5f64.powi(t as i32 + 1) / total;
        assert!((freq(&a, t) - p).abs() < 0.03, "token {t}: frequency {} for probability {p}", freq(&a, t));
    }
    // top-k 2: only the two most likely, in the ratio 2:1
    let k2 = draw(SamplingOptions { top_k: 2, ..base.clone() }, 3000);
    assert!(k2.iter().all(|&t| t < 2));
    assert!((freq(&k2, 0) - 2.0 / 3.0).abs() < 0.03, "{}", freq(&k2, 0));
    // top-p 0.7: tokens 0 and 1 reach 0.75 (renormalised 2:1); 0.5 keeps token 0 alone
    let p7 = draw(SamplingOptions { top_p: 0.7, ..base.clone() }, 3000);
    assert!(p7.iter().all(|&t| t < 2) && p7.contains(&1));
    assert!(draw(SamplingOptions { top_p: 0.5, ..base.clone() }, 200).iter().all(|&t| t == 0));
    // a low temperature concentrates on the argmax; temperature 0 is the argmax
    let cold = draw(SamplingOptions { temperature: 0.05, ..base.clone() }, 500);
    assert!(cold.iter().all(|&t| t == 0));
    let mut tied = logits.clone();
    tied[5] = 0.0; // equal to token 0: the lower id wins
    let mut greedy = Sampler::new(&SamplingOptions::default());
    assert_eq!(greedy.sample(&tied).unwrap(), 0);
    let bad = greedy.sample(&[0.0, f32::NAN]).unwrap_err().to_string();
    assert!(bad.contains("logit 1 of 2 is NaN"), "{bad}");
}

#[test]
fn bad_options_and_inputs_are_named() {
    let check = |o: SamplingOptions, want: &str| {
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{e} (wanted {want})");
    };
    let d = SamplingOptions::default();
    check(SamplingOptions { temperature: -0.5, ..d.clone() }, "--temperature: expected a finite number >= 0 (0: greedy), got -0.5");
    check(SamplingOptions { temperature: f32::INFINITY, ..d.clone() }, "--temperature");
    check(SamplingOptions { top_p: 0.0, ..d.clone() }, "--top-p: expected a number in (0, 1], got 0");
    check(SamplingOptions { top_p: 1.5, ..d.clone() }, "got 1.5");
    check(SamplingOptions { top_p: f32::NAN, ..d.clone() }, "got NaN");

    let cfg = tiny(Arch::Qwen2, true);
    let mut be = CpuBackend::new();
    let groups = weights(&cfg, 1);
    let mut dec = Decoder::new(&mut be, &cfg, &groups, DType::F32, 8, 4).unwrap();
    let e = dec.feed(&be, &[1, 37], false).unwrap_err().to_string();
    assert!(e.contains("token 37 is outside the model's vocabulary 0..37"), "{e}");
    let e = dec.feed(&be, &[], false).unwrap_err().to_string();
    assert!(e.contains("nothing to feed"), "{e}");
    let e = Decoder::new(&mut be, &cfg, &groups, DType::E4M3, 8, 4).err().unwrap().to_string();
    assert!(e.contains("bf16 or fp32, got e4m3"), "{e}");
    let e = Decoder::new(&mut be, &cfg, &groups[1..], DType::F32, 8, 4).err().unwrap().to_string();
    assert!(e.contains("groups"), "{e}");
    let e = load_source("/nonexistent/llmq-model").err().unwrap().to_string();
    assert!(e.contains("/nonexistent/llmq-model") && e.contains("not a checkpoint"), "{e}");
}

#[test]
fn a_model_directory_loads_with_its_tokenizer() {
    let cfg = tiny(Arch::Llama, false);
    let groups = weights(&cfg, 3);
    let dir = std::env::temp_dir().join(format!("llmq-gen-src-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    llmq_io::hf::export_model(&dir, &cfg, &groups, DType::F32, None).unwrap();
    let src = load_source(dir.to_str().unwrap()).unwrap();
    assert_eq!(src.groups, groups, "the weights come back exactly (fp32 export)");
    assert_eq!(src.tokenizer_dir, None, "no tokenizer.json in the directory");
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    assert_eq!(load_source(dir.to_str().unwrap()).unwrap().tokenizer_dir.as_deref(), Some(dir.as_path()));
    let _ = std::fs::remove_dir_all(&dir);
}
