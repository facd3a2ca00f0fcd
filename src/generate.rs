//! Batched generation with a KV cache: a fixed number of slots, each holding one sequence's cache
//! region; finished sequences free their slot and the next request is admitted at the following
//! step (its prompt prefilled in the same packed forward as the others' decode tokens).
//!
//! Every sampled token draws its uniform from the counter-based generator keyed by
//! (seed, iteration, prompt id, sample index, token position), so the tokens do not depend on the
//! batch size, the slot a request lands in, the thread count or a resume point.

use crate::backend::{AttnSeq, Backend};
use crate::model::Llama;
use crate::rng::{prompt_key, RngKey, Stream};
use crate::sampling::{SamplerScratch, SamplingParams};
use anyhow::{bail, ensure, Result};

/// One sequence to generate: its prompt ids and the key of its random stream.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt_id: String,
    pub sample_index: u32,
    pub prompt_ids: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct GenOptions {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Generation stops when one of these is sampled (not included in the output).
    pub eos_ids: Vec<u32>,
    pub seed: u64,
    pub iteration: u32,
    /// Number of sequences decoded together.
    pub batch_size: usize,
    /// Upper bound on prompt tokens prefilled in one step (bounds activation memory).
    pub max_prefill_tokens: usize,
    /// Precision of the weights the decode steps read.
    pub weights: DecodeWeights,
}

/// Precision of the weights generation reads. Decoding a few rows at a time is bound by reading
/// the weights from memory, so a 2-byte copy halves the traffic of its products (about 15% faster
/// CPU sampling end to end in BENCHMARKS.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecodeWeights {
    /// A bf16 copy when it is exact (every weight representable in bf16, as in a model loaded
    /// from a bf16 checkpoint), otherwise f32: never changes a token.
    #[default]
    Auto,
    /// Always the f32 weights.
    F32,
    /// Generate with the Linear and LM-head weights rounded to bf16 (as vLLM samples in bf16):
    /// faster on the CPU for f32 weights (e.g. after training), at the price of bf16-rounded
    /// logits. Prefill and decode both read the rounded weights, so the tokens still do not
    /// depend on batching; embeddings and norms stay f32.
    Bf16,
}

impl DecodeWeights {
    pub fn is_auto(&self) -> bool {
        *self == DecodeWeights::Auto
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DecodeWeights::Auto => "auto",
            DecodeWeights::F32 => "f32",
            DecodeWeights::Bf16 => "bf16",
        }
    }
}

/// Keeps the backend's compact decode copy of the parameters for as long as it lives.
struct DecodePin<'b, B: Backend>(&'b B);

impl<B: Backend> Drop for DecodePin<'_, B> {
    fn drop(&mut self) {
        self.0.end_decode();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id was sampled.
    Stop,
    /// `max_new_tokens` reached, or the model's context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenOutput {
    /// Generated ids, without the EOS that stopped them.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

struct Slot {
    request: usize,
    /// Tokens already in this slot's cache.
    cached: usize,
    /// Tokens to feed at the next step (the prompt, then each sampled token).
    pending: Vec<u32>,
    generated: Vec<u32>,
}

/// Generates a response for every request, in request order. `on_token` is called once per
/// generated token (progress bars).
pub fn generate<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    requests: &[GenRequest],
    opts: &GenOptions,
    mut on_token: impl FnMut(usize),
) -> Result<Vec<GenOutput>> {
    opts.sampling.validate()?;
    ensure!(opts.batch_size > 0, "batch size must be at least 1");
    ensure!(opts.max_new_tokens > 0, "max_new_tokens must be at least 1");
    let ctx = model.cfg.max_position_embeddings;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt_ids.is_empty() {
            bail!("request {i} (prompt {}) has an empty prompt", r.prompt_id);
        }
        if r.prompt_ids.len() >= ctx {
            bail!(
                "prompt {} has {} tokens, the model's context is {ctx}: no room for a response (shorten the prompt)",
                r.prompt_id,
                r.prompt_ids.len()
            );
        }
    }
    if requests.is_empty() {
        return Ok(vec![]);
    }
    let _pin = match opts.weights {
        DecodeWeights::F32 => None,
        DecodeWeights::Auto | DecodeWeights::Bf16 => {
            b.begin_decode(b.full(&model.params), opts.weights == DecodeWeights::Bf16)?;
            Some(DecodePin(b))
        }
    };
    // Each slot's cache region fits the longest prompt plus the response, within the context.
    let longest = requests.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
    let region = (longest + opts.max_new_tokens).min(ctx);
    let slots_n = opts.batch_size.min(requests.len());
    model.ensure_positions(b, region)?;
    let mut cache = model.alloc_kv_cache(b, slots_n * region)?;
    let vocab = model.cfg.vocab_size;

    let mut outputs: Vec<Option<GenOutput>> = vec![None; requests.len()];
    let mut next_request = 0;
    let mut slots: Vec<Option<Slot>> = (0..slots_n).map(|_| None).collect();
    let mut scratch = SamplerScratch::new();
    let keys: Vec<RngKey> = requests
        .iter()
        .map(|r| RngKey::new(opts.seed, opts.iteration, Stream::Sampling, prompt_key(&r.prompt_id), r.sample_index))
        .collect::<Result<_>>()?;

    loop {
        // Admit waiting requests into free slots, within the prefill budget.
        let mut prefill = 0;
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            let Some(r) = requests.get(next_request) else { break };
            if prefill > 0 && prefill + r.prompt_ids.len() > opts.max_prefill_tokens {
                break;
            }
            prefill += r.prompt_ids.len();
            *slot = Some(Slot { request: next_request, cached: 0, pending: r.prompt_ids.clone(), generated: vec![] });
            next_request += 1;
        }
        if slots.iter().all(Option::is_none) {
            break;
        }

        // One packed forward over every active slot's pending tokens.
        let (mut tokens, mut positions, mut rows, mut seqs, mut last_rows, mut active) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for (si, slot) in slots.iter().enumerate() {
            let Some(s) = slot else { continue };
            let q_start = tokens.len();
            for (j, &t) in s.pending.iter().enumerate() {
                tokens.push(t);
                positions.push((s.cached + j) as u32);
                rows.push((si * region + s.cached + j) as u32);
            }
            let k_len = s.cached + s.pending.len();
            seqs.push(AttnSeq { q_start, q_len: s.pending.len(), k_start: si * region, k_len });
            last_rows.push((tokens.len() - 1) as u32);
            active.push(si);
        }
        // One uniform per active slot, keyed by its request and token position; the backend
        // draws every row's token (on the GPU for the CUDA backend).
        let uniforms: Vec<f32> = active
            .iter()
            .map(|&si| slots[si].as_ref().map_or(0.0, |s| keys[s.request].uniform(s.generated.len() as u64)))
            .collect();
        let model_ref: &Llama<B> = model;
        let drawn = b.enter(|| {
            let logits = model_ref.forward_cached_logits(b, &tokens, &positions, &mut cache, &rows, &seqs, &last_rows)?;
            b.sample_rows(&logits, vocab, &uniforms, &opts.sampling, &mut scratch)
        })?;

        for (j, &si) in active.iter().enumerate() {
            let Some(s) = slots[si].as_mut() else { continue };
            s.cached += s.pending.len();
            let tok = drawn[j];
            on_token(1);
            let finish = if opts.eos_ids.contains(&tok) {
                Some(FinishReason::Stop)
            } else {
                s.generated.push(tok);
                if s.generated.len() >= opts.max_new_tokens || s.cached + 1 >= region {
                    Some(FinishReason::Length)
                } else {
                    None
                }
            };
            match finish {
                Some(f) => {
                    outputs[s.request] = Some(GenOutput { tokens: std::mem::take(&mut s.generated), finish: f });
                    slots[si] = None;
                }
                None => s.pending = vec![tok],
            }
        }
    }
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| anyhow::anyhow!("internal: request {i} was never finished")))
        .collect()
}

/// Each record's prompt ids: its messages through the chat template with the generation prompt.
pub fn encode_records(codec: &crate::logprobs::TextCodec, records: &[crate::prompts::PromptRecord]) -> Result<Vec<Vec<u32>>> {
    records
        .iter()
        .map(|r| crate::chat::encode_chat(&codec.tokenizer, &codec.template, &r.messages, true).map_err(|e| e.context(format!("prompt {}", r.id))))
        .collect()
}

/// Generates `num_samples` responses for each prompt record (`prompt_ids`: the records encoded
/// by [`encode_records`]) and returns the output lines `{prompt_id, prompt, responses,
/// finish_reasons, num_tokens, reference?}` and the number of generated tokens. Stops on
/// `opts.eos_ids` plus the model directory's generation_config EOS ids and the template's
/// end-of-turn token.
#[allow(clippy::too_many_arguments)]
pub fn generate_records<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    codec: &crate::logprobs::TextCodec,
    model_dir: &std::path::Path,
    records: &[crate::prompts::PromptRecord],
    prompt_ids: &[Vec<u32>],
    num_samples: u32,
    mut opts: GenOptions,
    on_token: impl FnMut(usize),
) -> Result<(Vec<serde_json::Value>, usize)> {
    ensure!(prompt_ids.len() == records.len(), "internal: {} encoded prompts for {} records", prompt_ids.len(), records.len());
    let gen_cfg = crate::config::GenerationConfig::from_model_dir(model_dir)?.unwrap_or_default();
    let defaults = if gen_cfg.eos_token_ids.is_empty() { model.cfg.eos_token_ids.clone() } else { gen_cfg.eos_token_ids };
    for id in defaults.into_iter().chain([codec.end_of_turn]) {
        if !opts.eos_ids.contains(&id) {
            opts.eos_ids.push(id);
        }
    }
    let mut requests = Vec::new();
    for (r, ids) in records.iter().zip(prompt_ids) {
        for s in 0..num_samples {
            requests.push(GenRequest { prompt_id: r.id.clone(), sample_index: s, prompt_ids: ids.clone() });
        }
    }
    let outputs = generate(b, model, &requests, &opts, on_token)?;
    let total = outputs.iter().map(|o| o.tokens.len()).sum();
    let k = num_samples as usize;
    let mut lines = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let outs = &outputs[i * k..(i + 1) * k];
        let responses: Vec<String> = outs
            .iter()
            .map(|o| codec.tokenizer.decode(&o.tokens, true).map_err(|e| anyhow::anyhow!("decoding: {e}")))
            .collect::<Result<_>>()?;
        let mut line = serde_json::json!({
            "prompt_id": r.id,
            "prompt": r.messages.last().map(|m| m.content.clone()).unwrap_or_default(),
            "responses": responses,
            "finish_reasons": outs.iter().map(|o| o.finish.as_str()).collect::<Vec<_>>(),
            "num_tokens": outs.iter().map(|o| o.tokens.len()).collect::<Vec<_>>(),
        });
        // Carried through so `sppo rank` can use it (the similarity oracle needs one).
        if let (Some(reference), Some(obj)) = (&r.reference, line.as_object_mut()) {
            obj.insert("reference".into(), reference.clone().into());
        }
        lines.push(line);
    }
    Ok((lines, total))
}
