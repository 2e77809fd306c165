//! Hostile command lines: every flag that takes a value, of every subcommand (read from
//! `--help`, so that new flags are covered), given each edge value on a small CPU job (a one-step
//! run of the tiny model, its checkpoint, export and log, a word-level tokenizer). The command
//! either works or stops with an error naming the flag or its value (clap's usage errors
//! included), or the memory it would need: never a panic, a signal or a hang.

use std::io::Read;
use std::process::{Command, Stdio};
use std::path::Path;
use std::time::{Duration, Instant};

const EDGES: [&str; 10] = ["0", "-1", "0.5", "nan", "inf", "1e30", "4294967297", "18446744073709551616", "", "x"];

/// Flags whose value is an amount of work: at the edges they ask for billions of steps or of
/// evaluation batches, and such a run goes on; it only has to have started.
const WORK: [&str; 2] = ["--steps", "--eval-batches"];

/// Flags whose value is text of the user's choosing (an output path, a prompt, a name): "nan"
/// is fine there.
const NAMES: [&str; 9] = ["--save-config", "--log-file", "--ckpt-dir", "--export", "--matmul-autotune", "--output", "--prompt", "--prefix", "--field"];

/// The flags of `llmq <command> --help` that take a value.
fn value_flags(command: &str) -> Vec<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_llmq")).args([command, "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let flags: Vec<String> = help
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.find("--").map(|i| &l[i..])?;
            let (flag, rest) = l.split_once(' ')?;
            (rest.starts_with('<') && l.starts_with("--")).then(|| flag.to_string())
        })
        .collect();
    assert!(!flags.is_empty(), "{command}: no flags in --help");
    flags
}

/// Exit status (None: killed after `limit`), stdout and stderr of `llmq args` run in `dir`.
fn run(args: &[String], dir: &std::path::Path, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmq")).args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s).unwrap_or_default()
    }), std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).map(|_| s).unwrap_or_default()
    }));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let code = status.map(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.code().unwrap_or_else(|| 1000 + s.signal().unwrap_or(0))
    });
    (code, readers.0.join().unwrap(), readers.1.join().unwrap())
}

/// A word-level tokenizer of the tiny model's 256 ids ("w0" ... "w255").
fn write_tokenizer(path: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256).map(|i| (format!("w{i}"), serde_json::Value::from(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(path, tok.to_string()).unwrap();
}

fn ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmq")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A subcommand with the arguments of a small job that works.
struct Job {
    command: &'static str,
    positional: Vec<String>,
    /// Flags and values, each left out when it is the flag under test.
    flags: Vec<(String, String)>,
}

fn jobs(dir: &Path) -> Vec<Job> {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (tok, text, ck, ex, log) = (p("tokenizer.json"), p("text.txt"), p("ck"), p("export"), p("log.jsonl"));
    write_tokenizer(Path::new(&tok));
    std::fs::write(&text, (0..400).map(|i| format!("w{}", (i * 7) % 256)).collect::<Vec<_>>().join(" ")).unwrap();
    ok(&["tokenize", &text, "--tokenizer", &tok, "-o", &p("tokens"), "--eos-id", "1"]);
    let tokens = glob_one(&dir.join("tokens"));
    ok(&["train", "--device", "cpu", "--model", "tiny", "--from-scratch", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every=0", "--ckpt-dir", &ck, "--export", &ex, "--log-file", &log]);
    let step = glob_one(Path::new(&ck));
    let pairs = |v: &[(&str, &str)]| v.iter().map(|(f, x)| (f.to_string(), x.to_string())).collect::<Vec<_>>();
    let train = pairs(&[("--device", "cpu"), ("--model", "tiny"), ("--steps", "1"), ("--batch-size", "2"), ("--seq-len", "16"), ("--eval-every", "0"), ("--print-every", "1")]);
    let job = |command, positional: &[&str], flags| Job { command, positional: positional.iter().map(|s| s.to_string()).collect(), flags };
    vec![
        job("train", &["--from-scratch"], train.clone()),
        job("plan", &["--from-scratch"], train),
        job("eval", &[&ex], pairs(&[("--eval-file", &tokens), ("--device", "cpu"), ("--batch-size", "1"), ("--seq-len", "8")])),
        job("generate", &[], pairs(&[("--model", &ex), ("--tokenizer", &tok), ("--prompt", "w1 w2"), ("--max-tokens", "4"), ("--device", "cpu")])),
        job("tokenize", &[&text], pairs(&[("--tokenizer", &tok), ("--output", "out"), ("--eos-id", "1")])),
        job("export", &[&step], pairs(&[("--output", "out")])),
        job("plot", &[&log], pairs(&[("--output", "plot.svg")])),
    ]
}

/// The first entry of a directory that is not hidden (the checkpoint root's lock) or set aside.
fn glob_one(dir: &Path) -> String {
    let visible = |p: &std::path::PathBuf| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.') && n != "abandoned");
    let mut e: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(visible).collect();
    e.sort();
    e[0].to_str().unwrap().to_string()
}

#[test]
fn every_flag_of_every_command_at_every_edge_works_or_is_refused_naming_it() {
    let dir = std::env::temp_dir().join(format!("llmq-hostile-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut refused = 0;
    for Job { command, positional, flags: base } in jobs(&dir) {
        for flag in value_flags(command) {
            for edge in EDGES {
                let mut args: Vec<String> = vec![command.to_string()];
                args.extend(positional.iter().cloned());
                for (f, v) in base.iter().filter(|(f, _)| *f != flag) {
                    args.extend([f.clone(), v.clone()]);
                }
                args.push(format!("{flag}={edge}"));
                let what = format!("llmq {command} {flag}={edge}");
                let limit = Duration::from_secs(if WORK.contains(&flag.as_str()) { 5 } else { 60 });
                // a directory of its own: what one case writes ("nan" from --save-config) is not
                // there for the next ("--matmul-tuning nan" must not find it)
                let cwd = dir.join(format!("{command}{flag}{edge}"));
                std::fs::create_dir_all(&cwd).unwrap();
                let (code, stdout, stderr) = run(&args, &cwd, limit);
                assert!(!stderr.contains("panicked"), "{what}: {stderr}");
                match code {
                    // a number that is not one is never taken
                    Some(0) => assert!(!["nan", "inf"].contains(&edge) || NAMES.contains(&flag.as_str()), "{what}: accepted"),
                    Some(1) | Some(2) => {
                        refused += 1;
                        let name = flag.trim_start_matches("--");
                        let named = [name, &name.replace('-', "_"), edge, "out of memory: the run needs"].iter().any(|w| stderr.contains(w));
                        assert!(stderr.starts_with("error: ") && named, "{what}: the error names neither the flag, the value nor the memory needed: {stderr}");
                    }
                    None => assert!(WORK.contains(&flag.as_str()) && !stdout.is_empty(), "{what}: still running after {limit:?}:\n{stdout}\n{stderr}"),
                    Some(c) => panic!("{what}: exit {c}: {stderr}"),
                }
            }
        }
    }
    assert!(refused > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
