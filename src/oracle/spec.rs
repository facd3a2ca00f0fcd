//! Oracle spec strings: `KIND:ARG[,key=value...]` → [`OracleSpec`] → a boxed [`Oracle`].
//!
//! | spec | oracle |
//! |---|---|
//! | `similarity:DIR[,tau=0.05]` | MiniLM cosine similarity to the reference answer, P = σ(Δcos / tau) |
//! | `reward:DIR` | a sequence-classification reward model, P = σ(r_i − r_j) |
//! | `judge:DIR[,template=FILE]` | a chat model asked which answer is better |
//! | `command:"CMD ARGS"[,timeout=SECONDS]` | an external program speaking JSONL ([`super::command`]) |
//! | `game:NAME[,key=value...]` | a synthetic preference game ([`super::game`]) |
//!
//! ARG (and any option value) may be quoted with `"…"` or `'…'` so that it can hold commas. A quoted
//! command ends at its LAST matching quote, so it may hold quotes itself; it is split into words as
//! a POSIX shell would (`shlex`), without running a shell: `command:"python3 'my judge.py' --fast"`
//! runs `python3` with two arguments. An unquoted command takes the whole rest of the spec
//! (`command:python3 judge.py`) and then has no options.

use anyhow::{bail, Context, Result};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::command::CommandOracle;
use super::game::{Game, GameOracle};
use super::judge::JudgeOracle;
use super::reward::RewardOracle;
use super::similarity::SimilarityOracle;
use super::Oracle;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;

/// The kinds a spec may name, for error messages.
pub const ORACLE_KINDS: [&str; 5] = ["similarity", "reward", "judge", "command", "game"];

/// Default `tau` of the similarity oracle (cosine differences are small: 0.05 makes Δcos = 0.1 a
/// P of 0.88).
pub const DEFAULT_SIMILARITY_TAU: f64 = 0.05;

/// A parsed oracle spec.
#[derive(Clone, Debug, PartialEq)]
pub enum OracleSpec {
    Similarity {
        dir: PathBuf,
        tau: f64,
    },
    Reward {
        dir: PathBuf,
    },
    Judge {
        dir: PathBuf,
        template: Option<PathBuf>,
    },
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// `name` and `options` as written (for display); `game` parsed from them.
    Game {
        name: String,
        options: Vec<(String, String)>,
        game: Game,
    },
}

/// A path or value as a spec token: quoted when it holds a comma or starts with a quote.
fn quote_if_needed(s: &str) -> String {
    if !s.contains(',') && !s.starts_with(['"', '\'']) {
        s.to_string()
    } else if s.contains('"') {
        format!("'{s}'")
    } else {
        format!("\"{s}\"")
    }
}

impl fmt::Display for OracleSpec {
    /// The canonical spec: parsing it gives the same [`OracleSpec`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OracleSpec::Similarity { dir, tau } => write!(
                f,
                "similarity:{},tau={tau}",
                quote_if_needed(&dir.to_string_lossy())
            ),
            OracleSpec::Reward { dir } => {
                write!(f, "reward:{}", quote_if_needed(&dir.to_string_lossy()))
            }
            OracleSpec::Judge { dir, template } => {
                write!(f, "judge:{}", quote_if_needed(&dir.to_string_lossy()))?;
                if let Some(t) = template {
                    write!(f, ",template={}", quote_if_needed(&t.to_string_lossy()))?;
                }
                Ok(())
            }
            OracleSpec::Command { argv, timeout } => {
                let cmd = shlex::try_join(argv.iter().map(String::as_str))
                    .unwrap_or_else(|_| argv.join(" "));
                write!(f, "command:\"{cmd}\",timeout={}", timeout.as_secs_f64())
            }
            OracleSpec::Game { name, options, .. } => {
                write!(f, "game:{name}")?;
                for (k, v) in options {
                    write!(f, ",{k}={v}")?;
                }
                Ok(())
            }
        }
    }
}

/// Splits off one possibly quoted token ending at `,` or the end: (token, rest after the comma).
/// A token quoted with `"` or `'` ends at the next same quote and is returned without its quotes.
fn take_token(s: &str) -> Result<(String, Option<&str>)> {
    match s.chars().next() {
        Some(q @ ('"' | '\'')) => {
            let Some(end) = s[1..].find(q) else {
                bail!("unterminated quote {q} in `{s}`");
            };
            let inner = &s[1..1 + end];
            let rest = &s[2 + end..];
            match rest.strip_prefix(',') {
                Some(r) => Ok((inner.to_string(), Some(r))),
                None if rest.is_empty() => Ok((inner.to_string(), None)),
                None => bail!("expected `,` after the closing quote, found `{rest}`"),
            }
        }
        _ => match s.split_once(',') {
            Some((a, b)) => Ok((a.to_string(), Some(b))),
            None => Ok((s.to_string(), None)),
        },
    }
}

/// `key=value,key=value` (values possibly quoted).
fn parse_options(mut rest: Option<&str>) -> Result<Vec<(String, String)>> {
    let mut opts = Vec::new();
    while let Some(r) = rest {
        let Some((key, value)) = r.split_once('=') else {
            bail!("expected `key=value` after `,`, found `{r}`");
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("bad option name `{key}`");
        }
        let (v, next) = take_token(value)?;
        opts.push((key.to_string(), v));
        rest = next;
    }
    Ok(opts)
}

/// A quoted command: it may itself hold quotes (`command:"python3 -c "print(1)""` and
/// `command:"python3 -c 'print(1)'"` both work), so it ends at the LAST quote of its kind after
/// which only `,key=value` options follow (options of `command` never hold quotes).
fn split_command(s: &str) -> Result<(String, Vec<(String, String)>)> {
    let Some(q) = s.chars().next().filter(|c| matches!(c, '"' | '\'')) else {
        // Unquoted: the whole rest is the command, no options.
        return Ok((s.to_string(), Vec::new()));
    };
    let Some(end) = s.rfind(q).filter(|&e| e > 0) else {
        bail!("unterminated quote {q} in `{s}`");
    };
    let rest = &s[end + 1..];
    let opts = match rest.strip_prefix(',') {
        Some(r) => parse_options(Some(r))?,
        None if rest.is_empty() => Vec::new(),
        None => bail!("expected `,` after the closing quote, found `{rest}`"),
    };
    Ok((s[1..end].to_string(), opts))
}

/// `ARG[,key=value...]` → (ARG, options).
fn split_arg_options(s: &str) -> Result<(String, Vec<(String, String)>)> {
    let (arg, rest) = take_token(s)?;
    Ok((arg, parse_options(rest)?))
}

fn only_options(kind: &str, opts: &[(String, String)], allowed: &[&str]) -> Result<()> {
    for (k, _) in opts {
        if !allowed.contains(&k.as_str()) {
            if allowed.is_empty() {
                bail!("`{kind}` takes no options, got `{k}`");
            }
            bail!(
                "`{kind}` has no option `{k}` (options: {})",
                allowed.join(", ")
            );
        }
    }
    Ok(())
}

fn option<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn dir_arg(kind: &str, arg: &str) -> Result<PathBuf> {
    let dir = arg.to_string();
    if dir.trim().is_empty() {
        bail!("`{kind}:` needs a model directory, e.g. `{kind}:models/x`");
    }
    Ok(PathBuf::from(dir))
}

impl OracleSpec {
    /// Parses a spec string (module doc). Errors say what was expected and list the kinds.
    pub fn parse(spec: &str) -> Result<OracleSpec> {
        Self::parse_inner(spec).with_context(|| format!("oracle spec `{spec}`"))
    }

    fn parse_inner(spec: &str) -> Result<OracleSpec> {
        let spec = spec.trim();
        let Some((kind, rest)) = spec.split_once(':') else {
            bail!(
                "expected KIND:ARGUMENT with KIND one of {}",
                ORACLE_KINDS.join(", ")
            );
        };
        match kind {
            "similarity" => {
                let (arg, opts) = split_arg_options(rest)?;
                only_options(kind, &opts, &["tau"])?;
                let tau = match option(&opts, "tau") {
                    None => DEFAULT_SIMILARITY_TAU,
                    Some(v) => v
                        .parse::<f64>()
                        .with_context(|| format!("tau={v}: not a number"))?,
                };
                if !(tau.is_finite() && tau > 0.0) {
                    bail!("tau must be a positive temperature, got {tau}");
                }
                Ok(OracleSpec::Similarity {
                    dir: dir_arg(kind, &arg)?,
                    tau,
                })
            }
            "reward" => {
                let (arg, opts) = split_arg_options(rest)?;
                only_options(kind, &opts, &[])?;
                Ok(OracleSpec::Reward {
                    dir: dir_arg(kind, &arg)?,
                })
            }
            "judge" => {
                let (arg, opts) = split_arg_options(rest)?;
                only_options(kind, &opts, &["template"])?;
                let template = option(&opts, "template").map(PathBuf::from);
                Ok(OracleSpec::Judge {
                    dir: dir_arg(kind, &arg)?,
                    template,
                })
            }
            "command" => {
                let (cmd, opts) = split_command(rest)?;
                only_options(kind, &opts, &["timeout"])?;
                let argv = shlex::split(&cmd).with_context(|| {
                    format!("cannot split the command `{cmd}` into words (unbalanced quotes?)")
                })?;
                if argv.is_empty() {
                    bail!("`command:` needs a program, e.g. command:\"python3 scripts/oracles/length_judge.py\"");
                }
                let timeout = match option(&opts, "timeout") {
                    None => super::command::DEFAULT_TIMEOUT,
                    Some(v) => {
                        let secs = v
                            .parse::<f64>()
                            .with_context(|| format!("timeout={v}: not a number of seconds"))?;
                        if !(secs.is_finite() && secs > 0.0) {
                            bail!("timeout must be a positive number of seconds, got {v}");
                        }
                        Duration::from_secs_f64(secs)
                    }
                };
                Ok(OracleSpec::Command { argv, timeout })
            }
            "game" => {
                let (name, opts) = split_arg_options(rest)?;
                let game = Game::parse(&name, &opts)?;
                Ok(OracleSpec::Game {
                    name,
                    options: opts,
                    game,
                })
            }
            other => bail!(
                "unknown oracle kind `{other}`: choose one of {}",
                ORACLE_KINDS.join(", ")
            ),
        }
    }

    /// The kind, as written before the `:`.
    pub fn kind(&self) -> &'static str {
        match self {
            OracleSpec::Similarity { .. } => "similarity",
            OracleSpec::Reward { .. } => "reward",
            OracleSpec::Judge { .. } => "judge",
            OracleSpec::Command { .. } => "command",
            OracleSpec::Game { .. } => "game",
        }
    }

    /// Whether the oracle is a model (`similarity`, `reward`, `judge`) that runs on a backend.
    pub fn is_model(&self) -> bool {
        matches!(self, OracleSpec::Similarity { .. } | OracleSpec::Reward { .. } | OracleSpec::Judge { .. })
    }

    /// Builds the oracle (starts the command, loads the model); a model oracle loads on the CPU
    /// backend (all cores).
    pub fn build(&self) -> Result<Box<dyn Oracle>> {
        self.build_with(|| CpuBackend::new(None))
    }

    /// Builds the oracle with a model oracle on a clone of backend `b` (the device the command or
    /// loop runs on: the clone shares the CPU pool, or the GPU's context, stream and pools).
    /// `command:` and `game:` oracles do not use `b`.
    pub fn build_on<B: Backend + Clone + 'static>(&self, b: &B) -> Result<Box<dyn Oracle>> {
        self.build_with(|| Ok(b.clone()))
    }

    /// Builds the oracle; `backend` is called only for a model oracle.
    fn build_with<B: Backend + 'static>(&self, backend: impl FnOnce() -> Result<B>) -> Result<Box<dyn Oracle>> {
        let name = self.to_string();
        Ok(match self {
            OracleSpec::Command { argv, timeout } => Box::new(CommandOracle::spawn(argv, *timeout, name)?),
            OracleSpec::Game { game, .. } => Box::new(GameOracle::new(game.clone(), name)),
            OracleSpec::Similarity { dir, tau } => Box::new(SimilarityOracle::load_with(backend()?, dir, *tau)?),
            OracleSpec::Reward { dir } => Box::new(RewardOracle::load_on(backend()?, dir)?),
            OracleSpec::Judge { dir, template } => Box::new(JudgeOracle::load_on(backend()?, dir, template.clone())?),
        })
    }
}

/// Parses `spec` and builds its oracle (a model oracle on the CPU backend).
pub fn build_oracle(spec: &str) -> Result<Box<dyn Oracle>> {
    let parsed = OracleSpec::parse(spec)?;
    parsed
        .build()
        .with_context(|| format!("building oracle `{spec}`"))
}

/// Parses `spec` and builds its oracle, a model oracle on backend `b` ([`OracleSpec::build_on`]).
pub fn build_oracle_on<B: Backend + Clone + 'static>(spec: &str, b: &B) -> Result<Box<dyn Oracle>> {
    OracleSpec::parse(spec)?
        .build_on(b)
        .with_context(|| format!("building oracle `{spec}` on {}", b.name()))
}
