//! SwiGLU activation of the Llama MLP: `out = silu(gate) * up`, silu(g) = g·σ(g), and its backward
//! (σ by `fastexp::sigmoid_f32`: vectorised, within an ulp of the exact value):
//!   ∂out/∂up   = silu(g)
//!   ∂out/∂gate = up · σ(g) · (1 + g · (1 − σ(g)))

use anyhow::Result;
use rayon::prelude::*;

use super::{Op, TASK_ELEMS};

/// out, gate, up: (N, I), elementwise.
pub(super) fn forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<()> {
    let op = Op::new("swiglu_forward", file!());
    op.len("gate", gate.len(), out.len())?;
    op.len("up", up.len(), out.len())?;
    out.par_chunks_mut(TASK_ELEMS).zip(gate.par_chunks(TASK_ELEMS)).zip(up.par_chunks(TASK_ELEMS)).for_each(|((o, g), u)| crate::fastexp::swiglu_f32(o, g, u));
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
        .for_each(|((((dg, du), dy), g), u)| crate::fastexp::swiglu_backward_f32(dg, du, dy, g, u));
    Ok(())
}
