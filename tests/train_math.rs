//! `sppo::train` against PyTorch and transformers (fixtures from `scripts/make_train_fixtures.py`,
//! torch/transformers versions recorded in each file):
//! - pair losses and their gradients vs torch autograd in f64, and vs central finite differences;
//!   `single_loss` summed over a pair equals the `sppo` pair loss; the a = b = 0 numerics note;
//! - 20 Trainer steps (clip → AdamW/RMSprop step → schedule step) vs torch, parameters compared
//!   after every step; `clip_grad_norm` vs `clip_grad_norm_`;
//! - lr schedules vs transformers' schedulers, including warm-up step counts;
//! - the gradient norm accumulates in f64 and does not depend on the thread count.

#[allow(unused_macros)] // gpu_or_skip: this binary has no GPU test
mod common;

use serde_json::Value;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::{AdamWConfig, Backend, RmspropConfig};
use sppo::train::loss::{batch_pair_loss, pair_loss, single_loss, LossType, PairInput, PairProbs};
use sppo::train::optim::{clip_grad_norm, Optimizer, OptimizerConfig};
use sppo::train::schedule::{Schedule, ScheduleKind, Warmup};

use common::{assert_close, Rng};

fn fixture(name: &str, format: &str) -> Value {
    let path = format!("{}/tests/fixtures/train/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (run scripts/make_train_fixtures.py)"));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(doc["format"], format, "{path}: wrong format");
    assert_eq!(doc["version"], 1, "{path}: unknown version");
    doc
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("fixture field {key} is not a number: {}", v[key]))
}

fn u(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("fixture field {key} is not an integer: {}", v[key])) as usize
}

fn f64s(v: &Value, key: &str) -> Vec<f64> {
    let arr = v[key].as_array().unwrap_or_else(|| panic!("fixture field {key} is not an array"));
    arr.iter().map(|x| x.as_f64().unwrap_or_else(|| panic!("{key}: {x} is not a number"))).collect()
}

/// A base64 string of little-endian f32 values.
fn f32s(v: &Value, key: &str) -> Vec<f32> {
    let s = v[key].as_str().unwrap_or_else(|| panic!("fixture field {key} is not a string"));
    let bytes = base64_decode(s).unwrap_or_else(|| panic!("{key}: bad base64"));
    assert_eq!(bytes.len() % 4, 0, "{key}: {} bytes is not a whole number of f32", bytes.len());
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Standard base64 (with `=` padding), as Python's `base64.b64encode` writes it; `None` on any
/// other character. Small enough not to need a dependency.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for quad in s.chunks_exact(4) {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        let mut acc = 0u32;
        for &c in &quad[..4 - pad] {
            acc = (acc << 6) | val(c)?;
        }
        acc <<= 6 * pad as u32;
        out.extend_from_slice(&acc.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

fn rel_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(f64::MIN_POSITIVE)
}

// ---------------------------------------------------------------- losses

#[test]
fn losses_match_torch_autograd() {
    let doc = fixture("losses.json", "sppo-train-losses");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 200, "only {} loss cases", cases.len());
    let (mut worst_loss, mut worst_grad) = (0.0f64, 0.0f64);
    for (i, c) in cases.iter().enumerate() {
        let kind: LossType = c["kind"].as_str().expect("kind").parse().expect("known loss type");
        let beta = f(c, "beta");
        let probs = PairProbs::new(f(c, "chosen_probs"), f(c, "chosen_probs_win"), f(c, "chosen_probs_lose")).expect("valid probs");
        let l = pair_loss(kind, beta, f(c, "policy_chosen"), f(c, "policy_rejected"), f(c, "ref_chosen"), f(c, "ref_rejected"), &probs);
        // Scale of the terms that cancel inside the loss: |a|, |b| and η. Both sides evaluate
        // the same f64 expressions, so only a few ulps of that scale may differ.
        let scale = l.chosen_logratio.abs() + l.rejected_logratio.abs() + 1.0 / beta;
        let tol = |want: f64, s: f64| 1e-12 * want.abs() + 1e-14 * s;
        let checks = [
            ("loss", l.loss, f(c, "loss"), scale * scale),
            ("d_policy_chosen", l.d_policy_chosen, f(c, "d_policy_chosen"), scale),
            ("d_policy_rejected", l.d_policy_rejected, f(c, "d_policy_rejected"), scale),
        ];
        for (what, got, want, s) in checks {
            assert!(got.is_finite(), "case {i} {kind} β={beta}: {what} = {got}");
            let err = (got - want).abs();
            assert!(err <= tol(want, s), "case {i} {kind} β={beta}: {what} = {got:e}, torch {want:e} (|Δ| {err:e})");
            let r = err / (want.abs() + 1e-14 * s);
            if what == "loss" {
                worst_loss = worst_loss.max(r);
            } else {
                worst_grad = worst_grad.max(r);
            }
        }
    }
    println!("losses vs torch autograd (f64): worst relative deviation loss {worst_loss:.2e}, gradients {worst_grad:.2e}");
}

#[test]
fn loss_gradients_match_finite_differences() {
    let mut rng = Rng::new(7);
    let mut worst = 0.0f64;
    for &kind in LossType::ALL {
        for &beta in &[0.001, 0.1, 1.0] {
            for _ in 0..20 {
                let (rc, rr) = (f64::from(rng.uniform(-300.0, -20.0)), f64::from(rng.uniform(-300.0, -20.0)));
                let (pc, pr) = (rc + f64::from(rng.uniform(-5.0, 5.0)), rr + f64::from(rng.uniform(-5.0, 5.0)));
                let probs =
                    PairProbs::new(f64::from(rng.uniform(0.0, 1.0)), f64::from(rng.uniform(0.0, 1.0)), f64::from(rng.uniform(0.0, 1.0)))
                        .expect("valid");
                let l = pair_loss(kind, beta, pc, pr, rc, rr, &probs);
                let h = 1e-3;
                let fd_c = (pair_loss(kind, beta, pc + h, pr, rc, rr, &probs).loss
                    - pair_loss(kind, beta, pc - h, pr, rc, rr, &probs).loss)
                    / (2.0 * h);
                let fd_r = (pair_loss(kind, beta, pc, pr + h, rc, rr, &probs).loss
                    - pair_loss(kind, beta, pc, pr - h, rc, rr, &probs).loss)
                    / (2.0 * h);
                // Central differences are exact for the quadratic losses up to the rounding of a
                // loss of size ~η² (η = 1000: 1e6 · 1e-16 / 1e-3 ≈ 1e-7); DPO's third derivative
                // is at most β³, so h² β³ / 6 ≤ 2e-7.
                let scale = 1.0 / beta + 1.0;
                for (what, an, fd) in [("chosen", l.d_policy_chosen, fd_c), ("rejected", l.d_policy_rejected, fd_r)] {
                    let err = (an - fd).abs();
                    assert!(err <= 1e-6 * scale, "{kind} β={beta}: d/d policy_{what} analytic {an:e}, finite difference {fd:e}");
                    worst = worst.max(err / scale);
                }
            }
        }
    }
    println!("analytic vs finite-difference gradients: worst |Δ| / (η + 1) = {worst:.2e}");
}

#[test]
fn single_losses_over_a_pair_sum_to_the_sppo_loss() {
    let mut rng = Rng::new(11);
    for _ in 0..200 {
        let beta = f64::from(rng.uniform(1e-3, 1.0));
        let (rc, rr) = (f64::from(rng.uniform(-500.0, -1.0)), f64::from(rng.uniform(-500.0, -1.0)));
        let (pc, pr) = (rc + f64::from(rng.uniform(-50.0, 50.0)), rr + f64::from(rng.uniform(-50.0, 50.0)));
        let (pw, pl) = (f64::from(rng.uniform(0.0, 1.0)), f64::from(rng.uniform(0.0, 1.0)));
        let probs = PairProbs::new(0.5, pw, pl).expect("valid");
        let pair = pair_loss(LossType::Sppo, beta, pc, pr, rc, rr, &probs);
        let (lw, dw) = single_loss(beta, pc, rc, pw);
        let (ll, dl) = single_loss(beta, pr, rr, pl);
        // The gradients are the same expressions; the loss differs by ½(x² + y²) vs ½x² + ½y².
        assert_eq!(dw, pair.d_policy_chosen);
        assert_eq!(dl, pair.d_policy_rejected);
        assert!(rel_err(lw + ll, pair.loss) <= 4.0 * f64::EPSILON, "single {} + {} vs pair {}", lw, ll, pair.loss);
    }
}

#[test]
fn sppo_loss_at_the_first_step_of_an_iteration() {
    // Policy == reference: a = b = 0, so loss = ½η²[(P_win − ½)² + (P_lose − ½)²].
    // η = 1/β = 1000, P_win 0.8, P_lose 0.3: ½ · 1e6 · (0.3² + (−0.2)²) = ½ · 1e6 · 0.13 = 65000
    // (SPPO.md's 6.5e4). Gradients a − η(P_win − ½) = −300 and b − η(P_lose − ½) = +200.
    let probs = PairProbs::new(0.7, 0.8, 0.3).expect("valid");
    let l = pair_loss(LossType::Sppo, 1e-3, -123.5, -87.25, -123.5, -87.25, &probs);
    assert!(rel_err(l.loss, 6.5e4) < 1e-12, "loss {}", l.loss);
    assert!(rel_err(l.d_policy_chosen, -300.0) < 1e-12, "{l:?}");
    assert!(rel_err(l.d_policy_rejected, 200.0) < 1e-12, "{l:?}");
    assert_eq!((l.chosen_logratio, l.rejected_logratio), (0.0, 0.0));

    // Batch reduction: the mean over the step's pairs; gradients of that mean.
    let pair = PairInput { policy_chosen: -123.5, policy_rejected: -87.25, ref_chosen: -123.5, ref_rejected: -87.25, probs };
    let other = PairInput { probs: PairProbs::new(0.7, 0.5, 0.5).expect("valid"), ..pair };
    let batch = batch_pair_loss(LossType::Sppo, 1e-3, &[pair, other], 2).expect("batch");
    assert!(rel_err(batch.loss, 6.5e4 / 2.0) < 1e-12, "{batch:?}");
    assert!(rel_err(batch.d_policy_chosen[0], -150.0) < 1e-12 && batch.d_policy_chosen[1] == 0.0, "{batch:?}");
    // Same pairs as half of a 4-pair step (two micro-batches): each gradient is a quarter.
    let half = batch_pair_loss(LossType::Sppo, 1e-3, &[pair, other], 4).expect("micro-batch");
    assert!(rel_err(half.d_policy_rejected[0], 50.0) < 1e-12, "{half:?}");
}

// ---------------------------------------------------------------- optimizers and clipping

fn optimizer_config(c: &Value) -> OptimizerConfig {
    match c["optimizer"].as_str().expect("optimizer") {
        "adamw" => OptimizerConfig::AdamW(AdamWConfig {
            beta1: f(c, "beta1"),
            beta2: f(c, "beta2"),
            eps: f(c, "eps"),
            weight_decay: f(c, "weight_decay"),
        }),
        "rmsprop" => OptimizerConfig::RmsProp(RmspropConfig { alpha: f(c, "alpha"), eps: f(c, "eps"), weight_decay: f(c, "weight_decay") }),
        other => panic!("fixture optimizer {other}"),
    }
}

/// transformers 5's `warmup_steps` setting: a count when >= 1, a ratio below.
fn warmup_of(c: &Value) -> Warmup {
    let w = f(c, "warmup");
    if w >= 1.0 {
        Warmup::Steps(w as usize)
    } else {
        Warmup::Ratio(w)
    }
}

#[test]
fn optimizer_trajectories_match_torch() {
    let doc = fixture("optim.json", "sppo-train-optim");
    let (n, steps) = (u(&doc, "n"), u(&doc, "steps"));
    let p0 = f32s(&doc, "params0");
    let grads = f32s(&doc, "grads");
    assert_eq!((p0.len(), grads.len()), (n, steps * n));
    let cases = doc["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 4);
    // 2 threads with small chunks would not exercise the parallel path at n = 1000; the
    // threaded path is the same kernel over chunks (covered by grad_norm_is_f64 below).
    let b = CpuBackend::new(Some(2)).expect("backend");
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let traj = f32s(c, "params");
        assert_eq!(traj.len(), steps * n, "{name}: trajectory size");
        let torch_norms = f64s(c, "grad_norms");
        let torch_lrs = f64s(c, "lrs");
        let kind: ScheduleKind = c["schedule"].as_str().expect("schedule").parse().expect("schedule kind");
        let sched = Schedule::new(kind, f(c, "lr"), steps, warmup_of(c)).expect("schedule");
        assert_eq!(sched.warmup_steps, u(c, "warmup_steps"), "{name}: warm-up steps");
        let max_norm = f(c, "max_grad_norm");

        let mut opt = Optimizer::new(&b, optimizer_config(c), n).expect("optimizer");
        let mut params = b.upload(&p0).expect("upload");
        let (mut worst_rel, mut worst_rel_all, mut worst_abs, mut worst_norm) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let mut clipped_steps = 0;
        for k in 0..steps {
            let mut g = b.upload(&grads[k * n..(k + 1) * n]).expect("upload");
            let norm = clip_grad_norm(&b, &mut g, max_norm).expect("clip");
            // torch's norm is an f32 tensor: a few ulps of f32 from our f64 sum.
            let rn = rel_err(norm, torch_norms[k]);
            assert!(rn < 1e-6, "{name} step {k}: grad norm {norm}, torch {}", torch_norms[k]);
            worst_norm = worst_norm.max(rn);
            if max_norm > 0.0 && norm > max_norm {
                clipped_steps += 1;
            }
            let lr = sched.lr_at(k);
            assert!(rel_err(lr, torch_lrs[k]) < 1e-14 || lr == torch_lrs[k], "{name} step {k}: lr {lr}, torch {}", torch_lrs[k]);
            opt.step(&b, &mut params, &g, lr).expect("step");
            let got = b.download(&params).expect("download");
            let want = &traj[k * n..(k + 1) * n];
            // Relative 1e-6 per element, with an absolute floor of 1e-6 × max |p| for the few
            // parameters that pass near zero (an ulp of the update there is a large relative error).
            let pmax = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert_close(&format!("{name} step {k} params"), &got, want, 1e-6 * pmax, 1e-6);
            for (&g, &w) in got.iter().zip(want) {
                let d = (f64::from(g) - f64::from(w)).abs();
                worst_abs = worst_abs.max(d);
                worst_rel_all = worst_rel_all.max(d / f64::from(w.abs()));
                if w.abs() > 1e-2 {
                    worst_rel = worst_rel.max(d / f64::from(w.abs()));
                }
            }
        }
        assert_eq!(opt.steps(), steps as u64);
        // The test has teeth only if the parameters moved far beyond the tolerance.
        let last = &traj[(steps - 1) * n..];
        let moved = last.iter().zip(&p0).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(moved > 1e-3, "{name}: parameters moved only {moved}");
        if max_norm > 0.0 {
            assert!(clipped_steps > 0 && clipped_steps < steps, "{name}: {clipped_steps} of {steps} steps clipped");
        }
        println!(
            "{name}: {steps} steps, max |Δp| {worst_abs:.2e}, max rel |Δp| {worst_rel_all:.2e} (over |p| > 1e-2: {worst_rel:.2e}), grad norm rel {worst_norm:.2e}, max move {moved:.3}, clipped {clipped_steps}"
        );
    }
}

#[test]
fn clipping_matches_clip_grad_norm() {
    let doc = fixture("optim.json", "sppo-train-optim");
    let b = CpuBackend::new(Some(2)).expect("backend");
    let cases = doc["clip"].as_array().expect("clip cases");
    let mut clipped = 0;
    for (i, c) in cases.iter().enumerate() {
        let mut g = b.upload(&f32s(c, "grads")).expect("upload");
        let want = f32s(c, "clipped");
        let max_norm = f(c, "max_norm");
        let norm = clip_grad_norm(&b, &mut g, max_norm).expect("clip");
        assert!(rel_err(norm, f(c, "norm")) < 1e-6, "case {i}: norm {norm}, torch {}", f(c, "norm"));
        assert_close(&format!("clip case {i} (max_norm {max_norm}, norm {norm:.3e})"), &g, &want, 0.0, 1e-6);
        if norm > max_norm {
            clipped += 1;
        }
    }
    assert!(clipped >= 2 && clipped < cases.len(), "{clipped} of {} cases clip", cases.len());
}

#[test]
fn grad_norm_is_f64_and_thread_independent() {
    // 2^23 values in [-1, 1), each a multiple of 2^-23 (how `Rng::uniform` builds them), so
    // x² = k·2^-46 with integer k and Σx² is summed EXACTLY in integers: the reference. (A plain
    // sequential f64 sum is itself ~1e-12 off at this length.) A sequential f32 sum of the
    // squares drifts by far more (SPPO.md measured 6% on a 28M-element embedding).
    let n = 1usize << 23;
    let mut rng = Rng::new(3);
    let g = rng.vec(n, -1.0, 1.0);
    let k_sum: u128 = g
        .iter()
        .map(|&x| {
            let k = f64::from(x) * (1u64 << 23) as f64;
            assert_eq!(k.fract(), 0.0, "{x} is not a multiple of 2^-23");
            let k = k.abs() as u128;
            k * k
        })
        .sum();
    let exact = k_sum as f64 / (1u64 << 46) as f64;
    let naive_f32: f32 = g.iter().map(|&x| x * x).sum();
    let naive_rel = rel_err(f64::from(naive_f32), exact);
    let one = CpuBackend::new(Some(1)).expect("backend");
    let two = CpuBackend::new(Some(2)).expect("backend");
    let s1 = one.grad_norm_sq(&g).expect("norm");
    let s2 = two.grad_norm_sq(&g).expect("norm");
    assert_eq!(s1.to_bits(), s2.to_bits(), "grad_norm_sq depends on the thread count: {s1} vs {s2}");
    assert!(rel_err(s1, exact) < 1e-12, "grad_norm_sq {s1}, f64 reference {exact}");
    assert!(naive_rel > 1e-3, "the naive f32 sum is only {naive_rel:e} off: this test would not catch an f32 accumulator");
    println!("Σg² over 2^23: f64 chunked rel {:.1e}, naive f32 rel {naive_rel:.1e}", rel_err(s1, exact));

    // scale: buf *= f32(factor), threaded path (n > the serial cutoff).
    let mut h = g.clone();
    two.scale(&mut h, 0.25).expect("scale");
    assert!(h.iter().zip(&g).all(|(a, b)| *a == b * 0.25));
    assert!(two.scale(&mut h, f64::NAN).is_err());
}

#[test]
fn threaded_optimizer_steps_equal_serial() {
    // Buffers above the serial cutoff take the rayon path; elementwise, so the result must be
    // bitwise the serial one (1 thread still chunks, 3 threads split the chunks).
    let n = 300_001;
    let mut rng = Rng::new(5);
    let p0 = rng.vec(n, -1.0, 1.0);
    let g = rng.vec(n, -0.1, 0.1);
    let run = |threads: usize| {
        let b = CpuBackend::new(Some(threads)).expect("backend");
        let mut out = Vec::new();
        for cfg in [
            OptimizerConfig::AdamW(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 }),
            OptimizerConfig::RmsProp(RmspropConfig { alpha: 0.99, eps: 1e-8, weight_decay: 0.01 }),
        ] {
            let mut opt = Optimizer::new(&b, cfg, n).expect("optimizer");
            let mut p = p0.clone();
            for _ in 0..3 {
                opt.step(&b, &mut p, &g, 1e-3).expect("step");
            }
            out.push(p);
        }
        out
    };
    let (serial, threaded) = (run(1), run(3));
    for (s, t) in serial.iter().zip(&threaded) {
        assert!(s.iter().zip(t).all(|(a, b)| a.to_bits() == b.to_bits()), "threaded optimizer step differs from serial");
        assert!(s.iter().zip(&p0).any(|(a, b)| a != b), "parameters did not move");
    }
}

// ---------------------------------------------------------------- schedules

#[test]
fn schedules_match_transformers() {
    let doc = fixture("schedules.json", "sppo-train-schedules");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30);
    let mut worst = 0.0f64;
    for c in cases {
        let kind: ScheduleKind = c["kind"].as_str().expect("kind").parse().expect("schedule kind");
        let total = u(c, "total_steps");
        let sched = Schedule::new(kind, f(c, "base_lr"), total, warmup_of(c)).expect("schedule");
        let what = format!("{kind} total {total} warmup {}", f(c, "warmup"));
        assert_eq!(sched.warmup_steps, u(c, "warmup_steps"), "{what}: warm-up steps");
        let lrs = f64s(c, "lrs");
        assert_eq!(lrs.len(), total);
        for (k, &want) in lrs.iter().enumerate() {
            let got = sched.lr_at(k);
            let err = (got - want).abs();
            assert!(err <= 1e-14 * want.abs() + 1e-30, "{what}: step {k} lr {got:e}, transformers {want:e}");
            worst = worst.max(err / want.abs().max(1e-300));
        }
    }
    println!("schedules vs transformers: worst relative deviation {worst:.2e}");

    // The cases the brief names, spelled out: 10% of 3 steps is ceil(0.30000000000000004) = 1 warm-up
    // step, and the first optimizer step uses λ(0) = 0.
    for (total, want_w) in [(3, 1), (10, 1), (1000, 100)] {
        let s = Schedule::new(ScheduleKind::Linear, 5e-7, total, Warmup::Ratio(0.1)).expect("schedule");
        assert_eq!(s.warmup_steps, want_w, "total {total}");
        assert_eq!(s.lr_at(0), 0.0);
    }
    let s = Schedule::new(ScheduleKind::Linear, 5e-7, 3, Warmup::Ratio(0.1)).expect("schedule");
    assert_eq!([s.lr_at(0), s.lr_at(1), s.lr_at(2)], [0.0, 5e-7, 2.5e-7]);
}
