//! The exact (erf) GELU of BERT's `hidden_act: "gelu"` (Hendrycks & Gimpel 2016, eq. 1):
//!   gelu(x)  = x · Φ(x),            Φ(x) = ½ (1 + erf(x / √2))
//!   gelu'(x) = Φ(x) + x · φ(x),     φ(x) = exp(−x²/2) / √(2π)
//! Not the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`): on MiniLM the two differ by up
//! to ~1e-3 per activation, well above the parity this reference must reach. erf comes from
//! `libm` in f64 (within an ulp of the true value), so the f32 result is correctly rounded or
//! one ulp off, as PyTorch's.

use anyhow::Result;
use rayon::prelude::*;

use super::{Op, TASK_ELEMS};

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7; // 1/√(2π)

/// Φ(x), the standard normal CDF, in f64.
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// gelu(x) = x Φ(x).
fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (x * normal_cdf(x)) as f32
}

/// d gelu / dx = Φ(x) + x φ(x).
fn gelu_grad(x: f32) -> f32 {
    let x = f64::from(x);
    (normal_cdf(x) + x * FRAC_1_SQRT_2PI * (-0.5 * x * x).exp()) as f32
}

/// out, inp: (N), elementwise.
pub(super) fn forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    let op = Op::new("gelu_forward", file!());
    op.len("inp", inp.len(), out.len())?;
    out.par_chunks_mut(TASK_ELEMS).zip(inp.par_chunks(TASK_ELEMS)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = gelu(x);
        }
    });
    Ok(())
}

/// dinp OVERWRITTEN with dout · gelu'(inp); dinp, dout, inp: (N).
pub(super) fn backward(dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
    let op = Op::new("gelu_backward", file!());
    op.len("dout", dout.len(), dinp.len())?;
    op.len("inp", inp.len(), dinp.len())?;
    dinp.par_chunks_mut(TASK_ELEMS).zip(dout.par_chunks(TASK_ELEMS)).zip(inp.par_chunks(TASK_ELEMS)).for_each(|((dx, dy), x)| {
        for ((dx, &dy), &x) in dx.iter_mut().zip(dy).zip(x) {
            *dx = dy * gelu_grad(x);
        }
    });
    Ok(())
}
