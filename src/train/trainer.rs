//! The training stage: π_{t+1} from π_t on preference examples, with the reference log-probs
//! computed once under π_t, micro-batches accumulated into optimizer steps of the global batch,
//! gradient-norm clipping, the lr schedule and the optimizer, in the Trainer's order:
//! accumulate → clip → step(lr_at(k)) → zero.
//!
//! Data order is a permutation drawn from the counter-based generator (stream `DataOrder`, keyed
//! by seed, iteration and epoch), so a resumed run visits the examples in the same order.

use super::loss::{pair_loss, single_loss, LossType, PairProbs};
use super::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use super::schedule::{Schedule, ScheduleKind, Warmup};
use crate::backend::Backend;
use crate::model::{Activations, Batch, Llama};
use crate::rng::{RngKey, Stream};
use anyhow::{ensure, Context, Result};
use serde::Serialize;

/// One prompt's trained responses and what their log-ratios regress onto.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainExample {
    pub prompt_ids: Vec<u32>,
    /// `[chosen, rejected]` for a pair; all K responses for `Target::Winrates`.
    pub responses: Vec<Vec<u32>>,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// `--train-on best-worst`: the pair loss of the chosen loss type.
    Pair(PairProbs),
    /// `--train-on all`: each response regressed on its own estimated win-rate (SPPO loss only).
    Winrates(Vec<f64>),
}

impl TrainExample {
    /// Token count of the packed sequences (prompt repeated per response).
    pub fn tokens(&self) -> usize {
        self.responses.iter().map(|r| self.prompt_ids.len() + r.len()).sum()
    }
}

/// Everything the trainer needs besides the model and data.
#[derive(Clone, Debug)]
pub struct TrainSettings {
    pub loss: LossType,
    pub beta: f64,
    pub learning_rate: f64,
    pub schedule: ScheduleKind,
    pub warmup_ratio: f64,
    pub optimizer: OptimizerConfig,
    pub max_grad_norm: f64,
    /// Examples per micro-batch.
    pub micro_batch: usize,
    pub accumulation: usize,
    pub epochs: u32,
    pub seed: u64,
    pub iteration: u32,
    pub recompute: bool,
    /// Spike guard: skip an update whose loss or grad norm exceeds this factor × its running
    /// average (after [`SPIKE_WARMUP_STEPS`] applied steps); 0 disables it.
    pub skip_spike_factor: f64,
}

/// Applied steps the spike guard waits for before its running averages are trusted.
pub const SPIKE_WARMUP_STEPS: usize = 5;
/// Weight of the newest applied step in the spike guard's running averages (an EMA).
const SPIKE_EMA_WEIGHT: f64 = 0.1;

/// A loss, gradient or updated parameter turned NaN/Inf: training stops before anything of that
/// step is handed to `after_step`, so no saved state or checkpoint sees it.
#[derive(Debug, thiserror::Error)]
#[error("step {step}: {what} is {value}{}; nothing of this step was saved", match tensor {
    Some(t) => format!(" (first parameter with a non-finite gradient: {t})"),
    None => String::new(),
})]
pub struct NonFinite {
    pub step: usize,
    /// "the loss", "the gradient norm", "parameter ... after the update".
    pub what: String,
    pub value: f64,
    /// The first tensor, in layout order, whose gradient holds a NaN/Inf.
    pub tensor: Option<String>,
}

impl TrainSettings {
    pub fn global_batch(&self) -> usize {
        self.micro_batch * self.accumulation
    }
    pub fn steps_per_epoch(&self, examples: usize) -> usize {
        examples.div_ceil(self.global_batch())
    }
}

/// One optimizer step's figures (a line of metrics.jsonl).
#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: u32,
    pub loss: f64,
    /// Before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub chosen_logratio: f64,
    pub rejected_logratio: f64,
    pub examples: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// This step's update was skipped by the spike guard.
    pub skipped: bool,
    /// Updates skipped so far in this training run (iteration).
    pub skipped_steps: usize,
}

/// Summed response log-probs of every response of every example under `model` (the reference
/// π_t, computed once per iteration), packed into micro-batches of at most `max_batch_tokens`.
pub fn response_logprobs<B: Backend>(b: &B, model: &mut Llama<B>, examples: &[TrainExample], max_batch_tokens: usize, mut progress: impl FnMut(usize)) -> Result<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<f64>> = Vec::with_capacity(examples.len());
    response_logprobs_from(b, model, examples, 0, max_batch_tokens, |_, sums| {
        progress(sums.len());
        out.extend_from_slice(sums);
        Ok(())
    })?;
    Ok(out)
}

/// [`response_logprobs`] from example `start` on, handing each packed batch's results to
/// `on_batch(first example, sums)`. Packing is greedy from `start`, so resuming at a batch
/// boundary packs (and computes) exactly as an uninterrupted pass.
pub fn response_logprobs_from<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    examples: &[TrainExample],
    start: usize,
    max_batch_tokens: usize,
    mut on_batch: impl FnMut(usize, &[Vec<f64>]) -> Result<()>,
) -> Result<()> {
    let mut i = start;
    while i < examples.len() {
        let mut j = i;
        let mut tokens = 0;
        while j < examples.len() && (j == i || tokens + examples[j].tokens() <= max_batch_tokens) {
            tokens += examples[j].tokens();
            j += 1;
        }
        let sums = forward_sums(b, model, &examples[i..j], false, None)?;
        on_batch(i, &sums)?;
        i = j;
    }
    Ok(())
}

/// ∂loss/∂(summed log-prob) of each response, per example, from the policy's summed log-probs.
type LossGradFn<'a> = dyn Fn(&[Vec<f64>]) -> Result<Vec<Vec<f64>>> + 'a;

/// Packs examples' sequences, runs forward (and backward with `dseq` when given), and returns
/// per-example per-response summed log-probs.
fn forward_sums<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    examples: &[TrainExample],
    recompute: bool,
    backward: Option<(&LossGradFn<'_>, &mut B::Buf)>,
) -> Result<Vec<Vec<f64>>> {
    let mut seqs: Vec<(Vec<u32>, usize)> = Vec::new();
    for (e, ex) in examples.iter().enumerate() {
        ensure!(!ex.prompt_ids.is_empty(), "example {e}: empty prompt");
        for r in &ex.responses {
            ensure!(!r.is_empty(), "example {e}: empty response");
            seqs.push(([ex.prompt_ids.as_slice(), r.as_slice()].concat(), ex.prompt_ids.len()));
        }
    }
    let longest = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0);
    model.ensure_positions(b, longest)?;
    let batch = Batch::from_sequences(seqs.iter().map(|(s, p)| (s.as_slice(), *p)))?;
    let mut acts = Activations::new(b, &model.cfg, batch.len(), recompute)?;
    model.forward(b, &batch, &mut acts)?;
    let flat = model.sequence_logprobs(b, &batch, &acts)?;
    let mut grouped = Vec::with_capacity(examples.len());
    let mut k = 0;
    for ex in examples {
        grouped.push(flat[k..k + ex.responses.len()].to_vec());
        k += ex.responses.len();
    }
    if let Some((grad_fn, grads)) = backward {
        let d = grad_fn(&grouped)?;
        let dseq: Vec<f32> = d.iter().flatten().map(|&x| x as f32).collect();
        model.backward(b, &batch, &mut acts, &dseq, grads)?;
    }
    Ok(grouped)
}

/// Loss of one example and ∂loss/∂(policy log-prob) of each of its responses.
fn example_loss(kind: LossType, beta: f64, target: &Target, policy: &[f64], reference: &[f64]) -> Result<(f64, Vec<f64>, f64, f64)> {
    match target {
        Target::Pair(p) => {
            ensure!(policy.len() == 2, "a pair example needs 2 responses, has {}", policy.len());
            let l = pair_loss(kind, beta, policy[0], policy[1], reference[0], reference[1], p);
            Ok((l.loss, vec![l.d_policy_chosen, l.d_policy_rejected], l.chosen_logratio, l.rejected_logratio))
        }
        Target::Winrates(w) => {
            ensure!(kind == LossType::Sppo, "training on all responses needs loss_type sppo (got {kind})");
            ensure!(w.len() == policy.len(), "{} win-rates for {} responses", w.len(), policy.len());
            let mut loss = 0.0;
            let mut grads = Vec::with_capacity(w.len());
            for i in 0..w.len() {
                let (l, g) = single_loss(beta, policy[i], reference[i], w[i]);
                loss += l;
                grads.push(g);
            }
            // Log-ratios of the best and worst response by win-rate, for the metrics.
            let best = (0..w.len()).max_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap_or(0);
            let worst = (0..w.len()).min_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap_or(0);
            Ok((loss, grads, policy[best] - reference[best], policy[worst] - reference[worst]))
        }
    }
}

/// The deterministic visiting order of one epoch (Fisher–Yates with counter-based draws).
pub fn epoch_order(n: usize, seed: u64, iteration: u32, epoch: u32) -> Result<Vec<usize>> {
    let key = RngKey::new(seed, iteration, Stream::DataOrder, epoch as u64, 0)?;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((key.uniform_f64(i as u64) * (i + 1) as f64) as usize).min(i);
        order.swap(i, j);
    }
    Ok(order)
}

/// The spike guard's running averages of applied steps (saved with the optimizer state).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Deserialize, Serialize)]
pub struct SpikeStats {
    pub loss_avg: f64,
    pub grad_norm_avg: f64,
    /// Applied steps averaged so far.
    pub count: usize,
}

impl SpikeStats {
    /// Whether a step with these figures is a spike under `factor` (0 = guard off).
    pub fn is_spike(&self, factor: f64, loss: f64, grad_norm: f64) -> bool {
        factor > 0.0 && self.count >= SPIKE_WARMUP_STEPS && (loss > factor * self.loss_avg || grad_norm > factor * self.grad_norm_avg)
    }

    fn add(&mut self, loss: f64, grad_norm: f64) {
        if self.count == 0 {
            (self.loss_avg, self.grad_norm_avg) = (loss, grad_norm);
        } else {
            self.loss_avg += SPIKE_EMA_WEIGHT * (loss - self.loss_avg);
            self.grad_norm_avg += SPIKE_EMA_WEIGHT * (grad_norm - self.grad_norm_avg);
        }
        self.count += 1;
    }
}

/// Where the trainer is: steps done (applied or skipped by the spike guard; the optimizer counts
/// only the applied ones, for AdamW's bias correction).
pub struct Trainer<B: Backend> {
    pub settings: TrainSettings,
    pub schedule: Schedule,
    pub optimizer: Optimizer<B>,
    pub grads: B::Buf,
    pub total_steps: usize,
    steps_done: usize,
    skipped: usize,
    spike: SpikeStats,
}

impl<B: Backend> Trainer<B> {
    pub fn new(b: &B, model: &Llama<B>, settings: TrainSettings, examples: usize) -> Result<Self> {
        ensure!(examples > 0, "no training examples");
        ensure!(settings.micro_batch > 0 && settings.accumulation > 0, "micro batch and accumulation must be at least 1");
        let total_steps = settings.steps_per_epoch(examples) * settings.epochs as usize;
        let schedule = Schedule::new(settings.schedule, settings.learning_rate, total_steps, Warmup::Ratio(settings.warmup_ratio))?;
        let optimizer = Optimizer::new(b, settings.optimizer, model.layout.total)?;
        let grads = model.alloc_grads(b)?;
        Ok(Trainer { settings, schedule, optimizer, grads, total_steps, steps_done: 0, skipped: 0, spike: SpikeStats::default() })
    }

    /// Steps already taken, applied or skipped (a resumed trainer starts here).
    pub fn step(&self) -> usize {
        self.steps_done
    }

    /// Updates skipped by the spike guard so far.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The first parameter tensor (layout order) whose values in `buf` hold a NaN/Inf.
    fn first_nonfinite_tensor(b: &B, model: &Llama<B>, buf: &B::Buf) -> Result<Option<String>> {
        for e in &model.layout.entries {
            if !b.grad_norm_sq(b.view(buf, e.range()))?.is_finite() {
                return Ok(Some(e.name.clone()));
            }
        }
        Ok(None)
    }

    /// Runs optimizer steps from the current one to the end, calling `after_step` with each
    /// step's metrics (it may save state; an error stops training).
    pub fn run(
        &mut self,
        b: &B,
        model: &mut Llama<B>,
        examples: &[TrainExample],
        reference: &[Vec<f64>],
        mut after_step: impl FnMut(&StepMetrics, &Self, &Llama<B>) -> Result<()>,
    ) -> Result<()> {
        ensure!(reference.len() == examples.len(), "{} reference log-prob rows for {} examples", reference.len(), examples.len());
        let s = self.settings.clone();
        let per_epoch = s.steps_per_epoch(examples.len());
        let start = std::time::Instant::now();
        while self.step() < self.total_steps {
            let step = self.step();
            let _r = crate::nvtx::range_fmt(format_args!("train step {}", step + 1));
            let epoch = (step / per_epoch) as u32;
            let order = epoch_order(examples.len(), s.seed, s.iteration, epoch)?;
            let lo = (step % per_epoch) * s.global_batch();
            let ids: Vec<usize> = order[lo..(lo + s.global_batch()).min(examples.len())].to_vec();
            let denominator = ids.len() as f64;
            b.fill(b.full_mut(&mut self.grads), 0.0)?;
            let (mut loss, mut chosen_lr, mut rejected_lr, mut tokens) = (0.0, 0.0, 0.0, 0usize);
            let step_start = std::time::Instant::now();
            for micro in ids.chunks(s.micro_batch) {
                let exs: Vec<TrainExample> = micro.iter().map(|&i| examples[i].clone()).collect();
                let refs: Vec<&Vec<f64>> = micro.iter().map(|&i| &reference[i]).collect();
                tokens += exs.iter().map(TrainExample::tokens).sum::<usize>();
                let stats = std::cell::RefCell::new((0.0f64, 0.0f64, 0.0f64));
                let grad_fn = |policy: &[Vec<f64>]| -> Result<Vec<Vec<f64>>> {
                    let mut out = Vec::with_capacity(policy.len());
                    let mut st = stats.borrow_mut();
                    for (k, p) in policy.iter().enumerate() {
                        let (l, g, c, r) = example_loss(s.loss, s.beta, &exs[k].target, p, refs[k])?;
                        st.0 += l / denominator;
                        st.1 += c / denominator;
                        st.2 += r / denominator;
                        out.push(g.iter().map(|x| x / denominator).collect());
                    }
                    Ok(out)
                };
                forward_sums(b, model, &exs, s.recompute, Some((&grad_fn, &mut self.grads)))
                    .with_context(|| format!("step {}: micro-batch forward/backward", step + 1))?;
                let st = stats.into_inner();
                loss += st.0;
                chosen_lr += st.1;
                rejected_lr += st.2;
            }
            if !loss.is_finite() {
                let tensor = Self::first_nonfinite_tensor(b, model, &self.grads)?;
                return Err(NonFinite { step: step + 1, what: "the loss (a NaN/Inf log-prob or target)".into(), value: loss, tensor }.into());
            }
            // The norm before clipping, accumulated in f64 (as clip_grad_norm).
            let grad_norm = b.grad_norm_sq(b.full(&self.grads)).with_context(|| format!("step {}: gradient norm", step + 1))?.sqrt();
            if !grad_norm.is_finite() {
                let tensor = Self::first_nonfinite_tensor(b, model, &self.grads)?;
                return Err(NonFinite { step: step + 1, what: "the gradient norm".into(), value: grad_norm, tensor }.into());
            }
            let lr = self.schedule.lr_at(step);
            let skipped = self.spike.is_spike(s.skip_spike_factor, loss, grad_norm);
            if skipped {
                self.skipped += 1;
            } else {
                clip_grad_norm(b, &mut self.grads, s.max_grad_norm).with_context(|| format!("step {}", step + 1))?;
                self.optimizer.step(b, &mut model.params, &self.grads, lr)?;
                // An update that overflows (a learning rate far too high) must not reach a saved state.
                let params_sq = b.grad_norm_sq(b.full(&model.params))?;
                if !params_sq.is_finite() {
                    let tensor = Self::first_nonfinite_tensor(b, model, &model.params)?.unwrap_or_else(|| "?".into());
                    return Err(NonFinite { step: step + 1, what: format!("parameter {tensor} after the update"), value: params_sq, tensor: None }.into());
                }
                self.spike.add(loss, grad_norm);
            }
            self.steps_done = step + 1;
            let secs = step_start.elapsed().as_secs_f64();
            let m = StepMetrics {
                step: step + 1,
                epoch,
                loss,
                grad_norm,
                lr,
                chosen_logratio: chosen_lr,
                rejected_logratio: rejected_lr,
                examples: ids.len(),
                tokens,
                tokens_per_s: tokens as f64 / secs.max(1e-9),
                elapsed_s: start.elapsed().as_secs_f64(),
                skipped,
                skipped_steps: self.skipped,
            };
            after_step(&m, self, model)?;
        }
        Ok(())
    }
}

impl<B: Backend> Trainer<B> {
    /// Saves what resuming needs — parameters, optimizer state and step — atomically into `dir`
    /// (`state.safetensors` in f32 + `state.json`).
    pub fn save_state(&self, b: &B, model: &Llama<B>, dir: &std::path::Path) -> Result<()> {
        let n = model.layout.total;
        let mut buffers: Vec<(String, &B::Buf)> = vec![("params".into(), &model.params)];
        for (name, buf) in self.optimizer.state_buffers() {
            buffers.push((format!("optimizer.{name}"), buf));
        }
        let meta = serde_json::json!({
            "format_version": 1,
            "step": self.step(),
            "total_steps": self.total_steps,
            "optimizer_steps": self.optimizer.steps(),
            "skipped": self.skipped,
            "spike": self.spike,
        });
        crate::io::write_dir_atomic(dir, |tmp| {
            // Streamed one buffer at a time: saving costs one extra copy of the parameters, not
            // two of everything.
            crate::io::write_atomic_with(&tmp.join("state.safetensors"), |f| {
                use std::io::Write;
                let mut header = serde_json::Map::new();
                header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
                for (k, (name, _)) in buffers.iter().enumerate() {
                    let (lo, hi) = (4 * n * k, 4 * n * (k + 1));
                    header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": [n], "data_offsets": [lo, hi]}));
                }
                let mut text = serde_json::Value::Object(header).to_string();
                while !text.len().is_multiple_of(8) {
                    text.push(' ');
                }
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                w.write_all(&(text.len() as u64).to_le_bytes())?;
                w.write_all(text.as_bytes())?;
                for (name, buf) in &buffers {
                    let values = b.download(buf).with_context(|| format!("downloading {name}"))?;
                    for chunk in values.chunks(1 << 16) {
                        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
                        w.write_all(&bytes)?;
                    }
                }
                w.flush()?;
                Ok(())
            })?;
            crate::io::write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(&meta)?.as_bytes())
        })
    }

    /// Restores a state saved by [`save_state`](Self::save_state) for the same model and data.
    pub fn load_state(&mut self, b: &B, model: &mut Llama<B>, dir: &std::path::Path) -> Result<()> {
        let meta_path = dir.join("state.json");
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).with_context(|| format!("{}: cannot read", meta_path.display()))?)
            .with_context(|| format!("{}: malformed JSON", meta_path.display()))?;
        let step = meta["step"].as_u64().with_context(|| format!("{}: no step", meta_path.display()))?;
        ensure!(
            meta["total_steps"].as_u64() == Some(self.total_steps as u64),
            "{}: saved for {} total steps, this run has {} (different data or batch settings)",
            meta_path.display(),
            meta["total_steps"],
            self.total_steps
        );
        let tensors = crate::model::weights::read_all_f32(&dir.join("state.safetensors"))?;
        let get = |name: &str, len: usize| -> Result<&Vec<f32>> {
            let (_, v) = tensors.get(name).with_context(|| format!("{}: no tensor {name}", dir.display()))?;
            ensure!(v.len() == len, "{}: {name} has {} values, expected {len}", dir.display(), v.len());
            Ok(v)
        };
        let n = model.layout.total;
        b.write(&mut model.params, 0, get("params", n)?)?;
        let (steps, bufs) = self.optimizer.state_mut();
        for (name, buf) in bufs {
            b.write(buf, 0, get(&format!("optimizer.{name}"), n)?)?;
        }
        // States written before the spike guard count every step as applied.
        *steps = meta["optimizer_steps"].as_u64().unwrap_or(step);
        self.steps_done = step as usize;
        self.skipped = meta["skipped"].as_u64().unwrap_or(0) as usize;
        self.spike = serde_json::from_value(meta["spike"].clone()).unwrap_or_default();
        Ok(())
    }
}

impl TrainSettings {
    /// The training part of a resolved run configuration.
    pub fn from_run_config(c: &crate::run::config::RunConfig) -> Result<Self> {
        use super::optim::{AdamWConfig, OptimizerKind, RmspropConfig};
        let optimizer = match c.optim.parse::<OptimizerKind>()? {
            OptimizerKind::AdamW => OptimizerConfig::AdamW(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: c.weight_decay }),
            OptimizerKind::RmsProp => OptimizerConfig::RmsProp(RmspropConfig { alpha: 0.99, eps: 1e-8, weight_decay: c.weight_decay }),
        };
        Ok(TrainSettings {
            loss: c.loss_type.parse()?,
            beta: c.beta,
            learning_rate: c.learning_rate,
            schedule: c.lr_scheduler_type.parse()?,
            warmup_ratio: c.warmup_ratio,
            optimizer,
            max_grad_norm: c.max_grad_norm,
            micro_batch: c.per_device_train_batch_size,
            accumulation: c.gradient_accumulation_steps,
            epochs: c.num_train_epochs,
            seed: c.seed,
            iteration: 0,
            recompute: c.gradient_checkpointing,
            skip_spike_factor: c.skip_spike_factor,
        })
    }
}
