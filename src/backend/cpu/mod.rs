//! The f32 CPU reference backend: the oracle every other backend is tested against.
//!
//! Buffers are `Vec<f32>`, views are slices. Every op checks the lengths of its arguments against
//! the shapes it is given and returns an error naming the op, the shapes and the file; none panics
//! on bad shapes (only `view`/`view_mut` panic on a bad range, as slice indexing does).
//!
//! Threads: each backend owns a dedicated rayon pool of `threads` workers and runs every op inside
//! it (`ThreadPool::install`), so two backends (or the caller's own rayon work) do not share
//! workers, and the `gemm` crate's `Parallelism::Rayon(threads)` runs on that same pool.
//!
//! Determinism: row-wise ops split rows into chunks whose size depends only on the shapes, and
//! reductions across chunks (parameter gradients) are summed in chunk order, so results do not
//! depend on the thread count (up to whatever `gemm` does internally).
//!
//! One file per concern: `matmul.rs` (also the checked `gemm` wrapper the LM head uses; few-row
//! products go to `skinny.rs`, which streams the weight once),
//! `embedding.rs`, `rmsnorm.rs`, `rope.rs`, `attention.rs`, `swiglu.rs`, `logprobs.rs`,
//! `elementwise.rs`, `optim.rs` (gradient norm, scaling, AdamW, RMSprop); for the BERT encoder
//! `layernorm.rs`, `gelu.rs`, `bias.rs`; `decode.rs` keeps the exact bf16 copy of the parameters
//! that decode steps read while generating.

mod attention;
mod bias;
mod decode;
mod elementwise;
mod embedding;
mod gelu;
mod layernorm;
mod logprobs;
mod matmul;
mod optim;
mod rmsnorm;
mod rope;
mod skinny;
mod swiglu;

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::{AdamWConfig, AttnSeq, AttnShape, Backend, RmspropConfig};

/// Elements a row-wise task should cover: big enough that rayon's per-task cost is negligible,
/// small enough that a few thousand rows still spread over all cores.
const TASK_ELEMS: usize = 1 << 14;

/// Rows per rayon task for a row-wise op whose rows have `row_elems` elements. Depends only on the
/// shape (not on the thread count) so chunked reductions are reproducible across machines.
fn rows_per_task(row_elems: usize) -> usize {
    (TASK_ELEMS / row_elems.max(1)).max(1)
}

/// The f32 CPU backend. Cloning shares the thread pool.
#[derive(Clone)]
pub struct CpuBackend {
    threads: usize,
    decode_copy: decode::DecodeSlot,
    pool: Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend").field("threads", &self.threads).finish()
    }
}

impl CpuBackend {
    /// A backend with its own pool of `threads` rayon workers (`None`: one per available core).
    pub fn new(threads: Option<usize>) -> Result<Self> {
        let threads = match threads {
            Some(0) => bail!("cpu backend: threads must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sppo-cpu-{i}"))
            .build()
            .map_err(|e| anyhow!("cpu backend: building a rayon pool of {threads} threads: {e}"))?;
        Ok(Self { threads, decode_copy: Default::default(), pool: Arc::new(pool) })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on this backend's pool, so rayon iterators and `gemm` inside it use its workers.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// The registered bf16 copy of the parameters, if any (`decode.rs`).
    fn decode_copy(&self) -> Option<Arc<decode::Bf16Copy>> {
        self.decode_copy.read().map(|g| g.clone()).unwrap_or(None)
    }

    /// `gemm` parallelism for an (m, n, k) product: threading a tiny product costs more than it saves.
    fn gemm_par(&self, m: usize, n: usize, k: usize) -> gemm::Parallelism {
        const MIN_PARALLEL_FLOPS: usize = 1 << 18;
        let work = m.saturating_mul(n).saturating_mul(k);
        if self.threads > 1 && work >= MIN_PARALLEL_FLOPS {
            gemm::Parallelism::Rayon(self.threads)
        } else {
            gemm::Parallelism::None
        }
    }
}

/// The op being checked, for error messages that name the op and the file that checks it.
#[derive(Clone, Copy)]
struct Op {
    name: &'static str,
    file: &'static str,
}

impl Op {
    fn new(name: &'static str, file: &'static str) -> Self {
        Self { name, file }
    }

    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("cpu {}: {msg} ({})", self.name, self.file)
    }

    /// Rows of `width` elements in `len` elements; the width must be nonzero and divide `len`.
    fn rows(&self, what: &str, len: usize, width: usize) -> Result<usize> {
        if width == 0 {
            return Err(self.err(format_args!("{what}: row width is 0")));
        }
        if !len.is_multiple_of(width) {
            return Err(self.err(format_args!("{what} has {len} elements, not a multiple of the row width {width}")));
        }
        Ok(len / width)
    }

    fn len(&self, what: &str, got: usize, want: usize) -> Result<()> {
        if got != want {
            return Err(self.err(format_args!("{what} has {got} elements, expected {want}")));
        }
        Ok(())
    }

    /// `a * b` or an overflow error (shapes come from callers; a product may not fit).
    fn mul(&self, a: usize, b: usize) -> Result<usize> {
        a.checked_mul(b).ok_or_else(|| self.err(format_args!("{a} x {b} overflows usize")))
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Rows sampled in parallel, straight from the logits (no copy), each worker with its own
    /// scratch kept between calls; the same procedure as the default, so the same tokens.
    fn sample_rows(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        uniforms: &[f32],
        params: &crate::sampling::SamplingParams,
        scratch: &mut crate::sampling::SamplerScratch,
    ) -> Result<Vec<u32>> {
        use rayon::prelude::*;
        thread_local! {
            static SCRATCH: std::cell::RefCell<crate::sampling::SamplerScratch> = std::cell::RefCell::new(crate::sampling::SamplerScratch::new());
        }
        anyhow::ensure!(
            vocab > 0 && logits.len() == uniforms.len() * vocab,
            "sample_rows: {} logits for {} rows of {vocab}",
            logits.len(),
            uniforms.len()
        );
        if uniforms.len() == 1 || self.threads == 1 {
            return logits.chunks_exact(vocab).zip(uniforms).map(|(row, &u)| crate::sampling::sample(row, params, u, scratch)).collect();
        }
        self.run(|| {
            logits
                .par_chunks_exact(vocab)
                .with_max_len(1)
                .zip(uniforms.par_iter())
                .map(|(row, &u)| SCRATCH.with_borrow_mut(|s| crate::sampling::sample(row, params, u, s)))
                .collect()
        })
    }

    fn begin_decode(&self, params: &[f32], round: bool) -> Result<Option<String>> {
        let copy = self.run(|| if round { Some(decode::Bf16Copy::rounded(params)) } else { decode::Bf16Copy::exact(params) });
        let kind = if round { "rounded" } else { "exact" };
        let what = copy.as_ref().map(|_| format!("{kind} bf16 copy of {} parameters for generation", params.len()));
        *self.decode_copy.write().map_err(|_| anyhow!("cpu backend: decode-copy lock poisoned"))? = copy.map(Arc::new);
        Ok(what)
    }

    fn end_decode(&self) {
        if let Ok(mut slot) = self.decode_copy.write() {
            *slot = None;
        }
    }

    // ---- memory ----
    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn write(&self, buf: &mut Vec<f32>, offset: usize, host: &[f32]) -> Result<()> {
        let op = Op::new("write", file!());
        let end = offset
            .checked_add(host.len())
            .filter(|&end| end <= buf.len())
            .ok_or_else(|| op.err(format_args!("{} elements at offset {offset} exceed a buffer of {}", host.len(), buf.len())))?;
        buf[offset..end].copy_from_slice(host);
        Ok(())
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn fill(&self, buf: &mut [f32], value: f32) -> Result<()> {
        self.run(|| elementwise::fill(buf, value));
        Ok(())
    }

    fn view<'a>(&self, buf: &'a Vec<f32>, range: std::ops::Range<usize>) -> &'a [f32] {
        &buf[range]
    }

    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: std::ops::Range<usize>) -> &'a mut [f32] {
        &mut buf[range]
    }

    // ---- elementwise ----
    fn add(&self, out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
        self.run(|| elementwise::add(out, a, b))
    }

    fn add_inplace(&self, acc: &mut [f32], x: &[f32]) -> Result<()> {
        self.run(|| elementwise::add_inplace(acc, x))
    }

    fn scatter_rows(&self, dst: &mut [f32], src: &[f32], index: &[u32], width: usize) -> Result<()> {
        elementwise::scatter_rows(dst, src, index, width)
    }

    fn gather_rows(&self, dst: &mut [f32], src: &[f32], index: &[u32], width: usize) -> Result<()> {
        elementwise::gather_rows(dst, src, index, width)
    }

    // ---- embedding ----
    fn embedding_forward(&self, out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) -> Result<()> {
        self.run(|| embedding::forward(out, table, ids, dim))
    }

    fn embedding_backward(&self, dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) -> Result<()> {
        self.run(|| embedding::backward(dtable, dout, ids, dim))
    }

    // ---- RMSNorm ----
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], dim: usize, eps: f32) -> Result<()> {
        self.run(|| rmsnorm::forward(out, rstd, inp, weight, dim, eps))
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        rstd: &[f32],
        dim: usize,
    ) -> Result<()> {
        self.run(|| rmsnorm::backward(dinp, dweight, dout, inp, weight, rstd, dim))
    }

    // ---- matrix products ----
    fn matmul_forward(&self, out: &mut [f32], inp: &[f32], weight: &[f32], in_dim: usize, out_dim: usize) -> Result<()> {
        self.run(|| matmul::forward(self, out, inp, weight, in_dim, out_dim))
    }

    fn matmul_forward_many<'o, 'w, 'x>(&self, products: Vec<(&'o mut [f32], &'w [f32], usize)>, inp: &'x [f32], in_dim: usize) -> Result<()>
    where
        Self: 'o + 'w + 'x,
    {
        self.run(|| matmul::forward_many(self, products, inp, in_dim))
    }

    fn matmul_backward_input(
        &self,
        dinp: &mut [f32],
        dout: &[f32],
        weight: &[f32],
        in_dim: usize,
        out_dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.run(|| matmul::backward_input(self, dinp, dout, weight, in_dim, out_dim, accumulate))
    }

    fn matmul_backward_weight(&self, dweight: &mut [f32], dout: &[f32], inp: &[f32], in_dim: usize, out_dim: usize) -> Result<()> {
        self.run(|| matmul::backward_weight(self, dweight, dout, inp, in_dim, out_dim))
    }

    // ---- rotary embedding ----
    fn rope_forward(&self, x: &mut [f32], cos: &[f32], sin: &[f32], positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()> {
        self.run(|| rope::apply(rope::Direction::Forward, x, cos, sin, positions, n_heads, head_dim))
    }

    fn rope_backward(&self, dx: &mut [f32], cos: &[f32], sin: &[f32], positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()> {
        self.run(|| rope::apply(rope::Direction::Backward, dx, cos, sin, positions, n_heads, head_dim))
    }

    // ---- attention ----
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()> {
        self.run(|| attention::forward(self, out, lse, q, k, v, seqs, shape))
    }

    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dout: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()> {
        self.run(|| attention::backward(dq, dk, dv, dout, q, k, v, out, lse, seqs, shape))
    }

    // ---- SwiGLU ----
    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
        self.run(|| swiglu::forward(out, gate, up))
    }

    fn swiglu_backward(&self, dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) -> Result<()> {
        self.run(|| swiglu::backward(dgate, dup, dout, gate, up))
    }

    // ---- LM head fused with log-prob gathering ----
    fn token_logprobs_forward(
        &self,
        logp: &mut [f32],
        lse: &mut [f32],
        hidden: &[f32],
        weight: &[f32],
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        self.run(|| logprobs::forward(self, logp, lse, hidden, weight, targets, dim, vocab))
    }

    fn token_logprobs_backward(
        &self,
        dhidden: &mut [f32],
        dweight: &mut [f32],
        dlogp: &[f32],
        hidden: &[f32],
        weight: &[f32],
        lse: &[f32],
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        self.run(|| logprobs::backward(self, dhidden, dweight, dlogp, hidden, weight, lse, targets, dim, vocab))
    }

    // ==== optimizer over flat buffers (begin) ====
    fn grad_norm_sq(&self, grads: &[f32]) -> Result<f64> {
        Ok(self.run(|| optim::grad_norm_sq(grads)))
    }

    fn scale(&self, buf: &mut [f32], factor: f64) -> Result<()> {
        self.run(|| optim::scale(buf, factor))
    }

    fn adamw_step(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: u64, lr: f64, hp: &AdamWConfig) -> Result<()> {
        self.run(|| optim::adamw_step(params, grads, m, v, step, lr, hp))
    }

    fn rmsprop_step(&self, params: &mut [f32], grads: &[f32], square_avg: &mut [f32], lr: f64, hp: &RmspropConfig) -> Result<()> {
        self.run(|| optim::rmsprop_step(params, grads, square_avg, lr, hp))
    }
    // ==== optimizer over flat buffers (end) ====
    // ==== encoder ops (BERT): LayerNorm, exact GELU, Linear bias ====
    fn view_mut_pair<'a>(&self, buf: &'a mut Vec<f32>, a: std::ops::Range<usize>, b: std::ops::Range<usize>) -> (&'a mut [f32], &'a mut [f32]) {
        assert!(a.end <= b.start || b.end <= a.start, "view_mut_pair: ranges {a:?} and {b:?} overlap");
        if a.start < b.start {
            let (lo, hi) = buf.split_at_mut(b.start);
            (&mut lo[a], &mut hi[..b.end - b.start])
        } else {
            let (lo, hi) = buf.split_at_mut(a.start);
            (&mut hi[..a.end - a.start], &mut lo[b])
        }
    }

    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.run(|| layernorm::forward(out, mean, rstd, inp, weight, bias, dim, eps))
    }

    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dim: usize,
    ) -> Result<()> {
        self.run(|| layernorm::backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, dim))
    }

    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) -> Result<()> {
        self.run(|| gelu::forward(out, inp))
    }

    fn gelu_backward(&self, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
        self.run(|| gelu::backward(dinp, dout, inp))
    }

    fn bias_add(&self, out: &mut [f32], bias: &[f32]) -> Result<()> {
        self.run(|| bias::add(out, bias))
    }

    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32]) -> Result<()> {
        self.run(|| bias::backward(dbias, dout))
    }
    // ==== end of encoder ops ====
}
