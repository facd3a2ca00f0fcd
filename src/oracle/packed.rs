//! Shared by the model-based oracles (`reward`, `judge`): run a decoder over many token sequences
//! in packed forwards under a token budget and keep one small output row per sequence (a reward,
//! two answer logits), plus loading a model folder's `tokenizer.json`.
//!
//! Only each sequence's LAST row is projected: a reward model is read at one position and a judge
//! at the first generated position, so full-vocabulary logits for every row would be waste.

use crate::backend::Backend;
use crate::model::{Activations, Batch, Llama};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// Default token budget of one packed forward: large enough to keep the matrix products efficient,
/// small enough that the activations stay in the hundreds of MB for a 135M model and a few GB for
/// a 7B one (per token: every layer's input, L×C, plus one layer's full activations).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 4096;

/// Loads `<dir>/tokenizer.json`, naming the file when it is missing or unreadable.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        bail!("{}: missing; the model directory needs its tokenizer.json to read text", path.display());
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", path.display()))
}

/// Runs `seqs` through `model` in packed forwards of at most `max_batch_tokens` tokens (a longer
/// sequence gets a forward of its own) and returns `head(model, acts, last_rows)` for every
/// sequence, concatenated in input order: (S, width).
///
/// `head` receives the row index of each packed sequence's last token in `acts.lnf` (final-normed
/// hidden states) and must return `width` values per row. Sequences must be non-empty and fit the
/// model's context; callers check that with messages naming the prompt and response.
pub fn last_row_outputs<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    seqs: &[Vec<u32>],
    max_batch_tokens: usize,
    width: usize,
    head: impl Fn(&Llama<B>, &Activations<B>, &[u32]) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    if max_batch_tokens == 0 {
        bail!("the token budget of a packed forward must be positive");
    }
    if let Some(i) = seqs.iter().position(Vec::is_empty) {
        bail!("sequence {i} is empty: nothing to score");
    }
    let mut out = Vec::with_capacity(seqs.len() * width);
    let mut start = 0;
    while start < seqs.len() {
        // Greedy packing in input order: no padding is involved, so the order only decides which
        // sequences share a forward, not the cost per token.
        let mut end = start;
        let mut tokens = 0;
        while end < seqs.len() && (end == start || tokens + seqs[end].len() <= max_batch_tokens) {
            tokens += seqs[end].len();
            end += 1;
        }
        let group = &seqs[start..end];
        // Every row's target is ignored: nothing here needs log-probs.
        let batch = Batch::from_sequences(group.iter().map(|s| (s.as_slice(), s.len())))?;
        let longest = group.iter().map(Vec::len).max().unwrap_or(0);
        model.ensure_positions(b, longest)?;
        // Recompute mode keeps each layer's input and one layer's activations, not every layer's
        // (no backward follows).
        let mut acts = Activations::new(b, &model.cfg, batch.len(), true)?;
        model.forward_hidden(b, &batch, &mut acts).with_context(|| format!("forward over sequences {start}..{end}"))?;
        let last: Vec<u32> = batch.seqs.iter().map(|s| (s.q_start + s.q_len - 1) as u32).collect();
        let vals = head(model, &acts, &last)?;
        if vals.len() != last.len() * width {
            bail!("the output head returned {} values for {} sequences of width {width}", vals.len(), last.len());
        }
        if let Some(k) = vals.iter().position(|v| !v.is_finite()) {
            bail!("sequence {} gave a non-finite output ({})", start + k / width, vals[k]);
        }
        out.extend_from_slice(&vals);
        start = end;
    }
    Ok(out)
}

/// Checks that every sequence fits the model's context; `name(i)` describes sequence `i` (which
/// prompt, which response) for the error.
pub fn check_lengths(seqs: &[Vec<u32>], max_positions: usize, model_dir: &Path, name: impl Fn(usize) -> String) -> Result<()> {
    for (i, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            bail!("{}: encodes to no tokens", name(i));
        }
        if s.len() > max_positions {
            bail!(
                "{}: {} tokens exceed the context of {} tokens of {} (max_position_embeddings)",
                name(i),
                s.len(),
                max_positions,
                model_dir.display()
            );
        }
    }
    Ok(())
}
