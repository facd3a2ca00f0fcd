//! Launchers for `kernels/swiglu.cu`: `out = silu(gate) * up` and its backward (dgate, dup
//! OVERWRITTEN), elementwise on (N, I) buffers of `T`, as `Backend::swiglu_forward/backward`.
//!
//! [`plan_forward`]/[`plan_backward`] check the lengths (naming the op) and picks the kernel and grid; the launchers and
//! the host-harness tests (`tests/cuda_layers.rs`) both use it.

use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

use super::layer_util::{plan_elementwise, unsupported, variant_enum, ElementwisePlan};
use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::SWIGLU;

variant_enum! {
    /// SwiGLU kernel variants (see the header of `kernels/swiglu.cu`):
    /// - `Naive`: one thread per element, f32 only: the reference.
    /// - `Grid`: grid-stride loop over a capped grid, f32 and bf16 (f32 math).
    SwigluVariant, "swiglu", { Naive => "naive", Grid => "grid" }
}

impl SwigluVariant {
    /// The forward kernel for `dtype`, if this variant has one.
    pub fn forward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (SwigluVariant::Naive, DType::F32) => Some("swiglu_forward_f32_naive"),
            (SwigluVariant::Naive, DType::Bf16) => None,
            (SwigluVariant::Grid, DType::F32) => Some("swiglu_forward_f32_grid"),
            (SwigluVariant::Grid, DType::Bf16) => Some("swiglu_forward_bf16_grid"),
        }
    }

    /// The backward kernel for `dtype`, if this variant has one.
    pub fn backward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (SwigluVariant::Naive, DType::F32) => Some("swiglu_backward_f32_naive"),
            (SwigluVariant::Naive, DType::Bf16) => None,
            (SwigluVariant::Grid, DType::F32) => Some("swiglu_backward_f32_grid"),
            (SwigluVariant::Grid, DType::Bf16) => Some("swiglu_backward_bf16_grid"),
        }
    }
}

fn plan(
    op: &'static str,
    kernel: Option<&'static str>,
    variant: SwigluVariant,
    dtype: DType,
    lens: &[(&str, usize)],
) -> Result<ElementwisePlan> {
    let has = if op == "swiglu_forward" { SwigluVariant::forward_kernel } else { SwigluVariant::backward_kernel };
    let kernel = kernel.ok_or_else(|| unsupported(op, variant.name(), SwigluVariant::ALL, dtype, has))?;
    plan_elementwise(op, kernel, variant == SwigluVariant::Naive, lens)
}

/// The forward launch for these lengths (checked), shared by [`swiglu_forward`] and the tests.
pub fn plan_forward(variant: SwigluVariant, dtype: DType, out: usize, gate: usize, up: usize) -> Result<ElementwisePlan> {
    plan("swiglu_forward", variant.forward_kernel(dtype), variant, dtype, &[("out", out), ("gate", gate), ("up", up)])
}

/// The backward launch for these lengths (checked), shared by [`swiglu_backward`] and the tests.
pub fn plan_backward(
    variant: SwigluVariant,
    dtype: DType,
    dgate: usize,
    dup: usize,
    dout: usize,
    gate: usize,
    up: usize,
) -> Result<ElementwisePlan> {
    plan(
        "swiglu_backward",
        variant.backward_kernel(dtype),
        variant,
        dtype,
        &[("dgate", dgate), ("dup", dup), ("dout", dout), ("gate", gate), ("up", up)],
    )
}

/// `out = silu(gate) * up`; out, gate, up: (N·I) of `T`.
pub fn swiglu_forward<T: Element>(
    dev: &CudaDevice,
    variant: SwigluVariant,
    out: &mut CudaViewMut<'_, T>,
    gate: &CudaView<'_, T>,
    up: &CudaView<'_, T>,
) -> Result<()> {
    let p = plan_forward(variant, T::DTYPE, out.len(), gate.len(), up.len())?;
    let Some(cfg) = p.config else { return Ok(()) };
    let func = dev.function(&SWIGLU, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(out).arg(gate).arg(up).arg(&p.n);
    // SAFETY: p.kernel is a forward kernel of kernels/swiglu.cu, (T* out, const T* gate,
    // const T* up, int n), matching the arguments. All three hold n elements (checked by plan);
    // the naive grid covers n threads and the grid kernels loop below n. `out` is an exclusive
    // borrow, so it aliases no input.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!("launching {} (n={})", p.kernel, p.n)))?;
    Ok(())
}

/// `dgate`, `dup` OVERWRITTEN with the gradients of [`swiglu_forward`] given dout; all (N·I).
pub fn swiglu_backward<T: Element>(
    dev: &CudaDevice,
    variant: SwigluVariant,
    dgate: &mut CudaViewMut<'_, T>,
    dup: &mut CudaViewMut<'_, T>,
    dout: &CudaView<'_, T>,
    gate: &CudaView<'_, T>,
    up: &CudaView<'_, T>,
) -> Result<()> {
    let p = plan_backward(variant, T::DTYPE, dgate.len(), dup.len(), dout.len(), gate.len(), up.len())?;
    let Some(cfg) = p.config else { return Ok(()) };
    let func = dev.function(&SWIGLU, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(dgate).arg(dup).arg(dout).arg(gate).arg(up).arg(&p.n);
    // SAFETY: p.kernel is a backward kernel of kernels/swiglu.cu, (T* dgate, T* dup,
    // const T* dout, const T* gate, const T* up, int n), matching the arguments; all hold n
    // elements (checked by plan). dgate and dup are distinct exclusive borrows.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!("launching {} (n={})", p.kernel, p.n)))?;
    Ok(())
}
