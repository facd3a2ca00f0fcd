//! THE Llama/Mistral decoder, written once against [`Backend`]: forward, then backward in exact
//! reverse order, layer by layer (the chain rule reads top to bottom).
//!
//! Per layer l, with x the residual stream (N, C):
//!   ln1 = rmsnorm(x)                     q,k,v = ln1·Wqᵀ, ln1·Wkᵀ, ln1·Wvᵀ; rope(q), rope(k)
//!   att = attention(q, k, v)             mid = x + att·Woᵀ
//!   ln2 = rmsnorm(mid)                   gate, up = ln2·Wgᵀ, ln2·Wuᵀ; act = silu(gate)·up
//!   x'  = mid + act·Wdᵀ
//! then lnf = rmsnorm(x_L) and the LM head, fused with log-prob gathering for training; or, for a
//! sequence classifier (`*ForSequenceClassification`), the score head on chosen rows
//! ([`Llama::score_rows`]).
//!
//! Batches are packed: sequences end to end, no padding. Activations are kept per layer; with
//! `recompute` only each layer's input is kept and the rest is recomputed during backward.
//!
//! Storage roles ([`BufRole`]): parameters are `Param`; activations, activation gradients, the KV
//! cache and the rotary tables are `Compute` (bf16 on a bf16 backend); everything else stays
//! `Exact` f32 (norm statistics, logsumexps, log-probs and their gradients, parameter gradients,
//! logits read by the host). A backend without mixed precision (the CPU) ignores the roles.

use super::weights::{DecoderRanges, LayerRanges, ParamLayout};
use crate::backend::{AttnMask, AttnSeq, AttnShape, Backend, BufRole, IGNORE_TARGET};
use crate::config::ModelConfig;
use crate::nvtx;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// A packed batch of token sequences.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,    // (N)
    pub positions: Vec<u32>, // (N)
    pub seqs: Vec<AttnSeq>,  // one per sequence (training layout: q == k ranges)
    /// (N) next-token target of each row, or IGNORE_TARGET (prompt rows, each sequence's last row).
    pub targets: Vec<i32>,
    /// (N) which sequence each row belongs to.
    pub row_seq: Vec<u32>,
}

impl Batch {
    /// Packs `(token ids, prompt_len)` pairs. Row t of a sequence predicts token t+1; rows whose
    /// target lies in the prompt (t + 1 < prompt_len) are masked, so the summed log-prob covers
    /// exactly the response tokens.
    pub fn from_sequences<'a>(seqs: impl IntoIterator<Item = (&'a [u32], usize)>) -> Result<Self> {
        let mut b = Batch::default();
        for (s, (ids, prompt_len)) in seqs.into_iter().enumerate() {
            ensure!(!ids.is_empty(), "sequence {s} is empty");
            ensure!(prompt_len <= ids.len(), "sequence {s}: prompt length {prompt_len} exceeds its {} tokens", ids.len());
            let start = b.tokens.len();
            for (t, &id) in ids.iter().enumerate() {
                b.tokens.push(id);
                b.positions.push(t as u32);
                b.row_seq.push(s as u32);
                let target = match ids.get(t + 1) {
                    Some(&next) if t + 1 >= prompt_len.max(1) => next as i32,
                    _ => IGNORE_TARGET,
                };
                b.targets.push(target);
            }
            b.seqs.push(AttnSeq { q_start: start, q_len: ids.len(), k_start: start, k_len: ids.len() });
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

/// One layer's activations (shapes for N packed tokens).
pub struct LayerActs<B: Backend> {
    pub resid_in: B::Buf,  // (N, C) layer input (residual stream)
    pub ln1: B::Buf,       // (N, C)
    pub ln1_rstd: B::Buf,  // (N)
    pub q: B::Buf,         // (N, Hq, D) after rope
    pub k: B::Buf,         // (N, Hkv, D) after rope
    pub v: B::Buf,         // (N, Hkv, D)
    pub att: B::Buf,       // (N, Hq, D)
    pub att_lse: B::Buf,   // (N, Hq)
    pub resid_mid: B::Buf, // (N, C)
    pub ln2: B::Buf,       // (N, C)
    pub ln2_rstd: B::Buf,  // (N)
    pub gate: B::Buf,      // (N, I)
    pub up: B::Buf,        // (N, I)
    pub act: B::Buf,       // (N, I)
}

impl<B: Backend> LayerActs<B> {
    fn new(b: &B, cfg: &ModelConfig, n: usize, input_only: bool) -> Result<Self> {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        // Activations in the compute type, statistics exact; empty when only the input is kept.
        let a = |len: usize| b.alloc_as(if input_only { 0 } else { len }, BufRole::Compute);
        let exact = |len: usize| b.alloc(if input_only { 0 } else { len });
        Ok(LayerActs {
            resid_in: b.alloc_as(n * c, BufRole::Compute)?,
            ln1: a(n * c)?,
            ln1_rstd: exact(n)?,
            q: a(n * cfg.q_dim())?,
            k: a(n * cfg.kv_dim())?,
            v: a(n * cfg.kv_dim())?,
            att: a(n * cfg.q_dim())?,
            att_lse: exact(n * cfg.num_heads)?,
            resid_mid: a(n * c)?,
            ln2: a(n * c)?,
            ln2_rstd: exact(n)?,
            gate: a(n * i)?,
            up: a(n * i)?,
            act: a(n * i)?,
        })
    }
}

/// Everything forward keeps for backward.
pub struct Activations<B: Backend> {
    pub n: usize,
    pub recompute: bool,
    /// Per layer; with `recompute` only `resid_in` is allocated.
    pub layers: Vec<LayerActs<B>>,
    /// Scratch for the layer being recomputed during backward (recompute only).
    scratch: Option<LayerActs<B>>,
    pub resid_final: B::Buf, // (N, C)
    pub lnf: B::Buf,         // (N, C)
    pub lnf_rstd: B::Buf,    // (N)
    pub logp: B::Buf,        // (N) log-prob of each row's target (0 where masked)
    pub lse: B::Buf,         // (N)
}

impl<B: Backend> Activations<B> {
    pub fn new(b: &B, cfg: &ModelConfig, n: usize, recompute: bool) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(Activations {
            n,
            recompute,
            layers: (0..cfg.num_layers).map(|_| LayerActs::new(b, cfg, n, recompute)).collect::<Result<_>>()?,
            scratch: if recompute { Some(LayerActs::new(b, cfg, n, false)?) } else { None },
            resid_final: b.alloc_as(n * c, BufRole::Compute)?,
            lnf: b.alloc_as(n * c, BufRole::Compute)?,
            lnf_rstd: b.alloc(n)?,
            logp: b.alloc(n)?,
            lse: b.alloc(n)?,
        })
    }
}

/// Gradient scratch for the activations of one layer (reused across layers).
struct GradScratch<B: Backend> {
    dresid: B::Buf, // (N, C) ∂L/∂(residual stream) at the current point
    dln: B::Buf,    // (N, C)
    datt: B::Buf,   // (N, Hq*D)
    dq: B::Buf,     // (N, Hq*D)
    dk: B::Buf,     // (N, Hkv*D)
    dv: B::Buf,     // (N, Hkv*D)
    dact: B::Buf,   // (N, I)
    dgate: B::Buf,  // (N, I)
    dup: B::Buf,    // (N, I)
}

/// Where a layer's attention reads keys and values from.
pub enum KvSource<'a, B: Backend> {
    /// Training / scoring: this batch's own k and v.
    Own,
    /// Generation: new k/v rows are written into the cache rows `rows` (N), then attention reads
    /// the cache with `seqs` (decode layout).
    Cache { k: &'a mut B::Buf, v: &'a mut B::Buf, rows: &'a [u32], seqs: &'a [AttnSeq] },
}

/// Per-layer key/value cache for generation: `rows` slots of (Hkv*D) each, laid out by the caller
/// (one contiguous region per sequence).
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Buf>, // per layer (rows, Hkv*D)
    pub v: Vec<B::Buf>, // per layer (rows, Hkv*D)
    pub rows: usize,
}

/// A decoder with its flat parameters on backend `B`.
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub ranges: DecoderRanges,
    pub params: B::Buf,
    rope_cos: B::Buf, // (P, D/2)
    rope_sin: B::Buf, // (P, D/2)
    rope_len: usize,
}

impl<B: Backend> Llama<B> {
    /// Loads `config.json` + safetensors from a Hugging Face model directory.
    pub fn load(b: &B, dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_model_dir(dir)?;
        let layout = ParamLayout::llama(&cfg);
        let flat = super::weights::load_flat_f32(dir, &layout, cfg.tie_word_embeddings)
            .with_context(|| format!("loading weights of {}", dir.display()))?;
        Self::from_flat(b, cfg, &flat)
    }

    pub fn from_flat(b: &B, cfg: ModelConfig, flat: &[f32]) -> Result<Self> {
        let layout = ParamLayout::llama(&cfg);
        ensure!(flat.len() == layout.total, "flat parameters hold {} values, the config needs {}", flat.len(), layout.total);
        let ranges = layout.decoder_ranges(&cfg);
        let params = b.upload_as(flat, BufRole::Param)?;
        let (rope_cos, rope_sin) = (b.alloc_as(0, BufRole::Compute)?, b.alloc_as(0, BufRole::Compute)?);
        let mut m = Llama { cfg, layout, ranges, params, rope_cos, rope_sin, rope_len: 0 };
        m.ensure_positions(b, 256)?;
        Ok(m)
    }

    /// Makes the rotary tables cover positions `0..n` (capped at the model's context length).
    pub fn ensure_positions(&mut self, b: &B, n: usize) -> Result<()> {
        let n = n.min(self.cfg.max_position_embeddings);
        if n <= self.rope_len {
            return Ok(());
        }
        let n = n.max(self.rope_len * 2).min(self.cfg.max_position_embeddings);
        let inv = self.cfg.rope_inv_freq();
        let half = inv.len();
        let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
        for p in 0..n {
            for (i, &f) in inv.iter().enumerate() {
                // transformers multiplies position and frequency in f32 before cos/sin.
                let angle = (p as f32 * f) as f64;
                cos[p * half + i] = angle.cos() as f32;
                sin[p * half + i] = angle.sin() as f32;
            }
        }
        // On a bf16 backend the tables are rounded to bf16, as transformers casts cos/sin to the
        // activations' dtype.
        self.rope_cos = b.upload_as(&cos, BufRole::Compute)?;
        self.rope_sin = b.upload_as(&sin, BufRole::Compute)?;
        self.rope_len = n;
        Ok(())
    }

    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.cfg.num_heads,
            n_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            scale: 1.0 / (self.cfg.head_dim as f32).sqrt(),
            mask: AttnMask::Causal { window: self.cfg.sliding_window },
        }
    }

    /// The LM head's range in the flat parameters; an error for a sequence classifier.
    pub fn lm_head(&self) -> Result<std::ops::Range<usize>> {
        self.ranges.lm_head.clone().with_context(|| {
            format!(
                "this model is a sequence classifier (`score.weight`, {} labels) and has no LM head",
                self.cfg.num_labels.unwrap_or(0)
            )
        })
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = batch.len();
        ensure!(n > 0, "empty batch");
        ensure!(batch.positions.len() == n && batch.targets.len() == n, "batch rows disagree");
        if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            bail!("token id {t} is outside the model's vocabulary of {}", self.cfg.vocab_size);
        }
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.cfg.max_position_embeddings {
                bail!(
                    "position {p} is beyond the model's context of {} tokens (max_position_embeddings): shorten the prompt or the response",
                    self.cfg.max_position_embeddings
                );
            }
            ensure!((p as usize) < self.rope_len, "rotary tables cover {} positions, need {}: call ensure_positions", self.rope_len, p + 1);
        }
        Ok(())
    }

    /// Embedding + all layers + final norm: leaves the normed hidden states in `acts.lnf`.
    pub fn forward_hidden(&self, b: &B, batch: &Batch, acts: &mut Activations<B>) -> Result<()> {
        b.enter(|| self.forward_hidden_ops(b, batch, acts))
    }

    fn forward_hidden_ops(&self, b: &B, batch: &Batch, acts: &mut Activations<B>) -> Result<()> {
        let _r = nvtx::range("llama forward");
        self.check_batch(batch)?;
        ensure!(acts.n == batch.len(), "activations sized for {} rows, batch has {}", acts.n, batch.len());
        let c = self.cfg.hidden_size;
        let p = &self.params;
        b.embedding_forward(b.full_mut(&mut acts.layers[0].resid_in), b.view(p, self.ranges.embed_tokens.clone()), &batch.tokens, c)?;
        let nl = self.cfg.num_layers;
        for l in 0..nl {
            let (cur, rest) = acts.layers.split_at_mut(l + 1);
            let la = &mut cur[l];
            let out = if l + 1 < nl { &mut rest[0].resid_in } else { &mut acts.resid_final };
            match acts.scratch.as_mut() {
                // Recompute mode: run the layer in scratch, keep only its input (already in `la`).
                Some(s) => {
                    std::mem::swap(&mut s.resid_in, &mut la.resid_in);
                    let r = self.layer_forward(b, l, s, out, batch, KvSource::Own);
                    std::mem::swap(&mut s.resid_in, &mut la.resid_in);
                    r?
                }
                None => self.layer_forward(b, l, la, out, batch, KvSource::Own)?,
            }
        }
        b.rmsnorm_forward(
            b.full_mut(&mut acts.lnf),
            b.full_mut(&mut acts.lnf_rstd),
            b.full(&acts.resid_final),
            b.view(p, self.ranges.norm.clone()),
            c,
            self.cfg.rms_norm_eps,
        )
    }

    /// Training/scoring forward: hidden states, then each row's target log-prob in `acts.logp`.
    pub fn forward(&self, b: &B, batch: &Batch, acts: &mut Activations<B>) -> Result<()> {
        let lm_head = self.lm_head()?;
        self.forward_hidden(b, batch, acts)?;
        b.token_logprobs_forward(
            b.full_mut(&mut acts.logp),
            b.full_mut(&mut acts.lse),
            b.full(&acts.lnf),
            b.view(&self.params, lm_head),
            &batch.targets,
            self.cfg.hidden_size,
            self.cfg.vocab_size,
        )
    }

    /// Per-sequence summed response log-probs after [`forward`](Self::forward), summed in f64.
    pub fn sequence_logprobs(&self, b: &B, batch: &Batch, acts: &Activations<B>) -> Result<Vec<f64>> {
        let logp = b.download(&acts.logp)?;
        let mut sums = vec![0f64; batch.num_seqs()];
        for (t, &lp) in logp.iter().enumerate() {
            if batch.targets[t] != IGNORE_TARGET {
                sums[batch.row_seq[t] as usize] += lp as f64;
            }
        }
        Ok(sums)
    }

    /// Full logits (N, V) from the hidden states in `acts.lnf` (tests, small batches).
    pub fn logits(&self, b: &B, acts: &Activations<B>) -> Result<Vec<f32>> {
        let lm_head = self.lm_head()?;
        let mut out = b.alloc(acts.n * self.cfg.vocab_size)?;
        b.matmul_forward(b.full_mut(&mut out), b.full(&acts.lnf), b.view(&self.params, lm_head), self.cfg.hidden_size, self.cfg.vocab_size)?;
        b.download(&out)
    }

    /// Logits (M, T) of the rows `rows` of `acts.lnf` for the vocabulary entries `vocab_ids` only:
    /// a judge reading two answer letters needs 2 of V columns, on one row per sequence.
    pub fn lm_head_logits_at(&self, b: &B, acts: &Activations<B>, rows: &[u32], vocab_ids: &[u32]) -> Result<Vec<f32>> {
        let lm_head = self.lm_head()?;
        let c = self.cfg.hidden_size;
        if let Some(&v) = vocab_ids.iter().find(|&&v| v as usize >= self.cfg.vocab_size) {
            bail!("token id {v} is outside the model's vocabulary of {}", self.cfg.vocab_size);
        }
        let mut w = b.alloc_as(vocab_ids.len() * c, BufRole::Compute)?; // (T, C)
        b.gather_rows(b.full_mut(&mut w), b.view(&self.params, lm_head), vocab_ids, c)?;
        self.project_rows(b, acts, rows, b.full(&w), vocab_ids.len())
    }

    /// Sequence-classifier logits (M, num_labels) of the rows `rows` of `acts.lnf`, as
    /// transformers' `GenericForSequenceClassification` applies `score` before pooling. Which row
    /// a sequence is pooled at is the caller's choice (see `oracle::reward::pooled_position`).
    pub fn score_rows(&self, b: &B, acts: &Activations<B>, rows: &[u32]) -> Result<Vec<f32>> {
        let (Some(score), Some(n)) = (self.ranges.score.clone(), self.cfg.num_labels) else {
            bail!("this model is a causal LM without a score head (`score.weight`); sequence scores need a *ForSequenceClassification checkpoint");
        };
        self.project_rows(b, acts, rows, b.view(&self.params, score), n)
    }

    /// `lnf[rows] · weightᵀ`: (M, C) × (out_dim, C)ᵀ → (M, out_dim), downloaded.
    fn project_rows(&self, b: &B, acts: &Activations<B>, rows: &[u32], weight: B::View<'_>, out_dim: usize) -> Result<Vec<f32>> {
        let c = self.cfg.hidden_size;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= acts.n) {
            bail!("row {r} is outside the activations of {} rows", acts.n);
        }
        let mut picked = b.alloc_as(rows.len() * c, BufRole::Compute)?; // (M, C)
        b.gather_rows(b.full_mut(&mut picked), b.full(&acts.lnf), rows, c)?;
        let mut out = b.alloc(rows.len() * out_dim)?; // (M, out_dim)
        b.matmul_forward(b.full_mut(&mut out), b.full(&picked), weight, c, out_dim)?;
        b.download(&out)
    }

    /// One decoder layer: reads `la.resid_in`, fills `la`, writes the layer output to `out`.
    pub fn layer_forward(&self, b: &B, l: usize, la: &mut LayerActs<B>, out: &mut B::Buf, batch: &Batch, kv: KvSource<'_, B>) -> Result<()> {
        let _r = nvtx::range_fmt(format_args!("layer {l} forward"));
        let cfg = &self.cfg;
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let w: &LayerRanges = &self.ranges.layers[l];
        let p = &self.params;
        let pv = |r: &std::ops::Range<usize>| b.view(p, r.clone());

        // attention block
        b.rmsnorm_forward(b.full_mut(&mut la.ln1), b.full_mut(&mut la.ln1_rstd), b.full(&la.resid_in), pv(&w.input_layernorm), c, cfg.rms_norm_eps)?;
        let qkv = vec![(b.full_mut(&mut la.q), pv(&w.q_proj), qd), (b.full_mut(&mut la.k), pv(&w.k_proj), kvd), (b.full_mut(&mut la.v), pv(&w.v_proj), kvd)];
        b.matmul_forward_many(qkv, b.full(&la.ln1), c)?;
        let (cos, sin) = (b.full(&self.rope_cos), b.full(&self.rope_sin));
        b.rope_forward(b.full_mut(&mut la.q), cos, sin, &batch.positions, cfg.num_heads, cfg.head_dim)?;
        b.rope_forward(b.full_mut(&mut la.k), cos, sin, &batch.positions, cfg.num_kv_heads, cfg.head_dim)?;
        let shape = self.attn_shape();
        match kv {
            KvSource::Own => b.attention_forward(
                b.full_mut(&mut la.att),
                b.full_mut(&mut la.att_lse),
                b.full(&la.q),
                b.full(&la.k),
                b.full(&la.v),
                &batch.seqs,
                &shape,
            )?,
            KvSource::Cache { k, v, rows, seqs } => {
                b.scatter_rows(b.full_mut(k), b.full(&la.k), rows, kvd)?;
                b.scatter_rows(b.full_mut(v), b.full(&la.v), rows, kvd)?;
                b.attention_forward(b.full_mut(&mut la.att), b.full_mut(&mut la.att_lse), b.full(&la.q), b.full(k), b.full(v), seqs, &shape)?
            }
        }
        b.matmul_forward(b.full_mut(&mut la.resid_mid), b.full(&la.att), pv(&w.o_proj), qd, c)?;
        b.add_inplace(b.full_mut(&mut la.resid_mid), b.full(&la.resid_in))?;

        // MLP block
        b.rmsnorm_forward(b.full_mut(&mut la.ln2), b.full_mut(&mut la.ln2_rstd), b.full(&la.resid_mid), pv(&w.post_attention_layernorm), c, cfg.rms_norm_eps)?;
        b.matmul_forward_many(vec![(b.full_mut(&mut la.gate), pv(&w.gate_proj), i), (b.full_mut(&mut la.up), pv(&w.up_proj), i)], b.full(&la.ln2), c)?;
        b.swiglu_forward(b.full_mut(&mut la.act), b.full(&la.gate), b.full(&la.up))?;
        b.matmul_forward(b.full_mut(out), b.full(&la.act), pv(&w.down_proj), i, c)?;
        b.add_inplace(b.full_mut(out), b.full(&la.resid_mid))
    }

    pub fn alloc_kv_cache(&self, b: &B, rows: usize) -> Result<KvCache<B>> {
        let kvd = self.cfg.kv_dim();
        let mk = || (0..self.cfg.num_layers).map(|_| b.alloc_as(rows * kvd, BufRole::Compute)).collect::<Result<Vec<_>>>();
        Ok(KvCache { k: mk()?, v: mk()?, rows })
    }

    /// [`Self::forward_cached_logits`], downloaded: (logit_rows.len(), vocab) on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached(
        &self,
        b: &B,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache<B>,
        cache_rows: &[u32],
        seqs: &[AttnSeq],
        logit_rows: &[u32],
    ) -> Result<Vec<f32>> {
        let logits = self.forward_cached_logits(b, tokens, positions, cache, cache_rows, seqs, logit_rows)?;
        b.download(&logits)
    }

    /// Inference step over a KV cache: runs `tokens` (at `positions`, written to cache rows
    /// `cache_rows`), attends with `seqs` (decode layout over the cache), and returns the logits
    /// (len(logit_rows), V) of the rows `logit_rows` (each sequence's last row).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached_logits(
        &self,
        b: &B,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache<B>,
        cache_rows: &[u32],
        seqs: &[AttnSeq],
        logit_rows: &[u32],
    ) -> Result<B::Buf> {
        let _r = nvtx::range("llama forward (KV cache)");
        let lm_head = self.lm_head()?;
        let n = tokens.len();
        let batch = Batch {
            tokens: tokens.to_vec(),
            positions: positions.to_vec(),
            seqs: vec![],
            targets: vec![IGNORE_TARGET; n],
            row_seq: vec![0; n],
        };
        self.check_batch(&batch)?;
        ensure!(cache_rows.len() == n, "{} cache rows for {n} tokens", cache_rows.len());
        if let Some(&r) = cache_rows.iter().find(|&&r| r as usize >= cache.rows) {
            bail!("cache row {r} is outside the KV cache of {} rows", cache.rows);
        }
        let c = self.cfg.hidden_size;
        let mut la = LayerActs::new(b, &self.cfg, n, false)?;
        let mut out = b.alloc_as(n * c, BufRole::Compute)?;
        b.embedding_forward(b.full_mut(&mut la.resid_in), b.view(&self.params, self.ranges.embed_tokens.clone()), tokens, c)?;
        for l in 0..self.cfg.num_layers {
            let kv = KvSource::Cache { k: &mut cache.k[l], v: &mut cache.v[l], rows: cache_rows, seqs };
            self.layer_forward(b, l, &mut la, &mut out, &batch, kv)?;
            std::mem::swap(&mut la.resid_in, &mut out);
        }
        let m = logit_rows.len();
        let mut last = b.alloc_as(m * c, BufRole::Compute)?;
        b.gather_rows(b.full_mut(&mut last), b.full(&la.resid_in), logit_rows, c)?;
        let (mut normed, mut rstd) = (b.alloc_as(m * c, BufRole::Compute)?, b.alloc(m)?);
        b.rmsnorm_forward(b.full_mut(&mut normed), b.full_mut(&mut rstd), b.full(&last), b.view(&self.params, self.ranges.norm.clone()), c, self.cfg.rms_norm_eps)?;
        let mut logits = b.alloc(m * self.cfg.vocab_size)?;
        b.matmul_forward(b.full_mut(&mut logits), b.full(&normed), b.view(&self.params, lm_head), c, self.cfg.vocab_size)?;
        Ok(logits)
    }

    /// A zeroed gradient buffer with the parameter layout.
    pub fn alloc_grads(&self, b: &B) -> Result<B::Buf> {
        b.alloc(self.layout.total)
    }

    /// Backward of `L = Σ_s dseq[s] · (summed response log-prob of sequence s)`: parameter
    /// gradients are ADDED to `grads` (micro-batches accumulate). `acts` must hold this batch's
    /// forward.
    pub fn backward(&self, b: &B, batch: &Batch, acts: &mut Activations<B>, dseq: &[f32], grads: &mut B::Buf) -> Result<()> {
        b.enter(|| self.backward_ops(b, batch, acts, dseq, grads))
    }

    fn backward_ops(&self, b: &B, batch: &Batch, acts: &mut Activations<B>, dseq: &[f32], grads: &mut B::Buf) -> Result<()> {
        let _r = nvtx::range("llama backward");
        ensure!(dseq.len() == batch.num_seqs(), "{} sequence gradients for {} sequences", dseq.len(), batch.num_seqs());
        ensure!(b.len(grads) == self.layout.total, "gradient buffer has {} values, parameters {}", b.len(grads), self.layout.total);
        let cfg = &self.cfg;
        let n = batch.len();
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let p = &self.params;
        let r = &self.ranges;
        let lm_head = self.lm_head()?;
        let dlogp_host: Vec<f32> = (0..n)
            .map(|t| if batch.targets[t] == IGNORE_TARGET { 0.0 } else { dseq[batch.row_seq[t] as usize] })
            .collect();
        let dlogp = b.upload(&dlogp_host)?;
        let a = |len: usize| b.alloc_as(len, BufRole::Compute);
        let mut g = GradScratch::<B> {
            dresid: a(n * c)?,
            dln: a(n * c)?,
            datt: a(n * qd)?,
            dq: a(n * qd)?,
            dk: a(n * kvd)?,
            dv: a(n * kvd)?,
            dact: a(n * i)?,
            dgate: a(n * i)?,
            dup: a(n * i)?,
        };

        // LM head + log-probs, then the final norm.
        b.token_logprobs_backward(
            b.full_mut(&mut g.dln),
            b.view_mut(grads, lm_head.clone()),
            b.full(&dlogp),
            b.full(&acts.lnf),
            b.view(p, lm_head),
            b.full(&acts.lse),
            &batch.targets,
            c,
            cfg.vocab_size,
        )?;
        b.fill(b.full_mut(&mut g.dresid), 0.0)?;
        b.rmsnorm_backward(
            b.full_mut(&mut g.dresid),
            b.view_mut(grads, r.norm.clone()),
            b.full(&g.dln),
            b.full(&acts.resid_final),
            b.view(p, r.norm.clone()),
            b.full(&acts.lnf_rstd),
            c,
        )?;

        // Recompute mode: a sink for the recomputed layer output (not needed, already known).
        let mut sink = if acts.scratch.is_some() { Some(b.alloc_as(n * c, BufRole::Compute)?) } else { None };
        for l in (0..cfg.num_layers).rev() {
            match (acts.scratch.as_mut(), sink.as_mut()) {
                (Some(s), Some(sink)) => {
                    // Rebuild this layer's activations from its saved input, then differentiate.
                    std::mem::swap(&mut s.resid_in, &mut acts.layers[l].resid_in);
                    let res = self
                        .layer_forward(b, l, s, sink, batch, KvSource::Own)
                        .and_then(|_| self.layer_backward(b, l, s, &mut g, grads, batch));
                    std::mem::swap(&mut s.resid_in, &mut acts.layers[l].resid_in);
                    res?;
                }
                _ => self.layer_backward(b, l, &acts.layers[l], &mut g, grads, batch)?,
            }
        }
        b.embedding_backward(b.view_mut(grads, r.embed_tokens.clone()), b.full(&g.dresid), &batch.tokens, c)
    }

    /// Backward of one layer: on entry `g.dresid` is ∂L/∂(layer output); on exit ∂L/∂(layer input).
    fn layer_backward(&self, b: &B, l: usize, la: &LayerActs<B>, g: &mut GradScratch<B>, grads: &mut B::Buf, batch: &Batch) -> Result<()> {
        let _r = nvtx::range_fmt(format_args!("layer {l} backward"));
        let cfg = &self.cfg;
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let w = &self.ranges.layers[l];
        let p = &self.params;
        let pv = |r: &std::ops::Range<usize>| b.view(p, r.clone());

        // MLP block: out = mid + act·Wdᵀ (the residual passes dresid through unchanged).
        b.matmul_backward_weight(b.view_mut(grads, w.down_proj.clone()), b.full(&g.dresid), b.full(&la.act), i, c)?;
        b.matmul_backward_input(b.full_mut(&mut g.dact), b.full(&g.dresid), pv(&w.down_proj), i, c, false)?;
        b.swiglu_backward(b.full_mut(&mut g.dgate), b.full_mut(&mut g.dup), b.full(&g.dact), b.full(&la.gate), b.full(&la.up))?;
        b.matmul_backward_weight(b.view_mut(grads, w.gate_proj.clone()), b.full(&g.dgate), b.full(&la.ln2), c, i)?;
        b.matmul_backward_weight(b.view_mut(grads, w.up_proj.clone()), b.full(&g.dup), b.full(&la.ln2), c, i)?;
        b.matmul_backward_input(b.full_mut(&mut g.dln), b.full(&g.dgate), pv(&w.gate_proj), c, i, false)?;
        b.matmul_backward_input(b.full_mut(&mut g.dln), b.full(&g.dup), pv(&w.up_proj), c, i, true)?;
        b.rmsnorm_backward(
            b.full_mut(&mut g.dresid),
            b.view_mut(grads, w.post_attention_layernorm.clone()),
            b.full(&g.dln),
            b.full(&la.resid_mid),
            pv(&w.post_attention_layernorm),
            b.full(&la.ln2_rstd),
            c,
        )?;

        // Attention block: mid = x + att·Woᵀ.
        b.matmul_backward_weight(b.view_mut(grads, w.o_proj.clone()), b.full(&g.dresid), b.full(&la.att), qd, c)?;
        b.matmul_backward_input(b.full_mut(&mut g.datt), b.full(&g.dresid), pv(&w.o_proj), qd, c, false)?;
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
        let (cos, sin) = (b.full(&self.rope_cos), b.full(&self.rope_sin));
        b.rope_backward(b.full_mut(&mut g.dq), cos, sin, &batch.positions, cfg.num_heads, cfg.head_dim)?;
        b.rope_backward(b.full_mut(&mut g.dk), cos, sin, &batch.positions, cfg.num_kv_heads, cfg.head_dim)?;
        b.matmul_backward_weight(b.view_mut(grads, w.q_proj.clone()), b.full(&g.dq), b.full(&la.ln1), c, qd)?;
        b.matmul_backward_weight(b.view_mut(grads, w.k_proj.clone()), b.full(&g.dk), b.full(&la.ln1), c, kvd)?;
        b.matmul_backward_weight(b.view_mut(grads, w.v_proj.clone()), b.full(&g.dv), b.full(&la.ln1), c, kvd)?;
        b.matmul_backward_input(b.full_mut(&mut g.dln), b.full(&g.dq), pv(&w.q_proj), c, qd, false)?;
        b.matmul_backward_input(b.full_mut(&mut g.dln), b.full(&g.dk), pv(&w.k_proj), c, kvd, true)?;
        b.matmul_backward_input(b.full_mut(&mut g.dln), b.full(&g.dv), pv(&w.v_proj), c, kvd, true)?;
        b.rmsnorm_backward(
            b.full_mut(&mut g.dresid),
            b.view_mut(grads, w.input_layernorm.clone()),
            b.full(&g.dln),
            b.full(&la.resid_in),
            pv(&w.input_layernorm),
            b.full(&la.ln1_rstd),
            c,
        )
    }

    /// Writes a Hugging Face checkpoint atomically (built in a temporary sibling directory, then
    /// renamed): `model.safetensors` in `dtype`, the `config.json` of `source_dir` with its dtype
    /// updated (or one generated from the resolved config), and the tokenizer, chat-template and
    /// generation files copied from `source_dir`.
    pub fn save_pretrained(&self, b: &B, out: &Path, source_dir: Option<&Path>, dtype: super::weights::SaveDtype) -> Result<()> {
        let flat = b.download(&self.params)?;
        crate::io::write_dir_atomic(out, |dir| {
            super::weights::save_flat(dir, &self.layout, &flat, dtype)?;
            let mut config = match source_dir.map(|d| d.join("config.json")).filter(|p| p.exists()) {
                Some(p) => serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&p)?)
                    .with_context(|| format!("{}: malformed JSON", p.display()))?,
                None => self.cfg.to_hf_json(),
            };
            if let Some(obj) = config.as_object_mut() {
                // Whichever key the source used (classic `torch_dtype`, transformers-5 `dtype`).
                let key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
                obj.insert(key.into(), dtype.torch_name().into());
            }
            crate::io::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
            if let Some(src) = source_dir {
                for f in [
                    "generation_config.json",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "chat_template.jinja",
                    "tokenizer.model",
                ] {
                    let p = src.join(f);
                    if p.exists() {
                        std::fs::copy(&p, dir.join(f)).with_context(|| format!("copying {}", p.display()))?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Downloads the flat parameters (f32; a bf16 backend's master weights).
    pub fn params_host(&self, b: &B) -> Result<Vec<f32>> {
        b.download(&self.params)
    }
}
