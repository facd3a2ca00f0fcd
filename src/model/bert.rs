//! THE BERT encoder (Hugging Face `BertModel`: all-MiniLM-L6-v2 and the BERT family), written once
//! against [`Backend`]: forward, then backward in exact reverse order, layer by layer.
//!
//! Embeddings, with x₀ the (N, C) input of layer 0:
//!   e  = word[id] + position[p] + token_type[τ]          x₀ = LN_emb(e)
//! Per layer l (post-LayerNorm, exact GELU, bidirectional attention), x the layer input:
//!   q,k,v = x·Wqᵀ + bq, x·Wkᵀ + bk, x·Wvᵀ + bv          att = attention(q, k, v)
//!   sum1  = x + att·Woᵀ + bo                            h1  = LN1(sum1)
//!   inter = h1·W1ᵀ + b1    act = gelu(inter)            sum2 = h1 + act·W2ᵀ + b2
//!   x'    = LN2(sum2)
//! Mean pooling per sequence: pooled_s = (1/T_s) Σ_{t∈s} x_L[t]. L2 normalisation (the
//! sentence-transformers `Normalize` module) is the caller's: it is outside the encoder's graph.
//!
//! Batches are packed: sequences end to end, no pad rows, so attention needs no padding mask and
//! pooling no attention mask. Pooling is a product with an (N, S) matrix of 1/T_s weights (each
//! row one-hot on its sequence), run by the backend's matmul kernels: forward is
//! `matmul_backward_weight` (Mᵀ·H), backward `matmul_backward_input` (M·dpooled), so the whole
//! encoder, pooling included, stays on the backend.
//!
//! One deliberate difference from transformers' backward: its word embedding has
//! `padding_idx = pad_token_id`, so the [PAD] row never receives a gradient; here every id does
//! (packed batches have no pad rows, and this backward exists for verification, not training).
//!
//! Inference (the similarity oracle) keeps one layer's activations and reuses them for every
//! layer; training-style use (`keep_layers`) keeps all layers for backward, which exists to prove
//! the layers (finite differences, Hugging Face gradients) and to check CUDA kernels against.

use super::weights::{load_flat_f32_mapped, ParamLayout};
use crate::backend::{AttnMask, AttnSeq, AttnShape, Backend};
use crate::nvtx;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::ops::Range;
use std::path::Path;

/// Everything the encoder needs from `config.json`, resolved and validated.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
}

/// `config.json` of a BERT model as on disk; defaults are transformers' `BertConfig` defaults.
#[derive(Deserialize, Debug)]
struct HfBertConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
}

impl BertConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let hf: HfBertConfig = serde_json::from_str(text).context("not a valid BERT config.json")?;
        // RoBERTa, DistilBERT, ... share the key names but not the computation (position offsets,
        // no token types): refuse them rather than compute something else silently.
        if let Some(t) = hf.model_type.as_deref() {
            ensure!(t == "bert", "model_type `{t}` is not supported by the BERT encoder (expected `bert`)");
        }
        let act = hf.hidden_act.as_deref().unwrap_or("gelu");
        ensure!(act == "gelu", "hidden_act `{act}` is not supported: the encoder implements BERT's exact erf GELU (`gelu`) only");
        let pos = hf.position_embedding_type.as_deref().unwrap_or("absolute");
        ensure!(pos == "absolute", "position_embedding_type `{pos}` is not supported (only `absolute`)");
        ensure!(hf.is_decoder != Some(true), "is_decoder is true: a BERT decoder is not an encoder");
        let need = |v: Option<usize>, key: &str| -> Result<usize> {
            match v {
                Some(0) => bail!("`{key}` must be positive"),
                Some(n) => Ok(n),
                None => bail!("missing `{key}`"),
            }
        };
        let hidden_size = need(hf.hidden_size, "hidden_size")?;
        let num_heads = need(hf.num_attention_heads, "num_attention_heads")?;
        ensure!(hidden_size % num_heads == 0, "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}");
        let eps = hf.layer_norm_eps.unwrap_or(1e-12);
        ensure!(eps.is_finite() && eps >= 0.0, "layer_norm_eps {eps} must be finite and non-negative");
        Ok(BertConfig {
            vocab_size: need(hf.vocab_size, "vocab_size")?,
            hidden_size,
            num_layers: need(hf.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            head_dim: hidden_size / num_heads,
            intermediate_size: need(hf.intermediate_size, "intermediate_size")?,
            max_position_embeddings: need(Some(hf.max_position_embeddings.unwrap_or(512)), "max_position_embeddings")?,
            type_vocab_size: need(Some(hf.type_vocab_size.unwrap_or(2)), "type_vocab_size")?,
            layer_norm_eps: eps as f32,
        })
    }
}

/// Ranges of one encoder layer's tensors in the flat buffer.
#[derive(Clone, Debug)]
pub struct EncoderLayerRanges {
    pub query_w: Range<usize>,    // (C, C)
    pub query_b: Range<usize>,    // (C)
    pub key_w: Range<usize>,      // (C, C)
    pub key_b: Range<usize>,      // (C)
    pub value_w: Range<usize>,    // (C, C)
    pub value_b: Range<usize>,    // (C)
    pub attn_out_w: Range<usize>, // (C, C) attention.output.dense
    pub attn_out_b: Range<usize>, // (C)
    pub attn_ln_w: Range<usize>,  // (C) attention.output.LayerNorm
    pub attn_ln_b: Range<usize>,  // (C)
    pub inter_w: Range<usize>,    // (I, C) intermediate.dense
    pub inter_b: Range<usize>,    // (I)
    pub out_w: Range<usize>,      // (C, I) output.dense
    pub out_b: Range<usize>,      // (C)
    pub out_ln_w: Range<usize>,   // (C) output.LayerNorm
    pub out_ln_b: Range<usize>,   // (C)
}

/// Ranges of the whole encoder.
#[derive(Clone, Debug)]
pub struct EncoderRanges {
    pub word: Range<usize>,       // (V, C)
    pub position: Range<usize>,   // (P, C)
    pub token_type: Range<usize>, // (Tt, C)
    pub emb_ln_w: Range<usize>,   // (C)
    pub emb_ln_b: Range<usize>,   // (C)
    pub layers: Vec<EncoderLayerRanges>,
}

impl EncoderRanges {
    pub fn new(layout: &ParamLayout, cfg: &BertConfig) -> Self {
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let r = |s: &str| layout.range(&format!("encoder.layer.{l}.{s}"));
                EncoderLayerRanges {
                    query_w: r("attention.self.query.weight"),
                    query_b: r("attention.self.query.bias"),
                    key_w: r("attention.self.key.weight"),
                    key_b: r("attention.self.key.bias"),
                    value_w: r("attention.self.value.weight"),
                    value_b: r("attention.self.value.bias"),
                    attn_out_w: r("attention.output.dense.weight"),
                    attn_out_b: r("attention.output.dense.bias"),
                    attn_ln_w: r("attention.output.LayerNorm.weight"),
                    attn_ln_b: r("attention.output.LayerNorm.bias"),
                    inter_w: r("intermediate.dense.weight"),
                    inter_b: r("intermediate.dense.bias"),
                    out_w: r("output.dense.weight"),
                    out_b: r("output.dense.bias"),
                    out_ln_w: r("output.LayerNorm.weight"),
                    out_ln_b: r("output.LayerNorm.bias"),
                }
            })
            .collect();
        EncoderRanges {
            word: layout.range("embeddings.word_embeddings.weight"),
            position: layout.range("embeddings.position_embeddings.weight"),
            token_type: layout.range("embeddings.token_type_embeddings.weight"),
            emb_ln_w: layout.range("embeddings.LayerNorm.weight"),
            emb_ln_b: layout.range("embeddings.LayerNorm.bias"),
            layers,
        }
    }
}

/// How a stored tensor name maps to the layout: the `bert.` prefix (checkpoints of task models
/// such as `BertForMaskedLM`) is dropped; the pooler, task heads and position/type-id buffers are
/// skipped (the encoder's output is the last hidden state; sentence embeddings mean-pool it).
fn stored_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    let skip = name.starts_with("pooler.")
        || name.starts_with("cls.")
        || name.starts_with("classifier.")
        || name.starts_with("qa_outputs.")
        || name == "embeddings.position_ids"
        || name == "embeddings.token_type_ids";
    (!skip).then(|| name.to_string())
}

/// A packed batch of token sequences for the encoder.
#[derive(Clone, Debug, Default)]
pub struct EncoderBatch {
    pub tokens: Vec<u32>,      // (N)
    pub positions: Vec<u32>,   // (N) 0.. within each sequence
    pub token_types: Vec<u32>, // (N) segment ids (0 for a single sentence)
    pub seqs: Vec<AttnSeq>,    // one per sequence, q == k ranges
    /// (N, S) mean-pooling weights: row t is 1/T_s in column s of its sequence, 0 elsewhere.
    pub pool: Vec<f32>,
}

impl EncoderBatch {
    /// Packs single-segment sequences (token type 0 everywhere).
    pub fn from_sequences<'a>(seqs: impl IntoIterator<Item = &'a [u32]>) -> Result<Self> {
        let seqs: Vec<&[u32]> = seqs.into_iter().collect();
        let zeros: Vec<Vec<u32>> = seqs.iter().map(|s| vec![0; s.len()]).collect();
        Self::from_segments(seqs.iter().copied().zip(zeros.iter().map(Vec::as_slice)))
    }

    /// Packs `(token ids, token type ids)` pairs of equal lengths.
    pub fn from_segments<'a>(seqs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>) -> Result<Self> {
        let seqs: Vec<(&[u32], &[u32])> = seqs.into_iter().collect();
        let mut b = EncoderBatch::default();
        for (s, (ids, types)) in seqs.iter().enumerate() {
            ensure!(!ids.is_empty(), "encoder batch: sequence {s} is empty");
            ensure!(ids.len() == types.len(), "encoder batch: sequence {s} has {} ids but {} token types", ids.len(), types.len());
            let start = b.tokens.len();
            b.tokens.extend_from_slice(ids);
            b.token_types.extend_from_slice(types);
            b.positions.extend(0..ids.len() as u32);
            b.seqs.push(AttnSeq { q_start: start, q_len: ids.len(), k_start: start, k_len: ids.len() });
        }
        let (n, ns) = (b.tokens.len(), seqs.len());
        b.pool = vec![0.0; n * ns];
        for (s, seq) in b.seqs.iter().enumerate() {
            let w = 1.0 / seq.q_len as f32;
            for t in seq.q_start..seq.q_start + seq.q_len {
                b.pool[t * ns + s] = w;
            }
        }
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }
}

/// One encoder layer's activations (N packed tokens).
pub struct EncoderLayerActs<B: Backend> {
    pub resid_in: B::Buf, // (N, C) layer input x
    pub q: B::Buf,        // (N, H, D) with bias
    pub k: B::Buf,        // (N, H, D)
    pub v: B::Buf,        // (N, H, D)
    pub att: B::Buf,      // (N, H, D)
    pub att_lse: B::Buf,  // (N, H)
    pub sum1: B::Buf,     // (N, C) x + att·Woᵀ + bo (LN1 input)
    pub h1: B::Buf,       // (N, C) LN1 output
    pub ln1_mean: B::Buf, // (N)
    pub ln1_rstd: B::Buf, // (N)
    pub inter: B::Buf,    // (N, I) h1·W1ᵀ + b1 (GELU input)
    pub act: B::Buf,      // (N, I) gelu(inter)
    pub sum2: B::Buf,     // (N, C) h1 + act·W2ᵀ + b2 (LN2 input)
    pub ln2_mean: B::Buf, // (N)
    pub ln2_rstd: B::Buf, // (N)
}

impl<B: Backend> EncoderLayerActs<B> {
    fn new(b: &B, cfg: &BertConfig, n: usize) -> Result<Self> {
        let (c, i, h) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads);
        Ok(EncoderLayerActs {
            resid_in: b.alloc(n * c)?,
            q: b.alloc(n * c)?,
            k: b.alloc(n * c)?,
            v: b.alloc(n * c)?,
            att: b.alloc(n * c)?,
            att_lse: b.alloc(n * h)?,
            sum1: b.alloc(n * c)?,
            h1: b.alloc(n * c)?,
            ln1_mean: b.alloc(n)?,
            ln1_rstd: b.alloc(n)?,
            inter: b.alloc(n * i)?,
            act: b.alloc(n * i)?,
            sum2: b.alloc(n * c)?,
            ln2_mean: b.alloc(n)?,
            ln2_rstd: b.alloc(n)?,
        })
    }
}

/// Everything forward keeps (for backward when `keep_layers`).
pub struct EncoderActivations<B: Backend> {
    pub n: usize,
    pub num_seqs: usize,
    /// All layers kept (backward possible), or one set reused by every layer (inference).
    pub keep_layers: bool,
    pub emb_sum: B::Buf,  // (N, C) word + position + token type
    pub emb_mean: B::Buf, // (N)
    pub emb_rstd: B::Buf, // (N)
    /// Per layer with `keep_layers`, else one.
    pub layers: Vec<EncoderLayerActs<B>>,
    pub hidden: B::Buf, // (N, C) last hidden state
    pub pool: B::Buf,   // (N, S) pooling weights (the batch's, uploaded)
    pub pooled: B::Buf, // (S, C) mean of each sequence's hidden rows
}

impl<B: Backend> EncoderActivations<B> {
    pub fn new(b: &B, cfg: &BertConfig, n: usize, num_seqs: usize, keep_layers: bool) -> Result<Self> {
        let c = cfg.hidden_size;
        let nl = if keep_layers { cfg.num_layers } else { 1 };
        Ok(EncoderActivations {
            n,
            num_seqs,
            keep_layers,
            emb_sum: b.alloc(n * c)?,
            emb_mean: b.alloc(n)?,
            emb_rstd: b.alloc(n)?,
            layers: (0..nl).map(|_| EncoderLayerActs::new(b, cfg, n)).collect::<Result<_>>()?,
            hidden: b.alloc(n * c)?,
            pool: b.alloc(n * num_seqs)?,
            pooled: b.alloc(num_seqs * c)?,
        })
    }
}

/// Gradient scratch for one layer (reused across layers).
struct GradScratch<B: Backend> {
    dresid: B::Buf, // (N, C) ∂L/∂(residual stream): layer output on entry, layer input on exit
    dsum: B::Buf,   // (N, C) ∂L/∂(a LayerNorm input)
    dh1: B::Buf,    // (N, C)
    datt: B::Buf,   // (N, C)
    dq: B::Buf,     // (N, C)
    dk: B::Buf,     // (N, C)
    dv: B::Buf,     // (N, C)
    dact: B::Buf,   // (N, I)
    dinter: B::Buf, // (N, I)
}

/// A BERT encoder with its flat parameters on backend `B`.
pub struct Bert<B: Backend> {
    pub cfg: BertConfig,
    pub layout: ParamLayout,
    pub ranges: EncoderRanges,
    pub params: B::Buf,
}

impl<B: Backend> Bert<B> {
    /// Loads `config.json` + safetensors from a Hugging Face BERT directory.
    pub fn load(b: &B, dir: &Path) -> Result<Self> {
        let cfg = BertConfig::from_model_dir(dir)?;
        let layout = ParamLayout::bert(&cfg);
        let flat =
            load_flat_f32_mapped(dir, &layout, &stored_name).with_context(|| format!("loading BERT weights of {}", dir.display()))?;
        Self::from_flat(b, cfg, &flat)
    }

    pub fn from_flat(b: &B, cfg: BertConfig, flat: &[f32]) -> Result<Self> {
        let layout = ParamLayout::bert(&cfg);
        ensure!(flat.len() == layout.total, "flat parameters hold {} values, the BERT config needs {}", flat.len(), layout.total);
        let ranges = EncoderRanges::new(&layout, &cfg);
        let params = b.upload(flat)?;
        Ok(Bert { cfg, layout, ranges, params })
    }

    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.cfg.num_heads,
            n_kv_heads: self.cfg.num_heads,
            head_dim: self.cfg.head_dim,
            scale: 1.0 / (self.cfg.head_dim as f32).sqrt(),
            mask: AttnMask::Bidirectional,
        }
    }

    fn check_batch(&self, batch: &EncoderBatch, acts: &EncoderActivations<B>) -> Result<()> {
        let n = batch.len();
        ensure!(n > 0, "encoder: empty batch");
        ensure!(batch.positions.len() == n && batch.token_types.len() == n, "encoder batch rows disagree");
        ensure!(batch.pool.len() == n * batch.num_seqs(), "encoder batch: pooling weights are not (N, S)");
        ensure!(
            acts.n == n && acts.num_seqs == batch.num_seqs(),
            "encoder activations sized for {} rows / {} sequences, batch has {n} / {}",
            acts.n,
            acts.num_seqs,
            batch.num_seqs()
        );
        if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!("token id {t} is outside the encoder's vocabulary of {}", self.cfg.vocab_size);
        }
        if let Some(&t) = batch.token_types.iter().find(|&&t| t as usize >= self.cfg.type_vocab_size) {
            bail!("token type {t} is outside the encoder's {} token types", self.cfg.type_vocab_size);
        }
        if let Some(&p) = batch.positions.iter().max() {
            ensure!(
                (p as usize) < self.cfg.max_position_embeddings,
                "position {p} is beyond the encoder's {} positions (max_position_embeddings): truncate the text",
                self.cfg.max_position_embeddings
            );
        }
        Ok(())
    }

    /// Embeddings, every layer, mean pooling: leaves the last hidden state in `acts.hidden` and the
    /// pooled (not normalised) sequence embeddings in `acts.pooled`.
    pub fn forward(&self, b: &B, batch: &EncoderBatch, acts: &mut EncoderActivations<B>) -> Result<()> {
        b.enter(|| self.forward_ops(b, batch, acts))
    }

    fn forward_ops(&self, b: &B, batch: &EncoderBatch, acts: &mut EncoderActivations<B>) -> Result<()> {
        let _r = nvtx::range("bert forward");
        self.check_batch(batch, acts)?;
        let c = self.cfg.hidden_size;
        let (p, r) = (&self.params, &self.ranges);

        // Embeddings: word + position + token type, then LayerNorm into layer 0's input. The
        // position and type rows are gathered into `hidden`, free until the last layer writes it.
        b.embedding_forward(b.full_mut(&mut acts.emb_sum), b.view(p, r.word.clone()), &batch.tokens, c)?;
        b.embedding_forward(b.full_mut(&mut acts.hidden), b.view(p, r.position.clone()), &batch.positions, c)?;
        b.add_inplace(b.full_mut(&mut acts.emb_sum), b.full(&acts.hidden))?;
        b.embedding_forward(b.full_mut(&mut acts.hidden), b.view(p, r.token_type.clone()), &batch.token_types, c)?;
        b.add_inplace(b.full_mut(&mut acts.emb_sum), b.full(&acts.hidden))?;
        b.layernorm_forward(
            b.full_mut(&mut acts.layers[0].resid_in),
            b.full_mut(&mut acts.emb_mean),
            b.full_mut(&mut acts.emb_rstd),
            b.full(&acts.emb_sum),
            b.view(p, r.emb_ln_w.clone()),
            b.view(p, r.emb_ln_b.clone()),
            c,
            self.cfg.layer_norm_eps,
        )?;

        let nl = self.cfg.num_layers;
        for l in 0..nl {
            if acts.keep_layers {
                let (cur, rest) = acts.layers.split_at_mut(l + 1);
                let out = if l + 1 < nl { &mut rest[0].resid_in } else { &mut acts.hidden };
                self.layer_forward(b, l, &mut cur[l], out, batch)?;
            } else {
                // One set of activations for every layer: the output becomes the next input.
                self.layer_forward(b, l, &mut acts.layers[0], &mut acts.hidden, batch)?;
                if l + 1 < nl {
                    std::mem::swap(&mut acts.layers[0].resid_in, &mut acts.hidden);
                }
            }
        }

        // pooled (S, C) = poolᵀ (S, N) · hidden (N, C): the weight-gradient product with
        // dout = pool (N, S), which accumulates, hence the zero fill.
        b.write(&mut acts.pool, 0, &batch.pool)?;
        b.fill(b.full_mut(&mut acts.pooled), 0.0)?;
        b.matmul_backward_weight(b.full_mut(&mut acts.pooled), b.full(&acts.pool), b.full(&acts.hidden), c, batch.num_seqs())
    }

    /// One encoder layer: reads `la.resid_in`, fills `la`, writes the layer output to `out`.
    fn layer_forward(&self, b: &B, l: usize, la: &mut EncoderLayerActs<B>, out: &mut B::Buf, batch: &EncoderBatch) -> Result<()> {
        let _r = nvtx::range_fmt(format_args!("encoder layer {l} forward"));
        let cfg = &self.cfg;
        let (c, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let w = &self.ranges.layers[l];
        let p = &self.params;
        let pv = |r: &Range<usize>| b.view(p, r.clone());

        // self-attention
        for (dst, wr, br) in [(&mut la.q, &w.query_w, &w.query_b), (&mut la.k, &w.key_w, &w.key_b), (&mut la.v, &w.value_w, &w.value_b)] {
            b.matmul_forward(b.full_mut(dst), b.full(&la.resid_in), pv(wr), c, c)?;
            b.bias_add(b.full_mut(dst), pv(br))?;
        }
        let shape = self.attn_shape();
        b.attention_forward(
            b.full_mut(&mut la.att),
            b.full_mut(&mut la.att_lse),
            b.full(&la.q),
            b.full(&la.k),
            b.full(&la.v),
            &batch.seqs,
            &shape,
        )?;
        b.matmul_forward(b.full_mut(&mut la.sum1), b.full(&la.att), pv(&w.attn_out_w), c, c)?;
        b.bias_add(b.full_mut(&mut la.sum1), pv(&w.attn_out_b))?;
        b.add_inplace(b.full_mut(&mut la.sum1), b.full(&la.resid_in))?;
        b.layernorm_forward(
            b.full_mut(&mut la.h1),
            b.full_mut(&mut la.ln1_mean),
            b.full_mut(&mut la.ln1_rstd),
            b.full(&la.sum1),
            pv(&w.attn_ln_w),
            pv(&w.attn_ln_b),
            c,
            eps,
        )?;

        // feed-forward
        b.matmul_forward(b.full_mut(&mut la.inter), b.full(&la.h1), pv(&w.inter_w), c, i)?;
        b.bias_add(b.full_mut(&mut la.inter), pv(&w.inter_b))?;
        b.gelu_forward(b.full_mut(&mut la.act), b.full(&la.inter))?;
        b.matmul_forward(b.full_mut(&mut la.sum2), b.full(&la.act), pv(&w.out_w), i, c)?;
        b.bias_add(b.full_mut(&mut la.sum2), pv(&w.out_b))?;
        b.add_inplace(b.full_mut(&mut la.sum2), b.full(&la.h1))?;
        b.layernorm_forward(
            b.full_mut(out),
            b.full_mut(&mut la.ln2_mean),
            b.full_mut(&mut la.ln2_rstd),
            b.full(&la.sum2),
            pv(&w.out_ln_w),
            pv(&w.out_ln_b),
            c,
            eps,
        )
    }

    /// A zeroed gradient buffer with the parameter layout.
    pub fn alloc_grads(&self, b: &B) -> Result<B::Buf> {
        b.alloc(self.layout.total)
    }

    /// Backward of `L = <dhidden, hidden> + <dpooled, pooled>` (dhidden: (N, C), dpooled: (S, C),
    /// host slices): parameter gradients are ADDED to `grads`. `acts` must hold this batch's
    /// forward with `keep_layers`.
    pub fn backward(
        &self,
        b: &B,
        batch: &EncoderBatch,
        acts: &EncoderActivations<B>,
        dhidden: &[f32],
        dpooled: &[f32],
        grads: &mut B::Buf,
    ) -> Result<()> {
        let _r = nvtx::range("bert backward");
        ensure!(acts.keep_layers, "encoder backward needs activations built with keep_layers");
        self.check_batch(batch, acts)?;
        let cfg = &self.cfg;
        let (n, s) = (batch.len(), batch.num_seqs());
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        ensure!(dhidden.len() == n * c, "dhidden has {} values, expected (N {n}, C {c})", dhidden.len());
        ensure!(dpooled.len() == s * c, "dpooled has {} values, expected (S {s}, C {c})", dpooled.len());
        ensure!(b.len(grads) == self.layout.total, "gradient buffer has {} values, parameters {}", b.len(grads), self.layout.total);
        let (p, r) = (&self.params, &self.ranges);
        let mut g = GradScratch::<B> {
            dresid: b.upload(dhidden)?,
            dsum: b.alloc(n * c)?,
            dh1: b.alloc(n * c)?,
            datt: b.alloc(n * c)?,
            dq: b.alloc(n * c)?,
            dk: b.alloc(n * c)?,
            dv: b.alloc(n * c)?,
            dact: b.alloc(n * i)?,
            dinter: b.alloc(n * i)?,
        };

        // Pooling: dhidden (N, C) += pool (N, S) · dpooled (S, C).
        let dpooled = b.upload(dpooled)?;
        b.matmul_backward_input(b.full_mut(&mut g.dresid), b.full(&acts.pool), b.full(&dpooled), c, s, true)?;

        for l in (0..cfg.num_layers).rev() {
            self.layer_backward(b, l, &acts.layers[l], &mut g, grads, batch)?;
        }

        // Embeddings: x₀ = LN_emb(e), e = word[id] + position[p] + token_type[τ].
        b.fill(b.full_mut(&mut g.dsum), 0.0)?;
        let (dw, db) = b.view_mut_pair(grads, r.emb_ln_w.clone(), r.emb_ln_b.clone());
        b.layernorm_backward(
            b.full_mut(&mut g.dsum),
            dw,
            db,
            b.full(&g.dresid),
            b.full(&acts.emb_sum),
            b.view(p, r.emb_ln_w.clone()),
            b.full(&acts.emb_mean),
            b.full(&acts.emb_rstd),
            c,
        )?;
        b.embedding_backward(b.view_mut(grads, r.word.clone()), b.full(&g.dsum), &batch.tokens, c)?;
        b.embedding_backward(b.view_mut(grads, r.position.clone()), b.full(&g.dsum), &batch.positions, c)?;
        b.embedding_backward(b.view_mut(grads, r.token_type.clone()), b.full(&g.dsum), &batch.token_types, c)
    }

    /// Backward of one layer: on entry `g.dresid` is ∂L/∂(layer output); on exit ∂L/∂(layer input).
    fn layer_backward(
        &self,
        b: &B,
        l: usize,
        la: &EncoderLayerActs<B>,
        g: &mut GradScratch<B>,
        grads: &mut B::Buf,
        batch: &EncoderBatch,
    ) -> Result<()> {
        let _r = nvtx::range_fmt(format_args!("encoder layer {l} backward"));
        let cfg = &self.cfg;
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let w = &self.ranges.layers[l];
        let p = &self.params;
        let pv = |r: &Range<usize>| b.view(p, r.clone());

        // out = LN2(sum2)
        b.fill(b.full_mut(&mut g.dsum), 0.0)?;
        let (dw, db) = b.view_mut_pair(grads, w.out_ln_w.clone(), w.out_ln_b.clone());
        b.layernorm_backward(
            b.full_mut(&mut g.dsum),
            dw,
            db,
            b.full(&g.dresid),
            b.full(&la.sum2),
            pv(&w.out_ln_w),
            b.full(&la.ln2_mean),
            b.full(&la.ln2_rstd),
            c,
        )?;
        // sum2 = h1 + act·W2ᵀ + b2;  act = gelu(inter);  inter = h1·W1ᵀ + b1
        b.bias_backward(b.view_mut(grads, w.out_b.clone()), b.full(&g.dsum))?;
        b.matmul_backward_weight(b.view_mut(grads, w.out_w.clone()), b.full(&g.dsum), b.full(&la.act), i, c)?;
        b.matmul_backward_input(b.full_mut(&mut g.dact), b.full(&g.dsum), pv(&w.out_w), i, c, false)?;
        b.gelu_backward(b.full_mut(&mut g.dinter), b.full(&g.dact), b.full(&la.inter))?;
        b.bias_backward(b.view_mut(grads, w.inter_b.clone()), b.full(&g.dinter))?;
        b.matmul_backward_weight(b.view_mut(grads, w.inter_w.clone()), b.full(&g.dinter), b.full(&la.h1), c, i)?;
        b.matmul_backward_input(b.full_mut(&mut g.dh1), b.full(&g.dinter), pv(&w.inter_w), c, i, false)?;
        b.add_inplace(b.full_mut(&mut g.dh1), b.full(&g.dsum))?;

        // h1 = LN1(sum1)
        b.fill(b.full_mut(&mut g.dsum), 0.0)?;
        let (dw, db) = b.view_mut_pair(grads, w.attn_ln_w.clone(), w.attn_ln_b.clone());
        b.layernorm_backward(
            b.full_mut(&mut g.dsum),
            dw,
            db,
            b.full(&g.dh1),
            b.full(&la.sum1),
            pv(&w.attn_ln_w),
            b.full(&la.ln1_mean),
            b.full(&la.ln1_rstd),
            c,
        )?;
        // sum1 = x + att·Woᵀ + bo;  att = attention(q, k, v)
        b.bias_backward(b.view_mut(grads, w.attn_out_b.clone()), b.full(&g.dsum))?;
        b.matmul_backward_weight(b.view_mut(grads, w.attn_out_w.clone()), b.full(&g.dsum), b.full(&la.att), c, c)?;
        b.matmul_backward_input(b.full_mut(&mut g.datt), b.full(&g.dsum), pv(&w.attn_out_w), c, c, false)?;
        b.attention_backward(
            b.full_mut(&mut g.dq),
            b.full_mut(&mut g.dk),
            b.full_mut(&mut g.dv),
            b.full(&g.datt),
            b.full(&la.q),
            b.full(&la.k),
            b.full(&la.v),
            b.full(&la.att),
            b.full(&la.att_lse),
            &batch.seqs,
            &self.attn_shape(),
        )?;
        // q, k, v = x·Wᵀ + b: dx = dsum (residual) + Σ dq·Wq + dk·Wk + dv·Wv
        for (d, wr, br) in [(&g.dq, &w.query_w, &w.query_b), (&g.dk, &w.key_w, &w.key_b), (&g.dv, &w.value_w, &w.value_b)] {
            b.bias_backward(b.view_mut(grads, br.clone()), b.full(d))?;
            b.matmul_backward_weight(b.view_mut(grads, wr.clone()), b.full(d), b.full(&la.resid_in), c, c)?;
        }
        b.matmul_backward_input(b.full_mut(&mut g.dresid), b.full(&g.dq), pv(&w.query_w), c, c, false)?;
        b.matmul_backward_input(b.full_mut(&mut g.dresid), b.full(&g.dk), pv(&w.key_w), c, c, true)?;
        b.matmul_backward_input(b.full_mut(&mut g.dresid), b.full(&g.dv), pv(&w.value_w), c, c, true)?;
        b.add_inplace(b.full_mut(&mut g.dresid), b.full(&g.dsum))
    }

    /// Mean-pooled embeddings (S, C) of `seqs`, each L2-normalised when `normalize` (in f64), run
    /// in one packed forward (inference activations).
    pub fn embed_ids(&self, b: &B, seqs: &[&[u32]], normalize: bool) -> Result<Vec<Vec<f32>>> {
        let batch = EncoderBatch::from_sequences(seqs.iter().copied())?;
        let mut acts = EncoderActivations::new(b, &self.cfg, batch.len(), batch.num_seqs(), false)?;
        self.forward(b, &batch, &mut acts)?;
        let pooled = b.download(&acts.pooled)?;
        let c = self.cfg.hidden_size;
        pooled
            .chunks_exact(c)
            .enumerate()
            .map(|(s, e)| {
                if let Some(x) = e.iter().find(|x| !x.is_finite()) {
                    bail!("encoder: embedding of sequence {s} contains {x}");
                }
                if !normalize {
                    return Ok(e.to_vec());
                }
                let norm = e.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
                // sentence-transformers' Normalize: x / max(‖x‖, 1e-12) (torch F.normalize).
                let scale = 1.0 / norm.max(1e-12);
                Ok(e.iter().map(|&x| (f64::from(x) * scale) as f32).collect())
            })
            .collect()
    }
}
