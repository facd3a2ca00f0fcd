//! Launchers for `kernels/attention.cu`: attention forward and backward over packed sequences.
//!
//! Semantics and shapes are those of `Backend::attention_forward/backward` (the CPU reference is
//! `src/backend/cpu/attention.rs`): q, out, dout, dq: (Nq, n_heads, head_dim); k, v, dk, dv:
//! (Nk, n_kv_heads, head_dim) of `T` (f32 or bf16); lse and the backward scratch `delta`:
//! (Nq, n_heads) f32. Nq and Nk come from the lengths of q and k.
//!
//! Each call is planned first ([`plan_forward`], [`plan_backward`]): every length, shape and
//! sequence is checked, naming the op, and the kernels' scalar arguments, the sequence table and
//! each kernel's tile table and grid are computed on the host. The launchers upload the two small
//! int tables and launch; the host-harness tests run the same plan on CPU threads, so the checks
//! and the grids are tested on machines without a GPU.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::ATTENTION;
use crate::backend::{AttnMask, AttnSeq, AttnShape};

/// Attention kernel variants (see the header of `kernels/attention.cu`), f32 and bf16 each:
/// - `Naive`: one thread per (query row, head) for forward and dq, one per (key row, kv head)
///   for dk/dv; reads q, k, v straight from global memory. The check for `Fused`.
/// - `Fused`: flash-attention-style tiles through shared memory with an online softmax; never
///   materialises the T×T matrix; dk/dv by key tiles and dq by query tiles, without atomics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionVariant {
    Naive,
    Fused,
}

/// The largest head_dim the kernels take (their shared tiles and per-thread accumulators).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads per block of the naive kernels and of the delta kernel (one row each).
const NAIVE_THREADS: u32 = 64;
/// Fused forward: query rows per block and threads (8 lanes per row).
const FUSED_FORWARD_ROWS: usize = 16;
const FUSED_FORWARD_THREADS: u32 = 128;
/// Fused backward: query rows (dq) or keys (dk/dv) per block, and threads (8 lanes per row).
const FUSED_BACKWARD_ROWS: usize = 8;
const FUSED_BACKWARD_THREADS: u32 = 64;
/// The largest grid.y (heads are launched along y).
const MAX_GRID_Y: usize = 65_535;

impl AttentionVariant {
    pub const ALL: &'static [AttentionVariant] = &[AttentionVariant::Naive, AttentionVariant::Fused];

    pub fn name(self) -> &'static str {
        match self {
            AttentionVariant::Naive => "naive",
            AttentionVariant::Fused => "fused",
        }
    }

    /// The variant called `name`; an unknown name is an error listing the choices.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name).ok_or_else(|| CudaError::UnknownVariant {
            concern: "attention",
            name: name.to_string(),
            choices: Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The forward kernel for `dtype` (every variant has both dtypes).
    pub fn forward_kernel(self, dtype: DType) -> &'static str {
        match (self, dtype) {
            (AttentionVariant::Naive, DType::F32) => "attention_forward_f32_naive",
            (AttentionVariant::Naive, DType::Bf16) => "attention_forward_bf16_naive",
            (AttentionVariant::Fused, DType::F32) => "attention_forward_f32_fused",
            (AttentionVariant::Fused, DType::Bf16) => "attention_forward_bf16_fused",
        }
    }

    /// The backward kernel producing dq.
    pub fn dq_kernel(self, dtype: DType) -> &'static str {
        match (self, dtype) {
            (AttentionVariant::Naive, DType::F32) => "attention_backward_dq_f32_naive",
            (AttentionVariant::Naive, DType::Bf16) => "attention_backward_dq_bf16_naive",
            (AttentionVariant::Fused, DType::F32) => "attention_backward_dq_f32_fused",
            (AttentionVariant::Fused, DType::Bf16) => "attention_backward_dq_bf16_fused",
        }
    }

    /// The backward kernel producing dk and dv.
    pub fn dkdv_kernel(self, dtype: DType) -> &'static str {
        match (self, dtype) {
            (AttentionVariant::Naive, DType::F32) => "attention_backward_dkdv_f32_naive",
            (AttentionVariant::Naive, DType::Bf16) => "attention_backward_dkdv_bf16_naive",
            (AttentionVariant::Fused, DType::F32) => "attention_backward_dkdv_f32_fused",
            (AttentionVariant::Fused, DType::Bf16) => "attention_backward_dkdv_bf16_fused",
        }
    }

    /// (rows per block, threads per block) of the forward kernel.
    fn forward_tiling(self) -> (usize, u32) {
        match self {
            AttentionVariant::Naive => (NAIVE_THREADS as usize, NAIVE_THREADS),
            AttentionVariant::Fused => (FUSED_FORWARD_ROWS, FUSED_FORWARD_THREADS),
        }
    }

    /// (rows per block, threads per block) of the dq and dkdv kernels.
    fn backward_tiling(self) -> (usize, u32) {
        match self {
            AttentionVariant::Naive => (NAIVE_THREADS as usize, NAIVE_THREADS),
            AttentionVariant::Fused => (FUSED_BACKWARD_ROWS, FUSED_BACKWARD_THREADS),
        }
    }
}

/// The kernel computing backward's `delta = rowsum(dout * out)` (shared by the variants).
pub fn delta_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "attention_backward_delta_f32",
        DType::Bf16 => "attention_backward_delta_bf16",
    }
}

impl std::fmt::Display for AttentionVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionVariant {
    type Err = CudaError;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s)
    }
}

/// The scalar arguments every attention kernel takes after its pointers, checked to fit `int`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnArgs {
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    pub scale: f32,
    /// 1: causal, 0: bidirectional.
    pub causal: i32,
    /// The sliding window, or 0 for none (a window covering every key is passed as 0).
    pub window: i32,
}

/// One kernel launch: its name, grid and block, and its tile table ((grid.x, 2) ints: sequence
/// index, first row of the block's tile).
#[derive(Clone, Debug)]
pub struct AttnLaunch {
    pub kernel: &'static str,
    pub config: LaunchConfig,
    pub tiles: Vec<i32>,
}

/// Element counts of a forward call's buffers.
#[derive(Clone, Copy, Debug)]
pub struct ForwardLens {
    pub out: usize,
    pub lse: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
}

/// Element counts of a backward call's buffers.
#[derive(Clone, Copy, Debug)]
pub struct BackwardLens {
    pub dq: usize,
    pub dk: usize,
    pub dv: usize,
    pub delta: usize,
    pub dout: usize,
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub out: usize,
    pub lse: usize,
}

/// A checked forward call. `launch` is None when there is nothing to compute (no query rows).
#[derive(Clone, Debug)]
pub struct ForwardPlan {
    pub args: AttnArgs,
    /// (n_seqs, 4) ints: q_start, q_len, k_start, k_len.
    pub seqs: Vec<i32>,
    pub launch: Option<AttnLaunch>,
}

/// A checked backward call: `delta`, then `dq` and `dkdv` (each None when it has no work).
#[derive(Clone, Debug)]
pub struct BackwardPlan {
    pub args: AttnArgs,
    pub seqs: Vec<i32>,
    /// Rows of `delta` (Nq · n_heads) and the launch computing them.
    pub delta_rows: i32,
    pub delta: Option<AttnLaunch>,
    pub dq: Option<AttnLaunch>,
    pub dkdv: Option<AttnLaunch>,
    /// Some query row belongs to no sequence: dq must be zeroed before the kernels run (they
    /// write covered rows only; the reference gives uncovered rows zero gradients).
    pub zero_dq: bool,
    /// Likewise for the key rows of dk and dv.
    pub zero_dkdv: bool,
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

fn to_i32(op: &'static str, what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| shape_err(op, format!("{what} = {value} exceeds the kernels' int sizes")))
}

/// The checked geometry shared by forward and backward.
struct Geometry {
    args: AttnArgs,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    nq: usize,
    nk: usize,
    seqs: Vec<i32>,
}

/// Checks heads, head_dim, scale, mask, q/k lengths and every sequence (inside the buffers,
/// q_len <= k_len, query ranges disjoint; key ranges disjoint when `disjoint_keys`).
fn check_geometry(
    op: &'static str,
    q_len: usize,
    k_len: usize,
    seqs: &[AttnSeq],
    shape: &AttnShape,
    disjoint_keys: bool,
) -> Result<Geometry> {
    let AttnShape { n_heads, n_kv_heads, head_dim, scale, mask } = *shape;
    if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 {
        return Err(shape_err(
            op,
            format!("n_heads {n_heads}, n_kv_heads {n_kv_heads}, head_dim {head_dim} must be nonzero"),
        ));
    }
    if !n_heads.is_multiple_of(n_kv_heads) {
        return Err(shape_err(op, format!("n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")));
    }
    if head_dim > MAX_HEAD_DIM {
        return Err(shape_err(op, format!("head_dim {head_dim} exceeds the kernels' maximum {MAX_HEAD_DIM}")));
    }
    if n_heads > MAX_GRID_Y {
        return Err(shape_err(op, format!("n_heads {n_heads} exceeds the grid's y limit {MAX_GRID_Y}")));
    }
    if !scale.is_finite() {
        return Err(shape_err(op, format!("scale {scale} is not finite")));
    }
    if let AttnMask::Causal { window: Some(0) } = mask {
        return Err(shape_err(op, "a sliding window of 0 hides every key"));
    }
    let q_row = n_heads * head_dim; // both factors are small (checked above)
    let kv_row = n_kv_heads * head_dim;
    if !q_len.is_multiple_of(q_row) {
        return Err(shape_err(
            op,
            format!("q has {q_len} elements, not a multiple of n_heads {n_heads} x head_dim {head_dim}"),
        ));
    }
    if !k_len.is_multiple_of(kv_row) {
        return Err(shape_err(
            op,
            format!("k has {k_len} elements, not a multiple of n_kv_heads {n_kv_heads} x head_dim {head_dim}"),
        ));
    }
    let (nq, nk) = (q_len / q_row, k_len / kv_row);
    to_i32(op, "query rows Nq", nq)?;
    to_i32(op, "key rows Nk", nk)?;
    to_i32(op, "Nq x n_heads", nq * n_heads)?; // nq * n_heads <= q_len: no overflow
    to_i32(op, "sequences", seqs.len())?;

    let mut table = Vec::with_capacity(seqs.len() * 4);
    for (s, seq) in seqs.iter().enumerate() {
        let q_end = seq.q_start.checked_add(seq.q_len).filter(|&e| e <= nq);
        let k_end = seq.k_start.checked_add(seq.k_len).filter(|&e| e <= nk);
        if q_end.is_none() || k_end.is_none() {
            return Err(shape_err(op, format!("seqs[{s}] = {seq:?} reaches past q ({nq} rows) or k/v ({nk} rows)")));
        }
        if seq.q_len > seq.k_len {
            return Err(shape_err(op, format!("seqs[{s}] = {seq:?} has more queries than keys")));
        }
        // Every value is at most nq or nk, both checked to fit i32.
        table.extend([seq.q_start, seq.q_len, seq.k_start, seq.k_len].map(|x| x as i32));
    }
    check_disjoint(op, "query", seqs, |s| (s.q_start, s.q_len))?;
    if disjoint_keys {
        check_disjoint(op, "key", seqs, |s| (s.k_start, s.k_len))?;
    }

    let max_k = seqs.iter().map(|s| s.k_len).max().unwrap_or(0);
    let (causal, window) = match mask {
        AttnMask::Bidirectional => (0, 0),
        AttnMask::Causal { window: None } => (1, 0),
        // A window reaching past every sequence's first key hides nothing.
        AttnMask::Causal { window: Some(w) } if w >= max_k => (1, 0),
        AttnMask::Causal { window: Some(w) } => (1, w as i32), // w < max_k <= nk fits
    };
    let args = AttnArgs {
        n_heads: n_heads as i32,
        n_kv_heads: n_kv_heads as i32,
        head_dim: head_dim as i32,
        scale,
        causal,
        window,
    };
    Ok(Geometry { args, n_heads, n_kv_heads, head_dim, nq, nk, seqs: table })
}

/// Errors if two sequences' (start, len) ranges of `what` rows overlap (empty ranges never do).
fn check_disjoint(
    op: &'static str,
    what: &str,
    seqs: &[AttnSeq],
    range: impl Fn(&AttnSeq) -> (usize, usize),
) -> Result<()> {
    let mut spans: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .map(|(s, seq)| (range(seq), s))
        .filter(|&((_, n), _)| n > 0)
        .map(|((a, n), s)| (a, a + n, s))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((_, end, a), (start, _, b)) = (w[0], w[1]);
        if start < end {
            let (first, second) = (a.min(b), a.max(b));
            return Err(shape_err(
                op,
                format!(
                    "seqs[{second}] = {:?} overlaps the {what} rows of seqs[{first}] = {:?}",
                    seqs[second], seqs[first]
                ),
            ));
        }
    }
    Ok(())
}

/// Tiles of `rows` rows over `len(seq)` rows of every sequence, as (sequence, first row) pairs.
fn tile_table(op: &'static str, seqs: &[AttnSeq], len: impl Fn(&AttnSeq) -> usize, rows: usize) -> Result<Vec<i32>> {
    let mut tiles = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for first in (0..len(seq)).step_by(rows) {
            tiles.extend([s as i32, first as i32]); // s and first fit: checked by check_geometry
        }
    }
    if tiles.len() / 2 > i32::MAX as usize {
        return Err(shape_err(op, format!("{} tiles exceed the grid's x limit", tiles.len() / 2)));
    }
    Ok(tiles)
}

/// A launch over `tiles` × `heads` blocks of `threads`, or None when there are no tiles.
fn tiled_launch(kernel: &'static str, tiles: Vec<i32>, heads: usize, threads: u32) -> Option<AttnLaunch> {
    if tiles.is_empty() {
        return None;
    }
    // tiles.len() / 2 <= i32::MAX (tile_table) and heads <= MAX_GRID_Y (check_geometry).
    let config = LaunchConfig {
        grid_dim: ((tiles.len() / 2) as u32, heads as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Some(AttnLaunch { kernel, config, tiles })
}

/// Checks a forward call and computes its launch.
pub fn plan_forward(
    variant: AttentionVariant,
    dtype: DType,
    lens: &ForwardLens,
    seqs: &[AttnSeq],
    shape: &AttnShape,
) -> Result<ForwardPlan> {
    const OP: &str = "attention_forward";
    let g = check_geometry(OP, lens.q, lens.k, seqs, shape, false)?;
    let (h, kvh, d, nq, nk) = (g.n_heads, g.n_kv_heads, g.head_dim, g.nq, g.nk);
    check_len(OP, "out", lens.out, &format!("q's (Nq={nq}, n_heads={h}, head_dim={d})"), lens.q)?;
    check_len(OP, "v", lens.v, &format!("k's (Nk={nk}, n_kv_heads={kvh}, head_dim={d})"), lens.k)?;
    check_len(OP, "lse", lens.lse, &format!("(Nq={nq}, n_heads={h})"), nq * h)?;
    let (rows, threads) = variant.forward_tiling();
    let tiles = tile_table(OP, seqs, |s| s.q_len, rows)?;
    let launch = tiled_launch(variant.forward_kernel(dtype), tiles, h, threads);
    Ok(ForwardPlan { args: g.args, seqs: g.seqs, launch })
}

/// Checks a backward call and computes its launches. Unlike forward, the sequences' key ranges
/// must be disjoint: one dk/dv block overwrites each key row.
pub fn plan_backward(
    variant: AttentionVariant,
    dtype: DType,
    lens: &BackwardLens,
    seqs: &[AttnSeq],
    shape: &AttnShape,
) -> Result<BackwardPlan> {
    const OP: &str = "attention_backward";
    let g = check_geometry(OP, lens.q, lens.k, seqs, shape, true)?;
    let (h, kvh, d, nq, nk) = (g.n_heads, g.n_kv_heads, g.head_dim, g.nq, g.nk);
    let q_shape = format!("q's (Nq={nq}, n_heads={h}, head_dim={d})");
    let k_shape = format!("k's (Nk={nk}, n_kv_heads={kvh}, head_dim={d})");
    let row_shape = format!("(Nq={nq}, n_heads={h})");
    check_len(OP, "dq", lens.dq, &q_shape, lens.q)?;
    check_len(OP, "dout", lens.dout, &q_shape, lens.q)?;
    check_len(OP, "out", lens.out, &q_shape, lens.q)?;
    check_len(OP, "v", lens.v, &k_shape, lens.k)?;
    check_len(OP, "dk", lens.dk, &k_shape, lens.k)?;
    check_len(OP, "dv", lens.dv, &k_shape, lens.k)?;
    check_len(OP, "lse", lens.lse, &row_shape, nq * h)?;
    check_len(OP, "delta", lens.delta, &row_shape, nq * h)?;

    let delta_rows = nq * h; // fits i32: check_geometry
    let delta = (delta_rows > 0).then(|| AttnLaunch {
        kernel: delta_kernel(dtype),
        config: LaunchConfig {
            grid_dim: (delta_rows.div_ceil(NAIVE_THREADS as usize) as u32, 1, 1),
            block_dim: (NAIVE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        tiles: Vec::new(),
    });
    let (rows, threads) = variant.backward_tiling();
    let dq = tiled_launch(variant.dq_kernel(dtype), tile_table(OP, seqs, |s| s.q_len, rows)?, h, threads);
    let dkdv = tiled_launch(variant.dkdv_kernel(dtype), tile_table(OP, seqs, |s| s.k_len, rows)?, kvh, threads);
    // Ranges are disjoint, so the rows are covered iff the lengths add up to the buffers'.
    let zero_dq = seqs.iter().map(|s| s.q_len).sum::<usize>() < nq;
    let zero_dkdv = seqs.iter().map(|s| s.k_len).sum::<usize>() < nk;
    Ok(BackwardPlan { args: g.args, seqs: g.seqs, delta_rows: delta_rows as i32, delta, dq, dkdv, zero_dq, zero_dkdv })
}

/// `out`, `lse` of attention over `seqs` (see the module doc for shapes); rows outside every
/// sequence are left untouched, as the CPU reference does.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Element>(
    dev: &CudaDevice,
    variant: AttentionVariant,
    out: &mut CudaViewMut<'_, T>,
    lse: &mut CudaViewMut<'_, f32>,
    q: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
    v: &CudaView<'_, T>,
    seqs: &[AttnSeq],
    shape: &AttnShape,
) -> Result<()> {
    let lens = ForwardLens { out: out.len(), lse: lse.len(), q: q.len(), k: k.len(), v: v.len() };
    let plan = plan_forward(variant, T::DTYPE, &lens, seqs, shape)?;
    let Some(launch) = plan.launch else { return Ok(()) };
    let a = plan.args;
    let d_seqs = dev.upload(&plan.seqs)?;
    let d_tiles = dev.upload(&launch.tiles)?;
    let func = dev.function(&ATTENTION, launch.kernel)?;
    let stream = dev.stream();
    let mut b = stream.launch_builder(&func);
    b.arg(out).arg(lse).arg(q).arg(k).arg(v).arg(&d_seqs).arg(&d_tiles);
    b.arg(&a.n_heads).arg(&a.n_kv_heads).arg(&a.head_dim).arg(&a.scale).arg(&a.causal).arg(&a.window);
    // SAFETY: launch.kernel is one of kernels/attention.cu's forward kernels, (T* out, float* lse,
    // const T* q, const T* k, const T* v, const int* seqs, const int* tiles, int n_heads,
    // int n_kv_heads, int head_dim, float scale, int causal, int window), matching the arguments
    // above with T = f32 or __nv_bfloat16. plan_forward checked every length against the shape
    // and every sequence against the buffers; the tile table has grid.x (sequence, first row)
    // pairs, each inside its sequence. The outputs are exclusive borrows, so they alias no input;
    // d_seqs and d_tiles are freed in stream order after the kernel.
    unsafe { b.launch(launch.config) }.map_err(CudaError::driver(format!(
        "launching {} (Nq={}, n_heads={}, head_dim={})",
        launch.kernel,
        q.len() / (a.n_heads as usize * a.head_dim as usize),
        a.n_heads,
        a.head_dim
    )))?;
    Ok(())
}

/// dq, dk, dv (all OVERWRITTEN) of [`attention_forward`] given dout and the forward's q, k, v,
/// out, lse. `delta` is scratch, (Nq, n_heads) f32, overwritten. Sequences' key ranges must be
/// disjoint. Deterministic: no atomics (see kernels/attention.cu).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Element>(
    dev: &CudaDevice,
    variant: AttentionVariant,
    dq: &mut CudaViewMut<'_, T>,
    dk: &mut CudaViewMut<'_, T>,
    dv: &mut CudaViewMut<'_, T>,
    delta: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, T>,
    q: &CudaView<'_, T>,
    k: &CudaView<'_, T>,
    v: &CudaView<'_, T>,
    out: &CudaView<'_, T>,
    lse: &CudaView<'_, f32>,
    seqs: &[AttnSeq],
    shape: &AttnShape,
) -> Result<()> {
    const OP: &str = "attention_backward";
    let lens = BackwardLens {
        dq: dq.len(),
        dk: dk.len(),
        dv: dv.len(),
        delta: delta.len(),
        dout: dout.len(),
        q: q.len(),
        k: k.len(),
        v: v.len(),
        out: out.len(),
        lse: lse.len(),
    };
    let plan = plan_backward(variant, T::DTYPE, &lens, seqs, shape)?;
    let a = plan.args;
    let stream = dev.stream();
    if plan.zero_dq {
        stream.memset_zeros(dq).map_err(CudaError::driver(format!("{OP}: zeroing dq ({} elements)", lens.dq)))?;
    }
    if plan.zero_dkdv {
        stream.memset_zeros(dk).map_err(CudaError::driver(format!("{OP}: zeroing dk ({} elements)", lens.dk)))?;
        stream.memset_zeros(dv).map_err(CudaError::driver(format!("{OP}: zeroing dv ({} elements)", lens.dv)))?;
    }
    if let Some(launch) = &plan.delta {
        let func = dev.function(&ATTENTION, launch.kernel)?;
        let mut b = stream.launch_builder(&func);
        b.arg(&mut *delta).arg(dout).arg(out).arg(&plan.delta_rows).arg(&a.head_dim);
        // SAFETY: attention_backward_delta_{f32,bf16}(float* delta, const T* dout, const T* out,
        // int rows, int head_dim); dout and out hold rows · head_dim elements and delta rows
        // (checked by plan_backward); threads past `rows` return.
        unsafe { b.launch(launch.config) }
            .map_err(CudaError::driver(format!("launching {} ({} rows)", launch.kernel, plan.delta_rows)))?;
    }
    let d_seqs = dev.upload(&plan.seqs)?;
    let delta_view = delta.as_view();
    if let Some(launch) = &plan.dq {
        let d_tiles = dev.upload(&launch.tiles)?;
        let func = dev.function(&ATTENTION, launch.kernel)?;
        let mut b = stream.launch_builder(&func);
        b.arg(&mut *dq).arg(dout).arg(q).arg(k).arg(v).arg(lse).arg(&delta_view).arg(&d_seqs).arg(&d_tiles);
        b.arg(&a.n_heads).arg(&a.n_kv_heads).arg(&a.head_dim).arg(&a.scale).arg(&a.causal).arg(&a.window);
        // SAFETY: attention_backward_dq_{f32,bf16}_{naive,fused}(T* dq, const T* dout, const T* q,
        // const T* k, const T* v, const float* lse, const float* delta, const int* seqs,
        // const int* tiles, int n_heads, int n_kv_heads, int head_dim, float scale, int causal,
        // int window), matching the arguments above. Lengths and sequences were checked by
        // plan_backward; delta was written by the launch before it on the same stream; dq is an
        // exclusive borrow aliasing no input.
        unsafe { b.launch(launch.config) }.map_err(CudaError::driver(format!(
            "launching {} ({} tiles)",
            launch.kernel,
            launch.tiles.len() / 2
        )))?;
    }
    if let Some(launch) = &plan.dkdv {
        let d_tiles = dev.upload(&launch.tiles)?;
        let func = dev.function(&ATTENTION, launch.kernel)?;
        let mut b = stream.launch_builder(&func);
        b.arg(&mut *dk).arg(&mut *dv).arg(dout).arg(q).arg(k).arg(v);
        b.arg(lse).arg(&delta_view).arg(&d_seqs).arg(&d_tiles);
        b.arg(&a.n_heads).arg(&a.n_kv_heads).arg(&a.head_dim).arg(&a.scale).arg(&a.causal).arg(&a.window);
        // SAFETY: attention_backward_dkdv_{f32,bf16}_{naive,fused}(T* dk, T* dv, const T* dout,
        // const T* q, const T* k, const T* v, const float* lse, const float* delta,
        // const int* seqs, const int* tiles, int n_heads, int n_kv_heads, int head_dim,
        // float scale, int causal, int window), matching the arguments above. Key ranges are
        // disjoint (plan_backward), so each dk/dv row is written by one thread only; dk and dv are
        // distinct exclusive borrows.
        unsafe { b.launch(launch.config) }.map_err(CudaError::driver(format!(
            "launching {} ({} tiles)",
            launch.kernel,
            launch.tiles.len() / 2
        )))?;
    }
    Ok(())
}
