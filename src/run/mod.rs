//! `sppo run`: the SPPO loop over N iterations in one process. For t = 1..=N, from policy π_t:
//! sample K responses per prompt → rank them with the oracle → compute the reference log-probs
//! under π_t once → train π_{t+1} → save its checkpoint.
//!
//! **Crash safety.** A run may be killed (SIGKILL, power loss of the process) at any instant;
//! `--resume` then continues without redoing finished work and ends exactly as an uninterrupted
//! run with the same seed (tests/faults.rs kills runs at many points to prove it):
//! - every file is written atomically (`crate::io`), and a stage records itself in the manifest
//!   only after its files are complete; `--resume` trusts the manifest and nothing else, and first
//!   removes the temporaries a killed write left behind;
//! - sampling and the reference log-probs append their finished shards / packed batches to a
//!   fsynced partial log, resumed at the last whole shard (the shards are the same in every run, so
//!   resuming computes exactly what an uninterrupted run does); ranking resumes its own append log;
//! - training saves its parameters and optimizer state every `save_steps` steps and at its last
//!   step; a kill loses at most the steps since the last save, and `metrics.jsonl` is rewound to the
//!   resumed step so no line is doubled;
//! - a NaN/Inf loss or gradient stops the run before the update: the last checkpoint and the last
//!   saved optimizer state are never overwritten by a bad step.
//!
//! Run directory:
//! ```text
//! config.json                 the resolved configuration
//! manifest.json               completed stages (the only thing --resume trusts)
//! metrics.jsonl               one line per event: `kind` = train (one optimizer step), ...
//! iter-<t>/generations.jsonl  sampled responses (generations.partial.jsonl while sampling)
//! iter-<t>/ranked.jsonl       oracle matrices, win-rates, chosen/rejected
//! iter-<t>/ref_logprobs.json  reference summed log-probs, per example and response
//! iter-<t>/train/             optimizer state (resume within an iteration; removed once the
//!                             checkpoint is saved)
//! iter-<t>/checkpoint/        π_{t+1} in Hugging Face format
//! ```
//! After each checkpoint, the `eval` stage ([`eval::stage`]) writes the held-out win-rates (and,
//! on a game, the exact exploitability) into eval.json and metrics.jsonl, and `plots/` is redrawn.

pub mod classes;
pub mod config;
pub mod eval;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod plots;
pub mod report;

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::generate::{encode_records, generate_records, GenOptions};
use crate::logprobs::TextCodec;
use crate::model::Llama;
use crate::nvtx;
use crate::prompts::{load_prompts, PromptRecord};
use crate::sampling::SamplingParams;
use crate::train::data::{read_records, Selection, Tokenization};
use crate::train::trainer::{response_logprobs_from, NonFinite, TrainExample, TrainSettings, Trainer};
use anyhow::{bail, ensure, Context, Result};
use config::{RunConfig, TrainOn};
use manifest::{config_hash, Manifest, Stage};
use metrics::MetricsLog;
use report::Reporter;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Exit status of `sppo` for a failure of this kind: 3 a NaN/Inf stopped training, 4 not enough
/// memory, 5 the disk is full, 1 anything else.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.chain().any(|c| c.downcast_ref::<NonFinite>().is_some()) {
        3
    } else if e.chain().any(|c| c.downcast_ref::<memory::NotEnoughMemory>().is_some()) {
        4
    } else if crate::io::is_storage_full(e) {
        5
    } else {
        1
    }
}

fn iter_dir(run_dir: &Path, t: u32) -> PathBuf {
    run_dir.join(format!("iter-{t}"))
}

fn rel(t: u32, name: &str) -> String {
    format!("iter-{t}/{name}")
}

/// Prompts sampled per shard of the generation log: a few decode batches' worth, so a kill loses
/// little and continuous batching still has work to overlap.
fn generation_shard(cfg: &RunConfig) -> usize {
    (4 * cfg.generation_batch_size / cfg.num_samples as usize).max(1)
}

/// The complete lines of an append log, cutting a torn last line (no newline) left by a kill.
fn read_append_log(path: &Path) -> Result<Vec<Value>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1)))
        .collect()
}

/// Rewrites an append log to its first `lines` lines (atomic), then opens it for appending.
fn reopen_append_log(path: &Path, lines: &[Value]) -> Result<std::fs::File> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())?;
    OpenOptions::new().append(true).open(path).with_context(|| format!("{}: cannot open for appending", path.display()))
}

fn append_synced(file: &mut std::fs::File, path: &Path, lines: &[Value]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    file.sync_data().with_context(|| format!("syncing {}", path.display()))
}

/// f64 values as their bit patterns: serde_json's default float parsing may be 1 ulp off, and a
/// resumed run must train on exactly the reference log-probs an uninterrupted one computed.
fn to_bits(rows: &[Vec<f64>]) -> Value {
    rows.iter().map(|r| r.iter().map(|x| x.to_bits()).collect::<Vec<u64>>()).collect::<Vec<_>>().into()
}

fn from_bits(v: &Value) -> Result<Vec<Vec<f64>>> {
    let bits: Vec<Vec<u64>> = serde_json::from_value(v.clone())?;
    Ok(bits.into_iter().map(|r| r.into_iter().map(f64::from_bits).collect()).collect())
}

/// Adds what a failure means for the run's files: what was kept and how to continue.
fn explain_failure(e: anyhow::Error, run_dir: &Path, kept: &str) -> anyhow::Error {
    if e.chain().any(|c| c.downcast_ref::<NonFinite>().is_some()) {
        e.context(format!("training stopped on a non-finite value; kept {kept}"))
    } else if crate::io::is_storage_full(&e) {
        e.context(format!("the disk is full; kept {kept}: free space and continue with `sppo run --resume {}`", run_dir.display()))
    } else {
        e
    }
}

/// What the memory check needs of `cfg`; `generation`: whether the run samples.
fn memory_plan(cfg: &RunConfig, generation: bool) -> memory::Plan {
    memory::Plan {
        micro_batch: cfg.per_device_train_batch_size,
        responses_per_example: match cfg.train_on {
            TrainOn::BestWorst => 2,
            TrainOn::All => cfg.num_samples as usize,
        },
        max_length: cfg.max_length,
        max_prompt_length: cfg.max_prompt_length,
        max_new_tokens: cfg.max_new_tokens,
        generation_batch_size: cfg.generation_batch_size,
        gradient_checkpointing: cfg.gradient_checkpointing,
        optimizer_buffers: if cfg.optim == "adamw" { 2 } else { 1 },
        generation,
    }
}

/// The memory check of the `sppo run` loop of `cfg` against what this machine has (see
/// [`memory`]), on the CPU backend.
pub fn check_memory(cfg: &RunConfig) -> Result<()> {
    let model_cfg = crate::config::ModelConfig::from_model_dir(&cfg.model)?;
    if let Some((available, source)) = memory::available() {
        memory::check(&model_cfg, &memory_plan(cfg, true), available, &source).with_context(|| format!("{}: the run's plan", cfg.model.display()))?;
    }
    Ok(())
}

/// The memory `b` computes in: its GPU's free memory (`Some(true)` with the figure) or the host's
/// (`Some(false)`), with where the figure came from; `None` when the host's is unknown.
fn memory_of<B: Backend>(b: &B) -> Result<Option<(u64, String, bool)>> {
    Ok(match b.device_memory()? {
        Some(dev) => {
            let (available, source) = memory::gpu_available_override()
                .unwrap_or_else(|| (dev.free, format!("free on {} of {} total", dev.name, memory::human(dev.total))));
            Some((available, source, true))
        }
        None => memory::available().map(|(available, source)| (available, source, false)),
    })
}

/// The memory check of `cfg` on backend `b`, before anything is loaded: a GPU backend's free
/// device memory against an estimate in its storage precision, else the host's (see [`memory`]).
/// Sampling is counted when `cfg` is a whole loop (`sppo run`), not for `sppo train` (its
/// `max_new_tokens`… keep their defaults there): pass `generation` accordingly.
pub fn check_memory_for<B: Backend>(b: &B, cfg: &RunConfig, generation: bool) -> Result<()> {
    let model_cfg = crate::config::ModelConfig::from_model_dir(&cfg.model)?;
    let plan = memory_plan(cfg, generation);
    let what = || format!("{}: the run's plan on {}", cfg.model.display(), b.name());
    match memory_of(b)? {
        Some((available, source, true)) => {
            memory::check_gpu(&model_cfg, &plan, &memory::Storage::of(b.precision()), available, &source).with_context(what)?;
        }
        Some((available, source, false)) => {
            memory::check(&model_cfg, &plan, available, &source).with_context(what)?;
        }
        None => {}
    }
    Ok(())
}

/// The memory check of a one-off command (`sppo generate`, `sppo logprobs`) on the model `cfg`
/// of `model_dir`, before it is loaded: the GPU's free memory on a GPU backend, else the host's.
pub fn check_memory_job<B: Backend>(b: &B, cfg: &crate::config::ModelConfig, model_dir: &Path, job: memory::Job) -> Result<()> {
    if let Some((available, source, gpu)) = memory_of(b)? {
        let storage = memory::Storage::of(b.precision());
        memory::check_job(cfg, job, &storage, gpu, available, &source).with_context(|| format!("{}: on {}", model_dir.display(), b.name()))?;
    }
    Ok(())
}

/// [`check_memory_for`] of a whole loop (`sppo run`).
pub fn check_memory_on<B: Backend>(b: &B, cfg: &RunConfig) -> Result<()> {
    check_memory_for(b, cfg, true)
}

/// Runs (or resumes) the loop on the CPU backend; returns the path of the last checkpoint.
pub fn run(cfg: &RunConfig, resume: bool, threads: Option<usize>, report: &Reporter) -> Result<PathBuf> {
    run_on(&CpuBackend::new(threads)?, cfg, resume, report)
}

/// Runs (or resumes) the loop on backend `b`: the policy (sampling, reference log-probs,
/// training, evaluation sampling) and the model oracles (`similarity`, `reward`, `judge`, on a
/// clone of `b`: [`crate::oracle::OracleSpec::build_on`]). Returns the last checkpoint.
pub fn run_on<B: Backend + Clone + 'static>(b: &B, cfg: &RunConfig, resume: bool, report: &Reporter) -> Result<PathBuf> {
    let run_dir = &cfg.run_dir;
    let hash = config_hash(cfg)?;
    check_memory_on(b, cfg)?;
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
            // A run killed before its first manifest has its config.json and nothing else to keep.
            if resume && !run_dir.join("config.json").exists() {
                bail!("{}: nothing to resume (no manifest.json)", run_dir.display());
            }
            let m = Manifest::new(hash);
            std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
            crate::io::write_atomic(&run_dir.join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
            m.save(run_dir)?;
            m
        }
    };
    // Temporaries of writes a kill interrupted.
    let mut stale = crate::io::recover_temporaries(run_dir)?;
    for t in 1..=cfg.iterations {
        stale.extend(crate::io::recover_temporaries(&iter_dir(run_dir, t))?);
    }
    for p in &stale {
        report.detail(&format!("removed or restored the interrupted write {}", p.display()));
    }

    // Prompts: the held-out tail for evaluation, the rest split across iterations.
    let (prompts, held_out) = split_prompts(cfg, report)?;
    let per_iter = cfg.prompts_per_iteration.unwrap_or(prompts.len() / cfg.iterations as usize).max(1);
    let mut oracle: Option<Box<dyn crate::oracle::Oracle>> = None;
    let mut policy_dir = cfg.model.clone();
    let mut metrics = MetricsLog::open(&run_dir.join("metrics.jsonl"))?;

    for t in 1..=cfg.iterations {
        let _iteration = nvtx::range_fmt(format_args!("iteration {t}"));
        let dir = iter_dir(run_dir, t);
        let lo = ((t - 1) as usize * per_iter) % prompts.len();
        let chunk: Vec<_> = prompts.iter().cycle().skip(lo).take(per_iter.min(prompts.len())).cloned().collect();
        let checkpoint = dir.join("checkpoint");
        if manifest.is_done(t, Stage::Checkpoint) {
            // The state was removed after the checkpoint; a kill in between may have left it.
            if dir.join("train").exists() {
                std::fs::remove_dir_all(dir.join("train")).with_context(|| format!("removing {}", dir.join("train").display()))?;
            }
            policy_dir = checkpoint;
            eval::stage(b, cfg, &mut manifest, t, &held_out, &mut metrics, report)?;
            continue;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut model = Llama::load(b, &policy_dir)?;
        let codec = TextCodec::from_model_dir(&policy_dir, model.cfg.vocab_size)?
            .with_context(|| format!("{}: the loop needs tokenizer.json and a chat template", policy_dir.display()))?;

        if !manifest.is_done(t, Stage::Generate) {
            let started = Instant::now();
            let _r = nvtx::range_fmt(format_args!("iteration {t}: sample"));
            report.stage_start(t, "generate", &format!("sampling {} × {} responses", chunk.len(), cfg.num_samples));
            let total = sample(cfg, t, b, &mut model, &codec, &policy_dir, &chunk, &dir, report)?;
            manifest.complete(run_dir, t, Stage::Generate, vec![rel(t, "generations.jsonl")], json!({"prompts": chunk.len(), "tokens": total}))?;
            report.stage_end(t, "generate", started.elapsed().as_secs_f64(), &json!({"prompts": chunk.len(), "tokens": total}));
        }

        if !manifest.is_done(t, Stage::Rank) {
            let started = Instant::now();
            let _r = nvtx::range_fmt(format_args!("iteration {t}: rank"));
            report.stage_start(t, "rank", &format!("ranking with {}", cfg.oracle));
            if oracle.is_none() {
                oracle = Some(crate::oracle::build_oracle_on(&cfg.oracle, b)?);
            }
            let o = oracle.as_mut().map(|o| o.as_mut()).context("internal: oracle")?;
            let winrate = match cfg.winrate {
                config::WinrateEstimate::Scores => crate::oracle::winrate::WinRate::Scores,
                config::WinrateEstimate::Pairwise => crate::oracle::winrate::WinRate::Pairwise,
            };
            let opts = crate::rank::RankOptions { winrate, batch_size: 16, progress: report.bars() };
            let s = crate::rank::rank_file(o, &dir.join("generations.jsonl"), &dir.join("ranked.jsonl"), &opts)?;
            manifest.complete(run_dir, t, Stage::Rank, vec![rel(t, "ranked.jsonl")], Value::Null)?;
            report.stage_end(t, "rank", started.elapsed().as_secs_f64(), &json!({"prompts": s.prompts, "resumed": s.resumed, "pairs": s.pairs}));
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
            let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: malformed", refs_path.display()))?;
            match v.get("logprobs_bits") {
                Some(bits) => from_bits(bits).with_context(|| format!("{}: malformed logprobs_bits", refs_path.display()))?,
                None => serde_json::from_value(v["logprobs"].clone()).with_context(|| format!("{}: no logprobs", refs_path.display()))?,
            }
        } else {
            let started = Instant::now();
            let _r = nvtx::range_fmt(format_args!("iteration {t}: reference log-probs"));
            report.stage_start(t, "ref_logprobs", &format!("reference log-probs of {} examples", examples.len()));
            let r = reference_logprobs(b, &mut model, &examples, memory::PACKED_TOKENS, &dir, report)?;
            if let Some((i, _)) = r.iter().enumerate().find(|(_, row)| row.iter().any(|x| !x.is_finite())) {
                bail!("iteration {t}: the reference log-prob of training example {i} is not finite under {}: the policy produces NaN/Inf", policy_dir.display());
            }
            let doc = json!({"format_version": 1, "examples": examples.len(), "logprobs": r, "logprobs_bits": to_bits(&r)});
            crate::io::write_atomic(&refs_path, doc.to_string().as_bytes())?;
            manifest.complete(run_dir, t, Stage::RefLogprobs, vec![rel(t, "ref_logprobs.json")], Value::Null)?;
            let _ = std::fs::remove_file(dir.join("ref_logprobs.partial.jsonl"));
            report.stage_end(t, "ref_logprobs", started.elapsed().as_secs_f64(), &json!({"examples": examples.len()}));
            r
        };
        ensure!(reference.len() == examples.len(), "{}: {} rows for {} examples", refs_path.display(), reference.len(), examples.len());

        let started = Instant::now();
        let mut settings = TrainSettings::from_run_config(cfg)?;
        settings.iteration = t;
        let mut trainer = Trainer::new(b, &model, settings, examples.len())?;
        let state_dir = dir.join("train");
        if state_dir.join("state.json").exists() {
            trainer.load_state(b, &mut model, &state_dir)?;
            report.info(&format!("iteration {t}: resuming training at step {}", trainer.step()));
        }
        let dropped = metrics.rewind_training(t, trainer.step())?;
        if dropped > 0 {
            report.detail(&format!("{}: dropped {dropped} lines of steps being redone", metrics.path().display()));
        }
        if !manifest.is_done(t, Stage::Train) {
            let _r = nvtx::range_fmt(format_args!("iteration {t}: train"));
            report.stage_start(t, "train", &format!("training {} steps", trainer.total_steps));
            let kept = |saved: Option<usize>| match saved {
                Some(s) => format!("the last checkpoint {} and the optimizer state of step {s} in {}", policy_dir.display(), state_dir.display()),
                None => format!("the last checkpoint {} (no optimizer state saved yet in this iteration)", policy_dir.display()),
            };
            let mut saved = (trainer.step() > 0).then_some(trainer.step());
            let total_steps = trainer.total_steps;
            let pb = report.bar(total_steps as u64, "steps");
            pb.set_position(trainer.step() as u64);
            let result = trainer.run(b, &mut model, &examples, &reference, |m, tr, mm| {
                let mut line = json!({"kind": "train", "iteration": t});
                if let (Some(o), Value::Object(fields)) = (line.as_object_mut(), serde_json::to_value(m)?) {
                    o.extend(fields);
                    o.insert("rss_bytes".into(), metrics::resident_bytes().into());
                }
                metrics.append(&line)?;
                report.train_step(&line);
                pb.set_message(format!("loss {:.4e}", m.loss));
                pb.inc(1);
                // The last step is saved too: a kill before the checkpoint then redoes nothing.
                if m.step % cfg.save_steps == 0 || m.step == total_steps {
                    tr.save_state(b, mm, &state_dir).with_context(|| format!("step {}: saving the optimizer state to {}", m.step, state_dir.display()))?;
                    saved = Some(m.step);
                }
                Ok(())
            });
            pb.finish_and_clear();
            result.map_err(|e| explain_failure(e, run_dir, &kept(saved)).context(format!("iteration {t}")))?;
            manifest.complete(run_dir, t, Stage::Train, vec![], json!({"steps": trainer.total_steps, "skipped_steps": trainer.skipped()}))?;
            report.stage_end(t, "train", started.elapsed().as_secs_f64(), &json!({"steps": trainer.total_steps, "skipped_steps": trainer.skipped()}));
        }
        ensure!(trainer.step() == trainer.total_steps, "{}: training is recorded as done but the saved state is at step {} of {}", state_dir.display(), trainer.step(), trainer.total_steps);

        let started = Instant::now();
        let checkpoint_range = nvtx::range_fmt(format_args!("iteration {t}: checkpoint"));
        report.stage_start(t, "checkpoint", &format!("saving {}", checkpoint.display()));
        let dtype = if cfg.save_dtype == "bf16" { crate::model::weights::SaveDtype::Bf16 } else { crate::model::weights::SaveDtype::F32 };
        model
            .save_pretrained(b, &checkpoint, Some(&policy_dir), dtype)
            .with_context(|| format!("saving the checkpoint {}", checkpoint.display()))
            .map_err(|e| explain_failure(e, run_dir, &format!("the last checkpoint {} and the optimizer state in {}", policy_dir.display(), state_dir.display())))
            .with_context(|| format!("iteration {t}"))?;
        manifest.complete(run_dir, t, Stage::Checkpoint, vec![rel(t, "checkpoint/model.safetensors")], Value::Null)?;
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir).with_context(|| format!("removing {}", state_dir.display()))?;
        }
        report.stage_end(t, "checkpoint", started.elapsed().as_secs_f64(), &json!({"path": checkpoint}));
        drop(checkpoint_range);
        report.info(&format!("iteration {t}: checkpoint {}", checkpoint.display()));
        policy_dir = checkpoint;
        eval::stage(b, cfg, &mut manifest, t, &held_out, &mut metrics, report)?;
    }
    Ok(policy_dir)
}

/// The run's prompts: (training prompts in file order, the held-out evaluation prompts). The
/// held-out set is the last `eval_prompts` usable prompts of the file, training takes the usable
/// ones before them. A prompt is usable when its chat rendering with the generation prompt fits
/// in `max_prompt_length` tokens: sampling then conditions on exactly the prompt that training
/// scores (the reference samples from the whole prompt but trains on its left-truncated tail),
/// and a scraped set's multi-thousand-token prompts do not stall a CPU run. Prompts are tokenized
/// lazily, only as far as the run needs them.
pub fn split_prompts(cfg: &RunConfig, report: &Reporter) -> Result<(Vec<PromptRecord>, Vec<PromptRecord>)> {
    let all = load_prompts(&cfg.prompts)?;
    let vocab = crate::config::ModelConfig::from_model_dir(&cfg.model)?.vocab_size;
    let codec = TextCodec::from_model_dir(&cfg.model, vocab)?
        .with_context(|| format!("{}: the loop needs tokenizer.json and a chat template", cfg.model.display()))?;
    let fits = |p: &PromptRecord| -> Result<bool> {
        let ids = crate::chat::encode_chat(&codec.tokenizer, &codec.template, &p.messages, true)
            .map_err(|e| e.context(format!("{}: prompt {}", cfg.prompts.display(), p.id)))?;
        Ok(ids.len() <= cfg.max_prompt_length)
    };
    let mut skipped = 0usize;
    let mut held_out = Vec::new();
    let mut end = all.len();
    while held_out.len() < cfg.eval_prompts && end > 0 {
        end -= 1;
        if fits(&all[end])? {
            held_out.push(all[end].clone());
        } else {
            skipped += 1;
        }
    }
    held_out.reverse();
    let wanted = cfg.prompts_per_iteration.map(|n| n * cfg.iterations as usize);
    let mut train = Vec::new();
    for p in &all[..end] {
        if wanted.is_some_and(|w| train.len() >= w) {
            break;
        }
        if fits(p)? {
            train.push(p.clone());
        } else {
            skipped += 1;
        }
    }
    if skipped > 0 {
        report.info(&format!(
            "{}: skipped {skipped} prompts longer than max_prompt_length = {} tokens with the chat template",
            cfg.prompts.display(),
            cfg.max_prompt_length
        ));
    }
    ensure!(
        held_out.len() == cfg.eval_prompts,
        "{}: only {} prompts fit max_prompt_length = {} tokens, {} wanted for evaluation",
        cfg.prompts.display(),
        held_out.len(),
        cfg.max_prompt_length,
        cfg.eval_prompts
    );
    ensure!(
        !train.is_empty(),
        "{}: no prompt left to train on ({} held out for evaluation; prompts longer than max_prompt_length = {} tokens are skipped)",
        cfg.prompts.display(),
        cfg.eval_prompts,
        cfg.max_prompt_length
    );
    Ok((train, held_out))
}

/// Samples `chunk` in fixed shards appended to `generations.partial.jsonl`, resuming after the
/// last whole shard; renames the log to `generations.jsonl` when every prompt is done. Returns the
/// tokens generated (all shards).
#[allow(clippy::too_many_arguments)]
fn sample<B: Backend>(
    cfg: &RunConfig,
    t: u32,
    b: &B,
    model: &mut Llama<B>,
    codec: &TextCodec,
    policy_dir: &Path,
    chunk: &[PromptRecord],
    dir: &Path,
    report: &Reporter,
) -> Result<usize> {
    let partial = dir.join("generations.partial.jsonl");
    let final_path = dir.join("generations.jsonl");
    // Killed after the complete log was renamed but before the manifest recorded it: nothing to redo.
    if final_path.exists() && !partial.exists() {
        std::fs::rename(&final_path, &partial).with_context(|| format!("renaming {} to {}", final_path.display(), partial.display()))?;
    }
    let shard = generation_shard(cfg);
    let mut done = read_append_log(&partial)?;
    // Only whole shards count: a kill mid-append may have left part of one.
    if done.len() < chunk.len() {
        done.truncate(done.len() / shard * shard);
    }
    ensure!(done.len() <= chunk.len(), "{}: {} lines for {} prompts: delete it to resample", partial.display(), done.len(), chunk.len());
    for (line, p) in done.iter().zip(chunk) {
        ensure!(line["prompt_id"] == p.id.as_str(), "{}: line for prompt {} where {} was expected: delete it to resample", partial.display(), line["prompt_id"], p.id);
    }
    let mut file = reopen_append_log(&partial, &done)?;
    if !done.is_empty() {
        report.info(&format!("iteration {t}: sampling resumes after {} of {} prompts", done.len(), chunk.len()));
    }
    let pb = report.bar(chunk.len() as u64, "prompts");
    pb.set_position(done.len() as u64);
    let started = Instant::now();
    let mut new_tokens = 0usize;
    for shard_prompts in chunk[done.len()..].chunks(shard) {
        let opts = GenOptions {
            sampling: SamplingParams { temperature: cfg.temperature, top_p: cfg.top_p, top_k: cfg.top_k, min_p: cfg.min_p },
            max_new_tokens: cfg.max_new_tokens,
            eos_ids: vec![],
            seed: cfg.seed,
            iteration: t,
            batch_size: cfg.generation_batch_size,
            max_prefill_tokens: memory::PACKED_TOKENS,
            weights: cfg.decode_weights,
        };
        let prompt_ids = encode_records(codec, shard_prompts)?;
        let (lines, _) = generate_records(b, model, codec, policy_dir, shard_prompts, &prompt_ids, cfg.num_samples, opts, |n| {
            new_tokens += n;
            pb.set_message(format!("{:.1} tokens/s", new_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)));
        })?;
        append_synced(&mut file, &partial, &lines)?;
        done.extend(lines);
        pb.set_position(done.len() as u64);
    }
    pb.finish_and_clear();
    drop(file);
    std::fs::rename(&partial, &final_path).with_context(|| format!("renaming {} to {}", partial.display(), final_path.display()))?;
    let total = done.iter().map(|l| l["num_tokens"].as_array().map_or(0, |n| n.iter().filter_map(Value::as_u64).sum::<u64>() as usize)).sum();
    report.detail(&format!("iteration {t}: {total} tokens sampled ({new_tokens} by this process)"));
    Ok(total)
}

/// Reference log-probs of every example, each packed batch appended to `ref_logprobs.partial.jsonl`
/// as it finishes; a resumed pass starts after the last logged batch.
fn reference_logprobs<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    examples: &[TrainExample],
    max_batch_tokens: usize,
    dir: &Path,
    report: &Reporter,
) -> Result<Vec<Vec<f64>>> {
    let partial = dir.join("ref_logprobs.partial.jsonl");
    let logged = read_append_log(&partial)?;
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(examples.len());
    let mut kept = Vec::new();
    for line in logged {
        if line["start"].as_u64() != Some(rows.len() as u64) {
            break;
        }
        let batch = from_bits(&line["logprobs_bits"]).with_context(|| format!("{}: malformed batch", partial.display()))?;
        if rows.len() + batch.len() > examples.len() {
            break;
        }
        rows.extend(batch);
        kept.push(line);
    }
    let mut file = reopen_append_log(&partial, &kept)?;
    let pb = report.bar(examples.len() as u64, "examples");
    pb.set_position(rows.len() as u64);
    response_logprobs_from(b, model, examples, rows.len(), max_batch_tokens, |start, sums| {
        append_synced(&mut file, &partial, &[json!({"start": start, "logprobs_bits": to_bits(sums)})])?;
        rows.extend_from_slice(sums);
        pb.inc(sums.len() as u64);
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::PairProbs;
    use crate::train::trainer::Target;

    #[test]
    fn reference_logprobs_resume_after_the_last_whole_batch() {
        let b = CpuBackend::new(Some(1)).unwrap();
        let mut m = Llama::load(&b, &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama_gqa/model")).unwrap();
        let examples: Vec<TrainExample> = (0..5u32)
            .map(|i| TrainExample {
                prompt_ids: vec![1, 5 + i, 9],
                responses: vec![vec![20 + i, 30, 2], vec![40 + i, 50, 2]],
                target: Target::Pair(PairProbs::new(0.8, 0.7, 0.3).unwrap()),
            })
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let report = Reporter::new(report::LogMode::Quiet);
        // 12 tokens per example, at most 24 per batch: batches of 2, 2 and 1 examples.
        let full = reference_logprobs(&b, &mut m, &examples, 24, tmp.path(), &report).unwrap();
        let log = tmp.path().join("ref_logprobs.partial.jsonl");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().count(), 3);
        // Killed after the first batch, mid-way through appending the second.
        let first = text.lines().next().unwrap();
        std::fs::write(&log, format!("{first}\n{{\"start\": 2, \"logprobs_bi")).unwrap();
        let resumed = reference_logprobs(&b, &mut m, &examples, 24, tmp.path(), &report).unwrap();
        assert_eq!(resumed, full);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), text);
    }
}
