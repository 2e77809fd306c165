//! `llmq tokenize` as a process: `--chat` reads conversations from `messages` and reports the
//! mask; a tokenizer that panics inside its library is an error naming the file, with nothing
//! of the panic on stderr but the error.
use std::process::Command;

#[test]
fn chat_flag_reads_messages_and_writes_a_mask() {
    let d = std::env::temp_dir().join(format!("llmq-cli-tokenize-chat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let special = |id: u32, s: &str| serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "post_processor": null, "decoder": null,
        "added_tokens": [special(4, "<|endoftext|>"), special(5, "<|im_start|>"), special(6, "<|im_end|>")],
        "pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "WordLevel", "vocab": {"user": 0, "assistant": 1, "hi": 2, "there": 3}, "unk_token": "hi"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let tmpl = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    std::fs::write(d.join("tokenizer_config.json"), serde_json::json!({"chat_template": tmpl}).to_string()).unwrap();
    let j = d.join("c.jsonl");
    let conv = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi there"}]}"#;
    std::fs::write(&j, format!("{conv}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(["tokenize", "--chat", j.to_str().unwrap(), "--tokenizer", d.to_str().unwrap(), "-o", d.join("o").to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // <|im_start|> user hi <|im_end|> <|im_start|> assistant [hi there <|im_end|>] <|endoftext|>
    assert!(stdout.contains("3 assistant tokens trained (loss mask 1), 7 masked"), "{stdout}");
    let data = llmq_io::tokfile::read_token_file(&d.join("o/out_000.bin"), None).unwrap();
    assert_eq!(data.tokens, [5, 0, 2, 6, 5, 1, 2, 3, 6, 4]);
    assert_eq!(data.mask.unwrap(), [false, false, false, false, false, false, true, true, true, false]);
}

#[test]
fn a_panicking_tokenizer_is_one_clean_error() {
    let d = std::env::temp_dir().join(format!("llmq-cli-tokenize-panic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    // a pre-tokenizer regex past Oniguruma's backtracking limit: the tokenizers crate panics
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "post_processor": null, "decoder": null,
        "added_tokens": [],
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": false},
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "b"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let text = d.join("a.txt");
    std::fs::write(&text, format!("{}!", "a".repeat(40))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(["tokenize", text.to_str().unwrap(), "--tokenizer", d.to_str().unwrap(), "-o", d.join("o").to_str().unwrap(), "--eos-id", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("tokenizer.json") && stderr.contains("the library panicked at ") && stderr.contains("retry-limit"), "{stderr}");
    // the default panic hook's report ("thread '...' panicked at ...", the backtrace note) is not printed
    assert!(!stderr.contains("thread '") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
}
