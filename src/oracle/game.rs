//! Synthetic preference games: a known class-level payoff matrix, so that the SPPO loop can be
//! checked against the game's Nash equilibrium and exact exploitability without any model judge.
//!
//! **Classification rule.** A response's class is the Unicode code point of its first character
//! after leading whitespace, modulo the number of classes n; an empty (or all-whitespace) response is
//! class 0. The first character is decided by the policy's first sampled token, which a small model
//! moves within a few SPPO updates (and capital letters, 65..=90, cover every class of a small game:
//! for n = 3, `T` (84) is class 0, `I` (73) class 1, `S` (83) class 2).
//!
//! **Games** (spec `game:NAME[,key=value...]`), A[c][d] = P(class c ≻ class d), A[c][c] = ½,
//! A[c][d] + A[d][c] = 1:
//! - `rps[,win=W]`: rock (0), paper (1), scissors (2); c beats d when (c − d) mod 3 = 1, with
//!   probability W (default 1: P(win) = 1, P(lose) = 0, tie ½; W < 1 softens the cycle).
//!   Intransitive; the Nash equilibrium is uniform.
//! - `cyclic[,n=N][,win=W]` (N odd ≥ 3, default 5) and `rps5` (= `cyclic,n=5`, rock-paper-scissors-
//!   lizard-Spock): c beats d when (c − d) mod N ∈ 1..=(N−1)/2. Every class beats exactly half of
//!   the others, so the uniform policy is the Nash equilibrium.
//! - `transitive[,n=N][,temp=T]` (default N = 3, T = 1): A[c][d] = σ((c − d)/T), or with T = 0,
//!   1 for c > d and 0 for c < d. Class N − 1 dominates: the Nash equilibrium is pure on it.
//! - `random[,n=N][,seed=S]` (default N = 3, S = 0): A[c][d] for c < d drawn uniformly from [0, 1]
//!   by a SplitMix64 stream seeded with S. No closed-form Nash equilibrium ([`Game::nash`] is None).
//!
//! Exploitability of a class policy π: max_c P(c ≻ π) − ½ = max_c Σ_d A[c][d] π_d − ½, exact
//! (a best response in a finite game is pure). It is ≥ 0 (P(π ≻ π) = ½ by antisymmetry, and the
//! best pure response does at least as well as π itself) and 0 exactly at a Nash equilibrium.

use anyhow::{bail, Context, Result};

use super::{sigmoid, Judgement, Oracle, OracleInput, PrefMatrix};

/// Which game, with its parameters (parsed from the spec).
#[derive(Clone, Debug, PartialEq)]
pub enum GameKind {
    Rps { win: f64 },
    Cyclic { n: usize, win: f64 },
    Transitive { n: usize, temp: f64 },
    Random { n: usize, seed: u64 },
}

/// A symmetric constant-sum game over response classes.
#[derive(Clone, Debug, PartialEq)]
pub struct Game {
    kind: GameKind,
    n: usize,
    /// (n, n) row-major, A[c][d] = P(class c ≻ class d).
    payoff: Vec<f64>,
}

pub const GAME_NAMES: [&str; 5] = ["rps", "rps5", "cyclic", "transitive", "random"];

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn check_win(win: f64) -> Result<f64> {
    if !(0.5..=1.0).contains(&win) {
        bail!("win must be a probability in [0.5, 1] (the winner's P(win)), got {win}");
    }
    Ok(win)
}

impl Game {
    pub fn new(kind: GameKind) -> Result<Game> {
        let n = match &kind {
            GameKind::Rps { win } => {
                check_win(*win)?;
                3
            }
            GameKind::Cyclic { n, win } => {
                check_win(*win)?;
                if *n < 3 || n % 2 == 0 {
                    bail!("a cyclic game needs an odd number of classes ≥ 3 (so every class beats exactly half of the others), got n = {n}");
                }
                *n
            }
            GameKind::Transitive { n, temp } => {
                if *n < 2 {
                    bail!("a transitive game needs n ≥ 2 classes, got {n}");
                }
                if !(temp.is_finite() && *temp >= 0.0) {
                    bail!("temp must be ≥ 0 (0: the higher class always wins), got {temp}");
                }
                *n
            }
            GameKind::Random { n, .. } => {
                if *n < 2 {
                    bail!("a random game needs n ≥ 2 classes, got {n}");
                }
                *n
            }
        };
        if n > 1 << 16 {
            bail!("{n} classes is too many for a game (at most 65536)");
        }
        let mut payoff = vec![0.5; n * n];
        let mut state = match &kind {
            GameKind::Random { seed, .. } => *seed,
            _ => 0,
        };
        for c in 0..n {
            for d in (c + 1)..n {
                // A[c][d] for c < d; A[d][c] = 1 − A[c][d].
                let a = match &kind {
                    GameKind::Rps { win } | GameKind::Cyclic { win, .. } => {
                        // c < d: d beats c when (d − c) mod n ≤ (n−1)/2, else c beats d.
                        if (d - c) <= (n - 1) / 2 {
                            1.0 - win
                        } else {
                            *win
                        }
                    }
                    GameKind::Transitive { temp, .. } => {
                        if *temp == 0.0 {
                            0.0
                        } else {
                            sigmoid((c as f64 - d as f64) / temp)
                        }
                    }
                    GameKind::Random { .. } => {
                        (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64
                    }
                };
                payoff[c * n + d] = a;
                payoff[d * n + c] = 1.0 - a;
            }
        }
        Ok(Game { kind, n, payoff })
    }

    /// Parses `NAME[,key=value...]` (the part after `game:`), e.g. `rps`, `cyclic,n=7,win=0.9`.
    pub fn parse(name: &str, opts: &[(String, String)]) -> Result<Game> {
        let allowed: &[&str] = match name {
            "rps" => &["win"],
            "rps5" | "cyclic" => &["n", "win"],
            "transitive" => &["n", "temp"],
            "random" => &["n", "seed"],
            other => bail!(
                "unknown game `{other}`: choose one of {}",
                GAME_NAMES.join(", ")
            ),
        };
        for (k, _) in opts {
            if !allowed.contains(&k.as_str()) {
                bail!(
                    "game `{name}` has no option `{k}` (options: {})",
                    allowed.join(", ")
                );
            }
        }
        if name == "rps5" && opts.iter().any(|(k, _)| k == "n") {
            bail!("game `rps5` has 5 classes; use `cyclic,n=N` for another size");
        }
        let get = |key: &str| {
            opts.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let f64_opt = |key: &str, default: f64| -> Result<f64> {
            get(key).map_or(Ok(default), |v| {
                v.parse::<f64>()
                    .with_context(|| format!("game option {key}={v}: not a number"))
            })
        };
        let usize_opt = |key: &str, default: usize| -> Result<usize> {
            get(key).map_or(Ok(default), |v| {
                v.parse::<usize>()
                    .with_context(|| format!("game option {key}={v}: not a non-negative integer"))
            })
        };
        let kind = match name {
            "rps" => GameKind::Rps {
                win: f64_opt("win", 1.0)?,
            },
            "rps5" => GameKind::Cyclic {
                n: 5,
                win: f64_opt("win", 1.0)?,
            },
            "cyclic" => GameKind::Cyclic {
                n: usize_opt("n", 5)?,
                win: f64_opt("win", 1.0)?,
            },
            "transitive" => GameKind::Transitive {
                n: usize_opt("n", 3)?,
                temp: f64_opt("temp", 1.0)?,
            },
            _ => GameKind::Random {
                n: usize_opt("n", 3)?,
                seed: get("seed").map_or(Ok(0), |v| {
                    v.parse::<u64>().with_context(|| {
                        format!("game option seed={v}: not a non-negative integer")
                    })
                })?,
            },
        };
        Game::new(kind).with_context(|| format!("game `{name}`"))
    }

    pub fn kind(&self) -> &GameKind {
        &self.kind
    }
    /// Number of classes n.
    pub fn classes(&self) -> usize {
        self.n
    }
    /// The class-level payoff, (n, n) row-major: A[c][d] = P(class c ≻ class d).
    pub fn payoff(&self) -> &[f64] {
        &self.payoff
    }
    pub fn payoff_at(&self, c: usize, d: usize) -> f64 {
        self.payoff[c * self.n + d]
    }

    /// The class of a response (module doc: first non-whitespace character's code point mod n).
    pub fn classify(&self, response: &str) -> usize {
        response
            .trim_start()
            .chars()
            .next()
            .map_or(0, |ch| ch as usize % self.n)
    }

    /// The empirical class distribution of a set of responses (uniform weights); all zeros for none.
    pub fn empirical_policy<S: AsRef<str>>(&self, responses: &[S]) -> Vec<f64> {
        let mut p = vec![0.0; self.n];
        for r in responses {
            p[self.classify(r.as_ref())] += 1.0;
        }
        let total = responses.len() as f64;
        if total > 0.0 {
            p.iter_mut().for_each(|x| *x /= total);
        }
        p
    }

    fn check_policy(&self, policy: &[f64]) -> Result<()> {
        if policy.len() != self.n {
            bail!(
                "policy has {} entries, the game has {} classes",
                policy.len(),
                self.n
            );
        }
        if let Some((c, p)) = policy
            .iter()
            .enumerate()
            .find(|(_, p)| !(p.is_finite() && **p >= 0.0))
        {
            bail!("policy[{c}] = {p} is not a probability");
        }
        let sum: f64 = policy.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            bail!("policy sums to {sum}, not 1");
        }
        Ok(())
    }

    /// P(c ≻ π) = Σ_d A[c][d] π_d for every class c.
    pub fn class_win_rates(&self, policy: &[f64]) -> Result<Vec<f64>> {
        self.check_policy(policy)?;
        Ok((0..self.n)
            .map(|c| (0..self.n).map(|d| self.payoff_at(c, d) * policy[d]).sum())
            .collect())
    }

    /// max_c P(c ≻ π) − ½ (module doc); 0 at a Nash equilibrium.
    pub fn exploitability(&self, policy: &[f64]) -> Result<f64> {
        let w = self.class_win_rates(policy)?;
        Ok(w.into_iter().fold(f64::NEG_INFINITY, f64::max) - 0.5)
    }

    /// The Nash equilibrium where it is known in closed form: uniform for the cycles, pure on the
    /// top class for `transitive`; None for `random`.
    pub fn nash(&self) -> Option<Vec<f64>> {
        match self.kind {
            GameKind::Rps { .. } | GameKind::Cyclic { .. } => {
                Some(vec![1.0 / self.n as f64; self.n])
            }
            GameKind::Transitive { .. } => {
                let mut p = vec![0.0; self.n];
                p[self.n - 1] = 1.0;
                Some(p)
            }
            GameKind::Random { .. } => None,
        }
    }

    /// The response-level matrix P_ij = A[class(y_i)][class(y_j)] (½ between equal classes).
    pub fn matrix(&self, responses: &[String]) -> Result<PrefMatrix> {
        let classes: Vec<usize> = responses.iter().map(|r| self.classify(r)).collect();
        let k = classes.len();
        let mut p = Vec::with_capacity(k * k);
        for &c in &classes {
            for &d in &classes {
                p.push(self.payoff_at(c, d));
            }
        }
        PrefMatrix::new(k, p)
    }
}

/// A game as an [`Oracle`]: judges by the responses' classes only (prompt and reference unused).
pub struct GameOracle {
    game: Game,
    name: String,
}

impl GameOracle {
    pub fn new(game: Game, name: String) -> Self {
        GameOracle { game, name }
    }
    pub fn game(&self) -> &Game {
        &self.game
    }
}

impl Oracle for GameOracle {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn judge(&mut self, batch: &[OracleInput<'_>]) -> Result<Vec<Judgement>> {
        batch
            .iter()
            .map(|x| self.game.matrix(x.responses).map(Judgement::from_matrix))
            .collect()
    }
}
