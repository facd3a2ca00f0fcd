//! The LM head fused with log-prob gathering: for each unmasked row t,
//! `logp[t] = logits[t, target] − lse[t]` with `logits[t] = hidden[t] · weightᵀ` and
//! `lse[t] = log Σ_v exp(logits[t, v])`; backward with `∂logp/∂logits = onehot(target) − softmax`.
//!
//! Only unmasked rows are computed (prompt tokens, often most of a batch, cost nothing). They are
//! gathered CHUNK_ROWS at a time into a contiguous (chunk, C) scratch, so the logits never exceed a
//! (CHUNK_ROWS, V) scratch; each chunk's products run on all threads through `gemm`.

use anyhow::Result;
use rayon::prelude::*;

use super::matmul::{gemm, Mat};
use super::{CpuBackend, Op};

/// Rows per logits chunk: (64, V) f32 is 32 MiB at V = 128k, and 64 rows keep gemm efficient.
const CHUNK_ROWS: usize = 64;

/// Checks shapes; returns the unmasked rows in order.
fn check(op: Op, n_hidden: usize, weight: usize, targets: &[i32], dim: usize, vocab: usize) -> Result<Vec<usize>> {
    let n = op.rows("hidden (N, dim)", n_hidden, dim)?;
    op.len("targets", targets.len(), n)?;
    op.len("weight (vocab, dim)", weight, op.mul(vocab, dim)?)?;
    let mut active = Vec::new();
    for (t, &target) in targets.iter().enumerate() {
        if target >= 0 {
            if target as usize >= vocab {
                return Err(op.err(format_args!("targets[{t}] = {target} is out of range for a vocabulary of {vocab}")));
            }
            active.push(t);
        }
    }
    Ok(active)
}

/// Copies rows `rows` of hidden (N, C) into `dst` (len(rows), C).
fn gather(dst: &mut [f32], hidden: &[f32], rows: &[usize], dim: usize) {
    for (d, &t) in dst.chunks_exact_mut(dim).zip(rows) {
        d.copy_from_slice(&hidden[t * dim..(t + 1) * dim]);
    }
}

/// logits (m, V) = h (m, C) · weightᵀ, weight (V, C).
#[allow(clippy::too_many_arguments)]
fn logits(be: &CpuBackend, op: Op, out: &mut [f32], h: &[f32], weight: &[f32], m: usize, dim: usize, vocab: usize) -> Result<()> {
    let lhs = Mat { data: h, rs: dim, cs: 1 };
    let rhs = Mat { data: weight, rs: 1, cs: dim };
    gemm(be, op, m, vocab, dim, out, vocab, 1, false, lhs, rhs)
}

/// logp, lse: (N) overwritten (masked rows 0); hidden: (N, C); weight: (V, C); targets: (N).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CpuBackend,
    logp: &mut [f32],
    lse: &mut [f32],
    hidden: &[f32],
    weight: &[f32],
    targets: &[i32],
    dim: usize,
    vocab: usize,
) -> Result<()> {
    let op = Op::new("token_logprobs_forward", file!());
    let active = check(op, hidden.len(), weight.len(), targets, dim, vocab)?;
    op.len("logp", logp.len(), targets.len())?;
    op.len("lse", lse.len(), targets.len())?;
    logp.fill(0.0);
    lse.fill(0.0);
    let mut h = vec![0.0f32; CHUNK_ROWS.min(active.len()) * dim];
    let mut z = vec![0.0f32; CHUNK_ROWS.min(active.len()) * vocab];
    for rows in active.chunks(CHUNK_ROWS) {
        let m = rows.len();
        let (h, z) = (&mut h[..m * dim], &mut z[..m * vocab]);
        gather(h, hidden, rows, dim);
        logits(be, op, z, h, weight, m, dim, vocab)?;
        let stats: Vec<(f32, f32)> = z
            .par_chunks(vocab)
            .zip(rows.par_iter())
            .map(|(z, &t)| {
                // Max-subtracted, summed in f64: the reference must not lose the tail of the softmax.
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = crate::fastexp::sum_exp_shifted(z, max);
                let l = (f64::from(max) + sum.ln()) as f32;
                (z[targets[t] as usize] - l, l)
            })
            .collect();
        for (&t, (lp, l)) in rows.iter().zip(stats) {
            logp[t] = lp;
            lse[t] = l;
        }
    }
    Ok(())
}

/// dhidden: (N, C) overwritten (masked rows 0); dweight: (V, C) +=; dlogp, lse: (N).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CpuBackend,
    dhidden: &mut [f32],
    dweight: &mut [f32],
    dlogp: &[f32],
    hidden: &[f32],
    weight: &[f32],
    lse: &[f32],
    targets: &[i32],
    dim: usize,
    vocab: usize,
) -> Result<()> {
    let op = Op::new("token_logprobs_backward", file!());
    let active = check(op, hidden.len(), weight.len(), targets, dim, vocab)?;
    op.len("dhidden", dhidden.len(), hidden.len())?;
    op.len("dweight", dweight.len(), weight.len())?;
    op.len("dlogp", dlogp.len(), targets.len())?;
    op.len("lse", lse.len(), targets.len())?;
    dhidden.fill(0.0);
    let mut h = vec![0.0f32; CHUNK_ROWS.min(active.len()) * dim];
    let mut dh = vec![0.0f32; CHUNK_ROWS.min(active.len()) * dim];
    let mut z = vec![0.0f32; CHUNK_ROWS.min(active.len()) * vocab];
    for rows in active.chunks(CHUNK_ROWS) {
        let m = rows.len();
        let (h, dh, z) = (&mut h[..m * dim], &mut dh[..m * dim], &mut z[..m * vocab]);
        gather(h, hidden, rows, dim);
        logits(be, op, z, h, weight, m, dim, vocab)?;
        // z becomes dlogits = dlogp · (onehot(target) − exp(logits − lse)), using the saved lse.
        z.par_chunks_mut(vocab).zip(rows.par_iter()).for_each(|(z, &t)| {
            let (g, l) = (dlogp[t], lse[t]);
            crate::fastexp::exp_shifted_f32(z, l);
            for x in z.iter_mut() {
                *x *= -g;
            }
            z[targets[t] as usize] += g;
        });
        // dh (m, C) = dlogits (m, V) · weight (V, C)
        gemm(be, op, m, dim, vocab, dh, dim, 1, false, Mat { data: z, rs: vocab, cs: 1 }, Mat { data: weight, rs: dim, cs: 1 })?;
        // dweight (V, C) += dlogitsᵀ (V, m) · h (m, C)
        gemm(be, op, vocab, dim, m, dweight, dim, 1, true, Mat { data: z, rs: 1, cs: vocab }, Mat { data: h, rs: dim, cs: 1 })?;
        for (d, &t) in dh.chunks_exact(dim).zip(rows) {
            dhidden[t * dim..(t + 1) * dim].copy_from_slice(d);
        }
    }
    Ok(())
}
