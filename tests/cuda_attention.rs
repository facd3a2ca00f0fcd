//! `kernels/attention.cu` against the f32 CPU reference (`CpuBackend::attention_forward/backward`)
//! on random inputs: every variant and dtype, causal, sliding window, bidirectional, grouped-query
//! and multi-query heads, head_dim 64/80/128/256, packed batches of uneven lengths (length 1,
//! lengths not multiples of the tiles, rows outside every sequence), decode-shaped calls
//! (q_len < k_len). Outputs start as NaN, so an unwritten element fails; NaN never passes.
//!
//! Each case runs through the host-compiled kernels on CPU threads (everywhere) and through the
//! real kernels when `probe()` finds a GPU (else those tests print why they skip). Both go
//! through the launcher's plan (`plan_forward`/`plan_backward`): same checks, grids, tile tables.

#[macro_use]
mod common;

use common::{assert_close, Rng};
use half::bf16;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::error::CudaError;
use sppo::backend::cuda::host::{ffi, grid_args};
use sppo::backend::cuda::ops::attention::{
    attention_backward, attention_forward, plan_backward, plan_forward, AttnLaunch, BackwardLens, ForwardLens,
    MAX_HEAD_DIM,
};
use sppo::backend::cuda::ops::{DType, Element};
use sppo::backend::cuda::{AttentionVariant, CudaDevice};
use sppo::backend::{AttnMask, AttnSeq, AttnShape, Backend};

// ---- cases ----

struct Case {
    name: &'static str,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    mask: AttnMask,
    seqs: Vec<AttnSeq>,
    /// Rows of the q (and k) buffers; rows outside every sequence are allowed.
    nq: usize,
    nk: usize,
}

impl Case {
    /// Sequences of (q_len, k_len) packed end to end.
    fn packed(
        name: &'static str,
        (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
        mask: AttnMask,
        lens: &[(usize, usize)],
    ) -> Case {
        let (mut q_start, mut k_start) = (0, 0);
        let mut seqs = Vec::new();
        for &(q_len, k_len) in lens {
            seqs.push(AttnSeq { q_start, q_len, k_start, k_len });
            q_start += q_len;
            k_start += k_len;
        }
        Case { name, n_heads, n_kv_heads, head_dim, mask, seqs, nq: q_start, nk: k_start }
    }

    fn shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            mask: self.mask,
        }
    }

    fn q_elems(&self) -> usize {
        self.nq * self.n_heads * self.head_dim
    }

    fn kv_elems(&self) -> usize {
        self.nk * self.n_kv_heads * self.head_dim
    }

    /// Whether query row t belongs to a sequence (forward leaves the others untouched).
    fn covered_rows(&self) -> Vec<bool> {
        let mut covered = vec![false; self.nq];
        for s in &self.seqs {
            covered[s.q_start..s.q_start + s.q_len].iter_mut().for_each(|c| *c = true);
        }
        covered
    }
}

const CAUSAL: AttnMask = AttnMask::Causal { window: None };

/// Small enough for the host harness (one OS thread per GPU thread) to run all in seconds.
fn cases() -> Vec<Case> {
    let mut gaps = Case::packed("rows outside every sequence", (4, 2, 64), CAUSAL, &[]);
    // q rows 0..5 and 8..17 (rows 5..8 belong to no sequence); keys 0..5 and 6..15 (row 5 unused).
    gaps.seqs = vec![
        AttnSeq { q_start: 0, q_len: 5, k_start: 0, k_len: 5 },
        AttnSeq { q_start: 8, q_len: 9, k_start: 6, k_len: 9 },
    ];
    gaps.nq = 17;
    gaps.nk = 15;
    vec![
        Case::packed("causal GQA 9/3 (SmolLM2) d64", (9, 3, 64), CAUSAL, &[(1, 1), (13, 13), (21, 21)]),
        Case::packed(
            "sliding window 5, GQA 4/2, d80",
            (4, 2, 80),
            AttnMask::Causal { window: Some(5) },
            &[(17, 17), (9, 9), (1, 1)],
        ),
        Case::packed("bidirectional MQA 4/1 d128", (4, 1, 128), AttnMask::Bidirectional, &[(7, 7), (19, 19), (1, 1)]),
        Case::packed("decode causal GQA 6/2 d64", (6, 2, 64), CAUSAL, &[(1, 20), (3, 11), (2, 2)]),
        Case::packed(
            "decode sliding window 4, MHA 2/2 d64",
            (2, 2, 64),
            AttnMask::Causal { window: Some(4) },
            &[(3, 17), (1, 9)],
        ),
        Case::packed("causal MQA 2/1 d256", (2, 1, 256), CAUSAL, &[(18, 18)]),
        gaps,
    ]
}

// ---- reference ----

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

impl Inputs {
    fn random(case: &Case, rng: &mut Rng) -> Inputs {
        // q in (-2, 2): scores of a few units, so the softmax is peaked and the online rescaling
        // in the fused forward matters.
        Inputs {
            q: rng.vec(case.q_elems(), -2.0, 2.0),
            k: rng.vec(case.kv_elems(), -1.0, 1.0),
            v: rng.vec(case.kv_elems(), -1.0, 1.0),
            dout: rng.vec(case.q_elems(), -1.0, 1.0),
        }
    }

    /// The same inputs rounded to bf16 (and back to f32 for the reference).
    fn rounded_to_bf16(&self) -> Inputs {
        let r = |v: &[f32]| to_f32(&to_bf16(v));
        Inputs { q: r(&self.q), k: r(&self.k), v: r(&self.v), dout: r(&self.dout) }
    }
}

/// The reference's (out, lse); rows outside every sequence stay NaN.
fn reference_forward(case: &Case, x: &Inputs) -> (Vec<f32>, Vec<f32>) {
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    let mut out = vec![f32::NAN; case.q_elems()];
    let mut lse = vec![f32::NAN; case.nq * case.n_heads];
    cpu.attention_forward(&mut out, &mut lse, &x.q, &x.k, &x.v, &case.seqs, &case.shape())
        .unwrap_or_else(|e| panic!("{}: reference forward: {e}", case.name));
    (out, lse)
}

/// The reference's (dq, dk, dv) given the forward's `out` and `lse`.
fn reference_backward(case: &Case, x: &Inputs, out: &[f32], lse: &[f32]) -> [Vec<f32>; 3] {
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    let mut dq = vec![f32::NAN; case.q_elems()];
    let mut dk = vec![f32::NAN; case.kv_elems()];
    let mut dv = vec![f32::NAN; case.kv_elems()];
    cpu.attention_backward(&mut dq, &mut dk, &mut dv, &x.dout, &x.q, &x.k, &x.v, out, lse, &case.seqs, &case.shape())
        .unwrap_or_else(|e| panic!("{}: reference backward: {e}", case.name));
    [dq, dk, dv]
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Keeps the elements of the rows (of `width` elements) that `keep` marks.
fn rows_where(v: &[f32], width: usize, keep: &[bool]) -> Vec<f32> {
    v.chunks(width).zip(keep).filter(|(_, &k)| k).flat_map(|(row, _)| row.iter().copied()).collect()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// (rtol, atol as a fraction of the tensor's largest element) of the kernels' T-typed outputs
/// (out, dq, dk, dv). f32 differs from the reference only in summation order. bf16 adds one
/// rounding on store: half an ulp, at most 2^-8 relative (just above a power of two, with 8
/// significant bits), so rtol 5e-3 leaves room for the f32 part only. The absolute part covers
/// elements that cancel to near zero.
fn tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-4, 2e-6),
        DType::Bf16 => (5e-3, 1e-4),
    }
}

fn check(what: &str, got: &[f32], want: &[f32], dtype: DType) {
    let (rtol, atol_frac) = tolerance(dtype);
    assert_close(what, got, want, atol_frac * max_abs(want), rtol);
}

// ---- kernels run on CPU threads (host harness) or on the GPU ----

/// f32 or bf16 with its host entry points, by kernel name.
trait Elem: Element {
    const NAN: Self;
    fn from_f32s(v: &[f32]) -> Vec<Self>;
    fn to_f32s(v: &[Self]) -> Vec<f32>;
    fn host_forward(kernel: &str) -> HostForward<Self>;
    fn host_delta(kernel: &str) -> HostDelta<Self>;
    fn host_dq(kernel: &str) -> HostDq<Self>;
    fn host_dkdv(kernel: &str) -> HostDkdv<Self>;
}

type HostForward<T> = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut T,
    *mut f32,
    *const T,
    *const T,
    *const T,
    *const i32,
    *const i32,
    i32,
    i32,
    i32,
    f32,
    i32,
    i32,
) -> i32;
type HostDelta<T> = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, *mut f32, *const T, *const T, i32, i32) -> i32;
type HostDq<T> = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut T,
    *const T,
    *const T,
    *const T,
    *const T,
    *const f32,
    *const f32,
    *const i32,
    *const i32,
    i32,
    i32,
    i32,
    f32,
    i32,
    i32,
) -> i32;
type HostDkdv<T> = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut T,
    *mut T,
    *const T,
    *const T,
    *const T,
    *const T,
    *const f32,
    *const f32,
    *const i32,
    *const i32,
    i32,
    i32,
    i32,
    f32,
    i32,
    i32,
) -> i32;

fn unmapped(kernel: &str) -> ! {
    panic!("no host entry point mapped for {kernel}: add it to tests/cuda_attention.rs's Elem impls")
}

impl Elem for f32 {
    const NAN: f32 = f32::NAN;
    fn from_f32s(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn to_f32s(v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn host_forward(kernel: &str) -> HostForward<f32> {
        match kernel {
            "attention_forward_f32_naive" => ffi::attention_forward_f32_naive_host,
            "attention_forward_f32_fused" => ffi::attention_forward_f32_fused_host,
            other => unmapped(other),
        }
    }
    fn host_delta(kernel: &str) -> HostDelta<f32> {
        match kernel {
            "attention_backward_delta_f32" => ffi::attention_backward_delta_f32_host,
            other => unmapped(other),
        }
    }
    fn host_dq(kernel: &str) -> HostDq<f32> {
        match kernel {
            "attention_backward_dq_f32_naive" => ffi::attention_backward_dq_f32_naive_host,
            "attention_backward_dq_f32_fused" => ffi::attention_backward_dq_f32_fused_host,
            other => unmapped(other),
        }
    }
    fn host_dkdv(kernel: &str) -> HostDkdv<f32> {
        match kernel {
            "attention_backward_dkdv_f32_naive" => ffi::attention_backward_dkdv_f32_naive_host,
            "attention_backward_dkdv_f32_fused" => ffi::attention_backward_dkdv_f32_fused_host,
            other => unmapped(other),
        }
    }
}

impl Elem for bf16 {
    const NAN: bf16 = bf16::NAN;
    fn from_f32s(v: &[f32]) -> Vec<bf16> {
        to_bf16(v)
    }
    fn to_f32s(v: &[bf16]) -> Vec<f32> {
        to_f32(v)
    }
    fn host_forward(kernel: &str) -> HostForward<bf16> {
        match kernel {
            "attention_forward_bf16_naive" => ffi::attention_forward_bf16_naive_host,
            "attention_forward_bf16_fused" => ffi::attention_forward_bf16_fused_host,
            other => unmapped(other),
        }
    }
    fn host_delta(kernel: &str) -> HostDelta<bf16> {
        match kernel {
            "attention_backward_delta_bf16" => ffi::attention_backward_delta_bf16_host,
            other => unmapped(other),
        }
    }
    fn host_dq(kernel: &str) -> HostDq<bf16> {
        match kernel {
            "attention_backward_dq_bf16_naive" => ffi::attention_backward_dq_bf16_naive_host,
            "attention_backward_dq_bf16_fused" => ffi::attention_backward_dq_bf16_fused_host,
            other => unmapped(other),
        }
    }
    fn host_dkdv(kernel: &str) -> HostDkdv<bf16> {
        match kernel {
            "attention_backward_dkdv_bf16_naive" => ffi::attention_backward_dkdv_bf16_naive_host,
            "attention_backward_dkdv_bf16_fused" => ffi::attention_backward_dkdv_bf16_fused_host,
            other => unmapped(other),
        }
    }
}

/// Where the kernels run.
#[derive(Clone, Copy)]
enum Runner<'a> {
    Host,
    Gpu(&'a CudaDevice),
}

/// Kernel outputs as f32: (out, lse) or (dq, dk, dv).
struct Forward {
    out: Vec<f32>,
    lse: Vec<f32>,
}

fn grid(launch: &AttnLaunch) -> (u32, u32, u32, u32, u32, u32) {
    grid_args(&launch.config)
}

fn run_forward<T: Elem>(runner: Runner, variant: AttentionVariant, case: &Case, q: &[T], k: &[T], v: &[T]) -> Forward {
    let shape = case.shape();
    let mut out = vec![T::NAN; q.len()];
    let mut lse = vec![f32::NAN; case.nq * case.n_heads];
    match runner {
        Runner::Host => {
            let lens = ForwardLens { out: out.len(), lse: lse.len(), q: q.len(), k: k.len(), v: v.len() };
            let plan = plan_forward(variant, T::DTYPE, &lens, &case.seqs, &shape)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            if let Some(launch) = &plan.launch {
                let a = plan.args;
                let (gx, gy, gz, bx, by, bz) = grid(launch);
                // SAFETY: the forward kernel (T* out, float* lse, const T* q, k, v, const int* seqs,
                // const int* tiles, int n_heads, n_kv_heads, head_dim, float scale, int causal,
                // int window) on CPU threads; plan_forward checked every length and sequence, and
                // the tile table has grid.x entries.
                let rc = unsafe {
                    T::host_forward(launch.kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        out.as_mut_ptr(),
                        lse.as_mut_ptr(),
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        plan.seqs.as_ptr(),
                        launch.tiles.as_ptr(),
                        a.n_heads,
                        a.n_kv_heads,
                        a.head_dim,
                        a.scale,
                        a.causal,
                        a.window,
                    )
                };
                assert_eq!(rc, 0, "{}: host launch of {} failed (reason on stderr)", case.name, launch.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let (d_q, d_k, d_v) = (dev.upload(q).unwrap(), dev.upload(k).unwrap(), dev.upload(v).unwrap());
            let mut d_out = dev.upload(&out).unwrap();
            let mut d_lse = dev.upload(&lse).unwrap();
            attention_forward(
                dev,
                variant,
                &mut d_out.as_view_mut(),
                &mut d_lse.as_view_mut(),
                &d_q.as_view(),
                &d_k.as_view(),
                &d_v.as_view(),
                &case.seqs,
                &shape,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            dev.synchronize().unwrap_or_else(|e| panic!("{}: {e}", case.name));
            out = dev.download(&d_out).unwrap();
            lse = dev.download(&d_lse).unwrap();
        }
    }
    Forward { out: T::to_f32s(&out), lse }
}

/// (dq, dk, dv) as f32.
#[allow(clippy::too_many_arguments)]
fn run_backward<T: Elem>(
    runner: Runner,
    variant: AttentionVariant,
    case: &Case,
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[f32],
) -> [Vec<f32>; 3] {
    let shape = case.shape();
    let mut dq = vec![T::NAN; q.len()];
    let mut dk = vec![T::NAN; k.len()];
    let mut dv = vec![T::NAN; k.len()];
    let mut delta = vec![f32::NAN; case.nq * case.n_heads];
    match runner {
        Runner::Host => {
            let lens = BackwardLens {
                dq: dq.len(),
                dk: dk.len(),
                dv: dv.len(),
                delta: delta.len(),
                dout: dout.len(),
                q: q.len(),
                k: k.len(),
                v: v.len(),
                out: out.len(),
                lse: lse.len(),
            };
            let plan = plan_backward(variant, T::DTYPE, &lens, &case.seqs, &shape)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let a = plan.args;
            let zero = T::from_f32s(&[0.0])[0];
            // As the GPU launcher's memsets.
            if plan.zero_dq {
                dq.fill(zero);
            }
            if plan.zero_dkdv {
                dk.fill(zero);
                dv.fill(zero);
            }
            if let Some(launch) = &plan.delta {
                let (gx, gy, gz, bx, by, bz) = grid(launch);
                // SAFETY: the delta kernel (float* delta, const T* dout, const T* out, int rows,
                // int head_dim); dout and out hold rows · head_dim elements, delta rows.
                let rc = unsafe {
                    T::host_delta(launch.kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        delta.as_mut_ptr(),
                        dout.as_ptr(),
                        out.as_ptr(),
                        plan.delta_rows,
                        a.head_dim,
                    )
                };
                assert_eq!(rc, 0, "{}: host launch of {} failed (reason on stderr)", case.name, launch.kernel);
            }
            if let Some(launch) = &plan.dq {
                let (gx, gy, gz, bx, by, bz) = grid(launch);
                // SAFETY: the dq kernel with the signature of HostDq; lengths and sequences checked
                // by plan_backward, delta written above.
                let rc = unsafe {
                    T::host_dq(launch.kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        dq.as_mut_ptr(),
                        dout.as_ptr(),
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        lse.as_ptr(),
                        delta.as_ptr(),
                        plan.seqs.as_ptr(),
                        launch.tiles.as_ptr(),
                        a.n_heads,
                        a.n_kv_heads,
                        a.head_dim,
                        a.scale,
                        a.causal,
                        a.window,
                    )
                };
                assert_eq!(rc, 0, "{}: host launch of {} failed (reason on stderr)", case.name, launch.kernel);
            }
            if let Some(launch) = &plan.dkdv {
                let (gx, gy, gz, bx, by, bz) = grid(launch);
                // SAFETY: the dkdv kernel with the signature of HostDkdv; lengths and sequences
                // checked by plan_backward (key ranges disjoint), delta written above.
                let rc = unsafe {
                    T::host_dkdv(launch.kernel)(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        dk.as_mut_ptr(),
                        dv.as_mut_ptr(),
                        dout.as_ptr(),
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        lse.as_ptr(),
                        delta.as_ptr(),
                        plan.seqs.as_ptr(),
                        launch.tiles.as_ptr(),
                        a.n_heads,
                        a.n_kv_heads,
                        a.head_dim,
                        a.scale,
                        a.causal,
                        a.window,
                    )
                };
                assert_eq!(rc, 0, "{}: host launch of {} failed (reason on stderr)", case.name, launch.kernel);
            }
        }
        Runner::Gpu(dev) => {
            let up = |h: &[T]| dev.upload(h).unwrap();
            let (d_dout, d_q, d_k, d_v, d_out) = (up(dout), up(q), up(k), up(v), up(out));
            let d_lse = dev.upload(lse).unwrap();
            let (mut d_dq, mut d_dk, mut d_dv) = (up(&dq), up(&dk), up(&dv));
            let mut d_delta = dev.upload(&delta).unwrap();
            attention_backward(
                dev,
                variant,
                &mut d_dq.as_view_mut(),
                &mut d_dk.as_view_mut(),
                &mut d_dv.as_view_mut(),
                &mut d_delta.as_view_mut(),
                &d_dout.as_view(),
                &d_q.as_view(),
                &d_k.as_view(),
                &d_v.as_view(),
                &d_out.as_view(),
                &d_lse.as_view(),
                &case.seqs,
                &shape,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            dev.synchronize().unwrap_or_else(|e| panic!("{}: {e}", case.name));
            dq = dev.download(&d_dq).unwrap();
            dk = dev.download(&d_dk).unwrap();
            dv = dev.download(&d_dv).unwrap();
        }
    }
    [T::to_f32s(&dq), T::to_f32s(&dk), T::to_f32s(&dv)]
}

/// Every case and variant in dtype `T` through `runner`, forward and backward, vs the reference.
fn check_all<T: Elem>(runner: Runner, where_: &str, seed: u64) {
    let mut rng = Rng::new(seed);
    for case in cases() {
        let mut x = Inputs::random(&case, &mut rng);
        if T::DTYPE == DType::Bf16 {
            // The reference sees exactly the kernels' bf16 inputs: only rounding of outputs and
            // summation order differ.
            x = x.rounded_to_bf16();
        }
        let (want_out, want_lse) = reference_forward(&case, &x);
        let covered = case.covered_rows();
        let q_row = case.n_heads * case.head_dim;
        // Backward inputs: the reference forward's out (rounded to T) and lse, so backward is
        // checked on its own; the reference backward sees the same rounded out.
        let out_t = T::from_f32s(&want_out.iter().map(|&o| if o.is_nan() { 0.0 } else { o }).collect::<Vec<_>>());
        let lse_in: Vec<f32> = want_lse.iter().map(|&l| if l.is_nan() { 0.0 } else { l }).collect();
        let want_grads = reference_backward(&case, &x, &T::to_f32s(&out_t), &lse_in);
        let (q, k, v, dout) = (T::from_f32s(&x.q), T::from_f32s(&x.k), T::from_f32s(&x.v), T::from_f32s(&x.dout));
        for &variant in AttentionVariant::ALL {
            let tag = format!("{} [{variant} {} {where_}]", case.name, T::DTYPE);
            let got = run_forward(runner, variant, &case, &q, &k, &v);
            check(
                &format!("{tag} out"),
                &rows_where(&got.out, q_row, &covered),
                &rows_where(&want_out, q_row, &covered),
                T::DTYPE,
            );
            let uncovered: Vec<bool> = covered.iter().map(|c| !c).collect();
            assert!(
                rows_where(&got.out, q_row, &uncovered).iter().all(|x| x.is_nan()),
                "{tag}: forward wrote a row outside every sequence"
            );
            // lse is f32 in every variant, accumulated in f32 from the same inputs.
            assert_close(
                &format!("{tag} lse"),
                &rows_where(&got.lse, case.n_heads, &covered),
                &rows_where(&want_lse, case.n_heads, &covered),
                1e-5,
                1e-5,
            );
            let got_grads = run_backward(runner, variant, &case, &dout, &q, &k, &v, &out_t, &lse_in);
            for ((name, got), want) in ["dq", "dk", "dv"].iter().zip(&got_grads).zip(&want_grads) {
                check(&format!("{tag} {name}"), got, want, T::DTYPE);
            }
        }
    }
}

// ---- host harness: runs everywhere ----

#[test]
fn attention_f32_host() {
    check_all::<f32>(Runner::Host, "host", 21);
}

#[test]
fn attention_bf16_host() {
    check_all::<bf16>(Runner::Host, "host", 22);
}

// ---- the real GPU, when there is one ----

#[test]
fn attention_f32_gpu() {
    let dev = gpu_or_skip!("attention_f32_gpu");
    check_all::<f32>(Runner::Gpu(&dev), "gpu", 21);
}

#[test]
fn attention_bf16_gpu() {
    let dev = gpu_or_skip!("attention_bf16_gpu");
    check_all::<bf16>(Runner::Gpu(&dev), "gpu", 22);
}

/// The fused backward writes each element from one thread in a fixed order: two runs agree bit
/// for bit (atomics would not).
#[test]
fn attention_backward_is_deterministic_gpu() {
    let dev = gpu_or_skip!("attention_backward_is_deterministic_gpu");
    let case = Case::packed("determinism", (8, 2, 128), CAUSAL, &[(100, 100), (37, 37)]);
    let mut rng = Rng::new(23);
    let x = Inputs::random(&case, &mut rng);
    let (out, lse) = reference_forward(&case, &x);
    let (q, k, v, dout, out) = (to_bf16(&x.q), to_bf16(&x.k), to_bf16(&x.v), to_bf16(&x.dout), to_bf16(&out));
    let first = run_backward(Runner::Gpu(&dev), AttentionVariant::Fused, &case, &dout, &q, &k, &v, &out, &lse);
    let second = run_backward(Runner::Gpu(&dev), AttentionVariant::Fused, &case, &dout, &q, &k, &v, &out, &lse);
    for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(first.iter().zip(&second)) {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs between two identical runs");
    }
}

// ---- plans: checks and grids, no kernel needed ----

#[test]
fn attention_variant_names() {
    for &v in AttentionVariant::ALL {
        assert_eq!(AttentionVariant::from_name(v.name()).ok(), Some(v));
        assert_eq!(v.name().parse::<AttentionVariant>().ok(), Some(v));
    }
    let err = AttentionVariant::from_name("flash").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("'flash'") && err.contains("naive") && err.contains("fused"), "{err}");
}

fn forward_lens(case: &Case) -> ForwardLens {
    let (q, kv) = (case.q_elems(), case.kv_elems());
    ForwardLens { out: q, lse: case.nq * case.n_heads, q, k: kv, v: kv }
}

fn backward_lens(case: &Case) -> BackwardLens {
    let (q, kv, rows) = (case.q_elems(), case.kv_elems(), case.nq * case.n_heads);
    BackwardLens { dq: q, dk: kv, dv: kv, delta: rows, dout: q, q, k: kv, v: kv, out: q, lse: rows }
}

#[test]
fn attention_plan_tiles_cover_every_row_once() {
    let case = Case::packed("tiles", (9, 3, 64), CAUSAL, &[(1, 1), (13, 13), (0, 4), (21, 21)]);
    let fwd = plan_forward(AttentionVariant::Fused, DType::F32, &forward_lens(&case), &case.seqs, &case.shape())
        .expect("valid case");
    let launch = fwd.launch.expect("some query rows");
    // Fused forward tiles are 16 query rows; the empty sequence 2 has none.
    assert_eq!(launch.tiles, vec![0, 0, 1, 0, 3, 0, 3, 16]);
    assert_eq!(launch.config.grid_dim, (4, 9, 1));
    assert_eq!(fwd.seqs, vec![0, 1, 0, 1, 1, 13, 1, 13, 14, 0, 14, 4, 14, 21, 18, 21]);
    let bwd = plan_backward(AttentionVariant::Fused, DType::Bf16, &backward_lens(&case), &case.seqs, &case.shape())
        .expect("valid case");
    let (dq, dkdv) = (bwd.dq.expect("dq launch"), bwd.dkdv.expect("dkdv launch"));
    // Backward tiles are 8 rows: dq over queries (heads along y), dk/dv over keys (kv heads).
    assert_eq!(dq.tiles, vec![0, 0, 1, 0, 1, 8, 3, 0, 3, 8, 3, 16]);
    assert_eq!(dq.config.grid_dim, (6, 9, 1));
    assert_eq!(dkdv.tiles, vec![0, 0, 1, 0, 1, 8, 2, 0, 3, 0, 3, 8, 3, 16]);
    assert_eq!(dkdv.config.grid_dim, (7, 3, 1));
    assert!(!bwd.zero_dq && !bwd.zero_dkdv, "every row is covered");
    assert_eq!(bwd.delta_rows as usize, case.nq * 9);
    // A window reaching every key is no window.
    let mut wide = case.shape();
    wide.mask = AttnMask::Causal { window: Some(21) };
    let plan = plan_forward(AttentionVariant::Naive, DType::F32, &forward_lens(&case), &case.seqs, &wide).unwrap();
    assert_eq!((plan.args.causal, plan.args.window), (1, 0));
    wide.mask = AttnMask::Causal { window: Some(20) };
    let plan = plan_forward(AttentionVariant::Naive, DType::F32, &forward_lens(&case), &case.seqs, &wide).unwrap();
    assert_eq!((plan.args.causal, plan.args.window), (1, 20));
}

#[test]
fn attention_plan_rejects_bad_calls() {
    let case = Case::packed("checks", (4, 2, 64), CAUSAL, &[(3, 3), (5, 5)]);
    let v = AttentionVariant::Fused;
    let fwd = |lens: &ForwardLens, seqs: &[AttnSeq], shape: &AttnShape| plan_forward(v, DType::F32, lens, seqs, shape);
    let bwd =
        |lens: &BackwardLens, seqs: &[AttnSeq], shape: &AttnShape| plan_backward(v, DType::F32, lens, seqs, shape);
    let expect = |res: Result<(), CudaError>, op: &str, needle: &str| match res {
        Err(e @ CudaError::Shape { .. }) => {
            let text = e.to_string();
            assert!(text.starts_with(op) && text.contains(needle), "expected {op}: ...{needle}..., got: {text}");
        }
        other => panic!("expected a shape error mentioning {needle:?}, got {other:?}"),
    };
    let (lens, blens, seqs, shape) = (forward_lens(&case), backward_lens(&case), case.seqs.clone(), case.shape());
    assert!(fwd(&lens, &seqs, &shape).is_ok() && bwd(&blens, &seqs, &shape).is_ok());
    let with = |f: &dyn Fn(&mut AttnShape)| {
        let mut s = shape;
        f(&mut s);
        s
    };
    let f = |l: ForwardLens, s: &[AttnSeq], sh: AttnShape| fwd(&l, s, &sh).map(|_| ());
    let b = |l: BackwardLens, s: &[AttnSeq], sh: AttnShape| bwd(&l, s, &sh).map(|_| ());
    let fw = "attention_forward";
    let bw = "attention_backward";

    expect(f(lens, &seqs, with(&|s| s.head_dim = MAX_HEAD_DIM + 1)), fw, "head_dim 257");
    expect(f(lens, &seqs, with(&|s| s.n_kv_heads = 3)), fw, "not a multiple of n_kv_heads");
    expect(f(lens, &seqs, with(&|s| s.n_heads = 0)), fw, "must be nonzero");
    expect(f(lens, &seqs, with(&|s| s.scale = f32::NAN)), fw, "scale NaN");
    expect(f(lens, &seqs, with(&|s| s.mask = AttnMask::Causal { window: Some(0) })), fw, "window of 0");
    expect(f(ForwardLens { q: lens.q - 1, ..lens }, &seqs, shape), fw, "not a multiple of n_heads");
    expect(f(ForwardLens { out: lens.out - 64, ..lens }, &seqs, shape), fw, "out has");
    expect(f(ForwardLens { v: lens.v + 128, ..lens }, &seqs, shape), fw, "v has");
    expect(f(ForwardLens { lse: lens.lse + 1, ..lens }, &seqs, shape), fw, "lse has");
    let past = [seqs[0], AttnSeq { q_start: 3, q_len: 6, k_start: 3, k_len: 6 }];
    expect(f(lens, &past, shape), fw, "reaches past");
    let more_q = [AttnSeq { q_start: 0, q_len: 4, k_start: 0, k_len: 3 }];
    expect(f(lens, &more_q, shape), fw, "more queries than keys");
    let overlap_q = [seqs[0], AttnSeq { q_start: 2, q_len: 3, k_start: 3, k_len: 5 }];
    expect(f(lens, &overlap_q, shape), fw, "overlaps the query rows of seqs[0]");
    // Shared keys are fine forward (read only) but not backward (one writer per dk/dv row).
    let shared_k = [seqs[0], AttnSeq { q_start: 3, q_len: 3, k_start: 0, k_len: 3 }];
    assert!(f(lens, &shared_k, shape).is_ok());
    expect(b(blens, &shared_k, shape), bw, "overlaps the key rows of seqs[0]");
    expect(b(BackwardLens { dq: blens.dq + 1, ..blens }, &seqs, shape), bw, "dq has");
    expect(b(BackwardLens { dk: blens.dk - 1, ..blens }, &seqs, shape), bw, "dk has");
    expect(b(BackwardLens { dv: 0, ..blens }, &seqs, shape), bw, "dv has");
    expect(b(BackwardLens { dout: blens.dout * 2, ..blens }, &seqs, shape), bw, "dout has");
    expect(b(BackwardLens { out: 1, ..blens }, &seqs, shape), bw, "out has");
    expect(b(BackwardLens { delta: blens.delta - 1, ..blens }, &seqs, shape), bw, "delta has");
    expect(b(BackwardLens { lse: 0, ..blens }, &seqs, shape), bw, "lse has");
}
