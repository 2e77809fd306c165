//! The SVG image of `llmq plot`: a loss panel (train and eval loss of every series, the entropy
//! floor where known, an optional trailing mean of the train loss) above panels for the learning
//! rate, the gradient norm and the throughput, sharing the step axis. Ticks fall on round
//! numbers (1, 2 or 5 times a power of ten).

use crate::plot::Series;
use std::fmt::Write;

const PALETTE: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const WIDTH: f64 = 960.0;
const LEFT: f64 = 80.0;
/// Room for the legend, right of the panels.
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const LOSS_HEIGHT: f64 = 360.0;
const PANEL_HEIGHT: f64 = 140.0;
const GAP: f64 = 46.0;

/// An axis range widened to round tick values.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub step: f64,
}

impl Axis {
    /// About `n` intervals covering `lo..hi`, each 1, 2 or 5 times a power of ten.
    pub fn nice(lo: f64, hi: f64, n: usize) -> Axis {
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0)) };
        let raw = (hi - lo) / n.max(1) as f64;
        let mag = 10f64.powf(log10_floor(raw));
        let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * mag);
        Axis { lo: (lo / step + 1e-9).floor() * step, hi: (hi / step - 1e-9).ceil() * step, step }
    }

    pub fn ticks(&self) -> Vec<f64> {
        let n = ((self.hi - self.lo) / self.step).round() as i64;
        // computed from integers, so that a tick is exactly k * step
        (0..=n).map(|i| ((self.lo / self.step).round() + i as f64) * self.step).collect()
    }

    /// A tick value written as short as its step allows: 250, 0.25, 3e-4, 120k.
    pub fn label(&self, v: f64) -> String {
        if v == 0.0 {
            return "0".into();
        }
        let step_exp = log10_floor(self.step);
        if self.step < 1e-3 {
            let digits = (log10_floor(v.abs()) - step_exp).max(0.0) as usize;
            return format!("{v:.digits$e}");
        }
        if self.step >= 1e3 {
            let k = (step_exp / 3.0).floor().min(4.0);
            let unit = 10f64.powf(3.0 * k);
            let digits = (3.0 * k - step_exp).max(0.0) as usize;
            return format!("{:.digits$}{}", v / unit, ["", "k", "M", "G", "T"][k as usize]);
        }
        format!("{v:.*}", (-step_exp).max(0.0) as usize)
    }
}

fn log10_floor(x: f64) -> f64 {
    (x.log10() + 1e-9).floor()
}

/// Trailing mean of the last `n` values (fewer at the start).
pub fn smooth(pts: &[(f64, f64)], n: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(pts.len());
    for (i, &(x, y)) in pts.iter().enumerate() {
        sum += y;
        if i >= n {
            sum -= pts[i - n].1;
        }
        out.push((x, sum / (i + 1).min(n) as f64));
    }
    out
}

/// The points of one panel's quantity in a series.
type Points = fn(&Series) -> &[(f64, f64)];

struct Line<'a> {
    pts: &'a [(f64, f64)],
    color: &'a str,
    width: f64,
    opacity: f64,
    dashed: bool,
    dots: bool,
}

struct Panel<'a> {
    name: &'a str,
    top: f64,
    height: f64,
    lines: Vec<Line<'a>>,
    /// Horizontal reference lines (value, label).
    marks: Vec<(f64, String)>,
}

pub fn render_svg(series: &[Series], title: &str, smooth_n: usize) -> String {
    let smoothed: Vec<Vec<(f64, f64)>> = series.iter().map(|s| if smooth_n > 1 { smooth(&s.train, smooth_n) } else { vec![] }).collect();
    let color = |i: usize| PALETTE[i % PALETTE.len()];
    let mut loss = Panel { name: "loss (nats/token)", top: TOP, height: LOSS_HEIGHT, lines: vec![], marks: vec![] };
    for (i, s) in series.iter().enumerate() {
        let faint = smooth_n > 1;
        loss.lines.push(Line { pts: &s.train, color: color(i), width: 1.2, opacity: if faint { 0.3 } else { 1.0 }, dashed: false, dots: false });
        if faint {
            loss.lines.push(Line { pts: &smoothed[i], color: color(i), width: 1.8, opacity: 1.0, dashed: false, dots: false });
        }
        loss.lines.push(Line { pts: &s.eval, color: color(i), width: 2.0, opacity: 1.0, dashed: true, dots: true });
        if let Some(f) = s.floor.filter(|f| !loss.marks.iter().any(|m| m.0 == *f)) {
            loss.marks.push((f, format!("entropy floor {f:.3}")));
        }
    }
    let mut panels = vec![loss];
    let extra: [(&str, Points); 4] = [
        ("learning rate", |s| &s.lr),
        ("gradient norm", |s| &s.norm),
        ("tokens/s", |s| &s.tokens_per_s),
        ("fp8: largest fraction flushed to zero", |s| &s.fp8_flushed),
    ];
    for (name, get) in extra {
        if series.iter().all(|s| get(s).is_empty()) {
            continue;
        }
        let top = panels.last().map_or(TOP, |p| p.top + p.height + GAP);
        let lines = series.iter().enumerate().map(|(i, s)| Line { pts: get(s), color: color(i), width: 1.2, opacity: 1.0, dashed: false, dots: false }).collect();
        panels.push(Panel { name, top, height: PANEL_HEIGHT, lines, marks: vec![] });
    }
    let xs = panels.iter().flat_map(|p| p.lines.iter().flat_map(|l| l.pts.iter().map(|p| p.0)));
    let x = range(xs).map_or(Axis::nice(0.0, 1.0, 8), |(lo, hi)| Axis::nice(lo, hi, 8));
    let height = panels.last().map_or(TOP, |p| p.top + p.height) + GAP;

    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, (LEFT + WIDTH - RIGHT) / 2.0, xml_escape(title));
    for p in &panels {
        draw_panel(&mut s, p, &x);
    }
    let bottom = height - GAP;
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, (LEFT + WIDTH - RIGHT) / 2.0, bottom + 34.0);
    draw_legend(&mut s, series, smooth_n);
    s.push_str("</svg>\n");
    s
}

fn range(v: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    v.filter(|x| x.is_finite()).fold(None, |r, x| Some(r.map_or((x, x), |(lo, hi): (f64, f64)| (lo.min(x), hi.max(x)))))
}

fn draw_panel(s: &mut String, p: &Panel, x: &Axis) {
    let right = WIDTH - RIGHT;
    let ys = p.lines.iter().flat_map(|l| l.pts.iter().map(|q| q.1)).chain(p.marks.iter().map(|m| m.0));
    let y = range(ys).map_or(Axis::nice(0.0, 1.0, 4), |(lo, hi)| Axis::nice(lo, hi, if p.height > 200.0 { 8 } else { 4 }));
    let sx = |v: f64| LEFT + (v - x.lo) / (x.hi - x.lo) * (right - LEFT);
    let sy = |v: f64| p.top + (y.hi - v) / (y.hi - y.lo) * p.height;
    let bottom = p.top + p.height;
    for t in y.ticks() {
        let yy = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{right}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 6.0,
            yy + 4.0,
            y.label(t)
        );
    }
    for t in x.ticks() {
        let xx = sx(t);
        let _ = writeln!(
            s,
            r##"<line y1="{}" y2="{bottom}" x1="{xx:.1}" x2="{xx:.1}" stroke="#eee"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
            p.top,
            bottom + 15.0,
            x.label(t)
        );
    }
    let _ = writeln!(s, r##"<rect x="{LEFT}" y="{}" width="{}" height="{}" fill="none" stroke="#999"/>"##, p.top, right - LEFT, p.height);
    let mid = p.top + p.height / 2.0;
    let _ = writeln!(s, r#"<text x="16" y="{mid}" transform="rotate(-90 16 {mid})" text-anchor="middle">{}</text>"#, p.name);
    for (v, _) in &p.marks {
        let yy = sy(*v);
        let _ = writeln!(s, r##"<line x1="{LEFT}" x2="{right}" y1="{yy:.1}" y2="{yy:.1}" stroke="#2ca02c" stroke-dasharray="6 4"/>"##);
    }
    for l in &p.lines {
        let pts: Vec<String> = l.pts.iter().filter(|q| q.0.is_finite() && q.1.is_finite()).map(|&(a, b)| format!("{:.1},{:.1}", sx(a), sy(b))).collect();
        if pts.is_empty() {
            continue;
        }
        let dash = if l.dashed { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="{}" stroke-opacity="{}"{dash} points="{}"/>"#,
            l.color,
            l.width,
            l.opacity,
            pts.join(" ")
        );
        if l.dots {
            for q in &pts {
                let (cx, cy) = q.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(s, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{}"/>"#, l.color);
            }
        }
    }
}

fn draw_legend(s: &mut String, series: &[Series], smooth_n: usize) {
    let x = WIDTH - RIGHT + 16.0;
    let mut entries: Vec<(&str, bool, String)> = series.iter().enumerate().map(|(i, se)| (PALETTE[i % PALETTE.len()], false, se.label.clone())).collect();
    entries.push(("#555", false, if smooth_n > 1 { format!("train loss (mean of {smooth_n} steps)") } else { "train loss".into() }));
    entries.push(("#555", true, "eval loss".into()));
    let mut floors: Vec<f64> = series.iter().filter_map(|s| s.floor).collect();
    floors.dedup();
    entries.extend(floors.iter().map(|f| ("#2ca02c", true, format!("entropy floor {f:.3}"))));
    for (i, (color, dashed, label)) in entries.iter().enumerate() {
        let y = TOP + 12.0 + 18.0 * i as f64;
        let dash = if *dashed { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = writeln!(
            s,
            r#"<line x1="{x}" x2="{}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"#,
            x + 24.0,
            x + 30.0,
            y + 4.0,
            xml_escape(label)
        );
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_fall_on_round_numbers() {
        let a = Axis::nice(1.0, 250.0, 8);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 250.0, 50.0));
        assert_eq!(a.ticks(), vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0]);
        assert_eq!(a.ticks().iter().map(|t| a.label(*t)).collect::<Vec<_>>(), ["0", "50", "100", "150", "200", "250"]);
        let l = Axis::nice(1.356, 5.61, 8);
        assert_eq!((l.lo, l.hi, l.step), (1.0, 6.0, 1.0));
        assert_eq!(l.label(3.0), "3");
        let l = Axis::nice(1.3, 3.4, 8);
        assert_eq!((l.lo, l.hi, l.step), (1.0, 3.5, 0.5));
        assert_eq!(l.ticks().iter().map(|t| l.label(*t)).collect::<Vec<_>>(), ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5"]);
        let lr = Axis::nice(0.0, 3e-4, 4);
        assert_eq!(lr.step, 1e-4);
        assert_eq!(lr.ticks().iter().map(|t| lr.label(*t)).collect::<Vec<_>>(), ["0", "1e-4", "2e-4", "3e-4"]);
        let tps = Axis::nice(61_000.0, 123_456.0, 4);
        assert_eq!((tps.lo, tps.hi, tps.step), (60_000.0, 140_000.0, 20_000.0));
        assert_eq!(tps.label(120_000.0), "120k");
        // a flat series still gets a range
        let flat = Axis::nice(2.0, 2.0, 4);
        assert!(flat.lo < 2.0 && flat.hi > 2.0, "{flat:?}");
    }

    #[test]
    fn smoothing_is_a_trailing_mean() {
        let pts = [(1.0, 4.0), (2.0, 2.0), (3.0, 6.0), (4.0, 0.0)];
        assert_eq!(smooth(&pts, 2), vec![(1.0, 4.0), (2.0, 3.0), (3.0, 4.0), (4.0, 3.0)]);
    }

    #[test]
    fn draws_a_curve_per_series_and_the_panels_the_log_holds() {
        let a = Series { label: "a.jsonl".into(), train: vec![(1.0, 5.0), (2.0, 4.0)], eval: vec![(2.0, 4.5)], lr: vec![(1.0, 1e-3)], floor: Some(1.5), ..Default::default() };
        let b = Series { label: "b.jsonl".into(), train: vec![(1.0, 6.0), (3.0, 3.0)], ..Default::default() };
        let svg = render_svg(&[a, b], "t", 0);
        assert!(svg.starts_with("<svg") && svg.contains("entropy floor 1.500"));
        assert!(svg.contains("a.jsonl") && svg.contains("b.jsonl"));
        assert!(svg.contains(">learning rate<"));
        assert!(!svg.contains(">gradient norm<") && !svg.contains(">tokens/s<"), "no data, no panel");
        // two train lines and one eval line; with --smooth, a smoothed line per series more
        assert_eq!(svg.matches("<polyline").count(), 4);
        let a = Series { label: "a".into(), train: vec![(1.0, 5.0), (2.0, 4.0)], ..Default::default() };
        let svg = render_svg(&[a], "t", 3);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("train loss (mean of 3 steps)"));
    }
}
