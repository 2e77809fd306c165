//! Bad outputs and bad tokens are found before the first step, not after hours of training.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn llmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmq")).args(args).output().unwrap()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmq-pre-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const RUN: [&str; 13] =
    ["train", "--device", "cpu", "--model", "tiny", "--from-scratch", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every=0"];

/// Fails before the first step, with a message holding every piece of `want`.
fn fails_up_front(extra: &[&str], want: &[&str]) {
    let args: Vec<&str> = RUN.iter().copied().chain(extra.iter().copied()).collect();
    let out = llmq(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail: {stdout}");
    assert!(!stdout.contains("step      1/"), "failed only after training: {stdout}");
    for w in want {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
}

#[test]
fn unwritable_outputs_are_refused_before_the_first_step() {
    // a path below a regular file cannot be created, even by root (CI runs as root)
    let d = tmpdir("outputs");
    let file = d.join("somefile");
    std::fs::write(&file, b"x").unwrap();
    let under = |n: &str| file.join(n).to_str().unwrap().to_string();
    fails_up_front(&["--ckpt-dir", &under("ck")], &["--ckpt-dir", "cannot create", "somefile/ck"]);
    fails_up_front(&["--export", &under("hf")], &["--export", "cannot create", "somefile/hf"]);
    fails_up_front(&["--log-file", &under("log/run.jsonl")], &["--log-file", "somefile/log"]);
    let _ = std::fs::remove_dir_all(&d);
}

/// A version-2 token file whose header says vocab_size 512, whatever ids it holds (the writer
/// refuses ids beyond the header, so the header is patched).
fn token_file(path: &Path, tokens: &[i32]) {
    llmq_io::tokfile::write_token_file(path, tokens, None, Some(i32::MAX as u32)).unwrap();
    let mut b = std::fs::read(path).unwrap();
    b[20..24].copy_from_slice(&512i32.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn token_ids_outside_the_vocabulary_are_found_before_the_first_step() {
    let d = tmpdir("tokens");
    // the header says 512 (the model's vocabulary, built from scratch) but an id is beyond it; the
    // bad id is in the last chunk, which a two-step run would never read
    let mut toks: Vec<i32> = (0..4000).map(|i| i % 256).collect();
    toks[3990] = 600;
    let f = d.join("bad.bin");
    token_file(&f, &toks);
    fails_up_front(&["--train-file", f.to_str().unwrap()], &["bad.bin", "id 600", "position 3990", "0..512"]);
    // the same for an eval file
    let good = d.join("good.bin");
    token_file(&good, &toks[..3000]);
    fails_up_front(&["--train-file", good.to_str().unwrap(), "--eval-file", f.to_str().unwrap()], &["bad.bin", "id 600"]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_log_on_a_full_disk_warns_once() {
    if !Path::new("/dev/full").exists() {
        println!("SKIPPED: no /dev/full on this system");
        return;
    }
    let args: Vec<&str> = RUN.iter().copied().chain(["--log-file", "/dev/full"]).collect();
    let out = llmq(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("could not write to log /dev/full").count(), 1, "{stderr}");
}

/// A run larger than the machine is refused with its memory plan before anything is allocated:
/// a huge micro-batch against the RAM available (the CPU backend's device memory), and a huge
/// micro-batch under `--memory-limit`, which also names options that would fit.
#[test]
fn a_run_larger_than_memory_is_refused_with_its_plan() {
    let huge = llmq(&["train", "--device", "cpu", "--model", "tiny", "--from-scratch", "--steps", "1", "--batch-size", "100000"]);
    let stderr = String::from_utf8_lossy(&huge.stderr);
    assert!(!huge.status.success() && !String::from_utf8_lossy(&huge.stdout).contains("step "));
    for w in ["of device memory", "more than the RAM available", "activations"] {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
    fails_up_front(&["--memory-limit", "10MiB"], &["more than what --memory-limit leaves", "options that would fit", "--offload-opt-m --offload-opt-v"]);
}

/// A config with a million layers is refused quickly, naming the field or the memory it needs.
#[test]
fn a_model_of_a_million_layers_is_refused_quickly() {
    let dir = tmpdir("million");
    let cfg = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1000000, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true}"#;
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let started = std::time::Instant::now();
    let out = llmq(&["train", "--device", "cpu", "--model", dir.to_str().unwrap(), "--from-scratch", "--steps", "1", "--seq-len", "16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("num_hidden_layers") || stderr.contains("of device memory"), "{stderr}");
    assert!(started.elapsed().as_secs() < 60, "took {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--model tiny --from-scratch` on token files of a larger tokenizer trains with the headers'
/// vocabulary (the ids beyond 256 included) and says where the vocabulary came from.
#[test]
fn a_shape_from_scratch_trains_with_the_vocabulary_of_its_token_files() {
    let d = tmpdir("vocab");
    let toks: Vec<i32> = (0..4000).map(|i| (i * 7919) % 1000).collect();
    let f = d.join("train.bin");
    llmq_io::tokfile::write_token_file(&f, &toks, None, Some(1000)).unwrap();
    let args: Vec<&str> = RUN.iter().copied().chain(["--train-file", f.to_str().unwrap()]).collect();
    let out = llmq(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("V=1000") && stdout.contains("vocabulary 1000 from the token files' headers"), "{stdout}");
    assert!(stdout.contains("step      2/"), "{stdout}");
    let _ = std::fs::remove_dir_all(&d);
}

/// A second run into the checkpoint directory of a live run is refused, naming the first; once
/// the first is killed (no clean exit), the directory is free again.
#[test]
fn a_checkpoint_directory_takes_one_run_at_a_time() {
    use std::io::{BufRead, BufReader};
    let d = tmpdir("lock");
    let ck = d.join("ck");
    let ck = ck.to_str().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(["train", "--device", "cpu", "--model", "tiny", "--from-scratch", "--steps", "1000000", "--batch-size", "2", "--seq-len", "16", "--eval-every=0", "--print-every", "1", "--ckpt-dir", ck])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the lock is taken before the first step
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().starts_with("step ")), "the first run did not start");
    let second = llmq(&["train", "--device", "cpu", "--model", "tiny", "--from-scratch", "--steps", "1", "--ckpt-dir", ck]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!second.status.success() && stderr.contains(&format!("in use by another run (pid {} on ", first.id())), "{stderr}");
    let third = llmq(&["train", "--device", "cpu", "--model", "tiny", "--from-scratch", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every=0", "--ckpt-dir", ck]);
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
    let _ = std::fs::remove_dir_all(&d);
}
