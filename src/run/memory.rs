//! Memory planning: before a run loads anything, estimate each stage's peak and compare the
//! largest with the memory available, so that a run that cannot fit stops at once with the figure
//! needed, the figure available and the setting to lower, not hours later when the kernel's OOM
//! killer (or a CUDA out-of-memory error) ends it.
//!
//! Counted: parameters; for training their gradients, the optimizer state (RMSprop 1×, AdamW 2×
//! the parameters), the activations forward keeps for backward over one micro-batch at
//! `max_length` (every response of an example is one sequence), backward's scratch (on the CPU,
//! or if larger, the one-buffer copy made when the optimizer state is saved); for sampling the KV
//! cache of `generation_batch_size` sequences of `max_prompt_length + max_new_tokens` tokens and
//! the prefill's working set; for the reference log-probs the activations of one packed batch.
//! The oracle's own memory (a reward or judge model) is not counted.
//!
//! Bytes per element follow the backend's [`Precision`] ([`Storage`]): f32 everywhere on the CPU;
//! on a bf16 GPU backend parameters cost 2 + 4 bytes (bf16 copy + f32 master weights), activations,
//! their gradients and the KV cache 2, gradients, optimizer state and statistics 4.
//!
//! On the host (CPU backend) the figure available is `MemAvailable` of /proc/meminfo, lowered to
//! the cgroup's limit minus its usage when there is one (containers); `SPPO_MEMORY_AVAILABLE=BYTES`
//! (suffixes K, M, G) overrides it. On a GPU ([`check_gpu`]) it is the device's free memory
//! (cuMemGetInfo, after the backend's context is created), or `SPPO_GPU_MEMORY_AVAILABLE`; the GPU
//! estimate adds the backend's grow-only pools, which outlive the stage that grew them (the
//! log-prob chunk and attention scratch, and in bf16 the f32 staging copies of the ops without a
//! bf16 kernel, see `backend::cuda::backend`), and a fixed reserve for cuBLAS's workspace and the
//! allocator's granularity ([`GPU_RESERVE`]).

use crate::backend::{BufRole, Precision};
use crate::config::ModelConfig;
use crate::model::weights::ParamLayout;
use anyhow::Result;

/// Tokens the generation prefill and the reference log-probs pack per forward (run/mod.rs).
pub const PACKED_TOKENS: usize = 4096;

/// Rows of logits the CUDA log-prob kernels hold at once (backend::cuda::backend).
pub const LOGPROB_CHUNK_ROWS: usize = 64;

/// Bytes kept free on a GPU beyond the estimate: cuBLAS's workspace, the allocator's granularity.
pub const GPU_RESERVE: u64 = 512 << 20;

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
    /// Whether the run samples (`sppo run`); `sppo train` does not.
    pub generation: bool,
}

/// Bytes per element of each kind of buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Storage {
    pub precision: Precision,
    /// Parameters, master weights included.
    pub param: u64,
    /// Activations, activation gradients, KV cache.
    pub compute: u64,
    /// Gradients, optimizer state, statistics, log-probs, logits.
    pub exact: u64,
}

impl Storage {
    pub fn of(precision: Precision) -> Self {
        Storage {
            precision,
            param: precision.bytes(BufRole::Param),
            compute: precision.bytes(BufRole::Compute),
            exact: precision.bytes(BufRole::Exact),
        }
    }
}

/// Peak bytes of each stage; `overhead` (GPU: pools and reserve) comes on top of every stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub parameters: u64,
    pub sampling: u64,
    pub reference: u64,
    pub training: u64,
    pub overhead: u64,
}

impl Estimate {
    pub fn peak(&self) -> u64 {
        self.sampling.max(self.reference).max(self.training) + self.overhead
    }
}

/// Elements per token of one layer's kept activations (llama.rs `LayerActs`): (compute, exact).
fn layer_per_token(c: &ModelConfig) -> (u64, u64) {
    let compute = 4 * c.hidden_size + 2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.intermediate_size;
    let exact = c.num_heads + 2; // attention lse, two rstd
    (compute as u64, exact as u64)
}

fn layer_bytes_per_token(c: &ModelConfig, s: &Storage) -> u64 {
    let (compute, exact) = layer_per_token(c);
    compute * s.compute + exact * s.exact
}

/// Bytes of the activations forward keeps for `n` tokens (llama.rs `Activations::new`).
fn activation_bytes(c: &ModelConfig, n: u64, recompute: bool, s: &Storage) -> u64 {
    let per_layer = if recompute { c.hidden_size as u64 * s.compute } else { layer_bytes_per_token(c, s) };
    let scratch = if recompute { layer_bytes_per_token(c, s) } else { 0 };
    let final_norm = 2 * c.hidden_size as u64 * s.compute + 3 * s.exact;
    n * (per_layer * c.num_layers as u64 + scratch + final_norm)
}

/// Bytes of backward's per-layer gradient scratch for `n` tokens (llama.rs `GradScratch`, the
/// upload of dlogp, recomputation's sink).
fn backward_scratch_bytes(c: &ModelConfig, n: u64, recompute: bool, s: &Storage) -> u64 {
    let grads = (2 * c.hidden_size + 2 * c.q_dim() + 2 * c.kv_dim() + 3 * c.intermediate_size) as u64 * s.compute;
    let sink = if recompute { c.hidden_size as u64 * s.compute } else { 0 };
    n * (grads + s.exact + sink)
}

fn train_tokens(c: &ModelConfig, plan: &Plan) -> u64 {
    (plan.micro_batch * plan.responses_per_example * plan.max_length.min(c.max_position_embeddings)) as u64
}

/// The stages' peaks on the CPU backend (f32, host copies counted).
pub fn estimate(c: &ModelConfig, plan: &Plan) -> Estimate {
    estimate_with(c, plan, &Storage::of(Precision::F32), false)
}

/// The stages' peaks with `storage`; `gpu`: device memory only (the state-saving copy lives on
/// the host) plus the GPU backend's pools and reserve.
pub fn estimate_with(c: &ModelConfig, plan: &Plan, s: &Storage, gpu: bool) -> Estimate {
    let elems = ParamLayout::llama(c).total as u64;
    let p = s.param * elems;
    let exact_p = s.exact * elems;
    let ctx = c.max_position_embeddings;
    // Training: every response of every example in the micro-batch, each up to max_length.
    let train_n = train_tokens(c, plan);
    let optimizer = exact_p * plan.optimizer_buffers as u64;
    let working = activation_bytes(c, train_n, plan.gradient_checkpointing, s) + backward_scratch_bytes(c, train_n, plan.gradient_checkpointing, s);
    // Saving the state downloads one parameter-sized buffer at a time (Trainer::save_state): host
    // memory on the CPU backend.
    let save_copy = if gpu { 0 } else { exact_p };
    let training = p + exact_p + optimizer + working.max(save_copy);
    // Sampling: the KV cache, the prefill's one-layer working set, one logits row per sequence.
    let sampling = if plan.generation {
        let region = (plan.max_prompt_length + plan.max_new_tokens).min(ctx) as u64;
        let kv = s.compute * 2 * c.num_layers as u64 * c.kv_dim() as u64 * region * plan.generation_batch_size as u64;
        let prefill = PACKED_TOKENS as u64 * (layer_bytes_per_token(c, s) + c.hidden_size as u64 * s.compute);
        let logits = s.exact * (plan.generation_batch_size * c.vocab_size) as u64;
        p + kv + prefill + logits
    } else {
        0
    };
    // Reference log-probs: one packed batch (at least one whole example) through forward.
    let ref_tokens = PACKED_TOKENS.max(plan.responses_per_example * plan.max_length.min(ctx)) as u64;
    // Forward only (logprobs.rs keeps layer inputs, as recomputation does).
    let reference = p + activation_bytes(c, ref_tokens, true, s);
    let overhead = if gpu { gpu_pool_bytes(c, plan, s) + GPU_RESERVE } else { 0 };
    Estimate { parameters: p, sampling, reference, training, overhead }
}

/// The CUDA backend's grow-only pools at their largest: the kernel scratch (the log-prob chunk,
/// or attention backward's delta, whichever is larger: one buffer) and, in bf16, the staging
/// slots of RMSNorm backward (dout, inp and dinp of (N, C) in f32, the widest staged op) at the
/// training micro-batch.
pub fn gpu_pool_bytes(c: &ModelConfig, plan: &Plan, s: &Storage) -> u64 {
    let n = train_tokens(c, plan).max(PACKED_TOKENS as u64);
    let chunk = (LOGPROB_CHUNK_ROWS * c.vocab_size) as u64;
    let delta = n * c.num_heads as u64;
    let scratch = 4 * chunk.max(delta);
    let staging = match s.precision {
        Precision::F32 => 0,
        Precision::Bf16 => 4 * (3 * n * c.hidden_size as u64 + c.hidden_size as u64),
    };
    scratch + staging
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

/// Refuses a plan whose largest stage does not fit in `available` bytes of host memory (CPU
/// backend).
pub fn check(c: &ModelConfig, plan: &Plan, available: u64, source_of_figure: &str) -> Result<Estimate> {
    let e = estimate(c, plan);
    refuse(plan, e, &Storage::of(Precision::F32), false, available, source_of_figure)
}

/// Refuses a plan whose largest stage, stored as `storage` on a GPU, does not fit in the
/// `available` bytes of device memory (`source_of_figure` names the device and how it was read).
pub fn check_gpu(c: &ModelConfig, plan: &Plan, storage: &Storage, available: u64, source_of_figure: &str) -> Result<Estimate> {
    let e = estimate_with(c, plan, storage, true);
    refuse(plan, e, storage, true, available, source_of_figure)
}

fn refuse(plan: &Plan, e: Estimate, s: &Storage, gpu: bool, available: u64, source_of_figure: &str) -> Result<Estimate> {
    if e.peak() <= available {
        return Ok(e);
    }
    // On a GPU computing in f32, bf16 storage is the first setting to try.
    let bf16_hint = if gpu && s.precision == Precision::F32 { ", or use `--precision bf16`" } else { "" };
    let exact_p = e.parameters / s.param * s.exact;
    let fixed_training = e.parameters + exact_p + exact_p * plan.optimizer_buffers as u64 + e.overhead;
    let (stage, needed, advice) = if e.training >= e.sampling && e.training >= e.reference {
        let advice = if fixed_training >= available {
            let machine = if gpu { "a GPU with more memory" } else { "a machine with more memory" };
            format!("the parameters, gradients and optimizer state alone do not fit: use a smaller model or {machine}{bf16_hint}")
        } else {
            let mut s = format!(
                "lower `per_device_train_batch_size` (now {}, raise `gradient_accumulation_steps` to keep the global batch) or `max_length` (now {})",
                plan.micro_batch, plan.max_length
            );
            if !plan.gradient_checkpointing {
                s.push_str(", or set `gradient_checkpointing = true`");
            }
            s.push_str(bf16_hint);
            s
        };
        ("training", e.training, advice)
    } else if e.sampling >= e.reference {
        let advice = format!(
            "lower `generation_batch_size` (now {}) or `max_new_tokens` (now {}) / `max_prompt_length` (now {}){bf16_hint}",
            plan.generation_batch_size, plan.max_new_tokens, plan.max_prompt_length
        );
        ("sampling", e.sampling, advice)
    } else {
        ("the reference log-probs", e.reference, format!("lower `max_length` (now {}){bf16_hint}", plan.max_length))
    };
    Err(NotEnoughMemory {
        stage,
        needed: needed + e.overhead,
        parameters: e.parameters,
        available,
        source_of_figure: source_of_figure.to_string(),
        advice,
    }
    .into())
}

/// What `sppo generate` and `sppo logprobs` hold besides the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// `batch` sequences at once in the KV cache, each with room for the longest prompt plus
    /// `new_tokens`; the prefill packs up to [`PACKED_TOKENS`] of the `prompt_tokens` (all
    /// requests), or one whole prompt; `decode_copy`: the CPU's bf16 copy of the weights
    /// (`--decode-weights`).
    Generation { batch: usize, longest_prompt: usize, prompt_tokens: usize, new_tokens: usize, decode_copy: bool },
    /// One packed forward of `tokens` (`--batch-tokens`; at least one whole example).
    Scoring { tokens: usize },
}

/// Bytes of `job` on the model `c` with `s`: (parameters, total).
pub fn job_bytes(c: &ModelConfig, job: Job, s: &Storage) -> (u64, u64) {
    let elems = ParamLayout::llama(c).total as u64;
    let p = s.param * elems;
    let working = match job {
        Job::Generation { batch, longest_prompt, prompt_tokens, new_tokens, decode_copy } => {
            // As generate.rs sizes them: a cache region per slot, the prefill's packed tokens.
            let region = longest_prompt.saturating_add(new_tokens).min(c.max_position_embeddings) as u64;
            let kv = s.compute * 2 * c.num_layers as u64 * c.kv_dim() as u64 * region * batch as u64;
            let packed = prompt_tokens.min(PACKED_TOKENS.max(longest_prompt)) as u64;
            let prefill = packed * (layer_bytes_per_token(c, s) + c.hidden_size as u64 * s.compute);
            let logits = s.exact * (batch * c.vocab_size) as u64;
            let copy = if decode_copy { 2 * elems } else { 0 };
            kv + prefill + logits + copy
        }
        Job::Scoring { tokens } => activation_bytes(c, tokens as u64, true, s),
    };
    (p, p + working)
}

/// Refuses `job` when it cannot fit in `available` bytes (host memory, or a GPU's when `gpu`),
/// naming the figures and the flag to lower.
pub fn check_job(c: &ModelConfig, job: Job, s: &Storage, gpu: bool, available: u64, source_of_figure: &str) -> Result<()> {
    let (parameters, needed) = job_bytes(c, job, s);
    // On a GPU: cuBLAS's reserve and the log-prob kernels' logits chunk (a grow-only pool).
    let needed = needed + if gpu { GPU_RESERVE + 4 * (LOGPROB_CHUNK_ROWS * c.vocab_size) as u64 } else { 0 };
    if needed <= available {
        return Ok(());
    }
    let bf16_hint = if gpu && s.precision == Precision::F32 { ", or use `--precision bf16`" } else { "" };
    let machine = if gpu { "a GPU with more memory" } else { "a machine with more memory" };
    let stage = match job {
        Job::Generation { .. } => "generation",
        Job::Scoring { .. } => "scoring",
    };
    let advice = match job {
        _ if parameters >= available => format!("the parameters alone do not fit: use a smaller model or {machine}{bf16_hint}"),
        Job::Generation { batch, new_tokens, decode_copy, .. } => {
            let copy = if decode_copy { ", or `--decode-weights f32` (no bf16 copy of the weights)" } else { "" };
            format!("lower `--batch-size` (now {batch}) or `--max-new-tokens` (now {new_tokens}){copy}{bf16_hint}")
        }
        Job::Scoring { tokens } => format!("lower `--batch-tokens` (now {tokens}){bf16_hint}"),
    };
    Err(NotEnoughMemory { stage, needed, parameters, available, source_of_figure: source_of_figure.to_string(), advice }.into())
}

/// The GPU figure override for tests and misleading drivers: `SPPO_GPU_MEMORY_AVAILABLE=BYTES`.
pub fn gpu_available_override() -> Option<(u64, String)> {
    let v = std::env::var("SPPO_GPU_MEMORY_AVAILABLE").ok()?;
    parse_bytes(&v).map(|b| (b, "SPPO_GPU_MEMORY_AVAILABLE".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn smollm2_135m() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "rms_norm_eps": 1e-5, "rope_theta": 100000, "max_position_embeddings": 8192, "tie_word_embeddings": true,
                "torch_dtype": "bfloat16"}"#,
        )
        .unwrap()
    }

    fn llama_70b() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
                "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                "rms_norm_eps": 1e-5, "rope_theta": 500000, "max_position_embeddings": 131072, "tie_word_embeddings": false,
                "torch_dtype": "bfloat16"}"#,
        )
        .unwrap()
    }

    fn plan() -> Plan {
        Plan {
            micro_batch: 2,
            responses_per_example: 2,
            max_length: 1024,
            max_prompt_length: 512,
            max_new_tokens: 512,
            generation_batch_size: 16,
            gradient_checkpointing: false,
            optimizer_buffers: 2,
            generation: true,
        }
    }

    #[test]
    fn storage_bytes_follow_the_precision() {
        let c = smollm2_135m();
        let elems = ParamLayout::llama(&c).total as u64;
        assert!((130_000_000..140_000_000).contains(&elems), "SmolLM2-135M has {elems} parameters");
        let f32 = estimate_with(&c, &plan(), &Storage::of(Precision::F32), true);
        let bf16 = estimate_with(&c, &plan(), &Storage::of(Precision::Bf16), true);
        assert_eq!(f32.parameters, 4 * elems);
        assert_eq!(bf16.parameters, 6 * elems, "bf16 copy + f32 master weights");
        // Training: bf16 params + master (6) + f32 grads (4) + AdamW (8) plus half-size activations.
        assert!(bf16.training < f32.training, "{bf16:?} vs {f32:?}");
        assert!(bf16.training > 18 * elems, "fixed training state is 18 bytes per parameter in bf16");
        assert!(bf16.sampling < f32.sampling, "the bf16 KV cache is half the f32 one");
        // The GPU estimate carries the pools and the reserve; the CPU's has none.
        assert!(bf16.overhead >= GPU_RESERVE && estimate(&c, &plan()).overhead == 0);
        assert!(gpu_pool_bytes(&c, &plan(), &Storage::of(Precision::Bf16)) > gpu_pool_bytes(&c, &plan(), &Storage::of(Precision::F32)));
        // `sppo train` does not sample.
        let no_gen = Plan { generation: false, ..plan() };
        assert_eq!(estimate_with(&c, &no_gen, &Storage::of(Precision::Bf16), true).sampling, 0);
        // Checkpointing keeps less.
        let ckpt = Plan { gradient_checkpointing: true, ..plan() };
        assert!(estimate_with(&c, &ckpt, &Storage::of(Precision::Bf16), true).training < bf16.training);
    }

    #[test]
    fn smollm2_fits_an_80_gb_gpu_and_70b_does_not() {
        let bf16 = Storage::of(Precision::Bf16);
        let e = check_gpu(&smollm2_135m(), &plan(), &bf16, 80 * GIB, "fake 80 GiB GPU").unwrap();
        assert!(e.peak() < 10 * GIB, "SmolLM2-135M needs {}", human(e.peak()));

        let err = check_gpu(&llama_70b(), &plan(), &bf16, 80 * GIB, "fake 80 GiB GPU").unwrap_err();
        let nem = err.downcast_ref::<NotEnoughMemory>().expect("a NotEnoughMemory error");
        assert_eq!(nem.stage, "training");
        assert!(nem.needed > 1000 * GIB && nem.available == 80 * GIB, "{nem:?}");
        let text = err.to_string();
        assert!(text.contains("fake 80 GiB GPU") && text.contains("80.00 GiB"), "{text}");
        assert!(text.contains("alone do not fit") && text.contains("GPU with more memory"), "{text}");
        assert!(!text.contains("--precision bf16"), "already bf16: {text}");
        // In f32 the advice names the precision setting.
        let text = check_gpu(&llama_70b(), &plan(), &Storage::of(Precision::F32), 80 * GIB, "fake").unwrap_err().to_string();
        assert!(text.contains("--precision bf16"), "{text}");
    }

    #[test]
    fn a_working_set_too_large_names_the_batch_settings() {
        let c = smollm2_135m();
        let big = Plan { micro_batch: 64, max_length: 4096, ..plan() };
        let err = check_gpu(&c, &big, &Storage::of(Precision::Bf16), 24 * GIB, "fake 24 GiB GPU").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("not enough memory: training needs about"), "{text}");
        assert!(text.contains("`per_device_train_batch_size` (now 64") && text.contains("`max_length` (now 4096)"), "{text}");
        assert!(text.contains("gradient_checkpointing = true"), "{text}");
        // Sampling-bound: a huge generation batch names the generation settings.
        let gen = Plan { generation_batch_size: 4096, max_new_tokens: 4096, ..plan() };
        let text = check_gpu(&c, &gen, &Storage::of(Precision::Bf16), 24 * GIB, "fake").unwrap_err().to_string();
        assert!(text.contains("sampling needs") && text.contains("`generation_batch_size` (now 4096)"), "{text}");
        // The figure needed includes the GPU overhead, so a capacity just above the stage peak
        // without it is refused.
        let e = estimate_with(&c, &plan(), &Storage::of(Precision::Bf16), true);
        let stage_only = e.peak() - e.overhead;
        assert!(check_gpu(&c, &plan(), &Storage::of(Precision::Bf16), stage_only, "fake").is_err());
        assert!(check_gpu(&c, &plan(), &Storage::of(Precision::Bf16), e.peak(), "fake").is_ok());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("2K"), Some(2048));
        assert_eq!(parse_bytes("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_bytes("64 MB"), Some(64 << 20));
        assert_eq!(parse_bytes("lots"), None);
    }

    #[test]
    fn one_off_jobs_count_the_cache_the_copy_and_the_batch() {
        let c = smollm2_135m();
        let f32s = Storage::of(Precision::F32);
        let gen = Job::Generation { batch: 8, longest_prompt: 100, prompt_tokens: 800, new_tokens: 924, decode_copy: false };
        let (p, total) = job_bytes(&c, gen, &f32s);
        assert_eq!(p, 4 * ParamLayout::llama(&c).total as u64);
        // The KV cache: 8 slots of 1024 tokens, K and V of 30 layers × 192 floats.
        let kv = 8 * 1024 * 2 * 30 * 192 * 4;
        assert!(total - p > kv && total - p < kv + 200 * (1 << 20), "{}", total - p);
        let (_, with_copy) = job_bytes(&c, Job::Generation { batch: 8, longest_prompt: 100, prompt_tokens: 800, new_tokens: 924, decode_copy: true }, &f32s);
        assert_eq!(with_copy - total, p / 2, "the bf16 copy is half the f32 parameters");
        // A 70B model does not fit a 24 GiB machine; the error says the parameters alone do not.
        let err = check_job(&llama_70b(), gen, &f32s, false, 24 * GIB, "test").unwrap_err().to_string();
        assert!(err.contains("generation needs about") && err.contains("the parameters alone do not fit"), "{err}");
        // SmolLM2 fits at this batch, not at 512 slots of its full context.
        check_job(&c, gen, &f32s, false, 24 * GIB, "test").unwrap();
        let huge = Job::Generation { batch: 512, longest_prompt: 8192, prompt_tokens: 512 * 8192, new_tokens: 8192, decode_copy: false };
        let err = check_job(&c, huge, &f32s, false, 24 * GIB, "test").unwrap_err().to_string();
        assert!(err.contains("lower `--batch-size` (now 512)"), "{err}");
        let err = check_job(&c, Job::Scoring { tokens: 1 << 20 }, &Storage::of(Precision::F32), true, 2 * GIB, "gpu").unwrap_err().to_string();
        assert!(err.contains("lower `--batch-tokens`") && err.contains("--precision bf16"), "{err}");
    }
}
