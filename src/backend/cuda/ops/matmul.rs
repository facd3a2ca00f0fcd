//! Matrix products of the Hugging Face Linear layout through cuBLAS: f32 operands by `sgemm`
//! ([`forward`] and friends), bf16 operands by `cublasGemmEx` with f32 compute
//! (`CUBLAS_COMPUTE_32F`, tensor cores) writing a bf16 or an f32 result ([`forward_ex`] and
//! friends: the bf16 backend's products, and its parameter gradients accumulated in f32):
//! forward `out (N, OC) = inp (N, IC) · Wᵀ`, backward `dinp (N, IC) (+)= dout (N, OC) · W` and
//! `dW (OC, IC) += doutᵀ · inp`, W (OC, IC) row-major, as `Backend::matmul_*` (CPU reference:
//! `src/backend/cpu/matmul.rs`).
//!
//! cuBLAS is column-major: a row-major (R, C) matrix is the column-major (C, R) matrix with leading
//! dimension C. Each product below is written in those terms ([`plan_forward`] and friends return
//! the `GemmConfig`, so the mapping is unit-tested without a GPU).

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::Element;

use crate::backend::cuda::error::{CudaError, Result};

fn shape(op: &'static str, detail: String) -> CudaError {
    CudaError::Shape { op, detail }
}

/// Rows N of `len` = N × width elements, with every dimension fitting cuBLAS's `int`.
fn rows(op: &'static str, what: &str, len: usize, width: usize) -> Result<usize> {
    if width == 0 || !len.is_multiple_of(width) {
        return Err(shape(op, format!("{what} has {len} elements, not a whole number of rows of {width}")));
    }
    let n = len / width;
    if i32::try_from(n).is_err() || i32::try_from(width).is_err() {
        return Err(shape(op, format!("{what} ({n}, {width}) exceeds cuBLAS's int dimensions")));
    }
    Ok(n)
}

fn expect(op: &'static str, what: &str, got: usize, want: usize, shape_text: String) -> Result<()> {
    if got != want {
        return Err(shape(op, format!("{what} has {got} elements, expected {shape_text} = {want}")));
    }
    Ok(())
}

/// out (N, OC) = inp (N, IC) · Wᵀ. Column-major: outᶜ (OC × N) = Wᶜᵀ (OC × IC) · inpᶜ (IC × N),
/// Wᶜ = W as (IC × OC), lda IC; inpᶜ ldb IC; outᶜ ldc OC.
pub fn plan_forward(out: usize, inp: usize, weight: usize, in_dim: usize, out_dim: usize) -> Result<Option<GemmConfig<f32>>> {
    const OP: &str = "matmul_forward";
    let n = rows(OP, "inp", inp, in_dim)?;
    expect(OP, "out", out, n * out_dim, format!("(N={n}, OC={out_dim})"))?;
    expect(OP, "weight", weight, out_dim * in_dim, format!("(OC={out_dim}, IC={in_dim})"))?;
    rows(OP, "weight", weight, in_dim)?;
    if n == 0 || out_dim == 0 {
        return Ok(None);
    }
    Ok(Some(GemmConfig {
        transa: CUBLAS_OP_T,
        transb: CUBLAS_OP_N,
        m: out_dim as i32,
        n: n as i32,
        k: in_dim as i32,
        alpha: 1.0,
        lda: in_dim as i32,
        ldb: in_dim as i32,
        beta: 0.0,
        ldc: out_dim as i32,
    }))
}

/// dinp (N, IC) (+)= dout (N, OC) · W. Column-major: dinpᶜ (IC × N) = Wᶜ (IC × OC) · doutᶜ (OC × N).
pub fn plan_backward_input(dinp: usize, dout: usize, weight: usize, in_dim: usize, out_dim: usize, accumulate: bool) -> Result<Option<GemmConfig<f32>>> {
    const OP: &str = "matmul_backward_input";
    let n = rows(OP, "dout", dout, out_dim)?;
    expect(OP, "dinp", dinp, n * in_dim, format!("(N={n}, IC={in_dim})"))?;
    expect(OP, "weight", weight, out_dim * in_dim, format!("(OC={out_dim}, IC={in_dim})"))?;
    rows(OP, "weight", weight, in_dim)?;
    if n == 0 || in_dim == 0 {
        return Ok(None);
    }
    Ok(Some(GemmConfig {
        transa: CUBLAS_OP_N,
        transb: CUBLAS_OP_N,
        m: in_dim as i32,
        n: n as i32,
        k: out_dim as i32,
        alpha: 1.0,
        lda: in_dim as i32,
        ldb: out_dim as i32,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: in_dim as i32,
    }))
}

/// dW (OC, IC) += doutᵀ (OC, N) · inp (N, IC). Column-major: dWᶜ (IC × OC) += inpᶜ (IC × N) ·
/// doutᶜᵀ (N × OC).
pub fn plan_backward_weight(dweight: usize, dout: usize, inp: usize, in_dim: usize, out_dim: usize) -> Result<Option<GemmConfig<f32>>> {
    const OP: &str = "matmul_backward_weight";
    let n = rows(OP, "inp", inp, in_dim)?;
    expect(OP, "dout", dout, n * out_dim, format!("(N={n}, OC={out_dim})"))?;
    expect(OP, "dweight", dweight, out_dim * in_dim, format!("(OC={out_dim}, IC={in_dim})"))?;
    rows(OP, "dweight", dweight, in_dim)?;
    if n == 0 || in_dim == 0 || out_dim == 0 {
        return Ok(None);
    }
    Ok(Some(GemmConfig {
        transa: CUBLAS_OP_N,
        transb: CUBLAS_OP_T,
        m: in_dim as i32,
        n: out_dim as i32,
        k: n as i32,
        alpha: 1.0,
        lda: in_dim as i32,
        ldb: out_dim as i32,
        beta: 1.0,
        ldc: in_dim as i32,
    }))
}

fn run(blas: &CudaBlas, op: &str, cfg: GemmConfig<f32>, a: &CudaView<'_, f32>, b: &CudaView<'_, f32>, c: &mut CudaViewMut<'_, f32>) -> Result<()> {
    // SAFETY: the plan checked that A, B and C hold the (m, k), (k, n), (m, n) column-major
    // matrices its leading dimensions describe; c is an exclusive borrow (no aliasing).
    unsafe { blas.gemm(cfg, a, b, c) }.map_err(|e| shape("matmul", format!("{op}: cuBLAS sgemm failed: {e}")))
}

/// `out = inp · weightᵀ` (OVERWRITES out).
pub fn forward(blas: &CudaBlas, out: &mut CudaViewMut<'_, f32>, inp: &CudaView<'_, f32>, weight: &CudaView<'_, f32>, in_dim: usize, out_dim: usize) -> Result<()> {
    match plan_forward(out.len(), inp.len(), weight.len(), in_dim, out_dim)? {
        Some(cfg) => run(blas, "matmul_forward", cfg, weight, inp, out),
        None => Ok(()),
    }
}

/// `dinp (+)= dout · weight`.
#[allow(clippy::too_many_arguments)]
pub fn backward_input(
    blas: &CudaBlas,
    dinp: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, f32>,
    weight: &CudaView<'_, f32>,
    in_dim: usize,
    out_dim: usize,
    accumulate: bool,
) -> Result<()> {
    match plan_backward_input(dinp.len(), dout.len(), weight.len(), in_dim, out_dim, accumulate)? {
        Some(cfg) => run(blas, "matmul_backward_input", cfg, weight, dout, dinp),
        None => Ok(()),
    }
}

/// `dweight += doutᵀ · inp`.
pub fn backward_weight(blas: &CudaBlas, dweight: &mut CudaViewMut<'_, f32>, dout: &CudaView<'_, f32>, inp: &CudaView<'_, f32>, in_dim: usize, out_dim: usize) -> Result<()> {
    match plan_backward_weight(dweight.len(), dout.len(), inp.len(), in_dim, out_dim)? {
        Some(cfg) => run(blas, "matmul_backward_weight", cfg, inp, dout, dweight),
        None => Ok(()),
    }
}

/// An element type `cublasGemmEx` takes, with its `cudaDataType`.
pub trait BlasElement: Element {
    const CUDA_TYPE: cudaDataType_t;
}

impl BlasElement for f32 {
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
}

impl BlasElement for half::bf16 {
    const CUDA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
}

/// C = α op(A) op(B) + β C by `cublasGemmEx`: A and B of type `I`, C of type `O`, f32 compute and
/// f32 scalars. cuBLAS supports (I, O) = (bf16, bf16), (bf16, f32) and (f32, f32) this way.
fn run_ex<I: BlasElement, O: BlasElement>(
    blas: &CudaBlas,
    stream: &CudaStream,
    op: &str,
    cfg: GemmConfig<f32>,
    a: &CudaView<'_, I>,
    b: &CudaView<'_, I>,
    c: &mut CudaViewMut<'_, O>,
) -> Result<()> {
    let (alpha, beta) = (cfg.alpha, cfg.beta);
    let (pa, _ra) = a.device_ptr(stream);
    let (pb, _rb) = b.device_ptr(stream);
    let (pc, _rc) = c.device_ptr_mut(stream);
    // SAFETY: the plan checked that A, B and C hold the (m, k), (k, n), (m, n) column-major
    // matrices its leading dimensions describe, in the types passed beside them; `stream` is the
    // one `blas` was created on (CudaBackend::new), so the recorded events order the accesses;
    // alpha and beta are host f32 values (the default host pointer mode) matching the f32
    // compute type; c is an exclusive borrow (no aliasing).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cfg.transa,
            cfg.transb,
            cfg.m,
            cfg.n,
            cfg.k,
            (&alpha) as *const f32 as *const _,
            pa as *const _,
            I::CUDA_TYPE,
            cfg.lda,
            pb as *const _,
            I::CUDA_TYPE,
            cfg.ldb,
            (&beta) as *const f32 as *const _,
            pc as *mut _,
            O::CUDA_TYPE,
            cfg.ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| shape("matmul", format!("{op}: cublasGemmEx ({} in, {} out) failed: {e}", I::DTYPE, O::DTYPE)))
}

/// [`forward`] by `cublasGemmEx`: `out (O) = inp (I) · weight (I)ᵀ` (OVERWRITES out).
pub fn forward_ex<I: BlasElement, O: BlasElement>(
    blas: &CudaBlas,
    stream: &CudaStream,
    out: &mut CudaViewMut<'_, O>,
    inp: &CudaView<'_, I>,
    weight: &CudaView<'_, I>,
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    match plan_forward(out.len(), inp.len(), weight.len(), in_dim, out_dim)? {
        Some(cfg) => run_ex(blas, stream, "matmul_forward", cfg, weight, inp, out),
        None => Ok(()),
    }
}

/// [`backward_input`] by `cublasGemmEx`: `dinp (O) (+)= dout (I) · weight (I)`.
#[allow(clippy::too_many_arguments)]
pub fn backward_input_ex<I: BlasElement, O: BlasElement>(
    blas: &CudaBlas,
    stream: &CudaStream,
    dinp: &mut CudaViewMut<'_, O>,
    dout: &CudaView<'_, I>,
    weight: &CudaView<'_, I>,
    in_dim: usize,
    out_dim: usize,
    accumulate: bool,
) -> Result<()> {
    match plan_backward_input(dinp.len(), dout.len(), weight.len(), in_dim, out_dim, accumulate)? {
        Some(cfg) => run_ex(blas, stream, "matmul_backward_input", cfg, weight, dout, dinp),
        None => Ok(()),
    }
}

/// [`backward_weight`] by `cublasGemmEx`: `dweight (O) += dout (I)ᵀ · inp (I)`; with O = f32 the
/// parameter gradient accumulates in f32 across micro-batches.
#[allow(clippy::too_many_arguments)]
pub fn backward_weight_ex<I: BlasElement, O: BlasElement>(
    blas: &CudaBlas,
    stream: &CudaStream,
    dweight: &mut CudaViewMut<'_, O>,
    dout: &CudaView<'_, I>,
    inp: &CudaView<'_, I>,
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    match plan_backward_weight(dweight.len(), dout.len(), inp.len(), in_dim, out_dim)? {
        Some(cfg) => run_ex(blas, stream, "matmul_backward_weight", cfg, inp, dout, dweight),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column-major gemm as cuBLAS defines it, on host slices: C = α op(A) op(B) + β C.
    fn host_gemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        let at = |i: usize, p: usize| if cfg.transa == CUBLAS_OP_N { a[i + p * lda] } else { a[p + i * lda] };
        let bt = |p: usize, j: usize| if cfg.transb == CUBLAS_OP_N { b[p + j * ldb] } else { b[j + p * ldb] };
        for j in 0..n {
            for i in 0..m {
                let s: f64 = (0..k).map(|p| f64::from(at(i, p)) * f64::from(bt(p, j))).sum();
                // beta 0: C is not read (cuBLAS's rule), so NaN in C does not leak through.
                let old = if cfg.beta == 0.0 { 0.0 } else { f64::from(cfg.beta) * f64::from(c[i + j * ldc]) };
                c[i + j * ldc] = (f64::from(cfg.alpha) * s + old) as f32;
            }
        }
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104729) % 1009) as f32 / 1009.0 - 0.5).collect()
    }

    /// The three plans, run through cuBLAS's column-major definition, give the row-major
    /// products of the CPU backend.
    #[test]
    fn plans_compute_the_row_major_products() {
        use crate::backend::{cpu::CpuBackend, Backend};
        let cpu = CpuBackend::new(Some(1)).unwrap();
        let (n, ic, oc) = (5, 7, 3);
        let (inp, w, dout) = (data(n * ic, 1), data(oc * ic, 2), data(n * oc, 3));
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{what}: {a:?} vs {b:?}");
            }
        };
        let mut want = vec![0.0; n * oc];
        cpu.matmul_forward(&mut want, &inp, &w, ic, oc).unwrap();
        let mut got = vec![f32::NAN; n * oc];
        host_gemm(&plan_forward(n * oc, n * ic, oc * ic, ic, oc).unwrap().unwrap(), &w, &inp, &mut got);
        close(&got, &want, "forward");

        let base = data(n * ic, 4);
        for accumulate in [false, true] {
            let mut want = base.clone();
            cpu.matmul_backward_input(&mut want, &dout, &w, ic, oc, accumulate).unwrap();
            let mut got = if accumulate { base.clone() } else { vec![0.0; n * ic] };
            host_gemm(&plan_backward_input(n * ic, n * oc, oc * ic, ic, oc, accumulate).unwrap().unwrap(), &w, &dout, &mut got);
            close(&got, &want, "backward_input");
        }

        let base = data(oc * ic, 5);
        let mut want = base.clone();
        cpu.matmul_backward_weight(&mut want, &dout, &inp, ic, oc).unwrap();
        let mut got = base.clone();
        host_gemm(&plan_backward_weight(oc * ic, n * oc, n * ic, ic, oc).unwrap().unwrap(), &inp, &dout, &mut got);
        close(&got, &want, "backward_weight");

        assert!(plan_forward(n * oc, n * ic + 1, oc * ic, ic, oc).is_err(), "ragged input accepted");
        assert!(plan_forward(n * oc, n * ic, oc * ic - 1, ic, oc).is_err(), "short weight accepted");
    }
}
