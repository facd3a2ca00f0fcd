//! Launchers for `kernels/optimizer.cu`: gradient norm², scaling (clipping), AdamW and RMSprop
//! over flat buffers, with f32 parameters or bf16 parameters beside f32 master weights.
//!
//! Semantics are those of `Backend::grad_norm_sq`, `scale`, `adamw_step` and `rmsprop_step`
//! (reference: `src/backend/cpu/optim.rs`): the host scalars are computed here in f64 exactly as
//! the CPU computes them and rounded once to f32 ([`AdamWScalars`], [`RmspropScalars`]), and the
//! kernels round every f32 op as the CPU does, so the two agree bitwise. The kernels are
//! grid-stride loops: [`flat_config`] caps the grid at `max_blocks` ([`DEVICE_MAX_BLOCKS`] on the
//! GPU; the host-harness tests pass a small cap, as each block costs 256 OS threads there). The
//! norm's two passes (block partials, then one block) depend only on n and the grid: deterministic.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::OPTIMIZER;
use crate::backend::{AdamWConfig, RmspropConfig};

/// Threads per block of every optimizer kernel (the reduction trees halve it).
pub const THREADS: u32 = 256;
/// Grid cap on the GPU: about 8 resident blocks of 256 threads on each of an H100's 132 SMs.
pub const DEVICE_MAX_BLOCKS: usize = 1024;

pub const NORM_PARTIALS_KERNEL: &str = "optimizer_norm_partials_f32";
pub const NORM_FINISH_KERNEL: &str = "optimizer_norm_finish";
pub const SCALE_KERNEL: &str = "optimizer_scale_f32";
pub const ROUND_BF16_KERNEL: &str = "optimizer_round_bf16";

/// How parameters are stored: the update always runs on f32 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamStorage {
    /// f32 parameters, updated in place.
    F32,
    /// bf16 parameters (what the model computes with) and f32 master weights: the step updates
    /// the master weights and writes their round-to-nearest-even bf16 copy.
    Bf16Master,
}

impl ParamStorage {
    pub const ALL: &'static [ParamStorage] = &[ParamStorage::F32, ParamStorage::Bf16Master];

    pub fn name(self) -> &'static str {
        match self {
            ParamStorage::F32 => "f32",
            ParamStorage::Bf16Master => "bf16_master",
        }
    }

    /// By name; an unknown one is an error listing the choices.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|s| s.name() == name)
            .ok_or_else(|| CudaError::UnknownVariant {
                concern: "optimizer parameter storage",
                name: name.to_string(),
                choices: Self::ALL
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

pub fn adamw_kernel(storage: ParamStorage) -> &'static str {
    match storage {
        ParamStorage::F32 => "optimizer_adamw_f32",
        ParamStorage::Bf16Master => "optimizer_adamw_bf16_master",
    }
}

pub fn rmsprop_kernel(storage: ParamStorage) -> &'static str {
    match storage {
        ParamStorage::F32 => "optimizer_rmsprop_f32",
        ParamStorage::Bf16Master => "optimizer_rmsprop_bf16_master",
    }
}

fn err(op: &'static str, detail: impl Into<String>) -> CudaError {
    CudaError::Shape {
        op,
        detail: detail.into(),
    }
}

/// Grid-stride launch over `n` elements: ceil(n / 256) blocks, at least 1, at most `max_blocks`.
pub fn flat_config(op: &'static str, n: usize, max_blocks: usize) -> Result<LaunchConfig> {
    if max_blocks == 0 {
        return Err(err(op, "max_blocks must be at least 1"));
    }
    let blocks = n
        .div_ceil(THREADS as usize)
        .clamp(1, max_blocks.min(u32::MAX as usize));
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The single block that sums the norm's partials.
pub fn finish_config() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Checks that every named buffer holds `n` elements (the first buffer's length).
pub fn check_lens(op: &'static str, n: usize, others: &[(&str, usize)]) -> Result<()> {
    for &(what, len) in others {
        if len != n {
            return Err(err(
                op,
                format!("{what} has {len} elements, expected the parameters' {n}"),
            ));
        }
    }
    Ok(())
}

fn check_finite(op: &'static str, what: &str, v: f64) -> Result<()> {
    if !v.is_finite() {
        return Err(err(op, format!("{what} = {v} is not finite")));
    }
    Ok(())
}

/// AdamW's kernel scalars for one step, computed as `src/backend/cpu/optim.rs` does: f64 host
/// math (`1 − β^t` with C pow), each rounded once to f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub decay: f32,
    pub apply_decay: i32,
    pub w1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub neg_step_size: f32,
}

impl AdamWScalars {
    /// `step` is 1-based (the step being taken).
    pub fn new(step: u64, lr: f64, hp: &AdamWConfig) -> Result<Self> {
        const OP: &str = "adamw_step";
        if step == 0 {
            return Err(err(OP, "step is 1-based (the step being taken); got 0"));
        }
        for (what, x) in [
            ("lr", lr),
            ("beta1", hp.beta1),
            ("beta2", hp.beta2),
            ("eps", hp.eps),
            ("weight_decay", hp.weight_decay),
        ] {
            check_finite(OP, what, x)?;
        }
        let t = step as f64;
        let bias_correction1 = 1.0 - hp.beta1.powf(t);
        let bias_correction2 = 1.0 - hp.beta2.powf(t);
        if bias_correction1 == 0.0 || bias_correction2 == 0.0 {
            return Err(err(
                OP,
                format!(
                    "bias correction is 0 (beta1 {}, beta2 {}): betas must be < 1",
                    hp.beta1, hp.beta2
                ),
            ));
        }
        let step_size = lr / bias_correction1;
        Ok(AdamWScalars {
            decay: (1.0 - lr * hp.weight_decay) as f32,
            apply_decay: i32::from(hp.weight_decay != 0.0),
            w1: (1.0 - hp.beta1) as f32,
            b2: hp.beta2 as f32,
            one_minus_b2: (1.0 - hp.beta2) as f32,
            bc2_sqrt: bias_correction2.powf(0.5) as f32,
            eps: hp.eps as f32,
            neg_step_size: (-step_size) as f32,
        })
    }
}

/// RMSprop's kernel scalars (momentum 0, not centered), as `src/backend/cpu/optim.rs`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmspropScalars {
    pub wd: f32,
    pub apply_decay: i32,
    pub alpha: f32,
    pub one_minus_alpha: f32,
    pub eps: f32,
    pub neg_lr: f32,
}

impl RmspropScalars {
    pub fn new(lr: f64, hp: &RmspropConfig) -> Result<Self> {
        const OP: &str = "rmsprop_step";
        for (what, x) in [
            ("lr", lr),
            ("alpha", hp.alpha),
            ("eps", hp.eps),
            ("weight_decay", hp.weight_decay),
        ] {
            check_finite(OP, what, x)?;
        }
        Ok(RmspropScalars {
            wd: hp.weight_decay as f32,
            apply_decay: i32::from(hp.weight_decay != 0.0),
            alpha: hp.alpha as f32,
            one_minus_alpha: (1.0 - hp.alpha) as f32,
            eps: hp.eps as f32,
            neg_lr: (-lr) as f32,
        })
    }
}

/// The factor `scale` multiplies by: finite, rounded once to f32.
pub fn scale_factor(factor: f64) -> Result<f32> {
    check_finite("scale", "factor", factor)?;
    Ok(factor as f32)
}

/// Σ g² over `grads`, in f64 (two passes, see the module doc). Waits for the stream.
pub fn grad_norm_sq(dev: &CudaDevice, grads: &CudaView<'_, f32>) -> Result<f64> {
    let n = grads.len();
    let cfg = flat_config("grad_norm_sq", n, DEVICE_MAX_BLOCKS)?;
    let blocks = cfg.grid_dim.0 as i32; // <= DEVICE_MAX_BLOCKS
    let stream = dev.stream();
    let mut partials = stream
        .alloc_zeros::<f64>(blocks as usize)
        .map_err(CudaError::driver("grad_norm_sq: allocating partials"))?;
    let mut out = stream
        .alloc_zeros::<f64>(1)
        .map_err(CudaError::driver("grad_norm_sq: allocating the result"))?;
    {
        let f = dev.function(&OPTIMIZER, NORM_PARTIALS_KERNEL)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut partials).arg(grads).arg(&n);
        // SAFETY: optimizer_norm_partials_f32(double* partials, const float* grads, size_t n): the
        // grid-stride loop reads grads[0..n); one partial per block, `blocks` allocated.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver(format!(
            "launching {NORM_PARTIALS_KERNEL} ({n} elements)"
        )))?;
    }
    let f = dev.function(&OPTIMIZER, NORM_FINISH_KERNEL)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&mut out).arg(&partials).arg(&blocks);
    // SAFETY: optimizer_norm_finish(double* out, const double* partials, int n_partials): one
    // block reads the `blocks` partials written above (same stream) and writes out[0].
    unsafe { b.launch(finish_config()) }
        .map_err(CudaError::driver(format!("launching {NORM_FINISH_KERNEL}")))?;
    let host = dev.download(&out)?;
    host.first()
        .copied()
        .ok_or_else(|| err("grad_norm_sq", "the device returned no result"))
}

/// `buf *= f32(factor)` (gradient clipping).
pub fn scale(dev: &CudaDevice, buf: &mut CudaViewMut<'_, f32>, factor: f64) -> Result<()> {
    let factor = scale_factor(factor)?;
    let n = buf.len();
    let cfg = flat_config("scale", n, DEVICE_MAX_BLOCKS)?;
    let f = dev.function(&OPTIMIZER, SCALE_KERNEL)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *buf).arg(&n).arg(&factor);
    // SAFETY: optimizer_scale_f32(float* buf, size_t n, float factor): grid-stride over buf[0..n).
    unsafe { b.launch(cfg) }.map_err(CudaError::driver(format!(
        "launching {SCALE_KERNEL} ({n} elements)"
    )))?;
    Ok(())
}

/// One AdamW step on f32 parameters, in place on params, m (`exp_avg`) and v (`exp_avg_sq`).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    dev: &CudaDevice,
    params: &mut CudaViewMut<'_, f32>,
    grads: &CudaView<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    step: u64,
    lr: f64,
    hp: &AdamWConfig,
) -> Result<()> {
    let n = params.len();
    check_lens(
        "adamw_step",
        n,
        &[
            ("grads", grads.len()),
            ("exp_avg (m)", m.len()),
            ("exp_avg_sq (v)", v.len()),
        ],
    )?;
    let s = AdamWScalars::new(step, lr, hp)?;
    let kernel = adamw_kernel(ParamStorage::F32);
    let f = dev.function(&OPTIMIZER, kernel)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *params)
        .arg(grads)
        .arg(&mut *m)
        .arg(&mut *v)
        .arg(&n);
    push_adamw_scalars(&mut b, &s);
    // SAFETY: optimizer_adamw_f32(float* params, const float* grads, float* m, float* v, size_t n,
    // 8 scalars as pushed by push_adamw_scalars); every buffer holds n elements (checked).
    unsafe { b.launch(flat_config("adamw_step", n, DEVICE_MAX_BLOCKS)?) }.map_err(
        CudaError::driver(format!("launching {kernel} ({n} elements, step {step})")),
    )?;
    Ok(())
}

/// One AdamW step on f32 master weights; params (bf16) OVERWRITTEN with their rounding.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_bf16_master(
    dev: &CudaDevice,
    params: &mut CudaViewMut<'_, half::bf16>,
    master: &mut CudaViewMut<'_, f32>,
    grads: &CudaView<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    step: u64,
    lr: f64,
    hp: &AdamWConfig,
) -> Result<()> {
    let n = params.len();
    check_lens(
        "adamw_step",
        n,
        &[
            ("master weights", master.len()),
            ("grads", grads.len()),
            ("exp_avg (m)", m.len()),
            ("exp_avg_sq (v)", v.len()),
        ],
    )?;
    let s = AdamWScalars::new(step, lr, hp)?;
    let kernel = adamw_kernel(ParamStorage::Bf16Master);
    let f = dev.function(&OPTIMIZER, kernel)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *params)
        .arg(&mut *master)
        .arg(grads)
        .arg(&mut *m)
        .arg(&mut *v)
        .arg(&n);
    push_adamw_scalars(&mut b, &s);
    // SAFETY: optimizer_adamw_bf16_master(bf16* params, float* master, const float* grads,
    // float* m, float* v, size_t n, 8 scalars); every buffer holds n elements (checked).
    unsafe { b.launch(flat_config("adamw_step", n, DEVICE_MAX_BLOCKS)?) }.map_err(
        CudaError::driver(format!("launching {kernel} ({n} elements, step {step})")),
    )?;
    Ok(())
}

fn push_adamw_scalars<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, s: &'a AdamWScalars) {
    b.arg(&s.decay)
        .arg(&s.apply_decay)
        .arg(&s.w1)
        .arg(&s.b2)
        .arg(&s.one_minus_b2);
    b.arg(&s.bc2_sqrt).arg(&s.eps).arg(&s.neg_step_size);
}

fn push_rmsprop_scalars<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, s: &'a RmspropScalars) {
    b.arg(&s.wd)
        .arg(&s.apply_decay)
        .arg(&s.alpha)
        .arg(&s.one_minus_alpha)
        .arg(&s.eps)
        .arg(&s.neg_lr);
}

/// One RMSprop step on f32 parameters, in place on params and `square_avg`.
pub fn rmsprop_step(
    dev: &CudaDevice,
    params: &mut CudaViewMut<'_, f32>,
    grads: &CudaView<'_, f32>,
    square_avg: &mut CudaViewMut<'_, f32>,
    lr: f64,
    hp: &RmspropConfig,
) -> Result<()> {
    let n = params.len();
    check_lens(
        "rmsprop_step",
        n,
        &[("grads", grads.len()), ("square_avg", square_avg.len())],
    )?;
    let s = RmspropScalars::new(lr, hp)?;
    let kernel = rmsprop_kernel(ParamStorage::F32);
    let f = dev.function(&OPTIMIZER, kernel)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *params).arg(grads).arg(&mut *square_avg).arg(&n);
    push_rmsprop_scalars(&mut b, &s);
    // SAFETY: optimizer_rmsprop_f32(float* params, const float* grads, float* square_avg,
    // size_t n, 6 scalars as pushed); every buffer holds n elements (checked).
    unsafe { b.launch(flat_config("rmsprop_step", n, DEVICE_MAX_BLOCKS)?) }.map_err(
        CudaError::driver(format!("launching {kernel} ({n} elements)")),
    )?;
    Ok(())
}

/// One RMSprop step on f32 master weights; params (bf16) OVERWRITTEN with their rounding.
pub fn rmsprop_step_bf16_master(
    dev: &CudaDevice,
    params: &mut CudaViewMut<'_, half::bf16>,
    master: &mut CudaViewMut<'_, f32>,
    grads: &CudaView<'_, f32>,
    square_avg: &mut CudaViewMut<'_, f32>,
    lr: f64,
    hp: &RmspropConfig,
) -> Result<()> {
    let n = params.len();
    check_lens(
        "rmsprop_step",
        n,
        &[
            ("master weights", master.len()),
            ("grads", grads.len()),
            ("square_avg", square_avg.len()),
        ],
    )?;
    let s = RmspropScalars::new(lr, hp)?;
    let kernel = rmsprop_kernel(ParamStorage::Bf16Master);
    let f = dev.function(&OPTIMIZER, kernel)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *params)
        .arg(&mut *master)
        .arg(grads)
        .arg(&mut *square_avg)
        .arg(&n);
    push_rmsprop_scalars(&mut b, &s);
    // SAFETY: optimizer_rmsprop_bf16_master(bf16* params, float* master, const float* grads,
    // float* square_avg, size_t n, 6 scalars); every buffer holds n elements (checked).
    unsafe { b.launch(flat_config("rmsprop_step", n, DEVICE_MAX_BLOCKS)?) }.map_err(
        CudaError::driver(format!("launching {kernel} ({n} elements)")),
    )?;
    Ok(())
}

/// params (bf16) = round-to-nearest-even(master): the bf16 copy of master weights.
pub fn round_bf16(
    dev: &CudaDevice,
    params: &mut CudaViewMut<'_, half::bf16>,
    master: &CudaView<'_, f32>,
) -> Result<()> {
    let n = params.len();
    check_lens("round_bf16", n, &[("master weights", master.len())])?;
    let f = dev.function(&OPTIMIZER, ROUND_BF16_KERNEL)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *params).arg(master).arg(&n);
    // SAFETY: optimizer_round_bf16(bf16* params, const float* master, size_t n); both hold n.
    unsafe { b.launch(flat_config("round_bf16", n, DEVICE_MAX_BLOCKS)?) }.map_err(
        CudaError::driver(format!("launching {ROUND_BF16_KERNEL} ({n} elements)")),
    )?;
    Ok(())
}
