//! SwiGLU activation of the Llama MLP: `out = silu(gate) * up`, silu(g) = g·σ(g), and its backward:
//!   ∂out/∂up   = silu(g)
//!   ∂out/∂gate = up · σ(g) · (1 + g · (1 − σ(g)))

use anyhow::Result;
use rayon::prelude::*;

use super::{Op, TASK_ELEMS};

fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

/// out, gate, up: (N, I), elementwise.
pub(super) fn forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
    let op = Op::new("swiglu_forward", file!());
    op.len("gate", gate.len(), out.len())?;
    op.len("up", up.len(), out.len())?;
    out.par_chunks_mut(TASK_ELEMS).zip(gate.par_chunks(TASK_ELEMS)).zip(up.par_chunks(TASK_ELEMS)).for_each(|((o, g), u)| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    });
    Ok(())
}

/// dgate, dup OVERWRITTEN; dout, gate, up: (N, I).
pub(super) fn backward(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) -> Result<()> {
    let op = Op::new("swiglu_backward", file!());
    op.len("dup", dup.len(), dgate.len())?;
    op.len("dout", dout.len(), dgate.len())?;
    op.len("gate", gate.len(), dgate.len())?;
    op.len("up", up.len(), dgate.len())?;
    dgate
        .par_chunks_mut(TASK_ELEMS)
        .zip(dup.par_chunks_mut(TASK_ELEMS))
        .zip(dout.par_chunks(TASK_ELEMS))
        .zip(gate.par_chunks(TASK_ELEMS))
        .zip(up.par_chunks(TASK_ELEMS))
        .for_each(|((((dg, du), dy), g), u)| {
            for ((((dg, du), &dy), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(dy).zip(g).zip(u) {
                let s = sigmoid(g);
                *du = dy * g * s;
                *dg = dy * u * s * (1.0 + g * (1.0 - s));
            }
        });
    Ok(())
}
