//! Helpers of the command-line tests: running the binary, temporary directories, a small
//! token dataset and the step records of a JSON log.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn llmq(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "llmq {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn llmq_err(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "llmq {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// A command line written as one string, plus arguments that are paths.
pub fn cmd<'a>(line: &'a str, paths: &[&'a str]) -> Vec<&'a str> {
    line.split_whitespace().chain(paths.iter().copied()).collect()
}

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmq-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Two token files of pseudo-random tokens below 256 (about 9 batches per epoch at B=4, T=32).
pub fn dataset(dir: &Path) -> String {
    let mut x = 12345u64;
    for f in 0..2 {
        let toks: Vec<i32> = (0..600 + 37 * f)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % 256) as i32
            })
            .collect();
        llmq_io::tokfile::write_token_file(
            &dir.join(format!("train_{f}.bin")),
            &toks,
            None,
            Some(256),
        )
        .unwrap();
    }
    format!("{}/train_*.bin", dir.display())
}

/// (step, loss, norm) records of a JSON-lines log, as text (serde_json prints shortest
/// round-trip floats, so equal text means equal bits).
pub fn steps(log: &Path) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["type"] == "step").then(|| {
                (
                    v["step"].as_u64().unwrap(),
                    v["loss"].to_string(),
                    v["norm"].to_string(),
                )
            })
        })
        .collect()
}


/// Runs `llmq ARGS`, sends SIGTERM once it printed step 3, and returns its exit status and the
/// lines it printed after that.
pub fn sigterm_after_step_3(args: &[&str]) -> (std::process::ExitStatus, Vec<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmq")).args(args).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // wait until training runs, then ask it to stop
    for l in lines.by_ref() {
        if l.unwrap().starts_with("step      3/") {
            break;
        }
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    (child.wait().unwrap(), rest)
}
