//! `sppo run`: the SPPO loop over N iterations in one process. For t = 1..=N, from policy π_t:
//! sample K responses per prompt → rank them with the oracle → compute the reference log-probs
//! under π_t once → train π_{t+1} → save its checkpoint. Every stage writes its files atomically
//! and then records itself in the manifest, so `--resume` skips finished stages, and training
//! resumes from its last saved optimizer state (every `save_steps` steps).
//!
//! Run directory:
//! ```text
//! config.json                 the resolved configuration
//! manifest.json               completed stages (the only thing --resume trusts)
//! metrics.jsonl               one line per optimizer step (with its iteration)
//! iter-<t>/generations.jsonl  sampled responses
//! iter-<t>/ranked.jsonl       oracle matrices, win-rates, chosen/rejected
//! iter-<t>/ref_logprobs.json  reference summed log-probs, per example and response
//! iter-<t>/train/             optimizer state (resume within an iteration)
//! iter-<t>/checkpoint/        π_{t+1} in Hugging Face format
//! ```
//! After each checkpoint, the `eval` stage ([`eval::stage`]) writes the held-out win-rates (and,
//! on a game, the exact exploitability) into eval.json and metrics.jsonl, and `plots/` is redrawn.

pub mod classes;
pub mod config;
pub mod eval;
pub mod manifest;
pub mod plots;

use crate::backend::cpu::CpuBackend;
use crate::generate::{generate_records, GenOptions};
use crate::logprobs::TextCodec;
use crate::model::Llama;
use crate::prompts::load_prompts;
use crate::sampling::SamplingParams;
use crate::train::data::{read_records, Selection, Tokenization};
use crate::train::trainer::{response_logprobs, TrainSettings, Trainer};
use anyhow::{bail, ensure, Context, Result};
use config::{RunConfig, TrainOn};
use manifest::{config_hash, Manifest, Stage};
use std::path::{Path, PathBuf};

fn iter_dir(run_dir: &Path, t: u32) -> PathBuf {
    run_dir.join(format!("iter-{t}"))
}

fn rel(t: u32, name: &str) -> String {
    format!("iter-{t}/{name}")
}

fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())
}

/// Runs (or resumes) the loop; returns the path of the last checkpoint.
pub fn run(cfg: &RunConfig, resume: bool, threads: Option<usize>) -> Result<PathBuf> {
    let run_dir = &cfg.run_dir;
    let hash = config_hash(cfg)?;
    let mut manifest = match Manifest::load(run_dir)? {
        Some(m) if resume => {
            ensure!(
                m.config_hash == hash,
                "{}: the run was started with another configuration (compare {}); resume with the same settings",
                run_dir.display(),
                run_dir.join("config.json").display()
            );
            m
        }
        Some(_) => bail!("{} already holds a run: pass --resume {} to continue it, or choose another --run-dir", run_dir.display(), run_dir.display()),
        None => {
            if resume {
                bail!("{}: nothing to resume (no manifest.json)", run_dir.display());
            }
            let m = Manifest::new(hash);
            std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
            crate::io::write_atomic(&run_dir.join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
            m.save(run_dir)?;
            m
        }
    };

    // Prompts: the held-out tail for evaluation, the rest split across iterations.
    let mut prompts = load_prompts(&cfg.prompts)?;
    ensure!(prompts.len() > cfg.eval_prompts, "{}: {} prompts, {} held out for evaluation: none left to train on", cfg.prompts.display(), prompts.len(), cfg.eval_prompts);
    prompts.truncate(prompts.len() - cfg.eval_prompts);
    let per_iter = cfg.prompts_per_iteration.unwrap_or(prompts.len() / cfg.iterations as usize).max(1);
    let b = CpuBackend::new(threads)?;
    let mut oracle: Option<Box<dyn crate::oracle::Oracle>> = None;
    let mut policy_dir = cfg.model.clone();
    let mut metrics_text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();

    for t in 1..=cfg.iterations {
        let dir = iter_dir(run_dir, t);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lo = ((t - 1) as usize * per_iter) % prompts.len();
        let chunk: Vec<_> = prompts.iter().cycle().skip(lo).take(per_iter.min(prompts.len())).cloned().collect();
        let checkpoint = dir.join("checkpoint");
        if manifest.is_done(t, Stage::Checkpoint) {
            policy_dir = checkpoint;
            eval::stage(&b, cfg, &mut manifest, t, &mut metrics_text)?;
            continue;
        }
        let mut model = Llama::load(&b, &policy_dir)?;
        let codec = TextCodec::from_model_dir(&policy_dir, model.cfg.vocab_size)?
            .with_context(|| format!("{}: the loop needs tokenizer.json and a chat template", policy_dir.display()))?;

        if !manifest.is_done(t, Stage::Generate) {
            eprintln!("iteration {t}: sampling {} × {} responses", chunk.len(), cfg.num_samples);
            let opts = GenOptions {
                sampling: SamplingParams { temperature: cfg.temperature, top_p: cfg.top_p, top_k: cfg.top_k, min_p: cfg.min_p },
                max_new_tokens: cfg.max_new_tokens,
                eos_ids: vec![],
                seed: cfg.seed,
                iteration: t,
                batch_size: cfg.generation_batch_size,
                max_prefill_tokens: 4096,
            };
            let (lines, total) = generate_records(&b, &mut model, &codec, &policy_dir, &chunk, cfg.num_samples, opts, |_| {})?;
            write_jsonl(&dir.join("generations.jsonl"), &lines)?;
            manifest.complete(run_dir, t, Stage::Generate, vec![rel(t, "generations.jsonl")], serde_json::json!({"prompts": lines.len(), "tokens": total}))?;
        }

        if !manifest.is_done(t, Stage::Rank) {
            eprintln!("iteration {t}: ranking with {}", cfg.oracle);
            if oracle.is_none() {
                oracle = Some(crate::oracle::build_oracle(&cfg.oracle)?);
            }
            let o = oracle.as_mut().map(|o| o.as_mut()).context("internal: oracle")?;
            let winrate = match cfg.winrate {
                config::WinrateEstimate::Scores => crate::oracle::winrate::WinRate::Scores,
                config::WinrateEstimate::Pairwise => crate::oracle::winrate::WinRate::Pairwise,
            };
            let opts = crate::rank::RankOptions { winrate, batch_size: 16, progress: false };
            crate::rank::rank_file(o, &dir.join("generations.jsonl"), &dir.join("ranked.jsonl"), &opts)?;
            manifest.complete(run_dir, t, Stage::Rank, vec![rel(t, "ranked.jsonl")], serde_json::Value::Null)?;
        }

        let tok = Tokenization {
            tokenizer: &codec.tokenizer,
            template: &codec.template,
            end_of_turn: codec.end_of_turn,
            max_length: cfg.max_length,
            max_prompt_length: cfg.max_prompt_length,
        };
        let selection = match cfg.train_on {
            TrainOn::BestWorst => Selection::BestWorst,
            TrainOn::All => Selection::All,
        };
        let examples = read_records(&dir.join("ranked.jsonl"))?
            .iter()
            .map(|(at, rec)| tok.example(rec, selection).with_context(|| at.clone()))
            .collect::<Result<Vec<_>>>()?;

        let refs_path = dir.join("ref_logprobs.json");
        let reference: Vec<Vec<f64>> = if manifest.is_done(t, Stage::RefLogprobs) {
            let text = std::fs::read_to_string(&refs_path).with_context(|| format!("{}: cannot read", refs_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: malformed", refs_path.display()))?;
            serde_json::from_value(v["logprobs"].clone()).with_context(|| format!("{}: no logprobs", refs_path.display()))?
        } else {
            eprintln!("iteration {t}: reference log-probs of {} examples", examples.len());
            let r = response_logprobs(&b, &mut model, &examples, 4096, |_| {})?;
            let doc = serde_json::json!({"format_version": 1, "examples": examples.len(), "logprobs": r});
            crate::io::write_atomic(&refs_path, doc.to_string().as_bytes())?;
            manifest.complete(run_dir, t, Stage::RefLogprobs, vec![rel(t, "ref_logprobs.json")], serde_json::Value::Null)?;
            r
        };
        ensure!(reference.len() == examples.len(), "{}: {} rows for {} examples", refs_path.display(), reference.len(), examples.len());

        let mut settings = TrainSettings::from_run_config(cfg)?;
        settings.iteration = t;
        let mut trainer = Trainer::new(&b, &model, settings, examples.len())?;
        let state_dir = dir.join("train");
        if state_dir.join("state.json").exists() {
            trainer.load_state(&b, &mut model, &state_dir)?;
            eprintln!("iteration {t}: resuming training at step {}", trainer.step());
        }
        eprintln!("iteration {t}: training {} steps", trainer.total_steps);
        let save_steps = cfg.save_steps;
        let metrics_path = run_dir.join("metrics.jsonl");
        trainer.run(&b, &mut model, &examples, &reference, |m, tr, mm| {
            let mut line = serde_json::to_value(m)?;
            if let Some(o) = line.as_object_mut() {
                o.insert("iteration".into(), t.into());
            }
            metrics_text.push_str(&line.to_string());
            metrics_text.push('\n');
            crate::io::write_atomic(&metrics_path, metrics_text.as_bytes())?;
            if m.step % save_steps == 0 {
                tr.save_state(&b, mm, &state_dir)?;
            }
            Ok(())
        })?;
        manifest.complete(run_dir, t, Stage::Train, vec![], serde_json::json!({"steps": trainer.total_steps}))?;
        let dtype = if cfg.save_dtype == "bf16" { crate::model::weights::SaveDtype::Bf16 } else { crate::model::weights::SaveDtype::F32 };
        model.save_pretrained(&b, &checkpoint, Some(&policy_dir), dtype)?;
        manifest.complete(run_dir, t, Stage::Checkpoint, vec![rel(t, "checkpoint/model.safetensors")], serde_json::Value::Null)?;
        eprintln!("iteration {t}: checkpoint {}", checkpoint.display());
        policy_dir = checkpoint;
        eval::stage(&b, cfg, &mut manifest, t, &mut metrics_text)?;
    }
    Ok(policy_dir)
}
