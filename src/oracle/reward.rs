//! `reward:DIR`: a Bradley–Terry reward model (`LlamaForSequenceClassification` /
//! `MistralForSequenceClassification`, one label) as a preference oracle:
//! P_ij = σ(r_i − r_j), and the rewards r are returned as the judgement's scores.
//!
//! The text a response is scored as:
//! - with a chat template in DIR: `[user: prompt, assistant: response]` rendered without the
//!   generation prompt and encoded without added special tokens, i.e. transformers'
//!   `apply_chat_template(messages, tokenize=True)` (the template writes BOS and turn markers);
//! - without one: `prompt + "\n" + response` encoded WITH the tokenizer's special tokens, i.e.
//!   `tokenizer(text)`, the usual input of a reward model trained on plain text.
//!
//! The reward is the score head applied at the position transformers pools
//! ([`pooled_position`]); responses of all prompts in a call share packed forwards.

use super::packed::{check_lengths, last_row_outputs, load_tokenizer, DEFAULT_MAX_BATCH_TOKENS};
use super::{Judgement, Oracle, OracleInput, PrefMatrix};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::chat::{ChatTemplate, Message};
use crate::config::ModelConfig;
use crate::model::Llama;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// The position whose score transformers' `GenericForSequenceClassification` returns (transformers
/// 5; also 4.48+): the rightmost token that is not `pad` (`argmax(index · (ids != pad))`, hence 0
/// when every token is the pad), or the last token when the model has no pad id. A pad id inside
/// the text therefore does not cut the sequence there; trailing pads are skipped.
///
/// (transformers before 4.48 used `first pad − 1` instead, which differs when the pad id occurs
/// mid-text; we follow the current code, which the fixtures were made with.)
pub fn pooled_position(ids: &[u32], pad: Option<u32>) -> usize {
    match pad {
        None => ids.len().saturating_sub(1),
        Some(p) => ids.iter().rposition(|&t| t != p).unwrap_or(0),
    }
}

/// Rewards of token sequences under a one-label sequence classifier: the score head at each
/// sequence's [`pooled_position`], packed `max_batch_tokens` at a time.
///
/// Causal attention makes the hidden state at position p depend on tokens 0..=p only, so each
/// sequence is cut after its pooled position and scored at its last row (exactly transformers'
/// value, without computing the tokens after it).
pub fn sequence_rewards<B: Backend>(b: &B, model: &mut Llama<B>, seqs: &[Vec<u32>], max_batch_tokens: usize) -> Result<Vec<f64>> {
    match model.cfg.num_labels {
        Some(1) => {}
        Some(n) => bail!("a reward model has one label (a scalar score); this classifier has {n}"),
        None => bail!("a reward model needs a score head (*ForSequenceClassification); this model is a causal LM"),
    }
    let pad = model.cfg.pad_token_id;
    let cut: Vec<Vec<u32>> = seqs.iter().map(|s| s[..(pooled_position(s, pad) + 1).min(s.len())].to_vec()).collect();
    let vals = last_row_outputs(b, model, &cut, max_batch_tokens, 1, |m, acts, rows| m.score_rows(b, acts, rows))?;
    Ok(vals.into_iter().map(f64::from).collect())
}

/// A reward model loaded from a Hugging Face folder, with its tokenizer and chat template.
pub struct RewardOracle<B: Backend = CpuBackend> {
    b: B,
    model: Llama<B>,
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    dir: PathBuf,
    max_batch_tokens: usize,
}

impl RewardOracle<CpuBackend> {
    /// Loads DIR on the CPU backend (all cores).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(CpuBackend::new(None)?, dir)
    }
}

impl<B: Backend> RewardOracle<B> {
    /// Loads DIR (`config.json` of a one-label `*ForSequenceClassification`, safetensors,
    /// `tokenizer.json`, optionally a chat template) onto backend `b`.
    pub fn load_on(b: B, dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        let cfg = ModelConfig::from_model_dir(dir)?;
        match cfg.num_labels {
            None => bail!(
                "{}: a causal language model (no *ForSequenceClassification architecture, no `score.weight` head) is not a \
                 reward model; to use it as a pairwise judge, give `judge:{}`",
                config.display(),
                dir.display()
            ),
            Some(1) => {}
            Some(n) => bail!(
                "{}: a reward model must have exactly one label (a scalar reward); this classifier has {n} \
                 (`num_labels` / `id2label`)",
                config.display()
            ),
        }
        let tokenizer = load_tokenizer(dir)?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let model = Llama::load(&b, dir)?;
        Ok(RewardOracle { b, model, tokenizer, template, dir: dir.to_path_buf(), max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS })
    }

    /// Tokens per packed forward (default [`DEFAULT_MAX_BATCH_TOKENS`]).
    pub fn with_max_batch_tokens(mut self, n: usize) -> Self {
        self.max_batch_tokens = n;
        self
    }

    pub fn model(&self) -> &Llama<B> {
        &self.model
    }

    /// Whether responses are rendered through a chat template (else `prompt + "\n" + response`).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The token ids a (prompt, response) pair is scored as (see the module documentation).
    pub fn encode(&self, prompt: &str, response: &str) -> Result<Vec<u32>> {
        let (text, special) = match &self.template {
            Some(t) => (t.render(&[Message::user(prompt), Message::assistant(response)], false)?, false),
            None => (format!("{prompt}\n{response}"), true),
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), special)
            .map_err(|e| anyhow!("{}: tokenizing: {e}", self.dir.join("tokenizer.json").display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Rewards of every response of every input (one vector per input, in order).
    pub fn rewards(&mut self, batch: &[OracleInput<'_>]) -> Result<Vec<Vec<f64>>> {
        let mut seqs = Vec::new();
        let mut owner = Vec::new(); // (input, response) of each sequence, for errors
        for (p, inp) in batch.iter().enumerate() {
            for (r, resp) in inp.responses.iter().enumerate() {
                seqs.push(self.encode(inp.prompt, resp).with_context(|| format!("prompt {p}, response {r}"))?);
                owner.push((p, r));
            }
        }
        check_lengths(&seqs, self.model.cfg.max_position_embeddings, &self.dir, |i| format!("prompt {}, response {}", owner[i].0, owner[i].1))?;
        let flat = sequence_rewards(&self.b, &mut self.model, &seqs, self.max_batch_tokens)
            .with_context(|| format!("scoring with the reward model {}", self.dir.display()))?;
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for inp in batch {
            out.push(flat[at..at + inp.responses.len()].to_vec());
            at += inp.responses.len();
        }
        Ok(out)
    }
}

impl<B: Backend> Oracle for RewardOracle<B> {
    fn name(&self) -> String {
        format!("reward:{}", self.dir.display())
    }

    fn judge(&mut self, batch: &[OracleInput<'_>]) -> Result<Vec<Judgement>> {
        self.rewards(batch)?
            .into_iter()
            .enumerate()
            .map(|(p, r)| {
                let matrix = PrefMatrix::from_scores(&r, 1.0).with_context(|| format!("prompt {p}"))?;
                Ok(Judgement { matrix, scores: Some(r) })
            })
            .collect()
    }
}
