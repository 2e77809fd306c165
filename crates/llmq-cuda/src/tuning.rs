//! Which cuBLASLt algorithm each matmul shape runs: a table of measured choices.
//!
//! cuBLASLt's heuristic answers a list of algorithms ordered by its own estimate, and its first
//! answer is often not the fastest: on the H200 at Qwen2.5-0.5B shapes (B64) the best of its
//! first eight answers took 5.4% less matmul time than the first (`perf training_matmuls`,
//! docs/BENCHMARKS.md, ninth round). Choosing by timing inside a run would make the choice, and
//! with it the last bits of the results, differ from process to process (a resumed run would no
//! longer match an uninterrupted one). So the choices are measured once, offline, and kept in
//! `tuning.txt` (embedded in the binary), per device name and cuBLASLt version: the same device
//! and library always run the same algorithm for a shape. Shapes not in the table run the
//! heuristic's first answer.
//!
//! Making a table (on the GPU machine): `llmq train --matmul-autotune <file> ...` times every
//! candidate of every new shape at its first call (`TIME_ROUNDS` rounds, candidates interleaved,
//! median per candidate) and appends `key = index` lines to the file under a `[device | version]`
//! header; paste them into tuning.txt, or pass `--matmul-tuning <file>` to use it without
//! rebuilding.
//!
//! Format: `# comment`; `[<device name> | <cuBLASLt version>]` starts a section; then lines
//! `<key> = <index>` (the key as `key_string` writes it, the index into the heuristic's answers
//! for CANDIDATES requested).

use llmq_core::backend_options::{TUNING_EMBEDDED, TUNING_OFF};
use llmq_core::{Error, Result};
use std::collections::HashMap;
use std::io::Write;

/// Heuristic answers requested per shape; table indices refer to this list.
pub(crate) const CANDIDATES: usize = 8;

const TABLE: &str = include_str!("../tuning.txt");

/// The entries for this device and cuBLASLt version (key string -> candidate index) that
/// `setting` (`BackendOptions::matmul_tuning`) selects: "embedded", the table built into the
/// binary; "off", none (the heuristic's first answers, for comparisons); otherwise a file whose
/// entries are added to the embedded ones and win, e.g. a table just made for another GPU.
/// Malformed lines are skipped with a warning on stderr.
pub(crate) fn entries(device: &str, version: usize, setting: &str) -> Result<HashMap<String, usize>> {
    if setting == TUNING_OFF {
        return Ok(HashMap::new());
    }
    let mut out = parse(TABLE, device, version);
    if setting != TUNING_EMBEDDED {
        let text = std::fs::read_to_string(setting).map_err(|e| Error::Config(format!("--matmul-tuning {setting}: {e}")))?;
        let extra = parse(&text, device, version);
        if extra.is_empty() {
            eprintln!("llmq-cuda: --matmul-tuning {setting} has no entries for {}", section(device, version));
        }
        out.extend(extra);
    }
    Ok(out)
}

fn parse(text: &str, device: &str, version: usize) -> HashMap<String, usize> {
    let want = section(device, version);
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            inside = line == want;
            continue;
        }
        if !inside {
            continue;
        }
        match line.rsplit_once(" = ").map(|(k, i)| (k.trim(), i.trim().parse::<usize>())) {
            Some((k, Ok(i))) if i < CANDIDATES => {
                out.insert(k.to_string(), i);
            }
            _ => eprintln!("llmq-cuda: tuning.txt: skipping malformed line {line:?}"),
        }
    }
    out
}

/// A section header: `[NVIDIA H200 | 130100]`.
pub(crate) fn section(device: &str, version: usize) -> String {
    format!("[{device} | {version}]")
}

/// Appends `key = index` to the file at `path` (`BackendOptions::matmul_autotune`), with the
/// section header when the file is new, after a comment line with each candidate's median time
/// (`medians`: ms of two calls, inf where it failed; none where nothing was timed) so that a
/// table's gains can be read off it.
/// Errors are reported on stderr: tuning output is a side product.
pub(crate) fn record(path: &str, device: &str, version: usize, key: &str, index: usize, medians: &[f32]) {
    let fresh = std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true);
    let res = std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| {
        if fresh {
            writeln!(f, "{}", section(device, version))?;
        }
        if !medians.is_empty() {
            let ms: Vec<String> = medians.iter().map(|m| format!("{m:.4}")).collect();
            writeln!(f, "# {key}: median ms of two calls per candidate: {}", ms.join(" "))?;
        }
        writeln!(f, "{key} = {index}")
    });
    if let Err(e) = res {
        eprintln!("llmq-cuda: --matmul-autotune {path}: {e}");
    }
}

/// Rounds of timing per candidate when tuning; each round times every candidate once (two calls),
/// so slow drifts of the clock (the power cap) hit all candidates alike.
pub(crate) const TIME_ROUNDS: usize = 7;

/// Each candidate's median over rounds (`times[round][candidate]`, NaN = failed); infinite for
/// a candidate that failed in any round.
pub(crate) fn medians(times: &[Vec<f32>]) -> Vec<f32> {
    let n = times.first().map_or(0, Vec::len);
    (0..n)
        .map(|c| {
            let mut v: Vec<f32> = times.iter().map(|r| r[c]).filter(|x| x.is_finite()).collect();
            v.sort_by(f32::total_cmp);
            if v.len() < times.len() {
                f32::INFINITY
            } else {
                v[v.len() / 2]
            }
        })
        .collect()
}

/// Index of the smallest of `medians` (the first on ties; 0 when empty).
pub(crate) fn best_of(medians: &[f32]) -> usize {
    medians.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(&b.0))).map_or(0, |(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_select_device_and_version() {
        let t = format!("# c\n[GPU A | 1]\nk1 = 3\nk2 = {CANDIDATES}\nbad line\n[GPU B | 1]\nk1 = 5\n[GPU A | 2]\nk1 = 6\n");
        let t = t.as_str();
        let a = parse(t, "GPU A", 1);
        assert_eq!(a.get("k1"), Some(&3));
        assert_eq!(a.get("k2"), None, "index CANDIDATES is out of the candidate range");
        assert_eq!(a.len(), 1);
        assert_eq!(parse(t, "GPU B", 1).get("k1"), Some(&5));
        assert_eq!(parse(t, "GPU A", 2).get("k1"), Some(&6));
        assert!(parse(t, "GPU C", 1).is_empty());
    }

    #[test]
    fn best_is_the_smallest_median_and_failures_lose() {
        let t = vec![vec![2.0, 1.0, 0.5], vec![2.0, 1.1, f32::NAN], vec![2.0, 0.9, 0.4]];
        assert_eq!(medians(&t), vec![2.0, 1.0, f32::INFINITY]);
        assert_eq!(best_of(&medians(&t)), 1);
        let t = vec![vec![1.0, 3.0], vec![5.0, 3.0], vec![6.0, 3.0]];
        assert_eq!(best_of(&medians(&t)), 1, "median, not minimum");
        assert_eq!(best_of(&[1.0, 1.0]), 0, "the first on ties");
        assert_eq!(best_of(&medians(&[])), 0);
    }

    #[test]
    fn the_setting_selects_embedded_off_or_a_file() {
        let dev = "NVIDIA H200";
        let ver = 130100;
        let embedded = entries(dev, ver, TUNING_EMBEDDED).unwrap();
        assert_eq!(embedded, parse(TABLE, dev, ver));
        assert!(entries(dev, ver, TUNING_OFF).unwrap().is_empty());
        let path = std::env::temp_dir().join(format!("llmq-tuning-test-{}.txt", std::process::id()));
        std::fs::write(&path, format!("{}\nextra key = 2\n", section(dev, ver))).unwrap();
        let with_file = entries(dev, ver, path.to_str().unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(with_file.get("extra key"), Some(&2));
        assert_eq!(with_file.len(), embedded.len() + 1, "the file adds to the embedded table");
        let e = entries(dev, ver, "/nonexistent/tune.txt").unwrap_err().to_string();
        assert!(e.contains("--matmul-tuning /nonexistent/tune.txt"), "{e}");
    }

    #[test]
    fn recorded_choices_parse_back_beside_their_timings() {
        let path = std::env::temp_dir().join(format!("llmq-tuning-record-{}.txt", std::process::id()));
        let p = path.to_str().unwrap();
        let _ = std::fs::remove_file(&path);
        record(p, "GPU A", 7, "k1 shape", 2, &[0.5, 0.25, 0.125, f32::INFINITY]);
        record(p, "GPU A", 7, "k2 shape", 0, &[]);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.contains("# k1 shape: median ms of two calls per candidate: 0.5000 0.2500 0.1250 inf\n"), "{text}");
        assert_eq!(text.matches("[GPU A | 7]").count(), 1, "one section header: {text}");
        assert!(!text.contains("# k2 shape"), "no timing line where nothing was timed: {text}");
        let e = parse(&text, "GPU A", 7);
        assert_eq!((e.get("k1 shape"), e.get("k2 shape"), e.len()), (Some(&2), Some(&0), 2));
    }

    #[test]
    fn the_embedded_table_parses() {
        // every non-comment line of every section must be well-formed
        for line in TABLE.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('[')) {
            let (_, i) = line.rsplit_once(" = ").unwrap_or_else(|| panic!("no ' = ' in {line:?}"));
            assert!(i.trim().parse::<usize>().is_ok_and(|i| i < CANDIDATES), "bad index in {line:?}");
        }
    }
}
