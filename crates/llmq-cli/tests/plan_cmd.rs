//! `llmq plan` as a command-line tool: `--auto-memory` prints flags that repeat its choice, needs
//! `--memory-limit`, and output into a closed pipe (`llmq plan ... | head`) ends the process
//! quietly instead of with a panic.

use std::process::{Command, Stdio};

fn llmq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llmq")).args(args).output().unwrap()
}

const TINY: [&str; 11] = ["plan", "--device", "cpu", "--model", "tiny", "--from-scratch", "--batch-size", "64", "--seq-len", "32", "--memory-limit=16MiB"];

#[test]
fn auto_memory_prints_flags_that_give_the_same_plan() {
    let auto = llmq(&[&TINY[..], &["--auto-memory"]].concat());
    let stdout = String::from_utf8_lossy(&auto.stdout).into_owned();
    assert!(auto.status.success(), "{stdout}{}", String::from_utf8_lossy(&auto.stderr));
    let flags = stdout.lines().find_map(|l| l.strip_prefix("auto-memory: ")).expect("an auto-memory line");
    assert!(flags.starts_with("--batch-size ") && !flags.starts_with("--batch-size 64 "), "{flags}");
    let by_hand = llmq(&[&TINY[..], &flags.split_whitespace().collect::<Vec<_>>()].concat());
    assert!(by_hand.status.success(), "{}", String::from_utf8_lossy(&by_hand.stderr));
    // the plan printed after the choice is the plan of the flags given by hand
    let plan_of = |s: &str| s.lines().skip_while(|l| !l.starts_with("llmq plan:")).collect::<Vec<_>>().join("\n");
    assert_eq!(plan_of(&stdout), plan_of(&String::from_utf8_lossy(&by_hand.stdout)));

    let unlimited = llmq(&TINY[..TINY.len() - 1]).status.success();
    let no_limit = llmq(&[&TINY[..TINY.len() - 1], &["--auto-memory"]].concat());
    assert!(unlimited && !no_limit.status.success());
    assert!(String::from_utf8_lossy(&no_limit.stderr).contains("llmq plan --auto-memory needs --memory-limit"));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // auto-memory for 3B searches for a while before its first line: the pipe is closed by then
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(["plan", "--model", "qwen2.5-3b", "--from-scratch", "--memory-limit", "80GiB", "--auto-memory", "--verbose"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(SIGPIPE), "{:?} {stderr}", out.status);
}

/// SIGPIPE's number on Linux.
const SIGPIPE: i32 = 13;
