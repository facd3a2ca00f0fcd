//! Helpers shared by integration tests: comparison against a reference ([`assert_close`], NaN
//! fails), deterministic random inputs ([`Rng`]), and skipping GPU tests on machines without one
//! ([`gpu_or_skip!`]).
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;

/// Checks `|got - want| <= atol + rtol * |want|` element-wise. A non-finite `got` fails unless
/// `want` is the same non-finite value (NaN never equals anything: an unwritten output that
/// started as NaN fails). Panics naming `what` and the worst element; on success prints the worst
/// element's absolute and relative error (shown with `--nocapture`).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: got {} elements, expected {}", got.len(), want.len());
    let mut worst: Option<(usize, f64)> = None; // (index, err / allowed)
    let mut bad = 0usize;
    let mut first_bad = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ratio = if g.is_nan() || w.is_nan() {
            f64::INFINITY
        } else if g.is_infinite() || w.is_infinite() {
            if g == w {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (g as f64 - w as f64).abs() / (atol as f64 + rtol as f64 * (w as f64).abs())
        };
        if ratio > 1.0 {
            bad += 1;
            first_bad.get_or_insert(i);
        }
        if worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    let Some((i, _)) = worst else {
        return; // empty
    };
    let (g, w) = (got[i], want[i]);
    let abs = (g as f64 - w as f64).abs();
    let rel = abs / (w as f64).abs().max(f64::MIN_POSITIVE);
    let nans = got.iter().filter(|v| v.is_nan()).count();
    let summary = format!(
        "{what}: worst element [{i}] got {g:e}, want {w:e}: |Δ| = {abs:.3e}, rel {rel:.3e} (atol {atol:e}, rtol {rtol:e}); {} elements",
        got.len()
    );
    if bad > 0 {
        panic!("{summary}\n  {bad} outside tolerance (first at [{}]), {nans} NaN in got", first_bad.unwrap_or(i));
    }
    println!("ok {summary}");
}

/// SplitMix64: small, seedable, identical on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Prints `skipped <test>: <reason>` to the real stderr (not the test harness's captured output,
/// so it shows in a plain `cargo test`).
pub fn print_skip(test: &str, reason: &str) {
    // One write of the whole line, so parallel tests do not interleave mid-line.
    let line = format!("skipped {test}: {reason}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `let dev = gpu_or_skip!("name");` (with `#[macro_use] mod common;`) opens CUDA device 0, or prints why there is none and returns
/// from the test (which passes). A GPU that is present but cannot be opened fails the test.
#[allow(unused_macros)]
macro_rules! gpu_or_skip {
    ($test:expr) => {{
        if let Some(reason) = sppo::backend::cuda::probe().unavailable_reason() {
            $crate::common::print_skip($test, &reason);
            return;
        }
        match sppo::backend::cuda::CudaDevice::new(0) {
            Ok(dev) => dev,
            Err(e) => panic!("{}: a GPU was found but cannot be opened: {e}", $test),
        }
    }};
}

/// Relative error of whole tensors, ‖got − want‖ / ‖want‖ in f64; panics on a non-finite value.
pub fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length {} vs {}", got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "element {i} is {g} (want {w})");
        num += ((g - w) as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped SmolLM2 GGUF, or None with a printed reason.
pub fn smollm2_gguf() -> Option<std::path::PathBuf> {
    let p = repo_root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        print_skip("smollm2", &format!("{} is missing (run scripts/setup)", p.display()));
        None
    }
}
