//! Matrix products of the HF Linear layout through the `gemm` crate:
//! forward `out (N, OC) = inp (N, IC) · weightᵀ`, backward `dinp (N, IC) (+)= dout (N, OC) · weight`
//! and `dweight (OC, IC) += doutᵀ · inp`. Also the checked `gemm` wrapper the LM head uses.

use anyhow::Result;

use super::{CpuBackend, Op};

/// A read-only strided matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// Whether every element of a (rows, cols) matrix with strides (rs, cs) lies inside `len`.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(rs).and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)));
    matches!(last, Some(last) if last < len)
}

/// `dst (m, n) = [dst +] lhs (m, k) · rhs (k, n)`; `accumulate` reads dst, otherwise dst is only
/// written. Every matrix is bounds-checked against its slice before the unsafe call.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    be: &CpuBackend,
    op: Op,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
) -> Result<()> {
    gemm_with(be.gemm_par(m, n, k), op, m, n, k, dst, dst_rs, dst_cs, accumulate, lhs, rhs)
}

/// [`gemm`] with the caller's parallelism (`None` inside a task that is already one of many).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_with(
    par: gemm::Parallelism,
    op: Op,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
) -> Result<()> {
    if !fits(dst.len(), m, n, dst_rs, dst_cs) || !fits(lhs.data.len(), m, k, lhs.rs, lhs.cs) || !fits(rhs.data.len(), k, n, rhs.rs, rhs.cs) {
        return Err(op.err(format_args!(
            "internal: gemm ({m}x{k})·({k}x{n}) does not fit its buffers (dst {}, lhs {}, rhs {})",
            dst.len(),
            lhs.data.len(),
            rhs.data.len()
        )));
    }
    let stride = |s: usize| isize::try_from(s).map_err(|_| op.err(format_args!("stride {s} overflows isize")));
    let (dst_rs, dst_cs) = (stride(dst_rs)?, stride(dst_cs)?);
    let (lhs_rs, lhs_cs, rhs_rs, rhs_cs) = (stride(lhs.rs)?, stride(lhs.cs)?, stride(rhs.rs)?, stride(rhs.cs)?);
    // SAFETY: `fits` checked that every element addressed by (m, n, k) and the strides lies inside
    // its slice; `dst` is a unique borrow, so it aliases neither input; `gemm` is called with f32,
    // one of its supported types. With `read_dst` false gemm computes dst = 1·lhs·rhs without
    // reading dst (alpha is ignored), so NaN garbage in dst does not leak through.
    unsafe {
        gemm::gemm::<f32>(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// Up to this many rows, `forward` streams the weight once (`skinny.rs`) instead of calling
/// `gemm`, which packs the whole weight per call: decode steps multiply one row per sequence.
const SKINNY_MAX_ROWS: usize = 16;

/// out (N, OC) = inp (N, IC) · weightᵀ, weight (OC, IC). Overwrites out.
pub(super) fn forward(be: &CpuBackend, out: &mut [f32], inp: &[f32], weight: &[f32], in_dim: usize, out_dim: usize) -> Result<()> {
    forward_many(be, vec![(out, weight, out_dim)], inp, in_dim)
}

/// Each `out (N, OC) = inp (N, IC) · weightᵀ` of `products` (out, weight, OC), overwriting the
/// outs: for few rows one pass over every weight (`skinny::forward_many`), else a `gemm` each.
pub(super) fn forward_many(be: &CpuBackend, products: Vec<(&mut [f32], &[f32], usize)>, inp: &[f32], in_dim: usize) -> Result<()> {
    let op = Op::new("matmul_forward", file!());
    let n = op.rows("inp", inp.len(), in_dim)?;
    for (out, weight, out_dim) in &products {
        op.len("out", out.len(), op.mul(n, *out_dim)?)?;
        op.len("weight", weight.len(), op.mul(*out_dim, in_dim)?)?;
    }
    let total: usize = products.iter().map(|p| p.2).sum();
    let threads = match be.gemm_par(n, total, in_dim) {
        gemm::Parallelism::Rayon(t) => t,
        _ => 1,
    };
    // While generating, a weight inside the parameters has a bf16 copy (decode.rs): few-row
    // products read it (half the traffic); many-row products are compute-bound and use `gemm`,
    // on the f32 weight when the copy is exact, else on the rounded copy widened to f32, so that
    // every product of the generation sees the same values whatever the number of rows.
    let copy = be.decode_copy();
    if n <= SKINNY_MAX_ROWS {
        let skinny = products
            .into_iter()
            .map(|(out, weight, out_dim)| {
                let weight = match copy.as_deref().and_then(|c| c.slice_for(weight)) {
                    Some(bits) => super::skinny::Weights::Bf16(bits),
                    None => super::skinny::Weights::F32(weight),
                };
                super::skinny::Product { out, weight, out_dim }
            })
            .collect();
        super::skinny::forward_many(skinny, inp, n, in_dim, threads, super::skinny::chosen_kernel()?);
        return Ok(());
    }
    for (out, weight, out_dim) in products {
        let widened: Vec<f32>;
        let mut weight = weight;
        if let Some(bits) = copy.as_deref().filter(|c| !c.exact).and_then(|c| c.slice_for(weight)) {
            widened = bits.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect();
            weight = &widened;
        }
        // weightᵀ as a (IC, OC) matrix: element (i, o) is weight[o * IC + i].
        let wt = Mat { data: weight, rs: 1, cs: in_dim };
        gemm(be, op, n, out_dim, in_dim, out, out_dim, 1, false, Mat { data: inp, rs: in_dim, cs: 1 }, wt)?;
    }
    Ok(())
}

/// dinp (N, IC) (+)= dout (N, OC) · weight (OC, IC).
pub(super) fn backward_input(
    be: &CpuBackend,
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    in_dim: usize,
    out_dim: usize,
    accumulate: bool,
) -> Result<()> {
    let op = Op::new("matmul_backward_input", file!());
    let n = op.rows("dout", dout.len(), out_dim)?;
    op.len("dinp", dinp.len(), op.mul(n, in_dim)?)?;
    op.len("weight", weight.len(), op.mul(out_dim, in_dim)?)?;
    let lhs = Mat { data: dout, rs: out_dim, cs: 1 };
    let rhs = Mat { data: weight, rs: in_dim, cs: 1 };
    gemm(be, op, n, in_dim, out_dim, dinp, in_dim, 1, accumulate, lhs, rhs)
}

/// dweight (OC, IC) += doutᵀ (OC, N) · inp (N, IC).
pub(super) fn backward_weight(be: &CpuBackend, dweight: &mut [f32], dout: &[f32], inp: &[f32], in_dim: usize, out_dim: usize) -> Result<()> {
    let op = Op::new("matmul_backward_weight", file!());
    let n = op.rows("inp", inp.len(), in_dim)?;
    op.len("dout", dout.len(), op.mul(n, out_dim)?)?;
    op.len("dweight", dweight.len(), op.mul(out_dim, in_dim)?)?;
    // doutᵀ as an (OC, N) matrix: element (o, t) is dout[t * OC + o].
    let lhs = Mat { data: dout, rs: 1, cs: out_dim };
    let rhs = Mat { data: inp, rs: in_dim, cs: 1 };
    gemm(be, op, out_dim, in_dim, n, dweight, in_dim, 1, true, lhs, rhs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_bounds() {
        // A (3, 4) row-major matrix needs 12 elements; its transpose view (rs 1, cs 4) too.
        assert!(fits(12, 3, 4, 4, 1));
        assert!(!fits(11, 3, 4, 4, 1));
        assert!(fits(12, 4, 3, 1, 4));
        assert!(fits(0, 0, 5, 5, 1));
        assert!(!fits(usize::MAX, 2, 2, usize::MAX, 1));
    }

    /// The NaN-poison guarantee of `gemm` without `accumulate`: dst is never read.
    #[test]
    fn overwrite_does_not_read_dst() -> Result<()> {
        let be = CpuBackend::new(Some(1))?;
        let op = Op::new("test", file!());
        let mut dst = vec![f32::NAN; 4];
        let a = [1.0, 2.0, 3.0, 4.0];
        gemm(&be, op, 2, 2, 2, &mut dst, 2, 1, false, Mat { data: &a, rs: 2, cs: 1 }, Mat { data: &a, rs: 2, cs: 1 })?;
        assert_eq!(dst, vec![7.0, 10.0, 15.0, 22.0]);
        let mut dst = vec![f32::NAN; 4];
        gemm(&be, op, 2, 2, 0, &mut dst, 2, 1, false, Mat { data: &[], rs: 0, cs: 1 }, Mat { data: &[], rs: 2, cs: 1 })?;
        assert_eq!(dst, vec![0.0; 4], "an empty product is zero");
        Ok(())
    }
}
