//! `judge:DIR`: an instruction-tuned causal LM (Llama/Mistral) as a pairwise judge.
//!
//! For an ordered pair (a, b) of responses the judging prompt (default `data/judge_prompt.txt`,
//! placeholders `{prompt}`, `{response_a}`, `{response_b}`) is sent as one user message through the
//! model's chat template with the generation prompt, and
//!   p(a ≻ b) = softmax(logit_A, logit_B)[A] = σ(logit_A − logit_B)
//! is read from the logits of the answer tokens "A" and "B" at the first generated position (two
//! columns of the LM head on one row per sequence, never the full vocabulary). Both orders are
//! averaged to cancel position bias:
//!   P_ij = ½ [p(i as A ≻ j as B) + (1 − p(j as A ≻ i as B))],
//! so P_ij + P_ji = 1 by construction. All K(K−1) ordered pairs of every prompt in a call share
//! packed forwards. A model without a chat template gets the judging text as is, encoded with the
//! tokenizer's special tokens (`tokenizer(text)`).

use super::packed::{check_lengths, last_row_outputs, load_tokenizer, DEFAULT_MAX_BATCH_TOKENS};
use super::{sigmoid, Judgement, Oracle, OracleInput, PrefMatrix};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::chat::{ChatTemplate, Message};
use crate::config::ModelConfig;
use crate::model::Llama;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// The shipped judging prompt (`data/judge_prompt.txt`), built into the binary so that `judge:DIR`
/// works from any directory.
pub const DEFAULT_JUDGE_PROMPT: &str = include_str!("../../data/judge_prompt.txt");

const PLACEHOLDERS: [&str; 3] = ["{prompt}", "{response_a}", "{response_b}"];

/// A judging prompt with the placeholders `{prompt}`, `{response_a}`, `{response_b}`. Other text in
/// braces is left alone (prompts may show JSON).
#[derive(Clone, Debug)]
pub struct JudgePrompt {
    text: String,
    origin: String,
}

impl JudgePrompt {
    /// `text` with trailing whitespace dropped (a file's final newline is not part of the message);
    /// every placeholder must occur.
    pub fn new(text: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let text = text.trim_end().to_string();
        if let Some(missing) = PLACEHOLDERS.iter().find(|p| !text.contains(*p)) {
            bail!("{origin}: the judging prompt has no {missing} placeholder (it needs {{prompt}}, {{response_a}} and {{response_b}})");
        }
        Ok(JudgePrompt { text, origin })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the judging prompt", path.display()))?;
        Self::new(&text, path.display().to_string())
    }

    pub fn default_prompt() -> Self {
        // The shipped file is checked by the tests; a broken edit of it is a build-time bug.
        Self::new(DEFAULT_JUDGE_PROMPT, "data/judge_prompt.txt").expect("data/judge_prompt.txt has all placeholders")
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Substitutes in one pass over the template, so a response that itself contains
    /// `{response_b}` stays literal instead of being expanded.
    pub fn fill(&self, prompt: &str, response_a: &str, response_b: &str) -> String {
        let values = [prompt, response_a, response_b];
        let mut out = String::with_capacity(self.text.len() + prompt.len() + response_a.len() + response_b.len());
        let mut rest = self.text.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let tail = &rest[open..];
            match PLACEHOLDERS.iter().position(|p| tail.starts_with(p)) {
                Some(k) => {
                    out.push_str(values[k]);
                    rest = &tail[PLACEHOLDERS[k].len()..];
                }
                None => {
                    out.push('{');
                    rest = &tail[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// The K×K matrix from the ordered-pair probabilities `p_a(i, j)` = p(i as A ≻ j as B), i ≠ j:
/// P_ij = ½[p_a(i, j) + 1 − p_a(j, i)] (position bias cancels; antisymmetric by construction).
pub fn pair_matrix(k: usize, p_a: impl Fn(usize, usize) -> f64) -> Result<PrefMatrix> {
    let mut p = vec![0.5; k * k];
    for i in 0..k {
        for j in 0..k {
            if i != j {
                p[i * k + j] = 0.5 * (p_a(i, j) + (1.0 - p_a(j, i)));
            }
        }
    }
    PrefMatrix::new(k, p)
}

/// A causal LM loaded as a judge.
pub struct JudgeOracle<B: Backend = CpuBackend> {
    b: B,
    model: Llama<B>,
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    prompt: JudgePrompt,
    /// Vocabulary ids of the answers "A" and "B".
    answer_ids: [u32; 2],
    dir: PathBuf,
    max_batch_tokens: usize,
}

impl JudgeOracle<CpuBackend> {
    /// Loads DIR on the CPU backend; `template` is a judging-prompt file (None: the shipped default).
    pub fn load(dir: &Path, template: Option<PathBuf>) -> Result<Self> {
        Self::load_on(CpuBackend::new(None)?, dir, template)
    }
}

impl<B: Backend> JudgeOracle<B> {
    pub fn load_on(b: B, dir: &Path, template: Option<PathBuf>) -> Result<Self> {
        let cfg = ModelConfig::from_model_dir(dir)?;
        if cfg.num_labels.is_some() {
            bail!(
                "{}: a sequence classifier (score head, no LM head) cannot judge by answering A or B; use it as `reward:{}`",
                dir.join("config.json").display(),
                dir.display()
            );
        }
        let prompt = match &template {
            Some(path) => JudgePrompt::from_file(path)?,
            None => JudgePrompt::default_prompt(),
        };
        let tokenizer = load_tokenizer(dir)?;
        let tok_file = dir.join("tokenizer.json");
        let answer_id = |letter: &str| -> Result<u32> {
            let enc = tokenizer.encode(letter, false).map_err(|e| anyhow!("{}: tokenizing {letter:?}: {e}", tok_file.display()))?;
            match enc.get_ids() {
                [id] => Ok(*id),
                ids => bail!(
                    "{}: the answer {letter:?} encodes to {} tokens {ids:?}; the judge reads one answer token, so it needs a tokenizer where \"A\" and \"B\" are single tokens",
                    tok_file.display(),
                    ids.len()
                ),
            }
        };
        let answer_ids = [answer_id("A")?, answer_id("B")?];
        if answer_ids[0] == answer_ids[1] {
            bail!("{}: \"A\" and \"B\" encode to the same token {}", tok_file.display(), answer_ids[0]);
        }
        let template = ChatTemplate::from_model_dir(dir)?;
        let model = Llama::load(&b, dir)?;
        Ok(JudgeOracle { b, model, tokenizer, template, prompt, answer_ids, dir: dir.to_path_buf(), max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS })
    }

    /// Tokens per packed forward (default [`DEFAULT_MAX_BATCH_TOKENS`]).
    pub fn with_max_batch_tokens(mut self, n: usize) -> Self {
        self.max_batch_tokens = n;
        self
    }

    /// Token ids of the answers "A" and "B".
    pub fn answer_ids(&self) -> [u32; 2] {
        self.answer_ids
    }

    pub fn judge_prompt(&self) -> &JudgePrompt {
        &self.prompt
    }

    /// The token ids the judge reads for (prompt, A = `response_a`, B = `response_b`).
    pub fn encode_pair(&self, prompt: &str, response_a: &str, response_b: &str) -> Result<Vec<u32>> {
        let text = self.prompt.fill(prompt, response_a, response_b);
        let (text, special) = match &self.template {
            Some(t) => (t.render(&[Message::user(text)], true)?, false),
            None => (text, true),
        };
        let enc = self
            .tokenizer
            .encode(text.as_str(), special)
            .map_err(|e| anyhow!("{}: tokenizing the judging prompt: {e}", self.dir.join("tokenizer.json").display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// p(A ≻ B) = σ(logit_A − logit_B) at the last position of each sequence (encoded pairs).
    pub fn first_wins(&mut self, seqs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let ids = self.answer_ids;
        let b = &self.b;
        let logits = last_row_outputs(b, &mut self.model, seqs, self.max_batch_tokens, 2, |m, acts, rows| m.lm_head_logits_at(b, acts, rows, &ids))?;
        Ok(logits.chunks_exact(2).map(|l| sigmoid(l[0] as f64 - l[1] as f64)).collect())
    }
}

impl<B: Backend> Oracle for JudgeOracle<B> {
    fn name(&self) -> String {
        format!("judge:{}", self.dir.display())
    }

    fn judge(&mut self, batch: &[OracleInput<'_>]) -> Result<Vec<Judgement>> {
        // Every ordered pair of every prompt, encoded up front so one call packs them all.
        let mut seqs = Vec::new();
        let mut owner = Vec::new(); // (prompt, i as A, j as B)
        for (p, inp) in batch.iter().enumerate() {
            let r = inp.responses;
            for i in 0..r.len() {
                for j in 0..r.len() {
                    if i != j {
                        let ids = self.encode_pair(inp.prompt, &r[i], &r[j]).with_context(|| format!("prompt {p}, responses {i} (A) and {j} (B)"))?;
                        seqs.push(ids);
                        owner.push((p, i, j));
                    }
                }
            }
        }
        check_lengths(&seqs, self.model.cfg.max_position_embeddings, &self.dir, |s| {
            let (p, i, j) = owner[s];
            format!("prompt {p}, judging prompt for responses {i} (A) and {j} (B)")
        })?;
        let wins = self.first_wins(&seqs).with_context(|| format!("judging with {}", self.dir.display()))?;
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for (p, inp) in batch.iter().enumerate() {
            let k = inp.responses.len();
            let n = k * k.saturating_sub(1);
            let mine = &wins[at..at + n];
            // Ordered pairs were pushed row by row skipping the diagonal: (i, j) sits at
            // i·(K−1) + j − [j > i].
            let p_a = |i: usize, j: usize| mine[i * (k - 1) + j - usize::from(j > i)];
            let matrix = pair_matrix(k, p_a).with_context(|| format!("prompt {p}"))?;
            out.push(Judgement { matrix, scores: None });
            at += n;
        }
        Ok(out)
    }
}
