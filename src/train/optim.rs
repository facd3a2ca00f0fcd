//! Optimizer state and gradient clipping over the model's flat buffers, on any [`Backend`].
//!
//! - [`clip_grad_norm`]: `torch.nn.utils.clip_grad_norm_` (2-norm over ALL parameters as one
//!   vector; coef = max_norm / (norm + 1e-6), clamped to 1; returns the norm BEFORE clipping).
//!   The Trainer clips only when `max_grad_norm > 0`; so do we (0 disables, the norm is still
//!   returned for logging).
//! - [`Optimizer`]: AdamW (`m`, `v`, step count) or RMSprop (`square_avg`), one state buffer per
//!   moment, the same length as the parameters. The update formulas and their rounding order are
//!   in `backend/cpu/optim.rs`; the hyperparameter checks are torch's constructor checks.
//!
//! One training step in the Trainer's order: gradients accumulated over micro-batches →
//! `clip_grad_norm` → `Optimizer::step(lr = schedule.lr_at(k))` → zero the gradients.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};

use crate::backend::Backend;
pub use crate::backend::{AdamWConfig, RmspropConfig};

/// The ε torch adds to the norm before dividing (`clip_grads_with_norm_`).
const CLIP_EPS: f64 = 1e-6;

/// Clips `grads` in place to a total 2-norm of `max_norm` as `torch.nn.utils.clip_grad_norm_`
/// and returns the norm before clipping. `max_norm == 0` disables clipping (the Trainer's
/// `max_grad_norm > 0` test). A non-finite norm is an error and leaves the gradients untouched:
/// torch would scale them by NaN.
pub fn clip_grad_norm<B: Backend>(b: &B, grads: &mut B::Buf, max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm >= 0.0) {
        bail!("max_grad_norm = {max_norm} must be finite and >= 0");
    }
    // Norm accumulated in f64 by the backend (SPPO.md: an f32 sequential sum was 6% off).
    let norm = b.grad_norm_sq(b.full(grads)).context("gradient norm")?.sqrt();
    if !norm.is_finite() {
        bail!("gradient norm is {norm}: a NaN or Inf gradient");
    }
    if max_norm > 0.0 {
        let coef = max_norm / (norm + CLIP_EPS);
        // coef clamped to 1 multiplies by 1: skipping it changes nothing.
        if coef < 1.0 {
            b.scale(b.full_mut(grads), coef).context("gradient clipping")?;
        }
    }
    Ok(norm)
}

/// Which optimizer (`--optim`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    AdamW,
    /// The SPPO reference's optimizer.
    RmsProp,
}

impl OptimizerKind {
    pub const ALL: &'static [OptimizerKind] = &[OptimizerKind::AdamW, OptimizerKind::RmsProp];

    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::RmsProp => "rmsprop",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match OptimizerKind::ALL.iter().find(|k| k.name() == s) {
            Some(&k) => Ok(k),
            None => {
                let choices: Vec<&str> = OptimizerKind::ALL.iter().map(|k| k.name()).collect();
                bail!("optimizer: unknown {s:?}; choices: {}", choices.join(", "))
            }
        }
    }
}

/// An optimizer with its hyperparameters (the lr comes per step from the schedule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    AdamW(AdamWConfig),
    RmsProp(RmspropConfig),
}

impl OptimizerConfig {
    /// torch's defaults for `kind` (AdamW: β (0.9, 0.999), eps 1e-8, wd 0.01; RMSprop: α 0.99,
    /// eps 1e-8, wd 0).
    pub fn torch_default(kind: OptimizerKind) -> Self {
        match kind {
            OptimizerKind::AdamW => OptimizerConfig::AdamW(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }),
            OptimizerKind::RmsProp => OptimizerConfig::RmsProp(RmspropConfig { alpha: 0.99, eps: 1e-8, weight_decay: 0.0 }),
        }
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            OptimizerConfig::AdamW(_) => OptimizerKind::AdamW,
            OptimizerConfig::RmsProp(_) => OptimizerKind::RmsProp,
        }
    }

    /// torch's constructor checks, plus finiteness; β < 1 also keeps Adam's bias correction
    /// nonzero.
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, v: f64, ok: bool, want: &str| -> Result<()> {
            if !(v.is_finite() && ok) {
                bail!("{}: {name} = {v} must be {want}", self.kind());
            }
            Ok(())
        };
        match *self {
            OptimizerConfig::AdamW(c) => {
                check("beta1", c.beta1, (0.0..1.0).contains(&c.beta1), "in [0, 1)")?;
                check("beta2", c.beta2, (0.0..1.0).contains(&c.beta2), "in [0, 1)")?;
                check("eps", c.eps, c.eps >= 0.0, ">= 0")?;
                check("weight_decay", c.weight_decay, c.weight_decay >= 0.0, ">= 0")?;
            }
            OptimizerConfig::RmsProp(c) => {
                check("alpha", c.alpha, c.alpha >= 0.0, ">= 0")?;
                check("eps", c.eps, c.eps >= 0.0, ">= 0")?;
                check("weight_decay", c.weight_decay, c.weight_decay >= 0.0, ">= 0")?;
            }
        }
        Ok(())
    }
}

/// Optimizer state over one flat parameter buffer of `len` elements.
pub struct Optimizer<B: Backend> {
    config: OptimizerConfig,
    /// Steps taken so far (torch's `state["step"]`); the next step is `steps + 1`.
    steps: u64,
    /// AdamW `exp_avg`, or RMSprop `square_avg`: (len) f32.
    state0: B::Buf,
    /// AdamW `exp_avg_sq`: (len) f32; `None` for RMSprop.
    state1: Option<B::Buf>,
}

impl<B: Backend> Optimizer<B> {
    /// Fresh state (zeros, step 0) for `len` parameters.
    pub fn new(b: &B, config: OptimizerConfig, len: usize) -> Result<Self> {
        config.validate()?;
        let state0 = b.alloc(len).with_context(|| format!("{} state ({len} values)", config.kind()))?;
        let state1 = match config {
            OptimizerConfig::AdamW(_) => Some(b.alloc(len).with_context(|| format!("adamw exp_avg_sq ({len} values)"))?),
            OptimizerConfig::RmsProp(_) => None,
        };
        Ok(Self { config, steps: 0, state0, state1 })
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The state buffers by torch's names, for checkpoints.
    pub fn state_buffers(&self) -> Vec<(&'static str, &B::Buf)> {
        match &self.state1 {
            Some(v) => vec![("exp_avg", &self.state0), ("exp_avg_sq", v)],
            None => vec![("square_avg", &self.state0)],
        }
    }

    /// Mutable state buffers (same order and names as [`Self::state_buffers`]) and the step
    /// counter, for restoring a checkpoint.
    pub fn state_mut(&mut self) -> (&mut u64, Vec<(&'static str, &mut B::Buf)>) {
        let bufs = match &mut self.state1 {
            Some(v) => vec![("exp_avg", &mut self.state0), ("exp_avg_sq", v)],
            None => vec![("square_avg", &mut self.state0)],
        };
        (&mut self.steps, bufs)
    }

    /// One update of `params` from `grads` at learning rate `lr`.
    pub fn step(&mut self, b: &B, params: &mut B::Buf, grads: &B::Buf, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("{}: learning rate {lr} must be finite and >= 0", self.config.kind());
        }
        let step = self.steps + 1;
        match (&self.config, &mut self.state1) {
            (OptimizerConfig::AdamW(hp), Some(v)) => b
                .adamw_step(b.full_mut(params), b.full(grads), b.full_mut(&mut self.state0), b.full_mut(v), step, lr, hp)
                .with_context(|| format!("adamw step {step}"))?,
            (OptimizerConfig::RmsProp(hp), None) => b
                .rmsprop_step(b.full_mut(params), b.full(grads), b.full_mut(&mut self.state0), lr, hp)
                .with_context(|| format!("rmsprop step {step}"))?,
            // `new` builds the state to match the config; nothing else changes either.
            _ => bail!("{}: optimizer state does not match its config", self.config.kind()),
        }
        self.steps = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn names_and_config_checks() {
        for &k in OptimizerKind::ALL {
            assert_eq!(k.name().parse::<OptimizerKind>().expect("known"), k);
            OptimizerConfig::torch_default(k).validate().expect("torch defaults are valid");
        }
        let err = "adam".parse::<OptimizerKind>().expect_err("unknown").to_string();
        assert!(err.contains("adamw, rmsprop"), "{err}");
        let bad = OptimizerConfig::AdamW(AdamWConfig { beta1: 0.9, beta2: 1.0, eps: 1e-8, weight_decay: 0.0 });
        assert!(bad.validate().unwrap_err().to_string().contains("beta2"));
    }

    #[test]
    fn clip_rejects_nan_and_leaves_grads() {
        let b = CpuBackend::new(Some(1)).expect("backend");
        let mut g = vec![1.0f32, f32::NAN, 2.0];
        assert!(clip_grad_norm(&b, &mut g, 1.0).is_err());
        assert_eq!(g[0], 1.0);
        let mut g = vec![3.0f32, 4.0];
        let norm = clip_grad_norm(&b, &mut g, 0.0).expect("disabled clip");
        assert_eq!((norm, g.as_slice()), (5.0, [3.0f32, 4.0].as_slice()));
    }

    #[test]
    fn step_checks_lengths_and_lr() {
        let b = CpuBackend::new(Some(1)).expect("backend");
        let mut opt = Optimizer::new(&b, OptimizerConfig::torch_default(OptimizerKind::AdamW), 4).expect("optimizer");
        let mut p = vec![0.0f32; 4];
        assert!(opt.step(&b, &mut p, &vec![0.0; 3], 1e-3).is_err());
        assert!(opt.step(&b, &mut p, &vec![0.0; 4], f64::NAN).is_err());
        assert_eq!(opt.steps(), 0, "a failed step must not count");
        opt.step(&b, &mut p, &vec![1.0; 4], 1e-3).expect("step");
        assert_eq!(opt.steps(), 1);
    }
}
