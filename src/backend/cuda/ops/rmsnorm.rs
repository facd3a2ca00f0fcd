//! Launchers for `kernels/rmsnorm.cu`: RMSNorm forward and backward.
//!
//! Shapes (as `Backend::rmsnorm_forward`): inp, out: (N, C); weight: (C); rstd: (N) f32. N is
//! `inp.len() / dim`. The launchers check every length before launching, and name the op and the
//! shapes when they disagree.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::RMSNORM;

/// RMSNorm kernel variants (see the header of `kernels/rmsnorm.cu`):
/// - `Naive`: one thread per row. Forward f32; backward f32 (dweight by one thread per column).
/// - `Warp`: one warp per row, shuffle reduction. Forward f32 and bf16; no backward yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RmsNormVariant {
    Naive,
    Warp,
}

/// Threads per block for every variant: 8 warps.
const BLOCK: u32 = 256;
const WARPS_PER_BLOCK: u32 = BLOCK / 32;

impl RmsNormVariant {
    pub const ALL: &'static [RmsNormVariant] = &[RmsNormVariant::Naive, RmsNormVariant::Warp];

    pub fn name(self) -> &'static str {
        match self {
            RmsNormVariant::Naive => "naive",
            RmsNormVariant::Warp => "warp",
        }
    }

    /// The variant called `name`; an unknown name is an error listing the choices.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name).ok_or_else(|| CudaError::UnknownVariant {
            concern: "rmsnorm",
            name: name.to_string(),
            choices: Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The forward kernel for `dtype`, if this variant has one.
    pub fn forward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (RmsNormVariant::Naive, DType::F32) => Some("rmsnorm_forward_f32_naive"),
            (RmsNormVariant::Naive, DType::Bf16) => None,
            (RmsNormVariant::Warp, DType::F32) => Some("rmsnorm_forward_f32_warp"),
            (RmsNormVariant::Warp, DType::Bf16) => Some("rmsnorm_forward_bf16_warp"),
        }
    }

    /// The backward kernel for `dtype`, if this variant has one.
    pub fn backward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (RmsNormVariant::Naive, DType::F32) => Some("rmsnorm_backward_f32_naive"),
            _ => None,
        }
    }

    /// The grid and block the forward launcher uses for `rows` rows (also used by the host tests).
    pub fn forward_config(self, rows: usize) -> Result<LaunchConfig> {
        self.launch_config(rows)
    }

    /// The backward launcher's grid: thread t handles row t and column t, so max(rows, dim) threads.
    pub fn backward_config(self, rows: usize, dim: usize) -> Result<LaunchConfig> {
        self.launch_config(rows.max(dim))
    }

    /// Naive: one thread per unit of work; Warp: one warp per row.
    fn launch_config(self, work: usize) -> Result<LaunchConfig> {
        let per_block = match self {
            RmsNormVariant::Naive => BLOCK,
            RmsNormVariant::Warp => WARPS_PER_BLOCK,
        } as usize;
        let blocks = u32::try_from(work.div_ceil(per_block))
            .map_err(|_| CudaError::Shape { op: "rmsnorm", detail: format!("{work} rows need too many blocks") })?;
        Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
    }
}

impl std::fmt::Display for RmsNormVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RmsNormVariant {
    type Err = CudaError;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s)
    }
}

fn unsupported(
    op: &'static str,
    variant: RmsNormVariant,
    dtype: DType,
    has: impl Fn(RmsNormVariant, DType) -> Option<&'static str>,
) -> CudaError {
    let mut available = Vec::new();
    for &v in RmsNormVariant::ALL {
        for d in [DType::F32, DType::Bf16] {
            if has(v, d).is_some() {
                available.push(format!("{v} {d}"));
            }
        }
    }
    CudaError::UnsupportedDtype { op, variant: variant.name(), dtype, available: available.join(", ") }
}

/// Rows N of an (N, dim) buffer of `len` elements, with `dim`, N and N·dim checked to fit the
/// kernels' `int` arguments.
fn rows_of(op: &'static str, what: &str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(CudaError::Shape { op, detail: "dim is 0".to_string() });
    }
    if !len.is_multiple_of(dim) {
        return Err(CudaError::Shape { op, detail: format!("{what} has {len} elements, not a multiple of dim {dim}") });
    }
    let rows = len / dim;
    if i32::try_from(rows).is_err() || i32::try_from(dim).is_err() {
        return Err(CudaError::Shape { op, detail: format!("{what} ({rows}, {dim}) exceeds the kernels' int sizes") });
    }
    Ok(rows)
}

fn check_len(op: &'static str, what: &str, got: usize, shape: &str, want: usize) -> Result<()> {
    if got != want {
        return Err(CudaError::Shape { op, detail: format!("{what} has {got} elements, expected {shape} = {want}") });
    }
    Ok(())
}

/// `out = inp * rstd * weight`, `rstd = 1/sqrt(mean(inp²) + eps)` per row.
/// out, inp: (N, dim) of `T`; weight: (dim) of `T`; rstd: (N) f32, overwritten.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward<T: Element>(
    dev: &CudaDevice,
    variant: RmsNormVariant,
    out: &mut CudaViewMut<'_, T>,
    rstd: &mut CudaViewMut<'_, f32>,
    inp: &CudaView<'_, T>,
    weight: &CudaView<'_, T>,
    dim: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_forward";
    let kernel = variant
        .forward_kernel(T::DTYPE)
        .ok_or_else(|| unsupported(OP, variant, T::DTYPE, RmsNormVariant::forward_kernel))?;
    let n = rows_of(OP, "inp", inp.len(), dim)?;
    check_len(OP, "out", out.len(), &format!("(N={n}, C={dim})"), n * dim)?;
    check_len(OP, "weight", weight.len(), &format!("(C={dim})"), dim)?;
    check_len(OP, "rstd", rstd.len(), &format!("(N={n})"), n)?;
    if !eps.is_finite() || eps < 0.0 {
        return Err(CudaError::Shape { op: OP, detail: format!("eps {eps} is not a finite non-negative number") });
    }
    if n == 0 {
        return Ok(());
    }
    let cfg = variant.forward_config(n)?;
    let (n_i, c_i) = (n as i32, dim as i32); // fit: checked by rows_of
    let func = dev.function(&RMSNORM, kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(out).arg(rstd).arg(inp).arg(weight).arg(&n_i).arg(&c_i).arg(&eps);
    // SAFETY: `kernel` is one of kernels/rmsnorm.cu's forward kernels, whose signature is
    // (T* out, float* rstd, const T* inp, const T* weight, int N, int C, float eps), matching the
    // argument types and order above (T = f32 or __nv_bfloat16, both plain 4- or 2-byte values).
    // Lengths were checked: out and inp hold N·C, weight C, rstd N elements, and the grid covers
    // N rows at the block size `launch_config` chose for this variant; threads past N return.
    // `out` and `rstd` are exclusive borrows, so no input aliases an output.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!("launching {kernel} ({n}×{dim})")))?;
    Ok(())
}

/// Accumulates the gradients of [`rmsnorm_forward`]: `dinp += ∂L/∂inp`, `dweight += ∂L/∂weight`,
/// given dout: (N, dim) and the forward's inp (N, dim), weight (dim), rstd (N). f32 only.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dev: &CudaDevice,
    variant: RmsNormVariant,
    dinp: &mut CudaViewMut<'_, f32>,
    dweight: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    inp: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dim: usize,
) -> Result<()> {
    const OP: &str = "rmsnorm_backward";
    let kernel = variant
        .backward_kernel(DType::F32)
        .ok_or_else(|| unsupported(OP, variant, DType::F32, RmsNormVariant::backward_kernel))?;
    let n = rows_of(OP, "inp", inp.len(), dim)?;
    let nc = format!("(N={n}, C={dim})");
    check_len(OP, "dinp", dinp.len(), &nc, n * dim)?;
    check_len(OP, "dout", dout.len(), &nc, n * dim)?;
    check_len(OP, "weight", weight.len(), &format!("(C={dim})"), dim)?;
    check_len(OP, "dweight", dweight.len(), &format!("(C={dim})"), dim)?;
    check_len(OP, "rstd", rstd.len(), &format!("(N={n})"), n)?;
    if n == 0 {
        return Ok(());
    }
    let cfg = variant.backward_config(n, dim)?;
    let (n_i, c_i) = (n as i32, dim as i32); // fit: checked by rows_of
    let func = dev.function(&RMSNORM, kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(dinp).arg(dweight).arg(dout).arg(inp).arg(weight).arg(rstd).arg(&n_i).arg(&c_i);
    // SAFETY: `kernel` is rmsnorm_backward_f32_naive(float* dinp, float* dweight, const float* dout,
    // const float* inp, const float* weight, const float* rstd, int N, int C), matching the
    // arguments above. dinp, dout, inp hold N·C, dweight and weight C, rstd N elements (checked);
    // the grid covers max(N, C) threads, each guarded by t < N and t < C. The outputs are
    // exclusive borrows, so they alias no input.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!("launching {kernel} ({n}×{dim})")))?;
    Ok(())
}
