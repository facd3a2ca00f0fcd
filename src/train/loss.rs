//! Preference losses on summed response log-probs: SPPO (three variants) and the DPO / IPO
//! baselines, with their analytic gradients, in f64.
//!
//! Notation (docs: `SPPO.md`, "One iteration t", step 4): for a prompt x with chosen response
//! y_w and rejected y_l, `a = log π_θ(y_w|x) − log π_t(y_w|x)` and `b = log π_θ(y_l|x) −
//! log π_t(y_l|x)`, log-probs SUMMED over response tokens; π_t is the frozen reference (the
//! previous iteration's policy); `η = 1/β`. Per pair:
//!
//! | [`LossType`]  | loss                                                | ∂/∂a              | ∂/∂b              |
//! |---------------|-----------------------------------------------------|-------------------|-------------------|
//! | `sppo`        | ½[(a − η(P_win − ½))² + (b − η(P_lose − ½))²]       | a − η(P_win − ½)  | b − η(P_lose − ½) |
//! | `sppo_single` | ½[(a − η(P_wl − ½))² + (b + η(P_wl − ½))²]          | a − η(P_wl − ½)   | b + η(P_wl − ½)   |
//! | `sppo_hard`   | (a − ½η)² + (b + ½η)²                               | 2(a − ½η)         | 2(b + ½η)         |
//! | `dpo`         | −log σ(β(a − b)) = softplus(−β(a − b))              | −β σ(−β(a − b))   | +β σ(−β(a − b))   |
//! | `ipo`         | ((a − b) − 1/(2β))²                                 | 2((a − b) − 1/(2β)) | −∂/∂a           |
//!
//! P_win = `chosen_probs_win` (the chosen response's mean win-rate against all K samples), P_lose
//! = `chosen_probs_lose` (the rejected one's), P_wl = `chosen_probs` (chosen beats rejected). These
//! are the formulas of uclaml/SPPO's trainer (`sppo`, `sppo_single` with the `/ 2`; `sppo_hard`
//! without it). The SPPO losses are the square-loss regression of the paper's Algorithm 1
//! (arXiv 2405.00675): each response's log-ratio log(π_θ/π_t) is regressed onto
//! η(P̂(y ≻ π_t|x) − ½).
//! IPO here uses summed log-probs like the others (TRL's IPO averages over tokens); that is a
//! choice of the caller's log-prob reduction, not of this formula.
//!
//! Since `a = policy − reference`, ∂loss/∂policy = ∂loss/∂a: the `d_policy_*` fields are the
//! per-sequence gradients `dseq` that `model::llama::Llama::backward` takes.
//!
//! `--train-on all` ([`single_loss`]): each of the K responses alone, ½(r − η(P̂ − ½))² with r its
//! log-ratio and P̂ its win-rate. With the two responses (chosen with P̂ = P_win, rejected with
//! P̂ = P_lose) the sum of the two single losses is exactly the `sppo` pair loss, so a prompt's
//! single losses are SUMMED over its responses and the batch is averaged over prompts
//! (tests/train_math.rs checks the identity).
//!
//! Batch reduction ([`batch_pair_loss`]): the mean over the pairs of one optimizer step (TRL takes
//! `losses.mean()` per micro-batch and divides by the accumulation steps: the same mean when the
//! micro-batches are equal). At SPPO's scale (β = 1e-3, η = 1000) losses near 1e5 and gradients
//! near 1e3 per sequence are normal, hence f64 throughout.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

/// Which pair loss to train with (TRL-style names, as `--loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossType {
    /// `sppo`: chosen → η(P_win − ½), rejected → η(P_lose − ½).
    Sppo,
    /// `sppo_single`: chosen → η(P_wl − ½), rejected → −η(P_wl − ½).
    SppoSingle,
    /// `sppo_hard`: chosen → ½η, rejected → −½η (no probabilities; TRL's offline variant).
    SppoHard,
    /// `dpo`: −log σ(β(a − b)).
    Dpo,
    /// `ipo`: ((a − b) − 1/(2β))².
    Ipo,
}

impl LossType {
    pub const ALL: &'static [LossType] = &[LossType::Sppo, LossType::SppoSingle, LossType::SppoHard, LossType::Dpo, LossType::Ipo];

    pub fn name(self) -> &'static str {
        match self {
            LossType::Sppo => "sppo",
            LossType::SppoSingle => "sppo_single",
            LossType::SppoHard => "sppo_hard",
            LossType::Dpo => "dpo",
            LossType::Ipo => "ipo",
        }
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match LossType::ALL.iter().find(|k| k.name() == s) {
            Some(&k) => Ok(k),
            None => {
                let choices: Vec<&str> = LossType::ALL.iter().map(|k| k.name()).collect();
                bail!("loss type: unknown {s:?}; choices: {}", choices.join(", "))
            }
        }
    }
}

/// The preference estimates of one (chosen, rejected) pair, from the ranking stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairProbs {
    /// P_wl: P(chosen ≻ rejected) (`sppo_single`).
    pub chosen_probs: f64,
    /// P_win: the chosen response's mean win-rate against the K samples (`sppo`).
    pub chosen_probs_win: f64,
    /// P_lose: the rejected response's mean win-rate against the K samples (`sppo`).
    pub chosen_probs_lose: f64,
}

impl PairProbs {
    /// Checked constructor: every probability finite and in [0, 1].
    pub fn new(chosen_probs: f64, chosen_probs_win: f64, chosen_probs_lose: f64) -> Result<Self> {
        let p = PairProbs { chosen_probs, chosen_probs_win, chosen_probs_lose };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("chosen_probs", self.chosen_probs),
            ("chosen_probs_win", self.chosen_probs_win),
            ("chosen_probs_lose", self.chosen_probs_lose),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("pair probabilities: {name} = {v} is not a probability in [0, 1]");
            }
        }
        Ok(())
    }
}

/// One pair's loss, its gradients w.r.t. the two summed policy log-probs, and the log-ratios
/// (a, b) for logging (TRL logs β·a and β·b as "rewards").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    /// ∂loss/∂log π_θ(y_w|x).
    pub d_policy_chosen: f64,
    /// ∂loss/∂log π_θ(y_l|x).
    pub d_policy_rejected: f64,
    /// a = log π_θ(y_w|x) − log π_t(y_w|x).
    pub chosen_logratio: f64,
    /// b = log π_θ(y_l|x) − log π_t(y_l|x).
    pub rejected_logratio: f64,
}

/// β must be finite and positive (η = 1/β; the reference uses β = 1e-3).
pub fn check_beta(beta: f64) -> Result<()> {
    if !(beta.is_finite() && beta > 0.0) {
        bail!("loss: beta = {beta} must be finite and > 0");
    }
    Ok(())
}

/// −log σ(z) = softplus(−z) and its derivative −σ(−z), without overflow for any finite z
/// (a summed log-ratio gap of thousands of nats at β = 0.1 gives |z| in the hundreds, where
/// `exp(z)` overflows or `log(σ(z))` rounds to log(0)).
fn neg_log_sigmoid(z: f64) -> (f64, f64) {
    // softplus(x) = max(x, 0) + log1p(exp(−|x|)), x = −z.
    let x = -z;
    let value = x.max(0.0) + (-x.abs()).exp().ln_1p();
    // σ(x) computed from the side where exp cannot overflow.
    let sig_x = if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) };
    (value, -sig_x)
}

/// The loss of one pair (table in the module doc). Inputs are summed log-probs; `probs` is read
/// only by the SPPO variants that use it. Non-finite inputs propagate (the training loop checks
/// the loss for NaN/Inf).
pub fn pair_loss(
    kind: LossType,
    beta: f64,
    policy_chosen: f64,
    policy_rejected: f64,
    ref_chosen: f64,
    ref_rejected: f64,
    probs: &PairProbs,
) -> PairLoss {
    let a = policy_chosen - ref_chosen;
    let b = policy_rejected - ref_rejected;
    let eta = 1.0 / beta;
    let (loss, da, db) = match kind {
        LossType::Sppo => {
            let rw = a - eta * (probs.chosen_probs_win - 0.5);
            let rl = b - eta * (probs.chosen_probs_lose - 0.5);
            (0.5 * (rw * rw + rl * rl), rw, rl)
        }
        LossType::SppoSingle => {
            let t = eta * (probs.chosen_probs - 0.5);
            let (rw, rl) = (a - t, b + t);
            (0.5 * (rw * rw + rl * rl), rw, rl)
        }
        LossType::SppoHard => {
            let (rw, rl) = (a - 0.5 * eta, b + 0.5 * eta);
            (rw * rw + rl * rl, 2.0 * rw, 2.0 * rl)
        }
        LossType::Dpo => {
            let (value, dz) = neg_log_sigmoid(beta * (a - b));
            (value, beta * dz, -beta * dz)
        }
        LossType::Ipo => {
            let r = (a - b) - 1.0 / (2.0 * beta);
            (r * r, 2.0 * r, -2.0 * r)
        }
    };
    PairLoss { loss, d_policy_chosen: da, d_policy_rejected: db, chosen_logratio: a, rejected_logratio: b }
}

/// `--train-on all`: one response's SPPO regression loss ½(r − η(P̂ − ½))², r = policy −
/// reference, and its gradient w.r.t. `policy`. Summing it over a pair's chosen (P̂ = P_win) and
/// rejected (P̂ = P_lose) responses gives exactly [`pair_loss`] with [`LossType::Sppo`].
pub fn single_loss(beta: f64, policy: f64, reference: f64, winrate: f64) -> (f64, f64) {
    // η·(P̂ − ½) with η = 1/β rounded first, exactly as `pair_loss` computes its targets.
    let eta = 1.0 / beta;
    let r = (policy - reference) - eta * (winrate - 0.5);
    (0.5 * r * r, r)
}

/// Inputs of one pair for [`batch_pair_loss`]: summed log-probs and the pair's probabilities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairInput {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub probs: PairProbs,
}

/// A batch's mean loss and the per-sequence gradients of that mean.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchLoss {
    /// Σ loss_i / `denominator`.
    pub loss: f64,
    /// ∂(batch loss)/∂log π_θ(y_w,i|x_i) = d_policy_chosen_i / `denominator`.
    pub d_policy_chosen: Vec<f64>,
    pub d_policy_rejected: Vec<f64>,
    /// Mean a and b over these pairs (for logging).
    pub mean_chosen_logratio: f64,
    pub mean_rejected_logratio: f64,
}

/// Mean pair loss over an optimizer step. `denominator` is the number of pairs in the WHOLE
/// optimizer step (all micro-batches), so that micro-batch gradients summed into one buffer give
/// the gradient of the step's mean; for a single micro-batch it is `pairs.len()`.
pub fn batch_pair_loss(kind: LossType, beta: f64, pairs: &[PairInput], denominator: usize) -> Result<BatchLoss> {
    check_beta(beta)?;
    if pairs.is_empty() {
        bail!("batch loss ({kind}): no pairs");
    }
    if denominator < pairs.len() {
        bail!("batch loss ({kind}): denominator {denominator} is smaller than the {} pairs of this micro-batch", pairs.len());
    }
    let inv = 1.0 / denominator as f64;
    let mut out = BatchLoss {
        loss: 0.0,
        d_policy_chosen: Vec::with_capacity(pairs.len()),
        d_policy_rejected: Vec::with_capacity(pairs.len()),
        mean_chosen_logratio: 0.0,
        mean_rejected_logratio: 0.0,
    };
    for (i, p) in pairs.iter().enumerate() {
        if matches!(kind, LossType::Sppo | LossType::SppoSingle) {
            p.probs.validate().map_err(|e| anyhow::anyhow!("batch loss ({kind}), pair {i}: {e}"))?;
        }
        let l = pair_loss(kind, beta, p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected, &p.probs);
        out.loss += l.loss * inv;
        out.d_policy_chosen.push(l.d_policy_chosen * inv);
        out.d_policy_rejected.push(l.d_policy_rejected * inv);
        out.mean_chosen_logratio += l.chosen_logratio;
        out.mean_rejected_logratio += l.rejected_logratio;
    }
    out.mean_chosen_logratio /= pairs.len() as f64;
    out.mean_rejected_logratio /= pairs.len() as f64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_lists_choices() {
        for &k in LossType::ALL {
            assert_eq!(k.name().parse::<LossType>().expect("known name"), k);
        }
        let err = "sppo-hard".parse::<LossType>().expect_err("unknown name").to_string();
        assert!(err.contains("sppo_hard") && err.contains("ipo") && err.contains("sppo-hard"), "{err}");
    }

    #[test]
    fn dpo_is_stable_at_large_margins() {
        let p = PairProbs::new(0.5, 0.5, 0.5).expect("valid");
        // β(a − b) = ±1000: a naive log(1/(1 + exp(1000))) is −inf / NaN.
        let hi = pair_loss(LossType::Dpo, 1.0, 1000.0, 0.0, 0.0, 0.0, &p);
        assert!(hi.loss >= 0.0 && hi.loss < 1e-300, "{hi:?}");
        let lo = pair_loss(LossType::Dpo, 1.0, -1000.0, 0.0, 0.0, 0.0, &p);
        assert!((lo.loss - 1000.0).abs() < 1e-9, "{lo:?}");
        assert!((lo.d_policy_chosen + 1.0).abs() < 1e-12 && (lo.d_policy_rejected - 1.0).abs() < 1e-12, "{lo:?}");
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(check_beta(0.0).is_err() && check_beta(f64::NAN).is_err() && check_beta(1e-3).is_ok());
        assert!(PairProbs::new(1.5, 0.5, 0.5).is_err());
        assert!(PairProbs::new(0.5, f64::NAN, 0.5).is_err());
        let p = PairInput {
            policy_chosen: 0.0,
            policy_rejected: 0.0,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
            probs: PairProbs::new(0.5, 0.5, 0.5).expect("valid"),
        };
        assert!(batch_pair_loss(LossType::Sppo, 1e-3, &[p, p], 1).is_err());
        assert!(batch_pair_loss(LossType::Sppo, 1e-3, &[], 1).is_err());
    }
}
