//! `llmq plot LOG`: train and eval loss curves from a JSON-lines log, drawn as an SVG image.

use llmq_core::{Error, Result};
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// JSON-lines log written by `llmq train --log-file`.
    pub log: PathBuf,
    /// Output image (SVG). Default: the log's name with .svg.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// (step, loss) series read from a log.
#[derive(Debug, Default, PartialEq)]
pub struct Curves {
    pub train: Vec<(f64, f64)>,
    pub eval: Vec<(f64, f64)>,
    pub floor: Option<f64>,
}

pub fn read_curves(path: &Path) -> Result<Curves> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let mut c = Curves::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::file(path, format!("line {}: not JSON: {e}", i + 1)))?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        match v.get("type").and_then(|t| t.as_str()) {
            Some("step") if v.get("skipped").and_then(|s| s.as_bool()) != Some(true) => {
                if let (Some(s), Some(l)) = (num("step"), num("loss")) {
                    c.train.push((s, l));
                }
            }
            Some("eval") => {
                if let (Some(s), Some(l)) = (num("step"), num("loss")) {
                    c.eval.push((s, l));
                }
            }
            Some("dataset") => c.floor = num("floor"),
            _ => {}
        }
    }
    if c.train.is_empty() && c.eval.is_empty() {
        return Err(Error::file(path, "no step or eval records with a loss"));
    }
    Ok(c)
}

pub fn render_svg(c: &Curves, title: &str) -> String {
    let (w, h, ml, mr, mt, mb) = (900.0, 540.0, 70.0, 20.0, 40.0, 50.0);
    let pts = c.train.iter().chain(&c.eval).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some(f) = c.floor {
        y0 = y0.min(f);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let sy = |y: f64| mt + (y1 - y) / (y1 - y0) * (h - mt - mb);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        w / 2.0,
        xml_escape(title)
    );
    for i in 0..=5 {
        let y = y0 + (y1 - y0) * i as f64 / 5.0;
        let x = x0 + (x1 - x0) * i as f64 / 5.0;
        let (xr, yy, lx, ly) = (w - mr, sy(y), ml - 6.0, sy(y) + 4.0);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{xr}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{lx}" y="{ly}" text-anchor="end">{y:.3}</text>"##
        );
        let (yb, xx, ty) = (h - mb, sx(x), h - mb + 16.0);
        let _ = writeln!(
            s,
            r##"<line y1="{mt}" y2="{yb}" x1="{xx}" x2="{xx}" stroke="#eee"/><text x="{xx}" y="{ty}" text-anchor="middle">{x:.0}</text>"##
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#,
        w / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">loss (nats/token)</text>"#,
        h / 2.0,
        h / 2.0
    );
    let poly = |pts: &[(f64, f64)], color: &str, width: f64| -> String {
        let p: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#,
            p.join(" ")
        )
    };
    let _ = writeln!(s, "{}", poly(&c.train, "#1f77b4", 1.2));
    let _ = writeln!(s, "{}", poly(&c.eval, "#d62728", 2.0));
    for &(x, y) in c.eval.iter().filter(|p| p.1.is_finite()) {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##,
            sx(x),
            sy(y)
        );
    }
    let mut legend = vec![
        ("#1f77b4", "train loss".to_string()),
        ("#d62728", "eval loss".to_string()),
    ];
    if let Some(f) = c.floor {
        let (xr, yf) = (w - mr, sy(f));
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{xr}" y1="{yf}" y2="{yf}" stroke="#2ca02c" stroke-dasharray="6 4"/>"##
        );
        legend.push(("#2ca02c", format!("entropy floor {f:.3}")));
    }
    for (i, (color, label)) in legend.iter().enumerate() {
        let y = mt + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{label}</text>"#,
            w - 210.0,
            w - 185.0,
            w - 178.0,
            y + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn run(args: PlotArgs) -> Result<()> {
    let curves = read_curves(&args.log)?;
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| args.log.with_extension("svg"));
    let svg = render_svg(&curves, &format!("llmq: {}", args.log.display()));
    std::fs::write(&out, svg).map_err(|e| Error::file(&out, format!("cannot write: {e}")))?;
    println!(
        "wrote {} ({} train points, {} eval points)",
        out.display(),
        curves.train.len(),
        curves.eval.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_curves_and_draws_them() {
        let dir = std::env::temp_dir().join(format!("llmq-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("run.jsonl");
        std::fs::write(
            &log,
            concat!(
                r#"{"type":"dataset","floor":1.5}"#,
                "\n",
                r#"{"type":"step","step":1,"loss":5.0,"skipped":false}"#,
                "\n",
                r#"{"type":"step","step":2,"loss":9e9,"skipped":true}"#,
                "\n",
                r#"{"type":"step","step":3,"loss":3.0}"#,
                "\n",
                r#"{"type":"eval","step":3,"loss":3.2}"#,
                "\n"
            ),
        )
        .unwrap();
        let c = read_curves(&log).unwrap();
        assert_eq!(c.train, vec![(1.0, 5.0), (3.0, 3.0)]);
        assert_eq!(c.eval, vec![(3.0, 3.2)]);
        assert_eq!(c.floor, Some(1.5));
        let svg = render_svg(&c, "t");
        assert!(
            svg.starts_with("<svg")
                && svg.contains("polyline")
                && svg.contains("entropy floor 1.500")
        );
        std::fs::write(&log, "not json\n").unwrap();
        let err = read_curves(&log).unwrap_err().to_string();
        assert!(err.contains("run.jsonl") && err.contains("line 1"), "{err}");
    }
}
