//! `sppo run` configuration: one set of keys, read from a TOML file and from flags (each key is
//! also a `--flag-with-dashes`; flags win), resolved against the reference recipe's defaults
//! (SPPO.md) and validated. Keys follow TRL's `DPOConfig` names wherever one exists, so users carry
//! their settings over; unknown keys are errors.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every key, optional: what a TOML file or the command line sets. `None` = not given.
#[derive(Args, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunKeys {
    // ---- what to run ----
    /// Policy to start from (Hugging Face directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt file (JSONL, Parquet, ShareGPT JSON).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Preference oracle spec (similarity:DIR, reward:DIR, judge:DIR, command:"CMD", game:NAME).
    #[arg(long)]
    pub oracle: Option<String>,
    /// Run directory (config, generations, rankings, checkpoints, metrics, manifest).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// SPPO iterations.
    #[arg(long)]
    pub iterations: Option<u32>,
    /// Prompts used per iteration (the prompt set is split across iterations; default: all / iterations).
    #[arg(long)]
    pub prompts_per_iteration: Option<usize>,
    /// Held-out prompts for evaluation (taken from the end of the prompt file).
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Responses sampled per held-out prompt and policy for the win-rates (default 1).
    #[arg(long)]
    pub eval_num_samples: Option<u32>,
    // ---- sampling ----
    /// Responses sampled per prompt (K).
    #[arg(long)]
    pub num_samples: Option<u32>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Sequences decoded together.
    #[arg(long)]
    pub generation_batch_size: Option<usize>,
    // ---- ranking ----
    /// Win-rate estimate: `scores` (the reference's) or `pairwise` (direct).
    #[arg(long)]
    pub winrate: Option<String>,
    /// Which responses train: `best-worst` (the reference) or `all` (the paper's Algorithm 1).
    #[arg(long)]
    pub train_on: Option<String>,
    // ---- training (TRL DPOConfig names) ----
    /// sppo | sppo_single | sppo_hard | dpo | ipo.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// β (η = 1/β for the SPPO losses).
    #[arg(long)]
    pub beta: Option<f64>,
    /// η, accepted as 1/β.
    #[arg(long)]
    pub eta: Option<f64>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// linear | constant | cosine.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// rmsprop | adamw.
    #[arg(long)]
    pub optim: Option<String>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Gradient-norm clipping (0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    #[arg(long)]
    pub num_train_epochs: Option<u32>,
    /// Prompt + response tokens kept.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Prompt tokens kept (truncated from the left).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute activations per layer in backward (less memory, ~1/3 more compute).
    #[arg(long)]
    pub gradient_checkpointing: Option<bool>,
    /// Save optimizer state every N optimizer steps within an iteration.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Checkpoint dtype: f32 | bf16.
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Spike guard: skip an update whose loss or grad norm is above this factor × its running
    /// average (counted as `skipped_steps` in metrics.jsonl); 0 (the default) disables it.
    #[arg(long)]
    pub skip_spike_factor: Option<f64>,
    /// Weights generation reads: auto (a bf16 copy when exact), f32, or bf16 (rounded; faster
    /// CPU sampling of trained f32 weights).
    #[arg(long)]
    pub decode_weights: Option<crate::generate::DecodeWeights>,
}

impl RunKeys {
    /// Reads a TOML file; unknown keys and wrong types are errors naming the file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the run config", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// `self` with every key `over` sets replaced.
    pub fn overridden_by(&self, over: &RunKeys) -> RunKeys {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(over).unwrap_or_default();
        let mut merged = a.as_object().cloned().unwrap_or_default();
        for (k, v) in b.as_object().into_iter().flatten() {
            if !v.is_null() {
                merged.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(serde_json::Value::Object(merged)).unwrap_or_else(|_| over.clone())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WinrateEstimate {
    Scores,
    Pairwise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainOn {
    BestWorst,
    All,
}

/// The resolved configuration of a run: every value set, validated.
#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    pub model: PathBuf,
    pub prompts: PathBuf,
    pub oracle: String,
    pub run_dir: PathBuf,
    pub iterations: u32,
    pub prompts_per_iteration: Option<usize>,
    pub eval_prompts: usize,
    pub eval_num_samples: u32,
    pub num_samples: u32,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub generation_batch_size: usize,
    pub winrate: WinrateEstimate,
    pub train_on: TrainOn,
    pub loss_type: String,
    pub beta: f64,
    pub learning_rate: f64,
    pub lr_scheduler_type: String,
    pub warmup_ratio: f64,
    pub optim: String,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: u32,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub seed: u64,
    pub gradient_checkpointing: bool,
    pub save_steps: usize,
    pub save_dtype: String,
    pub skip_spike_factor: f64,
    /// Left out of config.json (and so of the run's config hash) at its default, so runs started
    /// before the key existed still resume.
    #[serde(skip_serializing_if = "crate::generate::DecodeWeights::is_auto")]
    pub decode_weights: crate::generate::DecodeWeights,
}

fn one_of(key: &str, value: &str, choices: &[&str]) -> Result<String> {
    if choices.contains(&value) {
        Ok(value.to_string())
    } else {
        bail!("`{key}` = {value:?} is not one of: {}", choices.join(", "))
    }
}

impl RunConfig {
    /// Defaults follow the reference recipe (SPPO.md): K 5, temperature 0.7, top-p 0.9, η 1000,
    /// lr 5e-7, RMSprop, linear schedule with 10% warm-up, global batch 64 (8 × 8), max length
    /// 1024 / prompt 512, clip 1.0, 3 iterations, seed 42.
    pub fn resolve(k: &RunKeys) -> Result<Self> {
        let need = |v: &Option<PathBuf>, key: &str| v.clone().with_context(|| format!("`{key}` is required (in the config file or as --{})", key.replace('_', "-")));
        let beta = match (k.beta, k.eta) {
            (Some(_), Some(_)) => bail!("give either `beta` or `eta` (= 1/beta), not both"),
            (Some(b), None) => b,
            (None, Some(e)) => {
                if !(e.is_finite() && e > 0.0) {
                    bail!("`eta` must be positive, got {e}");
                }
                1.0 / e
            }
            (None, None) => 1e-3,
        };
        let c = RunConfig {
            model: need(&k.model, "model")?,
            prompts: need(&k.prompts, "prompts")?,
            oracle: k.oracle.clone().context("`oracle` is required (in the config file or as --oracle)")?,
            run_dir: need(&k.run_dir, "run_dir")?,
            iterations: k.iterations.unwrap_or(3),
            prompts_per_iteration: k.prompts_per_iteration,
            eval_prompts: k.eval_prompts.unwrap_or(0),
            eval_num_samples: k.eval_num_samples.unwrap_or(1),
            num_samples: k.num_samples.unwrap_or(5),
            max_new_tokens: k.max_new_tokens.unwrap_or(1024),
            temperature: k.temperature.unwrap_or(0.7),
            top_p: k.top_p.unwrap_or(0.9),
            top_k: k.top_k.unwrap_or(0),
            min_p: k.min_p.unwrap_or(0.0),
            generation_batch_size: k.generation_batch_size.unwrap_or(16),
            winrate: match k.winrate.as_deref().unwrap_or("scores") {
                "scores" => WinrateEstimate::Scores,
                "pairwise" => WinrateEstimate::Pairwise,
                other => bail!("`winrate` = {other:?} is not one of: scores, pairwise"),
            },
            train_on: match k.train_on.as_deref().unwrap_or("best-worst") {
                "best-worst" | "best_worst" => TrainOn::BestWorst,
                "all" => TrainOn::All,
                other => bail!("`train_on` = {other:?} is not one of: best-worst, all"),
            },
            loss_type: one_of("loss_type", k.loss_type.as_deref().unwrap_or("sppo"), &["sppo", "sppo_single", "sppo_hard", "dpo", "ipo"])?,
            beta,
            learning_rate: k.learning_rate.unwrap_or(5e-7),
            lr_scheduler_type: one_of("lr_scheduler_type", k.lr_scheduler_type.as_deref().unwrap_or("linear"), &["linear", "constant", "cosine"])?,
            warmup_ratio: k.warmup_ratio.unwrap_or(0.1),
            optim: one_of("optim", k.optim.as_deref().unwrap_or("rmsprop"), &["rmsprop", "adamw"])?,
            weight_decay: k.weight_decay.unwrap_or(0.0),
            max_grad_norm: k.max_grad_norm.unwrap_or(1.0),
            per_device_train_batch_size: k.per_device_train_batch_size.unwrap_or(8),
            gradient_accumulation_steps: k.gradient_accumulation_steps.unwrap_or(8),
            num_train_epochs: k.num_train_epochs.unwrap_or(1),
            max_length: k.max_length.unwrap_or(1024),
            max_prompt_length: k.max_prompt_length.unwrap_or(512),
            seed: k.seed.unwrap_or(42),
            gradient_checkpointing: k.gradient_checkpointing.unwrap_or(false),
            save_steps: k.save_steps.unwrap_or(50),
            save_dtype: one_of("save_dtype", k.save_dtype.as_deref().unwrap_or("f32"), &["f32", "bf16"])?,
            skip_spike_factor: k.skip_spike_factor.unwrap_or(0.0),
            decode_weights: k.decode_weights.unwrap_or_default(),
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let positive = |v: f64, key: &str| -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("`{key}` must be positive, got {v}");
            }
            Ok(())
        };
        positive(self.beta, "beta")?;
        positive(self.learning_rate, "learning_rate")?;
        if self.iterations == 0 {
            bail!("`iterations` must be at least 1");
        }
        if self.num_samples < 2 {
            bail!("`num_samples` must be at least 2 (a preference needs two responses), got {}", self.num_samples);
        }
        for (v, key) in [
            (self.max_new_tokens, "max_new_tokens"),
            (self.per_device_train_batch_size, "per_device_train_batch_size"),
            (self.gradient_accumulation_steps, "gradient_accumulation_steps"),
            (self.generation_batch_size, "generation_batch_size"),
            (self.save_steps, "save_steps"),
            (self.eval_num_samples as usize, "eval_num_samples"),
        ] {
            if v == 0 {
                bail!("`{key}` must be at least 1");
            }
        }
        if !(self.skip_spike_factor == 0.0 || (self.skip_spike_factor.is_finite() && self.skip_spike_factor > 1.0)) {
            bail!("`skip_spike_factor` must be 0 (off) or above 1, got {}", self.skip_spike_factor);
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("`warmup_ratio` must be in [0, 1), got {}", self.warmup_ratio);
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!("`max_grad_norm` must be ≥ 0 (0 disables clipping), got {}", self.max_grad_norm);
        }
        if self.max_prompt_length == 0 || self.max_prompt_length >= self.max_length {
            bail!(
                "`max_prompt_length` ({}) must be positive and below `max_length` ({}): no room for a response",
                self.max_prompt_length,
                self.max_length
            );
        }
        crate::sampling::SamplingParams { temperature: self.temperature, top_p: self.top_p, top_k: self.top_k, min_p: self.min_p }.validate()?;
        Ok(())
    }

    /// The global batch (examples per optimizer step).
    pub fn global_batch(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(toml_text: &str) -> Result<RunKeys> {
        toml::from_str(toml_text).map_err(|e| anyhow::anyhow!("{e}"))
    }

    #[test]
    fn defaults_follow_the_reference_recipe() {
        let k = keys("model = 'm'\nprompts = 'p.jsonl'\noracle = 'game:rps'\nrun_dir = 'r'").unwrap();
        let c = RunConfig::resolve(&k).unwrap();
        assert_eq!((c.num_samples, c.iterations, c.global_batch()), (5, 3, 64));
        assert_eq!((c.beta, c.learning_rate, c.optim.as_str()), (1e-3, 5e-7, "rmsprop"));
        assert_eq!((c.max_length, c.max_prompt_length, c.seed), (1024, 512, 42));
    }

    #[test]
    fn flags_override_the_file_and_eta_is_one_over_beta() {
        let file = keys("model = 'm'\nprompts = 'p'\noracle = 'game:rps'\nrun_dir = 'r'\nlearning_rate = 1e-6").unwrap();
        let flags = RunKeys { learning_rate: Some(2e-6), eta: Some(500.0), ..Default::default() };
        let c = RunConfig::resolve(&file.overridden_by(&flags)).unwrap();
        assert_eq!(c.learning_rate, 2e-6);
        assert!((c.beta - 0.002).abs() < 1e-15);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let err = keys("model = 'm'\nlearning_rat = 1e-6").unwrap_err().to_string();
        assert!(err.contains("learning_rat"), "{err}");
        let base = "model = 'm'\nprompts = 'p'\noracle = 'o'\nrun_dir = 'r'\n";
        for (extra, want) in [
            ("beta = 0.1\neta = 10", "either"),
            ("optim = 'sgd'", "rmsprop, adamw"),
            ("num_samples = 1", "at least 2"),
            ("max_prompt_length = 1024", "no room"),
            ("warmup_ratio = 1.5", "warmup_ratio"),
            ("top_p = 0", "top_p"),
        ] {
            let err = format!("{:#}", RunConfig::resolve(&keys(&format!("{base}{extra}")).unwrap()).unwrap_err());
            assert!(err.contains(want), "{extra}: {err}");
        }
    }
}
