//! RMSNorm as Hugging Face Llama computes it in f32: `out = inp * rstd * weight` with
//! `rstd = 1 / sqrt(mean(inp²) + eps)` per row, and its backward.
//!
//! Backward, for one row with r = rstd and y_i = x_i r w_i:
//!   ∂L/∂w_i += dy_i x_i r
//!   ∂L/∂x_i  = r (w_i dy_i) − x_i r³ / C · Σ_j (w_j dy_j x_j)

use anyhow::Result;
use rayon::prelude::*;

use super::{rows_per_task, Op};

/// out: (N, C), rstd: (N), inp: (N, C), weight: (C).
pub(super) fn forward(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], dim: usize, eps: f32) -> Result<()> {
    let op = Op::new("rmsnorm_forward", file!());
    let n = op.rows("inp", inp.len(), dim)?;
    op.len("out", out.len(), inp.len())?;
    op.len("rstd", rstd.len(), n)?;
    op.len("weight", weight.len(), dim)?;
    let rows = rows_per_task(dim);
    out.par_chunks_mut(rows * dim).zip(rstd.par_chunks_mut(rows)).zip(inp.par_chunks(rows * dim)).for_each(
        |((out, rstd), inp)| {
            for ((o, r), x) in out.chunks_exact_mut(dim).zip(rstd.iter_mut()).zip(inp.chunks_exact(dim)) {
                // The mean of squares in f64: the reference should not lose digits on wide rows.
                let ms = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / dim as f64;
                let s = 1.0 / (ms as f32 + eps).sqrt();
                *r = s;
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(weight) {
                    *o = x * s * w;
                }
            }
        },
    );
    Ok(())
}

/// dinp: (N, C) +=, dweight: (C) +=, dout, inp: (N, C), weight: (C), rstd: (N).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    dim: usize,
) -> Result<()> {
    let op = Op::new("rmsnorm_backward", file!());
    let n = op.rows("inp", inp.len(), dim)?;
    op.len("dinp", dinp.len(), inp.len())?;
    op.len("dout", dout.len(), inp.len())?;
    op.len("rstd", rstd.len(), n)?;
    op.len("weight", weight.len(), dim)?;
    op.len("dweight", dweight.len(), dim)?;
    let rows = rows_per_task(dim);
    // Each task returns its partial dweight (f64); partials are summed in chunk order below so the
    // result does not depend on scheduling.
    let partials: Vec<Vec<f64>> = dinp
        .par_chunks_mut(rows * dim)
        .zip(dout.par_chunks(rows * dim))
        .zip(inp.par_chunks(rows * dim))
        .zip(rstd.par_chunks(rows))
        .map(|(((dinp, dout), inp), rstd)| {
            let mut dw = vec![0.0f64; dim];
            for (((dx, dy), x), &r) in
                dinp.chunks_exact_mut(dim).zip(dout.chunks_exact(dim)).zip(inp.chunks_exact(dim)).zip(rstd)
            {
                let mut dot = 0.0f64;
                for (((&dy, &x), &w), dw) in dy.iter().zip(x).zip(weight).zip(dw.iter_mut()) {
                    dot += f64::from(w * dy) * f64::from(x);
                    *dw += f64::from(dy * x * r);
                }
                let coef = (dot * f64::from(r).powi(3) / dim as f64) as f32;
                for (((dx, &dy), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(weight) {
                    *dx += r * w * dy - x * coef;
                }
            }
            dw
        })
        .collect();
    let mut total = vec![0.0f64; dim];
    for p in &partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    for (d, t) in dweight.iter_mut().zip(total) {
        *d += t as f32;
    }
    Ok(())
}
