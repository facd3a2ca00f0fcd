//! CUDA kernels against an f64-accumulated CPU reference, every variant, awkward sizes.
//!
//! Without a GPU the kernel tests print `skipped <test>: <reason>` and pass; the tests of the
//! build pipeline (embedded fatbins) and of `probe` run everywhere.

#[macro_use]
mod common;

use common::{assert_close, Rng};
use half::bf16;
use sppo::backend::cuda::error::CudaError;
use sppo::backend::cuda::kernels::{ALL, FATBIN_MAGIC, RMSNORM};
use sppo::backend::cuda::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use sppo::backend::cuda::ops::DType;
use sppo::backend::cuda::{probe, RmsNormVariant};

const ROWS: &[usize] = &[1, 7, 33];
const DIMS: &[usize] = &[64, 576, 1000];
const EPS: f32 = 1e-5;

// ---- build pipeline and probe: no GPU needed ----

#[test]
fn probe_returns_without_panicking() {
    let p = probe();
    let text = p.to_string();
    println!("probe: {text}");
    assert!(!text.is_empty());
    match p.unavailable_reason() {
        Some(reason) => assert!(text.contains(&reason) && text.contains("CPU backend"), "{text}"),
        None => assert!(p.is_available()),
    }
    assert_eq!(probe(), p, "probe is cached: a second call gives the same answer");
}

#[test]
fn embedded_fatbins_are_valid() {
    assert!(!ALL.is_empty(), "build.rs embedded no kernels/*.cu");
    for (i, k) in ALL.iter().enumerate() {
        assert_eq!(k.id, i, "{}: id {} at position {i} of ALL", k.name, k.id);
        assert!(k.fatbin.len() > 16, "{}: fatbin has {} bytes", k.name, k.fatbin.len());
        assert_eq!(k.fatbin[..4], FATBIN_MAGIC, "{}: fatbin does not start with the nvcc fatbin magic", k.name);
        assert_eq!(k.fatbin.as_ptr() as usize % 16, 0, "{}: fatbin not 16-byte aligned", k.name);
    }
    assert_eq!(RMSNORM.name, "rmsnorm");
    assert!(ALL.iter().any(|k| k.name == "rmsnorm"));
}

#[test]
fn rmsnorm_variant_names() {
    for &v in RmsNormVariant::ALL {
        assert_eq!(RmsNormVariant::from_name(v.name()).ok(), Some(v));
        assert!(v.forward_kernel(DType::F32).is_some(), "{v}: every variant has an f32 forward");
    }
    let err = RmsNormVariant::from_name("fast").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("'fast'") && err.contains("naive") && err.contains("warp"), "{err}");
}

// ---- references ----

/// (out, rstd) for inp: (N, C), weight: (C), accumulated in f64.
fn rmsnorm_forward_ref(inp: &[f32], weight: &[f32], dim: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0; inp.len()];
    let mut rstd = Vec::new();
    for (x, y) in inp.chunks(dim).zip(out.chunks_mut(dim)) {
        let mean_sq = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let s = 1.0 / (mean_sq + eps as f64).sqrt();
        for c in 0..dim {
            y[c] = (x[c] as f64 * s * weight[c] as f64) as f32;
        }
        rstd.push(s as f32);
    }
    (out, rstd)
}

/// (dinp, dweight) increments for dout: (N, C), in f64.
fn rmsnorm_backward_ref(dout: &[f32], inp: &[f32], weight: &[f32], rstd: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dinp = vec![0.0; inp.len()];
    let mut dweight = vec![0.0f64; dim];
    for (r, ((x, dy), dx)) in inp.chunks(dim).zip(dout.chunks(dim)).zip(dinp.chunks_mut(dim)).enumerate() {
        let s = rstd[r] as f64;
        let dot: f64 = (0..dim).map(|c| dy[c] as f64 * weight[c] as f64 * x[c] as f64).sum();
        for c in 0..dim {
            dx[c] = (s * weight[c] as f64 * dy[c] as f64 - x[c] as f64 * s * s * s * dot / dim as f64) as f32;
            dweight[c] += dy[c] as f64 * x[c] as f64 * s;
        }
    }
    (dinp, dweight.into_iter().map(|v| v as f32).collect())
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

// ---- kernels ----

#[test]
fn rmsnorm_forward_f32() {
    let dev = gpu_or_skip!("rmsnorm_forward_f32");
    let mut rng = Rng::new(1);
    for &v in RmsNormVariant::ALL {
        for &n in ROWS {
            for &c in DIMS {
                let case = format!("rmsnorm_forward f32 {v} ({n}, {c})");
                let inp = rng.vec(n * c, -2.0, 2.0);
                let weight = rng.vec(c, 0.5, 1.5);
                let (want_out, want_rstd) = rmsnorm_forward_ref(&inp, &weight, c, EPS);
                let d_inp = dev.upload(&inp).unwrap();
                let d_w = dev.upload(&weight).unwrap();
                let mut d_out = dev.upload(&vec![f32::NAN; n * c]).unwrap();
                let mut d_rstd = dev.upload(&vec![f32::NAN; n]).unwrap();
                rmsnorm_forward(
                    &dev,
                    v,
                    &mut d_out.as_view_mut(),
                    &mut d_rstd.as_view_mut(),
                    &d_inp.as_view(),
                    &d_w.as_view(),
                    c,
                    EPS,
                )
                .unwrap_or_else(|e| panic!("{case}: {e}"));
                dev.synchronize().unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_close(&format!("{case} out"), &dev.download(&d_out).unwrap(), &want_out, 1e-6, 1e-5);
                assert_close(&format!("{case} rstd"), &dev.download(&d_rstd).unwrap(), &want_rstd, 0.0, 1e-5);
            }
        }
    }
}

#[test]
fn rmsnorm_forward_bf16() {
    let dev = gpu_or_skip!("rmsnorm_forward_bf16");
    let mut rng = Rng::new(2);
    for &v in RmsNormVariant::ALL {
        for &n in ROWS {
            for &c in DIMS {
                let case = format!("rmsnorm_forward bf16 {v} ({n}, {c})");
                let inp = to_bf16(&rng.vec(n * c, -2.0, 2.0));
                let weight = to_bf16(&rng.vec(c, 0.5, 1.5));
                // The reference sees exactly the bf16 inputs, so only the output roundings differ.
                let (want_out, want_rstd) = rmsnorm_forward_ref(&to_f32(&inp), &to_f32(&weight), c, EPS);
                let d_inp = dev.upload(&inp).unwrap();
                let d_w = dev.upload(&weight).unwrap();
                let mut d_out = dev.upload(&vec![bf16::NAN; n * c]).unwrap();
                let mut d_rstd = dev.upload(&vec![f32::NAN; n]).unwrap();
                let res = rmsnorm_forward(
                    &dev,
                    v,
                    &mut d_out.as_view_mut(),
                    &mut d_rstd.as_view_mut(),
                    &d_inp.as_view(),
                    &d_w.as_view(),
                    c,
                    EPS,
                );
                if v.forward_kernel(DType::Bf16).is_none() {
                    assert!(
                        matches!(res, Err(CudaError::UnsupportedDtype { .. })),
                        "{case}: expected UnsupportedDtype, got {res:?}"
                    );
                    continue;
                }
                res.unwrap_or_else(|e| panic!("{case}: {e}"));
                dev.synchronize().unwrap_or_else(|e| panic!("{case}: {e}"));
                // Two bf16 roundings (normalised value, then times weight): at most about 2 * 2^-8.
                assert_close(&format!("{case} out"), &to_f32(&dev.download(&d_out).unwrap()), &want_out, 1e-3, 1e-2);
                assert_close(&format!("{case} rstd"), &dev.download(&d_rstd).unwrap(), &want_rstd, 0.0, 1e-5);
            }
        }
    }
}

#[test]
fn rmsnorm_backward_f32() {
    let dev = gpu_or_skip!("rmsnorm_backward_f32");
    let mut rng = Rng::new(3);
    for &v in RmsNormVariant::ALL {
        for &n in ROWS {
            for &c in DIMS {
                let case = format!("rmsnorm_backward f32 {v} ({n}, {c})");
                let inp = rng.vec(n * c, -2.0, 2.0);
                let weight = rng.vec(c, 0.5, 1.5);
                let dout = rng.vec(n * c, -1.0, 1.0);
                let (_, rstd) = rmsnorm_forward_ref(&inp, &weight, c, EPS);
                // The kernel accumulates: start from nonzero gradients and expect start + increment.
                let dinp0 = rng.vec(n * c, -1.0, 1.0);
                let dweight0 = rng.vec(c, -1.0, 1.0);
                let (ddinp, ddweight) = rmsnorm_backward_ref(&dout, &inp, &weight, &rstd, c);
                let want_dinp: Vec<f32> = dinp0.iter().zip(&ddinp).map(|(a, b)| a + b).collect();
                let want_dweight: Vec<f32> = dweight0.iter().zip(&ddweight).map(|(a, b)| a + b).collect();
                let up = |h: &[f32]| dev.upload(h).unwrap();
                let (d_dout, d_inp, d_w, d_rstd) = (up(&dout), up(&inp), up(&weight), up(&rstd));
                let (mut d_dinp, mut d_dweight) = (up(&dinp0), up(&dweight0));
                let res = rmsnorm_backward(
                    &dev,
                    v,
                    &mut d_dinp.as_view_mut(),
                    &mut d_dweight.as_view_mut(),
                    &d_dout.as_view(),
                    &d_inp.as_view(),
                    &d_w.as_view(),
                    &d_rstd.as_view(),
                    c,
                );
                if v.backward_kernel(DType::F32).is_none() {
                    assert!(
                        matches!(res, Err(CudaError::UnsupportedDtype { .. })),
                        "{case}: expected UnsupportedDtype, got {res:?}"
                    );
                    continue;
                }
                res.unwrap_or_else(|e| panic!("{case}: {e}"));
                dev.synchronize().unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_close(&format!("{case} dinp"), &dev.download(&d_dinp).unwrap(), &want_dinp, 1e-5, 1e-4);
                assert_close(&format!("{case} dweight"), &dev.download(&d_dweight).unwrap(), &want_dweight, 1e-5, 1e-4);
            }
        }
    }
}

#[test]
fn rmsnorm_rejects_bad_shapes() {
    let dev = gpu_or_skip!("rmsnorm_rejects_bad_shapes");
    let (n, c) = (3, 64);
    let inp = dev.upload(&vec![1.0f32; n * c]).unwrap();
    let w = dev.upload(&vec![1.0f32; c]).unwrap();
    let mut out = dev.upload(&vec![0.0f32; n * c]).unwrap();
    let mut rstd = dev.upload(&vec![0.0f32; n]).unwrap();
    let expect_shape_err = |res: Result<(), CudaError>, needle: &str| match res {
        Err(e @ CudaError::Shape { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("expected a shape error mentioning {needle:?}, got {other:?}"),
    };
    let v = RmsNormVariant::Warp;
    // inp not a multiple of dim
    expect_shape_err(
        rmsnorm_forward(
            &dev,
            v,
            &mut out.as_view_mut(),
            &mut rstd.as_view_mut(),
            &inp.slice(1..),
            &w.as_view(),
            c,
            EPS,
        ),
        "not a multiple",
    );
    // out one row short
    expect_shape_err(
        rmsnorm_forward(
            &dev,
            v,
            &mut out.slice_mut(c..),
            &mut rstd.as_view_mut(),
            &inp.as_view(),
            &w.as_view(),
            c,
            EPS,
        ),
        "out has",
    );
    // rstd too short
    expect_shape_err(
        rmsnorm_forward(
            &dev,
            v,
            &mut out.as_view_mut(),
            &mut rstd.slice_mut(1..),
            &inp.as_view(),
            &w.as_view(),
            c,
            EPS,
        ),
        "rstd has",
    );
    // weight too long for dim
    expect_shape_err(
        rmsnorm_forward(
            &dev,
            v,
            &mut out.as_view_mut(),
            &mut rstd.as_view_mut(),
            &inp.as_view(),
            &inp.slice(..2 * c),
            c,
            EPS,
        ),
        "weight has",
    );
    expect_shape_err(
        rmsnorm_forward(&dev, v, &mut out.as_view_mut(), &mut rstd.as_view_mut(), &inp.as_view(), &w.as_view(), 0, EPS),
        "dim is 0",
    );
}

// ---- the same kernels compiled as host C++, on CPU threads (runs everywhere) ----

use sppo::backend::cuda::host::{ffi, grid_args};

type HostForward<T> =
    unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, *mut T, *mut f32, *const T, *const T, i32, i32, f32) -> i32;

fn host_forward_f32(kernel: &str) -> HostForward<f32> {
    match kernel {
        "rmsnorm_forward_f32_naive" => ffi::rmsnorm_forward_f32_naive_host,
        "rmsnorm_forward_f32_warp" => ffi::rmsnorm_forward_f32_warp_host,
        other => panic!("no host entry point mapped for {other}: add it to host_forward_f32"),
    }
}

fn host_forward_bf16(kernel: &str) -> HostForward<bf16> {
    match kernel {
        "rmsnorm_forward_bf16_warp" => ffi::rmsnorm_forward_bf16_warp_host,
        other => panic!("no host entry point mapped for {other}: add it to host_forward_bf16"),
    }
}

/// Runs a forward kernel on CPU threads with the launcher's grid; outputs start as NaN.
fn run_host_forward<T: Copy>(
    f: HostForward<T>,
    v: RmsNormVariant,
    inp: &[T],
    weight: &[T],
    nan: T,
    c: usize,
) -> (Vec<T>, Vec<f32>) {
    let n = inp.len() / c;
    assert_eq!(weight.len(), c);
    let (gx, gy, gz, bx, by, bz) = grid_args(&v.forward_config(n).unwrap());
    let mut out = vec![nan; n * c];
    let mut rstd = vec![f32::NAN; n];
    // SAFETY: the entry point runs the kernel (T* out, float* rstd, const T* inp, const T* weight,
    // int N, int C, float eps) on CPU threads and returns when all are done; out and inp hold N·C
    // elements, weight C, rstd N, as the kernel reads and writes for this grid.
    let rc = unsafe {
        f(
            gx,
            gy,
            gz,
            bx,
            by,
            bz,
            out.as_mut_ptr(),
            rstd.as_mut_ptr(),
            inp.as_ptr(),
            weight.as_ptr(),
            n as i32,
            c as i32,
            EPS,
        )
    };
    assert_eq!(rc, 0, "host launch failed (reason on stderr)");
    (out, rstd)
}

#[test]
fn rmsnorm_forward_f32_host() {
    let mut rng = Rng::new(11);
    for &v in RmsNormVariant::ALL {
        let kernel = v.forward_kernel(DType::F32).unwrap();
        for &n in ROWS {
            for &c in DIMS {
                let case = format!("{kernel} on host ({n}, {c})");
                let inp = rng.vec(n * c, -2.0, 2.0);
                let weight = rng.vec(c, 0.5, 1.5);
                let (want_out, want_rstd) = rmsnorm_forward_ref(&inp, &weight, c, EPS);
                let (out, rstd) = run_host_forward(host_forward_f32(kernel), v, &inp, &weight, f32::NAN, c);
                assert_close(&format!("{case} out"), &out, &want_out, 1e-6, 1e-5);
                assert_close(&format!("{case} rstd"), &rstd, &want_rstd, 0.0, 1e-5);
            }
        }
    }
}

#[test]
fn rmsnorm_forward_bf16_host() {
    let mut rng = Rng::new(12);
    for &v in RmsNormVariant::ALL {
        let Some(kernel) = v.forward_kernel(DType::Bf16) else { continue };
        for &n in ROWS {
            for &c in DIMS {
                let case = format!("{kernel} on host ({n}, {c})");
                let inp = to_bf16(&rng.vec(n * c, -2.0, 2.0));
                let weight = to_bf16(&rng.vec(c, 0.5, 1.5));
                let (want_out, want_rstd) = rmsnorm_forward_ref(&to_f32(&inp), &to_f32(&weight), c, EPS);
                let (out, rstd) = run_host_forward(host_forward_bf16(kernel), v, &inp, &weight, bf16::NAN, c);
                assert_close(&format!("{case} out"), &to_f32(&out), &want_out, 1e-3, 1e-2);
                assert_close(&format!("{case} rstd"), &rstd, &want_rstd, 0.0, 1e-5);
            }
        }
    }
}

#[test]
fn rmsnorm_backward_f32_host() {
    let mut rng = Rng::new(13);
    for &v in RmsNormVariant::ALL {
        let Some(kernel) = v.backward_kernel(DType::F32) else { continue };
        assert_eq!(kernel, "rmsnorm_backward_f32_naive", "map the new backward kernel to its host entry point");
        for &n in ROWS {
            for &c in DIMS {
                let case = format!("{kernel} on host ({n}, {c})");
                let inp = rng.vec(n * c, -2.0, 2.0);
                let weight = rng.vec(c, 0.5, 1.5);
                let dout = rng.vec(n * c, -1.0, 1.0);
                let (_, rstd) = rmsnorm_forward_ref(&inp, &weight, c, EPS);
                let mut dinp = rng.vec(n * c, -1.0, 1.0);
                let mut dweight = rng.vec(c, -1.0, 1.0);
                let (ddinp, ddweight) = rmsnorm_backward_ref(&dout, &inp, &weight, &rstd, c);
                let want_dinp: Vec<f32> = dinp.iter().zip(&ddinp).map(|(a, b)| a + b).collect();
                let want_dweight: Vec<f32> = dweight.iter().zip(&ddweight).map(|(a, b)| a + b).collect();
                let (gx, gy, gz, bx, by, bz) = grid_args(&v.backward_config(n, c).unwrap());
                // SAFETY: rmsnorm_backward_f32_naive(dinp, dweight, dout, inp, weight, rstd, N, C) on CPU
                // threads; dinp, dout, inp hold N·C elements, dweight and weight C, rstd N.
                let rc = unsafe {
                    ffi::rmsnorm_backward_f32_naive_host(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        dinp.as_mut_ptr(),
                        dweight.as_mut_ptr(),
                        dout.as_ptr(),
                        inp.as_ptr(),
                        weight.as_ptr(),
                        rstd.as_ptr(),
                        n as i32,
                        c as i32,
                    )
                };
                assert_eq!(rc, 0, "{case}: host launch failed (reason on stderr)");
                assert_close(&format!("{case} dinp"), &dinp, &want_dinp, 1e-5, 1e-4);
                assert_close(&format!("{case} dweight"), &dweight, &want_dweight, 1e-5, 1e-4);
            }
        }
    }
}
