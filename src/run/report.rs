//! What `sppo run` tells the user on stderr, in one of four modes:
//! - normal: a line per stage, progress bars per stage (prompts, pairs, examples, steps; with
//!   tokens/s, loss and ETA) when stderr is a terminal;
//! - `--quiet`: errors only;
//! - `--verbose`: normal, plus a line per optimizer step and stage timings;
//! - `--log-json`: one JSON object per event, no bars: `{"event": "stage_start" | "stage_end" |
//!   "train_step" | "eval" | "info", "time_unix": ..., ...}`.

use serde_json::{json, Value};
use std::io::{IsTerminal, Write};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogMode {
    #[default]
    Normal,
    Quiet,
    Verbose,
    Json,
}

pub struct Reporter {
    mode: LogMode,
    bars: bool,
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Reporter {
    /// Bars are drawn only in normal and verbose modes, and only when stderr is a terminal.
    pub fn new(mode: LogMode) -> Self {
        let bars = matches!(mode, LogMode::Normal | LogMode::Verbose) && std::io::stderr().is_terminal();
        Reporter { mode, bars }
    }

    pub fn mode(&self) -> LogMode {
        self.mode
    }

    /// Whether progress bars are drawn.
    pub fn bars(&self) -> bool {
        self.bars
    }

    fn json(&self, event: &str, mut fields: Value) {
        if let Some(o) = fields.as_object_mut() {
            o.insert("event".into(), event.into());
            o.insert("time_unix".into(), now_unix().into());
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{fields}");
    }

    /// A plain message (normal and verbose modes; an `info` event in JSON mode).
    pub fn info(&self, message: &str) {
        match self.mode {
            LogMode::Normal | LogMode::Verbose => eprintln!("{message}"),
            LogMode::Json => self.json("info", json!({"message": message})),
            LogMode::Quiet => {}
        }
    }

    /// A detail shown only with `--verbose` (a `debug` event in JSON mode).
    pub fn detail(&self, message: &str) {
        match self.mode {
            LogMode::Verbose => eprintln!("{message}"),
            LogMode::Json => self.json("debug", json!({"message": message})),
            _ => {}
        }
    }

    pub fn stage_start(&self, iteration: u32, stage: &str, message: &str) {
        match self.mode {
            LogMode::Normal | LogMode::Verbose => eprintln!("iteration {iteration}: {message}"),
            LogMode::Json => self.json("stage_start", json!({"iteration": iteration, "stage": stage, "message": message})),
            LogMode::Quiet => {}
        }
    }

    pub fn stage_end(&self, iteration: u32, stage: &str, seconds: f64, info: &Value) {
        match self.mode {
            LogMode::Verbose => eprintln!("iteration {iteration}: {stage} done in {seconds:.1} s {info}"),
            LogMode::Json => self.json("stage_end", json!({"iteration": iteration, "stage": stage, "seconds": seconds, "info": info})),
            _ => {}
        }
    }

    /// One optimizer step's metrics line.
    pub fn train_step(&self, line: &Value) {
        match self.mode {
            LogMode::Verbose => eprintln!(
                "iteration {} step {}: loss {:.6e} grad_norm {:.4e} lr {:.3e}{}",
                line["iteration"],
                line["step"],
                line["loss"].as_f64().unwrap_or(f64::NAN),
                line["grad_norm"].as_f64().unwrap_or(f64::NAN),
                line["lr"].as_f64().unwrap_or(f64::NAN),
                if line["skipped"] == true { " (update skipped: spike)" } else { "" }
            ),
            LogMode::Json => self.json("train_step", line.clone()),
            _ => {}
        }
    }

    /// An evaluation result (for the evaluation stage).
    pub fn eval(&self, line: &Value) {
        match self.mode {
            LogMode::Normal => eprintln!("{}", eval_summary(line)),
            LogMode::Verbose => eprintln!("{}\n  {line}", eval_summary(line)),
            LogMode::Json => self.json("eval", line.clone()),
            LogMode::Quiet => {}
        }
    }

    /// A progress bar of `len` units, hidden unless bars are drawn.
    pub fn bar(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        if !self.bars {
            return indicatif::ProgressBar::hidden();
        }
        let pb = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
        pb.set_style(
            indicatif::ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    }
}

/// One readable line from an eval metrics line: win-rates with their intervals, exploitability.
fn eval_summary(line: &Value) -> String {
    let mut parts = Vec::new();
    for (key, what) in [("eval_win_rate_vs_base", "win-rate vs base"), ("eval_win_rate_vs_previous", "vs previous")] {
        if let (Some(m), Some(lo), Some(hi)) =
            (line[key].as_f64(), line[format!("{key}_lo")].as_f64(), line[format!("{key}_hi")].as_f64())
        {
            parts.push(format!("{what} {m:.3} [{lo:.3}, {hi:.3}]"));
        }
    }
    if let (Some(e), Some(mix)) = (line["eval_exploitability"].as_f64(), line["eval_mixture_exploitability"].as_f64()) {
        parts.push(format!("exploitability {e:.4} (mixture of iterates {mix:.4})"));
    }
    let it = line["iteration"].as_u64().unwrap_or(0);
    if parts.is_empty() {
        format!("iteration {it}: evaluated")
    } else {
        format!("iteration {it}: {}", parts.join(", "))
    }
}
