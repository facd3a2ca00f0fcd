//! `kernels/optimizer.cu` against `CpuBackend`'s `grad_norm_sq`, `scale`, `adamw_step` and
//! `rmsprop_step` (src/backend/cpu/optim.rs): several steps with weight decay on and off, lengths
//! that are not multiples of the 256-thread block or of the grid, grids that stride several times
//! over the buffer, f32 parameters and bf16 parameters with f32 master weights. Both sides round
//! every f32 op the same way, so parameters and states must agree BITWISE (a NaN never does); the
//! norm² (f64 sums in another order) within 1e-12 relative on 1M elements.
//!
//! Each case runs through the host-compiled kernels on CPU threads with a small grid cap (each
//! block costs 256 OS threads there) and, when `probe()` finds a GPU, through the launchers (grid
//! capped at `DEVICE_MAX_BLOCKS`); else the GPU tests print why they skip.

#[macro_use]
mod common;

use common::Rng;
use half::bf16;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::error::CudaError;
use sppo::backend::cuda::host::{ffi, grid_args};
use sppo::backend::cuda::ops::optimizer::{
    self, adamw_kernel, finish_config, flat_config, rmsprop_kernel, scale_factor, AdamWScalars,
    ParamStorage, RmspropScalars, DEVICE_MAX_BLOCKS,
};
use sppo::backend::cuda::CudaDevice;
use sppo::backend::{AdamWConfig, Backend, RmspropConfig};

/// Where the kernels run: the host harness with a grid cap, or the GPU through the launchers.
#[derive(Clone, Copy)]
enum Runner<'a> {
    Host { max_blocks: usize },
    Gpu(&'a CudaDevice),
}

fn ok(rc: i32, kernel: &str) {
    assert_eq!(rc, 0, "host launch of {kernel} failed");
}

fn fail(e: CudaError) -> ! {
    panic!("{e}")
}

impl Runner<'_> {
    fn name(&self) -> String {
        match self {
            Runner::Host { max_blocks } => format!("host, grid <= {max_blocks}"),
            Runner::Gpu(_) => "gpu".to_string(),
        }
    }

    fn grad_norm_sq(&self, grads: &[f32]) -> f64 {
        match *self {
            Runner::Host { max_blocks } => {
                let cfg = flat_config("grad_norm_sq", grads.len(), max_blocks)
                    .unwrap_or_else(|e| fail(e));
                let blocks = cfg.grid_dim.0 as usize;
                let mut partials = vec![f64::NAN; blocks];
                let mut out = [f64::NAN];
                let (gx, gy, gz, bx, by, bz) = grid_args(&cfg);
                // SAFETY: optimizer_norm_partials_f32(double* partials, const float* grads, size_t n):
                // one partial per block of the grid.
                let rc = unsafe {
                    ffi::optimizer_norm_partials_f32_host(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        partials.as_mut_ptr(),
                        grads.as_ptr(),
                        grads.len(),
                    )
                };
                ok(rc, "optimizer_norm_partials_f32");
                let (gx, gy, gz, bx, by, bz) = grid_args(&finish_config());
                // SAFETY: optimizer_norm_finish(double* out, const double* partials, int n_partials).
                let rc = unsafe {
                    ffi::optimizer_norm_finish_host(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        out.as_mut_ptr(),
                        partials.as_ptr(),
                        blocks as i32,
                    )
                };
                ok(rc, "optimizer_norm_finish");
                out[0]
            }
            Runner::Gpu(dev) => {
                let d = dev.upload(grads).unwrap_or_else(|e| fail(e));
                optimizer::grad_norm_sq(dev, &d.as_view()).unwrap_or_else(|e| fail(e))
            }
        }
    }

    fn scale(&self, buf: &mut Vec<f32>, factor: f64) {
        match *self {
            Runner::Host { max_blocks } => {
                let f = scale_factor(factor).unwrap_or_else(|e| fail(e));
                let (gx, gy, gz, bx, by, bz) = grid_args(
                    &flat_config("scale", buf.len(), max_blocks).unwrap_or_else(|e| fail(e)),
                );
                // SAFETY: optimizer_scale_f32(float* buf, size_t n, float factor).
                let rc = unsafe {
                    ffi::optimizer_scale_f32_host(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        buf.as_mut_ptr(),
                        buf.len(),
                        f,
                    )
                };
                ok(rc, "optimizer_scale_f32");
            }
            Runner::Gpu(dev) => {
                let mut d = dev.upload(buf).unwrap_or_else(|e| fail(e));
                optimizer::scale(dev, &mut d.as_view_mut(), factor).unwrap_or_else(|e| fail(e));
                *buf = dev.download(&d).unwrap_or_else(|e| fail(e));
            }
        }
    }

    /// One AdamW step; `params` is `State::F32` or `State::Bf16Master`.
    fn adamw(&self, st: &mut State, grads: &[f32], step: u64, lr: f64, hp: &AdamWConfig) {
        let n = grads.len();
        match *self {
            Runner::Host { max_blocks } => {
                let s = AdamWScalars::new(step, lr, hp).unwrap_or_else(|e| fail(e));
                let (gx, gy, gz, bx, by, bz) = grid_args(
                    &flat_config("adamw_step", n, max_blocks).unwrap_or_else(|e| fail(e)),
                );
                let rc = match &mut st.bf16 {
                    // SAFETY: optimizer_adamw_f32(float* params, const float* grads, float* m,
                    // float* v, size_t n, 8 scalars); every buffer holds n elements.
                    None => unsafe {
                        ffi::optimizer_adamw_f32_host(
                            gx,
                            gy,
                            gz,
                            bx,
                            by,
                            bz,
                            st.master.as_mut_ptr(),
                            grads.as_ptr(),
                            st.s1.as_mut_ptr(),
                            st.s2.as_mut_ptr(),
                            n,
                            s.decay,
                            s.apply_decay,
                            s.w1,
                            s.b2,
                            s.one_minus_b2,
                            s.bc2_sqrt,
                            s.eps,
                            s.neg_step_size,
                        )
                    },
                    // SAFETY: optimizer_adamw_bf16_master(bf16* params, float* master, ...), as above.
                    Some(p) => unsafe {
                        ffi::optimizer_adamw_bf16_master_host(
                            gx,
                            gy,
                            gz,
                            bx,
                            by,
                            bz,
                            p.as_mut_ptr(),
                            st.master.as_mut_ptr(),
                            grads.as_ptr(),
                            st.s1.as_mut_ptr(),
                            st.s2.as_mut_ptr(),
                            n,
                            s.decay,
                            s.apply_decay,
                            s.w1,
                            s.b2,
                            s.one_minus_b2,
                            s.bc2_sqrt,
                            s.eps,
                            s.neg_step_size,
                        )
                    },
                };
                ok(rc, adamw_kernel(st.storage()));
            }
            Runner::Gpu(dev) => {
                let up = |v: &[f32]| dev.upload(v).unwrap_or_else(|e| fail(e));
                let (mut master, d_grads, mut m, mut v) =
                    (up(&st.master), up(grads), up(&st.s1), up(&st.s2));
                match &mut st.bf16 {
                    None => optimizer::adamw_step(
                        dev,
                        &mut master.as_view_mut(),
                        &d_grads.as_view(),
                        &mut m.as_view_mut(),
                        &mut v.as_view_mut(),
                        step,
                        lr,
                        hp,
                    )
                    .unwrap_or_else(|e| fail(e)),
                    Some(p) => {
                        let mut d_p = dev.upload(p).unwrap_or_else(|e| fail(e));
                        optimizer::adamw_step_bf16_master(
                            dev,
                            &mut d_p.as_view_mut(),
                            &mut master.as_view_mut(),
                            &d_grads.as_view(),
                            &mut m.as_view_mut(),
                            &mut v.as_view_mut(),
                            step,
                            lr,
                            hp,
                        )
                        .unwrap_or_else(|e| fail(e));
                        *p = dev.download(&d_p).unwrap_or_else(|e| fail(e));
                    }
                }
                st.master = dev.download(&master).unwrap_or_else(|e| fail(e));
                st.s1 = dev.download(&m).unwrap_or_else(|e| fail(e));
                st.s2 = dev.download(&v).unwrap_or_else(|e| fail(e));
            }
        }
    }

    fn rmsprop(&self, st: &mut State, grads: &[f32], lr: f64, hp: &RmspropConfig) {
        let n = grads.len();
        match *self {
            Runner::Host { max_blocks } => {
                let s = RmspropScalars::new(lr, hp).unwrap_or_else(|e| fail(e));
                let (gx, gy, gz, bx, by, bz) = grid_args(
                    &flat_config("rmsprop_step", n, max_blocks).unwrap_or_else(|e| fail(e)),
                );
                let rc = match &mut st.bf16 {
                    // SAFETY: optimizer_rmsprop_f32(float* params, const float* grads,
                    // float* square_avg, size_t n, 6 scalars); every buffer holds n elements.
                    None => unsafe {
                        ffi::optimizer_rmsprop_f32_host(
                            gx,
                            gy,
                            gz,
                            bx,
                            by,
                            bz,
                            st.master.as_mut_ptr(),
                            grads.as_ptr(),
                            st.s1.as_mut_ptr(),
                            n,
                            s.wd,
                            s.apply_decay,
                            s.alpha,
                            s.one_minus_alpha,
                            s.eps,
                            s.neg_lr,
                        )
                    },
                    // SAFETY: optimizer_rmsprop_bf16_master(bf16* params, float* master, ...).
                    Some(p) => unsafe {
                        ffi::optimizer_rmsprop_bf16_master_host(
                            gx,
                            gy,
                            gz,
                            bx,
                            by,
                            bz,
                            p.as_mut_ptr(),
                            st.master.as_mut_ptr(),
                            grads.as_ptr(),
                            st.s1.as_mut_ptr(),
                            n,
                            s.wd,
                            s.apply_decay,
                            s.alpha,
                            s.one_minus_alpha,
                            s.eps,
                            s.neg_lr,
                        )
                    },
                };
                ok(rc, rmsprop_kernel(st.storage()));
            }
            Runner::Gpu(dev) => {
                let up = |v: &[f32]| dev.upload(v).unwrap_or_else(|e| fail(e));
                let (mut master, d_grads, mut sq) = (up(&st.master), up(grads), up(&st.s1));
                match &mut st.bf16 {
                    None => optimizer::rmsprop_step(
                        dev,
                        &mut master.as_view_mut(),
                        &d_grads.as_view(),
                        &mut sq.as_view_mut(),
                        lr,
                        hp,
                    )
                    .unwrap_or_else(|e| fail(e)),
                    Some(p) => {
                        let mut d_p = dev.upload(p).unwrap_or_else(|e| fail(e));
                        optimizer::rmsprop_step_bf16_master(
                            dev,
                            &mut d_p.as_view_mut(),
                            &mut master.as_view_mut(),
                            &d_grads.as_view(),
                            &mut sq.as_view_mut(),
                            lr,
                            hp,
                        )
                        .unwrap_or_else(|e| fail(e));
                        *p = dev.download(&d_p).unwrap_or_else(|e| fail(e));
                    }
                }
                st.master = dev.download(&master).unwrap_or_else(|e| fail(e));
                st.s1 = dev.download(&sq).unwrap_or_else(|e| fail(e));
            }
        }
    }

    fn round_bf16(&self, params: &mut Vec<bf16>, master: &[f32]) {
        match *self {
            Runner::Host { max_blocks } => {
                let (gx, gy, gz, bx, by, bz) = grid_args(
                    &flat_config("round_bf16", master.len(), max_blocks)
                        .unwrap_or_else(|e| fail(e)),
                );
                // SAFETY: optimizer_round_bf16(bf16* params, const float* master, size_t n).
                let rc = unsafe {
                    ffi::optimizer_round_bf16_host(
                        gx,
                        gy,
                        gz,
                        bx,
                        by,
                        bz,
                        params.as_mut_ptr(),
                        master.as_ptr(),
                        master.len(),
                    )
                };
                ok(rc, "optimizer_round_bf16");
            }
            Runner::Gpu(dev) => {
                let mut d_p = dev.upload(params).unwrap_or_else(|e| fail(e));
                let d_m = dev.upload(master).unwrap_or_else(|e| fail(e));
                optimizer::round_bf16(dev, &mut d_p.as_view_mut(), &d_m.as_view())
                    .unwrap_or_else(|e| fail(e));
                *params = dev.download(&d_p).unwrap_or_else(|e| fail(e));
            }
        }
    }
}

/// The kernel side's buffers: f32 parameters (or master weights when `bf16` holds the bf16
/// parameters) and up to two states (AdamW m, v; RMSprop square_avg in s1).
struct State {
    master: Vec<f32>,
    bf16: Option<Vec<bf16>>,
    s1: Vec<f32>,
    s2: Vec<f32>,
}

impl State {
    fn storage(&self) -> ParamStorage {
        if self.bf16.is_some() {
            ParamStorage::Bf16Master
        } else {
            ParamStorage::F32
        }
    }
}

/// Bitwise equality; the first differing element (or a NaN) fails, naming `what`.
fn assert_bitwise(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            !g.is_nan() && g.to_bits() == w.to_bits(),
            "{what}: element [{i}] of {}: got {g:e} ({:#010x}), want {w:e} ({:#010x})",
            got.len(),
            g.to_bits(),
            w.to_bits()
        );
    }
}

fn assert_bf16_of(what: &str, params: &[bf16], master: &[f32]) {
    assert_eq!(params.len(), master.len(), "{what}: length");
    for (i, (p, m)) in params.iter().zip(master).enumerate() {
        let want = bf16::from_f32(*m);
        assert!(
            !p.is_nan() && p.to_bits() == want.to_bits(),
            "{what}: bf16 param [{i}] = {p} is not the rounding of master {m:e} ({want})"
        );
    }
}

/// Gradients of mixed magnitudes (tiny, ordinary, large), signs and a few exact zeros.
fn grads(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 7 {
            0 => 0.0,
            1 => rng.uniform(-1e-6, 1e-6),
            2 => rng.uniform(-30.0, 30.0),
            _ => rng.uniform(-0.1, 0.1),
        })
        .collect()
}

/// Element counts: below one block, just past a block, many blocks and grid strides.
const LENGTHS: &[usize] = &[1, 200, 257, 4099];
const STEPS: u64 = 4;

fn check_adamw(runner: Runner, storage: ParamStorage, seed: u64) {
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    let mut rng = Rng::new(seed);
    for &n in LENGTHS {
        for weight_decay in [0.0, 0.1] {
            let hp = AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
            };
            let start = rng.vec(n, -1.0, 1.0);
            let (mut p_ref, mut m_ref, mut v_ref) =
                (start.clone(), vec![0.0f32; n], vec![0.0f32; n]);
            let mut st = State {
                master: start.clone(),
                bf16: None,
                s1: vec![0.0; n],
                s2: vec![0.0; n],
            };
            if storage == ParamStorage::Bf16Master {
                let mut p = vec![bf16::NAN; n];
                runner.round_bf16(&mut p, &st.master);
                assert_bf16_of(
                    &format!("round_bf16 n={n} [{}]", runner.name()),
                    &p,
                    &st.master,
                );
                st.bf16 = Some(p);
            }
            for step in 1..=STEPS {
                let g = grads(&mut rng, n);
                let lr = 5e-4 / step as f64; // a changing lr, as a schedule gives
                cpu.adamw_step(&mut p_ref, &g, &mut m_ref, &mut v_ref, step, lr, &hp)
                    .expect("cpu adamw");
                runner.adamw(&mut st, &g, step, lr, &hp);
                let tag = format!(
                    "adamw {} n={n} wd={weight_decay} step {step} [{}]",
                    storage.name(),
                    runner.name()
                );
                assert_bitwise(&format!("{tag} params"), &st.master, &p_ref);
                assert_bitwise(&format!("{tag} m"), &st.s1, &m_ref);
                assert_bitwise(&format!("{tag} v"), &st.s2, &v_ref);
                if let Some(p) = &st.bf16 {
                    assert_bf16_of(&tag, p, &st.master);
                }
            }
        }
    }
}

fn check_rmsprop(runner: Runner, storage: ParamStorage, seed: u64) {
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    let mut rng = Rng::new(seed);
    for &n in LENGTHS {
        for weight_decay in [0.0, 0.05] {
            let hp = RmspropConfig {
                alpha: 0.99,
                eps: 1e-8,
                weight_decay,
            };
            let start = rng.vec(n, -1.0, 1.0);
            let (mut p_ref, mut sq_ref) = (start.clone(), vec![0.0f32; n]);
            let mut st = State {
                master: start.clone(),
                bf16: None,
                s1: vec![0.0; n],
                s2: Vec::new(),
            };
            if storage == ParamStorage::Bf16Master {
                let mut p = vec![bf16::NAN; n];
                runner.round_bf16(&mut p, &st.master);
                st.bf16 = Some(p);
            }
            for step in 1..=STEPS {
                let g = grads(&mut rng, n);
                let lr = 1e-3 * step as f64;
                cpu.rmsprop_step(&mut p_ref, &g, &mut sq_ref, lr, &hp)
                    .expect("cpu rmsprop");
                runner.rmsprop(&mut st, &g, lr, &hp);
                let tag = format!(
                    "rmsprop {} n={n} wd={weight_decay} step {step} [{}]",
                    storage.name(),
                    runner.name()
                );
                assert_bitwise(&format!("{tag} params"), &st.master, &p_ref);
                assert_bitwise(&format!("{tag} square_avg"), &st.s1, &sq_ref);
                if let Some(p) = &st.bf16 {
                    assert_bf16_of(&tag, p, &st.master);
                }
            }
        }
    }
}

/// Norm² (1M + 3 elements, like a 28M-element model scaled down; also tiny and uneven lengths)
/// and scale against the CPU; the same grid gives the same bits twice.
fn check_norm_and_scale(runner: Runner, seed: u64) {
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    let mut rng = Rng::new(seed);
    for n in [0usize, 1, 300, 1_000_003] {
        let g = grads(&mut rng, n);
        let want = cpu.grad_norm_sq(&g).expect("cpu norm");
        let got = runner.grad_norm_sq(&g);
        let rel = (got - want).abs() / want.max(f64::MIN_POSITIVE);
        assert!(
            got.is_finite() && (got == want || rel <= 1e-12),
            "grad_norm_sq n={n} [{}]: got {got:e}, want {want:e} (rel {rel:e})",
            runner.name()
        );
        println!("ok grad_norm_sq n={n} [{}]: rel {rel:e}", runner.name());
        if n == 1_000_003 {
            assert_eq!(
                runner.grad_norm_sq(&g).to_bits(),
                got.to_bits(),
                "grad_norm_sq is not deterministic"
            );
            // A non-finite element makes the result non-finite (the caller checks).
            let mut bad = g.clone();
            bad[n / 2] = f32::INFINITY;
            assert!(
                !runner.grad_norm_sq(&bad).is_finite(),
                "an Inf gradient gave a finite norm"
            );
        }
    }
    for n in [1usize, 1000, 4099] {
        let start = grads(&mut rng, n);
        for factor in [0.37, 1.0 / 3.0, 1e-7] {
            let (mut want, mut got) = (start.clone(), start.clone());
            cpu.scale(&mut want, factor).expect("cpu scale");
            runner.scale(&mut got, factor);
            assert_bitwise(
                &format!("scale n={n} by {factor} [{}]", runner.name()),
                &got,
                &want,
            );
        }
    }
}

const HOST: Runner<'static> = Runner::Host { max_blocks: 4 };

#[test]
fn optimizer_adamw_host() {
    check_adamw(HOST, ParamStorage::F32, 71);
    check_adamw(HOST, ParamStorage::Bf16Master, 72);
}

#[test]
fn optimizer_rmsprop_host() {
    check_rmsprop(HOST, ParamStorage::F32, 73);
    check_rmsprop(HOST, ParamStorage::Bf16Master, 74);
}

#[test]
fn optimizer_norm_and_scale_host() {
    check_norm_and_scale(Runner::Host { max_blocks: 16 }, 75);
}

#[test]
fn optimizer_adamw_gpu() {
    let dev = gpu_or_skip!("optimizer_adamw_gpu");
    check_adamw(Runner::Gpu(&dev), ParamStorage::F32, 71);
    check_adamw(Runner::Gpu(&dev), ParamStorage::Bf16Master, 72);
}

#[test]
fn optimizer_rmsprop_gpu() {
    let dev = gpu_or_skip!("optimizer_rmsprop_gpu");
    check_rmsprop(Runner::Gpu(&dev), ParamStorage::F32, 73);
    check_rmsprop(Runner::Gpu(&dev), ParamStorage::Bf16Master, 74);
}

#[test]
fn optimizer_norm_and_scale_gpu() {
    let dev = gpu_or_skip!("optimizer_norm_and_scale_gpu");
    check_norm_and_scale(Runner::Gpu(&dev), 75);
}

#[test]
fn optimizer_plans_and_settings() {
    // Grids: ceil(n / 256) blocks, at least 1, capped.
    let blocks = |n: usize, cap: usize| flat_config("t", n, cap).expect("valid").grid_dim.0;
    assert_eq!(
        (
            blocks(0, 8),
            blocks(256, 8),
            blocks(257, 8),
            blocks(1 << 20, 8)
        ),
        (1, 1, 2, 8)
    );
    assert_eq!(
        blocks(28_000_000, DEVICE_MAX_BLOCKS),
        DEVICE_MAX_BLOCKS as u32
    );
    assert!(flat_config("t", 10, 0).is_err());
    let expect = |r: Result<(), CudaError>, needle: &str| match r {
        Err(e) => assert!(e.to_string().contains(needle), "{needle:?} not in: {e}"),
        Ok(()) => panic!("expected an error mentioning {needle:?}"),
    };
    let hp = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    expect(AdamWScalars::new(0, 1e-3, &hp).map(drop), "1-based");
    expect(
        AdamWScalars::new(1, f64::NAN, &hp).map(drop),
        "adamw_step: lr = NaN is not finite",
    );
    expect(
        AdamWScalars::new(1, 1e-3, &AdamWConfig { beta1: 1.0, ..hp }).map(drop),
        "bias correction is 0",
    );
    let rp = RmspropConfig {
        alpha: 0.99,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    expect(
        RmspropScalars::new(
            1e-3,
            &RmspropConfig {
                eps: f64::INFINITY,
                ..rp
            },
        )
        .map(drop),
        "eps = inf",
    );
    expect(scale_factor(f64::NAN).map(drop), "scale: factor = NaN");
    expect(
        optimizer::check_lens("adamw_step", 10, &[("grads", 10), ("exp_avg (m)", 9)]),
        "exp_avg (m) has 9 elements",
    );
    assert_eq!(
        ParamStorage::from_name("bf16_master").expect("known"),
        ParamStorage::Bf16Master
    );
    expect(
        ParamStorage::from_name("bf16").map(drop),
        "choices: f32, bf16_master",
    );
    // The scalars are the CPU's: decay applied only with weight decay, each rounded once.
    let s = AdamWScalars::new(
        3,
        1e-3,
        &AdamWConfig {
            weight_decay: 0.01,
            ..hp
        },
    )
    .expect("valid");
    assert_eq!((s.apply_decay, s.decay), (1, (1.0 - 1e-3 * 0.01) as f32));
    assert_eq!(s.neg_step_size, (-(1e-3 / (1.0 - 0.9f64.powf(3.0)))) as f32);
    assert_eq!(
        AdamWScalars::new(3, 1e-3, &hp).expect("valid").apply_decay,
        0
    );
}
