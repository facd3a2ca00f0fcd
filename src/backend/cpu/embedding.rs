//! Token embedding: forward gathers rows of the table (`out[t] = table[ids[t]]`), backward
//! scatter-adds the output gradient into the table gradient (`dtable[ids[t]] += dout[t]`).

use anyhow::Result;
use rayon::prelude::*;

use super::{rows_per_task, Op};

/// Checks every id against the table's row count.
fn check_ids(op: Op, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        Some((t, &id)) => Err(op.err(format_args!("ids[{t}] = {id} is out of range for a table of {vocab} rows"))),
        None => Ok(()),
    }
}

/// out: (N, C), table: (V, C), ids: (N).
pub(super) fn forward(out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) -> Result<()> {
    let op = Op::new("embedding_forward", file!());
    let vocab = op.rows("table", table.len(), dim)?;
    op.len("out", out.len(), op.mul(ids.len(), dim)?)?;
    check_ids(op, ids, vocab)?;
    let rows = rows_per_task(dim);
    out.par_chunks_mut(rows * dim).zip(ids.par_chunks(rows)).for_each(|(out, ids)| {
        for (o, &id) in out.chunks_exact_mut(dim).zip(ids) {
            let id = id as usize;
            o.copy_from_slice(&table[id * dim..(id + 1) * dim]);
        }
    });
    Ok(())
}

/// dtable: (V, C) +=, dout: (N, C), ids: (N).
///
/// Repeated ids must accumulate, so tasks own disjoint blocks of TABLE rows (not token rows): each
/// scans all ids and adds the tokens that land in its block, in token order. No two tasks write the
/// same row and the summation order is fixed, so the result is deterministic.
pub(super) fn backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) -> Result<()> {
    let op = Op::new("embedding_backward", file!());
    let vocab = op.rows("dtable", dtable.len(), dim)?;
    op.len("dout", dout.len(), op.mul(ids.len(), dim)?)?;
    check_ids(op, ids, vocab)?;
    // Each task rescans all N ids, so blocks are kept large: about 4 per thread.
    let block = vocab.div_ceil(4 * rayon::current_num_threads()).max(1);
    dtable.par_chunks_mut(block * dim).enumerate().for_each(|(b, dtable)| {
        let lo = b * block;
        let hi = lo + dtable.len() / dim;
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if (lo..hi).contains(&id) {
                let row = &mut dtable[(id - lo) * dim..(id - lo + 1) * dim];
                for (d, g) in row.iter_mut().zip(&dout[t * dim..(t + 1) * dim]) {
                    *d += g;
                }
            }
        }
    });
    Ok(())
}
