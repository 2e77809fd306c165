//! `llmq plan` as a command-line tool: `--auto-memory` prints flags that repeat its choice, needs
//! `--memory-limit`, and output into a closed pipe (`llmq plan ... | head`) ends the process
//! quietly instead of with a panic; small GPU micro-batches run as CUDA graphs by default.

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

/// CUDA graphs are on by default for the small GPU micro-batches where they measured faster,
/// and say so; not for larger ones, on the CPU, with --no-cuda-graphs or with an option that a
/// graph cannot hold.
#[test]
fn small_gpu_micro_batches_run_as_graphs_by_default() {
    let memory_line = |extra: &[&str]| {
        let out = llmq(&[&["plan", "--model", "qwen2.5-0.5b", "--from-scratch", "--seq-len", "1024"], extra].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{extra:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout.lines().find(|l| l.trim_start().starts_with("memory")).expect("a memory line").to_string()
    };
    let default = "graphs per block (the default for small micro-batches; --no-cuda-graphs)";
    for (extra, graphs) in [
        (&["--batch-size", "4"][..], true),
        (&["--batch-size", "2", "--matmul-dtype", "e4m3"], true),
        (&["--batch-size", "4", "--matmul-dtype", "e4m3"], false),
        (&["--batch-size", "8"], false),
        (&["--batch-size", "4", "--no-cuda-graphs"], false),
        (&["--batch-size", "4", "--offload-residual"], false),
        (&["--batch-size", "4", "--device", "cpu"], false),
    ] {
        let line = memory_line(extra);
        assert_eq!(line.contains(default), graphs, "{extra:?}: {line}");
        assert!(graphs || !line.contains("graphs"), "{extra:?}: {line}");
    }
    // the default gives up the fp8 second-stream weight gradients, as --cuda-graphs does
    let fp8 = memory_line(&["--batch-size", "2", "--matmul-dtype", "e4m3"]);
    assert!(!fp8.contains("second stream"), "{fp8}");
    assert!(memory_line(&["--batch-size", "4", "--matmul-dtype", "e4m3"]).contains("second stream"));
    assert!(memory_line(&["--batch-size", "8", "--cuda-graphs"]).contains("graphs per block"));
    let both = llmq(&["plan", "--model", "tiny", "--from-scratch", "--cuda-graphs", "--no-cuda-graphs"]);
    assert!(!both.status.success() && String::from_utf8_lossy(&both.stderr).contains("--no-cuda-graphs"));
}

/// SIGPIPE's number on Linux.
const SIGPIPE: i32 = 13;
