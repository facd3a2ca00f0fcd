//! Launchers for `kernels/rope.cu`: rotate-half rotary embedding, forward and backward (the
//! transpose rotation), in place on x: (N, n_heads, head_dim) of `T`, as
//! `Backend::rope_forward/backward`. cos, sin: (P, head_dim/2) of `T`; positions: (N) host `u32`,
//! each < P.
//!
//! [`plan`] checks every length and position (an out-of-range position is an error naming its
//! index and value, as the CPU reference's) and picks the kernel and grid; the launchers and the
//! host-harness tests (`tests/cuda_layers.rs`) both use it.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::layer_util::{check_len, fits_int, grid_stride, per_thread, shape_err, unsupported, variant_enum};
use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::ROPE;

variant_enum! {
    /// RoPE kernel variants (see the header of `kernels/rope.cu`):
    /// - `Naive`: one thread per (row, head), f32 only: the reference.
    /// - `Flat`: one thread per rotated pair, grid-stride, f32 and bf16.
    RopeVariant, "rope", { Naive => "naive", Flat => "flat" }
}

/// Which rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeDirection {
    Forward,
    Backward,
}

impl RopeDirection {
    fn op(self) -> &'static str {
        match self {
            RopeDirection::Forward => "rope_forward",
            RopeDirection::Backward => "rope_backward",
        }
    }
}

impl RopeVariant {
    /// The kernel for `dir` and `dtype`, if this variant has one.
    pub fn kernel(self, dir: RopeDirection, dtype: DType) -> Option<&'static str> {
        use RopeDirection::{Backward, Forward};
        match (self, dir, dtype) {
            (RopeVariant::Naive, Forward, DType::F32) => Some("rope_forward_f32_naive"),
            (RopeVariant::Naive, Backward, DType::F32) => Some("rope_backward_f32_naive"),
            (RopeVariant::Naive, _, DType::Bf16) => None,
            (RopeVariant::Flat, Forward, DType::F32) => Some("rope_forward_f32_flat"),
            (RopeVariant::Flat, Backward, DType::F32) => Some("rope_backward_f32_flat"),
            (RopeVariant::Flat, Forward, DType::Bf16) => Some("rope_forward_bf16_flat"),
            (RopeVariant::Flat, Backward, DType::Bf16) => Some("rope_backward_bf16_flat"),
        }
    }
}

/// A checked launch: kernel, grid (None: nothing to do), positions as `int`, N, H, D.
#[derive(Clone, Debug)]
pub struct RopePlan {
    pub kernel: &'static str,
    pub config: Option<LaunchConfig>,
    pub positions: Vec<i32>,
    pub n: i32,
    pub n_heads: i32,
    pub head_dim: i32,
}

/// Checks lengths, head_dim and positions, and plans the launch.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    variant: RopeVariant,
    dir: RopeDirection,
    dtype: DType,
    x: usize,
    cos: usize,
    sin: usize,
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<RopePlan> {
    let op = dir.op();
    let kernel = variant.kernel(dir, dtype).ok_or_else(|| {
        unsupported(op, variant.name(), RopeVariant::ALL, dtype, |v, d| v.kernel(dir, d))
    })?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(shape_err(op, format!("head_dim {head_dim} must be even and nonzero")));
    }
    let half = head_dim / 2;
    let n = positions.len();
    let want = n.saturating_mul(n_heads).saturating_mul(head_dim);
    check_len(op, "x", x, &format!("(N={n}, n_heads={n_heads}, head_dim={head_dim})"), want)?;
    fits_int(op, "x", x)?;
    fits_int(op, "one row (n_heads·head_dim)", n_heads.saturating_mul(head_dim))?;
    if !cos.is_multiple_of(half) {
        return Err(shape_err(op, format!("cos has {cos} elements, not a multiple of head_dim/2 = {half}")));
    }
    let table_rows = cos / half;
    check_len(op, "sin", sin, &format!("(P={table_rows}, head_dim/2={half})"), cos)?;
    fits_int(op, "cos", cos)?;
    let positions = positions
        .iter()
        .enumerate()
        .map(|(t, &p)| {
            if (p as usize) < table_rows {
                Ok(p as i32) // < P, and P·half fits an int
            } else {
                Err(shape_err(op, format!("positions[{t}] = {p} is out of range for cos/sin tables of {table_rows} rows")))
            }
        })
        .collect::<Result<Vec<i32>>>()?;
    let config = match (x, variant) {
        (0, _) => None,
        (_, RopeVariant::Naive) => Some(per_thread(op, n * n_heads)?),
        (_, RopeVariant::Flat) => Some(grid_stride(n * n_heads * half)),
    };
    Ok(RopePlan {
        kernel,
        config,
        positions,
        n: n as i32,
        n_heads: n_heads as i32, // fit: n_heads·head_dim ≤ len(x), which fits an int
        head_dim: head_dim as i32,
    })
}

/// Rotates x: (N, n_heads, head_dim) in place (`dir` Forward) or applies the transpose rotation
/// to a gradient (`Backward`), with cos, sin: (P, head_dim/2) and positions: (N) on the host.
#[allow(clippy::too_many_arguments)]
pub fn rope<T: Element>(
    dev: &CudaDevice,
    variant: RopeVariant,
    dir: RopeDirection,
    x: &mut CudaViewMut<'_, T>,
    cos: &CudaView<'_, T>,
    sin: &CudaView<'_, T>,
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let p = plan(variant, dir, T::DTYPE, x.len(), cos.len(), sin.len(), positions, n_heads, head_dim)?;
    let Some(cfg) = p.config else { return Ok(()) };
    let d_pos = dev.upload(&p.positions)?;
    let func = dev.function(&ROPE, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(x).arg(cos).arg(sin).arg(&d_pos).arg(&p.n).arg(&p.n_heads).arg(&p.head_dim);
    // SAFETY: p.kernel is a kernel of kernels/rope.cu, (T* x, const T* cos, const T* sin,
    // const int* positions, int N, int H, int D), matching the arguments. x holds N·H·D
    // elements, cos and sin P·D/2, positions N values in [0, P), D even (checked by plan); the
    // grid covers N·H threads (naive) or loops below N·H·D/2 pairs. `x` is an exclusive borrow.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!(
        "launching {} (N={}, H={}, D={})",
        p.kernel, p.n, p.n_heads, p.head_dim
    )))?;
    Ok(())
}

/// [`rope`] forward, as `Backend::rope_forward`.
#[allow(clippy::too_many_arguments)]
pub fn rope_forward<T: Element>(
    dev: &CudaDevice,
    variant: RopeVariant,
    x: &mut CudaViewMut<'_, T>,
    cos: &CudaView<'_, T>,
    sin: &CudaView<'_, T>,
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<()> {
    rope(dev, variant, RopeDirection::Forward, x, cos, sin, positions, n_heads, head_dim)
}

/// [`rope`] backward (transpose rotation), as `Backend::rope_backward`.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward<T: Element>(
    dev: &CudaDevice,
    variant: RopeVariant,
    dx: &mut CudaViewMut<'_, T>,
    cos: &CudaView<'_, T>,
    sin: &CudaView<'_, T>,
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<()> {
    rope(dev, variant, RopeDirection::Backward, dx, cos, sin, positions, n_heads, head_dim)
}
