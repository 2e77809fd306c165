//! `llmq train --gpus N` with `--device cpu`: N ranks as threads. Two ranks match one rank with
//! twice the accumulation (within tolerance), ZeRO levels and memory options match bitwise, a
//! checkpoint of two ranks resumes under one, two and four, a signal stops every rank.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const BASE: &str = "train --device cpu --model tiny --from-scratch --batch-size 2 --seq-len 16 --eval-every 0 --print-every 1";

fn run(extra: &str, data: &str, log: &Path) -> String {
    let mut args = cmd(BASE, &["--train-file", data, "--log-file", log.to_str().unwrap()]);
    args.extend(extra.split_whitespace());
    llmq(&args)
}

fn close(a: &[(u64, String, String)], b: &[(u64, String, String)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        let f = |s: &str| s.parse::<f64>().unwrap();
        assert_eq!(x.0, y.0, "{what}");
        assert!((f(&x.1) - f(&y.1)).abs() <= 1e-4 * f(&y.1).abs(), "{what}: step {} loss {} vs {}", x.0, x.1, y.1);
        assert!((f(&x.2) - f(&y.2)).abs() <= 1e-3 * f(&y.2).abs(), "{what}: step {} norm {} vs {}", x.0, x.2, y.2);
    }
}

#[test]
fn two_ranks_match_one_rank_with_twice_the_accumulation() {
    let d = tmpdir("ranks2");
    let data = dataset(&d);
    let out = run("--steps 6 --gpus 2", &data, &d.join("two.jsonl"));
    assert!(out.contains("accumulation=1 x 2 ranks -> 64 tokens/step") && out.contains("2 ranks as threads") && out.contains("ZeRO-1"), "{out}");
    assert_eq!(out.matches("step      6/6").count(), 1, "one rank prints: {out}");
    run("--steps 6 --grad-accumulation 2", &data, &d.join("one.jsonl"));
    close(&steps(&d.join("two.jsonl")), &steps(&d.join("one.jsonl")), "2 ranks vs 1 rank x 2");
    // ZeRO levels and memory options do not change the numbers
    for extra in [
        "--zero-level 2",
        "--zero-level 3",
        "--shard-weights --stream-weights --offload-opt-m --recompute-block",
        "--zero-level 2 --offload-gradients --offload-residual",
        "--all-to-all-reduce",
        "--zero-level 3 --all-to-all-reduce",
    ] {
        let log = d.join("other.jsonl");
        let _ = std::fs::remove_file(&log);
        let out = run(&format!("--steps 6 --gpus 2 {extra}"), &data, &log);
        assert_eq!(steps(&log), steps(&d.join("two.jsonl")), "{extra}");
        assert_eq!(out.contains("reduce-scatters by all-to-all"), extra.contains("--all-to-all-reduce"), "{extra}: {out}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_two_rank_checkpoint_resumes_under_one_two_and_four_ranks() {
    let d = tmpdir("ranks-resume");
    let data = dataset(&d);
    let ck = d.join("ck");
    let ckp = ck.to_str().unwrap();
    run("--steps 8 --gpus 2 --grad-accumulation 2", &data, &d.join("straight.jsonl"));
    let straight = steps(&d.join("straight.jsonl"));
    run(&format!("--steps 8 --gpus 2 --grad-accumulation 2 --stop-at 4 --ckpt-dir {ckp}"), &data, &d.join("first.jsonl"));
    assert_eq!(steps(&d.join("first.jsonl")), straight[..4]);
    // the same two ranks under ZeRO-3: bitwise
    let log = d.join("zero3.jsonl");
    let out = run(&format!("--steps 8 --gpus 2 --grad-accumulation 2 --zero-level 3 --ckpt-dir {ckp} --continue 4"), &data, &log);
    assert!(out.contains("resumed from"), "{out}");
    assert_eq!(steps(&log), straight[4..]);
    for (gpus, accum) in [(1, 4), (4, 1)] {
        let log = d.join(format!("g{gpus}.jsonl"));
        run(&format!("--steps 8 --gpus {gpus} --grad-accumulation {accum} --ckpt-dir {ckp} --continue 4"), &data, &log);
        close(&steps(&log), &straight[4..], &format!("{gpus} ranks x {accum}"));
    }
    let err = llmq_err(&cmd(BASE, &["--train-file", &data, "--steps", "8", "--gpus", "2", "--ckpt-dir", ckp, "--continue", "4"]));
    assert!(err.contains("2 x 2 = 4, now 1 x 2 = 2") && err.contains("--grad-accumulation 2"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn rank_options_that_cannot_work_are_refused() {
    for n in ["0", "4097", "4294967297"] {
        let err = llmq_err(&cmd(BASE, &["--steps", "2", "--gpus", n]));
        assert!(err.contains(&format!("invalid value '{n}' for '--gpus <GPUS>': {n} is not in 1..=4096")), "{err}");
    }
    let err = llmq_err(&cmd(BASE, &["--steps", "2", "--gpus", "2", "--fit-batch"]));
    assert!(err.contains("--fit-batch") && err.contains("--gpus"), "{err}");
    let err = llmq_err(&cmd(BASE, &["--steps", "2", "--gpus", "2", "--zero-level", "4"]));
    assert!(err.contains("--zero-level"), "{err}");
    let err = llmq_err(&cmd(BASE, &["--steps", "2", "--gpus", "2", "--zero-level", "3", "--offload-quants", "--matmul-dtype", "e4m3"]));
    assert!(err.contains("--offload-quants") && err.contains("--persistent-quants"), "{err}");
    let err = llmq_err(&cmd(BASE, &["--steps", "2", "--all-to-all-reduce"]));
    assert!(err.contains("--all-to-all-reduce") && err.contains("--gpus N (N > 1)"), "{err}");
    let err = llmq_err(&cmd(BASE, &["--steps", "2", "--gpus", "2", "--memcpy-all-gather"]));
    assert!(err.contains("--memcpy-all-gather") && err.contains("--device cuda"), "{err}");
    let err = llmq_err(&cmd(BASE, &["--steps", "2", "--gpus", "2", "--collectives", "nccl"]));
    assert!(err.contains("--collectives nccl needs --device cuda"), "{err}");
}

/// `llmq train` with launcher variables set (one process per GPU).
fn launched(vars: &[(&str, &str)], extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq")).args(cmd(BASE, &["--steps", "2"])).args(extra).envs(vars.iter().copied()).output().unwrap();
    assert!(!out.status.success(), "should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_launch_of_one_process_per_gpu_needs_nccl_and_a_complete_environment() {
    let env = [("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
    let err = launched(&env, &[]);
    assert!(err.contains("one process per GPU runs on NCCL") && err.contains("--gpus N"), "{err}");
    let err = launched(&env, &["--gpus", "2"]);
    assert!(err.contains("leave out --gpus"), "{err}");
    let err = launched(&env[..2], &[]);
    assert!(err.contains("partly set") && err.contains("LOCAL_RANK"), "{err}");
    let err = launched(&[("RANK", "3"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], &[]);
    assert!(err.contains("RANK=3"), "{err}");
}

#[test]
fn a_signal_stops_every_rank_at_the_same_step_with_one_checkpoint() {
    let d = tmpdir("ranks-sigterm");
    let ck = d.join("ck");
    let (status, rest) = sigterm_after_step_3(&cmd(BASE, &["--steps", "100000", "--gpus", "3", "--ckpt-dir", ck.to_str().unwrap()]));
    assert!(status.success(), "exit status {status:?}; output: {rest:?}");
    let text = rest.join("\n");
    assert!(text.contains("signal received") && text.matches("checkpoint ").count() == 1, "{text}");
    let (step, dir) = llmq_io::ckpt::latest_complete(&ck).unwrap().expect("a complete checkpoint");
    assert!((3..100000).contains(&step), "checkpoint at step {step}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(state["state"]["world_size"], 3);
    let _ = std::fs::remove_dir_all(&d);
}
