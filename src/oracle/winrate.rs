//! Win-rate estimation: from an oracle's K×K preference matrix to the chosen/rejected pair and the
//! SPPO targets (SPPO.md, "Ranking with PairRM"). Two estimators, picked by `--winrate`:
//!
//! - [`WinRate::Scores`], the reference pipeline's. The reference scores all ordered pairs with
//!   PairRM, whose C_ij are *logits* of P(y_i ≻ y_j); our oracles return probabilities P_ij, so we
//!   take C_ij = logit(P_ij), clamped to ±[`LOGIT_CLAMP`] (games and hard judges give P = 0 or 1,
//!   whose logits are infinite). Then
//!   s_i = (1/K) Σ_j (C_ij − C_ji)   (the self term is 0),
//!   P̂_ij = σ(s_i − s_j)            (P̂_ii = ½),
//!   chosen w = argmax s, rejected l = argmin s,
//!   chosen_probs = P̂_wl, chosen_probs_win = (1/K) Σ_j P̂_wj, chosen_probs_lose = (1/K) Σ_j P̂_lj,
//!   the self terms P̂_ww = P̂_ll = ½ included, exactly as the reference's `compute_prob.py`.
//!   Why logits: a PairRM oracle that symmetrises its two orderings as P_ij = σ((C_ij − C_ji)/2)
//!   gives logit(P_ij) − logit(P_ji) = C_ij − C_ji, so this reproduces the reference's numbers; on
//!   raw probabilities s_i would live in [−1, 1] and every P̂ in [σ(−2), σ(2)] = [0.12, 0.88],
//!   shrinking the SPPO targets towards ½.
//! - [`WinRate::Pairwise`], the direct estimate the reference's issue 15 asks for: the other
//!   K − 1 samples are draws from π independent of y_i, so
//!   P̂(y_i ≻ π) = (1/(K−1)) Σ_{j≠i} P_ij    (self term EXCLUDED: it would add a ½/K pull to ½),
//!   chosen = argmax, rejected = argmin of P̂(y_i ≻ π); chosen_probs = P_wl (the oracle's own
//!   entry), chosen_probs_win = P̂(y_w ≻ π), chosen_probs_lose = P̂(y_l ≻ π).
//!
//! Ties are broken deterministically: chosen is the LOWEST index among the maxima, rejected the
//! HIGHEST index among the minima, so chosen ≠ rejected whenever K ≥ 2 (if every value ties,
//! chosen = 0 and rejected = K − 1). Comparisons are exact (no tolerance): equal inputs give equal
//! values, and a difference in the last bit is a real (if tiny) preference.

use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

use super::{sigmoid, PrefMatrix};

/// |C_ij| ≤ 20: P clamped to [σ(−20), σ(20)] ≈ [2e-9, 1 − 2e-9]. Larger than any logit PairRM
/// produces in practice (|C| < 15), small enough that sums of K of them stay exact in f64.
pub const LOGIT_CLAMP: f64 = 20.0;

/// Which estimator turns the oracle's matrix into win-rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinRate {
    /// The reference's: scores s_i from the logit matrix, P̂_ij = σ(s_i − s_j), self terms included.
    Scores,
    /// The direct estimate: P̂(y_i ≻ π) = mean over j ≠ i of P_ij.
    Pairwise,
}

impl WinRate {
    pub const ALL: [WinRate; 2] = [WinRate::Scores, WinRate::Pairwise];
    pub fn as_str(self) -> &'static str {
        match self {
            WinRate::Scores => "scores",
            WinRate::Pairwise => "pairwise",
        }
    }
}

impl fmt::Display for WinRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WinRate {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "scores" => Ok(WinRate::Scores),
            "pairwise" => Ok(WinRate::Pairwise),
            other => bail!("unknown win-rate estimator `{other}`: choose `scores` (the reference's) or `pairwise` (direct)"),
        }
    }
}

/// The outcome for one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    pub chosen: usize,
    pub rejected: usize,
    /// The values chosen/rejected are the argmax/argmin of: s_i (`scores`) or P̂(y_i ≻ π) (`pairwise`).
    pub scores: Vec<f64>,
    /// Estimated P(y_i ≻ π) for every response, by the estimator's own rule (self term included
    /// for `scores`, excluded for `pairwise`); `chosen_probs_win` and `_lose` are two of them.
    pub win_rates: Vec<f64>,
    pub chosen_probs: f64,
    pub chosen_probs_win: f64,
    pub chosen_probs_lose: f64,
}

/// logit(p) = ln p − ln(1 − p), clamped to ±[`LOGIT_CLAMP`] (p = 0 or 1 give ∓∞ before the clamp).
pub fn clamped_logit(p: f64) -> f64 {
    (p.ln() - (1.0 - p).ln()).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
}

/// The reference's per-response scores s_i = (1/K) Σ_j (C_ij − C_ji), C_ij = logit(P_ij).
pub fn reference_scores(m: &PrefMatrix) -> Vec<f64> {
    let k = m.k();
    (0..k)
        .map(|i| {
            let sum: f64 = (0..k)
                .filter(|&j| j != i)
                .map(|j| clamped_logit(m.get(i, j)) - clamped_logit(m.get(j, i)))
                .sum();
            sum / k as f64
        })
        .collect()
}

/// Lowest index of the maximum and highest index of the minimum (see the module doc).
pub fn argmax_argmin(values: &[f64]) -> (usize, usize) {
    let mut best = 0;
    let mut worst = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
        if v <= values[worst] {
            worst = i;
        }
    }
    (best, worst)
}

/// Chosen, rejected and the SPPO targets for one prompt's matrix. Needs K ≥ 2.
pub fn rank(m: &PrefMatrix, mode: WinRate) -> Result<Ranking> {
    let k = m.k();
    if k < 2 {
        bail!("ranking needs at least 2 responses, got {k}");
    }
    match mode {
        WinRate::Scores => {
            let s = reference_scores(m);
            // P̂_ij = σ(s_i − s_j); row means with the diagonal ½ included (compute_prob.py).
            let phat = |i: usize, j: usize| if i == j { 0.5 } else { sigmoid(s[i] - s[j]) };
            let win_rates: Vec<f64> = (0..k)
                .map(|i| (0..k).map(|j| phat(i, j)).sum::<f64>() / k as f64)
                .collect();
            let (w, l) = argmax_argmin(&s);
            Ok(Ranking {
                chosen: w,
                rejected: l,
                chosen_probs: phat(w, l),
                chosen_probs_win: win_rates[w],
                chosen_probs_lose: win_rates[l],
                scores: s,
                win_rates,
            })
        }
        WinRate::Pairwise => {
            let win_rates: Vec<f64> = (0..k)
                .map(|i| {
                    (0..k).filter(|&j| j != i).map(|j| m.get(i, j)).sum::<f64>() / (k - 1) as f64
                })
                .collect();
            let (w, l) = argmax_argmin(&win_rates);
            Ok(Ranking {
                chosen: w,
                rejected: l,
                chosen_probs: m.get(w, l),
                chosen_probs_win: win_rates[w],
                chosen_probs_lose: win_rates[l],
                scores: win_rates.clone(),
                win_rates,
            })
        }
    }
}
