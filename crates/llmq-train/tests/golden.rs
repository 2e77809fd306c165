//! Golden losses: the first steps of a few fixed CPU runs against files kept in the repository
//! (tests/golden/*.txt), so that a change which moves the reference numbers cannot land
//! unnoticed. The other model tests compare runs with each other (recompute, overlap, sharding
//! of the optimizer state...), which a change that moves every run alike would pass.
//!
//! The CPU backend is deterministic and independent of the thread count, so on the platform that
//! blessed a file (recorded in it: architecture, OS and the CPU features the matmul kernels
//! choose by) every loss and gradient norm must repeat bit for bit. The tolerances apply only on
//! other platforms, where the matmul crate may pick other kernels (FMA or not) and round
//! differently; an fp8 run amplifies that through the e4m3 rounding of its matmul inputs. A change meant to move the
//! numbers regenerates the files: `LLMQ_BLESS=1 cargo test --release -p llmq-train --test golden`,
//! and says why in its commit.

mod common;
use common::*;
use llmq_core::{Arch, DType};
use llmq_train::Precision;
use std::path::PathBuf;

const STEPS: u64 = 8;

struct Run {
    name: &'static str,
    arch: Arch,
    tied: bool,
    precision: Precision,
    accum: usize,
    /// Relative tolerance of each loss and gradient norm on a platform other than the blessing one.
    tol: f64,
}

fn runs() -> Vec<Run> {
    let fp8 = Precision::fp8();
    vec![
        Run { name: "qwen2_tied_fp32", arch: Arch::Qwen2, tied: true, precision: Precision::fp32(), accum: 1, tol: 1e-5 },
        Run { name: "qwen3_bf16", arch: Arch::Qwen3, tied: false, precision: Precision::bf16(), accum: 1, tol: 2e-4 },
        Run { name: "llama_e4m3", arch: Arch::Llama, tied: false, precision: fp8, accum: 1, tol: 5e-3 },
        Run { name: "qwen2_e4m3_e5m2_accum2", arch: Arch::Qwen2, tied: false, precision: Precision { act_grads: DType::E5M2, ..fp8 }, accum: 2, tol: 5e-3 },
    ]
}

/// (loss, gradient norm) of each step.
fn history(run: &Run) -> Vec<(f64, f64)> {
    let mut tc = train_config(2, 16, run.accum, STEPS);
    tc.precision = run.precision;
    let mut tr = trainer(&tiny(run.arch, run.tied), tc);
    (0..STEPS)
        .map(|_| {
            let s = tr.train_step().unwrap();
            (s.loss, s.grad_norm)
        })
        .collect()
}

/// What decides the CPU's rounding: architecture, OS and the SIMD features the matmul crate
/// dispatches on.
fn platform() -> String {
    #[allow(unused_mut)]
    let mut features: Vec<&str> = vec![];
    #[cfg(target_arch = "x86_64")]
    for (name, on) in [
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
    ] {
        if on {
            features.push(name);
        }
    }
    format!("{}-{} {}", std::env::consts::ARCH, std::env::consts::OS, features.join(","))
}

const PLATFORM_PREFIX: &str = "# platform: ";

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.txt"))
}

fn write(run: &Run, h: &[(f64, f64)]) {
    let mut text = format!(
        "# llmq golden losses: {} (tests/golden.rs; regenerate with LLMQ_BLESS=1)\n{PLATFORM_PREFIX}{}\n# step loss grad_norm\n",
        run.name,
        platform()
    );
    for (i, (l, g)) in h.iter().enumerate() {
        text += &format!("{} {l} {g}\n", i + 1); // shortest decimals that read back bit for bit
    }
    std::fs::create_dir_all(path(run.name).parent().unwrap()).unwrap();
    std::fs::write(path(run.name), text).unwrap();
}

/// A golden file: the platform that blessed it and the (loss, gradient norm) of each step.
type Golden = (Option<String>, Vec<(f64, f64)>);

fn read(name: &str) -> Result<Golden, String> {
    let p = path(name);
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e} (make it with LLMQ_BLESS=1)", p.display()))?;
    let blessed_on = text.lines().find_map(|l| l.strip_prefix(PLATFORM_PREFIX)).map(|s| s.trim().to_string());
    let mut out = vec![];
    for (no, line) in text.lines().enumerate().filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| s.parse::<f64>().map_err(|e| format!("{}:{}: {s:?}: {e}", p.display(), no + 1));
        match f.as_slice() {
            [step, l, g] if *step == (out.len() + 1).to_string() => out.push((num(l)?, num(g)?)),
            _ => return Err(format!("{}:{}: expected \"{} <loss> <grad_norm>\", got {line:?}", p.display(), no + 1, out.len() + 1)),
        }
    }
    Ok((blessed_on, out))
}

#[test]
fn cpu_runs_match_their_golden_losses() {
    let bless = std::env::var("LLMQ_BLESS").is_ok_and(|v| v == "1");
    let mut failures = vec![];
    for run in runs() {
        let got = history(&run);
        if bless {
            write(&run, &got);
            println!("{}: written", run.name);
            continue;
        }
        let (blessed_on, want) = match read(run.name) {
            Ok(w) => w,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        if want.len() != got.len() {
            failures.push(format!("{}: the file has {} steps, the run {}", run.name, want.len(), got.len()));
            continue;
        }
        let bitwise = got.iter().zip(&want).all(|(a, b)| a.0.to_bits() == b.0.to_bits() && a.1.to_bits() == b.1.to_bits());
        let same_platform = blessed_on.as_deref() == Some(platform().as_str());
        if same_platform && !bitwise {
            failures.push(format!("{}: not bit-identical to the golden file on the platform that blessed it ({})", run.name, platform()));
        }
        let mut worst = 0f64;
        for (i, ((l, g), (wl, wg))) in got.iter().zip(&want).enumerate() {
            for (what, x, w) in [("loss", l, wl), ("grad norm", g, wg)] {
                let rel = (x - w).abs() / w.abs().max(1e-6);
                worst = worst.max(rel);
                if rel.is_nan() || rel > run.tol {
                    failures.push(format!("{} step {}: {what} {x} against the golden {w} (relative difference {rel:.2e} > {:.0e})", run.name, i + 1, run.tol));
                }
            }
        }
        let verdict = if bitwise {
            "bit-identical".to_string()
        } else {
            format!("worst relative difference {worst:.2e} (blessed on {blessed_on:?}, this is {}: tolerance {:.0e})", platform(), run.tol)
        };
        println!("{}: {verdict}", run.name);
    }
    assert!(failures.is_empty(), "golden losses differ:\n{}", failures.join("\n"));
}
