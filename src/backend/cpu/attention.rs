//! Scaled dot-product attention over packed sequences, causal (optionally sliding-window) or
//! bidirectional, with grouped-query heads; forward saves the log-sum-exp of each query row's
//! scaled scores, backward recomputes the probabilities from it.
//!
//! For query row i of a sequence (position p = k_len − q_len + i), key j is visible iff
//! `j <= p` and `p − j < window` (causal), or always (bidirectional). With s_ij = scale·q_i·k_j:
//!   forward:  P_ij = exp(s_ij − lse_i), lse_i = log Σ_j exp(s_ij), out_i = Σ_j P_ij v_j
//!   backward: D_i = dout_i·out_i, dS_ij = P_ij (dout_i·v_j − D_i),
//!             dq_i = scale Σ_j dS_ij k_j, dk_j = scale Σ_i dS_ij q_i, dv_j = Σ_i P_ij dout_i
//! (dk, dv also summed over the query heads sharing a kv head).
//!
//! Memory: a query row keeps only a k_len scratch of scores; no (T, T) matrix is built.
//! Query rows that belong to no sequence are left untouched by forward and get zero gradients.

use anyhow::Result;
use rayon::prelude::*;

use super::matmul::{gemm_with, Mat};
use super::{AttnSeq, AttnShape, CpuBackend, Op};
use crate::backend::AttnMask;

/// Sequences with at least this many queries (prefill, training) go through `gemm` a block of
/// query rows at a time; fewer (decoding: one new token) take the per-row loop.
const BLOCKED_MIN_Q: usize = 16;
/// Query rows per block: the (block, k_len) score scratch stays small for long sequences.
const Q_BLOCK: usize = 64;

/// Query blocks `(i0, i1)` of a sequence with `q_len` queries.
fn q_blocks(q_len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..q_len).step_by(Q_BLOCK).map(move |i0| (i0, (i0 + Q_BLOCK).min(q_len)))
}

/// Keys `lo..hi` that some query of the block `i0..i1` sees (the union of their visible ranges).
fn block_keys(mask: AttnMask, seq: &AttnSeq, i0: usize, i1: usize) -> (usize, usize) {
    let first = seq.k_len - seq.q_len + i0;
    let (lo, _) = visible(mask, first, seq.k_len);
    let (_, hi) = visible(mask, first + (i1 - i0) - 1, seq.k_len);
    (lo, hi)
}

/// Marks a query row that belongs to no sequence.
const NO_SEQ: usize = usize::MAX;

/// The checked geometry of one call.
struct Geometry {
    n_heads: usize,
    head_dim: usize,
    /// Query heads per kv head.
    group: usize,
    /// Elements of one query row (n_heads · head_dim) and one key/value row (n_kv_heads · head_dim).
    q_row: usize,
    kv_row: usize,
    /// Query rows in the buffers.
    nq: usize,
    /// owner[t]: the sequence query row t belongs to, or NO_SEQ.
    owner: Vec<usize>,
}

impl Geometry {
    fn check(op: Op, q_len: usize, k_len: usize, seqs: &[AttnSeq], shape: &AttnShape) -> Result<Self> {
        let AttnShape { n_heads, n_kv_heads, head_dim, mask, .. } = *shape;
        if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 {
            return Err(op.err(format_args!("n_heads {n_heads}, n_kv_heads {n_kv_heads}, head_dim {head_dim} must be nonzero")));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(op.err(format_args!("n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")));
        }
        if let AttnMask::Causal { window: Some(0) } = mask {
            return Err(op.err("a sliding window of 0 hides every key"));
        }
        let q_row = op.mul(n_heads, head_dim)?;
        let kv_row = op.mul(n_kv_heads, head_dim)?;
        let nq = op.rows("q (N, n_heads, head_dim)", q_len, q_row)?;
        let nk = op.rows("k (N, n_kv_heads, head_dim)", k_len, kv_row)?;
        let mut owner = vec![NO_SEQ; nq];
        for (s, seq) in seqs.iter().enumerate() {
            let q_end = seq.q_start.checked_add(seq.q_len).filter(|&e| e <= nq);
            let k_end = seq.k_start.checked_add(seq.k_len).filter(|&e| e <= nk);
            if q_end.is_none() || k_end.is_none() {
                return Err(op.err(format_args!("seqs[{s}] = {seq:?} reaches past q ({nq} rows) or k/v ({nk} rows)")));
            }
            if seq.q_len > seq.k_len {
                return Err(op.err(format_args!("seqs[{s}] = {seq:?} has more queries than keys")));
            }
            for o in &mut owner[seq.q_start..seq.q_start + seq.q_len] {
                if *o != NO_SEQ {
                    return Err(op.err(format_args!("seqs[{s}] = {seq:?} overlaps the query rows of seqs[{}]", *o)));
                }
                *o = s;
            }
        }
        Ok(Self { n_heads, head_dim, group: n_heads / n_kv_heads, q_row, kv_row, nq, owner })
    }
}

/// Keys `lo..hi` (within the sequence) visible to the query at position `p` of a sequence of
/// `k_len` keys. Nonempty: q_len <= k_len puts p inside the sequence, and window >= 1.
fn visible(mask: AttnMask, p: usize, k_len: usize) -> (usize, usize) {
    match mask {
        AttnMask::Causal { window: None } => (0, p + 1),
        AttnMask::Causal { window: Some(w) } => ((p + 1).saturating_sub(w), p + 1),
        AttnMask::Bidirectional => (0, k_len),
    }
}

/// f32 dot product with 8 independent accumulators, so the compiler can vectorise it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `acc += alpha * x`.
#[inline(always)]
fn axpy(acc: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += alpha * x;
    }
}

/// One query row of the per-row forward: its heads, and the keys `lo..hi` of the sequence whose
/// keys start at row `k_start` of k/v.
struct QueryRow<'a> {
    q: &'a [f32],
    k_start: usize,
    lo: usize,
    hi: usize,
}

/// Per-task buffers of [`forward_row`]: (heads, keys) scores, (heads, head_dim) sums of values,
/// and each head's softmax sum and max.
struct RowScratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    sums: Vec<f64>,
    maxes: Vec<f32>,
}

/// One query row, every head, key by key: a decode step reads the whole KV cache, evicted by the
/// weight stream since the last step, so each key and value row (all kv heads) is read once, in
/// order. Compiled for AVX2 when the CPU has it (8-wide mul and add, no FMA: the same results
/// either way).
#[allow(clippy::too_many_arguments)]
fn forward_row(g: &Geometry, row: &QueryRow<'_>, k: &[f32], v: &[f32], scale: f32, out: &mut [f32], lse: &mut [f32], s: &mut RowScratch) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn body(g: &Geometry, row: &QueryRow<'_>, k: &[f32], v: &[f32], scale: f32, out: &mut [f32], lse: &mut [f32], s: &mut RowScratch) {
        let (d, h, kw) = (g.head_dim, g.n_heads, row.hi - row.lo);
        let kv_slice = |head: usize| (head / g.group) * d..(head / g.group + 1) * d;
        // scores (heads, keys), filled key by key: each key row (every kv head) is one
        // contiguous read, and the cache is streamed once in order.
        let scores = &mut s.scores[..h * kw];
        for (i, j) in (row.lo..row.hi).enumerate() {
            let key = &k[(row.k_start + j) * g.kv_row..][..g.kv_row];
            for head in 0..h {
                scores[head * kw + i] = scale * dot(&row.q[head * d..][..d], &key[kv_slice(head)]);
            }
        }
        for ((sc, max), sum) in scores.chunks_exact_mut(kw).zip(s.maxes.iter_mut()).zip(s.sums.iter_mut()) {
            *max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            crate::fastexp::exp_shifted_f32(sc, *max);
            *sum = sc.iter().map(|&e| f64::from(e)).sum();
        }
        let acc = &mut s.acc[..h * d];
        acc.fill(0.0);
        for (i, j) in (row.lo..row.hi).enumerate() {
            let value = &v[(row.k_start + j) * g.kv_row..][..g.kv_row];
            for (head, a) in acc.chunks_exact_mut(d).enumerate() {
                axpy(a, scores[head * kw + i], &value[kv_slice(head)]);
            }
        }
        for (head, a) in acc.chunks_exact(d).enumerate() {
            let inv = (1.0 / s.sums[head]) as f32;
            for (o, a) in out[head * d..(head + 1) * d].iter_mut().zip(a) {
                *o = a * inv;
            }
            lse[head] = s.maxes[head] + s.sums[head].ln() as f32;
        }
    }
    crate::fastexp::with_avx2!(body(g, row, k, v, scale, out, lse, s))
}

/// One (sequence, head, query block) of the blocked forward: out rows (rows, head_dim), lse (rows).
struct FwdBlock {
    seq: usize,
    head: usize,
    i0: usize,
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// Blocked forward of queries `i0..i1` of `seq`, one head: scores (rows, keys) = Q·Kᵀ and out =
/// softmax·V through `gemm`, the same formulas as the per-row loop (f64 row sums).
#[allow(clippy::too_many_arguments)]
fn forward_block(op: Op, g: &Geometry, q: &[f32], k: &[f32], v: &[f32], s: usize, seq: &AttnSeq, head: usize, i0: usize, i1: usize, shape: &AttnShape) -> Result<FwdBlock> {
    let (d, rows) = (g.head_dim, i1 - i0);
    let (lo, hi) = block_keys(shape.mask, seq, i0, i1);
    let kw = hi - lo;
    let kv_off = (head / g.group) * d;
    let kv_at = (seq.k_start + lo) * g.kv_row + kv_off;
    let none = gemm::Parallelism::None;
    // scores (rows, kw) = Q (rows, d) · Kᵀ (d, kw)
    let mut p = vec![0.0f32; rows * kw];
    let qm = Mat { data: &q[(seq.q_start + i0) * g.q_row + head * d..], rs: g.q_row, cs: 1 };
    gemm_with(none, op, rows, kw, d, &mut p, kw, 1, false, qm, Mat { data: &k[kv_at..], rs: 1, cs: g.kv_row })?;
    let mut lse = vec![0.0f32; rows];
    let mut inv = vec![0.0f32; rows];
    for (r, row) in p.chunks_exact_mut(kw).enumerate() {
        let (a, b) = visible(shape.mask, seq.k_len - seq.q_len + i0 + r, seq.k_len);
        let (a, b) = (a - lo, b - lo);
        let mut max = f32::NEG_INFINITY;
        for x in &mut row[a..b] {
            *x *= shape.scale;
            max = max.max(*x);
        }
        crate::fastexp::exp_shifted_f32(&mut row[a..b], max);
        let sum: f64 = row[a..b].iter().map(|&x| f64::from(x)).sum();
        row[..a].fill(0.0);
        row[b..].fill(0.0);
        inv[r] = (1.0 / sum) as f32;
        lse[r] = max + sum.ln() as f32;
    }
    // out (rows, d) = P (rows, kw) · V (kw, d), then each row / its sum
    let mut out = vec![0.0f32; rows * d];
    gemm_with(none, op, rows, d, kw, &mut out, d, 1, false, Mat { data: &p, rs: kw, cs: 1 }, Mat { data: &v[kv_at..], rs: g.kv_row, cs: 1 })?;
    for (o, &inv) in out.chunks_exact_mut(d).zip(&inv) {
        o.iter_mut().for_each(|x| *x *= inv);
    }
    Ok(FwdBlock { seq: s, head, i0, out, lse })
}

/// out: (Nq, n_heads, head_dim) and lse: (Nq, n_heads) overwritten on every query row of `seqs`;
/// q: (Nq, n_heads, head_dim); k, v: (Nk, n_kv_heads, head_dim).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CpuBackend,
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seqs: &[AttnSeq],
    shape: &AttnShape,
) -> Result<()> {
    let op = Op::new("attention_forward", file!());
    let g = Geometry::check(op, q.len(), k.len(), seqs, shape)?;
    op.len("v", v.len(), k.len())?;
    op.len("out", out.len(), q.len())?;
    op.len("lse", lse.len(), op.mul(g.nq, g.n_heads)?)?;
    if g.nq == 0 {
        return Ok(());
    }
    let (h, d, scale) = (g.n_heads, g.head_dim, shape.scale);
    let max_k = seqs.iter().map(|s| s.k_len).max().unwrap_or(0);
    // A query row costs about k_len·q_row flops, so tasks are a few rows: ~8 tasks per thread.
    let rows = g.nq.div_ceil(8 * be.threads()).max(1);
    out.par_chunks_mut(rows * g.q_row).zip(lse.par_chunks_mut(rows * h)).enumerate().for_each(|(c, (out, lse))| {
        let mut scratch = RowScratch { scores: vec![0.0f32; h * max_k], acc: vec![0.0f32; h * d], sums: vec![0.0; h], maxes: vec![0.0; h] };
        for (r, (out, lse)) in out.chunks_exact_mut(g.q_row).zip(lse.chunks_exact_mut(h)).enumerate() {
            let t = c * rows + r;
            let Some(seq) = seqs.get(g.owner[t]).filter(|s| s.q_len < BLOCKED_MIN_Q) else { continue };
            let p = seq.k_len - seq.q_len + (t - seq.q_start);
            let (lo, hi) = visible(shape.mask, p, seq.k_len);
            let row = QueryRow { q: &q[t * g.q_row..][..g.q_row], k_start: seq.k_start, lo, hi };
            forward_row(&g, &row, k, v, scale, out, lse, &mut scratch);
        }
    });
    // Long sequences: blocks through gemm, each a task, scattered into out/lse afterwards.
    let tasks: Vec<(usize, usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .filter(|(_, seq)| seq.q_len >= BLOCKED_MIN_Q)
        .flat_map(|(s, seq)| (0..h).flat_map(move |head| q_blocks(seq.q_len).map(move |(i0, i1)| (s, head, i0, i1))))
        .collect();
    let blocks: Vec<FwdBlock> =
        tasks.into_par_iter().map(|(s, head, i0, i1)| forward_block(op, &g, q, k, v, s, &seqs[s], head, i0, i1, shape)).collect::<Result<_>>()?;
    for blk in blocks {
        let seq = seqs[blk.seq];
        for (r, (o, &l)) in blk.out.chunks_exact(d).zip(&blk.lse).enumerate() {
            let t = seq.q_start + blk.i0 + r;
            out[t * g.q_row + blk.head * d..][..d].copy_from_slice(o);
            lse[t * h + blk.head] = l;
        }
    }
    Ok(())
}

/// One (sequence, kv head) task's gradients, scattered into the outputs after the parallel part.
struct Part {
    seq: usize,
    kv_head: usize,
    /// (q_len, group, head_dim)
    dq: Vec<f32>,
    /// (k_len, head_dim) each
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Blocked backward of queries `i0..i1` of `seq`, one head, into its (sequence, kv head) part:
/// with P recomputed from the saved lse, dP = dO·Vᵀ, dS = P ∘ (dP − D)·scale,
/// dq = dS·K, dk += dSᵀ·Q, dv += Pᵀ·dO, each product through `gemm`.
#[allow(clippy::too_many_arguments)]
fn backward_block(
    op: Op,
    g: &Geometry,
    part: &mut Part,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    seq: &AttnSeq,
    head: usize,
    i0: usize,
    i1: usize,
    shape: &AttnShape,
) -> Result<()> {
    let (d, rows, group) = (g.head_dim, i1 - i0, g.group);
    let (lo, hi) = block_keys(shape.mask, seq, i0, i1);
    let kw = hi - lo;
    let kv_at = (seq.k_start + lo) * g.kv_row + part.kv_head * d;
    let q_at = (seq.q_start + i0) * g.q_row + head * d;
    let none = gemm::Parallelism::None;
    let qm = Mat { data: &q[q_at..], rs: g.q_row, cs: 1 };
    let dom = Mat { data: &dout[q_at..], rs: g.q_row, cs: 1 };
    // p (rows, kw) = Q·Kᵀ, then P; dp (rows, kw) = dO·Vᵀ, then dS·scale.
    let mut p = vec![0.0f32; rows * kw];
    gemm_with(none, op, rows, kw, d, &mut p, kw, 1, false, qm, Mat { data: &k[kv_at..], rs: 1, cs: g.kv_row })?;
    let mut dp = vec![0.0f32; rows * kw];
    gemm_with(none, op, rows, kw, d, &mut dp, kw, 1, false, dom, Mat { data: &v[kv_at..], rs: 1, cs: g.kv_row })?;
    for (r, (prow, dprow)) in p.chunks_exact_mut(kw).zip(dp.chunks_exact_mut(kw)).enumerate() {
        let t = seq.q_start + i0 + r;
        let (a, b) = visible(shape.mask, seq.k_len - seq.q_len + i0 + r, seq.k_len);
        let (a, b) = (a - lo, b - lo);
        let l = lse[t * g.n_heads + head];
        let row = t * g.q_row + head * d;
        let di = dot(&dout[row..][..d], &out[row..][..d]);
        prow[a..b].iter_mut().for_each(|x| *x *= shape.scale);
        crate::fastexp::exp_shifted_f32(&mut prow[a..b], l);
        for (x, dx) in prow[a..b].iter().zip(&mut dprow[a..b]) {
            *dx = shape.scale * (*x * (*dx - di));
        }
        for range in [0..a, b..kw] {
            prow[range.clone()].fill(0.0);
            dprow[range].fill(0.0);
        }
    }
    // dq rows (i, hg) of the part's (q_len, group, d) = dS (rows, kw) · K (kw, d)
    let hg = head % group;
    let dq_at = (i0 * group + hg) * d;
    let km = Mat { data: &k[kv_at..], rs: g.kv_row, cs: 1 };
    gemm_with(none, op, rows, d, kw, &mut part.dq[dq_at..], group * d, 1, false, Mat { data: &dp, rs: kw, cs: 1 }, km)?;
    // dk (kw, d) += dSᵀ (kw, rows) · Q (rows, d); dv (kw, d) += Pᵀ · dO
    gemm_with(none, op, kw, d, rows, &mut part.dk[lo * d..], d, 1, true, Mat { data: &dp, rs: 1, cs: kw }, qm)?;
    gemm_with(none, op, kw, d, rows, &mut part.dv[lo * d..], d, 1, true, Mat { data: &p, rs: 1, cs: kw }, dom)
}

/// dq: (Nq, n_heads, head_dim), dk, dv: (Nk, n_kv_heads, head_dim), all overwritten.
///
/// Parallel over (sequence, kv head): such a task owns all the dk/dv rows it produces, so the sums
/// over query rows and over the query heads of a group need no synchronisation.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    seqs: &[AttnSeq],
    shape: &AttnShape,
) -> Result<()> {
    let op = Op::new("attention_backward", file!());
    let g = Geometry::check(op, q.len(), k.len(), seqs, shape)?;
    op.len("v", v.len(), k.len())?;
    op.len("dq", dq.len(), q.len())?;
    op.len("dout", dout.len(), q.len())?;
    op.len("out", out.len(), q.len())?;
    op.len("dk", dk.len(), k.len())?;
    op.len("dv", dv.len(), k.len())?;
    op.len("lse", lse.len(), op.mul(g.nq, g.n_heads)?)?;
    let (h, d, group, scale) = (g.n_heads, g.head_dim, g.group, shape.scale);
    let n_kv = h / group;
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..n_kv).map(move |kvh| (s, kvh))).collect();
    let parts: Vec<Part> = tasks
        .into_par_iter()
        .map(|(s, kv_head)| {
            let seq = seqs[s];
            let kv_off = kv_head * d;
            let key = |j: usize| &k[(seq.k_start + j) * g.kv_row + kv_off..][..d];
            let val = |j: usize| &v[(seq.k_start + j) * g.kv_row + kv_off..][..d];
            let mut part = Part {
                seq: s,
                kv_head,
                dq: vec![0.0; seq.q_len * group * d],
                dk: vec![0.0; seq.k_len * d],
                dv: vec![0.0; seq.k_len * d],
            };
            for hg in 0..group {
                let head = kv_head * group + hg;
                if seq.q_len >= BLOCKED_MIN_Q {
                    for (i0, i1) in q_blocks(seq.q_len) {
                        backward_block(op, &g, &mut part, q, k, v, dout, out, lse, &seq, head, i0, i1, shape)?;
                    }
                    continue;
                }
                for i in 0..seq.q_len {
                    let t = seq.q_start + i;
                    let p = seq.k_len - seq.q_len + i;
                    let (lo, hi) = visible(shape.mask, p, seq.k_len);
                    let row = t * g.q_row + head * d;
                    let (qv, dov, ov) = (&q[row..][..d], &dout[row..][..d], &out[row..][..d]);
                    let l = lse[t * h + head];
                    let di = dot(dov, ov);
                    let dqi = &mut part.dq[(i * group + hg) * d..][..d];
                    for j in lo..hi {
                        let pij = (scale * dot(qv, key(j)) - l).exp();
                        let ds = pij * (dot(dov, val(j)) - di);
                        axpy(dqi, scale * ds, key(j));
                        axpy(&mut part.dk[j * d..][..d], scale * ds, qv);
                        axpy(&mut part.dv[j * d..][..d], pij, dov);
                    }
                }
            }
            Ok(part)
        })
        .collect::<Result<_>>()?;
    // Rows outside every sequence get zero; overlapping key ranges (sequences sharing keys) add.
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    for part in parts {
        let seq = seqs[part.seq];
        for i in 0..seq.q_len {
            for hg in 0..group {
                let head = part.kv_head * group + hg;
                let dst = &mut dq[(seq.q_start + i) * g.q_row + head * d..][..d];
                axpy(dst, 1.0, &part.dq[(i * group + hg) * d..][..d]);
            }
        }
        for j in 0..seq.k_len {
            let off = (seq.k_start + j) * g.kv_row + part.kv_head * d;
            axpy(&mut dk[off..off + d], 1.0, &part.dk[j * d..][..d]);
            axpy(&mut dv[off..off + d], 1.0, &part.dv[j * d..][..d]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `visible` against the definition in `AttnMask`'s doc, by brute force.
    #[test]
    fn visible_matches_definition() {
        for k_len in 1..12 {
            for p in 0..k_len {
                for window in [None, Some(1), Some(2), Some(5), Some(40)] {
                    let (lo, hi) = visible(AttnMask::Causal { window }, p, k_len);
                    for j in 0..k_len {
                        let want = j <= p && window.is_none_or(|w| p - j < w);
                        assert_eq!((lo..hi).contains(&j), want, "p {p} j {j} window {window:?}");
                    }
                }
                assert_eq!(visible(AttnMask::Bidirectional, p, k_len), (0, k_len));
            }
        }
    }

    #[test]
    fn dot_matches_naive() {
        for n in [0usize, 1, 7, 8, 9, 31] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() <= 1e-4 * want.abs().max(1.0), "n {n}");
        }
    }
}
