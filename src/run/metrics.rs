//! `metrics.jsonl`: the run's event log, one JSON object per line, appended and fsynced line by
//! line (a kill loses at most the line being written; a torn last line is cut off on open).
//!
//! Every line has `kind` (`train`: one optimizer step; other stages add their own, e.g. `eval`) and
//! `iteration`. On resume, [`MetricsLog::rewind_training`] drops the lines of work that is being
//! redone, so a resumed run's log equals an uninterrupted one's (wall-clock fields aside).

use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens (creating) the log for appending, cutting a torn last line left by a kill.
    pub fn open(path: &Path) -> Result<Self> {
        if path.exists() {
            let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
            if let Some(end) = text.iter().rposition(|&c| c == b'\n').map(|i| i + 1).or(Some(0)).filter(|&e| e < text.len()) {
                crate::io::write_atomic(path, &text[..end])?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("{}: cannot open for appending", path.display()))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every complete line, parsed.
    pub fn lines(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.path).with_context(|| format!("{}: cannot read", self.path.display()))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: malformed JSON", self.path.display(), i + 1)))
            .collect()
    }

    /// Appends one line and syncs it to disk.
    pub fn append(&mut self, line: &Value) -> Result<()> {
        let mut text = line.to_string();
        text.push('\n');
        self.file.write_all(text.as_bytes()).with_context(|| format!("writing {}", self.path.display()))?;
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))
    }

    /// Keeps only the lines `keep` accepts (atomic rewrite); returns how many were dropped.
    pub fn retain(&mut self, keep: impl Fn(&Value) -> bool) -> Result<usize> {
        let lines = self.lines()?;
        let kept: Vec<&Value> = lines.iter().filter(|l| keep(l)).collect();
        let dropped = lines.len() - kept.len();
        if dropped > 0 {
            let mut text = String::new();
            for l in kept {
                text.push_str(&l.to_string());
                text.push('\n');
            }
            crate::io::write_atomic(&self.path, text.as_bytes())?;
            // The old handle points at the replaced file.
            self.file = OpenOptions::new().append(true).open(&self.path).with_context(|| format!("{}: cannot open for appending", self.path.display()))?;
        }
        Ok(dropped)
    }

    /// Training of `iteration` restarts after step `step` (0: from the start): drops its `train`
    /// lines past that step and every line of later iterations (written before a kill, redone now).
    pub fn rewind_training(&mut self, iteration: u32, step: usize) -> Result<usize> {
        self.retain(|l| {
            let it = l["iteration"].as_u64().unwrap_or(0);
            let later_step = l["kind"] == "train" && l["step"].as_u64().unwrap_or(0) > step as u64;
            it < iteration as u64 || (it == iteration as u64 && !later_step)
        })
    }
}

/// This process's resident set size in bytes (`VmRSS` of /proc/self/status); 0 where unknown.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())))
        .flatten()
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_lines_are_cut_and_rewind_drops_redone_work() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metrics.jsonl");
        let line = |it: u32, step: u64| serde_json::json!({"kind": "train", "iteration": it, "step": step});
        std::fs::write(&p, format!("{}\n{}\n{}\n{{\"kind\": \"tr", line(1, 1), line(1, 2), line(2, 1))).unwrap();
        let mut log = MetricsLog::open(&p).unwrap();
        assert_eq!(log.lines().unwrap().len(), 3);
        log.append(&serde_json::json!({"kind": "eval", "iteration": 1})).unwrap();
        assert_eq!(log.rewind_training(1, 1).unwrap(), 2);
        log.append(&line(1, 2)).unwrap();
        let lines = log.lines().unwrap();
        assert_eq!(lines, vec![line(1, 1), serde_json::json!({"kind": "eval", "iteration": 1}), line(1, 2)]);
        assert!(resident_bytes() > 0);
    }
}
