//! Preference oracles: given a prompt and K responses, the K×K matrix P with
//! P[i][j] = P(y_i ≻ y_j | x), P[i][j] + P[j][i] = 1 and P[i][i] = ½ (SPPO.md).
//!
//! Oracles are chosen by a spec string (`similarity:DIR`, `reward:DIR`, `judge:DIR`,
//! `command:"CMD"`, `game:NAME`; [`spec`]) and called with a batch of prompts at a time; the win-rate
//! estimators ([`winrate`]) work on the matrices only.
//!
//! Modules: `spec` (spec strings → oracles), `command` (an external program speaking JSONL),
//! `game` (synthetic preference games with a known payoff matrix and exact exploitability),
//! `winrate` (chosen/rejected and the SPPO targets from a matrix).

pub mod command;
pub mod game;
pub mod spec;
pub mod winrate;

pub use spec::{build_oracle, build_oracle_on, OracleSpec};

pub mod similarity;

use anyhow::{bail, Result};

pub mod judge;
pub mod packed;
pub mod reward;

pub use judge::JudgeOracle;
pub use reward::RewardOracle;

/// One prompt and its responses, as an oracle sees them.
#[derive(Clone, Debug)]
pub struct OracleInput<'a> {
    /// The prompt as the user wrote it (the last user message).
    pub prompt: &'a str,
    pub responses: &'a [String],
    /// A reference answer, when the prompt set has one (ShareGPT's first gpt turn, `reference`).
    pub reference: Option<&'a str>,
}

/// A K×K preference matrix, row-major, P[i][j] = P(y_i ≻ y_j).
#[derive(Clone, Debug, PartialEq)]
pub struct PrefMatrix {
    k: usize,
    p: Vec<f64>,
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl PrefMatrix {
    /// Checks shape, range, NaN and the antisymmetry P_ij + P_ji = 1 (within 1e-6), and sets the
    /// diagonal to exactly ½.
    pub fn new(k: usize, mut p: Vec<f64>) -> Result<Self> {
        if p.len() != k * k {
            bail!(
                "preference matrix has {} entries, expected {k}×{k}",
                p.len()
            );
        }
        for i in 0..k {
            for j in 0..k {
                let v = p[i * k + j];
                if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                    bail!("preference P[{i}][{j}] = {v} is not a probability in [0, 1]");
                }
                if i != j && (v + p[j * k + i] - 1.0).abs() > 1e-6 {
                    bail!(
                        "preferences P[{i}][{j}] = {v} and P[{j}][{i}] = {} do not sum to 1",
                        p[j * k + i]
                    );
                }
            }
            p[i * k + i] = 0.5;
        }
        Ok(PrefMatrix { k, p })
    }

    /// P[i][j] = σ((s_i − s_j) / temperature): a Bradley–Terry matrix from per-response scores.
    pub fn from_scores(scores: &[f64], temperature: f64) -> Result<Self> {
        if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            bail!("score {i} is {s}");
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            bail!("score temperature must be positive, got {temperature}");
        }
        let k = scores.len();
        let mut p = vec![0.5; k * k];
        for i in 0..k {
            for j in 0..k {
                if i != j {
                    p[i * k + j] = sigmoid((scores[i] - scores[j]) / temperature);
                }
            }
        }
        Ok(PrefMatrix { k, p })
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.p[i * self.k + j]
    }
    pub fn rows(&self) -> Vec<Vec<f64>> {
        self.p.chunks(self.k.max(1)).map(<[f64]>::to_vec).collect()
    }
    /// The entries, row-major (K·K values).
    pub fn as_slice(&self) -> &[f64] {
        &self.p
    }

    /// [`PrefMatrix::new`] from a list of rows; a ragged list is an error naming the short row.
    pub fn from_rows(rows: &[Vec<f64>]) -> Result<Self> {
        let k = rows.len();
        let mut p = Vec::with_capacity(k * k);
        for (i, r) in rows.iter().enumerate() {
            if r.len() != k {
                bail!(
                    "preference matrix row {i} has {} entries, expected {k} (a {k}×{k} matrix)",
                    r.len()
                );
            }
            p.extend_from_slice(r);
        }
        Self::new(k, p)
    }
}

/// What an oracle returns for one prompt: a matrix, and per-response scores when the oracle is
/// score-based (reward model, similarity).
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub matrix: PrefMatrix,
    pub scores: Option<Vec<f64>>,
}

impl Judgement {
    /// A matrix-only judgement (pairwise oracles, games).
    pub fn from_matrix(matrix: PrefMatrix) -> Self {
        Judgement {
            matrix,
            scores: None,
        }
    }

    /// A score-based judgement: P[i][j] = σ((s_i − s_j) / temperature), scores kept.
    pub fn from_scores(scores: Vec<f64>, temperature: f64) -> Result<Self> {
        let matrix = PrefMatrix::from_scores(&scores, temperature)?;
        Ok(Judgement {
            matrix,
            scores: Some(scores),
        })
    }
}

pub trait Oracle {
    /// The spec it was built from, for logs and metrics.
    fn name(&self) -> String;
    /// Judges each prompt's responses; one judgement per input, in order.
    fn judge(&mut self, batch: &[OracleInput<'_>]) -> Result<Vec<Judgement>>;
}
