//! Bias of a Linear layer, kept apart from `matmul` so the GEMM stays a plain product (and a
//! CUDA backend can fuse it into the GEMM epilogue later): forward adds `bias` to every row,
//! backward sums `dout` over rows into `dbias`.

use anyhow::Result;
use rayon::prelude::*;

use super::{rows_per_task, Op};

/// out: (N, C) += bias: (C), broadcast over rows.
pub(super) fn add(out: &mut [f32], bias: &[f32]) -> Result<()> {
    let op = Op::new("bias_add", file!());
    let dim = bias.len();
    op.rows("out", out.len(), dim)?;
    let rows = rows_per_task(dim);
    out.par_chunks_mut(rows * dim).for_each(|out| {
        for row in out.chunks_exact_mut(dim) {
            for (o, &b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    });
    Ok(())
}

/// dbias: (C) += Σ_rows dout: (N, C).
pub(super) fn backward(dbias: &mut [f32], dout: &[f32]) -> Result<()> {
    let op = Op::new("bias_backward", file!());
    let dim = dbias.len();
    op.rows("dout", dout.len(), dim)?;
    let rows = rows_per_task(dim);
    // Per-chunk partials in f64, summed in chunk order: deterministic whatever the thread count.
    let partials: Vec<Vec<f64>> = dout
        .par_chunks(rows * dim)
        .map(|dout| {
            let mut acc = vec![0.0f64; dim];
            for row in dout.chunks_exact(dim) {
                acc.iter_mut().zip(row).for_each(|(a, &g)| *a += f64::from(g));
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; dim];
    for p in &partials {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    dbias.iter_mut().zip(total).for_each(|(d, t)| *d += t as f32);
    Ok(())
}
