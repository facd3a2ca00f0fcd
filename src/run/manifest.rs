//! The run manifest (`<run_dir>/manifest.json`): what is complete, per iteration and stage. Every
//! stage writes its files atomically first and records itself here last, so after a crash the
//! manifest never claims work whose files are missing; `--resume` trusts the manifest and nothing
//! else (DESIGN.md).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The stages of one iteration, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Generate,
    Rank,
    RefLogprobs,
    Train,
    Checkpoint,
    Eval,
}

impl Stage {
    pub const ALL: [Stage; 6] = [Stage::Generate, Stage::Rank, Stage::RefLogprobs, Stage::Train, Stage::Checkpoint, Stage::Eval];
    pub fn name(self) -> &'static str {
        match self {
            Stage::Generate => "generate",
            Stage::Rank => "rank",
            Stage::RefLogprobs => "ref_logprobs",
            Stage::Train => "train",
            Stage::Checkpoint => "checkpoint",
            Stage::Eval => "eval",
        }
    }
}

/// One completed stage: when, and the files it produced (relative to the run directory).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub files: Vec<String>,
    pub completed_unix: u64,
    /// Stage-specific facts (counts, figures) worth keeping.
    #[serde(default)]
    pub info: serde_json::Value,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// A hash of the resolved configuration: resuming with a different one is refused.
    pub config_hash: String,
    /// iteration (1-based) → stage → record.
    pub iterations: BTreeMap<u32, BTreeMap<Stage, StageRecord>>,
}

impl Manifest {
    pub const FORMAT_VERSION: u32 = 1;

    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("manifest.json")
    }

    pub fn new(config_hash: String) -> Self {
        Manifest { format_version: Self::FORMAT_VERSION, config_hash, iterations: BTreeMap::new() }
    }

    pub fn load(run_dir: &Path) -> Result<Option<Self>> {
        let p = Self::path(run_dir);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("{}: malformed manifest", p.display()))?;
        if m.format_version != Self::FORMAT_VERSION {
            bail!("{}: manifest format {} is not supported (expected {})", p.display(), m.format_version, Self::FORMAT_VERSION);
        }
        // A record whose files are gone means someone deleted them: refuse rather than redo silently.
        for (it, stages) in &m.iterations {
            for (stage, rec) in stages {
                for f in &rec.files {
                    if !run_dir.join(f).exists() {
                        bail!("{}: iteration {it} stage {} lists {f}, which is missing", p.display(), stage.name());
                    }
                }
            }
        }
        Ok(Some(m))
    }

    pub fn save(&self, run_dir: &Path) -> Result<()> {
        crate::io::write_atomic(&Self::path(run_dir), serde_json::to_string_pretty(self)?.as_bytes())
    }

    pub fn is_done(&self, iteration: u32, stage: Stage) -> bool {
        self.iterations.get(&iteration).is_some_and(|s| s.contains_key(&stage))
    }

    pub fn record(&self, iteration: u32, stage: Stage) -> Option<&StageRecord> {
        self.iterations.get(&iteration).and_then(|s| s.get(&stage))
    }

    /// Marks a stage complete and saves the manifest (the last write of every stage).
    pub fn complete(&mut self, run_dir: &Path, iteration: u32, stage: Stage, files: Vec<String>, info: serde_json::Value) -> Result<()> {
        let completed_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.iterations.entry(iteration).or_default().insert(stage, StageRecord { files, completed_unix, info });
        self.save(run_dir)
    }
}

/// A stable hash of a serialisable value (the resolved config), FNV-1a over its JSON.
pub fn config_hash<T: Serialize>(value: &T) -> Result<String> {
    let text = serde_json::to_string(value)?;
    Ok(format!("{:016x}", crate::rng::fnv1a64(text.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut m = Manifest::new("abc".into());
        std::fs::write(dir.join("gen.jsonl"), "x").unwrap();
        m.complete(dir, 1, Stage::Generate, vec!["gen.jsonl".into()], serde_json::json!({"prompts": 3})).unwrap();
        let back = Manifest::load(dir).unwrap().unwrap();
        assert_eq!(back, m);
        assert!(back.is_done(1, Stage::Generate) && !back.is_done(1, Stage::Rank) && !back.is_done(2, Stage::Generate));
        std::fs::remove_file(dir.join("gen.jsonl")).unwrap();
        let err = format!("{:#}", Manifest::load(dir).unwrap_err());
        assert!(err.contains("gen.jsonl") && err.contains("missing"), "{err}");
    }
}
