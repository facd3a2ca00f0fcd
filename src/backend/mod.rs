//! The backend interface: one method per kernel concern. The model (`src/model/`) is written once
//! against this trait; `cpu` is the f32 reference every other backend is tested against, and the
//! CUDA backend (`cuda`) implements the same methods with the kernels of `kernels/*.cu`.
//!
//! Conventions (all backends):
//! - Buffers are flat; a tensor is a view (a range of elements) of one. Shapes are row-major and
//!   written beside each argument: `(N, C)` means N rows of C contiguous elements.
//! - N is the number of tokens in a packed batch: sequences of different lengths are laid end to
//!   end, no padding; [`AttnSeq`] says where each sequence's queries and keys are.
//! - Linear weights use the Hugging Face layout `(out_features, in_features)`: `y = x · Wᵀ`.
//! - Methods that produce parameter gradients ACCUMULATE (`+=`) so micro-batches sum their
//!   gradients; methods that produce activation gradients say whether they overwrite or add.
//! - Host slices (`&[u32]`, `&[AttnSeq]`) carry small per-batch metadata; a GPU backend uploads them.
//! - Storage may be narrower than f32 for some buffers ([`BufRole`], [`Precision`]); host data is
//!   f32 at the boundary (`upload`, `download`, `write`) whatever the storage.

pub mod cpu;
pub mod cuda;

use anyhow::Result;

/// One sequence's slice of a packed attention call.
///
/// Queries are rows `q_start .. q_start + q_len` of the query buffer; keys/values are rows
/// `k_start .. k_start + k_len` of the key/value buffers. The queries are the LAST `q_len`
/// positions of the `k_len` keys: query `i` sits at position `k_len - q_len + i` of its sequence
/// (training and prefill: `q_len == k_len`; decoding against a KV cache: `q_len` new tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnSeq {
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

/// Which keys a query may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnMask {
    /// Decoder: key position `j <= i` (query position `i`), and `j > i - window` when a sliding
    /// window is set (Mistral: a query sees itself and the `window - 1` keys before it).
    Causal { window: Option<usize> },
    /// Encoder (BERT): every key of the sequence. Padding is expressed by packing (no pad rows).
    Bidirectional,
}

/// Shapes of one attention call. `q`: (Nq, n_heads, head_dim); `k`, `v`: (Nk, n_kv_heads, head_dim);
/// query head `h` reads key/value head `h / (n_heads / n_kv_heads)` (grouped-query attention,
/// without replicating K/V).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    pub mask: AttnMask,
}

/// Target for log-prob gathering: `targets[t] < 0` masks row `t` (prompt tokens, padding).
pub const IGNORE_TARGET: i32 = -1;

pub trait Backend: Sized + Sync {
    /// A flat buffer of elements on the backend's device (f32 on the CPU).
    type Buf: Send + Sync;
    type View<'a>: Copy
    where
        Self: 'a;
    type ViewMut<'a>
    where
        Self: 'a;

    fn name(&self) -> &'static str;

    /// Runs `f` as this backend's own work: the CPU backend runs it on a thread of its pool, so
    /// the ops inside call their parallel loops from a worker instead of handing each one to the
    /// pool and sleeping until it ends (a decode step has hundreds of small ops: the handoffs
    /// cost more than the work). Wrap loops of many small ops in it; nesting is free.
    fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Generation is about to read `params` (the model's whole flat parameter buffer) without
    /// changing it until [`Backend::end_decode`]. The backend may keep a compact copy for the
    /// generation's products: with `round` false only one that gives exactly the same values,
    /// with `round` true the Linear weights rounded to bf16. Returns what it keeps, for logs.
    fn begin_decode(&self, _params: Self::View<'_>, _round: bool) -> Result<Option<String>> {
        Ok(None)
    }
    /// Drops what [`Backend::begin_decode`] kept.
    fn end_decode(&self) {}

    /// One token per row of `logits` (rows, vocab) by the sampler of `crate::sampling` with row
    /// r's uniform `uniforms[r]`: the same procedure everywhere, so the same tokens. The default
    /// downloads the rows and samples on the host (`scratch` keeps its buffers between calls);
    /// the CUDA backend samples on the GPU (`kernels/sampling.cu`).
    fn sample_rows(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        uniforms: &[f32],
        params: &crate::sampling::SamplingParams,
        scratch: &mut crate::sampling::SamplerScratch,
    ) -> Result<Vec<u32>> {
        let host = self.download(logits)?;
        anyhow::ensure!(
            host.len() == uniforms.len() * vocab,
            "sample_rows: {} logits for {} rows of {vocab}",
            host.len(),
            uniforms.len()
        );
        host.chunks_exact(vocab.max(1)).zip(uniforms).map(|(row, &u)| crate::sampling::sample(row, params, u, scratch)).collect()
    }

    // ---- memory ----
    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Copies `host` into `buf[offset..offset + host.len()]`.
    fn write(&self, buf: &mut Self::Buf, offset: usize, host: &[f32]) -> Result<()>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn fill(&self, buf: Self::ViewMut<'_>, value: f32) -> Result<()>;
    fn view<'a>(&self, buf: &'a Self::Buf, range: std::ops::Range<usize>) -> Self::View<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, range: std::ops::Range<usize>) -> Self::ViewMut<'a>;
    fn full<'a>(&self, buf: &'a Self::Buf) -> Self::View<'a> {
        let n = self.len(buf);
        self.view(buf, 0..n)
    }
    fn full_mut<'a>(&self, buf: &'a mut Self::Buf) -> Self::ViewMut<'a> {
        let n = self.len(buf);
        self.view_mut(buf, 0..n)
    }

    // ---- elementwise ----
    /// `out = a + b` (all the same length).
    fn add(&self, out: Self::ViewMut<'_>, a: Self::View<'_>, b: Self::View<'_>) -> Result<()>;
    /// `acc += x`.
    fn add_inplace(&self, acc: Self::ViewMut<'_>, x: Self::View<'_>) -> Result<()>;
    /// `dst[index[r]] = src[r]` row by row; rows have `width` elements (KV-cache appends).
    fn scatter_rows(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>, index: &[u32], width: usize) -> Result<()>;
    /// `dst[r] = src[index[r]]` row by row (picking the last row of each sequence for logits).
    fn gather_rows(&self, dst: Self::ViewMut<'_>, src: Self::View<'_>, index: &[u32], width: usize) -> Result<()>;

    // ---- embedding ----
    /// `out[t] = table[ids[t]]`. out: (N, C), table: (V, C).
    fn embedding_forward(&self, out: Self::ViewMut<'_>, table: Self::View<'_>, ids: &[u32], dim: usize) -> Result<()>;
    /// `dtable[ids[t]] += dout[t]` (scatter-add; repeated ids accumulate).
    fn embedding_backward(&self, dtable: Self::ViewMut<'_>, dout: Self::View<'_>, ids: &[u32], dim: usize) -> Result<()>;

    // ---- RMSNorm (Llama): out = inp * rstd * weight, rstd = 1/sqrt(mean(inp²) + eps) ----
    /// out: (N, C), rstd: (N) saved for backward, inp: (N, C), weight: (C).
    fn rmsnorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        dim: usize,
        eps: f32,
    ) -> Result<()>;
    /// `dinp += ∂L/∂inp`, `dweight += ∂L/∂weight` given dout: (N, C).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        rstd: Self::View<'_>,
        dim: usize,
    ) -> Result<()>;

    // ---- matrix products (HF Linear layout) ----
    /// `out (N, OC) = inp (N, IC) · weightᵀ`, weight: (OC, IC). Overwrites `out`.
    fn matmul_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>, weight: Self::View<'_>, in_dim: usize, out_dim: usize) -> Result<()>;
    /// Several products of one input, `out (N, OC) = inp (N, IC) · weightᵀ` for each (out,
    /// weight, OC) of `products` (Q/K/V, gate/up), each output exactly as `matmul_forward` gives
    /// it. Default: one `matmul_forward` each; the CPU backend runs a decode step's products as
    /// one pass over their weights.
    fn matmul_forward_many<'o, 'w, 'x>(&self, products: Vec<(Self::ViewMut<'o>, Self::View<'w>, usize)>, inp: Self::View<'x>, in_dim: usize) -> Result<()>
    where
        Self: 'o + 'w + 'x,
    {
        for (out, weight, out_dim) in products {
            self.matmul_forward(out, inp, weight, in_dim, out_dim)?;
        }
        Ok(())
    }
    /// `dinp (N, IC) (+)= dout (N, OC) · weight (OC, IC)`; `accumulate` false overwrites.
    fn matmul_backward_input(
        &self,
        dinp: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        weight: Self::View<'_>,
        in_dim: usize,
        out_dim: usize,
        accumulate: bool,
    ) -> Result<()>;
    /// `dweight (OC, IC) += doutᵀ (OC, N) · inp (N, IC)`.
    fn matmul_backward_weight(&self, dweight: Self::ViewMut<'_>, dout: Self::View<'_>, inp: Self::View<'_>, in_dim: usize, out_dim: usize) -> Result<()>;

    // ---- rotary embedding (rotate-half layout, as Hugging Face Llama) ----
    /// In place on x: (N, n_heads, head_dim). For row t at position p = positions[t] and pair
    /// i < head_dim/2: (x_i, x_{i+d/2}) ← (x_i cos − x_{i+d/2} sin, x_{i+d/2} cos + x_i sin) with
    /// cos = cos[p, i], sin = sin[p, i]; cos, sin: (P, head_dim/2) tables built by the model
    /// (theta and scaling live there, not in kernels).
    fn rope_forward(&self, x: Self::ViewMut<'_>, cos: Self::View<'_>, sin: Self::View<'_>, positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()>;
    /// In place on the gradient: the transpose rotation (sin negated).
    fn rope_backward(&self, dx: Self::ViewMut<'_>, cos: Self::View<'_>, sin: Self::View<'_>, positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()>;

    // ---- attention ----
    /// out: (Nq, n_heads, head_dim) overwritten; lse: (Nq, n_heads) natural-log sum of exp of the
    /// scaled scores of each query row, saved for backward. Every query must see at least one key.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()>;
    /// Gradients of attention_forward (training layout, `q_len == k_len` per sequence):
    /// dq: (N, n_heads, head_dim), dk, dv: (N, n_kv_heads, head_dim), all OVERWRITTEN.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: Self::ViewMut<'_>,
        dk: Self::ViewMut<'_>,
        dv: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        q: Self::View<'_>,
        k: Self::View<'_>,
        v: Self::View<'_>,
        out: Self::View<'_>,
        lse: Self::View<'_>,
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()>;

    // ---- SwiGLU MLP activation: out = silu(gate) * up ----
    /// out, gate, up: (N, I).
    fn swiglu_forward(&self, out: Self::ViewMut<'_>, gate: Self::View<'_>, up: Self::View<'_>) -> Result<()>;
    /// dgate, dup OVERWRITTEN from dout.
    fn swiglu_backward(&self, dgate: Self::ViewMut<'_>, dup: Self::ViewMut<'_>, dout: Self::View<'_>, gate: Self::View<'_>, up: Self::View<'_>) -> Result<()>;

    // ---- LM head fused with log-prob gathering ----
    /// For each row t with `targets[t] >= 0`: logp[t] = log softmax(hidden[t] · weightᵀ)[targets[t]]
    /// and lse[t] = logsumexp of that row's logits; masked rows get logp = 0, lse = 0.
    /// hidden: (N, C), weight: (V, C). Implementations work in chunks of rows so the full
    /// (N, V) logits are never materialised.
    #[allow(clippy::too_many_arguments)]
    fn token_logprobs_forward(
        &self,
        logp: Self::ViewMut<'_>,
        lse: Self::ViewMut<'_>,
        hidden: Self::View<'_>,
        weight: Self::View<'_>,
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()>;
    /// Given dlogp: (N) (the loss gradient w.r.t. each row's logp; masked rows ignored):
    /// dhidden (N, C) OVERWRITTEN, dweight (V, C) += . Uses ∂logp/∂logits = onehot(target) − softmax.
    #[allow(clippy::too_many_arguments)]
    fn token_logprobs_backward(
        &self,
        dhidden: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dlogp: Self::View<'_>,
        hidden: Self::View<'_>,
        weight: Self::View<'_>,
        lse: Self::View<'_>,
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()>;

    // ==== encoder ops (BERT, for the similarity oracle): LayerNorm, exact GELU, Linear bias ====
    // One contiguous block so parallel additions to this trait merge cleanly.

    /// Two mutable views of disjoint ranges of one buffer (LayerNorm's weight and bias gradients
    /// live side by side in the flat gradient buffer). Panics when the ranges overlap or fall
    /// outside the buffer, as [`view_mut`](Self::view_mut) does: ranges come from a layout.
    fn view_mut_pair<'a>(
        &self,
        buf: &'a mut Self::Buf,
        a: std::ops::Range<usize>,
        b: std::ops::Range<usize>,
    ) -> (Self::ViewMut<'a>, Self::ViewMut<'a>);

    // ---- LayerNorm (BERT, post-norm): out = (inp − mean) · rstd · weight + bias ----
    /// out: (N, C); mean, rstd: (N) saved for backward (rstd = 1/sqrt(biased var + eps));
    /// inp: (N, C); weight, bias: (C).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: Self::ViewMut<'_>,
        mean: Self::ViewMut<'_>,
        rstd: Self::ViewMut<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        bias: Self::View<'_>,
        dim: usize,
        eps: f32,
    ) -> Result<()>;
    /// `dinp += ∂L/∂inp`, `dweight += ∂L/∂weight`, `dbias += ∂L/∂bias` given dout: (N, C).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: Self::ViewMut<'_>,
        dweight: Self::ViewMut<'_>,
        dbias: Self::ViewMut<'_>,
        dout: Self::View<'_>,
        inp: Self::View<'_>,
        weight: Self::View<'_>,
        mean: Self::View<'_>,
        rstd: Self::View<'_>,
        dim: usize,
    ) -> Result<()>;

    // ---- GELU, exact erf form (`hidden_act: "gelu"`): out = x · ½(1 + erf(x/√2)) ----
    /// out, inp: (N·I) elementwise.
    fn gelu_forward(&self, out: Self::ViewMut<'_>, inp: Self::View<'_>) -> Result<()>;
    /// dinp OVERWRITTEN with dout · gelu'(inp).
    fn gelu_backward(&self, dinp: Self::ViewMut<'_>, dout: Self::View<'_>, inp: Self::View<'_>) -> Result<()>;

    // ---- Linear bias (kept out of matmul so the GEMM stays a plain product) ----
    /// `out (N, C) += bias (C)` on every row.
    fn bias_add(&self, out: Self::ViewMut<'_>, bias: Self::View<'_>) -> Result<()>;
    /// `dbias (C) += Σ_rows dout (N, C)`.
    fn bias_backward(&self, dbias: Self::ViewMut<'_>, dout: Self::View<'_>) -> Result<()>;
    // ==== end of encoder ops ====
    // ==== optimizer over flat buffers (begin; train/optim.rs drives these) ====
    // params, grads and each optimizer state are one flat buffer of the same length (the layout
    // table maps tensors to ranges): one kernel per step for the whole model. Scalars come in as
    // f64 because PyTorch computes them in double on the host (bias corrections, 1 − lr·wd) and
    // rounds each once to the tensor dtype inside its kernel; backends do the same.

    /// Σ g² over `grads`, accumulated in f64 (or pairwise): a sequential f32 sum over a
    /// 28M-element embedding gradient was measured 6% off. A NaN/Inf element makes the result
    /// non-finite; the caller checks.
    fn grad_norm_sq(&self, grads: Self::View<'_>) -> Result<f64>;
    /// `buf *= factor`, factor rounded once to the buffer dtype (gradient clipping).
    fn scale(&self, buf: Self::ViewMut<'_>, factor: f64) -> Result<()>;
    /// One `torch.optim.AdamW` step (single-tensor path, amsgrad off), in place on params, m
    /// (`exp_avg`) and v (`exp_avg_sq`); `step` is 1-based (the step being taken):
    /// p ← p·(1 − lr·wd); m ← lerp(m, g, 1 − β1); v ← v·β2 + (1 − β2)·g·g;
    /// p ← p − (lr/bc1)·m / (sqrt(v)/sqrt(bc2) + eps), bc_i = 1 − β_i^step.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        params: Self::ViewMut<'_>,
        grads: Self::View<'_>,
        m: Self::ViewMut<'_>,
        v: Self::ViewMut<'_>,
        step: u64,
        lr: f64,
        hp: &AdamWConfig,
    ) -> Result<()>;
    /// One `torch.optim.RMSprop` step (single-tensor path, momentum 0, centered off), in place on
    /// params and `square_avg`: g' = g + wd·p; sq ← sq·α + (1 − α)·g'·g'; p ← p − lr·g' / (sqrt(sq) + eps).
    fn rmsprop_step(&self, params: Self::ViewMut<'_>, grads: Self::View<'_>, square_avg: Self::ViewMut<'_>, lr: f64, hp: &RmspropConfig) -> Result<()>;
    // ==== optimizer over flat buffers (end) ====

    // ==== storage precision and device memory (begin; all have defaults the CPU keeps) ====
    // A backend may store some buffers in a narrower type (the CUDA backend's bf16 mode): the
    // model says what a buffer holds with a [`BufRole`], every op accepts any mix of storages
    // (converting where it has no kernel for the mix), and host slices stay f32 (converted at
    // upload/download). The CPU backend ignores roles: everything is f32.

    /// [`alloc`](Self::alloc) for a buffer of role `role` (`alloc` itself is [`BufRole::Exact`]).
    fn alloc_as(&self, len: usize, _role: BufRole) -> Result<Self::Buf> {
        self.alloc(len)
    }
    /// [`upload`](Self::upload) for a buffer of role `role` (`upload` itself is [`BufRole::Exact`]).
    fn upload_as(&self, host: &[f32], _role: BufRole) -> Result<Self::Buf> {
        self.upload(host)
    }
    /// How this backend stores each role (memory planning, logs).
    fn precision(&self) -> Precision {
        Precision::F32
    }
    /// The memory of the device the buffers live on, when it is not the host's (GPU): what is free
    /// now and the total. `None`: host memory (planned by `run::memory::available`).
    fn device_memory(&self) -> Result<Option<DeviceMemory>> {
        Ok(None)
    }
    // ==== storage precision and device memory (end) ====
}

/// What a buffer holds, so a backend with mixed precision can choose its storage
/// ([`Backend::alloc_as`]). Reads and writes go through the same trait methods whatever the role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufRole {
    /// f32 always: parameter gradients, optimizer state, normalisation statistics (rstd, mean),
    /// attention and log-prob logsumexps, log-probs and their gradients, logits read by the host.
    /// What [`Backend::alloc`] and [`Backend::upload`] give.
    Exact,
    /// The compute type: activations, activation gradients, the KV cache, rotary tables.
    Compute,
    /// Model parameters: the compute type, plus f32 master weights when that is narrower (the
    /// optimizer updates the master weights; reads see the compute copy; download gives the master).
    Param,
}

/// The compute type of a backend: f32 everywhere, or bf16 storage of [`BufRole::Compute`] and
/// [`BufRole::Param`] buffers (with f32 master weights) and f32 accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Bytes per element of a buffer of role `role`, the master copy of parameters included.
    pub fn bytes(self, role: BufRole) -> u64 {
        match (self, role) {
            (_, BufRole::Exact) | (Precision::F32, _) => 4,
            (Precision::Bf16, BufRole::Compute) => 2,
            (Precision::Bf16, BufRole::Param) => 2 + 4,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => anyhow::bail!("unknown precision '{other}' (choices: f32, bf16)"),
        }
    }
}

/// A device's memory ([`Backend::device_memory`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The device, for messages ("NVIDIA H100 80GB HBM3 (GPU 0)").
    pub name: String,
    pub free: u64,
    pub total: u64,
}

// ==== optimizer hyperparameters (used by the optimizer block of `Backend`) ====

/// `torch.optim.AdamW` settings other than the lr (which the schedule changes every step).
/// torch's defaults: β = (0.9, 0.999), eps 1e-8, weight_decay 1e-2.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled: p ← p·(1 − lr·wd) before the Adam update.
    pub weight_decay: f64,
}

/// `torch.optim.RMSprop` settings other than the lr; momentum 0 and centered off (the SPPO
/// reference's, and torch's defaults). torch's defaults: α 0.99, eps 1e-8, weight_decay 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmspropConfig {
    pub alpha: f64,
    pub eps: f64,
    /// L2 (coupled): added to the gradient, g' = g + wd·p, before the square average.
    pub weight_decay: f64,
}
