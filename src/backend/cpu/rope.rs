//! Rotary position embedding in the rotate-half layout of Hugging Face Llama, in place.
//! Forward rotates each pair (x_i, x_{i+d/2}) by the angle of its position; backward applies the
//! transpose (inverse) rotation to the gradient, i.e. the same formula with sin negated.

use anyhow::Result;
use rayon::prelude::*;

use super::{rows_per_task, Op};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Forward,
    Backward,
}

/// x: (N, n_heads, head_dim) in place; cos, sin: (P, head_dim/2); positions: (N), each < P.
pub(super) fn apply(
    dir: Direction,
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let op = Op::new(if dir == Direction::Forward { "rope_forward" } else { "rope_backward" }, file!());
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(op.err(format_args!("head_dim {head_dim} must be even and nonzero")));
    }
    let half = head_dim / 2;
    let row = op.mul(n_heads, head_dim)?;
    op.len("x", x.len(), op.mul(positions.len(), row)?)?;
    let table_rows = op.rows("cos", cos.len(), half)?;
    op.len("sin", sin.len(), cos.len())?;
    if let Some((t, &p)) = positions.iter().enumerate().find(|(_, &p)| p as usize >= table_rows) {
        return Err(op.err(format_args!("positions[{t}] = {p} is out of range for cos/sin tables of {table_rows} rows")));
    }
    if row == 0 {
        return Ok(());
    }
    // The backward rotation is the forward one with sin negated.
    let sign = if dir == Direction::Forward { 1.0f32 } else { -1.0 };
    let rows = rows_per_task(row);
    x.par_chunks_mut(rows * row).zip(positions.par_chunks(rows)).for_each(|(x, positions)| {
        for (x, &p) in x.chunks_exact_mut(row).zip(positions) {
            let p = p as usize;
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for head in x.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(c).zip(s) {
                    let s = sign * s;
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x1 * c + x0 * s;
                }
            }
        }
    });
    Ok(())
}
