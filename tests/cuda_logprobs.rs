//! `kernels/logprobs.cu` against the f32 CPU reference (`CpuBackend::token_logprobs_forward/
//! backward`) on random inputs, f32 and bf16: masked rows, sizes that are not multiples of the
//! tiles, several chunks of rows and one, every row masked. Outputs start as NaN (dweight, which
//! accumulates, starts from random values), so an unwritten element fails; NaN never passes.
//!
//! Each case runs through the host-compiled kernels on CPU threads (everywhere) and through the
//! real kernels when `probe()` finds a GPU (else those tests print why they skip), both driven by
//! the launcher's plan (`plan_logprobs`).

#[macro_use]
mod common;

use common::{assert_close, Rng};
use half::bf16;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::error::CudaError;
use sppo::backend::cuda::host::{ffi, grid_args};
use sppo::backend::cuda::ops::logprobs::{
    dhidden_kernel, dweight_kernel, logits_kernel, plan_logprobs, token_logprobs_backward, token_logprobs_forward,
    LogprobsLens,
};
use sppo::backend::cuda::ops::{DType, Element};
use sppo::backend::cuda::CudaDevice;
use sppo::backend::Backend;

struct Case {
    name: &'static str,
    n: usize,
    dim: usize,
    vocab: usize,
    /// Every `mask_every`-th row (from row 1) is masked; 0: none, 1: all.
    mask_every: usize,
    /// Rows of logits the scratch holds (the chunk height).
    chunk_rows: usize,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "37 rows, a third masked, chunks of 16",
            n: 37,
            dim: 72,
            vocab: 100,
            mask_every: 3,
            chunk_rows: 16,
        },
        Case { name: "5 rows, one chunk", n: 5, dim: 40, vocab: 33, mask_every: 0, chunk_rows: 64 },
        Case { name: "chunks of one row", n: 4, dim: 17, vocab: 70, mask_every: 2, chunk_rows: 1 },
        Case { name: "every row masked", n: 6, dim: 24, vocab: 20, mask_every: 1, chunk_rows: 8 },
    ]
}

struct Inputs {
    hidden: Vec<f32>,
    weight: Vec<f32>,
    targets: Vec<i32>,
    dlogp: Vec<f32>,
    dweight0: Vec<f32>,
}

impl Inputs {
    fn random(case: &Case, rng: &mut Rng, round: impl Fn(Vec<f32>) -> Vec<f32>) -> Inputs {
        let targets = (0..case.n)
            .map(|t| {
                let masked = case.mask_every == 1 || (case.mask_every > 1 && t % case.mask_every == 1);
                if masked {
                    -1
                } else {
                    (rng.next_u64() % case.vocab as u64) as i32
                }
            })
            .collect();
        Inputs {
            hidden: round(rng.vec(case.n * case.dim, -1.0, 1.0)),
            weight: round(rng.vec(case.vocab * case.dim, -1.0, 1.0)),
            targets,
            dlogp: rng.vec(case.n, -1.0, 1.0),
            dweight0: rng.vec(case.vocab * case.dim, -1.0, 1.0),
        }
    }
}

/// The reference's (logp, lse) and (dhidden, dweight0 + increment).
fn reference(case: &Case, x: &Inputs) -> [Vec<f32>; 4] {
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    let (mut logp, mut lse) = (vec![f32::NAN; case.n], vec![f32::NAN; case.n]);
    cpu.token_logprobs_forward(&mut logp, &mut lse, &x.hidden, &x.weight, &x.targets, case.dim, case.vocab)
        .unwrap_or_else(|e| panic!("{}: reference forward: {e}", case.name));
    let mut dhidden = vec![f32::NAN; case.n * case.dim];
    let mut dweight = x.dweight0.clone();
    cpu.token_logprobs_backward(
        &mut dhidden,
        &mut dweight,
        &x.dlogp,
        &x.hidden,
        &x.weight,
        &lse,
        &x.targets,
        case.dim,
        case.vocab,
    )
    .unwrap_or_else(|e| panic!("{}: reference backward: {e}", case.name));
    [logp, lse, dhidden, dweight]
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// f32 or bf16 with its host entry points.
trait Elem: Element {
    const NAN: Self;
    fn from_f32s(v: &[f32]) -> Vec<Self>;
    fn to_f32s(v: &[Self]) -> Vec<f32>;
    fn host_logits(kernel: &str) -> HostLogits<Self>;
    fn host_dhidden(kernel: &str) -> HostDhidden<Self>;
    fn host_dweight(kernel: &str) -> HostDweight<Self>;
}

type HostLogits<T> =
    unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, *mut f32, *const T, *const T, *const i32, i32, i32, i32) -> i32;
type HostDhidden<T> =
    unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, *mut T, *const f32, *const T, *const i32, i32, i32, i32) -> i32;
type HostDweight<T> = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut f32,
    *const f32,
    *const T,
    *const i32,
    i32,
    i32,
    i32,
) -> i32;

fn unmapped(kernel: &str) -> ! {
    panic!("no host entry point mapped for {kernel}: add it to tests/cuda_logprobs.rs's Elem impls")
}

impl Elem for f32 {
    const NAN: f32 = f32::NAN;
    fn from_f32s(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn to_f32s(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn host_logits(kernel: &str) -> HostLogits<f32> {
        match kernel {
            "logprobs_logits_f32" => ffi::logprobs_logits_f32_host,
            other => unmapped(other),
        }
    }
    fn host_dhidden(kernel: &str) -> HostDhidden<f32> {
        match kernel {
            "logprobs_dhidden_f32" => ffi::logprobs_dhidden_f32_host,
            other => unmapped(other),
        }
    }
    fn host_dweight(kernel: &str) -> HostDweight<f32> {
        match kernel {
            "logprobs_dweight_f32" => ffi::logprobs_dweight_f32_host,
            other => unmapped(other),
        }
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
    fn host_logits(kernel: &str) -> HostLogits<bf16> {
        match kernel {
            "logprobs_logits_bf16" => ffi::logprobs_logits_bf16_host,
            other => unmapped(other),
        }
    }
    fn host_dhidden(kernel: &str) -> HostDhidden<bf16> {
        match kernel {
            "logprobs_dhidden_bf16" => ffi::logprobs_dhidden_bf16_host,
            other => unmapped(other),
        }
    }
    fn host_dweight(kernel: &str) -> HostDweight<bf16> {
        match kernel {
            "logprobs_dweight_bf16" => ffi::logprobs_dweight_bf16_host,
            other => unmapped(other),
        }
    }
}

#[derive(Clone, Copy)]
enum Runner<'a> {
    Host,
    Gpu(&'a CudaDevice),
}

/// The kernels' [logp, lse, dhidden (as f32), dweight]; backward is given the reference's lse.
fn run<T: Elem>(runner: Runner, case: &Case, x: &Inputs, ref_lse: &[f32]) -> [Vec<f32>; 4] {
    let (hidden, weight) = (T::from_f32s(&x.hidden), T::from_f32s(&x.weight));
    let (n, dim, vocab) = (case.n, case.dim, case.vocab);
    let mut logp = vec![f32::NAN; n];
    let mut lse = vec![f32::NAN; n];
    let mut dhidden = vec![T::NAN; n * dim];
    let mut dweight = x.dweight0.clone();
    let mut scratch = vec![f32::NAN; case.chunk_rows * vocab];
    match runner {
        Runner::Host => {
            let lens = |backward: bool| LogprobsLens {
                hidden: hidden.len(),
                weight: weight.len(),
                scratch: scratch.len(),
                logp: (!backward).then_some(n),
                lse: n,
                dlogp: backward.then_some(n),
                dhidden: backward.then_some(n * dim),
                dweight: backward.then_some(vocab * dim),
            };
            let fwd =
                plan_logprobs(&lens(false), &x.targets, dim, vocab).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let bwd =
                plan_logprobs(&lens(true), &x.targets, dim, vocab).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            if fwd.zero_fill {
                logp.fill(0.0);
                lse.fill(0.0);
            }
            if bwd.zero_fill {
                dhidden.fill(T::from_f32s(&[0.0])[0]);
            }
            let (d, v) = (fwd.dim, fwd.vocab);
            let rc_ok = |rc: i32, kernel: &str| assert_eq!(rc, 0, "{}: host launch of {kernel} failed", case.name);
            for chunk in &fwd.chunks {
                let rows = fwd.rows[chunk.first..].as_ptr();
                let (gx, gy, gz, bx, by, bz) = grid_args(&chunk.logits);
                let kernel = logits_kernel(T::DTYPE);
                // SAFETY: logits(float* z, const T* hidden, const T* weight, const int* rows,
                // int n_rows, int dim, int vocab); the plan checked the lengths, scratch holds
                // chunk_rows · vocab floats and rows has n_rows entries from `first`.
                let rc = unsafe {
                    T::host_logits(kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        scratch.as_mut_ptr(),
                        hidden.as_ptr(),
                        weight.as_ptr(),
                        rows,
                        chunk.n_rows,
                        d,
                        v,
                    )
                };
                rc_ok(rc, kernel);
                let (gx, gy, gz, bx, by, bz) = grid_args(&chunk.forward_rows);
                // SAFETY: forward_rows(float* logp, float* lse, const float* z, const int* targets,
                // const int* rows, int vocab); one block per chunk row; targets checked < vocab.
                let rc = unsafe {
                    ffi::logprobs_forward_rows_host(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        logp.as_mut_ptr(),
                        lse.as_mut_ptr(),
                        scratch.as_ptr(),
                        x.targets.as_ptr(),
                        rows,
                        v,
                    )
                };
                rc_ok(rc, "logprobs_forward_rows");
            }
            for chunk in &bwd.chunks {
                let rows = bwd.rows[chunk.first..].as_ptr();
                let (gx, gy, gz, bx, by, bz) = grid_args(&chunk.logits);
                let kernel = logits_kernel(T::DTYPE);
                // SAFETY: as the forward's logits launch.
                let rc = unsafe {
                    T::host_logits(kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        scratch.as_mut_ptr(),
                        hidden.as_ptr(),
                        weight.as_ptr(),
                        rows,
                        chunk.n_rows,
                        d,
                        v,
                    )
                };
                rc_ok(rc, kernel);
                let (gx, gy, gz, bx, by, bz) = grid_args(&chunk.dlogits);
                // SAFETY: dlogits(float* z, const float* dlogp, const float* lse, const int* targets,
                // const int* rows, int n_rows, int vocab); threads past n_rows · vocab return.
                let rc = unsafe {
                    ffi::logprobs_dlogits_host(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        scratch.as_mut_ptr(),
                        x.dlogp.as_ptr(),
                        ref_lse.as_ptr(),
                        x.targets.as_ptr(),
                        rows,
                        chunk.n_rows,
                        v,
                    )
                };
                rc_ok(rc, "logprobs_dlogits");
                let (gx, gy, gz, bx, by, bz) = grid_args(&chunk.dhidden);
                let kernel = dhidden_kernel(T::DTYPE);
                // SAFETY: dhidden(T* dhidden, const float* dz, const T* weight, const int* rows,
                // int n_rows, int dim, int vocab); dhidden holds N · dim elements.
                let rc = unsafe {
                    T::host_dhidden(kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        dhidden.as_mut_ptr(),
                        scratch.as_ptr(),
                        weight.as_ptr(),
                        rows,
                        chunk.n_rows,
                        d,
                        v,
                    )
                };
                rc_ok(rc, kernel);
                let (gx, gy, gz, bx, by, bz) = grid_args(&chunk.dweight);
                let kernel = dweight_kernel(T::DTYPE);
                // SAFETY: dweight(float* dweight, const float* dz, const T* hidden, const int* rows,
                // int n_rows, int dim, int vocab); dweight holds vocab · dim floats.
                let rc = unsafe {
                    T::host_dweight(kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        dweight.as_mut_ptr(),
                        scratch.as_ptr(),
                        hidden.as_ptr(),
                        rows,
                        chunk.n_rows,
                        d,
                        v,
                    )
                };
                rc_ok(rc, kernel);
            }
        }
        Runner::Gpu(dev) => {
            let fail = |e: CudaError| panic!("{}: {e}", case.name);
            let (d_hidden, d_weight) = (dev.upload(&hidden).unwrap(), dev.upload(&weight).unwrap());
            let (mut d_logp, mut d_lse) = (dev.upload(&logp).unwrap(), dev.upload(&lse).unwrap());
            let mut d_scratch = dev.upload(&scratch).unwrap();
            token_logprobs_forward(
                dev,
                &mut d_logp.as_view_mut(),
                &mut d_lse.as_view_mut(),
                &mut d_scratch.as_view_mut(),
                &d_hidden.as_view(),
                &d_weight.as_view(),
                &x.targets,
                dim,
                vocab,
            )
            .unwrap_or_else(fail);
            let (d_dlogp, d_ref_lse) = (dev.upload(&x.dlogp).unwrap(), dev.upload(ref_lse).unwrap());
            let (mut d_dhidden, mut d_dweight) = (dev.upload(&dhidden).unwrap(), dev.upload(&dweight).unwrap());
            token_logprobs_backward(
                dev,
                &mut d_dhidden.as_view_mut(),
                &mut d_dweight.as_view_mut(),
                &mut d_scratch.as_view_mut(),
                &d_dlogp.as_view(),
                &d_hidden.as_view(),
                &d_weight.as_view(),
                &d_ref_lse.as_view(),
                &x.targets,
                dim,
                vocab,
            )
            .unwrap_or_else(fail);
            dev.synchronize().unwrap_or_else(fail);
            logp = dev.download(&d_logp).unwrap();
            lse = dev.download(&d_lse).unwrap();
            dhidden = dev.download(&d_dhidden).unwrap();
            dweight = dev.download(&d_dweight).unwrap();
        }
    }
    [logp, lse, T::to_f32s(&dhidden), dweight]
}

fn check_all<T: Elem>(runner: Runner, where_: &str, seed: u64) {
    let mut rng = Rng::new(seed);
    for case in cases() {
        // bf16: the reference sees exactly the kernels' (rounded) hidden and weight.
        let x = Inputs::random(&case, &mut rng, |v| T::to_f32s(&T::from_f32s(&v)));
        let want = reference(&case, &x);
        let got = run::<T>(runner, &case, &x, &want[1]);
        let tag = format!("{} [{} {where_}]", case.name, T::DTYPE);
        // logp and lse are f32 sums of the same inputs in another order.
        assert_close(&format!("{tag} logp"), &got[0], &want[0], 2e-5, 1e-5);
        assert_close(&format!("{tag} lse"), &got[1], &want[1], 2e-5, 1e-5);
        // dhidden is stored as T: bf16 adds one rounding (at most 2^-8 relative).
        let rtol = if T::DTYPE == DType::Bf16 { 5e-3 } else { 1e-4 };
        assert_close(&format!("{tag} dhidden"), &got[2], &want[2], 1e-5 * max_abs(&want[2]).max(1e-3), rtol);
        // dweight accumulates in f32 in both variants.
        assert_close(&format!("{tag} dweight"), &got[3], &want[3], 1e-5 * max_abs(&want[3]), 1e-4);
    }
}

#[test]
fn logprobs_f32_host() {
    check_all::<f32>(Runner::Host, "host", 31);
}

#[test]
fn logprobs_bf16_host() {
    check_all::<bf16>(Runner::Host, "host", 32);
}

#[test]
fn logprobs_f32_gpu() {
    let dev = gpu_or_skip!("logprobs_f32_gpu");
    check_all::<f32>(Runner::Gpu(&dev), "gpu", 31);
}

#[test]
fn logprobs_bf16_gpu() {
    let dev = gpu_or_skip!("logprobs_bf16_gpu");
    check_all::<bf16>(Runner::Gpu(&dev), "gpu", 32);
}

#[test]
fn logprobs_plan_chunks_and_rejects_bad_calls() {
    let (n, dim, vocab) = (10, 8, 50);
    let targets: Vec<i32> = (0..n as i32).map(|t| if t % 4 == 0 { -1 } else { t }).collect();
    let fwd = LogprobsLens {
        hidden: n * dim,
        weight: vocab * dim,
        scratch: 3 * vocab + 7,
        logp: Some(n),
        lse: n,
        ..Default::default()
    };
    let plan = plan_logprobs(&fwd, &targets, dim, vocab).expect("valid call");
    assert_eq!(plan.rows, vec![1, 2, 3, 5, 6, 7, 9]);
    assert!(plan.zero_fill);
    // Chunks of scratch / vocab = 3 rows.
    let firsts: Vec<(usize, i32)> = plan.chunks.iter().map(|c| (c.first, c.n_rows)).collect();
    assert_eq!(firsts, vec![(0, 3), (3, 3), (6, 1)]);
    assert_eq!(plan.chunks[0].logits.grid_dim, (4, 1, 1));
    assert_eq!(plan.chunks[0].dweight.grid_dim, (1, 4, 1));

    let expect =
        |lens: &LogprobsLens, targets: &[i32], dim: usize, needle: &str| match plan_logprobs(lens, targets, dim, vocab)
        {
            Err(e @ CudaError::Shape { .. }) => {
                let text = e.to_string();
                assert!(text.starts_with("token_logprobs_") && text.contains(needle), "{needle:?} not in: {text}");
            }
            other => panic!("expected a shape error mentioning {needle:?}, got {other:?}"),
        };
    expect(&fwd, &targets, 0, "must be nonzero");
    expect(&LogprobsLens { hidden: n * dim + 1, ..fwd }, &targets, dim, "not a multiple of dim");
    expect(&fwd, &targets[1..], dim, "targets has");
    expect(&LogprobsLens { weight: 0, ..fwd }, &targets, dim, "weight has");
    expect(&LogprobsLens { lse: n - 1, ..fwd }, &targets, dim, "lse has");
    expect(&LogprobsLens { logp: Some(1), ..fwd }, &targets, dim, "logp has");
    expect(&LogprobsLens { scratch: vocab - 1, ..fwd }, &targets, dim, "scratch has");
    let mut bad = targets.clone();
    bad[3] = vocab as i32;
    expect(&fwd, &bad, dim, "targets[3] = 50 is out of range");
    let bwd = LogprobsLens { logp: None, dlogp: Some(n), dhidden: Some(n * dim), dweight: Some(vocab * dim), ..fwd };
    assert!(plan_logprobs(&bwd, &targets, dim, vocab).is_ok());
    expect(&LogprobsLens { dlogp: Some(n + 1), ..bwd }, &targets, dim, "dlogp has");
    expect(&LogprobsLens { dhidden: Some(n), ..bwd }, &targets, dim, "dhidden has");
    expect(&LogprobsLens { dweight: Some(1), ..bwd }, &targets, dim, "dweight has");
}
