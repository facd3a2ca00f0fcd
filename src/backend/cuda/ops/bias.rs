//! Launchers for `kernels/bias.cu`: a Linear layer's bias, `out (N, C) += bias (C)` on every row,
//! and its backward `dbias (C) += Σ_rows dout (N, C)`, as `Backend::bias_add/bias_backward`
//! (C is the length of bias / dbias).
//!
//! [`plan_add`]/[`plan_backward`] check the lengths (naming the op and shapes) and pick kernels
//! and grids; the launchers and the host-harness tests (`tests/cuda_layers.rs`) use them.
//!
//! Determinism of the backward (no float atomics): `Naive` sums each column in one thread, rows
//! in order; `Grid` sums fixed row chunks per (column, chunk) thread into a partials buffer, then
//! adds the chunks in order per column. Both give the same bits on every run.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::layer_util::{grid_stride, per_thread, rows_of, shape_err, unsupported, variant_enum, BLOCK};
use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::BIAS;

variant_enum! {
    /// Bias kernel variants (see the header of `kernels/bias.cu`):
    /// - `Naive`: add one thread per element (f32); backward one thread per column (f32).
    /// - `Grid`: add by grid-stride loop (f32, bf16); backward in two passes over row chunks (f32).
    BiasVariant, "bias", { Naive => "naive", Grid => "grid" }
}

/// Grid backward: at least this many rows per chunk, and at most MAX_CHUNKS chunks.
pub const MIN_ROWS_PER_CHUNK: usize = 8;
pub const MAX_CHUNKS: usize = 1024;

impl BiasVariant {
    /// The bias_add kernel for `dtype`, if this variant has one.
    pub fn add_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (BiasVariant::Naive, DType::F32) => Some("bias_add_f32_naive"),
            (BiasVariant::Naive, DType::Bf16) => None,
            (BiasVariant::Grid, DType::F32) => Some("bias_add_f32_grid"),
            (BiasVariant::Grid, DType::Bf16) => Some("bias_add_bf16_grid"),
        }
    }

    /// The backward kernels for `dtype` in launch order (f32 only).
    pub fn backward_kernels(self, dtype: DType) -> Option<&'static [&'static str]> {
        match (self, dtype) {
            (BiasVariant::Naive, DType::F32) => Some(&["bias_backward_f32_naive"]),
            (BiasVariant::Grid, DType::F32) => Some(&["bias_backward_partials_f32_grid", "bias_backward_finish_f32_grid"]),
            (_, DType::Bf16) => None,
        }
    }

    fn backward_first(self, dtype: DType) -> Option<&'static str> {
        self.backward_kernels(dtype).map(|k| k[0])
    }
}

/// A checked bias_add: kernel, grid (None: nothing to do), N and C.
#[derive(Clone, Debug)]
pub struct AddPlan {
    pub kernel: &'static str,
    pub config: Option<LaunchConfig>,
    pub n: i32,
    pub c: i32,
}

/// One kernel launch of a backward plan.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: &'static str,
    pub config: LaunchConfig,
}

/// A checked bias_backward: launches in order (empty when N = 0); for `Grid` the first writes
/// `chunks × C` partials (f32 workspace) of `rows_per_chunk` rows each, the second reads them.
#[derive(Clone, Debug)]
pub struct BackwardPlan {
    pub launches: Vec<Launch>,
    pub n: i32,
    pub c: i32,
    pub chunks: i32,
    pub rows_per_chunk: i32,
}

/// Checks a bias_add call (out: N·C, bias: C) and plans it.
pub fn plan_add(variant: BiasVariant, dtype: DType, out: usize, bias: usize) -> Result<AddPlan> {
    const OP: &str = "bias_add";
    let kernel = variant
        .add_kernel(dtype)
        .ok_or_else(|| unsupported(OP, variant.name(), BiasVariant::ALL, dtype, BiasVariant::add_kernel))?;
    if bias == 0 {
        return Err(shape_err(OP, "bias is empty"));
    }
    let n = rows_of(OP, "out", out, bias)?;
    let config = match (n, variant) {
        (0, _) => None,
        (_, BiasVariant::Naive) => Some(per_thread(OP, out)?),
        (_, BiasVariant::Grid) => Some(grid_stride(out)),
    };
    Ok(AddPlan { kernel, config, n: n as i32, c: bias as i32 })
}

/// Checks a bias_backward call (dbias: C, dout: N·C) and plans it.
pub fn plan_backward(variant: BiasVariant, dtype: DType, dbias: usize, dout: usize) -> Result<BackwardPlan> {
    const OP: &str = "bias_backward";
    let kernels = variant
        .backward_kernels(dtype)
        .ok_or_else(|| unsupported(OP, variant.name(), BiasVariant::ALL, dtype, BiasVariant::backward_first))?;
    if dbias == 0 {
        return Err(shape_err(OP, "dbias is empty"));
    }
    let n = rows_of(OP, "dout", dout, dbias)?;
    let c = dbias;
    let mut launches = Vec::new();
    let (mut chunks, mut rows_per_chunk) = (0, 0);
    if n > 0 {
        match variant {
            BiasVariant::Naive => launches.push(Launch { kernel: kernels[0], config: per_thread(OP, c)? }),
            BiasVariant::Grid => {
                rows_per_chunk = n.div_ceil(MAX_CHUNKS).max(MIN_ROWS_PER_CHUNK);
                chunks = n.div_ceil(rows_per_chunk);
                let cols = per_thread(OP, c)?;
                let partials = LaunchConfig {
                    grid_dim: (cols.grid_dim.0, chunks as u32, 1),
                    block_dim: (BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                };
                launches.push(Launch { kernel: kernels[0], config: partials });
                launches.push(Launch { kernel: kernels[1], config: cols });
            }
        }
    }
    Ok(BackwardPlan { launches, n: n as i32, c: c as i32, chunks: chunks as i32, rows_per_chunk: rows_per_chunk as i32 })
}

/// `out (N, C) += bias (C)` on every row; `T` f32 or bf16.
pub fn bias_add<T: Element>(
    dev: &CudaDevice,
    variant: BiasVariant,
    out: &mut CudaViewMut<'_, T>,
    bias: &CudaView<'_, T>,
) -> Result<()> {
    let p = plan_add(variant, T::DTYPE, out.len(), bias.len())?;
    let Some(cfg) = p.config else { return Ok(()) };
    let func = dev.function(&BIAS, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(out).arg(bias).arg(&p.n).arg(&p.c);
    // SAFETY: p.kernel is an add kernel of kernels/bias.cu, (T* out, const T* bias, int N,
    // int C), matching the arguments; out holds N·C and bias C elements (checked by plan_add);
    // the grid covers N·C threads (naive) or loops below N·C. `out` is an exclusive borrow.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!("launching {} ({}×{})", p.kernel, p.n, p.c)))?;
    Ok(())
}

/// `dbias (C) += Σ_rows dout (N, C)`, f32.
pub fn bias_backward(
    dev: &CudaDevice,
    variant: BiasVariant,
    dbias: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
) -> Result<()> {
    let p = plan_backward(variant, DType::F32, dbias.len(), dout.len())?;
    if p.launches.is_empty() {
        return Ok(());
    }
    let stream = dev.stream();
    let what = |k: &str| format!("launching {k} ({}×{})", p.n, p.c);
    match variant {
        BiasVariant::Naive => {
            let l = &p.launches[0];
            let func = dev.function(&BIAS, l.kernel)?;
            let mut launch = stream.launch_builder(&func);
            launch.arg(dbias).arg(dout).arg(&p.n).arg(&p.c);
            // SAFETY: bias_backward_f32_naive(float* dbias, const float* dout, int N, int C),
            // matching the arguments; dbias holds C, dout N·C (checked); C threads, guarded.
            unsafe { launch.launch(l.config) }.map_err(CudaError::driver(what(l.kernel)))?;
        }
        BiasVariant::Grid => {
            let mut partials = stream
                .alloc_zeros::<f32>(p.chunks as usize * p.c as usize)
                .map_err(CudaError::driver(format!("allocating bias_backward partials ({}×{})", p.chunks, p.c)))?;
            let (l0, l1) = (&p.launches[0], &p.launches[1]);
            let f0 = dev.function(&BIAS, l0.kernel)?;
            let mut launch = stream.launch_builder(&f0);
            launch.arg(&mut partials).arg(dout).arg(&p.n).arg(&p.c).arg(&p.rows_per_chunk);
            // SAFETY: bias_backward_partials_f32_grid(float* partials, const float* dout, int N,
            // int C, int rows_per_chunk), matching the arguments; partials holds chunks·C
            // elements, grid.y = chunks and chunks·rows_per_chunk ≥ N; columns guarded by C.
            unsafe { launch.launch(l0.config) }.map_err(CudaError::driver(what(l0.kernel)))?;
            let f1 = dev.function(&BIAS, l1.kernel)?;
            let mut launch = stream.launch_builder(&f1);
            launch.arg(dbias).arg(&partials).arg(&p.chunks).arg(&p.c);
            // SAFETY: bias_backward_finish_f32_grid(float* dbias, const float* partials,
            // int chunks, int C), matching the arguments; same stream, so it reads the partials
            // the previous launch wrote. dbias holds C elements; C threads, guarded.
            unsafe { launch.launch(l1.config) }.map_err(CudaError::driver(what(l1.kernel)))?;
        }
    }
    Ok(())
}
