//! LayerNorm as Hugging Face BERT computes it in f32: per row of C elements,
//! `out = (inp − mean) · rstd · weight + bias`, `rstd = 1 / sqrt(var + eps)` with the biased
//! variance (divided by C, as `torch.nn.LayerNorm`), and its backward.
//!
//! Backward, for one row with x̂_i = (x_i − mean) · rstd and g_i = weight_i · dy_i
//! (Ba, Kiros, Hinton 2016; the form llm.c's `layernorm_backward` uses):
//!   ∂L/∂weight_i += dy_i x̂_i          ∂L/∂bias_i += dy_i
//!   ∂L/∂x_i       = rstd · (g_i − mean_j(g_j) − x̂_i · mean_j(g_j x̂_j))

use anyhow::Result;
use rayon::prelude::*;

use super::{rows_per_task, Op};

/// out: (N, C), mean: (N), rstd: (N), inp: (N, C), weight: (C), bias: (C).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    dim: usize,
    eps: f32,
) -> Result<()> {
    let op = Op::new("layernorm_forward", file!());
    let n = op.rows("inp", inp.len(), dim)?;
    op.len("out", out.len(), inp.len())?;
    op.len("mean", mean.len(), n)?;
    op.len("rstd", rstd.len(), n)?;
    op.len("weight", weight.len(), dim)?;
    op.len("bias", bias.len(), dim)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(op.err(format_args!("eps must be finite and non-negative, got {eps}")));
    }
    let rows = rows_per_task(dim);
    out.par_chunks_mut(rows * dim).zip(mean.par_chunks_mut(rows)).zip(rstd.par_chunks_mut(rows)).zip(inp.par_chunks(rows * dim)).for_each(
        |(((out, mean), rstd), inp)| {
            for (((o, m), r), x) in out.chunks_exact_mut(dim).zip(mean.iter_mut()).zip(rstd.iter_mut()).zip(inp.chunks_exact(dim)) {
                // Two passes in f64: BERT's eps is 1e-12, so nothing hides a cancellation error in
                // the variance of a row with a large mean.
                let mu = x.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64;
                let var = x.iter().map(|&v| (f64::from(v) - mu).powi(2)).sum::<f64>() / dim as f64;
                let s = (1.0 / (var + f64::from(eps)).sqrt()) as f32;
                let mu = mu as f32;
                *m = mu;
                *r = s;
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
                    *o = (x - mu) * s * w + b;
                }
            }
        },
    );
    Ok(())
}

/// dinp: (N, C) +=, dweight: (C) +=, dbias: (C) +=; dout, inp: (N, C); weight: (C); mean, rstd: (N).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dim: usize,
) -> Result<()> {
    let op = Op::new("layernorm_backward", file!());
    let n = op.rows("inp", inp.len(), dim)?;
    op.len("dinp", dinp.len(), inp.len())?;
    op.len("dout", dout.len(), inp.len())?;
    op.len("mean", mean.len(), n)?;
    op.len("rstd", rstd.len(), n)?;
    op.len("weight", weight.len(), dim)?;
    op.len("dweight", dweight.len(), dim)?;
    op.len("dbias", dbias.len(), dim)?;
    let rows = rows_per_task(dim);
    // Each task returns its partial (dweight, dbias) in f64; partials are summed in chunk order
    // below so the result does not depend on scheduling or the thread count.
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dinp
        .par_chunks_mut(rows * dim)
        .zip(dout.par_chunks(rows * dim))
        .zip(inp.par_chunks(rows * dim))
        .zip(mean.par_chunks(rows).zip(rstd.par_chunks(rows)))
        .map(|(((dinp, dout), inp), (mean, rstd))| {
            let (mut dw, mut db) = (vec![0.0f64; dim], vec![0.0f64; dim]);
            for ((((dx, dy), x), &mu), &r) in
                dinp.chunks_exact_mut(dim).zip(dout.chunks_exact(dim)).zip(inp.chunks_exact(dim)).zip(mean).zip(rstd)
            {
                let (mut g_mean, mut gx_mean) = (0.0f64, 0.0f64);
                for ((((&dy, &x), &w), dw), db) in dy.iter().zip(x).zip(weight).zip(dw.iter_mut()).zip(db.iter_mut()) {
                    let xhat = (x - mu) * r;
                    let g = f64::from(w * dy);
                    g_mean += g;
                    gx_mean += g * f64::from(xhat);
                    *dw += f64::from(dy * xhat);
                    *db += f64::from(dy);
                }
                let g_mean = (g_mean / dim as f64) as f32;
                let gx_mean = (gx_mean / dim as f64) as f32;
                for (((dx, &dy), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(weight) {
                    let xhat = (x - mu) * r;
                    *dx += r * (w * dy - g_mean - xhat * gx_mean);
                }
            }
            (dw, db)
        })
        .collect();
    let (mut tw, mut tb) = (vec![0.0f64; dim], vec![0.0f64; dim]);
    for (pw, pb) in &partials {
        tw.iter_mut().zip(pw).for_each(|(t, v)| *t += v);
        tb.iter_mut().zip(pb).for_each(|(t, v)| *t += v);
    }
    dweight.iter_mut().zip(tw).for_each(|(d, t)| *d += t as f32);
    dbias.iter_mut().zip(tb).for_each(|(d, t)| *d += t as f32);
    Ok(())
}
