//! PNG plots of a run (`<run_dir>/plots/`), drawn with `plotters` on its bitmap backend:
//! - `training.png`: loss, grad norm (before clipping), the chosen/rejected log-ratios and the lr
//!   against the optimizer step (counted across iterations), from `metrics.jsonl`;
//! - `eval.png`: per iteration, the win-rate against the base and against the previous iteration
//!   with their 95% intervals, and on a game the exploitability of π_t and of the mixture, from
//!   `eval.json`.
//!
//! Text is rendered with DejaVu Sans, shipped in `assets/fonts/` (license beside it) and compiled
//! in, through plotters' `ab_glyph` feature: no system font is needed, and plots look the same on
//! every machine. Each PNG is written to a temporary name and renamed (atomic, like every file of
//! a run).

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    anyhow::ensure!(
        ok,
        "the shipped font assets/fonts/DejaVuSans.ttf could not be loaded"
    );
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(what: &Path) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{}: drawing failed: {e:?}", what.display())
}

/// One named line of points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Optional (x, lo, hi) error bars.
    pub bars: Vec<(f64, f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            bars: vec![],
        }
    }
}

/// One panel: a title, axis labels and its series.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.5 * lo.abs().max(1e-3)
    };
    (lo - pad, hi + pad)
}

/// An oracle spec shortened for a title: `similarity:.cache/models/all-MiniLM-L6-v2` →
/// `similarity:all-MiniLM-L6-v2` (the directory's last component; options dropped).
fn short_oracle(spec: &str) -> String {
    match spec.split_once(':') {
        Some((kind, rest)) if kind != "command" => {
            let target = rest.split(',').next().unwrap_or(rest).trim_end_matches('/');
            let last = target.rsplit('/').next().unwrap_or(target);
            format!("{kind}:{last}")
        }
        _ => spec.chars().take(40).collect(),
    }
}

/// A tick label: plain decimals (trailing zeros dropped) for ordinary magnitudes, else scientific.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-3..1e5).contains(&a) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".into()
        } else {
            s.into()
        }
    } else {
        format!("{v:.2e}")
    }
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    panel: &Panel,
    path: &Path,
) -> Result<()> {
    let xs = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = panel.series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.bars.iter().flat_map(|b| [b.1, b.2]))
    });
    let integer_x = panel.series.iter().all(|s| s.points.iter().all(|p| p.0.fract() == 0.0));
    let (x0, x1) = range(xs);
    // Iterations are whole numbers: one tick per iteration, no fractional labels.
    let x_ticks = if integer_x && x1 - x0 <= 20.0 { (x1 - x0).ceil() as usize + 1 } else { 10 };
    let x_tick = move |v: &f64| if integer_x && v.fract() != 0.0 { String::new() } else { tick(v) };
    let (y0, y1) = range(ys);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err(path))?;
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .label_style((FAMILY, 14))
        .x_labels(x_ticks)
        .x_label_formatter(&x_tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(plot_err(path))?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(plot_err(path))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if s.points.len() <= 40 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err(path))?;
        }
        chart
            .draw_series(s.bars.iter().map(|&(x, lo, hi)| {
                ErrorBar::new_vertical(x, lo, (lo + hi) / 2.0, hi, color.stroke_width(1), 8)
            }))
            .map_err(plot_err(path))?;
    }
    if panel.series.len() > 1 || panel.series.first().is_some_and(|s| !s.name.is_empty()) {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_err(path))?;
    }
    Ok(())
}

/// Draws `panels` in a grid of `cols` columns into the PNG `path` (atomically).
pub fn draw_panels(path: &Path, panels: &[Panel], cols: usize) -> Result<()> {
    register_font()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The image encoder picks the format from the extension: keep `.png` on the temporary name.
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}.png", std::process::id()));
    let cols = cols.max(1);
    let rows = panels.len().div_ceil(cols).max(1);
    let result = (|| -> Result<()> {
        let root =
            BitMapBackend::new(&tmp, (560 * cols as u32, 400 * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err(path))?;
        let areas = root.split_evenly((rows, cols));
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, panel, path)?;
        }
        root.present().map_err(plot_err(path))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    // A malformed line (e.g. cut by a crash) is skipped: plots are a view, not a record.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Writes `plots/training.png` (when metrics.jsonl has steps) and `plots/eval.png` (when
/// eval.json exists); returns the files written.
pub fn write_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = vec![];
    let steps: Vec<serde_json::Value> = read_jsonl(&run_dir.join("metrics.jsonl"))?
        .into_iter()
        .filter(|v| v.get("step").is_some() && v.get("loss").is_some())
        .collect();
    if !steps.is_empty() {
        let series = |key: &str| -> Vec<(f64, f64)> {
            steps
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v[key].as_f64().map(|y| ((i + 1) as f64, y)))
                .collect()
        };
        let panel = |title: &str, y: &str, s: Vec<Series>| Panel {
            title: title.into(),
            x_label: "optimizer step (all iterations)".into(),
            y_label: y.into(),
            series: s,
        };
        let panels = vec![
            panel("loss", "loss", vec![Series::new("", series("loss"))]),
            panel(
                "gradient norm (before clipping)",
                "grad norm",
                vec![Series::new("", series("grad_norm"))],
            ),
            panel(
                "log-ratios log π/π_ref",
                "nats",
                vec![
                    Series::new("chosen", series("chosen_logratio")),
                    Series::new("rejected", series("rejected_logratio")),
                ],
            ),
            panel("learning rate", "lr", vec![Series::new("", series("lr"))]),
        ];
        let p = run_dir.join("plots/training.png");
        draw_panels(&p, &panels, 2)?;
        written.push(p);
    }
    let eval_path = run_dir.join("eval.json");
    if eval_path.exists() {
        let text = std::fs::read_to_string(&eval_path)
            .with_context(|| format!("{}: cannot read", eval_path.display()))?;
        let report: super::eval::EvalReport = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed", eval_path.display()))?;
        let mut panels = vec![];
        let mut win = vec![];
        for (name, pick) in [
            (
                "vs base",
                (|p: &super::eval::PolicyEval| p.win_rate_vs_base)
                    as fn(&super::eval::PolicyEval) -> Option<super::eval::Interval>,
            ),
            ("vs previous iteration", |p| p.win_rate_vs_previous),
        ] {
            let ivs: Vec<(f64, super::eval::Interval)> = report
                .policies
                .iter()
                .filter_map(|p| pick(p).map(|iv| (p.iteration as f64, iv)))
                .collect();
            if !ivs.is_empty() {
                win.push(Series {
                    name: name.into(),
                    points: ivs.iter().map(|(x, iv)| (*x, iv.mean)).collect(),
                    bars: ivs.iter().map(|(x, iv)| (*x, iv.lo, iv.hi)).collect(),
                });
            }
        }
        if !win.is_empty() {
            panels.push(Panel {
                title: format!("win-rate, 95% interval ({})", short_oracle(&report.oracle)),
                x_label: "iteration".into(),
                y_label: "win-rate".into(),
                series: win,
            });
        }
        let games: Vec<(f64, &super::eval::GameFigures)> = report
            .policies
            .iter()
            .filter_map(|p| p.game.as_ref().map(|g| (p.iteration as f64, g)))
            .collect();
        if !games.is_empty() {
            panels.push(Panel {
                title: "exploitability (exact)".into(),
                x_label: "iteration".into(),
                y_label: "max_c P(c > π) - 1/2".into(),
                series: vec![
                    Series::new(
                        "last iterate π_t",
                        games.iter().map(|(x, g)| (*x, g.exploitability)).collect(),
                    ),
                    Series::new(
                        "mixture of π_0..π_t",
                        games
                            .iter()
                            .map(|(x, g)| (*x, g.mixture_exploitability))
                            .collect(),
                    ),
                ],
            });
        }
        if !panels.is_empty() {
            let p = run_dir.join("plots/eval.png");
            let cols = panels.len();
            draw_panels(&p, &panels, cols)?;
            written.push(p);
        }
    }
    Ok(written)
}
