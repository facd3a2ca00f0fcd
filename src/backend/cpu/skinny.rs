//! `out (n, OC) = inp (n, IC) · weightᵀ` for a few rows n (decoding: one row per sequence), with
//! the weight streamed from memory once.
//!
//! `gemm` packs the whole weight matrix on every call, so a decode-step product reads the weights
//! about twice; for a few rows the product is bound by that traffic (a SmolLM2-135M decode step
//! reads 540 MB of f32 weights), not by arithmetic. Here every weight row is loaded once, while it
//! sits in L1 it is multiplied with all `n` input rows (a few KiB, cache-resident).
//!
//! Kernels: `tile_avx2` (x86-64 AVX2 + FMA, picked at run time) and `tile_portable` (any target;
//! the compiler vectorises its 8-lane accumulators). Both sum each dot product as 8 interleaved
//! lanes then the lanes, so they differ from `gemm` (and from each other, FMA vs. separate
//! rounding) only by f32 rounding.

use rayon::prelude::*;

/// Weight rows per rayon task: 64 rows of 576 f32 are 144 KiB, enough to amortise a task.
const ROWS_PER_TASK: usize = 64;

/// out (n, OC) = inp (n, IC) · weightᵀ (weight (OC, IC)); shapes are checked by the caller.
pub(super) fn forward(out: &mut [f32], inp: &[f32], weight: &[f32], n: usize, in_dim: usize, out_dim: usize, parallel: bool) {
    debug_assert!(inp.len() == n * in_dim && weight.len() == out_dim * in_dim && out.len() == n * out_dim);
    if n == 0 || out_dim == 0 {
        return;
    }
    // The tasks write (weight row, input row) tiles: out transposed, (OC, n), then transposed back.
    let mut out_t = vec![0.0f32; out_dim * n];
    let task = |(w, o): (&[f32], &mut [f32])| tile(o, inp, w, n, in_dim);
    let w_chunks = weight.par_chunks(ROWS_PER_TASK * in_dim);
    if parallel {
        w_chunks.zip(out_t.par_chunks_mut(ROWS_PER_TASK * n)).for_each(task);
    } else {
        weight.chunks(ROWS_PER_TASK * in_dim).zip(out_t.chunks_mut(ROWS_PER_TASK * n)).for_each(task);
    }
    for (o, row) in out_t.chunks_exact(n).enumerate() {
        for (r, &x) in row.iter().enumerate() {
            out[r * out_dim + o] = x;
        }
    }
}

/// out_t (W, n) = weight (W, IC) · inpᵀ for a block of W weight rows.
fn tile(out_t: &mut [f32], inp: &[f32], weight: &[f32], n: usize, in_dim: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { tile_avx2(out_t, inp, weight, n, in_dim) };
    }
    tile_portable(out_t, inp, weight, n, in_dim)
}

/// Lanes of the interleaved dot products (one AVX register of f32).
const LANES: usize = 8;

/// The portable kernel: each dot product kept as 8 lane sums, as `tile_avx2` does.
pub(super) fn tile_portable(out_t: &mut [f32], inp: &[f32], weight: &[f32], n: usize, in_dim: usize) {
    let body = in_dim - in_dim % LANES;
    for (w, out) in weight.chunks_exact(in_dim).zip(out_t.chunks_exact_mut(n)) {
        for (x, o) in inp.chunks_exact(in_dim).zip(out.iter_mut()) {
            let mut acc = [0.0f32; LANES];
            for (wc, xc) in w[..body].chunks_exact(LANES).zip(x[..body].chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += wc[l] * xc[l];
                }
            }
            let tail: f32 = w[body..].iter().zip(&x[body..]).map(|(a, b)| a * b).sum();
            *o = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// AVX2 + FMA kernel: 4 weight rows × 2 input rows per register tile (8 accumulators), the
/// weight rows re-read from L1 for each pair of input rows.
///
/// # Safety
/// The CPU must support AVX2 and FMA. Slices must hold (W, IC), (n, IC) and (W, n) elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(out_t: &mut [f32], inp: &[f32], weight: &[f32], n: usize, in_dim: usize) {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes, then the scalar tail: the same order as `tile_portable`.
    #[inline(always)]
    unsafe fn finish(acc: __m256, w: &[f32], x: &[f32], body: usize) -> f32 {
        let mut lanes = [0.0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let tail: f32 = w[body..].iter().zip(&x[body..]).map(|(a, b)| a * b).sum();
        lanes.iter().sum::<f32>() + tail
    }

    let rows_w = out_t.len() / n.max(1);
    assert!(weight.len() >= rows_w * in_dim && inp.len() >= n * in_dim && out_t.len() == rows_w * n);
    let body = in_dim - in_dim % LANES;
    let wp = weight.as_ptr();
    let xp = inp.as_ptr();
    let w_row = |o: usize| &weight[o * in_dim..(o + 1) * in_dim];
    let x_row = |r: usize| &inp[r * in_dim..(r + 1) * in_dim];
    let mut o = 0;
    while o + 4 <= rows_w {
        let (w0, w1, w2, w3) = (wp.add(o * in_dim), wp.add((o + 1) * in_dim), wp.add((o + 2) * in_dim), wp.add((o + 3) * in_dim));
        let mut r = 0;
        while r + 2 <= n {
            let (x0, x1) = (xp.add(r * in_dim), xp.add((r + 1) * in_dim));
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut k = 0;
            while k < body {
                // SAFETY (all loads): k + 8 <= body <= in_dim, rows inside the asserted lengths.
                let (a0, a1) = (_mm256_loadu_ps(x0.add(k)), _mm256_loadu_ps(x1.add(k)));
                let b0 = _mm256_loadu_ps(w0.add(k));
                acc[0] = _mm256_fmadd_ps(b0, a0, acc[0]);
                acc[1] = _mm256_fmadd_ps(b0, a1, acc[1]);
                let b1 = _mm256_loadu_ps(w1.add(k));
                acc[2] = _mm256_fmadd_ps(b1, a0, acc[2]);
                acc[3] = _mm256_fmadd_ps(b1, a1, acc[3]);
                let b2 = _mm256_loadu_ps(w2.add(k));
                acc[4] = _mm256_fmadd_ps(b2, a0, acc[4]);
                acc[5] = _mm256_fmadd_ps(b2, a1, acc[5]);
                let b3 = _mm256_loadu_ps(w3.add(k));
                acc[6] = _mm256_fmadd_ps(b3, a0, acc[6]);
                acc[7] = _mm256_fmadd_ps(b3, a1, acc[7]);
                k += LANES;
            }
            for j in 0..4 {
                for i in 0..2 {
                    out_t[(o + j) * n + r + i] = finish(acc[2 * j + i], w_row(o + j), x_row(r + i), body);
                }
            }
            r += 2;
        }
        if r < n {
            let x0 = xp.add(r * in_dim);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut k = 0;
            while k < body {
                let a0 = _mm256_loadu_ps(x0.add(k));
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(k)), a0, acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w1.add(k)), a0, acc[1]);
                acc[2] = _mm256_fmadd_ps(_mm256_loadu_ps(w2.add(k)), a0, acc[2]);
                acc[3] = _mm256_fmadd_ps(_mm256_loadu_ps(w3.add(k)), a0, acc[3]);
                k += LANES;
            }
            for (j, &a) in acc.iter().enumerate() {
                out_t[(o + j) * n + r] = finish(a, w_row(o + j), x_row(r), body);
            }
        }
        o += 4;
    }
    // Leftover weight rows, one at a time.
    while o < rows_w {
        let w0 = wp.add(o * in_dim);
        for r in 0..n {
            let x0 = xp.add(r * in_dim);
            let mut acc = _mm256_setzero_ps();
            let mut k = 0;
            while k < body {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(k)), _mm256_loadu_ps(x0.add(k)), acc);
                k += LANES;
            }
            out_t[o * n + r] = finish(acc, w_row(o), x_row(r), body);
        }
        o += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// out (n, OC) in f64 from the definition.
    fn reference(inp: &[f32], w: &[f32], n: usize, ic: usize, oc: usize) -> Vec<f64> {
        let mut out = vec![0.0; n * oc];
        for r in 0..n {
            for o in 0..oc {
                out[r * oc + o] = (0..ic).map(|k| f64::from(inp[r * ic + k]) * f64::from(w[o * ic + k])).sum();
            }
        }
        out
    }

    /// Every kernel and remainder path (rows of W mod 4, n mod 2, IC mod 8) against the f64 product.
    #[test]
    fn kernels_match_reference() {
        for &(n, ic, oc) in &[(1, 8, 4), (2, 3, 1), (3, 17, 7), (5, 64, 70), (8, 576, 133), (16, 100, 129), (7, 1, 5)] {
            let inp = data(n * ic, 1);
            let w = data(oc * ic, 2);
            let want = reference(&inp, &w, n, ic, oc);
            let check = |name: &str, got: &[f32]| {
                for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    assert!((f64::from(g) - r).abs() <= 1e-5 * (1.0 + r.abs()), "{name} n {n} ic {ic} oc {oc}: [{i}] {g} vs {r}");
                }
            };
            for parallel in [false, true] {
                let mut out = vec![f32::NAN; n * oc];
                forward(&mut out, &inp, &w, n, ic, oc, parallel);
                check("forward", &out);
            }
            let mut out_t = vec![f32::NAN; oc * n];
            tile_portable(&mut out_t, &inp, &w, n, ic);
            let portable: Vec<f32> = (0..n * oc).map(|i| out_t[(i % oc) * n + i / oc]).collect();
            check("tile_portable", &portable);
        }
    }
}
