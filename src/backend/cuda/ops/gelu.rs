//! Launchers for `kernels/gelu.cu`: the exact (erf) GELU, `out = x · Φ(x)`, and its backward
//! (dinp OVERWRITTEN with dout · gelu'(inp)), elementwise on (N·I) buffers of `T`, as
//! `Backend::gelu_forward/backward`.
//!
//! [`plan_forward`]/[`plan_backward`] check the lengths (naming the op) and pick the kernel and
//! grid; the launchers and the host-harness tests (`tests/cuda_layers.rs`) both use them.

use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

use super::layer_util::{plan_elementwise, unsupported, variant_enum, ElementwisePlan};
use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::GELU;

variant_enum! {
    /// GELU kernel variants (see the header of `kernels/gelu.cu`):
    /// - `Naive`: one thread per element, f64 math as the CPU reference, f32 only.
    /// - `Grid`: grid-stride loop, f32 math (Φ through `erfcf`), f32 and bf16.
    GeluVariant, "gelu", { Naive => "naive", Grid => "grid" }
}

impl GeluVariant {
    /// The forward kernel for `dtype`, if this variant has one.
    pub fn forward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (GeluVariant::Naive, DType::F32) => Some("gelu_forward_f32_naive"),
            (GeluVariant::Naive, DType::Bf16) => None,
            (GeluVariant::Grid, DType::F32) => Some("gelu_forward_f32_grid"),
            (GeluVariant::Grid, DType::Bf16) => Some("gelu_forward_bf16_grid"),
        }
    }

    /// The backward kernel for `dtype`, if this variant has one.
    pub fn backward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (GeluVariant::Naive, DType::F32) => Some("gelu_backward_f32_naive"),
            (GeluVariant::Naive, DType::Bf16) => None,
            (GeluVariant::Grid, DType::F32) => Some("gelu_backward_f32_grid"),
            (GeluVariant::Grid, DType::Bf16) => Some("gelu_backward_bf16_grid"),
        }
    }
}

/// The forward launch for these lengths (checked), shared by [`gelu_forward`] and the tests.
pub fn plan_forward(variant: GeluVariant, dtype: DType, out: usize, inp: usize) -> Result<ElementwisePlan> {
    const OP: &str = "gelu_forward";
    let kernel = variant
        .forward_kernel(dtype)
        .ok_or_else(|| unsupported(OP, variant.name(), GeluVariant::ALL, dtype, GeluVariant::forward_kernel))?;
    plan_elementwise(OP, kernel, variant == GeluVariant::Naive, &[("out", out), ("inp", inp)])
}

/// The backward launch for these lengths (checked), shared by [`gelu_backward`] and the tests.
pub fn plan_backward(variant: GeluVariant, dtype: DType, dinp: usize, dout: usize, inp: usize) -> Result<ElementwisePlan> {
    const OP: &str = "gelu_backward";
    let kernel = variant
        .backward_kernel(dtype)
        .ok_or_else(|| unsupported(OP, variant.name(), GeluVariant::ALL, dtype, GeluVariant::backward_kernel))?;
    plan_elementwise(OP, kernel, variant == GeluVariant::Naive, &[("dinp", dinp), ("dout", dout), ("inp", inp)])
}

/// `out = gelu(inp)`; out, inp: (N·I) of `T`.
pub fn gelu_forward<T: Element>(
    dev: &CudaDevice,
    variant: GeluVariant,
    out: &mut CudaViewMut<'_, T>,
    inp: &CudaView<'_, T>,
) -> Result<()> {
    let p = plan_forward(variant, T::DTYPE, out.len(), inp.len())?;
    let Some(cfg) = p.config else { return Ok(()) };
    let func = dev.function(&GELU, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(out).arg(inp).arg(&p.n);
    // SAFETY: p.kernel is a forward kernel of kernels/gelu.cu, (T* out, const T* inp, int n),
    // matching the arguments; both hold n elements (checked by plan_forward); the naive grid
    // covers n threads, the grid kernels loop below n. `out` is an exclusive borrow.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!("launching {} (n={})", p.kernel, p.n)))?;
    Ok(())
}

/// `dinp` OVERWRITTEN with `dout · gelu'(inp)`; all (N·I) of `T`.
pub fn gelu_backward<T: Element>(
    dev: &CudaDevice,
    variant: GeluVariant,
    dinp: &mut CudaViewMut<'_, T>,
    dout: &CudaView<'_, T>,
    inp: &CudaView<'_, T>,
) -> Result<()> {
    let p = plan_backward(variant, T::DTYPE, dinp.len(), dout.len(), inp.len())?;
    let Some(cfg) = p.config else { return Ok(()) };
    let func = dev.function(&GELU, p.kernel)?;
    let stream = dev.stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(dinp).arg(dout).arg(inp).arg(&p.n);
    // SAFETY: p.kernel is a backward kernel of kernels/gelu.cu, (T* dinp, const T* dout,
    // const T* inp, int n), matching the arguments; all hold n elements (checked by
    // plan_backward). `dinp` is an exclusive borrow.
    unsafe { launch.launch(cfg) }.map_err(CudaError::driver(format!("launching {} (n={})", p.kernel, p.n)))?;
    Ok(())
}
