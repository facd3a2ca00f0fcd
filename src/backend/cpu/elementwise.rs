//! Elementwise ops: `fill`, `add` (out = a + b), `add_inplace` (acc += x) and `scatter_rows`
//! (dst[index[r]] = src[r], the KV-cache append).

use anyhow::Result;
use rayon::prelude::*;

use super::{Op, TASK_ELEMS};

/// Below this many elements a single thread is faster than waking the pool.
const PARALLEL_MIN: usize = 4 * TASK_ELEMS;

pub(super) fn fill(buf: &mut [f32], value: f32) {
    if buf.len() < PARALLEL_MIN {
        buf.fill(value);
    } else {
        buf.par_chunks_mut(TASK_ELEMS).for_each(|c| c.fill(value));
    }
}

/// out = a + b, all the same length.
pub(super) fn add(out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
    let op = Op::new("add", file!());
    op.len("a", a.len(), out.len())?;
    op.len("b", b.len(), out.len())?;
    let kernel = |(o, (a, b)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    };
    if out.len() < PARALLEL_MIN {
        kernel((out, (a, b)));
    } else {
        out.par_chunks_mut(TASK_ELEMS).zip(a.par_chunks(TASK_ELEMS).zip(b.par_chunks(TASK_ELEMS))).for_each(kernel);
    }
    Ok(())
}

/// acc += x, the same length.
pub(super) fn add_inplace(acc: &mut [f32], x: &[f32]) -> Result<()> {
    let op = Op::new("add_inplace", file!());
    op.len("x", x.len(), acc.len())?;
    let kernel = |(acc, x): (&mut [f32], &[f32])| {
        for (a, x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    };
    if acc.len() < PARALLEL_MIN {
        kernel((acc, x));
    } else {
        acc.par_chunks_mut(TASK_ELEMS).zip(x.par_chunks(TASK_ELEMS)).for_each(kernel);
    }
    Ok(())
}

/// dst (R, width)[index[r]] = src (n, width)[r]. Sequential: appends are a few rows, and a
/// repeated index then deterministically keeps the last row written.
pub(super) fn scatter_rows(dst: &mut [f32], src: &[f32], index: &[u32], width: usize) -> Result<()> {
    let op = Op::new("scatter_rows", file!());
    let dst_rows = op.rows("dst", dst.len(), width)?;
    op.len("src", src.len(), op.mul(index.len(), width)?)?;
    if let Some((r, &bad)) = index.iter().enumerate().find(|(_, &i)| i as usize >= dst_rows) {
        return Err(op.err(format_args!("index[{r}] = {bad} is out of range for dst of {dst_rows} rows of {width}")));
    }
    for (row, &i) in src.chunks_exact(width).zip(index) {
        let i = i as usize;
        dst[i * width..(i + 1) * width].copy_from_slice(row);
    }
    Ok(())
}

/// dst[r] = src[index[r]] row by row (the last row of each sequence, for logits).
pub(super) fn gather_rows(dst: &mut [f32], src: &[f32], index: &[u32], width: usize) -> Result<()> {
    let op = Op::new("gather_rows", file!());
    let src_rows = op.rows("src", src.len(), width)?;
    op.len("dst", dst.len(), op.mul(index.len(), width)?)?;
    if let Some((r, &bad)) = index.iter().enumerate().find(|(_, &i)| i as usize >= src_rows) {
        return Err(op.err(format_args!("index[{r}] = {bad} is out of range for src of {src_rows} rows of {width}")));
    }
    for (row, &i) in dst.chunks_exact_mut(width).zip(index) {
        let i = i as usize;
        row.copy_from_slice(&src[i * width..(i + 1) * width]);
    }
    Ok(())
}
