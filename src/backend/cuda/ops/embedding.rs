//! Launchers for `kernels/embedding.cu`: token embedding forward (`out[t] = table[ids[t]]`) and
//! backward (`dtable[ids[t]] += dout[t]`, repeated ids accumulate), as
//! `Backend::embedding_forward/backward`. Shapes: out, dout: (N, C); table, dtable: (V, C);
//! ids: (N) host `u32`, as the trait passes them.
//!
//! [`plan_forward`]/[`plan_backward`] check every length and every id (an out-of-range id is an
//! error naming its index and value, as the CPU reference's), convert ids to the kernels' `int`,
//! and for the coalesced backward sort the (id, token) pairs into the CSR lists the kernel reads
//! ([`SortedIds`]). The launchers upload those small int lists and launch; the host-harness tests
//! (`tests/cuda_layers.rs`) run the same plans.
//!
//! Determinism of the backward (no float atomics): `Naive` gives each thread one column and scans
//! the tokens in order; `Coalesced` gives each block one distinct id and sums that id's tokens in
//! token order. Both add in the CPU reference's order, so all three agree bitwise.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::layer_util::{
    check_len, grid_stride, per_thread, rows_of, shape_err, unsupported, variant_enum, BLOCK,
};
use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::EMBEDDING;

variant_enum! {
    /// Embedding kernel variants (see the header of `kernels/embedding.cu`):
    /// - `Naive`: forward one thread per token row (f32); backward one thread per column scanning
    ///   all tokens (f32). The reference.
    /// - `Coalesced`: forward one thread per element (f32, bf16); backward over the launcher's
    ///   sorted (id, token) lists, one block per distinct id (f32).
    EmbeddingVariant, "embedding", { Naive => "naive", Coalesced => "coalesced" }
}

/// The largest grid.x of the coalesced backward (it loops over more distinct ids).
const MAX_BACKWARD_BLOCKS: usize = 65_535;

impl EmbeddingVariant {
    /// The forward kernel for `dtype`, if this variant has one.
    pub fn forward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (EmbeddingVariant::Naive, DType::F32) => Some("embedding_forward_f32_naive"),
            (EmbeddingVariant::Naive, DType::Bf16) => None,
            (EmbeddingVariant::Coalesced, DType::F32) => Some("embedding_forward_f32_coalesced"),
            (EmbeddingVariant::Coalesced, DType::Bf16) => Some("embedding_forward_bf16_coalesced"),
        }
    }

    /// The backward kernel for `dtype` (gradients are f32 only).
    pub fn backward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (EmbeddingVariant::Naive, DType::F32) => Some("embedding_backward_f32_naive"),
            (EmbeddingVariant::Coalesced, DType::F32) => Some("embedding_backward_f32_coalesced"),
            (_, DType::Bf16) => None,
        }
    }
}

/// The ids as the kernels' `int`, each checked to be a row of a table of `vocab` rows.
pub fn check_ids(op: &'static str, ids: &[u32], vocab: usize) -> Result<Vec<i32>> {
    ids.iter()
        .enumerate()
        .map(|(t, &id)| {
            if (id as usize) < vocab {
                Ok(id as i32) // < vocab, which fits an int (rows_of)
            } else {
                Err(shape_err(op, format!("ids[{t}] = {id} is out of range for a table of {vocab} rows")))
            }
        })
        .collect()
}

/// The (id, token) pairs sorted by id, tokens in order within an id, as CSR lists:
/// `uniq[u]` the u-th distinct id (ascending), `order[starts[u]..starts[u + 1]]` its tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortedIds {
    pub uniq: Vec<i32>,
    pub starts: Vec<i32>,
    pub order: Vec<i32>,
}

impl SortedIds {
    /// From checked ids (non-negative, N fits an int).
    pub fn new(ids: &[i32]) -> SortedIds {
        let mut order: Vec<i32> = (0..ids.len() as i32).collect();
        order.sort_by_key(|&t| ids[t as usize]); // stable: tokens stay in order within an id
        let (mut uniq, mut starts) = (Vec::new(), Vec::new());
        for (k, &t) in order.iter().enumerate() {
            let id = ids[t as usize];
            if uniq.last() != Some(&id) {
                uniq.push(id);
                starts.push(k as i32);
            }
        }
        starts.push(order.len() as i32);
        SortedIds { uniq, starts, order }
    }
}

/// A checked forward launch: kernel, grid (None: nothing to do), the ids as `int`, N and C.
#[derive(Clone, Debug)]
pub struct ForwardPlan {
    pub kernel: &'static str,
    pub config: Option<LaunchConfig>,
    pub ids: Vec<i32>,
    pub n: i32,
    pub c: i32,
}

/// A checked backward launch. `sorted` is set for the coalesced kernel (which takes
/// uniq, starts, order, U, C instead of ids, N, C).
#[derive(Clone, Debug)]
pub struct BackwardPlan {
    pub kernel: &'static str,
    pub config: Option<LaunchConfig>,
    pub ids: Vec<i32>,
    pub sorted: Option<SortedIds>,
    pub n: i32,
    pub c: i32,
}

/// Checks the forward's lengths and ids and plans its launch.
pub fn plan_forward(
    variant: EmbeddingVariant,
    dtype: DType,
    out: usize,
    table: usize,
    ids: &[u32],
    dim: usize,
) -> Result<ForwardPlan> {
    const OP: &str = "embedding_forward";
    let kernel = variant
        .forward_kernel(dtype)
        .ok_or_else(|| unsupported(OP, variant.name(), EmbeddingVariant::ALL, dtype, EmbeddingVariant::forward_kernel))?;
    let vocab = rows_of(OP, "table", table, dim)?;
    let n = ids.len();
    check_len(OP, "out", out, &format!("(N={n}, C={dim})"), n.saturating_mul(dim))?;
    rows_of(OP, "out", out, dim)?;
    let ids = check_ids(OP, ids, vocab)?;
    let config = match (n, variant) {
        (0, _) => None,
        (_, EmbeddingVariant::Naive) => Some(per_thread(OP, n)?),
        (_, EmbeddingVariant::Coalesced) => Some(grid_stride(n * dim)),
    };
    Ok(ForwardPlan { kernel, config, ids, n: n as i32, c: dim as i32 })
}

/// Checks the backward's lengths and ids and plans its launch (sorting the ids for `Coalesced`).
pub fn plan_backward(
    variant: EmbeddingVariant,
    dtype: DType,
    dtable: usize,
    dout: usize,
    ids: &[u32],
    dim: usize,
) -> Result<BackwardPlan> {
    const OP: &str = "embedding_backward";
    let kernel = variant
        .backward_kernel(dtype)
        .ok_or_else(|| unsupported(OP, variant.name(), EmbeddingVariant::ALL, dtype, EmbeddingVariant::backward_kernel))?;
    let vocab = rows_of(OP, "dtable", dtable, dim)?;
    let n = ids.len();
    check_len(OP, "dout", dout, &format!("(N={n}, C={dim})"), n.saturating_mul(dim))?;
    rows_of(OP, "dout", dout, dim)?;
    let ids = check_ids(OP, ids, vocab)?;
    let (config, sorted) = match (n, variant) {
        (0, _) => (None, None),
        (_, EmbeddingVariant::Naive) => (Some(per_thread(OP, dim)?), None),
        (_, EmbeddingVariant::Coalesced) => {
            let sorted = SortedIds::new(&ids);
            let blocks = sorted.uniq.len().min(MAX_BACKWARD_BLOCKS) as u32;
            // Threads stride the columns: no more than C rounded up to a warp.
            let threads = (dim.div_ceil(32) * 32).min(BLOCK as usize) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            (Some(cfg), Some(sorted))
        }
    };
    Ok(BackwardPlan { kernel, config, ids, sorted, n: n as i32, c: dim as i32 })
}

/// `out[t] = table[ids[t]]`; out: (N, dim), table: (V, dim) of `T`; ids: (N) on the host.
pub fn embedding_forward<T: Element>(
    dev: &CudaDevice,
    variant: EmbeddingVariant,
    out: &mut CudaViewMut<'_, T>,
    table: &CudaView<'_, T>,
    ids: &[u32],
    dim: usize,
) -> Result<()> {
    let p = plan_forward(variant, T::DTYPE, out.len(), table.len(), ids, dim)?;
    let Some(cfg) = p.config else { return Ok(()) };
    let d_ids = dev.upload(&p.ids)?;
    let func = dev.function(&EMBEDDING, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(out).arg(table).arg(&d_ids).arg(&p.n).arg(&p.c);
    // SAFETY: p.kernel is a forward kernel of kernels/embedding.cu, (T* out, const T* table,
    // const int* ids, int N, int C), matching the arguments. out holds N·C, table V·C elements,
    // d_ids N ints each in [0, V) (all checked by plan_forward); the grid covers N rows (naive)
    // or loops below N·C. `out` is an exclusive borrow, so it aliases no input.
    unsafe { launch.launch(cfg) }
        .map_err(CudaError::driver(format!("launching {} ({}×{})", p.kernel, p.n, p.c)))?;
    Ok(())
}

/// `dtable[ids[t]] += dout[t]`; dtable: (V, dim), dout: (N, dim) f32; ids: (N) on the host.
pub fn embedding_backward(
    dev: &CudaDevice,
    variant: EmbeddingVariant,
    dtable: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    ids: &[u32],
    dim: usize,
) -> Result<()> {
    let p = plan_backward(variant, DType::F32, dtable.len(), dout.len(), ids, dim)?;
    let Some(cfg) = p.config else { return Ok(()) };
    let func = dev.function(&EMBEDDING, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    let what = format!("launching {} ({}×{})", p.kernel, p.n, p.c);
    match &p.sorted {
        None => {
            let d_ids = dev.upload(&p.ids)?;
            launch.arg(dtable).arg(dout).arg(&d_ids).arg(&p.n).arg(&p.c);
            // SAFETY: embedding_backward_f32_naive(float* dtable, const float* dout,
            // const int* ids, int N, int C), matching the arguments; dtable holds V·C, dout N·C,
            // d_ids N ints in [0, V) (checked); the grid covers C threads. Each thread owns one
            // column, so no two threads write one element. dtable is an exclusive borrow.
            unsafe { launch.launch(cfg) }.map_err(CudaError::driver(what))?;
        }
        Some(s) => {
            let (d_uniq, d_starts, d_order) = (dev.upload(&s.uniq)?, dev.upload(&s.starts)?, dev.upload(&s.order)?);
            let u = s.uniq.len() as i32;
            launch.arg(dtable).arg(dout).arg(&d_uniq).arg(&d_starts).arg(&d_order).arg(&u).arg(&p.c);
            // SAFETY: embedding_backward_f32_coalesced(float* dtable, const float* dout,
            // const int* uniq, const int* starts, const int* order, int U, int C), matching the
            // arguments; uniq holds U distinct ids in [0, V), starts U + 1 offsets into order,
            // order N token indices < N (built by SortedIds from checked ids). Distinct ids mean
            // no two blocks write one row. dtable is an exclusive borrow.
            unsafe { launch.launch(cfg) }.map_err(CudaError::driver(what))?;
        }
    }
    Ok(())
}
