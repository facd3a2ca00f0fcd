//! Optimizer kernels over flat f32 buffers: `grad_norm_sq` (Σ g² in f64), `scale` (buf *= c),
//! `adamw_step` and `rmsprop_step` with PyTorch's semantics and rounding order.
//!
//! Reference: torch 2.x `torch/optim/adam.py` `_single_tensor_adam` (AdamW =
//! `decoupled_weight_decay=True`) and `torch/optim/rmsprop.py` `_single_tensor_rmsprop`, the
//! paths CPU tensors take. Each torch op there is one f32 kernel whose Python-float scalar is
//! rounded once to f32; we reproduce the ops in the same order, one rounding per op:
//!
//! AdamW, step t (1-based), host scalars in f64: bc1 = 1 − β1^t, bc2 = 1 − β2^t,
//! step_size = lr / bc1, bc2_sqrt = bc2^0.5.
//! ```text
//! p = p * f32(1 - lr*wd)                       (param.mul_, skipped when wd == 0)
//! m = lerp(m, g, f32(1 - β1))                  (exp_avg.lerp_)
//! v = (v * f32(β2)) + f32(1 - β2) * g * g      (mul_ then addcmul_: (value*t1)*t2)
//! d = sqrt(v) / f32(bc2_sqrt) + f32(eps)       (sqrt, div, add_)
//! p = p + f32(-step_size) * m / d              (addcdiv_: (value*t1)/t2)
//! ```
//! RMSprop (momentum 0, not centered):
//! ```text
//! g' = g + f32(wd) * p                          (grad.add(param, alpha=wd), only when wd != 0)
//! s = (s * f32(α)) + f32(1 - α) * g' * g'
//! d = sqrt(s) + f32(eps)
//! p = p + f32(-lr) * g' / d
//! ```
//! torch's vectorised CPU loops (AVX2) use fused multiply-adds in `lerp` and `add(alpha=)`, and
//! its compiler may contract others; we round every op. Tried: `mul_add` in those two places did
//! not make the trajectories bitwise equal (still 1-2 ulp), so the plain ops stay. Measured over
//! 20 steps (tests/train_math.rs): at most 2 ulp of |p| ≈ 1 (|Δp| ≤ 1.2e-7), relative ≤ 4e-7 for
//! |p| > 1e-2.
//!
//! Elementwise updates are split into fixed chunks of `TASK_ELEMS` run on the backend's pool;
//! the norm sums each chunk in f64 and adds the chunk sums in order, so it does not depend on
//! the thread count.

use anyhow::Result;
use rayon::prelude::*;

use super::{Op, TASK_ELEMS};
use crate::backend::{AdamWConfig, RmspropConfig};

/// Below this many elements one thread is faster than waking the pool.
const PARALLEL_MIN: usize = 4 * TASK_ELEMS;

/// Σ x² in f64: per-chunk f64 sums (exact enough: 2^14 terms of f64), chunk sums added in order.
pub(super) fn grad_norm_sq(grads: &[f32]) -> f64 {
    let chunk_sum = |c: &[f32]| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
    if grads.len() < PARALLEL_MIN {
        return grads.chunks(TASK_ELEMS).map(chunk_sum).sum();
    }
    let partial: Vec<f64> = grads.par_chunks(TASK_ELEMS).map(chunk_sum).collect();
    partial.iter().sum()
}

/// buf *= f32(factor).
pub(super) fn scale(buf: &mut [f32], factor: f64) -> Result<()> {
    let op = Op::new("scale", file!());
    if !factor.is_finite() {
        return Err(op.err(format_args!("factor {factor} is not finite")));
    }
    let f = factor as f32;
    let kernel = |c: &mut [f32]| c.iter_mut().for_each(|x| *x *= f);
    if buf.len() < PARALLEL_MIN {
        kernel(buf);
    } else {
        buf.par_chunks_mut(TASK_ELEMS).for_each(kernel);
    }
    Ok(())
}

/// ATen's scalar `lerp`: small weights step from `start`, large ones from `end`, so that a
/// weight of 1 returns `end` exactly.
#[inline]
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

fn check_finite(op: &Op, what: &str, v: f64) -> Result<()> {
    if !v.is_finite() {
        return Err(op.err(format_args!("{what} = {v} is not finite")));
    }
    Ok(())
}

/// One task's slices as rayon's nested `zip` yields them: ((params, grads), m), v.
type AdamChunk<'a> = (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]);

#[allow(clippy::too_many_arguments)]
pub(super) fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: u64,
    lr: f64,
    hp: &AdamWConfig,
) -> Result<()> {
    let op = Op::new("adamw_step", file!());
    let n = params.len();
    op.len("grads", grads.len(), n)?;
    op.len("exp_avg (m)", m.len(), n)?;
    op.len("exp_avg_sq (v)", v.len(), n)?;
    if step == 0 {
        return Err(op.err("step is 1-based (the step being taken); got 0"));
    }
    for (what, x) in [("lr", lr), ("beta1", hp.beta1), ("beta2", hp.beta2), ("eps", hp.eps), ("weight_decay", hp.weight_decay)] {
        check_finite(&op, what, x)?;
    }
    // Host scalars in f64, as Python computes them (`beta1 ** step` is C pow on doubles).
    let t = step as f64;
    let bias_correction1 = 1.0 - hp.beta1.powf(t);
    let bias_correction2 = 1.0 - hp.beta2.powf(t);
    if bias_correction1 == 0.0 || bias_correction2 == 0.0 {
        return Err(op.err(format_args!("bias correction is 0 (beta1 {}, beta2 {}): betas must be < 1", hp.beta1, hp.beta2)));
    }
    let step_size = lr / bias_correction1;
    let bc2_sqrt = bias_correction2.powf(0.5);
    // Each rounded once to f32, as each torch kernel does with its Python-float scalar.
    let decay = (1.0 - lr * hp.weight_decay) as f32;
    let apply_decay = hp.weight_decay != 0.0;
    let w1 = (1.0 - hp.beta1) as f32;
    let b2 = hp.beta2 as f32;
    let one_minus_b2 = (1.0 - hp.beta2) as f32;
    let bc2_sqrt = bc2_sqrt as f32;
    let eps = hp.eps as f32;
    let neg_step_size = (-step_size) as f32;

    let kernel = |(((p, g), m), v): AdamChunk<'_>| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            if apply_decay {
                *p *= decay;
            }
            *m = lerp(*m, g, w1);
            *v = *v * b2 + one_minus_b2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p += neg_step_size * *m / denom;
        }
    };
    if n < PARALLEL_MIN {
        kernel((((params, grads), m), v));
    } else {
        params
            .par_chunks_mut(TASK_ELEMS)
            .zip(grads.par_chunks(TASK_ELEMS))
            .zip(m.par_chunks_mut(TASK_ELEMS))
            .zip(v.par_chunks_mut(TASK_ELEMS))
            .for_each(kernel);
    }
    Ok(())
}

pub(super) fn rmsprop_step(params: &mut [f32], grads: &[f32], square_avg: &mut [f32], lr: f64, hp: &RmspropConfig) -> Result<()> {
    let op = Op::new("rmsprop_step", file!());
    let n = params.len();
    op.len("grads", grads.len(), n)?;
    op.len("square_avg", square_avg.len(), n)?;
    for (what, x) in [("lr", lr), ("alpha", hp.alpha), ("eps", hp.eps), ("weight_decay", hp.weight_decay)] {
        check_finite(&op, what, x)?;
    }
    let wd = hp.weight_decay as f32;
    let apply_decay = hp.weight_decay != 0.0;
    let alpha = hp.alpha as f32;
    let one_minus_alpha = (1.0 - hp.alpha) as f32;
    let eps = hp.eps as f32;
    let neg_lr = (-lr) as f32;

    let kernel = |((p, g), s): ((&mut [f32], &[f32]), &mut [f32])| {
        for ((p, &g), s) in p.iter_mut().zip(g).zip(s.iter_mut()) {
            // torch adds the decay to a copy of the gradient; the gradient buffer is untouched.
            let g = if apply_decay { g + wd * *p } else { g };
            *s = *s * alpha + one_minus_alpha * g * g;
            let avg = s.sqrt() + eps;
            *p += neg_lr * g / avg;
        }
    };
    if n < PARALLEL_MIN {
        kernel(((params, grads), square_avg));
    } else {
        params.par_chunks_mut(TASK_ELEMS).zip(grads.par_chunks(TASK_ELEMS)).zip(square_avg.par_chunks_mut(TASK_ELEMS)).for_each(kernel);
    }
    Ok(())
}
