//! Evaluation of a run's policies (`sppo eval`, and the `eval` stage of `sppo run`).
//!
//! The policies are the base (iteration 0, the run's `model`) and each completed iteration's
//! checkpoint. On held-out prompts (the run's `eval_prompts` tail of its prompt file, or a file
//! given to `sppo eval`), each policy samples `eval_num_samples` responses per prompt with the run's
//! sampling settings; the oracle judges each policy's responses together with the base's (and the
//! previous iteration's) for the same prompt, and the per-prompt win-rate is the mean of
//! P(y ≻ y') over the policy's y and the other's y'. The reported win-rate is the mean over prompts,
//! with a **95% percentile bootstrap interval over prompts** (2000 resamples, fixed seed: the same
//! run gives the same interval); prompts are the unit of resampling because the samples of one
//! prompt are not independent.
//!
//! On a `game:` oracle, each policy's class distribution is also computed exactly from the model
//! ([`super::classes`]), and the exploitability max_c P(c ≻ π) − ½ reported per iteration for the
//! policy π_t itself and for the uniform mixture of π_0..π_t (the base is the theory's π_1, so this
//! is the average iterate of SPPO's convergence theorem). The policy is conditional on the prompt:
//! exploitability is computed per prompt (a best response may depend on the prompt) and averaged.
//!
//! Files (run directory):
//! ```text
//! eval.json                  every policy's win-rates, intervals, class distributions, exploitability
//! eval.jsonl                 one line per policy (iteration 0 = base)
//! alpaca_eval/iter-<t>.json  responses in AlpacaEval's format [{instruction, output, generator}]
//! eval/iter-<t>.json         cached samples and class distributions (reused while settings match)
//! ```
//! Sampling draws from the counter-based generator with the run's seed salted by [`EVAL_SEED_SALT`]
//! and iteration = policy index, so evaluation samples never coincide with training samples.

use super::classes::{class_distribution, mixture, ClassDistribution, ExpandLimits, TokenTable};
use super::config::RunConfig;
use super::manifest::{Manifest, Stage};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::generate::{encode_records, generate_records, GenOptions};
use crate::logprobs::TextCodec;
use crate::model::Llama;
use crate::oracle::game::Game;
use crate::oracle::{Oracle, OracleInput, OracleSpec};
use crate::prompts::PromptRecord;
use crate::sampling::SamplingParams;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Added to the run's seed for evaluation sampling (module doc).
pub const EVAL_SEED_SALT: u64 = 0x5EED_E7A1;
/// Bootstrap resamples of the win-rate interval.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// What an evaluation uses: prompts, oracle and sampling.
#[derive(Clone, Debug)]
pub struct EvalSettings {
    pub prompts: Vec<PromptRecord>,
    pub oracle: String,
    pub num_samples: u32,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub batch_size: usize,
    pub decode_weights: crate::generate::DecodeWeights,
}

impl EvalSettings {
    /// The run's settings with its held-out tail; `None` when the run holds none out.
    pub fn from_run_config(cfg: &RunConfig) -> Result<Option<Self>> {
        if cfg.eval_prompts == 0 {
            return Ok(None);
        }
        let quiet = super::report::Reporter::new(super::report::LogMode::Quiet);
        let (_, prompts) = super::split_prompts(cfg, &quiet)?;
        Ok(Some(Self::with_prompts(cfg, prompts)))
    }

    /// The run's sampling settings on the given prompts.
    pub fn with_prompts(cfg: &RunConfig, prompts: Vec<PromptRecord>) -> Self {
        EvalSettings {
            prompts,
            oracle: cfg.oracle.clone(),
            num_samples: cfg.eval_num_samples,
            max_new_tokens: cfg.max_new_tokens,
            sampling: SamplingParams {
                temperature: cfg.temperature,
                top_p: cfg.top_p,
                top_k: cfg.top_k,
                min_p: cfg.min_p,
            },
            seed: cfg.seed,
            batch_size: cfg.generation_batch_size,
            decode_weights: cfg.decode_weights,
        }
    }

    /// A hash of everything the cached samples depend on (the policy's weights aside).
    fn fingerprint(&self) -> String {
        let mut text = format!(
            "{}|{}|{}|{:?}|{}",
            self.num_samples, self.max_new_tokens, self.seed, self.sampling, self.oracle
        );
        // Rounded weights change the samples; auto and f32 give the same tokens.
        if self.decode_weights == crate::generate::DecodeWeights::Bf16 {
            text.push_str("|bf16-weights");
        }
        for p in &self.prompts {
            text.push_str(&format!("|{}", p.id));
            for m in &p.messages {
                text.push_str(&format!("|{}:{}", m.role, m.content));
            }
        }
        format!("{:016x}", crate::rng::fnv1a64(text.as_bytes()))
    }

    fn game(&self) -> Result<Option<Game>> {
        Ok(match OracleSpec::parse(&self.oracle)? {
            OracleSpec::Game { game, .. } => Some(game),
            _ => None,
        })
    }
}

/// One policy to evaluate: its index (0 = base) and model directory.
#[derive(Clone, Debug)]
pub struct Policy {
    pub iteration: u32,
    pub dir: PathBuf,
}

/// The base and every iteration whose checkpoint the manifest records, up to `upto`.
pub fn completed_policies(cfg: &RunConfig, manifest: &Manifest, upto: u32) -> Vec<Policy> {
    let mut out = vec![Policy {
        iteration: 0,
        dir: cfg.model.clone(),
    }];
    for t in 1..=upto.min(cfg.iterations) {
        if manifest.is_done(t, Stage::Checkpoint) {
            out.push(Policy {
                iteration: t,
                dir: cfg.run_dir.join(format!("iter-{t}/checkpoint")),
            });
        }
    }
    out
}

/// A policy's samples on the eval prompts (and its class distributions on a game), cached.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PolicySamples {
    fingerprint: String,
    /// The checkpoint's size and modification time: a rewritten checkpoint invalidates the cache.
    weights_stamp: String,
    /// Per prompt, `num_samples` responses.
    responses: Vec<Vec<String>>,
    /// Per prompt, on a game oracle.
    classes: Option<Vec<ClassDistribution>>,
}

fn weights_stamp(dir: &Path) -> String {
    let mut parts = vec![];
    for f in crate::model::weights::safetensors_files(dir).unwrap_or_default() {
        if let Ok(m) = std::fs::metadata(&f) {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            parts.push(format!("{}:{}:{mtime}", f.display(), m.len()));
        }
    }
    parts.join(";")
}

fn policy_samples<B: Backend>(
    b: &B,
    run_dir: &Path,
    s: &EvalSettings,
    game: Option<&Game>,
    policy: &Policy,
) -> Result<PolicySamples> {
    let cache = run_dir.join(format!("eval/iter-{}.json", policy.iteration));
    let fingerprint = s.fingerprint();
    let stamp = weights_stamp(&policy.dir);
    if let Some(c) = std::fs::read_to_string(&cache)
        .ok()
        .and_then(|t| serde_json::from_str::<PolicySamples>(&t).ok())
    {
        if c.fingerprint == fingerprint
            && c.weights_stamp == stamp
            && c.responses.len() == s.prompts.len()
        {
            return Ok(c);
        }
    }
    let mut model = Llama::load(b, &policy.dir)?;
    let codec =
        TextCodec::from_model_dir(&policy.dir, model.cfg.vocab_size)?.with_context(|| {
            format!(
                "{}: evaluation needs tokenizer.json and a chat template",
                policy.dir.display()
            )
        })?;
    eprintln!(
        "eval: sampling {} × {} responses from iteration {}",
        s.prompts.len(),
        s.num_samples,
        policy.iteration
    );
    let opts = GenOptions {
        sampling: s.sampling,
        max_new_tokens: s.max_new_tokens,
        eos_ids: vec![],
        seed: s.seed.wrapping_add(EVAL_SEED_SALT),
        iteration: policy.iteration,
        batch_size: s.batch_size,
        max_prefill_tokens: crate::run::memory::PACKED_TOKENS,
        weights: s.decode_weights,
    };
    let prompt_ids = encode_records(&codec, &s.prompts)?;
    let (lines, _) = generate_records(
        b,
        &mut model,
        &codec,
        &policy.dir,
        &s.prompts,
        &prompt_ids,
        s.num_samples,
        opts,
        |_| {},
    )?;
    let responses = lines
        .iter()
        .map(|l| {
            serde_json::from_value::<Vec<String>>(l["responses"].clone())
                .context("internal: generation output without responses")
        })
        .collect::<Result<Vec<_>>>()?;
    let classes = match game {
        None => None,
        Some(g) => Some(policy_classes(b, &mut model, &codec, &policy.dir, g, s)?),
    };
    let out = PolicySamples {
        fingerprint,
        weights_stamp: stamp,
        responses,
        classes,
    };
    crate::io::write_atomic(&cache, serde_json::to_string(&out)?.as_bytes())?;
    Ok(out)
}

/// The exact class distribution of one policy on every eval prompt.
fn policy_classes<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    codec: &TextCodec,
    dir: &Path,
    game: &Game,
    s: &EvalSettings,
) -> Result<Vec<ClassDistribution>> {
    // The EOS ids generation stops on (generate_records' rule).
    let gen_cfg = crate::config::GenerationConfig::from_model_dir(dir)?.unwrap_or_default();
    let mut eos = if gen_cfg.eos_token_ids.is_empty() {
        model.cfg.eos_token_ids.clone()
    } else {
        gen_cfg.eos_token_ids
    };
    eos.push(codec.end_of_turn);
    let table = TokenTable::new(&codec.tokenizer, model.cfg.vocab_size)?;
    let limits = ExpandLimits {
        max_new_tokens: s.max_new_tokens,
        ..Default::default()
    };
    s.prompts
        .iter()
        .map(|p| {
            let ids =
                crate::chat::encode_chat(&codec.tokenizer, &codec.template, &p.messages, true)
                    .map_err(|e| e.context(format!("prompt {}", p.id)))?;
            class_distribution(
                b,
                model,
                &codec.tokenizer,
                &table,
                &eos,
                game,
                &ids,
                &limits,
            )
            .with_context(|| format!("class distribution of prompt {}", p.id))
        })
        .collect()
}

/// A mean with its 95% bootstrap interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Mean of `scores` with the 95% percentile bootstrap interval over them (module doc).
pub fn bootstrap_interval(scores: &[f64], seed: u64) -> Result<Interval> {
    ensure!(!scores.is_empty(), "no scores to average");
    let n = scores.len();
    let mean = scores.iter().sum::<f64>() / n as f64;
    let key = crate::rng::RngKey::new(seed, 0, crate::rng::Stream::Eval, 0, 0)?;
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|r| {
            let total: f64 = (0..n)
                .map(|i| {
                    let u = key.uniform_f64((r * n + i) as u64);
                    scores[((u * n as f64) as usize).min(n - 1)]
                })
                .sum();
            total / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at =
        |q: f64| means[((q * BOOTSTRAP_RESAMPLES as f64) as usize).min(BOOTSTRAP_RESAMPLES - 1)];
    Ok(Interval {
        mean,
        lo: at(0.025),
        hi: at(0.975),
    })
}

/// Per prompt, the mean P(a ≻ b) over a's and b's responses, judged in one matrix per prompt.
fn win_rates(
    oracle: &mut dyn Oracle,
    prompts: &[PromptRecord],
    a: &[Vec<String>],
    b: &[Vec<String>],
) -> Result<Vec<f64>> {
    let pools: Vec<Vec<String>> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().chain(y).cloned().collect())
        .collect();
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| {
            p.messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default()
        })
        .collect();
    let inputs: Vec<OracleInput<'_>> = prompts
        .iter()
        .zip(&pools)
        .zip(&texts)
        .map(|((p, pool), text)| OracleInput {
            prompt: text,
            responses: pool,
            reference: p.reference.as_deref(),
        })
        .collect();
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_inputs, chunk_a) in inputs.chunks(16).zip(a.chunks(16)) {
        let judged = oracle.judge(chunk_inputs)?;
        ensure!(
            judged.len() == chunk_inputs.len(),
            "the oracle returned {} judgements for {} prompts",
            judged.len(),
            chunk_inputs.len()
        );
        for (j, ra) in judged.iter().zip(chunk_a) {
            let na = ra.len();
            let k = j.matrix.k();
            ensure!(
                k > na,
                "the oracle judged {k} responses, expected more than {na}"
            );
            let mut total = 0.0;
            for i in 0..na {
                for jj in na..k {
                    total += j.matrix.get(i, jj);
                }
            }
            out.push(total / (na * (k - na)) as f64);
        }
    }
    Ok(out)
}

/// Exact game figures of one iteration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GameFigures {
    /// P(class) averaged over prompts: π_t and the mixture of π_0..π_t.
    pub class_probs: Vec<f64>,
    pub mixture_class_probs: Vec<f64>,
    /// Mean over prompts of max_c P(c ≻ π(·|x)) − ½.
    pub exploitability: f64,
    pub mixture_exploitability: f64,
    /// Largest unresolved mass over prompts (an error bound on both exploitabilities).
    pub unresolved_mass: f64,
}

/// One policy's evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyEval {
    pub iteration: u32,
    pub generator: String,
    /// None for the base itself.
    pub win_rate_vs_base: Option<Interval>,
    pub win_rate_vs_previous: Option<Interval>,
    pub game: Option<GameFigures>,
}

/// What `eval.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub format_version: u32,
    pub oracle: String,
    pub prompts: usize,
    pub num_samples: u32,
    pub interval: String,
    pub policies: Vec<PolicyEval>,
}

fn prompt_text(p: &PromptRecord) -> String {
    p.messages
        .last()
        .map(|m| m.content.clone())
        .unwrap_or_default()
}

/// Evaluates `policies` (the base first) and writes eval.json, eval.jsonl and the AlpacaEval
/// files into `run_dir`.
pub fn evaluate<B: Backend>(
    b: &B,
    run_dir: &Path,
    s: &EvalSettings,
    policies: &[Policy],
    oracle: &mut dyn Oracle,
) -> Result<EvalReport> {
    ensure!(!s.prompts.is_empty(), "no evaluation prompts");
    ensure!(
        policies.first().is_some_and(|p| p.iteration == 0),
        "internal: the base policy must come first"
    );
    let game = s.game()?;
    let samples: Vec<PolicySamples> = policies
        .iter()
        .map(|p| policy_samples(b, run_dir, s, game.as_ref(), p))
        .collect::<Result<_>>()?;
    let run_name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sppo".into());
    let mut out = Vec::with_capacity(policies.len());
    for (i, p) in policies.iter().enumerate() {
        let generator = if p.iteration == 0 {
            format!("{run_name}-base")
        } else {
            format!("{run_name}-iter{}", p.iteration)
        };
        let alpaca: Vec<Value> = s
            .prompts
            .iter()
            .zip(&samples[i].responses)
            .map(|(pr, rs)| json!({"instruction": prompt_text(pr), "output": rs.first().cloned().unwrap_or_default(), "generator": generator}))
            .collect();
        crate::io::write_atomic(
            &run_dir.join(format!("alpaca_eval/iter-{}.json", p.iteration)),
            serde_json::to_string_pretty(&alpaca)?.as_bytes(),
        )?;
        let seed = s
            .seed
            .wrapping_add(EVAL_SEED_SALT)
            .wrapping_add(p.iteration as u64);
        let (vs_base, vs_prev) = if i == 0 {
            (None, None)
        } else {
            let base = win_rates(
                oracle,
                &s.prompts,
                &samples[i].responses,
                &samples[0].responses,
            )
            .context("judging against the base")?;
            let prev = win_rates(
                oracle,
                &s.prompts,
                &samples[i].responses,
                &samples[i - 1].responses,
            )
            .context("judging against the previous iteration")?;
            (
                Some(bootstrap_interval(&base, seed)?),
                Some(bootstrap_interval(&prev, seed ^ 1)?),
            )
        };
        let figures = match &game {
            None => None,
            Some(g) => Some(game_figures(g, &samples[..=i])?),
        };
        out.push(PolicyEval {
            iteration: p.iteration,
            generator,
            win_rate_vs_base: vs_base,
            win_rate_vs_previous: vs_prev,
            game: figures,
        });
    }
    let report = EvalReport {
        format_version: 1,
        oracle: s.oracle.clone(),
        prompts: s.prompts.len(),
        num_samples: s.num_samples,
        interval: format!(
            "95% percentile bootstrap over prompts ({BOOTSTRAP_RESAMPLES} resamples)"
        ),
        policies: out,
    };
    crate::io::write_atomic(
        &run_dir.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let mut lines = String::new();
    for p in &report.policies {
        lines.push_str(&serde_json::to_string(&eval_line(p))?);
        lines.push('\n');
    }
    crate::io::write_atomic(&run_dir.join("eval.jsonl"), lines.as_bytes())?;
    Ok(report)
}

/// Game figures of the last policy in `upto` and of the mixture of all of them.
fn game_figures(game: &Game, upto: &[PolicySamples]) -> Result<GameFigures> {
    let per_policy: Vec<&Vec<ClassDistribution>> = upto
        .iter()
        .map(|s| {
            s.classes
                .as_ref()
                .context("internal: no class distributions")
        })
        .collect::<Result<_>>()?;
    let last = per_policy.last().context("internal: no policy")?;
    let prompts = last.len();
    let (mut expl, mut mix_expl, mut unresolved) = (0.0, 0.0, 0.0f64);
    let (mut probs, mut mix_probs) = (vec![0.0; game.classes()], vec![0.0; game.classes()]);
    for x in 0..prompts {
        let d = &last[x].probs;
        let dists: Vec<&[f64]> = per_policy.iter().map(|p| p[x].probs.as_slice()).collect();
        let m = mixture(&dists);
        expl += game.exploitability(d)? / prompts as f64;
        mix_expl += game.exploitability(&m)? / prompts as f64;
        for c in 0..game.classes() {
            probs[c] += d[c] / prompts as f64;
            mix_probs[c] += m[c] / prompts as f64;
        }
        unresolved = per_policy
            .iter()
            .map(|p| p[x].unresolved)
            .fold(unresolved, f64::max);
    }
    Ok(GameFigures {
        class_probs: probs,
        mixture_class_probs: mix_probs,
        exploitability: expl,
        mixture_exploitability: mix_expl,
        unresolved_mass: unresolved,
    })
}

/// The flat per-iteration line of eval.jsonl and metrics.jsonl.
pub fn eval_line(p: &PolicyEval) -> Value {
    let mut line = json!({"kind": "eval", "eval_iteration": p.iteration, "iteration": p.iteration});
    let o = line.as_object_mut().expect("a JSON object literal");
    for (name, iv) in [
        ("win_rate_vs_base", &p.win_rate_vs_base),
        ("win_rate_vs_previous", &p.win_rate_vs_previous),
    ] {
        if let Some(iv) = iv {
            o.insert(format!("eval_{name}"), iv.mean.into());
            o.insert(format!("eval_{name}_lo"), iv.lo.into());
            o.insert(format!("eval_{name}_hi"), iv.hi.into());
        }
    }
    if let Some(g) = &p.game {
        o.insert("eval_exploitability".into(), g.exploitability.into());
        o.insert(
            "eval_mixture_exploitability".into(),
            g.mixture_exploitability.into(),
        );
        o.insert("eval_class_probs".into(), json!(g.class_probs));
        o.insert("eval_unresolved_mass".into(), g.unresolved_mass.into());
    }
    line
}

/// The `eval` stage of iteration `t` in `sppo run`, after its checkpoint: evaluates the base and
/// iterations 1..=t (cached samples are reused), adds iteration t's line (`kind` = eval) to the
/// metrics (a line left by an interrupted earlier attempt is replaced) and records the stage.
/// `held_out` is the run's evaluation set ([`super::split_prompts`], computed once per run, not
/// reloaded per iteration). Without held-out prompts the stage records itself as skipped. Plots are rewritten either way (a plotting failure only warns).
pub fn stage<B: Backend + Clone + 'static>(
    b: &B,
    cfg: &RunConfig,
    manifest: &mut Manifest,
    t: u32,
    held_out: &[PromptRecord],
    metrics: &mut super::metrics::MetricsLog,
    report: &super::report::Reporter,
) -> Result<()> {
    let run_dir = &cfg.run_dir;
    if !manifest.is_done(t, Stage::Eval) {
        let settings = (cfg.eval_prompts > 0).then(|| EvalSettings::with_prompts(cfg, held_out.to_vec()));
        match settings {
            None => manifest.complete(
                run_dir,
                t,
                Stage::Eval,
                vec![],
                json!({"skipped": "eval_prompts = 0"}),
            )?,
            Some(s) => {
                let _r = crate::nvtx::range_fmt(format_args!("iteration {t}: eval"));
                report.stage_start(t, "eval", &format!("evaluating on {} held-out prompts", s.prompts.len()));
                let mut oracle = crate::oracle::build_oracle_on(&s.oracle, b)?;
                let evaluation = evaluate(
                    b,
                    run_dir,
                    &s,
                    &completed_policies(cfg, manifest, t),
                    oracle.as_mut(),
                )?;
                let last = evaluation
                    .policies
                    .last()
                    .filter(|p| p.iteration == t)
                    .with_context(|| format!("iteration {t}: its checkpoint is not recorded"))?;
                let line = eval_line(last);
                // A line left by an interrupted earlier attempt of this stage is replaced.
                metrics.retain(|l| !(l["kind"] == "eval" && l["iteration"].as_u64() == Some(t as u64)))?;
                metrics.append(&line)?;
                report.eval(&line);
                manifest.complete(run_dir, t, Stage::Eval, vec!["eval.json".into()], line)?;
            }
        }
    }
    if let Err(e) = super::plots::write_plots(run_dir) {
        eprintln!("warning: plots not written: {e:#}");
    }
    Ok(())
}

/// `sppo eval` on the CPU backend with `threads` workers ([`eval_run_on`]).
pub fn eval_run(
    run_dir: &Path,
    prompts: Option<&Path>,
    oracle: Option<&str>,
    num_samples: Option<u32>,
    threads: Option<usize>,
) -> Result<EvalReport> {
    eval_run_on(&CpuBackend::new(threads)?, run_dir, prompts, oracle, num_samples)
}

/// `sppo eval`: evaluates every completed checkpoint of the run in `run_dir`, the policies and a
/// model oracle on backend `b`.
pub fn eval_run_on<B: Backend + Clone + 'static>(
    b: &B,
    run_dir: &Path,
    prompts: Option<&Path>,
    oracle: Option<&str>,
    num_samples: Option<u32>,
) -> Result<EvalReport> {
    let cfg_path = run_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "{}: cannot read (is {} a run directory?)",
            cfg_path.display(),
            run_dir.display()
        )
    })?;
    let keys: super::config::RunKeys = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run configuration", cfg_path.display()))?;
    let mut cfg = RunConfig::resolve(&keys).with_context(|| cfg_path.display().to_string())?;
    // The run may have been moved: its directory is where it is now.
    cfg.run_dir = run_dir.to_path_buf();
    if let Some(o) = oracle {
        OracleSpec::parse(o)?;
        cfg.oracle = o.to_string();
    }
    if let Some(n) = num_samples {
        ensure!(n >= 1, "--num-samples must be at least 1");
        cfg.eval_num_samples = n;
    }
    let manifest = Manifest::load(run_dir)?.with_context(|| {
        format!(
            "{}: no manifest.json (not a run directory)",
            run_dir.display()
        )
    })?;
    let settings = match prompts {
        Some(p) => EvalSettings::with_prompts(&cfg, crate::prompts::load_prompts(p)?),
        None => match EvalSettings::from_run_config(&cfg)? {
            Some(s) => s,
            None => bail!(
                "{}: the run holds no prompts out (eval_prompts = 0): pass --prompts FILE",
                run_dir.display()
            ),
        },
    };
    let policies = completed_policies(&cfg, &manifest, cfg.iterations);
    let mut o = crate::oracle::build_oracle_on(&settings.oracle, b)?;
    let report = evaluate(b, run_dir, &settings, &policies, o.as_mut())?;
    if let Err(e) = super::plots::write_plots(run_dir) {
        eprintln!("warning: plots not written: {e:#}");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_interval_brackets_the_mean() {
        let scores = [0.2, 0.9, 0.6, 0.4, 0.7, 0.5, 0.8, 0.3];
        let iv = bootstrap_interval(&scores, 7).unwrap();
        assert!((iv.mean - 0.55).abs() < 1e-12);
        assert!(iv.lo < iv.mean && iv.mean < iv.hi, "{iv:?}");
        // The standard error is ~0.08: the 95% interval spans roughly ±0.16.
        assert!(iv.hi - iv.lo > 0.2 && iv.hi - iv.lo < 0.45, "{iv:?}");
        assert_eq!(
            bootstrap_interval(&scores, 7).unwrap(),
            iv,
            "same seed, same interval"
        );
        let one = bootstrap_interval(&[0.75], 1).unwrap();
        assert_eq!((one.lo, one.mean, one.hi), (0.75, 0.75, 0.75));
    }
}
