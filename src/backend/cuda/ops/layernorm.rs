//! Launchers for `kernels/layernorm.cu`: LayerNorm forward (saving mean and rstd) and backward
//! (dinp, dweight, dbias ACCUMULATE), as `Backend::layernorm_forward/backward`.
//!
//! Shapes: inp, out, dout, dinp: (N, C); weight, bias, dweight, dbias: (C); mean, rstd: (N) f32.
//! [`plan_forward`]/[`plan_backward`] check every length (naming the op and shapes) and pick
//! kernels and grids; the launchers and the host-harness tests (`tests/cuda_layers.rs`) use them.
//!
//! Determinism of the backward (no float atomics): dweight and dbias are column sums, computed
//! by one thread per column adding the rows in order (`Naive` in the same kernel as dinp; `Warp`
//! in a second kernel, `layernorm_backward_params_f32_col`, after the warp-per-row dinp kernel).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::layer_util::{check_len, per_thread, per_warp, rows_of, shape_err, unsupported, variant_enum};
use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::LAYERNORM;

variant_enum! {
    /// LayerNorm kernel variants (see the header of `kernels/layernorm.cu`):
    /// - `Naive`: one thread per row (forward, dinp) and per column (dweight, dbias), f32 only.
    /// - `Warp`: one warp per row; forward f32 and bf16; backward f32 as two kernels (dinp by
    ///   warp per row, then dweight/dbias by thread per column).
    LayerNormVariant, "layernorm", { Naive => "naive", Warp => "warp" }
}

impl LayerNormVariant {
    /// The forward kernel for `dtype`, if this variant has one.
    pub fn forward_kernel(self, dtype: DType) -> Option<&'static str> {
        match (self, dtype) {
            (LayerNormVariant::Naive, DType::F32) => Some("layernorm_forward_f32_naive"),
            (LayerNormVariant::Naive, DType::Bf16) => None,
            (LayerNormVariant::Warp, DType::F32) => Some("layernorm_forward_f32_warp"),
            (LayerNormVariant::Warp, DType::Bf16) => Some("layernorm_forward_bf16_warp"),
        }
    }

    /// The backward kernels for `dtype` in launch order, if this variant has them (f32 only).
    pub fn backward_kernels(self, dtype: DType) -> Option<&'static [&'static str]> {
        match (self, dtype) {
            (LayerNormVariant::Naive, DType::F32) => Some(&["layernorm_backward_f32_naive"]),
            (LayerNormVariant::Warp, DType::F32) => {
                Some(&["layernorm_backward_dinp_f32_warp", "layernorm_backward_params_f32_col"])
            }
            (_, DType::Bf16) => None,
        }
    }

    fn backward_first(self, dtype: DType) -> Option<&'static str> {
        self.backward_kernels(dtype).map(|k| k[0])
    }
}

/// One kernel launch of a plan.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: &'static str,
    pub config: LaunchConfig,
}

/// A checked call: its launches in order (empty when N = 0), N and C as `int`.
#[derive(Clone, Debug)]
pub struct LayerNormPlan {
    pub launches: Vec<Launch>,
    pub n: i32,
    pub c: i32,
}

/// Element counts of a forward call's buffers.
#[derive(Clone, Copy, Debug)]
pub struct ForwardLens {
    pub out: usize,
    pub mean: usize,
    pub rstd: usize,
    pub inp: usize,
    pub weight: usize,
    pub bias: usize,
}

/// Element counts of a backward call's buffers.
#[derive(Clone, Copy, Debug)]
pub struct BackwardLens {
    pub dinp: usize,
    pub dweight: usize,
    pub dbias: usize,
    pub dout: usize,
    pub inp: usize,
    pub weight: usize,
    pub mean: usize,
    pub rstd: usize,
}

/// Checks a forward call and plans it.
pub fn plan_forward(variant: LayerNormVariant, dtype: DType, l: &ForwardLens, dim: usize, eps: f32) -> Result<LayerNormPlan> {
    const OP: &str = "layernorm_forward";
    let kernel = variant.forward_kernel(dtype).ok_or_else(|| {
        unsupported(OP, variant.name(), LayerNormVariant::ALL, dtype, LayerNormVariant::forward_kernel)
    })?;
    let n = rows_of(OP, "inp", l.inp, dim)?;
    let nc = format!("(N={n}, C={dim})");
    check_len(OP, "out", l.out, &nc, n * dim)?;
    check_len(OP, "mean", l.mean, &format!("(N={n})"), n)?;
    check_len(OP, "rstd", l.rstd, &format!("(N={n})"), n)?;
    check_len(OP, "weight", l.weight, &format!("(C={dim})"), dim)?;
    check_len(OP, "bias", l.bias, &format!("(C={dim})"), dim)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(shape_err(OP, format!("eps must be finite and non-negative, got {eps}")));
    }
    let mut launches = Vec::new();
    if n > 0 {
        let config = match variant {
            LayerNormVariant::Naive => per_thread(OP, n)?,
            LayerNormVariant::Warp => per_warp(OP, n)?,
        };
        launches.push(Launch { kernel, config });
    }
    Ok(LayerNormPlan { launches, n: n as i32, c: dim as i32 })
}

/// Checks a backward call and plans it.
pub fn plan_backward(variant: LayerNormVariant, dtype: DType, l: &BackwardLens, dim: usize) -> Result<LayerNormPlan> {
    const OP: &str = "layernorm_backward";
    let kernels = variant.backward_kernels(dtype).ok_or_else(|| {
        unsupported(OP, variant.name(), LayerNormVariant::ALL, dtype, LayerNormVariant::backward_first)
    })?;
    let n = rows_of(OP, "inp", l.inp, dim)?;
    let nc = format!("(N={n}, C={dim})");
    check_len(OP, "dinp", l.dinp, &nc, n * dim)?;
    check_len(OP, "dout", l.dout, &nc, n * dim)?;
    check_len(OP, "mean", l.mean, &format!("(N={n})"), n)?;
    check_len(OP, "rstd", l.rstd, &format!("(N={n})"), n)?;
    for (what, len) in [("weight", l.weight), ("dweight", l.dweight), ("dbias", l.dbias)] {
        check_len(OP, what, len, &format!("(C={dim})"), dim)?;
    }
    let mut launches = Vec::new();
    if n > 0 {
        match variant {
            LayerNormVariant::Naive => {
                launches.push(Launch { kernel: kernels[0], config: per_thread(OP, n.max(dim))? });
            }
            LayerNormVariant::Warp => {
                launches.push(Launch { kernel: kernels[0], config: per_warp(OP, n)? });
                launches.push(Launch { kernel: kernels[1], config: per_thread(OP, dim)? });
            }
        }
    }
    Ok(LayerNormPlan { launches, n: n as i32, c: dim as i32 })
}

/// `out = (inp − mean) · rstd · weight + bias` per row; mean and rstd (N) f32 overwritten.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Element>(
    dev: &CudaDevice,
    variant: LayerNormVariant,
    out: &mut CudaViewMut<'_, T>,
    mean: &mut CudaViewMut<'_, f32>,
    rstd: &mut CudaViewMut<'_, f32>,
    inp: &CudaView<'_, T>,
    weight: &CudaView<'_, T>,
    bias: &CudaView<'_, T>,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let lens = ForwardLens {
        out: out.len(),
        mean: mean.len(),
        rstd: rstd.len(),
        inp: inp.len(),
        weight: weight.len(),
        bias: bias.len(),
    };
    let p = plan_forward(variant, T::DTYPE, &lens, dim, eps)?;
    for l in &p.launches {
        let func = dev.function(&LAYERNORM, l.kernel)?;
        let stream = dev.stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&mut *out).arg(&mut *mean).arg(&mut *rstd).arg(inp).arg(weight).arg(bias);
        launch.arg(&p.n).arg(&p.c).arg(&eps);
        // SAFETY: l.kernel is a forward kernel of kernels/layernorm.cu, (T* out, float* mean,
        // float* rstd, const T* inp, const T* weight, const T* bias, int N, int C, float eps),
        // matching the arguments. out and inp hold N·C, mean and rstd N, weight and bias C
        // elements (checked by plan_forward); the grid covers N rows at the variant's block.
        // The outputs are exclusive borrows, so they alias no input.
        unsafe { launch.launch(l.config) }
            .map_err(CudaError::driver(format!("launching {} ({}×{})", l.kernel, p.n, p.c)))?;
    }
    Ok(())
}

/// Accumulates the gradients of [`layernorm_forward`] (f32): `dinp += ∂L/∂inp`,
/// `dweight += ∂L/∂weight`, `dbias += ∂L/∂bias` given dout and the forward's inp, weight, mean, rstd.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dev: &CudaDevice,
    variant: LayerNormVariant,
    dinp: &mut CudaViewMut<'_, f32>,
    dweight: &mut CudaViewMut<'_, f32>,
    dbias: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    inp: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    mean: &CudaView<'_, f32>,
    rstd: &CudaView<'_, f32>,
    dim: usize,
) -> Result<()> {
    let lens = BackwardLens {
        dinp: dinp.len(),
        dweight: dweight.len(),
        dbias: dbias.len(),
        dout: dout.len(),
        inp: inp.len(),
        weight: weight.len(),
        mean: mean.len(),
        rstd: rstd.len(),
    };
    let p = plan_backward(variant, DType::F32, &lens, dim)?;
    let stream = dev.stream();
    for l in &p.launches {
        let func = dev.function(&LAYERNORM, l.kernel)?;
        let mut launch = stream.launch_builder(&func);
        match l.kernel {
            "layernorm_backward_f32_naive" => {
                launch.arg(&mut *dinp).arg(&mut *dweight).arg(&mut *dbias);
                launch.arg(dout).arg(inp).arg(weight).arg(mean).arg(rstd);
            }
            "layernorm_backward_dinp_f32_warp" => {
                launch.arg(&mut *dinp).arg(dout).arg(inp).arg(weight).arg(mean).arg(rstd);
            }
            _ => {
                // layernorm_backward_params_f32_col
                launch.arg(&mut *dweight).arg(&mut *dbias).arg(dout).arg(inp).arg(mean).arg(rstd);
            }
        }
        launch.arg(&p.n).arg(&p.c);
        // SAFETY: the arguments pushed above match each kernel's signature in
        // kernels/layernorm.cu: naive (float* dinp, float* dweight, float* dbias, const float*
        // dout, inp, weight, mean, rstd, int N, int C); dinp_warp (float* dinp, const float* dout,
        // inp, weight, mean, rstd, int N, int C); params_col (float* dweight, float* dbias,
        // const float* dout, inp, mean, rstd, int N, int C). Lengths checked by plan_backward;
        // grids cover N rows and/or C columns with guards. Outputs are exclusive borrows.
        unsafe { launch.launch(l.config) }
            .map_err(CudaError::driver(format!("launching {} ({}×{})", l.kernel, p.n, p.c)))?;
    }
    Ok(())
}
