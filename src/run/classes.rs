//! The exact class distribution of a policy on a preference game, computed from the model rather
//! than estimated from samples: P(class(y) = c | x) under π_θ (temperature 1, no truncation), for
//! responses generated as `sppo generate` does (stop at an EOS id, at most `max_new_tokens`).
//!
//! A response's class is decided by its first non-whitespace character ([`Game::classify`]). For
//! most first tokens that character is in the token's own text, so one softmax over the first
//! token settles their mass. The other tokens leave the class open: EOS (an empty response, class
//! 0), special tokens (decoded as nothing), tokens that are all whitespace, and byte tokens holding
//! an incomplete UTF-8 character (decoded as U+FFFD until a later token completes it). For those
//! prefixes the next token's softmax is expanded in turn (a tree over undecided prefixes, largest
//! mass first), so the treatment is exact, with two documented limits:
//! - a prefix that reaches `max_new_tokens` is the whole response: classified as decoded (exact);
//! - expansion stops at `max_expansions` prefixes or below `min_mass`: that mass is assigned to the
//!   class of the prefix as decoded (the class the response would get if it ended there) and
//!   reported as `unresolved`. Exploitability moves by at most the unresolved mass (payoffs lie in
//!   [0, 1]), so it is an error bound.
//!
//! A prefix is "decided" when its decoded text has a first non-whitespace character, other than a
//! U+FFFD at the very end (an incomplete UTF-8 sequence that the next bytes may complete). With
//! byte-level BPE (and SentencePiece byte fallback) decoding, later tokens only append bytes, so a
//! complete character, or an invalid sequence already followed by other bytes, cannot change; and
//! a token whose own text is whole characters appends exactly that text, so only tokens decoded
//! as U+FFFD on their own need decoding together with the prefix.

use crate::backend::{AttnSeq, Backend};
use crate::model::Llama;
use crate::oracle::game::Game;
use anyhow::{ensure, Context, Result};
use std::collections::BinaryHeap;

/// How far undecided prefixes are expanded (module doc).
#[derive(Clone, Copy, Debug)]
pub struct ExpandLimits {
    /// Response length limit of the generation being modelled.
    pub max_new_tokens: usize,
    /// Prefixes (forward passes) expanded per prompt at most.
    pub max_expansions: usize,
    /// Prefixes below this probability mass are not expanded.
    pub min_mass: f64,
}

impl Default for ExpandLimits {
    fn default() -> Self {
        ExpandLimits {
            max_new_tokens: 1024,
            max_expansions: 256,
            min_mass: 1e-6,
        }
    }
}

/// P(class = c) for one prompt; `probs` sums to 1 (unresolved mass included, see the module doc).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassDistribution {
    pub probs: Vec<f64>,
    /// Mass whose class was not settled by expansion (an error bound on exploitability).
    pub unresolved: f64,
}

/// Per-token decoded text (special tokens skipped), decoded once per tokenizer.
pub struct TokenTable {
    texts: Vec<String>,
}

/// The first non-whitespace character is settled: present, and not a U+FFFD that later bytes
/// could still complete (one at the end of the text).
fn decided(text: &str) -> bool {
    let mut chars = text.trim_start().chars();
    match chars.next() {
        None => false,
        Some(char::REPLACEMENT_CHARACTER) => chars.next().is_some(),
        Some(_) => true,
    }
}

/// Text that later tokens extend by plain concatenation: complete characters, nothing pending.
fn clean(text: &str) -> bool {
    !text.contains(char::REPLACEMENT_CHARACTER)
}

impl TokenTable {
    pub fn new(tokenizer: &tokenizers::Tokenizer, vocab: usize) -> Result<Self> {
        let ids: Vec<Vec<u32>> = (0..vocab as u32).map(|v| vec![v]).collect();
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let texts = tokenizer
            .decode_batch(&refs, true)
            .map_err(|e| anyhow::anyhow!("decoding the vocabulary: {e}"))?;
        ensure!(
            texts.len() == vocab,
            "decoded {} tokens of {vocab}",
            texts.len()
        );
        Ok(TokenTable { texts })
    }
}

/// A prefix waiting for expansion, ordered by mass.
struct Node {
    mass: f64,
    tokens: Vec<u32>,
    text: String,
}

impl PartialEq for Node {
    fn eq(&self, o: &Self) -> bool {
        self.mass.total_cmp(&o.mass).is_eq()
    }
}
impl Eq for Node {}
impl PartialOrd for Node {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Node {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.mass.total_cmp(&o.mass)
    }
}

/// Next-token logits (len(seqs), V) after each full sequence, in one packed prefill.
fn last_logits<B: Backend>(b: &B, model: &mut Llama<B>, seqs: &[Vec<u32>]) -> Result<Vec<f32>> {
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    ensure!(
        longest < model.cfg.max_position_embeddings,
        "a prompt of {longest} tokens fills the model's context"
    );
    model.ensure_positions(b, longest)?;
    let (mut tokens, mut positions, mut rows, mut attn, mut last) =
        (vec![], vec![], vec![], vec![], vec![]);
    for s in seqs {
        ensure!(!s.is_empty(), "empty sequence");
        let start = tokens.len();
        for (j, &t) in s.iter().enumerate() {
            tokens.push(t);
            positions.push(j as u32);
            rows.push((start + j) as u32);
        }
        attn.push(AttnSeq {
            q_start: start,
            q_len: s.len(),
            k_start: start,
            k_len: s.len(),
        });
        last.push((tokens.len() - 1) as u32);
    }
    let mut cache = model.alloc_kv_cache(b, tokens.len())?;
    model.forward_cached(b, &tokens, &positions, &mut cache, &rows, &attn, &last)
}

/// Softmax of one logits row in f64.
fn softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    p
}

/// The class distribution of the responses to one prompt (`prompt_ids`: the chat-templated prompt
/// with the generation prompt), under the model's own distribution (module doc).
#[allow(clippy::too_many_arguments)]
pub fn class_distribution<B: Backend>(
    b: &B,
    model: &mut Llama<B>,
    tokenizer: &tokenizers::Tokenizer,
    table: &TokenTable,
    eos_ids: &[u32],
    game: &Game,
    prompt_ids: &[u32],
    limits: &ExpandLimits,
) -> Result<ClassDistribution> {
    ensure!(
        limits.max_new_tokens > 0,
        "max_new_tokens must be at least 1"
    );
    let vocab = model.cfg.vocab_size;
    ensure!(
        table.texts.len() == vocab,
        "token table of {} entries for a vocabulary of {vocab}",
        table.texts.len()
    );
    let mut probs = vec![0.0; game.classes()];
    let mut heap = BinaryHeap::new();
    heap.push(Node {
        mass: 1.0,
        tokens: vec![],
        text: String::new(),
    });
    let mut expanded = 0;
    const BATCH: usize = 16;
    while heap.peek().is_some_and(|n| n.mass >= limits.min_mass) && expanded < limits.max_expansions
    {
        let mut nodes = Vec::new();
        while nodes.len() < BATCH.min(limits.max_expansions - expanded) {
            match heap.pop() {
                Some(n) if n.mass >= limits.min_mass => nodes.push(n),
                Some(n) => {
                    heap.push(n);
                    break;
                }
                None => break,
            }
        }
        expanded += nodes.len();
        let seqs: Vec<Vec<u32>> = nodes
            .iter()
            .map(|n| [prompt_ids, n.tokens.as_slice()].concat())
            .collect();
        let logits = last_logits(b, model, &seqs)
            .context("class distribution: forward over undecided prefixes")?;
        for (k, node) in nodes.into_iter().enumerate() {
            let p = softmax(&logits[k * vocab..(k + 1) * vocab]);
            let depth = node.tokens.len() + 1;
            // Whether the node's text has its (pending) first character yet: U+FFFD waiting for
            // more bytes. Otherwise it is whitespace or nothing.
            let pending = !node.text.trim_start().is_empty();
            // Children whose text needs decoding with the prefix (not a plain concatenation).
            let mut joint: Vec<u32> = Vec::new();
            for (v, &q) in p.iter().enumerate() {
                let mass = node.mass * q;
                if mass == 0.0 {
                    continue;
                }
                if eos_ids.contains(&(v as u32)) {
                    probs[game.classify(&node.text)] += mass;
                    continue;
                }
                let t = &table.texts[v];
                if !clean(t) {
                    joint.push(v as u32);
                } else if !pending && decided(t) {
                    // Whitespace prefix + a token with its own first character.
                    probs[game.classify(t)] += mass;
                } else if pending && !t.is_empty() {
                    // Whole characters after an incomplete sequence: its U+FFFD is final.
                    probs[game.classify(&node.text)] += mass;
                } else {
                    settle(
                        &mut probs,
                        &mut heap,
                        game,
                        depth,
                        limits,
                        mass,
                        &node.tokens,
                        v as u32,
                        format!("{}{t}", node.text),
                    );
                }
            }
            if !joint.is_empty() {
                let seqs: Vec<Vec<u32>> = joint
                    .iter()
                    .map(|&v| [node.tokens.as_slice(), &[v]].concat())
                    .collect();
                let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
                let texts = tokenizer
                    .decode_batch(&refs, true)
                    .map_err(|e| anyhow::anyhow!("decoding response prefixes: {e}"))?;
                for (&v, text) in joint.iter().zip(texts) {
                    let mass = node.mass * p[v as usize];
                    settle(
                        &mut probs,
                        &mut heap,
                        game,
                        depth,
                        limits,
                        mass,
                        &node.tokens,
                        v,
                        text,
                    );
                }
            }
        }
    }
    let mut unresolved = 0.0;
    for n in heap {
        unresolved += n.mass;
        probs[game.classify(&n.text)] += n.mass;
    }
    // Rounding: the masses sum to 1 up to f64 error; renormalise so the game accepts the policy.
    let total: f64 = probs.iter().sum();
    ensure!(
        total.is_finite() && total > 0.0,
        "class distribution sums to {total} (NaN logits?)"
    );
    probs.iter_mut().for_each(|x| *x /= total);
    Ok(ClassDistribution { probs, unresolved })
}

/// Puts a child prefix's mass where it belongs: its class when decided or at the length limit,
/// else back on the heap for expansion.
#[allow(clippy::too_many_arguments)]
fn settle(
    probs: &mut [f64],
    heap: &mut BinaryHeap<Node>,
    game: &Game,
    depth: usize,
    limits: &ExpandLimits,
    mass: f64,
    prefix: &[u32],
    v: u32,
    text: String,
) {
    if decided(&text) || depth >= limits.max_new_tokens {
        probs[game.classify(&text)] += mass;
    } else {
        heap.push(Node {
            mass,
            tokens: [prefix, &[v]].concat(),
            text,
        });
    }
}

/// Uniform mixture of class distributions.
pub fn mixture(dists: &[&[f64]]) -> Vec<f64> {
    let n = dists.first().map_or(0, |d| d.len());
    let mut m = vec![0.0; n];
    for d in dists {
        for (a, x) in m.iter_mut().zip(d.iter()) {
            *a += x / dists.len() as f64;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decided_and_clean() {
        assert!(
            decided(" T")
                && decided("\n\tx")
                && !decided("  ")
                && !decided("")
                && !decided(" \u{FFFD}")
        );
        assert!(decided(" \u{FFFD}x") && decided("\u{FFFD}\u{FFFD}"));
        assert!(clean(" \n") && !clean("\u{FFFD}"));
    }

    #[test]
    fn mixture_is_the_mean() {
        let m = mixture(&[&[1.0, 0.0], &[0.0, 1.0], &[0.5, 0.5]]);
        assert!((m[0] - 0.5).abs() < 1e-12 && (m[1] - 0.5).abs() < 1e-12);
    }
}
