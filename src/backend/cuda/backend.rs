//! [`CudaBackend`]: the model interface (`crate::backend::Backend`) on one GPU, every method a
//! launcher of `ops/` (the kernels of `kernels/*.cu`) or cuBLAS, so the model definition written
//! once in `src/model/` runs unchanged on the GPU.
//!
//! This first version stores f32 (parameters, activations, gradients; cuBLAS sgemm), so it is
//! checked against the CPU reference with f32 tolerances; bf16 storage with f32 master weights
//! follows once this is verified on a GPU. Scratch space a kernel needs beyond the trait's
//! arguments (attention's delta, the log-prob chunks) is allocated per call.
//!
//! Views: a `View` is a (buffer, range) pair (cudarc's `CudaView` is not `Copy`, the trait's views
//! are), turned into a `CudaView` at launch; a `ViewMut` is cudarc's `CudaViewMut`.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::device::CudaDevice;
use super::error::CudaError;
use super::kernel_choice::KernelChoice;
use super::ops::{attention, bias, elementwise, embedding, gelu, layernorm, logprobs, matmul, optimizer, rmsnorm, rope, sampling, swiglu};
use crate::backend::{AdamWConfig, AttnSeq, AttnShape, Backend, RmspropConfig};
use crate::sampling::{SamplerScratch, SamplingParams};

/// Rows of logits the log-prob kernels hold at once (their f32 scratch is this × vocab).
const LOGPROB_CHUNK_ROWS: usize = 64;

/// A read-only range of a device buffer.
#[derive(Clone, Copy, Debug)]
pub struct DView<'a> {
    buf: &'a CudaSlice<f32>,
    start: usize,
    end: usize,
}

impl<'a> DView<'a> {
    fn cuda(&self) -> CudaView<'a, f32> {
        self.buf.slice(self.start..self.end)
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The GPU backend (see the module doc).
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    blas: CudaBlas,
    kernels: KernelChoice,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.dev.name()).field("kernels", &self.kernels.describe()).finish()
    }
}

/// A launcher's result, retried with the `Naive` variant when the chosen one has no kernel for
/// this direction or dtype (e.g. a forward-only fast variant during backward).
fn or_naive<V: Copy>(chosen: V, naive: V, mut f: impl FnMut(V) -> Result<(), CudaError>) -> Result<()> {
    match f(chosen) {
        Err(CudaError::UnsupportedDtype { .. }) => Ok(f(naive)?),
        other => Ok(other?),
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` (an error naming why when there is none, never a panic).
    pub fn new(ordinal: usize, kernels: KernelChoice) -> Result<Self> {
        let dev = Arc::new(CudaDevice::new(ordinal)?);
        let blas = CudaBlas::new(dev.stream().clone()).map_err(|e| anyhow!("cuBLAS on {}: {e}", dev.name()))?;
        Ok(CudaBackend { dev, blas, kernels })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    pub fn kernels(&self) -> KernelChoice {
        self.kernels
    }

    fn scratch(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.dev.stream().alloc_zeros::<f32>(len.max(1)).map_err(|e| anyhow!("allocating {len} f32 of GPU scratch: {e}"))
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type View<'a> = DView<'a>;
    type ViewMut<'a> = CudaViewMut<'a, f32>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn sample_rows(
        &self,
        logits: &CudaSlice<f32>,
        vocab: usize,
        uniforms: &[f32],
        params: &SamplingParams,
        _scratch: &mut SamplerScratch,
    ) -> Result<Vec<u32>> {
        let rows = uniforms.len();
        let mut tokens = self.dev.upload(&vec![-1i32; rows])?;
        let mut status = self.dev.upload(&vec![-1i32; rows])?;
        sampling::sample_rows(
            &self.dev,
            self.kernels.sampling,
            &mut tokens.as_view_mut(),
            &mut status.as_view_mut(),
            &logits.as_view(),
            vocab,
            uniforms,
            params,
        )
    }

    // ---- memory ----
    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.dev.stream().alloc_zeros::<f32>(len).map_err(|e| anyhow!("allocating {len} f32 on {}: {e}", self.dev.name()))
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.dev.upload(host)?)
    }

    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        Ok(self.dev.download(buf)?)
    }

    fn write(&self, buf: &mut CudaSlice<f32>, offset: usize, host: &[f32]) -> Result<()> {
        let end = offset.checked_add(host.len()).filter(|&e| e <= buf.len());
        let end = end.ok_or_else(|| anyhow!("write: {} elements at {offset} overflow a buffer of {}", host.len(), buf.len()))?;
        let mut dst = buf.slice_mut(offset..end);
        self.dev.stream().memcpy_htod(host, &mut dst).map_err(|e| anyhow!("write: copying {} f32 to the GPU: {e}", host.len()))
    }

    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn fill(&self, mut buf: CudaViewMut<'_, f32>, value: f32) -> Result<()> {
        Ok(elementwise::fill(&self.dev, &mut buf, value)?)
    }

    fn view<'a>(&self, buf: &'a CudaSlice<f32>, range: Range<usize>) -> DView<'a> {
        assert!(range.start <= range.end && range.end <= buf.len(), "view {range:?} of a buffer of {}", buf.len());
        DView { buf, start: range.start, end: range.end }
    }

    fn view_mut<'a>(&self, buf: &'a mut CudaSlice<f32>, range: Range<usize>) -> CudaViewMut<'a, f32> {
        buf.slice_mut(range)
    }

    // ---- elementwise ----
    fn add(&self, mut out: CudaViewMut<'_, f32>, a: DView<'_>, b: DView<'_>) -> Result<()> {
        Ok(elementwise::add(&self.dev, &mut out, &a.cuda(), &b.cuda())?)
    }

    fn add_inplace(&self, mut acc: CudaViewMut<'_, f32>, x: DView<'_>) -> Result<()> {
        Ok(elementwise::add_inplace(&self.dev, &mut acc, &x.cuda())?)
    }

    fn scatter_rows(&self, mut dst: CudaViewMut<'_, f32>, src: DView<'_>, index: &[u32], width: usize) -> Result<()> {
        Ok(elementwise::scatter_rows(&self.dev, &mut dst, &src.cuda(), index, width)?)
    }

    fn gather_rows(&self, mut dst: CudaViewMut<'_, f32>, src: DView<'_>, index: &[u32], width: usize) -> Result<()> {
        Ok(elementwise::gather_rows(&self.dev, &mut dst, &src.cuda(), index, width)?)
    }

    // ---- embedding ----
    fn embedding_forward(&self, mut out: CudaViewMut<'_, f32>, table: DView<'_>, ids: &[u32], dim: usize) -> Result<()> {
        let k = self.kernels.embedding;
        or_naive(k, embedding::EmbeddingVariant::Naive, |v| embedding::embedding_forward(&self.dev, v, &mut out, &table.cuda(), ids, dim))
    }

    fn embedding_backward(&self, mut dtable: CudaViewMut<'_, f32>, dout: DView<'_>, ids: &[u32], dim: usize) -> Result<()> {
        let k = self.kernels.embedding;
        or_naive(k, embedding::EmbeddingVariant::Naive, |v| embedding::embedding_backward(&self.dev, v, &mut dtable, &dout.cuda(), ids, dim))
    }

    // ---- RMSNorm ----
    fn rmsnorm_forward(&self, mut out: CudaViewMut<'_, f32>, mut rstd: CudaViewMut<'_, f32>, inp: DView<'_>, weight: DView<'_>, dim: usize, eps: f32) -> Result<()> {
        let k = self.kernels.rmsnorm;
        or_naive(k, rmsnorm::RmsNormVariant::Naive, |v| rmsnorm::rmsnorm_forward(&self.dev, v, &mut out, &mut rstd, &inp.cuda(), &weight.cuda(), dim, eps))
    }

    fn rmsnorm_backward(
        &self,
        mut dinp: CudaViewMut<'_, f32>,
        mut dweight: CudaViewMut<'_, f32>,
        dout: DView<'_>,
        inp: DView<'_>,
        weight: DView<'_>,
        rstd: DView<'_>,
        dim: usize,
    ) -> Result<()> {
        let k = self.kernels.rmsnorm;
        or_naive(k, rmsnorm::RmsNormVariant::Naive, |v| {
            rmsnorm::rmsnorm_backward(&self.dev, v, &mut dinp, &mut dweight, &dout.cuda(), &inp.cuda(), &weight.cuda(), &rstd.cuda(), dim)
        })
    }

    // ---- matrix products (cuBLAS) ----
    fn matmul_forward(&self, mut out: CudaViewMut<'_, f32>, inp: DView<'_>, weight: DView<'_>, in_dim: usize, out_dim: usize) -> Result<()> {
        Ok(matmul::forward(&self.blas, &mut out, &inp.cuda(), &weight.cuda(), in_dim, out_dim)?)
    }

    fn matmul_backward_input(&self, mut dinp: CudaViewMut<'_, f32>, dout: DView<'_>, weight: DView<'_>, in_dim: usize, out_dim: usize, accumulate: bool) -> Result<()> {
        Ok(matmul::backward_input(&self.blas, &mut dinp, &dout.cuda(), &weight.cuda(), in_dim, out_dim, accumulate)?)
    }

    fn matmul_backward_weight(&self, mut dweight: CudaViewMut<'_, f32>, dout: DView<'_>, inp: DView<'_>, in_dim: usize, out_dim: usize) -> Result<()> {
        Ok(matmul::backward_weight(&self.blas, &mut dweight, &dout.cuda(), &inp.cuda(), in_dim, out_dim)?)
    }

    // ---- rotary embedding ----
    fn rope_forward(&self, mut x: CudaViewMut<'_, f32>, cos: DView<'_>, sin: DView<'_>, positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()> {
        let k = self.kernels.rope;
        or_naive(k, rope::RopeVariant::Naive, |v| rope::rope_forward(&self.dev, v, &mut x, &cos.cuda(), &sin.cuda(), positions, n_heads, head_dim))
    }

    fn rope_backward(&self, mut dx: CudaViewMut<'_, f32>, cos: DView<'_>, sin: DView<'_>, positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()> {
        let k = self.kernels.rope;
        or_naive(k, rope::RopeVariant::Naive, |v| rope::rope_backward(&self.dev, v, &mut dx, &cos.cuda(), &sin.cuda(), positions, n_heads, head_dim))
    }

    // ---- attention ----
    fn attention_forward(
        &self,
        mut out: CudaViewMut<'_, f32>,
        mut lse: CudaViewMut<'_, f32>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()> {
        let chosen = self.kernels.attention;
        or_naive(chosen, attention::AttentionVariant::Naive, |var| {
            attention::attention_forward(&self.dev, var, &mut out, &mut lse, &q.cuda(), &k.cuda(), &v.cuda(), seqs, shape)
        })
    }

    fn attention_backward(
        &self,
        mut dq: CudaViewMut<'_, f32>,
        mut dk: CudaViewMut<'_, f32>,
        mut dv: CudaViewMut<'_, f32>,
        dout: DView<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        out: DView<'_>,
        lse: DView<'_>,
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()> {
        // delta (Nq, n_heads) = rowsum(dout ⊙ out), the backward's scratch.
        let mut delta = self.scratch(lse.len())?;
        let mut delta = delta.slice_mut(0..lse.len());
        let chosen = self.kernels.attention;
        or_naive(chosen, attention::AttentionVariant::Naive, |var| {
            attention::attention_backward(
                &self.dev,
                var,
                &mut dq,
                &mut dk,
                &mut dv,
                &mut delta,
                &dout.cuda(),
                &q.cuda(),
                &k.cuda(),
                &v.cuda(),
                &out.cuda(),
                &lse.cuda(),
                seqs,
                shape,
            )
        })
    }

    // ---- SwiGLU ----
    fn swiglu_forward(&self, mut out: CudaViewMut<'_, f32>, gate: DView<'_>, up: DView<'_>) -> Result<()> {
        let k = self.kernels.swiglu;
        or_naive(k, swiglu::SwigluVariant::Naive, |v| swiglu::swiglu_forward(&self.dev, v, &mut out, &gate.cuda(), &up.cuda()))
    }

    fn swiglu_backward(&self, mut dgate: CudaViewMut<'_, f32>, mut dup: CudaViewMut<'_, f32>, dout: DView<'_>, gate: DView<'_>, up: DView<'_>) -> Result<()> {
        let k = self.kernels.swiglu;
        or_naive(k, swiglu::SwigluVariant::Naive, |v| swiglu::swiglu_backward(&self.dev, v, &mut dgate, &mut dup, &dout.cuda(), &gate.cuda(), &up.cuda()))
    }

    // ---- LM head fused with log-prob gathering ----
    fn token_logprobs_forward(
        &self,
        mut logp: CudaViewMut<'_, f32>,
        mut lse: CudaViewMut<'_, f32>,
        hidden: DView<'_>,
        weight: DView<'_>,
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        let rows = targets.iter().filter(|&&t| t >= 0).count().clamp(1, LOGPROB_CHUNK_ROWS);
        let mut scratch = self.scratch(rows * vocab)?;
        let mut scratch = scratch.slice_mut(0..rows * vocab);
        Ok(logprobs::token_logprobs_forward(&self.dev, &mut logp, &mut lse, &mut scratch, &hidden.cuda(), &weight.cuda(), targets, dim, vocab)?)
    }

    fn token_logprobs_backward(
        &self,
        mut dhidden: CudaViewMut<'_, f32>,
        mut dweight: CudaViewMut<'_, f32>,
        dlogp: DView<'_>,
        hidden: DView<'_>,
        weight: DView<'_>,
        lse: DView<'_>,
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        let rows = targets.iter().filter(|&&t| t >= 0).count().clamp(1, LOGPROB_CHUNK_ROWS);
        let mut scratch = self.scratch(rows * vocab)?;
        let mut scratch = scratch.slice_mut(0..rows * vocab);
        Ok(logprobs::token_logprobs_backward(
            &self.dev,
            &mut dhidden,
            &mut dweight,
            &mut scratch,
            &dlogp.cuda(),
            &hidden.cuda(),
            &weight.cuda(),
            &lse.cuda(),
            targets,
            dim,
            vocab,
        )?)
    }

    // ---- encoder ops ----
    fn view_mut_pair<'a>(&self, buf: &'a mut CudaSlice<f32>, a: Range<usize>, b: Range<usize>) -> (CudaViewMut<'a, f32>, CudaViewMut<'a, f32>) {
        assert!(a.start <= a.end && b.start <= b.end && a.end.max(b.end) <= buf.len(), "view_mut_pair {a:?}, {b:?} of {}", buf.len());
        assert!(a.end <= b.start || b.end <= a.start, "view_mut_pair: {a:?} and {b:?} overlap");
        // Split at the later range's start: the earlier range lies in `lo`, the later in `hi`.
        let (first, second, swapped) = if a.end <= b.start { (a, b, false) } else { (b, a, true) };
        let (mut lo, mut hi) = buf.split_at_mut(second.start);
        // SAFETY: sub-slicing a CudaViewMut borrows the local view, but the result only holds the
        // device pointer, its length and references to `buf`'s events and stream, all valid for
        // 'a (CudaViewMut has no Drop); the two results cover disjoint ranges of `buf`, which is
        // mutably borrowed for 'a, so no other view of these elements can exist meanwhile.
        let x: CudaViewMut<'a, f32> = unsafe { std::mem::transmute(lo.slice_mut(first)) };
        let y: CudaViewMut<'a, f32> = unsafe { std::mem::transmute(hi.slice_mut(0..second.end - second.start)) };
        if swapped {
            (y, x)
        } else {
            (x, y)
        }
    }

    fn layernorm_forward(
        &self,
        mut out: CudaViewMut<'_, f32>,
        mut mean: CudaViewMut<'_, f32>,
        mut rstd: CudaViewMut<'_, f32>,
        inp: DView<'_>,
        weight: DView<'_>,
        bias: DView<'_>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let k = self.kernels.layernorm;
        or_naive(k, layernorm::LayerNormVariant::Naive, |v| {
            layernorm::layernorm_forward(&self.dev, v, &mut out, &mut mean, &mut rstd, &inp.cuda(), &weight.cuda(), &bias.cuda(), dim, eps)
        })
    }

    fn layernorm_backward(
        &self,
        mut dinp: CudaViewMut<'_, f32>,
        mut dweight: CudaViewMut<'_, f32>,
        mut dbias: CudaViewMut<'_, f32>,
        dout: DView<'_>,
        inp: DView<'_>,
        weight: DView<'_>,
        mean: DView<'_>,
        rstd: DView<'_>,
        dim: usize,
    ) -> Result<()> {
        let k = self.kernels.layernorm;
        or_naive(k, layernorm::LayerNormVariant::Naive, |v| {
            layernorm::layernorm_backward(&self.dev, v, &mut dinp, &mut dweight, &mut dbias, &dout.cuda(), &inp.cuda(), &weight.cuda(), &mean.cuda(), &rstd.cuda(), dim)
        })
    }

    fn gelu_forward(&self, mut out: CudaViewMut<'_, f32>, inp: DView<'_>) -> Result<()> {
        let k = self.kernels.gelu;
        or_naive(k, gelu::GeluVariant::Naive, |v| gelu::gelu_forward(&self.dev, v, &mut out, &inp.cuda()))
    }

    fn gelu_backward(&self, mut dinp: CudaViewMut<'_, f32>, dout: DView<'_>, inp: DView<'_>) -> Result<()> {
        let k = self.kernels.gelu;
        or_naive(k, gelu::GeluVariant::Naive, |v| gelu::gelu_backward(&self.dev, v, &mut dinp, &dout.cuda(), &inp.cuda()))
    }

    fn bias_add(&self, mut out: CudaViewMut<'_, f32>, b: DView<'_>) -> Result<()> {
        let k = self.kernels.bias;
        or_naive(k, bias::BiasVariant::Naive, |v| bias::bias_add(&self.dev, v, &mut out, &b.cuda()))
    }

    fn bias_backward(&self, mut dbias: CudaViewMut<'_, f32>, dout: DView<'_>) -> Result<()> {
        let k = self.kernels.bias;
        or_naive(k, bias::BiasVariant::Naive, |v| bias::bias_backward(&self.dev, v, &mut dbias, &dout.cuda()))
    }

    // ---- optimizer over flat buffers ----
    fn grad_norm_sq(&self, grads: DView<'_>) -> Result<f64> {
        Ok(optimizer::grad_norm_sq(&self.dev, &grads.cuda())?)
    }

    fn scale(&self, mut buf: CudaViewMut<'_, f32>, factor: f64) -> Result<()> {
        Ok(optimizer::scale(&self.dev, &mut buf, factor)?)
    }

    fn adamw_step(
        &self,
        mut params: CudaViewMut<'_, f32>,
        grads: DView<'_>,
        mut m: CudaViewMut<'_, f32>,
        mut v: CudaViewMut<'_, f32>,
        step: u64,
        lr: f64,
        hp: &AdamWConfig,
    ) -> Result<()> {
        ensure!(step >= 1, "adamw_step: step is 1-based, got 0");
        Ok(optimizer::adamw_step(&self.dev, &mut params, &grads.cuda(), &mut m, &mut v, step, lr, hp)?)
    }

    fn rmsprop_step(&self, mut params: CudaViewMut<'_, f32>, grads: DView<'_>, mut square_avg: CudaViewMut<'_, f32>, lr: f64, hp: &RmspropConfig) -> Result<()> {
        Ok(optimizer::rmsprop_step(&self.dev, &mut params, &grads.cuda(), &mut square_avg, lr, hp)?)
    }
}
