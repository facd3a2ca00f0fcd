//! `similarity:DIR`, the shipped default oracle: a response is preferred when its sentence
//! embedding is closer to the prompt's reference answer.
//!
//! s_i = cos(emb(y_i), emb(reference)) and P[i][j] = σ((s_i − s_j) / τ) (`PrefMatrix::from_scores`).
//! The embedding is the sentence-transformers pipeline of DIR, read from its files:
//! `tokenizer.json` (padding removed, truncation set to `max_seq_length` of
//! `sentence_bert_config.json`, else the model's `max_position_embeddings`), the BERT encoder
//! ([`crate::model::bert`]), mean pooling (`1_Pooling/config.json`; other pooling modes are an
//! error) and L2 normalisation when `modules.json` lists a `Normalize` module (other modules, such
//! as `Dense`, are an error rather than silently skipped). Cosine does not depend on the
//! normalisation; [`SimilarityOracle::embed`] returns exactly what sentence-transformers' `encode`
//! returns.
//!
//! Why τ = 0.05 ([`DEFAULT_TEMPERATURE`]): all-MiniLM-L6-v2 was trained with a contrastive loss
//! (MultipleNegativesRankingLoss) whose logits are cosines × 20, i.e. τ = 0.05, so σ(Δcos/0.05) is
//! the pairwise preference the model was trained to express. Cosines of responses to one prompt
//! typically differ by 0.01–0.2: with τ = 0.05 that spans P ≈ 0.55–0.98, whereas τ = 1 would give
//! P within 0.5 ± 0.05 and SPPO's targets η(P − ½) would carry almost no signal.
//!
//! Batching: every response and reference of a `judge` call is tokenised together and embedded in
//! packed batches of at most `token_budget` tokens (sequences are never split), so a call costs
//! one pass over its text whatever the number of prompts.

use super::{Judgement, Oracle, OracleInput, PrefMatrix};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::model::bert::Bert;
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// Default score temperature τ (see the module documentation).
pub const DEFAULT_TEMPERATURE: f64 = 0.05;

/// Default packed-batch size in tokens: the inference activations of MiniLM take about 23 KB per
/// token (one layer kept), so 8192 tokens stay under 200 MB while amortising per-call overheads.
pub const DEFAULT_TOKEN_BUDGET: usize = 8192;

/// The sentence-transformers pipeline a model directory describes.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    /// Word pieces per text, [CLS] and [SEP] included.
    pub max_seq_length: usize,
    pub normalize: bool,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map(Some).with_context(|| format!("{}: malformed JSON", path.display()))
}

impl Pipeline {
    /// Reads `modules.json`, `1_Pooling/config.json` (or the pooling path modules.json names) and
    /// `sentence_bert_config.json`; missing files mean a plain BERT directory: mean pooling, no
    /// normalisation, truncation at `max_positions`.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let mut normalize = false;
        let mut pooling_dir = dir.join("1_Pooling");
        let modules_path = dir.join("modules.json");
        if let Some(mods) = read_json(&modules_path)? {
            let mods = mods.as_array().with_context(|| format!("{}: expected a list of modules", modules_path.display()))?;
            for m in mods {
                let ty = m
                    .get("type")
                    .and_then(Value::as_str)
                    .with_context(|| format!("{}: a module without `type`", modules_path.display()))?;
                match ty.rsplit('.').next().unwrap_or(ty) {
                    "Transformer" => {}
                    "Pooling" => {
                        if let Some(p) = m.get("path").and_then(Value::as_str) {
                            pooling_dir = dir.join(p);
                        }
                    }
                    "Normalize" => normalize = true,
                    other => {
                        bail!("{}: module `{other}` is not supported (supported: Transformer, Pooling, Normalize)", modules_path.display())
                    }
                }
            }
        }
        let pool_path = pooling_dir.join("config.json");
        if let Some(pool) = read_json(&pool_path)? {
            let on = |k: &str| pool.get(k).and_then(Value::as_bool).unwrap_or(false);
            ensure!(
                on("pooling_mode_mean_tokens"),
                "{}: only mean pooling is supported, and pooling_mode_mean_tokens is not true",
                pool_path.display()
            );
            for k in [
                "pooling_mode_cls_token",
                "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens",
                "pooling_mode_lasttoken",
            ] {
                ensure!(!on(k), "{}: `{k}` is not supported (only mean pooling)", pool_path.display());
            }
        }
        let sb_path = dir.join("sentence_bert_config.json");
        let max_seq_length = match read_json(&sb_path)? {
            Some(v) => match v.get("max_seq_length") {
                None | Some(Value::Null) => max_positions,
                Some(x) => {
                    let n =
                        x.as_u64().with_context(|| format!("{}: max_seq_length must be a positive integer, got {x}", sb_path.display()))?;
                    usize::try_from(n).unwrap_or(usize::MAX).min(max_positions)
                }
            },
            None => max_positions,
        };
        // [CLS] + [SEP] + at least one word piece.
        ensure!(max_seq_length >= 3, "{}: max_seq_length {max_seq_length} leaves no room for text", sb_path.display());
        Ok(Pipeline { max_seq_length, normalize })
    }
}

/// The similarity oracle on backend `B` (the CPU reference by default).
pub struct SimilarityOracle<B: Backend = CpuBackend> {
    dir: PathBuf,
    backend: B,
    model: Bert<B>,
    tokenizer: Tokenizer,
    pub pipeline: Pipeline,
    pub temperature: f64,
    pub token_budget: usize,
}

impl SimilarityOracle<CpuBackend> {
    /// Loads DIR on the CPU backend (all cores).
    pub fn load(dir: &Path, temperature: f64) -> Result<Self> {
        Self::load_with(CpuBackend::new(None)?, dir, temperature)
    }
}

impl<B: Backend> SimilarityOracle<B> {
    pub fn load_with(backend: B, dir: &Path, temperature: f64) -> Result<Self> {
        ensure!(temperature.is_finite() && temperature > 0.0, "similarity oracle: temperature must be positive, got {temperature}");
        let model = Bert::load(&backend, dir).with_context(|| format!("similarity oracle {}", dir.display()))?;
        let pipeline = Pipeline::from_dir(dir, model.cfg.max_position_embeddings)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", tok_path.display()))?;
        // tokenizer.json files of sentence-transformers models often carry padding to 128 and
        // truncation at 128 from export time; sentence-transformers overrides both, so do we.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: pipeline.max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| anyhow!("{}: cannot set truncation to {}: {e}", tok_path.display(), pipeline.max_seq_length))?;
        Ok(SimilarityOracle {
            dir: dir.to_path_buf(),
            backend,
            model,
            tokenizer,
            pipeline,
            temperature,
            token_budget: DEFAULT_TOKEN_BUDGET,
        })
    }

    /// Token ids of each text as the encoder sees them ([CLS] … [SEP], truncated).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("{}: tokenizing {} texts: {e}", self.dir.join("tokenizer.json").display(), texts.len()))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Sentence embeddings (normalised when the pipeline says so), one per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        let mut out = Vec::with_capacity(texts.len());
        let mut start = 0;
        while start < ids.len() {
            // Greedy chunks of whole sequences up to the token budget (at least one sequence).
            let mut end = start + 1;
            let mut tokens = ids[start].len();
            while end < ids.len() && tokens + ids[end].len() <= self.token_budget {
                tokens += ids[end].len();
                end += 1;
            }
            let seqs: Vec<&[u32]> = ids[start..end].iter().map(Vec::as_slice).collect();
            let embs = self
                .model
                .embed_ids(&self.backend, &seqs, self.pipeline.normalize)
                .with_context(|| format!("similarity oracle {}: embedding texts {start}..{end}", self.dir.display()))?;
            out.extend(embs);
            start = end;
        }
        Ok(out)
    }
}

/// Cosine similarity in f64; a zero vector is an error (it has no direction).
fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    let den = (aa * bb).sqrt();
    (den > 0.0 && den.is_finite()).then(|| ab / den)
}

/// The first characters of a prompt, for error messages.
fn excerpt(s: &str) -> String {
    let short: String = s.chars().take(60).collect();
    if short.len() < s.len() {
        format!("{short}…")
    } else {
        short
    }
}

impl<B: Backend> Oracle for SimilarityOracle<B> {
    fn name(&self) -> String {
        format!("similarity:{}", self.dir.display())
    }

    fn judge(&mut self, batch: &[OracleInput<'_>]) -> Result<Vec<Judgement>> {
        // Every reference is checked before any work: a missing one fails the call up front.
        let mut texts: Vec<&str> = Vec::new();
        for (i, inp) in batch.iter().enumerate() {
            let Some(reference) = inp.reference else {
                bail!(
                    "similarity oracle: prompt {i} (\"{}\") has no reference answer; this oracle scores responses by their similarity to \
                     one (give the prompt set a `reference`, or choose another oracle)",
                    excerpt(inp.prompt)
                );
            };
            texts.push(reference);
            texts.extend(inp.responses.iter().map(String::as_str));
        }
        let embs = self.embed(&texts)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(batch.len());
        for (i, inp) in batch.iter().enumerate() {
            let reference = &embs[at];
            let responses = &embs[at + 1..at + 1 + inp.responses.len()];
            at += 1 + inp.responses.len();
            let scores = responses
                .iter()
                .enumerate()
                .map(|(r, e)| {
                    cosine(e, reference).ok_or_else(|| {
                        anyhow!(
                            "similarity oracle: prompt {i} (\"{}\"): response {r} or the reference has a zero embedding",
                            excerpt(inp.prompt)
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            let matrix = PrefMatrix::from_scores(&scores, self.temperature)
                .with_context(|| format!("similarity oracle: prompt {i} (\"{}\")", excerpt(inp.prompt)))?;
            out.push(Judgement { matrix, scores: Some(scores) });
        }
        Ok(out)
    }
}
