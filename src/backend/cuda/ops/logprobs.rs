//! Launchers for `kernels/logprobs.cu`: the LM head fused with log-prob gathering, forward and
//! backward, in chunks of active rows so the (N, V) logits are never materialised.
//!
//! Semantics and shapes are those of `Backend::token_logprobs_forward/backward` (CPU reference:
//! `src/backend/cpu/logprobs.rs`): hidden, dhidden: (N, dim) of `T`; weight: (vocab, dim) of `T`;
//! dweight: (vocab, dim) f32, accumulated; logp, lse, dlogp: (N) f32; targets: (N), negative for
//! masked rows (logp = lse = 0, dhidden row 0). `scratch` is caller-owned f32 workspace of at
//! least one row of logits (vocab elements): its length / vocab is the chunk height, so the caller
//! chooses the memory/parallelism trade-off (e.g. 64 rows × 49152 × 4 B = 12.6 MB for SmolLM2).
//!
//! Each call is planned first ([`plan_logprobs`]): every length and target is checked, naming the
//! op, and the active rows, the chunks and every kernel's grid are computed on the host; the
//! host-harness tests run the same plan on CPU threads.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::LOGPROBS;

/// Threads per block of every logprobs kernel, and the side of their 16 × 16 output tiles.
const THREADS: u32 = 256;
const TILE: usize = 16;
const MAX_GRID_Y: usize = 65_535;

/// `forward_rows` and `dlogits` work on the f32 scratch only: one kernel for both dtypes.
pub const FORWARD_ROWS_KERNEL: &str = "logprobs_forward_rows";
pub const DLOGITS_KERNEL: &str = "logprobs_dlogits";

pub fn logits_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "logprobs_logits_f32",
        DType::Bf16 => "logprobs_logits_bf16",
    }
}

pub fn dhidden_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "logprobs_dhidden_f32",
        DType::Bf16 => "logprobs_dhidden_bf16",
    }
}

pub fn dweight_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "logprobs_dweight_f32",
        DType::Bf16 => "logprobs_dweight_bf16",
    }
}

/// Element counts of a call's buffers; `None` for the buffers the direction does not take.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogprobsLens {
    pub hidden: usize,
    pub weight: usize,
    pub scratch: usize,
    /// Forward outputs.
    pub logp: Option<usize>,
    /// Forward output, backward input.
    pub lse: usize,
    /// Backward only.
    pub dlogp: Option<usize>,
    pub dhidden: Option<usize>,
    pub dweight: Option<usize>,
}

/// One chunk of active rows and the grids of the kernels that run on it.
#[derive(Clone, Debug)]
pub struct LogprobsChunk {
    /// Index of the chunk's first row in [`LogprobsPlan::rows`].
    pub first: usize,
    pub n_rows: i32,
    pub logits: LaunchConfig,
    pub forward_rows: LaunchConfig,
    pub dlogits: LaunchConfig,
    pub dhidden: LaunchConfig,
    pub dweight: LaunchConfig,
}

/// A checked call: the active rows (ascending), their chunks, and whether some row is masked (then
/// logp and lse, or dhidden, are zero-filled before the kernels write the active rows).
#[derive(Clone, Debug)]
pub struct LogprobsPlan {
    pub dim: i32,
    pub vocab: i32,
    pub rows: Vec<i32>,
    pub chunks: Vec<LogprobsChunk>,
    pub zero_fill: bool,
}

fn shape_err(op: &'static str, detail: impl Into<String>) -> CudaError {
    CudaError::Shape { op, detail: detail.into() }
}

fn check_len(op: &'static str, what: &str, got: usize, shape: &str, want: usize) -> Result<()> {
    if got != want {
        return Err(shape_err(op, format!("{what} has {got} elements, expected {shape} = {want}")));
    }
    Ok(())
}

fn config(grid: (usize, usize), op: &'static str) -> Result<LaunchConfig> {
    let x = u32::try_from(grid.0).map_err(|_| shape_err(op, format!("grid of {} blocks is too large", grid.0)))?;
    if grid.1 > MAX_GRID_Y {
        return Err(shape_err(op, format!("grid.y of {} blocks exceeds {MAX_GRID_Y}", grid.1)));
    }
    Ok(LaunchConfig { grid_dim: (x, grid.1 as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Checks a call (forward when `lens.logp` is set, backward when `lens.dlogp` is) and plans it.
pub fn plan_logprobs(lens: &LogprobsLens, targets: &[i32], dim: usize, vocab: usize) -> Result<LogprobsPlan> {
    let op = if lens.dlogp.is_some() { "token_logprobs_backward" } else { "token_logprobs_forward" };
    if dim == 0 || vocab == 0 {
        return Err(shape_err(op, format!("dim {dim} and vocab {vocab} must be nonzero")));
    }
    if !lens.hidden.is_multiple_of(dim) {
        return Err(shape_err(op, format!("hidden has {} elements, not a multiple of dim {dim}", lens.hidden)));
    }
    let n = lens.hidden / dim;
    for (what, value) in [("rows N", n), ("dim", dim), ("vocab", vocab)] {
        if i32::try_from(value).is_err() {
            return Err(shape_err(op, format!("{what} = {value} exceeds the kernels' int sizes")));
        }
    }
    let weight_len = vocab.checked_mul(dim).ok_or_else(|| shape_err(op, "vocab x dim overflows"))?;
    check_len(op, "targets", targets.len(), &format!("(N={n})"), n)?;
    check_len(op, "weight", lens.weight, &format!("(vocab={vocab}, dim={dim})"), weight_len)?;
    check_len(op, "lse", lens.lse, &format!("(N={n})"), n)?;
    if let Some(logp) = lens.logp {
        check_len(op, "logp", logp, &format!("(N={n})"), n)?;
    }
    if let Some(dlogp) = lens.dlogp {
        check_len(op, "dlogp", dlogp, &format!("(N={n})"), n)?;
    }
    if let Some(dhidden) = lens.dhidden {
        check_len(op, "dhidden", dhidden, &format!("hidden's (N={n}, dim={dim})"), lens.hidden)?;
    }
    if let Some(dweight) = lens.dweight {
        check_len(op, "dweight", dweight, &format!("(vocab={vocab}, dim={dim})"), weight_len)?;
    }
    if vocab.div_ceil(TILE) > MAX_GRID_Y {
        return Err(shape_err(op, format!("vocab {vocab} exceeds the dweight grid's limit {}", MAX_GRID_Y * TILE)));
    }
    let mut rows = Vec::new();
    for (t, &target) in targets.iter().enumerate() {
        if target >= 0 {
            if target as usize >= vocab {
                return Err(shape_err(
                    op,
                    format!("targets[{t}] = {target} is out of range for a vocabulary of {vocab}"),
                ));
            }
            rows.push(t as i32); // t < n fits i32 (checked above)
        }
    }
    if lens.scratch < vocab {
        return Err(shape_err(
            op,
            format!("scratch has {} elements, less than one row of logits (vocab {vocab})", lens.scratch),
        ));
    }
    // The logits grid has ceil(rows / 16) blocks along y.
    let chunk_rows = (lens.scratch / vocab).min(MAX_GRID_Y * TILE);
    let mut chunks = Vec::new();
    for first in (0..rows.len()).step_by(chunk_rows) {
        let r = chunk_rows.min(rows.len() - first);
        chunks.push(LogprobsChunk {
            first,
            n_rows: r as i32,
            logits: config((vocab.div_ceil(TILE), r.div_ceil(TILE)), op)?,
            forward_rows: config((r, 1), op)?,
            dlogits: config(((r * vocab).div_ceil(THREADS as usize), 1), op)?, // r * vocab <= scratch
            dhidden: config((dim.div_ceil(TILE), r.div_ceil(TILE)), op)?,
            dweight: config((dim.div_ceil(TILE), vocab.div_ceil(TILE)), op)?,
        });
    }
    let zero_fill = rows.len() < n;
    Ok(LogprobsPlan { dim: dim as i32, vocab: vocab as i32, rows, chunks, zero_fill })
}

fn launch_err(kernel: &str, chunk: &LogprobsChunk) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    CudaError::driver(format!("launching {kernel} (chunk of {} rows at {})", chunk.n_rows, chunk.first))
}

/// logp, lse: (N) f32, OVERWRITTEN (masked rows 0); hidden: (N, dim), weight: (vocab, dim) of `T`;
/// scratch: f32 workspace, at least `vocab` elements.
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_forward<T: Element>(
    dev: &CudaDevice,
    logp: &mut CudaViewMut<'_, f32>,
    lse: &mut CudaViewMut<'_, f32>,
    scratch: &mut CudaViewMut<'_, f32>,
    hidden: &CudaView<'_, T>,
    weight: &CudaView<'_, T>,
    targets: &[i32],
    dim: usize,
    vocab: usize,
) -> Result<()> {
    let lens = LogprobsLens {
        hidden: hidden.len(),
        weight: weight.len(),
        scratch: scratch.len(),
        logp: Some(logp.len()),
        lse: lse.len(),
        ..Default::default()
    };
    let plan = plan_logprobs(&lens, targets, dim, vocab)?;
    let stream = dev.stream();
    if plan.zero_fill {
        stream.memset_zeros(logp).map_err(CudaError::driver("token_logprobs_forward: zeroing logp"))?;
        stream.memset_zeros(lse).map_err(CudaError::driver("token_logprobs_forward: zeroing lse"))?;
    }
    if plan.rows.is_empty() {
        return Ok(());
    }
    let d_targets = dev.upload(targets)?;
    let d_rows = dev.upload(&plan.rows)?;
    let logits = dev.function(&LOGPROBS, logits_kernel(T::DTYPE))?;
    let reduce = dev.function(&LOGPROBS, FORWARD_ROWS_KERNEL)?;
    for chunk in &plan.chunks {
        let rows = d_rows.slice(chunk.first..);
        {
            let mut b = stream.launch_builder(&logits);
            b.arg(&mut *scratch).arg(hidden).arg(weight).arg(&rows);
            b.arg(&chunk.n_rows).arg(&plan.dim).arg(&plan.vocab);
            // SAFETY: logprobs_logits_{f32,bf16}(float* z, const T* hidden, const T* weight,
            // const int* rows, int n_rows, int dim, int vocab), matching the arguments above. The
            // plan checked hidden (N, dim) and weight (vocab, dim); rows holds n_rows indices < N
            // from `first`; scratch holds at least n_rows · vocab floats (chunk = scratch / vocab).
            unsafe { b.launch(chunk.logits) }.map_err(launch_err(logits_kernel(T::DTYPE), chunk))?;
        }
        let z = scratch.as_view();
        let mut b = stream.launch_builder(&reduce);
        b.arg(&mut *logp).arg(&mut *lse).arg(&z).arg(&d_targets).arg(&rows).arg(&plan.vocab);
        // SAFETY: logprobs_forward_rows(float* logp, float* lse, const float* z,
        // const int* targets, const int* rows, int vocab): one block per row of the chunk (grid
        // n_rows); targets of active rows are < vocab (checked); logp, lse hold N floats.
        unsafe { b.launch(chunk.forward_rows) }.map_err(launch_err(FORWARD_ROWS_KERNEL, chunk))?;
    }
    Ok(())
}

/// Gradients of [`token_logprobs_forward`] given dlogp: (N) and the forward's lse: dhidden (N, dim)
/// of `T` OVERWRITTEN (masked rows 0); dweight (vocab, dim) f32 ACCUMULATED (+=).
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward<T: Element>(
    dev: &CudaDevice,
    dhidden: &mut CudaViewMut<'_, T>,
    dweight: &mut CudaViewMut<'_, f32>,
    scratch: &mut CudaViewMut<'_, f32>,
    dlogp: &CudaView<'_, f32>,
    hidden: &CudaView<'_, T>,
    weight: &CudaView<'_, T>,
    lse: &CudaView<'_, f32>,
    targets: &[i32],
    dim: usize,
    vocab: usize,
) -> Result<()> {
    let lens = LogprobsLens {
        hidden: hidden.len(),
        weight: weight.len(),
        scratch: scratch.len(),
        lse: lse.len(),
        dlogp: Some(dlogp.len()),
        dhidden: Some(dhidden.len()),
        dweight: Some(dweight.len()),
        ..Default::default()
    };
    let plan = plan_logprobs(&lens, targets, dim, vocab)?;
    let stream = dev.stream();
    if plan.zero_fill {
        stream.memset_zeros(dhidden).map_err(CudaError::driver("token_logprobs_backward: zeroing dhidden"))?;
    }
    if plan.rows.is_empty() {
        return Ok(());
    }
    let d_targets = dev.upload(targets)?;
    let d_rows = dev.upload(&plan.rows)?;
    let (k_logits, k_dhidden, k_dweight) =
        (logits_kernel(T::DTYPE), dhidden_kernel(T::DTYPE), dweight_kernel(T::DTYPE));
    let logits = dev.function(&LOGPROBS, k_logits)?;
    let dlogits = dev.function(&LOGPROBS, DLOGITS_KERNEL)?;
    let f_dhidden = dev.function(&LOGPROBS, k_dhidden)?;
    let f_dweight = dev.function(&LOGPROBS, k_dweight)?;
    for chunk in &plan.chunks {
        let rows = d_rows.slice(chunk.first..);
        {
            let mut b = stream.launch_builder(&logits);
            b.arg(&mut *scratch).arg(hidden).arg(weight).arg(&rows);
            b.arg(&chunk.n_rows).arg(&plan.dim).arg(&plan.vocab);
            // SAFETY: as in token_logprobs_forward's logits launch (same plan checks).
            unsafe { b.launch(chunk.logits) }.map_err(launch_err(k_logits, chunk))?;
        }
        {
            let mut b = stream.launch_builder(&dlogits);
            b.arg(&mut *scratch).arg(dlogp).arg(lse).arg(&d_targets).arg(&rows);
            b.arg(&chunk.n_rows).arg(&plan.vocab);
            // SAFETY: logprobs_dlogits(float* z, const float* dlogp, const float* lse,
            // const int* targets, const int* rows, int n_rows, int vocab); threads past
            // n_rows · vocab return; dlogp, lse, targets hold N elements and rows are < N.
            unsafe { b.launch(chunk.dlogits) }.map_err(launch_err(DLOGITS_KERNEL, chunk))?;
        }
        let dz = scratch.as_view();
        {
            let mut b = stream.launch_builder(&f_dhidden);
            b.arg(&mut *dhidden).arg(&dz).arg(weight).arg(&rows);
            b.arg(&chunk.n_rows).arg(&plan.dim).arg(&plan.vocab);
            // SAFETY: logprobs_dhidden_{f32,bf16}(T* dhidden, const float* dz, const T* weight,
            // const int* rows, int n_rows, int dim, int vocab); dhidden (N, dim) checked; each of
            // its elements is written by one thread (rows are distinct).
            unsafe { b.launch(chunk.dhidden) }.map_err(launch_err(k_dhidden, chunk))?;
        }
        let mut b = stream.launch_builder(&f_dweight);
        b.arg(&mut *dweight).arg(&dz).arg(hidden).arg(&rows);
        b.arg(&chunk.n_rows).arg(&plan.dim).arg(&plan.vocab);
        // SAFETY: logprobs_dweight_{f32,bf16}(float* dweight, const float* dz, const T* hidden,
        // const int* rows, int n_rows, int dim, int vocab); dweight (vocab, dim) checked; one
        // thread per element, chunks in stream order.
        unsafe { b.launch(chunk.dweight) }.map_err(launch_err(k_dweight, chunk))?;
    }
    Ok(())
}
