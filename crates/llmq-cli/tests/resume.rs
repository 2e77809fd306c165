//! Runs that survive stops: N steps, stop, resume in a new process, N more steps gives bitwise
//! the same losses and gradient norms as 2N steps straight (crossing epoch boundaries of a
//! multi-file token dataset); damaged checkpoints are never resumed from; export loads back.

use std::path::Path;
use std::process::Command;

mod common;

use common::*;

#[test]
fn stop_and_resume_is_bitwise_exact() {
    let d = tmpdir("resume");
    let data = dataset(&d);
    let common = |log: &Path, ck: &Path| -> Vec<String> {
        [
            "train",
            "--device",
            "cpu",
            "--model",
            "tiny",
            "--from-scratch",
            "--train-file",
            &data,
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--steps",
            "20",
            "--warmup",
            "3",
            "--eval-every",
            "0",
            "--print-every",
            "5",
            "--log-file",
            log.to_str().unwrap(),
            "--ckpt-dir",
            ck.to_str().unwrap(),
            "--model-dtype",
            "fp32",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // straight
    let straight = common(&d.join("a.jsonl"), &d.join("ck_a"));
    llmq(&as_refs(&straight));
    // stopped at 9 (mid-epoch) and resumed in a new process
    let mut first = common(&d.join("b.jsonl"), &d.join("ck_b"));
    first.extend([
        "--stop-at".into(),
        "9".into(),
        "--ckpt-interval".into(),
        "4".into(),
    ]);
    let out = llmq(&as_refs(&first));
    assert!(out.contains("step_00000009"), "{out}");
    let mut second = common(&d.join("b.jsonl"), &d.join("ck_b"));
    second.push("--continue".into());
    let out = llmq(&as_refs(&second));
    assert!(
        out.contains("resumed from") && out.contains("at step 9"),
        "{out}"
    );
    let a = steps(&d.join("a.jsonl"));
    let b = steps(&d.join("b.jsonl"));
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "resumed run differs from the straight run");

    // retention: interval 4 up to 9 wrote 4, 8, then 9 at the stop and 20 at the end; keep_last 3
    let kept: Vec<String> = std::fs::read_dir(d.join("ck_b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert!(
        kept.contains(&"step_00000020".to_string()) && !kept.contains(&"step_00000004".to_string()),
        "{kept:?}"
    );

    // a damaged newest checkpoint is skipped by --continue, and refused when named explicitly
    let newest = d.join("ck_b/step_00000020");
    let victim = std::fs::read_dir(&newest)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("master"))
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[10] ^= 0xFF;
    std::fs::write(&victim, bytes).unwrap();
    let mut explicit = common(&d.join("c.jsonl"), &d.join("ck_b"));
    explicit.extend(["--continue".into(), newest.to_str().unwrap().into()]);
    let err = llmq_err(&as_refs(&explicit));
    assert!(err.contains("step_00000020"), "{err}");
    let mut again = common(&d.join("c.jsonl"), &d.join("ck_b"));
    again.push("--continue".into());
    let out = llmq(&as_refs(&again));
    assert!(
        out.contains("at step 9"),
        "should fall back to step 9: {out}"
    );
    assert!(out.contains("--continue: skipped") && out.contains("step_00000020") && out.contains("corrupt"), "says what it skipped: {out}");
    // incompatible run: names the field
    let mut other = common(&d.join("c.jsonl"), &d.join("ck_b"));
    let i = other.iter().position(|a| a == "--batch-size").unwrap();
    other[i + 1] = "2".into();
    other.extend(["--continue".into(), "9".into()]);
    let err = llmq_err(&as_refs(&other));
    assert!(err.contains("batch_size"), "{err}");
    // so is one with other kernel choices (they change the last bits on a GPU)
    let mut other = common(&d.join("c.jsonl"), &d.join("ck_b"));
    other.extend(["--attention".into(), "mma".into(), "--continue".into(), "9".into()]);
    let err = llmq_err(&as_refs(&other));
    assert!(err.contains("backend.attention"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn export_writes_a_loadable_hf_model() {
    let d = tmpdir("export");
    let out = d.join("hf");
    let ck_dir = d.join("ck");
    llmq(&cmd(
        "train --device cpu --model tiny --from-scratch --steps 3 --batch-size 2 --seq-len 16 --warmup 1 --export-dtype fp32",
        &["--export", out.to_str().unwrap(), "--ckpt-dir", ck_dir.to_str().unwrap()],
    ));
    // the exported directory is a model llmq can load, with the same weights as the checkpoint
    let cfg = llmq_io::hf::load_config(&out).unwrap();
    let loaded = llmq_io::hf::load_weights(&out, &cfg).unwrap();
    let ck = llmq_io::ckpt::resolve_continue(&ck_dir, None).unwrap();
    let (cfg2, groups) = llmq_train::checkpoint::model_config(&ck).unwrap();
    assert_eq!(cfg, cfg2);
    assert_eq!(loaded, groups);
    // and `llmq export` from the checkpoint gives the same files
    let out2 = d.join("hf2");
    llmq(&cmd("export --dtype fp32", &[ck.to_str().unwrap(), "-o", out2.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out2.join("model.safetensors")).unwrap()
    );
    // training continues from the exported weights
    let o = llmq(&cmd("train --device cpu --steps 2 --batch-size 2 --seq-len 16 --warmup 1", &["--model", out.to_str().unwrap()]));
    assert!(o.contains("loaded weights from"), "{o}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_zero() {
    let d = tmpdir("sigterm");
    let ck = d.join("ck");
    let (status, rest) = sigterm_after_step_3(&cmd(
        "train --device cpu --model tiny --from-scratch --steps 100000 --batch-size 2 --seq-len 16 --print-every 1 --eval-every 0 --ckpt-dir",
        &[ck.to_str().unwrap()],
    ));
    assert!(status.success(), "exit status {status:?}; output: {rest:?}");
    let text = rest.join("\n");
    assert!(
        text.contains("signal received") && text.contains("checkpoint"),
        "{text}"
    );
    let (step, _) = llmq_io::ckpt::latest_complete(&ck)
        .unwrap()
        .expect("a complete checkpoint");
    assert!((3..100000).contains(&step), "checkpoint at step {step}");
    let _ = std::fs::remove_dir_all(&d);
}

fn ckpt_steps(root: &Path) -> Vec<u64> {
    llmq_io::ckpt::list_complete(root).unwrap()
}

#[test]
fn keep_last_zero_keeps_all_and_one_is_refused() {
    let d = tmpdir("keep0");
    let ck = d.join("kl");
    let base = "train --device cpu --model tiny --from-scratch --steps 20 --batch-size 2 --seq-len 16 --eval-every 0 --ckpt-interval 5";
    llmq(&cmd(base, &["--ckpt-dir", ck.to_str().unwrap(), "--keep-last", "0"]));
    assert_eq!(ckpt_steps(&ck), vec![5, 10, 15, 20]);
    let err = llmq_err(&cmd(base, &["--ckpt-dir", ck.to_str().unwrap(), "--keep-last", "1"]));
    assert!(err.contains("--keep-last 1") && err.contains("at least two"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn resuming_an_older_step_sets_the_abandoned_branch_aside_and_latest_follows_the_new_line() {
    let d = tmpdir("rollback");
    let ck = d.join("ck");
    let ckp = ck.to_str().unwrap();
    let base = "train --device cpu --model tiny --from-scratch --steps 20 --batch-size 2 --seq-len 16 --eval-every 0 --ckpt-interval 5";
    llmq(&cmd(base, &["--ckpt-dir", ckp]));
    assert_eq!(ckpt_steps(&ck), vec![10, 15, 20]);
    // roll back to 10 and stop at 12: 15 and 20 belong to the abandoned branch
    let out = llmq(&cmd(base, &["--ckpt-dir", ckp, "--continue", "10", "--stop-at", "12"]));
    assert!(out.contains("set aside step_00000015") && out.contains("abandoned branch"), "{out}");
    assert_eq!(ckpt_steps(&ck), vec![10, 12]);
    let aside: Vec<_> = std::fs::read_dir(ck.join("abandoned")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(llmq_io::ckpt::list_complete(&aside[0]).unwrap(), vec![15, 20], "kept, not deleted");
    // a plain --continue picks the new line's 12, not the abandoned 20
    let out = llmq(&cmd(base, &["--ckpt-dir", ckp, "--continue", "--stop-at", "13"]));
    assert!(out.contains("at step 12"), "{out}");
    let parent = llmq_io::ckpt::load_checkpoint(&ck.join("step_00000012")).unwrap().lineage;
    let child = llmq_io::ckpt::load_checkpoint(&ck.join("step_00000013")).unwrap().lineage;
    assert_eq!(child.parent(), Some(&(parent.run.clone(), 12)));
    // --drop-abandoned deletes instead of moving; the resumed checkpoint is never deleted
    let out = llmq(&cmd(base, &["--ckpt-dir", ckp, "--continue", "10", "--stop-at", "11", "--drop-abandoned", "--keep-last", "2"]));
    assert!(out.contains("deleted step_00000012"), "{out}");
    assert_eq!(ckpt_steps(&ck), vec![10, 11]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn continue_with_steps_below_the_checkpoint_says_so() {
    let d = tmpdir("below");
    let ck = d.join("ck");
    let base = "train --device cpu --model tiny --from-scratch --batch-size 2 --seq-len 16 --eval-every 0";
    llmq(&cmd(base, &["--ckpt-dir", ck.to_str().unwrap(), "--steps", "6"]));
    let err = llmq_err(&cmd(base, &["--ckpt-dir", ck.to_str().unwrap(), "--steps", "4", "--continue"]));
    assert!(err.contains("step 6") && err.contains("beyond the last step of this run (4"), "{err}");
    let out = llmq(&cmd(base, &["--ckpt-dir", ck.to_str().unwrap(), "--steps", "6", "--continue"]));
    assert!(out.contains("nothing to train"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Rewrites a checkpoint's manifest with `edit` and a matching commit record (as a deliberate
/// forger would), so that only the field checks can notice.
fn forge(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    edit(&mut m);
    let text = serde_json::to_vec_pretty(&m).unwrap();
    let commit = serde_json::json!({"manifest_bytes": text.len(), "manifest_xxh64": format!("{:016x}", llmq_io::ckpt::xxh64(&text))});
    std::fs::write(dir.join("manifest.json"), &text).unwrap();
    std::fs::write(dir.join("commit.json"), commit.to_string()).unwrap();
}

#[test]
fn manifest_fields_are_checked_against_the_tensors() {
    let d = tmpdir("forge");
    let ck = d.join("ck");
    llmq(&cmd("train --device cpu --model tiny --from-scratch --steps 2 --batch-size 2 --seq-len 16 --eval-every 0", &["--ckpt-dir", ck.to_str().unwrap()]));
    let step = ck.join("step_00000002");
    let backup = std::fs::read(step.join("manifest.json")).unwrap();
    let export = |out: &str| {
        let o = d.join(out);
        llmq_err(&cmd("export --dtype fp32", &[step.to_str().unwrap(), "-o", o.to_str().unwrap()]))
    };
    // an edit without a new commit record
    let text = String::from_utf8(backup.clone()).unwrap().replacen("\"step\": 2", "\"step\": 1", 1);
    std::fs::write(step.join("manifest.json"), text).unwrap();
    let err = export("e0");
    assert!(err.contains("does not match its commit record"), "{err}");
    // one layer fewer: export would drop a layer
    std::fs::write(step.join("manifest.json"), &backup).unwrap();
    forge(&step, |m| {
        let l = m["state"]["model"]["num_layers"].as_u64().unwrap();
        m["state"]["model"]["num_layers"] = (l - 1).into();
    });
    let err = export("e1");
    assert!(err.contains("num_layers") && err.contains("tensors"), "{err}");
    // a huge vocabulary is refused before anything is allocated
    std::fs::write(step.join("manifest.json"), &backup).unwrap();
    forge(&step, |m| m["state"]["model"]["vocab_size"] = 1_000_000_000_000u64.into());
    let err = export("e2");
    assert!(err.contains("vocab_size") && err.contains("1000000000000"), "{err}");
    // the state's step differs from the manifest's
    std::fs::write(step.join("manifest.json"), &backup).unwrap();
    forge(&step, |m| m["state"]["step"] = 7.into());
    let err = export("e3");
    assert!(err.contains("state field `step`"), "{err}");
    // more optimizer updates than steps
    std::fs::write(step.join("manifest.json"), &backup).unwrap();
    forge(&step, |m| m["state"]["updates"] = 3.into());
    let err = export("e4");
    assert!(err.contains("state field `updates`") && err.contains("step 2"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn resuming_on_different_data_of_the_same_name_and_size_is_refused_unless_allowed() {
    let d = tmpdir("datachange");
    let data = dataset(&d);
    let ck = d.join("ck");
    let base = "train --device cpu --model tiny --from-scratch --batch-size 2 --seq-len 16 --eval-every 0";
    llmq(&cmd(base, &["--train-file", &data, "--ckpt-dir", ck.to_str().unwrap(), "--steps", "2"]));
    // train_1.bin: the same size, one token different
    let f = d.join("train_1.bin");
    let mut toks = llmq_io::tokfile::read_token_file(&f, None).unwrap().tokens;
    toks[5] = (toks[5] + 1) % 256;
    llmq_io::tokfile::write_token_file(&f, &toks, None, Some(256)).unwrap();
    let resume = cmd(base, &["--train-file", &data, "--ckpt-dir", ck.to_str().unwrap(), "--steps", "4", "--continue"]);
    let err = llmq_err(&resume);
    assert!(err.contains("train_1.bin") && err.contains("fingerprint"), "{err}");
    let mut allowed = resume.clone();
    allowed.push("--allow-data-change");
    assert!(llmq(&allowed).contains("at step 2"));
    let _ = std::fs::remove_dir_all(&d);
}

/// A model name that is also a built-in shape loads from the local Hugging Face cache when the
/// cache holds it (pretrained, or its config with --from-scratch); without the cache entry the
/// name is the built-in shape, which needs --from-scratch.
#[test]
fn a_name_in_the_hf_cache_wins_over_the_built_in_shape() {
    let dir = tmpdir("hfcache");
    let hub = dir.join("hub");
    let snap = hub.join("models--Qwen--Qwen2.5-0.5B/snapshots/abc");
    std::fs::create_dir_all(&snap).unwrap();
    // a tiny exported model stands in for the real one
    llmq(&cmd("train --device cpu --steps 2 --batch-size 2 --seq-len 16 --eval-every 0 --export", &[snap.to_str().unwrap()]));
    let run = |extra: &[&str], cache: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_llmq"));
        c.args(["train", "--device", "cpu", "--model", "Qwen/Qwen2.5-0.5B", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0"]).args(extra);
        c.env("HF_HUB_CACHE", if cache { hub.as_path() } else { dir.as_path() });
        c.output().unwrap()
    };
    let out = run(&[], true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("models--Qwen--Qwen2.5-0.5B") && stdout.contains("pretrained weights") && stdout.contains("C=128"), "{stdout}");
    let scratch = String::from_utf8_lossy(&run(&["--from-scratch"], true).stdout).to_string();
    assert!(scratch.contains("config only, from scratch") && scratch.contains("C=128"), "{scratch}");
    let missing = run(&[], false);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("built-in shape") && err.contains("--from-scratch"), "{err}");
    // (planned, not trained: the real shape is half a billion parameters)
    let plan = Command::new(env!("CARGO_BIN_EXE_llmq")).args(["plan", "--model", "Qwen/Qwen2.5-0.5B", "--from-scratch"]).env("HF_HUB_CACHE", &dir).output().unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.contains("built-in shape Qwen/Qwen2.5-0.5B") && plan.contains("0.49B parameters"), "{plan}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint records where its model and tokenizer came from; `llmq export` copies that
/// tokenizer without being told, and warns where none is known.
#[test]
fn export_copies_the_tokenizer_the_checkpoint_records() {
    let d = tmpdir("export_tokenizer");
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let base = "train --device cpu --steps 2 --batch-size 2 --seq-len 16 --warmup 1 --eval-every 0 --ckpt-interval 1";
    let scratch = Command::new(env!("CARGO_BIN_EXE_llmq"))
        .args(cmd(&format!("{base} --model tiny --from-scratch"), &["--export", &p("m0"), "--ckpt-dir", &p("ck0")]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&scratch.stderr);
    assert!(scratch.status.success() && stderr.contains("will hold no tokenizer"), "{stderr}");
    let tokenizer = br#"{"stand-in": "copied byte for byte"}"#;
    std::fs::write(d.join("m0/tokenizer.json"), tokenizer).unwrap();
    std::fs::write(d.join("m0/tokenizer_config.json"), br#"{"eos_token": "x"}"#).unwrap();
    // --export at the end of a run copies the model's tokenizer too
    llmq(&cmd(base, &["--model", &p("m0"), "--ckpt-dir", &p("ck1"), "--export", &p("m1")]));
    assert_eq!(std::fs::read(d.join("m1/tokenizer.json")).unwrap(), tokenizer);

    let export = |ck: &str, out: &str, extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_llmq")).args(["export", ck, "-o", out]).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let (stdout, stderr) = export(&p("ck1/step_00000002"), &p("out1"), &[]);
    assert_eq!(std::fs::read(d.join("out1/tokenizer.json")).unwrap(), tokenizer);
    assert!(d.join("out1/tokenizer_config.json").is_file());
    assert!(stdout.contains("tokenizer files from") && stdout.contains("recorded in the checkpoint"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let src = llmq_train::setup::recorded_source(&d.join("ck1/step_00000001")).unwrap().unwrap();
    assert_eq!(src.tokenizer.as_deref(), Some(d.join("m0").as_path()));

    // from scratch: no tokenizer known, exported with a warning
    let (_, stderr) = export(&p("ck0/step_00000002"), &p("out0"), &[]);
    assert!(stderr.contains("warning: exported without a tokenizer") && stderr.contains("--tokenizer-from"), "{stderr}");
    assert!(!d.join("out0/tokenizer.json").exists());
    // unless one is named
    let (stdout, _) = export(&p("ck0/step_00000002"), &p("out2"), &["--tokenizer-from", &p("m0")]);
    assert_eq!(std::fs::read(d.join("out2/tokenizer.json")).unwrap(), tokenizer);
    assert!(stdout.contains("(--tokenizer-from)"), "{stdout}");
    // a recorded tokenizer that is gone is a warning
    std::fs::remove_file(d.join("m0/tokenizer.json")).unwrap();
    std::fs::remove_file(d.join("m0/tokenizer_config.json")).unwrap();
    let (_, stderr) = export(&p("ck1/step_00000002"), &p("out3"), &[]);
    assert!(stderr.contains("holds no tokenizer files any more") && stderr.contains("exported without a tokenizer"), "{stderr}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Runs appended to one log are told apart: every record carries the run id and the series (the
/// first run of its checkpoint line), a resumed run continues its series, a fresh run starts its
/// own; a partial line left by a killed run neither joins the next record nor stops `llmq plot`,
/// which draws one curve per series and overlays several logs.
#[test]
fn a_log_keeps_runs_apart_and_plot_draws_one_curve_per_run() {
    let d = tmpdir("log_runs");
    let log = d.join("run.jsonl");
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let base = "train --device cpu --model tiny --from-scratch --steps 6 --batch-size 2 --seq-len 16 --warmup 1 --eval-every 3 --ckpt-interval 2";
    llmq(&cmd(base, &["--log-file", &p("run.jsonl"), "--ckpt-dir", &p("ck"), "--stop-at", "3"]));
    // a run killed while writing a record
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, br#"{"type":"step","st"#).unwrap();
    llmq(&cmd(base, &["--log-file", &p("run.jsonl"), "--ckpt-dir", &p("ck"), "--continue"]));
    llmq(&cmd(base, &["--log-file", &p("run.jsonl"), "--ckpt-dir", &p("ck2")]));

    let text = std::fs::read_to_string(&log).unwrap();
    let records: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(text.lines().count(), records.len() + 1, "only the partial line is not a record, on a line of its own");
    let field = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or_else(|| panic!("no `{k}` in {r}")).to_string();
    let mut runs: Vec<(String, String)> = vec![];
    for r in &records {
        let id = (field(r, "run"), field(r, "series"));
        if runs.last() != Some(&id) {
            runs.push(id);
        }
    }
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!(runs[0].0, runs[0].1, "a fresh run is its own series");
    assert_eq!(runs[1].1, runs[0].1, "the resumed run continues the series");
    assert_ne!(runs[1].0, runs[0].0);
    assert_ne!(runs[2].1, runs[0].1, "a fresh run appended to the log starts a series");

    let out = Command::new(env!("CARGO_BIN_EXE_llmq")).args(["plot", &p("run.jsonl"), "-o", &p("a.svg")]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("2 run(s): 12 train points, 4 eval points"), "{stdout}");
    assert!(stderr.contains("not a JSON record"), "{stderr}");
    let svg = std::fs::read_to_string(d.join("a.svg")).unwrap();
    for w in ["run.jsonl run 1", "run.jsonl run 2", ">learning rate<", ">gradient norm<", ">tokens/s<"] {
        assert!(svg.contains(w), "{w:?} not in the image");
    }
    // two logs overlaid, the train loss smoothed
    std::fs::copy(&log, d.join("other.jsonl")).unwrap();
    let o = llmq(&["plot", &p("run.jsonl"), &p("other.jsonl"), "--smooth", "3", "-o", &p("b.svg")]);
    assert!(o.contains("4 run(s)"), "{o}");
    assert!(std::fs::read_to_string(d.join("b.svg")).unwrap().contains("other.jsonl run 2"));
    let _ = std::fs::remove_dir_all(&d);
}
