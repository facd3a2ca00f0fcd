//! Shared test helpers.
#![allow(dead_code)]

use std::path::PathBuf;

/// Worst-element comparison: fails on any NaN/Inf in `got`, and when some element is off by more
/// than `atol + rtol·|want|`. Prints the worst element either way.
pub fn assert_close(name: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length {} vs {}", got.len(), want.len());
    let mut worst = (0usize, 0f32, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{name}: element {i} is {g} (want {w})");
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.1 || i == 0 {
            worst = (i, excess, (g - w).abs());
        }
    }
    let (i, excess, diff) = worst;
    assert!(excess <= 0.0, "{name}: element {i} got {} want {} (|Δ| {diff:.3e}, rtol {rtol}, atol {atol})", got[i], want[i]);
}

/// Relative error of whole tensors: ‖got − want‖ / ‖want‖ (f64), failing on NaN.
pub fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite value {g}");
        num += ((g - w) as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped SmolLM2 GGUF, or None with a printed reason.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = repo_root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} is missing (run scripts/setup)", p.display());
        None
    }
}
