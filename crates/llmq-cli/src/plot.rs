//! `llmq plot LOG...`: loss curves, with panels for the learning rate, the gradient norm, the
//! throughput and FP8 health (`--log-amax`: the worst fraction of a tensor flushed to zero), from JSON-lines logs of `llmq train --log-file`, drawn as one SVG image
//! (`plot_svg.rs`). A log that several runs appended to holds one curve per run series: the
//! records' `series` field, shared by a run and the runs that resume it (logs written without it
//! start a new series at each `options` record). Several logs are overlaid.

use crate::plot_svg::render_svg;
use llmq_core::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// JSON-lines logs written by `llmq train --log-file` (several: drawn over each other).
    #[arg(required = true)]
    pub logs: Vec<PathBuf>,
    /// Output image (SVG). Default: the first log's name with .svg.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Also draw the train loss as a trailing mean over this many logged steps (0: off).
    #[arg(long, default_value_t = 0)]
    pub smooth: usize,
}

/// (step, value) points of one run series; missing and non-finite values are left out.
#[derive(Debug, Default, PartialEq)]
pub struct Series {
    pub label: String,
    pub train: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    pub norm: Vec<(f64, f64)>,
    pub tokens_per_s: Vec<(f64, f64)>,
    /// FP8 health records (`--log-amax`): the largest fraction of a tensor's values flushed to
    /// zero, over the tensors of the step.
    pub fp8_flushed: Vec<(f64, f64)>,
    /// The entropy floor of the synthetic corpus, where the run trained on it.
    pub floor: Option<f64>,
    /// The run whose step records came last.
    pub(crate) last_run: Option<String>,
}

impl Series {
    /// A run resuming this series from a checkpoint redoes the steps from `step` on: the points
    /// the earlier run logged there (after its checkpoint, before it stopped) are replaced.
    fn truncate_from(&mut self, step: f64) {
        for v in [&mut self.train, &mut self.eval, &mut self.lr, &mut self.norm, &mut self.tokens_per_s, &mut self.fp8_flushed] {
            v.retain(|p| p.0 < step);
        }
    }

    fn is_empty(&self) -> bool {
        self.train.is_empty() && self.eval.is_empty()
    }
}

/// The series of a log and the lines that were not records (reported, not fatal: a run killed
/// while writing leaves a partial line).
#[derive(Debug, Default)]
pub struct LogRead {
    pub series: Vec<Series>,
    pub ignored: Vec<String>,
}

pub fn read_log(path: &Path) -> Result<LogRead> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let text = String::from_utf8_lossy(&bytes);
    let n_lines = text.lines().count();
    let mut out = LogRead::default();
    let mut keys: Vec<String> = vec![];
    // logs without series ids: the number of `options` records so far
    let mut unnamed = 0usize;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v.is_object() => v,
            _ if i + 1 == n_lines && !text.ends_with('\n') => {
                out.ignored.push(format!("line {}: a partial last record (a run stopped while writing it)", i + 1));
                continue;
            }
            _ => {
                out.ignored.push(format!("line {}: not a JSON record", i + 1));
                continue;
            }
        };
        let text_of = |k: &str| v.get(k).and_then(|x| x.as_str());
        let ty = text_of("type").unwrap_or("");
        let (key, run) = match text_of("series") {
            Some(s) => (s.to_string(), text_of("run").unwrap_or(s).to_string()),
            None => {
                unnamed += usize::from(ty == "options");
                (format!("#{unnamed}"), format!("#{unnamed}"))
            }
        };
        let at = match keys.iter().position(|k| *k == key) {
            Some(at) => at,
            None => {
                keys.push(key.clone());
                out.series.push(Series { label: key, ..Default::default() });
                keys.len() - 1
            }
        };
        let s = &mut out.series[at];
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite());
        let Some(step) = num("step") else {
            if ty == "dataset" {
                s.floor = num("floor");
            }
            continue;
        };
        match ty {
            "step" => {
                if s.last_run.as_deref() != Some(run.as_str()) {
                    if s.last_run.is_some() {
                        s.truncate_from(step);
                    }
                    s.last_run = Some(run);
                }
                if v.get("skipped").and_then(|x| x.as_bool()) == Some(true) {
                    continue;
                }
                for (k, dst) in [("loss", &mut s.train), ("lr", &mut s.lr), ("norm", &mut s.norm), ("tokens_per_s", &mut s.tokens_per_s)] {
                    if let Some(x) = num(k) {
                        dst.push((step, x));
                    }
                }
            }
            "eval" => {
                if let Some(x) = num("loss") {
                    s.eval.push((step, x));
                }
            }
            "fp8_health" => {
                let worst = v.get("tensors").and_then(|t| t.as_array()).into_iter().flatten().filter_map(|t| t.get("flushed").and_then(|f| f.as_f64())).fold(None, |m: Option<f64>, f| Some(m.map_or(f, |m| m.max(f))));
                if let Some(w) = worst {
                    s.fp8_flushed.push((step, w));
                }
            }
            _ => {}
        }
    }
    out.series.retain(|s| !s.is_empty());
    if out.series.is_empty() {
        let why = if out.ignored.is_empty() { String::new() } else { format!(" ({})", first_few(&out.ignored).join("; ")) };
        return Err(Error::file(path, format!("no step or eval records with a loss{why}")));
    }
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let several = out.series.len() > 1;
    for (i, s) in out.series.iter_mut().enumerate() {
        s.label = if several { format!("{name} run {}", i + 1) } else { name.clone() };
    }
    Ok(out)
}

/// The first few of the lines ignored and how many more there were (a file that is not a log at
/// all would otherwise be reported line by line).
fn first_few(ignored: &[String]) -> Vec<String> {
    const SHOWN: usize = 5;
    let mut v: Vec<String> = ignored.iter().take(SHOWN).cloned().collect();
    if ignored.len() > SHOWN {
        v.push(format!("{} more lines", ignored.len() - SHOWN));
    }
    v
}

pub fn run(args: PlotArgs) -> Result<()> {
    let mut series = vec![];
    for log in &args.logs {
        let read = read_log(log)?;
        for why in first_few(&read.ignored) {
            eprintln!("{}: ignored {why}", log.display());
        }
        series.extend(read.series);
    }
    let out = args.output.clone().unwrap_or_else(|| args.logs[0].with_extension("svg"));
    let names: Vec<String> = args.logs.iter().map(|l| l.display().to_string()).collect();
    let svg = render_svg(&series, &format!("llmq: {}", names.join(", ")), args.smooth);
    std::fs::write(&out, svg).map_err(|e| Error::file(&out, format!("cannot write: {e}")))?;
    let points = |f: fn(&Series) -> usize| series.iter().map(f).sum::<usize>();
    println!(
        "wrote {} ({} run(s): {} train points, {} eval points)",
        out.display(),
        series.len(),
        points(|s| s.train.len()),
        points(|s| s.eval.len())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("llmq-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_one_run() {
        let p = log(
            "one.jsonl",
            concat!(
                r#"{"type":"dataset","floor":1.5}"#,
                "\n",
                r#"{"type":"step","step":1,"loss":5.0,"lr":0.001,"norm":2.0,"tokens_per_s":900,"skipped":false}"#,
                "\n",
                r#"{"type":"step","step":2,"loss":9e9,"skipped":true}"#,
                "\n",
                r#"{"type":"step","step":3,"loss":3.0}"#,
                "\n",
                r#"{"type":"eval","step":3,"loss":3.2}"#,
                "\n"
            ),
        );
        let r = read_log(&p).unwrap();
        assert_eq!(r.series.len(), 1);
        let s = &r.series[0];
        assert_eq!(s.label, "one.jsonl");
        assert_eq!(s.train, vec![(1.0, 5.0), (3.0, 3.0)]);
        assert_eq!(s.eval, vec![(3.0, 3.2)]);
        assert_eq!((s.lr.clone(), s.norm.clone(), s.tokens_per_s.clone()), (vec![(1.0, 0.001)], vec![(1.0, 2.0)], vec![(1.0, 900.0)]));
        assert_eq!(s.floor, Some(1.5));
        std::fs::write(&p, "not json\n").unwrap();
        let err = read_log(&p).unwrap_err().to_string();
        assert!(err.contains("one.jsonl") && err.contains("line 1") && err.contains("no step or eval records"), "{err}");
        // a file that is not a log names its first few lines, not every one
        std::fs::write(&p, "not json\n".repeat(10_000)).unwrap();
        let err = read_log(&p).unwrap_err().to_string();
        assert!(err.contains("line 5: not a JSON record; 9995 more lines") && !err.contains("line 6:"), "{err}");
    }

    /// Two runs appended to one log, the second resumed by a third: two series, the resumed one
    /// continuing where its checkpoint was (the steps after it from the stopped run replaced).
    #[test]
    fn separates_runs_and_joins_a_resumed_one() {
        let rec = |run: &str, series: &str, step: u32, loss: f64| format!(r#"{{"type":"step","step":{step},"loss":{loss},"run":"{run}","series":"{series}"}}"#);
        let mut lines = vec![r#"{"type":"options","run":"a","series":"a"}"#.to_string()];
        lines.extend((1..=5).map(|s| rec("a", "a", s, 10.0 - s as f64)));
        lines.push(r#"{"type":"options","run":"b","series":"b"}"#.into());
        lines.extend((1..=3).map(|s| rec("b", "b", s, 20.0)));
        // c resumes a's checkpoint at step 3: a's steps 4 and 5 are replaced by c's
        lines.extend((4..=6).map(|s| rec("c", "a", s, 1.0)));
        let p = log("appended.jsonl", &(lines.join("\n") + "\n"));
        let r = read_log(&p).unwrap();
        assert_eq!(r.series.len(), 2);
        assert_eq!(r.series[0].label, "appended.jsonl run 1");
        assert_eq!(r.series[0].train, vec![(1.0, 9.0), (2.0, 8.0), (3.0, 7.0), (4.0, 1.0), (5.0, 1.0), (6.0, 1.0)]);
        assert_eq!(r.series[1].train, vec![(1.0, 20.0), (2.0, 20.0), (3.0, 20.0)]);
        // an old log without ids: each options record starts a series
        let old = "{\"type\":\"options\"}\n{\"type\":\"step\",\"step\":1,\"loss\":2}\n{\"type\":\"options\"}\n{\"type\":\"step\",\"step\":1,\"loss\":3}\n";
        let r = read_log(&log("old.jsonl", old)).unwrap();
        assert_eq!(r.series.iter().map(|s| s.train.clone()).collect::<Vec<_>>(), vec![vec![(1.0, 2.0)], vec![(1.0, 3.0)]]);
    }

    /// A run killed mid-write leaves a partial last line; NaN values are written as null: neither
    /// stops the plot, and the partial line is reported.
    #[test]
    fn a_partial_last_line_and_nan_values_are_skipped() {
        let text = concat!(
            r#"{"type":"step","step":1,"loss":4.0,"norm":null}"#,
            "\n",
            r#"{"type":"step","step":2,"loss":null,"norm":1.0}"#,
            "\n",
            r#"{"type":"step","step":3,"lo"#
        );
        let r = read_log(&log("partial.jsonl", text)).unwrap();
        assert_eq!(r.series[0].train, vec![(1.0, 4.0)]);
        assert_eq!(r.series[0].norm, vec![(2.0, 1.0)]);
        assert_eq!(r.ignored, vec!["line 3: a partial last record (a run stopped while writing it)".to_string()]);
        let svg = render_svg(&r.series, "t", 3);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn fp8_health_records_give_the_worst_flushed_fraction() {
        let text = concat!(
            r#"{"type":"step","step":2,"loss":4.0}"#,
            "\n",
            r#"{"type":"fp8_health","step":2,"tensors":[{"flushed":0.01},{"flushed":0.25},{"flushed":0.0}]}"#,
            "\n",
            r#"{"type":"fp8_health","step":4,"tensors":[]}"#,
            "\n"
        );
        let r = read_log(&log("fp8.jsonl", text)).unwrap();
        assert_eq!(r.series[0].fp8_flushed, vec![(2.0, 0.25)]);
        assert!(render_svg(&r.series, "t", 0).contains(">fp8: largest fraction flushed to zero<"));
    }
}
