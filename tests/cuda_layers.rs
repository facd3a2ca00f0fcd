//! The layer kernels (`kernels/{embedding,rope,swiglu,gelu,layernorm,bias}.cu`) against the f32
//! CPU backend (`CpuBackend`'s methods of the same names), every variant and dtype, on random
//! inputs with awkward sizes: one row, sizes not multiples of 32 or of the block, head_dim 64 and
//! 128, GQA head counts, positions not starting at 0, repeated ids. Outputs start as NaN (so an
//! unwritten element fails; NaN never passes), and accumulating outputs start non-zero.
//!
//! Each check runs through the host-compiled kernels on CPU threads (`host_*` tests, everywhere)
//! and through the real kernels when `probe()` finds a GPU (`gpu_*` tests; else they print
//! `skipped <test>: <reason>`). Both go through the launchers' plans (same checks and grids).
//!
//! Tolerances: f32 differs from the reference by summation order and libm vs CUDA math only:
//! rtol 1e-5 (with an absolute floor of 1e-5 × the tensor's largest element for values that
//! cancel to near zero). bf16: the reference sees the same bf16 inputs, so only the output's one
//! rounding (≤ 2^-9 relative) and the f32 math differ: rtol 4e-3, floor 1e-3 × max.

#[macro_use]
mod common;

use common::{assert_close, Rng};
use half::bf16;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::error::CudaError;
use sppo::backend::cuda::host::{ffi, grid_args};
use sppo::backend::cuda::ops::layer_util::ElementwisePlan;
use sppo::backend::cuda::ops::{bias, embedding, gelu, layernorm, rope, swiglu, DType, Element};
use sppo::backend::cuda::{
    BiasVariant, CudaDevice, EmbeddingVariant, GeluVariant, LayerNormVariant, RopeVariant, SwigluVariant,
};
use sppo::backend::Backend;

// ---- element types, runners, tolerances ----

trait Elem: Element + std::fmt::Debug {
    const NAN: Self;
    fn from_f32s(v: &[f32]) -> Vec<Self>;
    fn to_f32s(v: &[Self]) -> Vec<f32>;
}

impl Elem for f32 {
    const NAN: f32 = f32::NAN;
    fn from_f32s(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn to_f32s(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
}

impl Elem for bf16 {
    const NAN: bf16 = bf16::NAN;
    fn from_f32s(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }
    fn to_f32s(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }
}

/// The values a T-typed buffer holds, as f32 (the reference's inputs).
fn rounded<T: Elem>(v: &[f32]) -> Vec<f32> {
    T::to_f32s(&T::from_f32s(v))
}

/// Where the kernels run.
#[derive(Clone, Copy)]
enum Runner<'a> {
    Host,
    Gpu(&'a CudaDevice),
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

fn check(what: &str, got: &[f32], want: &[f32], dtype: DType) {
    let (rtol, floor) = match dtype {
        DType::F32 => (1e-5, 1e-5),
        DType::Bf16 => (4e-3, 1e-3),
    };
    assert_close(what, got, want, floor * max_abs(want).max(1e-30), rtol);
}

fn cpu() -> CpuBackend {
    CpuBackend::new(Some(1)).expect("cpu backend")
}

/// The kernel's result, or its launcher's error (e.g. UnsupportedDtype for a variant without
/// that dtype), which the caller checks.
type Out<T> = Result<T, CudaError>;

fn expect_unsupported<T: std::fmt::Debug>(case: &str, res: Out<T>) {
    assert!(matches!(res, Err(CudaError::UnsupportedDtype { .. })), "{case}: expected UnsupportedDtype, got {res:?}");
}

fn host_ok(rc: i32, kernel: &str) {
    assert_eq!(rc, 0, "host launch of {kernel} failed (reason on stderr)");
}

fn gpu_sync(dev: &CudaDevice) {
    dev.synchronize().expect("synchronize");
}

// ---- elementwise: swiglu, gelu ----

const ELEMENTWISE_SIZES: &[usize] = &[1, 31, 1000, 4133];

fn host_elementwise(p: &ElementwisePlan, call: impl FnOnce((u32, u32, u32, u32, u32, u32)) -> i32) {
    if let Some(cfg) = &p.config {
        host_ok(call(grid_args(cfg)), p.kernel);
    }
}

fn run_swiglu_forward<T: Elem>(r: Runner, v: SwigluVariant, gate: &[T], up: &[T]) -> Out<Vec<T>> {
    let mut out = vec![T::NAN; gate.len()];
    match r {
        Runner::Host => {
            let p = swiglu::plan_forward(v, T::DTYPE, out.len(), gate.len(), up.len())?;
            let (o, g, u) = (out.as_mut_ptr(), gate.as_ptr(), up.as_ptr());
            host_elementwise(&p, |(a, b, c, d, e, f)| {
                // SAFETY: (T* out, const T* gate, const T* up, int n); buffers of n elements.
                unsafe {
                    match p.kernel {
                        "swiglu_forward_f32_naive" => ffi::swiglu_forward_f32_naive_host(a, b, c, d, e, f, o.cast(), g.cast(), u.cast(), p.n),
                        "swiglu_forward_f32_grid" => ffi::swiglu_forward_f32_grid_host(a, b, c, d, e, f, o.cast(), g.cast(), u.cast(), p.n),
                        "swiglu_forward_bf16_grid" => ffi::swiglu_forward_bf16_grid_host(a, b, c, d, e, f, o.cast(), g.cast(), u.cast(), p.n),
                        k => panic!("unmapped {k}"),
                    }
                }
            });
        }
        Runner::Gpu(dev) => {
            let (dg, du) = (dev.upload(gate)?, dev.upload(up)?);
            let mut d_out = dev.upload(&out)?;
            swiglu::swiglu_forward(dev, v, &mut d_out.as_view_mut(), &dg.as_view(), &du.as_view())?;
            gpu_sync(dev);
            out = dev.download(&d_out)?;
        }
    }
    Ok(out)
}

fn run_swiglu_backward<T: Elem>(r: Runner, v: SwigluVariant, dout: &[T], gate: &[T], up: &[T]) -> Out<(Vec<T>, Vec<T>)> {
    let mut dgate = vec![T::NAN; gate.len()];
    let mut dup = vec![T::NAN; gate.len()];
    match r {
        Runner::Host => {
            let p = swiglu::plan_backward(v, T::DTYPE, dgate.len(), dup.len(), dout.len(), gate.len(), up.len())?;
            let (dg, du, dy, g, u) = (dgate.as_mut_ptr(), dup.as_mut_ptr(), dout.as_ptr(), gate.as_ptr(), up.as_ptr());
            host_elementwise(&p, |(a, b, c, d, e, f)| {
                // SAFETY: (T* dgate, T* dup, const T* dout, gate, up, int n); buffers of n elements.
                unsafe {
                    match p.kernel {
                        "swiglu_backward_f32_naive" => ffi::swiglu_backward_f32_naive_host(a, b, c, d, e, f, dg.cast(), du.cast(), dy.cast(), g.cast(), u.cast(), p.n),
                        "swiglu_backward_f32_grid" => ffi::swiglu_backward_f32_grid_host(a, b, c, d, e, f, dg.cast(), du.cast(), dy.cast(), g.cast(), u.cast(), p.n),
                        "swiglu_backward_bf16_grid" => ffi::swiglu_backward_bf16_grid_host(a, b, c, d, e, f, dg.cast(), du.cast(), dy.cast(), g.cast(), u.cast(), p.n),
                        k => panic!("unmapped {k}"),
                    }
                }
            });
        }
        Runner::Gpu(dev) => {
            let (d_dy, d_g, d_u) = (dev.upload(dout)?, dev.upload(gate)?, dev.upload(up)?);
            let (mut d_dg, mut d_du) = (dev.upload(&dgate)?, dev.upload(&dup)?);
            swiglu::swiglu_backward(
                dev,
                v,
                &mut d_dg.as_view_mut(),
                &mut d_du.as_view_mut(),
                &d_dy.as_view(),
                &d_g.as_view(),
                &d_u.as_view(),
            )?;
            gpu_sync(dev);
            dgate = dev.download(&d_dg)?;
            dup = dev.download(&d_du)?;
        }
    }
    Ok((dgate, dup))
}

fn check_swiglu_dtype<T: Elem>(r: Runner, seed: u64) {
    let mut rng = Rng::new(seed);
    for &v in SwigluVariant::ALL {
        for &n in ELEMENTWISE_SIZES {
            let case = format!("swiglu {v} {} n={n}", T::DTYPE);
            let gate = rounded::<T>(&rng.vec(n, -6.0, 6.0));
            let up = rounded::<T>(&rng.vec(n, -2.0, 2.0));
            let dout = rounded::<T>(&rng.vec(n, -1.0, 1.0));
            let mut want = vec![f32::NAN; n];
            cpu().swiglu_forward(&mut want, &gate, &up).unwrap();
            let (mut want_dg, mut want_du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            cpu().swiglu_backward(&mut want_dg, &mut want_du, &dout, &gate, &up).unwrap();
            let (g, u, dy) = (T::from_f32s(&gate), T::from_f32s(&up), T::from_f32s(&dout));
            let fwd = run_swiglu_forward::<T>(r, v, &g, &u);
            if v.forward_kernel(T::DTYPE).is_none() {
                expect_unsupported(&case, fwd);
            } else {
                let out = fwd.unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&format!("{case} out"), &T::to_f32s(&out), &want, T::DTYPE);
            }
            let bwd = run_swiglu_backward::<T>(r, v, &dy, &g, &u);
            if v.backward_kernel(T::DTYPE).is_none() {
                expect_unsupported(&case, bwd);
            } else {
                let (dg, du) = bwd.unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&format!("{case} dgate"), &T::to_f32s(&dg), &want_dg, T::DTYPE);
                check(&format!("{case} dup"), &T::to_f32s(&du), &want_du, T::DTYPE);
            }
        }
    }
}

fn check_swiglu(r: Runner) {
    check_swiglu_dtype::<f32>(r, 11);
    check_swiglu_dtype::<bf16>(r, 12);
}

fn run_gelu_forward<T: Elem>(r: Runner, v: GeluVariant, inp: &[T]) -> Out<Vec<T>> {
    let mut out = vec![T::NAN; inp.len()];
    match r {
        Runner::Host => {
            let p = gelu::plan_forward(v, T::DTYPE, out.len(), inp.len())?;
            let (o, x) = (out.as_mut_ptr(), inp.as_ptr());
            host_elementwise(&p, |(a, b, c, d, e, f)| {
                // SAFETY: (T* out, const T* inp, int n); buffers of n elements.
                unsafe {
                    match p.kernel {
                        "gelu_forward_f32_naive" => ffi::gelu_forward_f32_naive_host(a, b, c, d, e, f, o.cast(), x.cast(), p.n),
                        "gelu_forward_f32_grid" => ffi::gelu_forward_f32_grid_host(a, b, c, d, e, f, o.cast(), x.cast(), p.n),
                        "gelu_forward_bf16_grid" => ffi::gelu_forward_bf16_grid_host(a, b, c, d, e, f, o.cast(), x.cast(), p.n),
                        k => panic!("unmapped {k}"),
                    }
                }
            });
        }
        Runner::Gpu(dev) => {
            let d_x = dev.upload(inp)?;
            let mut d_out = dev.upload(&out)?;
            gelu::gelu_forward(dev, v, &mut d_out.as_view_mut(), &d_x.as_view())?;
            gpu_sync(dev);
            out = dev.download(&d_out)?;
        }
    }
    Ok(out)
}

fn run_gelu_backward<T: Elem>(r: Runner, v: GeluVariant, dout: &[T], inp: &[T]) -> Out<Vec<T>> {
    let mut dinp = vec![T::NAN; inp.len()];
    match r {
        Runner::Host => {
            let p = gelu::plan_backward(v, T::DTYPE, dinp.len(), dout.len(), inp.len())?;
            let (dx, dy, x) = (dinp.as_mut_ptr(), dout.as_ptr(), inp.as_ptr());
            host_elementwise(&p, |(a, b, c, d, e, f)| {
                // SAFETY: (T* dinp, const T* dout, const T* inp, int n); buffers of n elements.
                unsafe {
                    match p.kernel {
                        "gelu_backward_f32_naive" => ffi::gelu_backward_f32_naive_host(a, b, c, d, e, f, dx.cast(), dy.cast(), x.cast(), p.n),
                        "gelu_backward_f32_grid" => ffi::gelu_backward_f32_grid_host(a, b, c, d, e, f, dx.cast(), dy.cast(), x.cast(), p.n),
                        "gelu_backward_bf16_grid" => ffi::gelu_backward_bf16_grid_host(a, b, c, d, e, f, dx.cast(), dy.cast(), x.cast(), p.n),
                        k => panic!("unmapped {k}"),
                    }
                }
            });
        }
        Runner::Gpu(dev) => {
            let (d_dy, d_x) = (dev.upload(dout)?, dev.upload(inp)?);
            let mut d_dx = dev.upload(&dinp)?;
            gelu::gelu_backward(dev, v, &mut d_dx.as_view_mut(), &d_dy.as_view(), &d_x.as_view())?;
            gpu_sync(dev);
            dinp = dev.download(&d_dx)?;
        }
    }
    Ok(dinp)
}

fn check_gelu_dtype<T: Elem>(r: Runner, seed: u64) {
    let mut rng = Rng::new(seed);
    for &v in GeluVariant::ALL {
        for &n in ELEMENTWISE_SIZES {
            let case = format!("gelu {v} {} n={n}", T::DTYPE);
            // (-6, 6): both tails, where 1 + erf(x/√2) would cancel.
            let inp = rounded::<T>(&rng.vec(n, -6.0, 6.0));
            let dout = rounded::<T>(&rng.vec(n, -1.0, 1.0));
            let mut want = vec![f32::NAN; n];
            cpu().gelu_forward(&mut want, &inp).unwrap();
            let mut want_dx = vec![f32::NAN; n];
            cpu().gelu_backward(&mut want_dx, &dout, &inp).unwrap();
            let (x, dy) = (T::from_f32s(&inp), T::from_f32s(&dout));
            let fwd = run_gelu_forward::<T>(r, v, &x);
            if v.forward_kernel(T::DTYPE).is_none() {
                expect_unsupported(&case, fwd);
            } else {
                let out = fwd.unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&format!("{case} out"), &T::to_f32s(&out), &want, T::DTYPE);
            }
            let bwd = run_gelu_backward::<T>(r, v, &dy, &x);
            if v.backward_kernel(T::DTYPE).is_none() {
                expect_unsupported(&case, bwd);
            } else {
                let dx = bwd.unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&format!("{case} dinp"), &T::to_f32s(&dx), &want_dx, T::DTYPE);
            }
        }
    }
}

fn check_gelu(r: Runner) {
    check_gelu_dtype::<f32>(r, 21);
    check_gelu_dtype::<bf16>(r, 22);
}

// ---- embedding ----

/// (vocab, dim, ids): one token; repeated ids; a tiny vocabulary (every id repeated many times);
/// dims not multiples of 32.
fn embedding_cases(rng: &mut Rng) -> Vec<(usize, usize, Vec<u32>)> {
    let mut random_ids = |n: usize, vocab: usize| (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect::<Vec<_>>();
    vec![
        (50, 64, vec![17]),
        (50, 64, vec![3, 9, 3, 3, 49, 0, 9, 3]),
        (7, 100, random_ids(40, 7)),
        (300, 33, random_ids(37, 300)),
        (1000, 257, random_ids(19, 1000)),
    ]
}

fn run_embedding_forward<T: Elem>(r: Runner, v: EmbeddingVariant, table: &[T], ids: &[u32], dim: usize) -> Out<Vec<T>> {
    let mut out = vec![T::NAN; ids.len() * dim];
    match r {
        Runner::Host => {
            let p = embedding::plan_forward(v, T::DTYPE, out.len(), table.len(), ids, dim)?;
            if let Some(cfg) = &p.config {
                let (a, b, c, d, e, f) = grid_args(cfg);
                let (o, t, i) = (out.as_mut_ptr(), table.as_ptr(), p.ids.as_ptr());
                // SAFETY: (T* out, const T* table, const int* ids, int N, int C); checked plan.
                let rc = unsafe {
                    match p.kernel {
                        "embedding_forward_f32_naive" => ffi::embedding_forward_f32_naive_host(a, b, c, d, e, f, o.cast(), t.cast(), i, p.n, p.c),
                        "embedding_forward_f32_coalesced" => ffi::embedding_forward_f32_coalesced_host(a, b, c, d, e, f, o.cast(), t.cast(), i, p.n, p.c),
                        "embedding_forward_bf16_coalesced" => ffi::embedding_forward_bf16_coalesced_host(a, b, c, d, e, f, o.cast(), t.cast(), i, p.n, p.c),
                        k => panic!("unmapped {k}"),
                    }
                };
                host_ok(rc, p.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let d_t = dev.upload(table)?;
            let mut d_out = dev.upload(&out)?;
            embedding::embedding_forward(dev, v, &mut d_out.as_view_mut(), &d_t.as_view(), ids, dim)?;
            gpu_sync(dev);
            out = dev.download(&d_out)?;
        }
    }
    Ok(out)
}

fn run_embedding_backward(r: Runner, v: EmbeddingVariant, dtable0: &[f32], dout: &[f32], ids: &[u32], dim: usize) -> Out<Vec<f32>> {
    let mut dtable = dtable0.to_vec();
    match r {
        Runner::Host => {
            let p = embedding::plan_backward(v, DType::F32, dtable.len(), dout.len(), ids, dim)?;
            if let Some(cfg) = &p.config {
                let (a, b, c, d, e, f) = grid_args(cfg);
                let (dt, dy) = (dtable.as_mut_ptr(), dout.as_ptr());
                // SAFETY: the kernels' signatures (see kernels/embedding.cu); checked plan.
                let rc = unsafe {
                    match (p.kernel, &p.sorted) {
                        ("embedding_backward_f32_naive", None) => {
                            ffi::embedding_backward_f32_naive_host(a, b, c, d, e, f, dt, dy, p.ids.as_ptr(), p.n, p.c)
                        }
                        ("embedding_backward_f32_coalesced", Some(s)) => ffi::embedding_backward_f32_coalesced_host(
                            a,
                            b,
                            c,
                            d,
                            e,
                            f,
                            dt,
                            dy,
                            s.uniq.as_ptr(),
                            s.starts.as_ptr(),
                            s.order.as_ptr(),
                            s.uniq.len() as i32,
                            p.c,
                        ),
                        (k, _) => panic!("unmapped {k}"),
                    }
                };
                host_ok(rc, p.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let d_dy = dev.upload(dout)?;
            let mut d_dt = dev.upload(&dtable)?;
            embedding::embedding_backward(dev, v, &mut d_dt.as_view_mut(), &d_dy.as_view(), ids, dim)?;
            gpu_sync(dev);
            dtable = dev.download(&d_dt)?;
        }
    }
    Ok(dtable)
}

fn check_embedding_dtype<T: Elem>(r: Runner, seed: u64) {
    let mut rng = Rng::new(seed);
    for (vocab, dim, ids) in embedding_cases(&mut rng) {
        let table = rounded::<T>(&rng.vec(vocab * dim, -1.0, 1.0));
        let mut want = vec![f32::NAN; ids.len() * dim];
        cpu().embedding_forward(&mut want, &table, &ids, dim).unwrap();
        for &v in EmbeddingVariant::ALL {
            let case = format!("embedding_forward {v} {} (V={vocab}, C={dim}, N={})", T::DTYPE, ids.len());
            let res = run_embedding_forward::<T>(r, v, &T::from_f32s(&table), &ids, dim);
            if v.forward_kernel(T::DTYPE).is_none() {
                expect_unsupported(&case, res);
                continue;
            }
            let out = res.unwrap_or_else(|e| panic!("{case}: {e}"));
            // A gather: exact.
            assert_close(&case, &T::to_f32s(&out), &want, 0.0, 0.0);
        }
        if T::DTYPE != DType::F32 {
            continue;
        }
        // Backward accumulates into a non-zero table; rows no id names must keep their values.
        let dtable0 = rng.vec(vocab * dim, -1.0, 1.0);
        let dout = rng.vec(ids.len() * dim, -1.0, 1.0);
        let mut want = dtable0.clone();
        cpu().embedding_backward(&mut want, &dout, &ids, dim).unwrap();
        for &v in EmbeddingVariant::ALL {
            let case = format!("embedding_backward {v} f32 (V={vocab}, C={dim}, N={})", ids.len());
            let got = run_embedding_backward(r, v, &dtable0, &dout, &ids, dim).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_close(&case, &got, &want, 0.0, 1e-6);
            // Deterministic and in the reference's order: the very same bits.
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{case}: not bitwise equal to the CPU reference (same addition order expected)");
        }
    }
}

fn check_embedding(r: Runner) {
    check_embedding_dtype::<f32>(r, 31);
    check_embedding_dtype::<bf16>(r, 32);
}

// ---- rope ----

/// (n_heads, head_dim, first position, rows): SmolLM2's GQA q/k heads (9/3) at d64, MQA-like one
/// head and d128, a two-element head; positions starting past 0 (and one case at 0).
const ROPE_CASES: &[(usize, usize, u32, usize)] =
    &[(9, 64, 5, 7), (3, 64, 5, 7), (3, 64, 8, 1), (1, 128, 0, 4), (4, 128, 11, 5), (2, 2, 3, 9)];

#[allow(clippy::too_many_arguments)]
fn run_rope<T: Elem>(
    r: Runner,
    v: RopeVariant,
    dir: rope::RopeDirection,
    x0: &[T],
    cos: &[T],
    sin: &[T],
    pos: &[u32],
    (h, d): (usize, usize),
) -> Out<Vec<T>> {
    let mut x = x0.to_vec();
    match r {
        Runner::Host => {
            let p = rope::plan(v, dir, T::DTYPE, x.len(), cos.len(), sin.len(), pos, h, d)?;
            if let Some(cfg) = &p.config {
                let (a, b, c, dd, e, f) = grid_args(cfg);
                let (xp, cp, sp, pp) = (x.as_mut_ptr(), cos.as_ptr(), sin.as_ptr(), p.positions.as_ptr());
                // SAFETY: (T* x, const T* cos, const T* sin, const int* positions, int N, H, D).
                let rc = unsafe {
                    macro_rules! call {
                        ($k:ident) => {
                            ffi::$k(a, b, c, dd, e, f, xp.cast(), cp.cast(), sp.cast(), pp, p.n, p.n_heads, p.head_dim)
                        };
                    }
                    match p.kernel {
                        "rope_forward_f32_naive" => call!(rope_forward_f32_naive_host),
                        "rope_backward_f32_naive" => call!(rope_backward_f32_naive_host),
                        "rope_forward_f32_flat" => call!(rope_forward_f32_flat_host),
                        "rope_backward_f32_flat" => call!(rope_backward_f32_flat_host),
                        "rope_forward_bf16_flat" => call!(rope_forward_bf16_flat_host),
                        "rope_backward_bf16_flat" => call!(rope_backward_bf16_flat_host),
                        k => panic!("unmapped {k}"),
                    }
                };
                host_ok(rc, p.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let (d_c, d_s) = (dev.upload(cos)?, dev.upload(sin)?);
            let mut d_x = dev.upload(&x)?;
            rope::rope(dev, v, dir, &mut d_x.as_view_mut(), &d_c.as_view(), &d_s.as_view(), pos, h, d)?;
            gpu_sync(dev);
            x = dev.download(&d_x)?;
        }
    }
    Ok(x)
}

fn check_rope_dtype<T: Elem>(r: Runner, seed: u64) {
    let mut rng = Rng::new(seed);
    for &(h, d, first, n) in ROPE_CASES {
        let half = d / 2;
        // Positions: first, first + 1, ... with a repeat and a jump, as packed sequences give.
        let pos: Vec<u32> = (0..n as u32).map(|i| if i == 3 { first } else { first + i * (1 + i % 2) }).collect();
        let p_rows = *pos.iter().max().unwrap() as usize + 2;
        // Tables as the model builds them (theta 10000), rounded to the storage type.
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..p_rows {
            for i in 0..half {
                let angle = p as f64 * 10000f64.powf(-((2 * i) as f64) / d as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let (cos, sin) = (rounded::<T>(&cos), rounded::<T>(&sin));
        let x = rounded::<T>(&rng.vec(n * h * d, -2.0, 2.0));
        for dir in [rope::RopeDirection::Forward, rope::RopeDirection::Backward] {
            let mut want = x.clone();
            match dir {
                rope::RopeDirection::Forward => cpu().rope_forward(&mut want, &cos, &sin, &pos, h, d).unwrap(),
                rope::RopeDirection::Backward => cpu().rope_backward(&mut want, &cos, &sin, &pos, h, d).unwrap(),
            }
            for &v in RopeVariant::ALL {
                let case = format!("rope {dir:?} {v} {} (N={n}, H={h}, D={d}, first position {first})", T::DTYPE);
                let res = run_rope::<T>(r, v, dir, &T::from_f32s(&x), &T::from_f32s(&cos), &T::from_f32s(&sin), &pos, (h, d));
                if v.kernel(dir, T::DTYPE).is_none() {
                    expect_unsupported(&case, res);
                    continue;
                }
                let got = res.unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&case, &T::to_f32s(&got), &want, T::DTYPE);
            }
        }
    }
}

fn check_rope(r: Runner) {
    check_rope_dtype::<f32>(r, 41);
    check_rope_dtype::<bf16>(r, 42);
}

// ---- layernorm ----

const NORM_ROWS: &[usize] = &[1, 7, 37];
const NORM_DIMS: &[usize] = &[64, 100, 384];
const LN_EPS: f32 = 1e-12; // BERT's

struct LnForward<T> {
    out: Vec<T>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

fn run_layernorm_forward<T: Elem>(r: Runner, v: LayerNormVariant, inp: &[T], w: &[T], bias: &[T], dim: usize) -> Out<LnForward<T>> {
    let n = inp.len() / dim;
    let mut f = LnForward { out: vec![T::NAN; inp.len()], mean: vec![f32::NAN; n], rstd: vec![f32::NAN; n] };
    match r {
        Runner::Host => {
            let lens = layernorm::ForwardLens { out: f.out.len(), mean: n, rstd: n, inp: inp.len(), weight: w.len(), bias: bias.len() };
            let p = layernorm::plan_forward(v, T::DTYPE, &lens, dim, LN_EPS)?;
            for l in &p.launches {
                let (a, b, c, d, e, g) = grid_args(&l.config);
                let (o, m, rs) = (f.out.as_mut_ptr(), f.mean.as_mut_ptr(), f.rstd.as_mut_ptr());
                let (x, wp, bp) = (inp.as_ptr(), w.as_ptr(), bias.as_ptr());
                // SAFETY: (T* out, float* mean, float* rstd, const T* inp, weight, bias, int N,
                // int C, float eps); lengths checked by the plan.
                let rc = unsafe {
                    macro_rules! call {
                        ($k:ident) => {
                            ffi::$k(a, b, c, d, e, g, o.cast(), m, rs, x.cast(), wp.cast(), bp.cast(), p.n, p.c, LN_EPS)
                        };
                    }
                    match l.kernel {
                        "layernorm_forward_f32_naive" => call!(layernorm_forward_f32_naive_host),
                        "layernorm_forward_f32_warp" => call!(layernorm_forward_f32_warp_host),
                        "layernorm_forward_bf16_warp" => call!(layernorm_forward_bf16_warp_host),
                        k => panic!("unmapped {k}"),
                    }
                };
                host_ok(rc, l.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let (d_x, d_w, d_b) = (dev.upload(inp)?, dev.upload(w)?, dev.upload(bias)?);
            let (mut d_o, mut d_m, mut d_r) = (dev.upload(&f.out)?, dev.upload(&f.mean)?, dev.upload(&f.rstd)?);
            layernorm::layernorm_forward(
                dev,
                v,
                &mut d_o.as_view_mut(),
                &mut d_m.as_view_mut(),
                &mut d_r.as_view_mut(),
                &d_x.as_view(),
                &d_w.as_view(),
                &d_b.as_view(),
                dim,
                LN_EPS,
            )?;
            gpu_sync(dev);
            f = LnForward { out: dev.download(&d_o)?, mean: dev.download(&d_m)?, rstd: dev.download(&d_r)? };
        }
    }
    Ok(f)
}

/// (dinp, dweight, dbias) after accumulating into the given starting values.
#[allow(clippy::too_many_arguments)]
fn run_layernorm_backward(
    r: Runner,
    v: LayerNormVariant,
    start: (&[f32], &[f32], &[f32]),
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dim: usize,
) -> Out<[Vec<f32>; 3]> {
    let (mut dx, mut dw, mut db) = (start.0.to_vec(), start.1.to_vec(), start.2.to_vec());
    match r {
        Runner::Host => {
            let lens = layernorm::BackwardLens {
                dinp: dx.len(),
                dweight: dw.len(),
                dbias: db.len(),
                dout: dout.len(),
                inp: inp.len(),
                weight: w.len(),
                mean: mean.len(),
                rstd: rstd.len(),
            };
            let p = layernorm::plan_backward(v, DType::F32, &lens, dim)?;
            for l in &p.launches {
                let (a, b, c, d, e, g) = grid_args(&l.config);
                let (dxp, dwp, dbp) = (dx.as_mut_ptr(), dw.as_mut_ptr(), db.as_mut_ptr());
                let (dy, x, wp, m, rs) = (dout.as_ptr(), inp.as_ptr(), w.as_ptr(), mean.as_ptr(), rstd.as_ptr());
                // SAFETY: each kernel's signature in kernels/layernorm.cu; lengths checked.
                let rc = unsafe {
                    match l.kernel {
                        "layernorm_backward_f32_naive" => {
                            ffi::layernorm_backward_f32_naive_host(a, b, c, d, e, g, dxp, dwp, dbp, dy, x, wp, m, rs, p.n, p.c)
                        }
                        "layernorm_backward_dinp_f32_warp" => {
                            ffi::layernorm_backward_dinp_f32_warp_host(a, b, c, d, e, g, dxp, dy, x, wp, m, rs, p.n, p.c)
                        }
                        "layernorm_backward_params_f32_col" => {
                            ffi::layernorm_backward_params_f32_col_host(a, b, c, d, e, g, dwp, dbp, dy, x, m, rs, p.n, p.c)
                        }
                        k => panic!("unmapped {k}"),
                    }
                };
                host_ok(rc, l.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let up = |h: &[f32]| dev.upload(h);
            let (d_dy, d_x, d_w, d_m, d_r) = (up(dout)?, up(inp)?, up(w)?, up(mean)?, up(rstd)?);
            let (mut d_dx, mut d_dw, mut d_db) = (up(&dx)?, up(&dw)?, up(&db)?);
            layernorm::layernorm_backward(
                dev,
                v,
                &mut d_dx.as_view_mut(),
                &mut d_dw.as_view_mut(),
                &mut d_db.as_view_mut(),
                &d_dy.as_view(),
                &d_x.as_view(),
                &d_w.as_view(),
                &d_m.as_view(),
                &d_r.as_view(),
                dim,
            )?;
            gpu_sync(dev);
            (dx, dw, db) = (dev.download(&d_dx)?, dev.download(&d_dw)?, dev.download(&d_db)?);
        }
    }
    Ok([dx, dw, db])
}

fn check_layernorm_dtype<T: Elem>(r: Runner, seed: u64) {
    let mut rng = Rng::new(seed);
    for &n in NORM_ROWS {
        for &c in NORM_DIMS {
            // A row mean well away from 0, as BERT's residual stream has.
            let inp = rounded::<T>(&rng.vec(n * c, -2.0, 3.0));
            let w = rounded::<T>(&rng.vec(c, 0.5, 1.5));
            let b = rounded::<T>(&rng.vec(c, -0.5, 0.5));
            let (mut out, mut mean, mut rstd) = (vec![f32::NAN; n * c], vec![f32::NAN; n], vec![f32::NAN; n]);
            cpu().layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &b, c, LN_EPS).unwrap();
            for &v in LayerNormVariant::ALL {
                let case = format!("layernorm_forward {v} {} ({n}, {c})", T::DTYPE);
                let res = run_layernorm_forward::<T>(r, v, &T::from_f32s(&inp), &T::from_f32s(&w), &T::from_f32s(&b), c);
                if v.forward_kernel(T::DTYPE).is_none() {
                    expect_unsupported(&case, res.map(|_| ()));
                    continue;
                }
                let f = res.unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&format!("{case} out"), &T::to_f32s(&f.out), &out, T::DTYPE);
                check(&format!("{case} mean"), &f.mean, &mean, DType::F32);
                check(&format!("{case} rstd"), &f.rstd, &rstd, DType::F32);
            }
            if T::DTYPE != DType::F32 {
                continue;
            }
            let dout = rng.vec(n * c, -1.0, 1.0);
            let (dx0, dw0, db0) = (rng.vec(n * c, -1.0, 1.0), rng.vec(c, -1.0, 1.0), rng.vec(c, -1.0, 1.0));
            let (mut want_dx, mut want_dw, mut want_db) = (dx0.clone(), dw0.clone(), db0.clone());
            cpu().layernorm_backward(&mut want_dx, &mut want_dw, &mut want_db, &dout, &inp, &w, &mean, &rstd, c).unwrap();
            for &v in LayerNormVariant::ALL {
                let case = format!("layernorm_backward {v} f32 ({n}, {c})");
                let [dx, dw, db] =
                    run_layernorm_backward(r, v, (&dx0, &dw0, &db0), &dout, &inp, &w, &mean, &rstd, c)
                        .unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&format!("{case} dinp"), &dx, &want_dx, DType::F32);
                check(&format!("{case} dweight"), &dw, &want_dw, DType::F32);
                check(&format!("{case} dbias"), &db, &want_db, DType::F32);
                // No atomics: a second run gives the same bits.
                let again = run_layernorm_backward(r, v, (&dx0, &dw0, &db0), &dout, &inp, &w, &mean, &rstd, c).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&again[1]) == bits(&dw) && bits(&again[2]) == bits(&db), "{case}: not deterministic");
            }
        }
    }
}

fn check_layernorm(r: Runner) {
    check_layernorm_dtype::<f32>(r, 51);
    check_layernorm_dtype::<bf16>(r, 52);
}

// ---- bias ----

const BIAS_ROWS: &[usize] = &[1, 7, 21];
const BIAS_DIMS: &[usize] = &[1, 33, 300];

fn run_bias_add<T: Elem>(r: Runner, v: BiasVariant, out0: &[T], bias: &[T]) -> Out<Vec<T>> {
    let mut out = out0.to_vec();
    match r {
        Runner::Host => {
            let p = bias::plan_add(v, T::DTYPE, out.len(), bias.len())?;
            if let Some(cfg) = &p.config {
                let (a, b, c, d, e, f) = grid_args(cfg);
                let (o, bp) = (out.as_mut_ptr(), bias.as_ptr());
                // SAFETY: (T* out, const T* bias, int N, int C); lengths checked.
                let rc = unsafe {
                    match p.kernel {
                        "bias_add_f32_naive" => ffi::bias_add_f32_naive_host(a, b, c, d, e, f, o.cast(), bp.cast(), p.n, p.c),
                        "bias_add_f32_grid" => ffi::bias_add_f32_grid_host(a, b, c, d, e, f, o.cast(), bp.cast(), p.n, p.c),
                        "bias_add_bf16_grid" => ffi::bias_add_bf16_grid_host(a, b, c, d, e, f, o.cast(), bp.cast(), p.n, p.c),
                        k => panic!("unmapped {k}"),
                    }
                };
                host_ok(rc, p.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let d_b = dev.upload(bias)?;
            let mut d_o = dev.upload(&out)?;
            bias::bias_add(dev, v, &mut d_o.as_view_mut(), &d_b.as_view())?;
            gpu_sync(dev);
            out = dev.download(&d_o)?;
        }
    }
    Ok(out)
}

fn run_bias_backward(r: Runner, v: BiasVariant, dbias0: &[f32], dout: &[f32]) -> Out<Vec<f32>> {
    let mut dbias = dbias0.to_vec();
    match r {
        Runner::Host => {
            let p = bias::plan_backward(v, DType::F32, dbias.len(), dout.len())?;
            // Poisoned workspace: every partial the finish pass reads must have been written.
            let mut partials = vec![f32::NAN; p.chunks as usize * p.c as usize];
            for l in &p.launches {
                let (a, b, c, d, e, f) = grid_args(&l.config);
                let (db, dy, pp) = (dbias.as_mut_ptr(), dout.as_ptr(), partials.as_mut_ptr());
                // SAFETY: the kernels' signatures in kernels/bias.cu; lengths checked by the plan,
                // partials holds chunks·C.
                let rc = unsafe {
                    match l.kernel {
                        "bias_backward_f32_naive" => ffi::bias_backward_f32_naive_host(a, b, c, d, e, f, db, dy, p.n, p.c),
                        "bias_backward_partials_f32_grid" => {
                            ffi::bias_backward_partials_f32_grid_host(a, b, c, d, e, f, pp, dy, p.n, p.c, p.rows_per_chunk)
                        }
                        "bias_backward_finish_f32_grid" => {
                            ffi::bias_backward_finish_f32_grid_host(a, b, c, d, e, f, db, pp, p.chunks, p.c)
                        }
                        k => panic!("unmapped {k}"),
                    }
                };
                host_ok(rc, l.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let d_dy = dev.upload(dout)?;
            let mut d_db = dev.upload(&dbias)?;
            bias::bias_backward(dev, v, &mut d_db.as_view_mut(), &d_dy.as_view())?;
            gpu_sync(dev);
            dbias = dev.download(&d_db)?;
        }
    }
    Ok(dbias)
}

fn check_bias_dtype<T: Elem>(r: Runner, seed: u64) {
    let mut rng = Rng::new(seed);
    for &n in BIAS_ROWS {
        for &c in BIAS_DIMS {
            let out0 = rounded::<T>(&rng.vec(n * c, -2.0, 2.0));
            let b = rounded::<T>(&rng.vec(c, -1.0, 1.0));
            let mut want = out0.clone();
            cpu().bias_add(&mut want, &b).unwrap();
            for &v in BiasVariant::ALL {
                let case = format!("bias_add {v} {} ({n}, {c})", T::DTYPE);
                let res = run_bias_add::<T>(r, v, &T::from_f32s(&out0), &T::from_f32s(&b));
                if v.add_kernel(T::DTYPE).is_none() {
                    expect_unsupported(&case, res);
                    continue;
                }
                let got = res.unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&case, &T::to_f32s(&got), &want, T::DTYPE);
            }
            if T::DTYPE != DType::F32 {
                continue;
            }
            let dout = rng.vec(n * c, -1.0, 1.0);
            let db0 = rng.vec(c, -1.0, 1.0);
            let mut want = db0.clone();
            cpu().bias_backward(&mut want, &dout).unwrap();
            for &v in BiasVariant::ALL {
                let case = format!("bias_backward {v} f32 ({n}, {c})");
                let got = run_bias_backward(r, v, &db0, &dout).unwrap_or_else(|e| panic!("{case}: {e}"));
                check(&case, &got, &want, DType::F32);
                let again = run_bias_backward(r, v, &db0, &dout).unwrap();
                assert!(got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "{case}: not deterministic");
            }
        }
    }
}

fn check_bias(r: Runner) {
    check_bias_dtype::<f32>(r, 61);
    check_bias_dtype::<bf16>(r, 62);
}

// ---- the tests: host harness everywhere, GPU when there is one ----

macro_rules! host_and_gpu {
    ($($check:ident: $host:ident, $gpu:ident;)+) => {
        $(
            #[test]
            fn $host() {
                $check(Runner::Host);
            }

            #[test]
            fn $gpu() {
                let dev = gpu_or_skip!(stringify!($gpu));
                $check(Runner::Gpu(&dev));
            }
        )+
    };
}

host_and_gpu! {
    check_swiglu: host_swiglu, gpu_swiglu;
    check_gelu: host_gelu, gpu_gelu;
    check_embedding: host_embedding, gpu_embedding;
    check_rope: host_rope, gpu_rope;
    check_layernorm: host_layernorm, gpu_layernorm;
    check_bias: host_bias, gpu_bias;
}

// ---- plans: names, errors (no GPU needed) ----

#[test]
fn variant_names_round_trip_and_unknown_names_list_choices() {
    fn round_trip<V: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr<Err = CudaError>>(
        all: &[V],
        bad: &str,
    ) {
        for &v in all {
            assert_eq!(v.to_string().parse::<V>().ok(), Some(v));
        }
        let err = bad.parse::<V>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(&format!("'{bad}'")), "{err}");
        for &v in all {
            assert!(err.contains(&v.to_string()), "{err} should list {v}");
        }
    }
    round_trip(EmbeddingVariant::ALL, "fast");
    round_trip(RopeVariant::ALL, "fast");
    round_trip(SwigluVariant::ALL, "fast");
    round_trip(GeluVariant::ALL, "fast");
    round_trip(LayerNormVariant::ALL, "fast");
    round_trip(BiasVariant::ALL, "fast");
}

fn shape_err<T: std::fmt::Debug>(res: Result<T, CudaError>, needles: &[&str]) {
    match res {
        Err(e @ CudaError::Shape { .. }) => {
            let s = e.to_string();
            for n in needles {
                assert!(s.contains(n), "{s:?} should mention {n:?}");
            }
        }
        other => panic!("expected a shape error mentioning {needles:?}, got {other:?}"),
    }
}

#[test]
fn out_of_range_ids_and_positions_are_rejected_naming_them() {
    let v = EmbeddingVariant::Coalesced;
    shape_err(embedding::plan_forward(v, DType::F32, 3 * 4, 5 * 4, &[1, 5, 2], 4), &["embedding_forward", "ids[1] = 5", "5 rows"]);
    shape_err(embedding::plan_backward(v, DType::F32, 5 * 4, 3 * 4, &[0, 1, 9], 4), &["embedding_backward", "ids[2] = 9"]);
    // The CPU reference rejects the same id.
    let err = cpu().embedding_forward(&mut [0.0; 12], &[0.0; 20], &[1, 5, 2], 4).unwrap_err().to_string();
    assert!(err.contains("ids[1] = 5"), "{err}");
    let dir = rope::RopeDirection::Forward;
    shape_err(rope::plan(RopeVariant::Flat, dir, DType::F32, 2 * 3 * 8, 4 * 4, 4 * 4, &[1, 4], 3, 8), &["rope_forward", "positions[1] = 4"]);
    shape_err(rope::plan(RopeVariant::Flat, dir, DType::F32, 2 * 3 * 7, 4 * 4, 4 * 4, &[1, 2], 3, 7), &["head_dim 7"]);
}

#[test]
fn bad_lengths_are_rejected_naming_op_and_shapes() {
    shape_err(swiglu::plan_forward(SwigluVariant::Grid, DType::F32, 10, 10, 9), &["swiglu_forward", "up", "9"]);
    shape_err(gelu::plan_backward(GeluVariant::Naive, DType::F32, 10, 11, 10), &["gelu_backward", "dout"]);
    shape_err(embedding::plan_forward(EmbeddingVariant::Naive, DType::F32, 10, 20, &[0, 1], 4), &["out", "(N=2, C=4)"]);
    shape_err(rope::plan(RopeVariant::Naive, rope::RopeDirection::Backward, DType::F32, 8, 8, 12, &[0], 1, 8), &["rope_backward", "sin"]);
    let lens = layernorm::ForwardLens { out: 12, mean: 3, rstd: 2, inp: 12, weight: 4, bias: 4 };
    shape_err(layernorm::plan_forward(LayerNormVariant::Warp, DType::F32, &lens, 4, 1e-5), &["layernorm_forward", "rstd", "(N=3)"]);
    let lens = layernorm::BackwardLens { dinp: 12, dweight: 4, dbias: 5, dout: 12, inp: 12, weight: 4, mean: 3, rstd: 3 };
    shape_err(layernorm::plan_backward(LayerNormVariant::Naive, DType::F32, &lens, 4), &["layernorm_backward", "dbias"]);
    shape_err(bias::plan_add(BiasVariant::Grid, DType::F32, 10, 4), &["bias_add", "not a multiple of dim 4"]);
    shape_err(bias::plan_backward(BiasVariant::Grid, DType::F32, 0, 4), &["bias_backward", "empty"]);
    // A variant without the dtype names what exists.
    let err = swiglu::plan_forward(SwigluVariant::Naive, DType::Bf16, 4, 4, 4).unwrap_err().to_string();
    assert!(err.contains("grid bf16"), "{err}");
}

#[test]
fn embedding_sorted_ids_are_a_stable_csr() {
    let s = embedding::SortedIds::new(&[3, 1, 3, 0, 1, 3]);
    assert_eq!(s.uniq, vec![0, 1, 3]);
    assert_eq!(s.starts, vec![0, 1, 3, 6]);
    assert_eq!(s.order, vec![3, 1, 4, 0, 2, 5]);
}

#[test]
fn empty_inputs_launch_nothing() {
    assert!(swiglu::plan_forward(SwigluVariant::Grid, DType::F32, 0, 0, 0).unwrap().config.is_none());
    assert!(embedding::plan_backward(EmbeddingVariant::Coalesced, DType::F32, 8, 0, &[], 4).unwrap().config.is_none());
    assert!(bias::plan_backward(BiasVariant::Grid, DType::F32, 4, 0).unwrap().launches.is_empty());
}
