//! Hostile command lines: every `llmq train` flag that takes a value (read from `--help`, so
//! that new flags are covered) given each edge value on a one-step CPU run of the tiny model.
//! The run either works or stops with an error naming the flag or its value (clap's usage errors
//! included), or the memory it would need: never a panic, a signal or a hang.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EDGES: [&str; 10] = ["0", "-1", "0.5", "nan", "inf", "1e30", "4294967297", "18446744073709551616", "", "x"];

/// Flags whose value is an amount of work: at the edges they ask for billions of steps or of
/// evaluation batches, and such a run goes on; it only has to have started.
const WORK: [&str; 2] = ["--steps", "--eval-batches"];

/// Flags whose value is a name of the user's choosing (an output path): "nan" is a fine name.
const NAMES: [&str; 5] = ["--save-config", "--log-file", "--ckpt-dir", "--export", "--matmul-autotune"];

const BASE: [(&str, &str); 5] = [("--steps", "1"), ("--batch-size", "2"), ("--seq-len", "16"), ("--eval-every", "0"), ("--print-every", "1")];

/// The flags of `llmq train --help` that take a value.
fn value_flags() -> Vec<String> {
    let help = Command::new(env!("CARGO_BIN_EXE_llmq")).args(["train", "--help"]).output().unwrap();
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
    assert!(flags.len() > 40 && flags.iter().any(|f| f == "--batch-size"), "{flags:?}");
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

#[test]
fn every_flag_at_every_edge_runs_or_is_refused_naming_it() {
    let dir = std::env::temp_dir().join(format!("llmq-hostile-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut refused = 0;
    for flag in value_flags() {
        for edge in EDGES {
            let mut args: Vec<String> = ["train", "--device", "cpu", "--model", "tiny", "--from-scratch"].map(String::from).to_vec();
            if flag == "--device" || flag == "--model" {
                args.drain(1..5);
                args.extend(if flag == "--device" { ["--model", "tiny"] } else { ["--device", "cpu"] }.map(String::from));
            }
            for (f, v) in BASE.iter().filter(|(f, _)| *f != flag) {
                args.extend([f.to_string(), v.to_string()]);
            }
            args.push(format!("{flag}={edge}"));
            let what = format!("{flag}={edge}");
            let limit = Duration::from_secs(if WORK.contains(&flag.as_str()) { 5 } else { 60 });
            // a directory of its own: what one case writes ("nan" from --save-config) is not
            // there for the next ("--matmul-tuning nan" must not find it)
            let cwd = dir.join(format!("{}{edge}", flag.trim_start_matches('-')));
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
                None => assert!(WORK.contains(&flag.as_str()) && stdout.starts_with("llmq train"), "{what}: still running after {limit:?}:\n{stdout}\n{stderr}"),
                Some(c) => panic!("{what}: exit {c}: {stderr}"),
            }
        }
    }
    assert!(refused > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
