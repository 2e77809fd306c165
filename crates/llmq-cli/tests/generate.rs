//! `llmq generate` end to end on the CPU: a fixed tiny model with a word-level tokenizer written
//! here, from a model directory and from a checkpoint; greedy output against the library's
//! decoder; seeded sampling; errors naming the option or file.

mod common;

use common::*;
use llmq_core::{Arch, DType, ModelConfig, ParamLayout};
use std::path::Path;

const WORDS: &[&str] = &["[UNK]", "[EOS]", "hello", "world", "foo", "bar", "baz", "qux", "red", "green", "blue", "cat", "dog", "sun", "moon", "star"];

fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = WORDS.iter().enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "[EOS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// A tiny Qwen2-style model over WORDS with large random weights (clearly separated logits).
fn model() -> (ModelConfig, Vec<Vec<f32>>) {
    let mut cfg = ModelConfig::tiny(Arch::Qwen2, WORDS.len());
    cfg.eos_token_id = None;
    let layout = ParamLayout::new(&cfg);
    let groups = (0..layout.groups.len()).map(|gi| llmq_train::init::init_group(&cfg, &layout, 11, gi).into_iter().map(|x| x * 20.0).collect()).collect();
    (cfg, groups)
}

/// The greedy continuation by the library's decoder (no EOS stop), as words.
fn library_greedy(cfg: &ModelConfig, groups: &[Vec<f32>], prompt: &[u32], n: usize) -> Vec<&'static str> {
    let mut be = llmq_core::cpu::CpuBackend::new();
    let mut dec = llmq_train::generate::Decoder::new(&mut be, cfg, groups, DType::F32, prompt.len() + n, 4).unwrap();
    let opts = llmq_train::sampling::SamplingOptions { max_tokens: n, ..Default::default() };
    let (ids, _) = llmq_train::generate::generate(&be, &mut dec, prompt, &opts, &[], &mut |_| true).unwrap();
    ids.iter().map(|&i| WORDS[i as usize]).collect()
}

#[test]
fn greedy_text_is_fixed_and_matches_the_library() {
    let d = tmpdir("generate");
    let dir = d.join("model");
    let (cfg, groups) = model();
    llmq_io::hf::export_model(&dir, &cfg, &groups, DType::F32, None).unwrap();
    let m = dir.to_str().unwrap();
    // no tokenizer in the directory: named, with the way out
    let e = llmq_err(&cmd("generate --device cpu --prompt hello", &["--model", m]));
    assert!(e.contains("has no tokenizer.json: pass --tokenizer PATH") && e.contains(m), "{e}");
    write_tokenizer(&dir);

    let line = "generate --device cpu --dtype fp32 --max-tokens 8 --prompt";
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = cmd(line, &[]).iter().map(|s| s.to_string()).collect();
        v.extend(["hello world".to_string(), "--model".into(), m.to_string()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let out = llmq(&as_refs(&args(&[])));
    assert_eq!(out, llmq(&as_refs(&args(&[]))), "greedy output is fixed");
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&words[..2], ["hello", "world"], "{out}");
    // the word-level tokenizer's EOS ([EOS], id 1) would end the text early: compare up to it
    let want = library_greedy(&cfg, &groups, &[2, 3], 8);
    let until_eos: Vec<&str> = want.iter().copied().take_while(|w| *w != "[EOS]").collect();
    assert_eq!(&words[2..], until_eos.as_slice(), "{out}");
    assert!(words.len() > 3, "a continuation: {out}");
    // bf16 runs too (the default dtype), and seeded sampling repeats itself
    llmq(&cmd("generate --device cpu --max-tokens 4 --prompt hello", &["--model", m]));
    let sampled = args(&["--temperature", "1.5", "--top-k", "8", "--top-p", "0.95", "--seed", "5"]);
    assert_eq!(llmq(&as_refs(&sampled)), llmq(&as_refs(&sampled)));

    // options are checked and named
    for (extra, want) in [
        (vec!["--top-p", "0"], "--top-p: expected a number in (0, 1], got 0"),
        (vec!["--temperature=-1"], "--temperature: expected a finite number >= 0"),
    ] {
        let e = llmq_err(&as_refs(&args(&extra)));
        assert!(e.contains(want), "{extra:?}: {e}");
    }
    let e = llmq_err(&cmd("generate --device cpu --max-tokens 100000 --prompt hello --model", &[m]));
    assert!(e.contains("--max-tokens 100000 + a prompt of 1 tokens") && e.contains("max_position_embeddings"), "{e}");
    let e = llmq_err(&cmd("generate --device cpu --dtype e4m3 --model", &[m]));
    assert!(e.contains("--dtype: expected bf16 or fp32, got \"e4m3\""), "{e}");
    let e = llmq_err(&cmd("generate --device cpu --prompt hi --model", &[d.join("nope").to_str().unwrap()]));
    assert!(e.contains("nope") && e.contains("not a checkpoint"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_checkpoint_generates_with_a_given_tokenizer() {
    let d = tmpdir("generate-ck");
    let ck_dir = d.join("ck");
    llmq(&cmd("train --device cpu --model tiny --from-scratch --steps 2 --batch-size 2 --seq-len 16 --warmup 1", &["--ckpt-dir", ck_dir.to_str().unwrap()]));
    let ck = llmq_io::ckpt::resolve_continue(&ck_dir, None).unwrap();
    let tok = d.join("tok");
    std::fs::create_dir_all(&tok).unwrap();
    write_tokenizer(&tok);
    let c = ck.to_str().unwrap();
    let e = llmq_err(&cmd("generate --device cpu --prompt hello --model", &[c]));
    assert!(e.contains("checkpoint") && e.contains("pass --tokenizer PATH"), "{e}");
    let out = llmq(&cmd("generate --device cpu --prompt hello --max-tokens 5 --model", &[c, "--tokenizer", tok.to_str().unwrap()]));
    assert!(out.starts_with("hello"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}
