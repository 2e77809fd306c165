//! The README's first command: `llmq train` with no options trains the embedded model on the
//! synthetic Markov corpus. It must finish and its final eval loss must come within 0.15 nats of
//! the printed entropy floor (a run on 2 CPU cores gets to about 0.07 in 250 steps; the margin
//! covers the eval estimate's sampling noise of about ±0.02 and thread-timing-free variation).

use std::process::Command;

#[test]
fn default_run_approaches_the_entropy_floor() {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(["train", "--device", "cpu"])
        .output()
        .expect("run llmq");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "llmq train failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("llmq train") && stdout.contains("memory (cpu)"),
        "resolved config / memory plan not printed:\n{stdout}"
    );
    let done = stdout
        .lines()
        .find(|l| l.starts_with("done:"))
        .expect("no final line");
    // "done: final eval loss 1.4272, 0.0712 nats above the entropy floor 1.3560"
    let nums: Vec<f64> = done
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .filter_map(|s| s.parse().ok())
        .collect();
    let (eval, gap, floor) = (nums[0], nums[1], nums[2]);
    assert!(floor > 0.5 && floor < 3.0, "implausible floor {floor}");
    assert!((eval - floor - gap).abs() < 1e-3);
    assert!(
        gap < 0.15,
        "final eval loss {eval} is {gap} nats above the floor {floor}"
    );
    assert!(
        gap > -0.05,
        "eval loss {eval} below the entropy floor {floor}: the floor or the loss is wrong"
    );
    // the first logged loss is near ln(256) (uniform prediction)
    let first = stdout
        .lines()
        .find(|l| l.starts_with("step      1/"))
        .unwrap();
    assert!(
        first.contains("loss 5."),
        "first step should start near ln 256 = 5.55: {first}"
    );
}

#[test]
fn bad_options_are_refused_with_a_reason() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(&["train", "--device", "cpu", "--batch-size", "0"]).contains("--batch-size"));
    assert!(run(&["train", "--device", "cpu", "--lr-schedule", "step"]).contains("--lr-schedule"));
    assert!(
        run(&["train", "--device", "cpu", "--model", "qwen2.5-0.5b"]).contains("--from-scratch")
    );
    assert!(
        run(&["train", "--device", "cpu", "--warmup", "500", "--steps", "100"])
            .contains("--warmup")
    );
    assert!(run(&["train", "--device", "cpu", "--model-dtype", "e4m3"]).contains("--model-dtype"));
    assert!(run(&["train", "--device", "nope"]).contains("--device"));
}

#[test]
fn fit_batch_on_the_cpu_keeps_the_configured_micro_batch_and_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(["train", "--device", "cpu", "--fit-batch", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "32"])
        .args(["--grad-accumulation", "4", "--eval-every", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("fit-batch  not applied: the CPU backend"), "{stdout}");
    assert!(stdout.contains("B=2 T=32 accumulation=4 -> 256 tokens/step"), "{stdout}");
}

/// `--profile` prints a per-op time table whose shares add up to the whole (every op of the
/// model, the optimizer and the transfers is timed once).
#[test]
fn profile_prints_a_per_op_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(["train", "--device", "cpu", "--steps", "2", "--profile", "--eval-every", "0"])
        .output()
        .expect("run llmq");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("(profiled)") && stdout.contains("profile:"), "{stdout}");
    let rows: Vec<(f64, String)> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("profile:"))
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pct = f.get(2)?.strip_suffix('%')?.parse().ok()?;
            Some((pct, f[4..].join(" ")))
        })
        .collect();
    let ops: Vec<&str> = rows.iter().map(|(_, op)| op.as_str()).collect();
    for want in ["attention_fwd", "attention_bwd", "adamw", "cross_entropy", "embedding_bwd"] {
        assert!(ops.contains(&want), "{want} missing from {ops:?}");
    }
    assert!(ops.iter().any(|o| o.starts_with("matmul ")), "{ops:?}");
    let total: f64 = rows.iter().map(|(p, _)| p).sum();
    assert!((total - 100.0).abs() < 1.0, "shares add up to {total}%: {rows:?}");
}

/// `--check-streams` runs the step under the stream-order checker: fp8 with its side-stream
/// weight gradients passes, and the numbers are those of the unchecked run.
#[test]
fn check_streams_passes_and_leaves_the_numbers_alone() {
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--device", "cpu", "--steps", "3", "--matmul-dtype", "e4m3", "--eval-every", "0", "--print-every", "1"];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_llmq")).args(&args).output().expect("run llmq");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let losses = |s: &str| -> Vec<String> { s.lines().filter(|l| l.starts_with("step")).map(|l| l.split('|').nth(2).unwrap_or("").trim().to_string()).collect() };
    let checked = run(&["--check-streams"]);
    assert!(checked.contains("(stream-checked)") && checked.contains("weight gradients on a second stream"), "{checked}");
    let plain = run(&[]);
    assert_eq!(losses(&checked), losses(&plain));
    assert_eq!(losses(&plain).len(), 3, "{plain}");
}
