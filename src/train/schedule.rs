//! Learning-rate schedules with linear warm-up, as Hugging Face transformers builds them
//! (`optimization.py`, transformers 5.x) and as its `Trainer` applies them.
//!
//! With W warm-up steps and T total optimizer steps, the multiplier λ(s) of scheduler step s is
//! - warm-up (all kinds), s < W:  s / max(1, W)
//! - `linear`   (`get_linear_schedule_with_warmup`):   max(0, (T − s) / max(1, T − W))
//! - `cosine`   (`get_cosine_schedule_with_warmup`, 0.5 cycles):
//!   max(0, ½(1 + cos(π · 2 · 0.5 · p))), p = (s − W) / max(1, T − W)
//! - `constant` (`get_constant_schedule_with_warmup`): 1
//!
//! and `lr = base_lr · λ(s)`.
//!
//! Which s an optimizer step uses: `LambdaLR` sets `lr = base · λ(0)` when it is built, and the
//! Trainer calls `optimizer.step()` BEFORE `lr_scheduler.step()`, so the k-th optimizer step
//! (0-based) uses λ(k). In particular the first step uses λ(0) = 0 whenever W > 0: with the
//! reference setting (10% warm-up) the first update leaves the weights unchanged, while still
//! feeding the optimizer's moment estimates (tests/fixtures/train/schedules.json records the lr
//! the optimizer holds before each step).
//!
//! Warm-up steps ([`Warmup`]): transformers 5 has one `warmup_steps` setting, a count when ≥ 1
//! and a ratio when < 1 (`TrainingArguments.get_warmup_steps`: `ceil(T · ratio)`, the product in
//! f64; so 0.1 of 3 steps is ceil(0.30000000000000004) = 1). Ours says which it is, so a ratio of
//! 1.0 is not silently read as one step.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

/// The decay after warm-up (`--lr-scheduler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// Linear decay to 0 at the last step (the SPPO reference).
    Linear,
    /// Half a cosine period, from 1 to 0.
    Cosine,
    /// Constant after warm-up (transformers' `constant_with_warmup`).
    Constant,
}

impl ScheduleKind {
    pub const ALL: &'static [ScheduleKind] = &[ScheduleKind::Linear, ScheduleKind::Cosine, ScheduleKind::Constant];

    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Constant => "constant",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScheduleKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        // transformers' name for ours, accepted so its configs can be read as written.
        if s == "constant_with_warmup" {
            return Ok(ScheduleKind::Constant);
        }
        match ScheduleKind::ALL.iter().find(|k| k.name() == s) {
            Some(&k) => Ok(k),
            None => {
                let choices: Vec<&str> = ScheduleKind::ALL.iter().map(|k| k.name()).collect();
                bail!("lr scheduler: unknown {s:?}; choices: {} (or constant_with_warmup)", choices.join(", "))
            }
        }
    }
}

/// How long the warm-up is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    /// A fraction of the total steps in [0, 1]: ceil(total · ratio) steps.
    Ratio(f64),
    /// A number of steps.
    Steps(usize),
}

impl Warmup {
    /// Warm-up steps for `total_steps` optimizer steps (transformers' `get_warmup_steps`).
    pub fn steps(self, total_steps: usize) -> Result<usize> {
        match self {
            Warmup::Steps(n) => Ok(n),
            Warmup::Ratio(r) => {
                if !(0.0..=1.0).contains(&r) {
                    bail!("lr scheduler: warmup ratio {r} is not in [0, 1]");
                }
                // Same f64 product and ceil as Python's math.ceil(num_training_steps * ratio);
                // the result is at most total_steps, so the cast cannot truncate.
                Ok((total_steps as f64 * r).ceil() as usize)
            }
        }
    }
}

/// A resolved schedule: the lr of every optimizer step of one training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub total_steps: usize,
    pub warmup_steps: usize,
}

impl Schedule {
    pub fn new(kind: ScheduleKind, base_lr: f64, total_steps: usize, warmup: Warmup) -> Result<Self> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            bail!("lr scheduler: learning rate {base_lr} must be finite and >= 0");
        }
        if total_steps == 0 {
            bail!("lr scheduler: total steps is 0 (no training data?)");
        }
        let warmup_steps = warmup.steps(total_steps)?;
        Ok(Schedule { kind, base_lr, total_steps, warmup_steps })
    }

    /// λ(step): the multiplier transformers' lambda returns for scheduler step `step`.
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        // Past-the-end steps follow the same formulas (clamped at 0), as LambdaLR would.
        let decay_len = (t - w).max(1.0);
        match self.kind {
            ScheduleKind::Linear => ((t - s) / decay_len).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / decay_len;
                const NUM_CYCLES: f64 = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * NUM_CYCLES * 2.0 * progress).cos())).max(0.0)
            }
            ScheduleKind::Constant => 1.0,
        }
    }

    /// The lr of optimizer step `step` (0-based), as the Trainer applies it: base · λ(step).
    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_warmup_checks() {
        for &k in ScheduleKind::ALL {
            assert_eq!(k.name().parse::<ScheduleKind>().expect("known"), k);
        }
        assert_eq!("constant_with_warmup".parse::<ScheduleKind>().expect("alias"), ScheduleKind::Constant);
        let err = "cosine_with_restarts".parse::<ScheduleKind>().expect_err("unknown").to_string();
        assert!(err.contains("linear, cosine, constant"), "{err}");
        assert!(Warmup::Ratio(1.5).steps(10).is_err());
        assert!(Warmup::Ratio(f64::NAN).steps(10).is_err());
        assert_eq!(Warmup::Ratio(1.0).steps(10).expect("valid"), 10);
        assert!(Schedule::new(ScheduleKind::Linear, 1e-3, 0, Warmup::Steps(0)).is_err());
    }
}
