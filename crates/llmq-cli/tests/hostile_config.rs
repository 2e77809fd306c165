//! Hostile model configs: every numeric field of config.json set to each edge value (zero,
//! negative, fractional, huge, out of the integer types' ranges). `llmq plan` and a one-step
//! `llmq train` on such a directory either work or stop with an error that names config.json, the
//! memory the model needs or the option it conflicts with: never a panic, a signal or a hang.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "head_dim": 16,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true}"#;

const EDGES: [&str; 11] = ["0", "-1", "0.5", "1e-30", "1e30", "3", "2147483648", "4294967296", "18446744073709551616", "null", "\"8\""];

const FIELDS: [&str; 10] = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
];

fn llmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmq")).args(args).output().unwrap()
}

/// `out` either succeeded or failed with exit code 1 and a message naming config.json, the
/// memory needed or the option the model's values conflict with.
fn clean(out: &Output, what: &str) -> bool {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    if out.status.success() {
        return true;
    }
    assert_eq!(out.status.code(), Some(1), "{what}: {:?} {stderr}", out.status);
    let named = ["config.json", "memory", "--"].iter().any(|w| stderr.contains(w));
    assert!(stderr.starts_with("error: ") && named, "{what}: the error names neither the file, the memory nor an option: {stderr}");
    false
}

#[test]
fn every_numeric_field_at_every_edge_is_used_or_refused_cleanly() {
    let dir = std::env::temp_dir().join(format!("llmq-hostile-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let started = Instant::now();
    let mut trained = 0;
    for field in FIELDS {
        for edge in EDGES {
            let from = format!("\"{field}\": ");
            let at = CONFIG.find(&from).unwrap() + from.len();
            let end = at + CONFIG[at..].find([',', '}']).unwrap();
            std::fs::write(dir.join("config.json"), format!("{}{edge}{}", &CONFIG[..at], &CONFIG[end..])).unwrap();
            let what = format!("{field} = {edge}");
            if !clean(&llmq(&["plan", "--device", "cpu", "--model", d, "--from-scratch", "--seq-len", "16", "--batch-size", "2"]), &what) {
                continue;
            }
            let t = Instant::now();
            let run = llmq(&["train", "--device", "cpu", "--model", d, "--from-scratch", "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-every=0"]);
            trained += clean(&run, &what) as usize;
            assert!(t.elapsed() < Duration::from_secs(60), "{what}: one step took {:?}", t.elapsed());
        }
    }
    // the unchanged values among the edges ("3" layers, say) train
    assert!(trained > 0);
    assert!(started.elapsed() < Duration::from_secs(300), "took {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
