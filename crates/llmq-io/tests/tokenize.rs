mod common;
use common::*;
use llmq_io::tokenize::*;
use llmq_io::tokfile::read_token_file;
use std::path::Path;

const VOCAB: &[&str] = &["[UNK]", "[EOS]", "hello", "world", "foo", "bar"];

fn write_tokenizer(dir: &Path) -> std::path::PathBuf {
    let vocab: serde_json::Map<String, serde_json::Value> =
        VOCAB.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::Value::from(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 1, "content": "[EOS]", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tok).unwrap()).unwrap();
    p
}

#[test]
fn text_and_jsonl_with_eos_and_split() {
    let d = tmpdir("tk_basic");
    let tj = write_tokenizer(&d);
    let a = d.join("a.txt");
    std::fs::write(&a, "hello world\nfoo").unwrap();
    let b = d.join("b.jsonl");
    std::fs::write(&b, "{\"text\": \"bar hello\", \"id\": 1}\n{\"text\": \"world\"}\n\n{\"text\": \"zzz foo\"}\n").unwrap();
    let out = d.join("out");
    let mut opts = TokenizeOptions::new(vec![a.clone(), b.clone()], d.clone(), out.clone());
    opts.max_tokens_per_file = 4;
    let mut calls = Vec::new();
    let rep = tokenize(&opts, &mut |p| calls.push((p.bytes_done, p.bytes_total))).unwrap();
    // a.txt: hello world foo EOS | b: bar hello EOS | world EOS | [UNK] foo EOS
    let want: Vec<i32> = vec![2, 3, 4, 1, 5, 2, 1, 3, 1, 0, 4, 1];
    assert_eq!(rep.eos, EosChoice { id: 1, token: Some("[EOS]".into()), source: "a token named like an end of sequence".into() });
    assert_eq!(rep.vocab_size, 6);
    assert_eq!(rep.documents, 4);
    assert_eq!(rep.tokens, 12);
    assert_eq!(rep.files.len(), 3);
    let mut all = Vec::new();
    for (i, f) in rep.files.iter().enumerate() {
        assert_eq!(f.path, out.join(format!("out_{i:03}.bin")));
        let data = read_token_file(&f.path, None).unwrap();
        assert_eq!(data.info.version, 2);
        assert_eq!(data.info.vocab_size, Some(6));
        assert!(data.mask.is_none());
        assert!(data.tokens.len() <= 4);
        all.extend(data.tokens);
    }
    assert_eq!(all, want);
    let total = std::fs::metadata(&a).unwrap().len() + std::fs::metadata(&b).unwrap().len();
    assert_eq!(calls.first(), Some(&(0, total)));
    assert_eq!(calls.last(), Some(&(total, total)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));

    // running again refuses to clobber, unless asked
    assert_file_err(tokenize(&opts, &mut |_| {}), &out.join("out_000.bin"), &["output exists", "--overwrite"]);
    opts.overwrite = true;
    opts.max_tokens_per_file = 100;
    opts.eos_id = Some(5); // explicit EOS id wins
    opts.tokenizer = tj.clone();
    let rep = tokenize(&opts, &mut |_| {}).unwrap();
    assert_eq!(rep.files.len(), 1);
    assert!(!out.join("out_001.bin").exists(), "stale outputs removed");
    let data = read_token_file(&rep.files[0].path, None).unwrap();
    assert_eq!(data.tokens, vec![2, 3, 4, 5, 5, 2, 5, 3, 5, 0, 4, 5]);
}

#[test]
fn eos_from_tokenizer_config_and_errors() {
    let d = tmpdir("tk_cfg");
    write_tokenizer(&d);
    // tokenizer_config.json names the EOS token
    std::fs::write(d.join("tokenizer_config.json"), r#"{"eos_token": {"content": "bar"}}"#).unwrap();
    let j = d.join("docs.jsonl");
    std::fs::write(&j, "{\"body\": \"hello\"}\n").unwrap();
    let mut opts = TokenizeOptions::new(vec![j.clone()], d.clone(), d.join("o"));
    opts.field = "body".into();
    let rep = tokenize(&opts, &mut |_| {}).unwrap();
    assert_eq!((rep.eos.id, rep.eos.token.as_deref()), (5, Some("bar")));
    assert_eq!(read_token_file(&rep.files[0].path, None).unwrap().tokens, vec![2, 5]);

    // a line without the field names file and line
    std::fs::write(&j, "{\"body\": \"hello\"}\n{\"text\": \"x\"}\n").unwrap();
    opts.overwrite = true;
    assert_file_err(tokenize(&opts, &mut |_| {}), &j, &["line 2", "no field `body`"]);
    std::fs::write(&j, "{\"body\": 3}\n").unwrap();
    assert_file_err(tokenize(&opts, &mut |_| {}), &j, &["line 1", "not a string"]);
    std::fs::write(&j, "not json\n").unwrap();
    assert_file_err(tokenize(&opts, &mut |_| {}), &j, &["line 1", "not valid JSON"]);
    // unsupported input and EOS outside the vocabulary
    let csv = d.join("x.csv");
    std::fs::write(&csv, "a,b").unwrap();
    opts.inputs = vec![csv.clone()];
    assert_file_err(tokenize(&opts, &mut |_| {}), &csv, &[".txt, .jsonl or .parquet"]);
    std::fs::write(&j, "{\"body\": \"hello\"}\n").unwrap();
    opts.inputs = vec![j.clone()];
    opts.eos_id = Some(6);
    assert_err_contains(tokenize(&opts, &mut |_| {}), &["EOS id 6", "vocabulary of 6"]);
    // a broken tokenizer file
    let bad = tmpdir("tk_badtok");
    std::fs::write(bad.join("tokenizer.json"), "{").unwrap();
    opts.tokenizer = bad.clone();
    opts.eos_id = None;
    assert_file_err(tokenize(&opts, &mut |_| {}), &bad.join("tokenizer.json"), &["cannot load tokenizer"]);
}

/// A Qwen-style chat tokenizer: `<|endoftext|>` ends a document, `<|im_end|>` (the
/// `eos_token` of its tokenizer_config.json and first in generation_config.json) ends a turn.
fn write_chat_tokenizer(dir: &Path) {
    let words = ["hello", "world", "<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let vocab: serde_json::Map<String, serde_json::Value> = words.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::Value::from(i))).collect();
    let added: Vec<serde_json::Value> = (2..5)
        .map(|i| serde_json::json!({"id": i, "content": words[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "hello"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|im_end|>"}"#).unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [4, 2]}"#).unwrap();
}

#[test]
fn document_end_token_beats_the_chat_eos() {
    let d = tmpdir("tk_chat");
    write_chat_tokenizer(&d);
    let j = d.join("docs.jsonl");
    std::fs::write(&j, "{\"text\": \"hello world\"}\n{\"text\": \"world\"}\n").unwrap();
    let mut opts = TokenizeOptions::new(vec![j], d.clone(), d.join("o"));
    let rep = tokenize(&opts, &mut |_| {}).unwrap();
    assert_eq!(rep.eos, EosChoice { id: 2, token: Some("<|endoftext|>".into()), source: "the tokenizer's end-of-document token".into() });
    assert_eq!(read_token_file(&rep.files[0].path, None).unwrap().tokens, vec![0, 1, 2, 1, 2]);
    // an explicit id still wins, and its string is reported
    opts.eos_id = Some(4);
    opts.overwrite = true;
    let rep = tokenize(&opts, &mut |_| {}).unwrap();
    assert_eq!(rep.eos, EosChoice { id: 4, token: Some("<|im_end|>".into()), source: "--eos-id".into() });
}

#[test]
fn progress_moves_in_steps_of_a_batch() {
    let d = tmpdir("tk_progress");
    write_tokenizer(&d);
    // 4 MiB of documents: progress must be reported several times along the way, each time with
    // more bytes and more tokens, not only at the start and the end
    let line = "{\"text\": \"hello world foo bar hello world foo bar\"}\n";
    let n = (4 << 20) / line.len();
    let j = d.join("big.jsonl");
    std::fs::write(&j, line.repeat(n)).unwrap();
    let opts = TokenizeOptions::new(vec![j], d.clone(), d.join("o"));
    let mut calls: Vec<TokenizeProgress> = Vec::new();
    let rep = tokenize(&opts, &mut |p| calls.push(p)).unwrap();
    let total = (n * line.len()) as u64;
    assert_eq!(calls.first(), Some(&TokenizeProgress { bytes_done: 0, bytes_total: total, tokens: 0 }));
    assert_eq!(calls.last(), Some(&TokenizeProgress { bytes_done: total, bytes_total: total, tokens: rep.tokens }));
    let steps = calls.windows(2).filter(|w| w[1].bytes_done > w[0].bytes_done).count();
    assert!(steps as u64 >= total / BATCH_BYTES as u64, "{steps} progress steps over {total} bytes");
    assert!(calls.windows(2).all(|w| w[1].bytes_done >= w[0].bytes_done && w[1].tokens >= w[0].tokens));
}

/// A pre-tokenizer regex that backtracks past Oniguruma's limit makes the tokenizers crate panic
/// while encoding; tokenize reports it as an error naming tokenizer.json.
#[test]
fn a_tokenizer_whose_regex_backtracks_without_end_is_an_error() {
    let d = tmpdir("tk_redos");
    let tj = write_tokenizer(&d);
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    tok["pre_tokenizer"] = serde_json::json!({"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": false});
    std::fs::write(&tj, tok.to_string()).unwrap();
    let a = d.join("a.txt");
    std::fs::write(&a, format!("{}!", "a".repeat(40))).unwrap();
    let mut opts = TokenizeOptions::new(vec![a], d.clone(), d.join("out"));
    opts.eos_id = Some(1);
    assert_file_err(tokenize(&opts, &mut |_| {}), &tj, &["tokenizer failed", "the library panicked", "retry-limit"]);
}
