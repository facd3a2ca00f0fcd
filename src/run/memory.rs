//! Memory planning on the CPU backend: before a run loads anything, estimate each stage's peak
//! and compare the largest with the memory available, so that a run that cannot fit stops at once
//! with the figure needed, the figure available and the setting to lower, not hours later when
//! the kernel's OOM killer ends it without a word.
//!
//! Counted (f32 everywhere on the CPU backend): parameters; for training their gradients, the
//! optimizer state (RMSprop 1×, AdamW 2× the parameters), the activations forward keeps for
//! backward over one micro-batch at `max_length` (every response of an example is one sequence),
//! backward's scratch (or, if larger, the one-buffer copy made when the optimizer state is saved); for sampling the KV
//! cache of `generation_batch_size` sequences of `max_prompt_length + max_new_tokens` tokens and
//! the prefill's working set; for the reference log-probs the activations of one packed batch.
//! The oracle's own memory (a reward or judge model) is not counted.
//!
//! Available: `MemAvailable` of /proc/meminfo, lowered to the cgroup's limit minus its usage when
//! there is one (containers). `SPPO_MEMORY_AVAILABLE=BYTES` (suffixes K, M, G) overrides it: for
//! tests, and for machines whose figures mislead.

use crate::config::ModelConfig;
use crate::model::weights::ParamLayout;
use anyhow::Result;

/// Tokens the generation prefill and the reference log-probs pack per forward (run/mod.rs).
pub const PACKED_TOKENS: usize = 4096;

/// What the memory check needs to know of a run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub micro_batch: usize,
    /// Sequences per example: 2 for best-worst pairs, K for `--train-on all`.
    pub responses_per_example: usize,
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub max_new_tokens: usize,
    pub generation_batch_size: usize,
    pub gradient_checkpointing: bool,
    /// Optimizer state buffers the size of the parameters (RMSprop 1, AdamW 2).
    pub optimizer_buffers: usize,
}

/// Peak bytes of each stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub parameters: u64,
    pub sampling: u64,
    pub reference: u64,
    pub training: u64,
}

impl Estimate {
    pub fn peak(&self) -> u64 {
        self.sampling.max(self.reference).max(self.training)
    }
}

const F32: u64 = 4;

/// Floats per token of one layer's kept activations (llama.rs `LayerActs`).
fn layer_floats_per_token(c: &ModelConfig) -> u64 {
    (4 * c.hidden_size + 2 * c.q_dim() + 2 * c.kv_dim() + c.num_heads + 2 + 3 * c.intermediate_size) as u64
}

/// Bytes of the activations forward keeps for `n` tokens (llama.rs `Activations::new`).
fn activation_bytes(c: &ModelConfig, n: u64, recompute: bool) -> u64 {
    let per_layer = if recompute { c.hidden_size as u64 } else { layer_floats_per_token(c) };
    let scratch = if recompute { layer_floats_per_token(c) } else { 0 };
    let final_norm = 2 * c.hidden_size as u64 + 3;
    F32 * n * (per_layer * c.num_layers as u64 + scratch + final_norm)
}

/// Bytes of backward's per-layer gradient scratch for `n` tokens (llama.rs `GradScratch`).
fn backward_scratch_bytes(c: &ModelConfig, n: u64) -> u64 {
    F32 * n * (2 * c.hidden_size + 2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.intermediate_size) as u64
}

pub fn estimate(c: &ModelConfig, plan: &Plan) -> Estimate {
    let p = F32 * ParamLayout::llama(c).total as u64;
    let ctx = c.max_position_embeddings;
    // Training: every response of every example in the micro-batch, each up to max_length.
    let train_tokens = (plan.micro_batch * plan.responses_per_example * plan.max_length.min(ctx)) as u64;
    let optimizer = p * plan.optimizer_buffers as u64;
    let working = activation_bytes(c, train_tokens, plan.gradient_checkpointing) + backward_scratch_bytes(c, train_tokens);
    // Saving the state downloads one parameter-sized buffer at a time (Trainer::save_state).
    let save_copy = p;
    let training = p + p + optimizer + working.max(save_copy);
    // Sampling: the KV cache, the prefill's one-layer working set, one logits row per sequence.
    let region = (plan.max_prompt_length + plan.max_new_tokens).min(ctx) as u64;
    let kv = F32 * 2 * c.num_layers as u64 * c.kv_dim() as u64 * region * plan.generation_batch_size as u64;
    let prefill = F32 * PACKED_TOKENS as u64 * (layer_floats_per_token(c) + c.hidden_size as u64);
    let logits = F32 * (plan.generation_batch_size * c.vocab_size) as u64;
    let sampling = p + kv + prefill + logits;
    // Reference log-probs: one packed batch (at least one whole example) through forward.
    let ref_tokens = PACKED_TOKENS.max(plan.responses_per_example * plan.max_length.min(ctx)) as u64;
    // Forward only (logprobs.rs keeps layer inputs, as recomputation does).
    let reference = p + activation_bytes(c, ref_tokens, true);
    Estimate { parameters: p, sampling, reference, training }
}

/// Parses `123`, `512M`, `2G`, `1.5GiB`-style sizes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (value.is_finite() && value >= 0.0).then_some((value * scale) as u64)
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Bytes available to this process, and where the figure came from.
pub fn available() -> Option<(u64, String)> {
    if let Ok(v) = std::env::var("SPPO_MEMORY_AVAILABLE") {
        return parse_bytes(&v).map(|b| (b, "SPPO_MEMORY_AVAILABLE".to_string()));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let mut best = (kb * 1024, "MemAvailable in /proc/meminfo".to_string());
    // cgroup v2, then v1: the limit minus what the group already uses.
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ];
    for (limit, usage) in cgroup {
        if let (Some(l), Some(u)) = (read_u64(limit), read_u64(usage)) {
            let free = l.saturating_sub(u);
            if free < best.0 {
                best = (free, format!("the cgroup limit ({limit})"));
            }
            break;
        }
    }
    Some(best)
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    }
}

/// Not enough memory for a stage: what it needs, what there is, what to lower.
#[derive(Debug, thiserror::Error)]
#[error("not enough memory: {stage} needs about {} (parameters {}), {} is available ({source_of_figure}); {advice}", human(*.needed), human(*.parameters), human(*.available))]
pub struct NotEnoughMemory {
    pub stage: &'static str,
    pub needed: u64,
    pub parameters: u64,
    pub available: u64,
    pub source_of_figure: String,
    pub advice: String,
}

/// Refuses a plan whose largest stage does not fit in `available` bytes.
pub fn check(c: &ModelConfig, plan: &Plan, available: u64, source_of_figure: &str) -> Result<Estimate> {
    let e = estimate(c, plan);
    if e.peak() <= available {
        return Ok(e);
    }
    let fixed_training = 2 * e.parameters + e.parameters * plan.optimizer_buffers as u64;
    let (stage, needed, advice) = if e.training >= e.sampling && e.training >= e.reference {
        let advice = if fixed_training >= available {
            "the parameters, gradients and optimizer state alone do not fit: use a smaller model or a machine with more memory".to_string()
        } else {
            let mut s = format!(
                "lower `per_device_train_batch_size` (now {}, raise `gradient_accumulation_steps` to keep the global batch) or `max_length` (now {})",
                plan.micro_batch, plan.max_length
            );
            if !plan.gradient_checkpointing {
                s.push_str(", or set `gradient_checkpointing = true`");
            }
            s
        };
        ("training", e.training, advice)
    } else if e.sampling >= e.reference {
        let advice = format!(
            "lower `generation_batch_size` (now {}) or `max_new_tokens` (now {}) / `max_prompt_length` (now {})",
            plan.generation_batch_size, plan.max_new_tokens, plan.max_prompt_length
        );
        ("sampling", e.sampling, advice)
    } else {
        ("the reference log-probs", e.reference, format!("lower `max_length` (now {})", plan.max_length))
    };
    Err(NotEnoughMemory { stage, needed, parameters: e.parameters, available, source_of_figure: source_of_figure.to_string(), advice }.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("2K"), Some(2048));
        assert_eq!(parse_bytes("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_bytes("64 MB"), Some(64 << 20));
        assert_eq!(parse_bytes("lots"), None);
    }
}
