//! `kernels/sppo_loss.cu` against the f64 reference (`src/train/loss.rs`: `pair_loss`,
//! `single_loss`, `batch_pair_loss`) on random batches, for every loss and the `--train-on all`
//! form: η = 1000 (SPPO's β = 1e-3), β = 0.1 and 1; log-ratios near 0 and in the thousands; P
//! exactly 0 and 1 and within 1e-7 of them; batches smaller and larger than the kernel's 256
//! threads. Outputs start as NaN, so an unwritten element fails; NaN never passes.
//!
//! Each case runs through the host-compiled kernel on CPU threads (everywhere) and through the
//! real kernel when `probe()` finds a GPU (else those tests print why they skip), both driven by
//! the launcher's plan (`plan_sppo_loss`).

#[macro_use]
mod common;

use common::{assert_close, Rng};
use sppo::backend::cuda::error::CudaError;
use sppo::backend::cuda::host::{ffi, grid_args};
use sppo::backend::cuda::ops::sppo_loss::{
    plan_sppo_loss, sppo_loss, LossForm, SppoLossLens, SppoLossPlan,
};
use sppo::backend::cuda::CudaDevice;
use sppo::train::loss::{batch_pair_loss, pair_loss, single_loss, LossType, PairInput, PairProbs};

/// A batch in the kernel's layout (f32, as the device holds it).
struct Batch {
    seq_start: Vec<i32>,
    policy: Vec<f32>,
    reference: Vec<f32>,
    probs: Vec<f32>,
}

/// Outputs: per-example loss, dpolicy, totals.
struct Outputs {
    example_loss: Vec<f32>,
    dpolicy: Vec<f32>,
    totals: Vec<f64>,
}

/// Probabilities with their edges: exactly 0 and 1, within 1e-7 of them, ½, and uniform.
fn probability(rng: &mut Rng) -> f32 {
    match rng.next_u64() % 8 {
        0 => 0.0,
        1 => 1.0,
        2 => 1e-7,
        3 => 1.0 - 1e-7,
        4 => 0.5,
        _ => rng.uniform(0.0, 1.0),
    }
}

/// Log-ratio magnitudes: near 0, moderate, and thousands of nats (DPO's softplus far out).
fn log_ratio(rng: &mut Rng) -> f32 {
    match rng.next_u64() % 4 {
        0 => rng.uniform(-1e-3, 1e-3),
        1 => rng.uniform(-5.0, 5.0),
        2 => rng.uniform(-600.0, 600.0),
        _ => rng.uniform(-3000.0, 3000.0),
    }
}

fn random_batch(rng: &mut Rng, form: LossForm, n_examples: usize) -> Batch {
    let mut seq_start = vec![0i32];
    let (mut policy, mut reference, mut probs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n_examples {
        let k = match form {
            LossForm::Pair(_) => 2,
            LossForm::All => 1 + (rng.next_u64() % 5) as usize,
        };
        for _ in 0..k {
            // Summed log-probs of a few hundred tokens; the policy differs by the log-ratio.
            let r = rng.uniform(-400.0, -1.0);
            reference.push(r);
            policy.push(r + log_ratio(rng));
            if form == LossForm::All {
                probs.push(probability(rng));
            }
        }
        if let LossForm::Pair(_) = form {
            probs.extend([probability(rng), probability(rng), probability(rng)]);
        }
        seq_start.push(seq_start.last().copied().unwrap_or(0) + k as i32);
    }
    Batch {
        seq_start,
        policy,
        reference,
        probs,
    }
}

/// The trainer's use of `src/train/loss.rs` (src/train/trainer.rs `example_loss` and its sums),
/// in f64: (per-example loss, dpolicy, totals).
fn reference(
    form: LossForm,
    beta: f64,
    denominator: usize,
    x: &Batch,
) -> (Vec<f64>, Vec<f64>, [f64; 3]) {
    let den = denominator as f64;
    let (mut losses, mut dpolicy, mut totals) =
        (Vec::new(), vec![f64::NAN; x.policy.len()], [0.0f64; 3]);
    for e in 0..x.seq_start.len() - 1 {
        let (lo, hi) = (x.seq_start[e] as usize, x.seq_start[e + 1] as usize);
        let pol = |s: usize| f64::from(x.policy[s]);
        let rf = |s: usize| f64::from(x.reference[s]);
        let (loss, chosen, rejected) = match form {
            LossForm::Pair(kind) => {
                let p = &x.probs[3 * e..3 * e + 3];
                let probs = PairProbs {
                    chosen_probs: p[0].into(),
                    chosen_probs_win: p[1].into(),
                    chosen_probs_lose: p[2].into(),
                };
                let l = pair_loss(kind, beta, pol(lo), pol(lo + 1), rf(lo), rf(lo + 1), &probs);
                dpolicy[lo] = l.d_policy_chosen / den;
                dpolicy[lo + 1] = l.d_policy_rejected / den;
                (l.loss, l.chosen_logratio, l.rejected_logratio)
            }
            LossForm::All => {
                let mut loss = 0.0;
                for (s, d) in dpolicy.iter_mut().enumerate().take(hi).skip(lo) {
                    let (l, g) = single_loss(beta, pol(s), rf(s), x.probs[s].into());
                    loss += l;
                    *d = g / den;
                }
                let w = &x.probs[lo..hi];
                let best = lo
                    + (0..w.len())
                        .max_by(|&a, &b| w[a].total_cmp(&w[b]))
                        .unwrap_or(0);
                let worst = lo
                    + (0..w.len())
                        .min_by(|&a, &b| w[a].total_cmp(&w[b]))
                        .unwrap_or(0);
                (loss, pol(best) - rf(best), pol(worst) - rf(worst))
            }
        };
        losses.push(loss);
        totals[0] += loss / den;
        totals[1] += chosen / den;
        totals[2] += rejected / den;
    }
    (losses, dpolicy, totals)
}

#[derive(Clone, Copy)]
enum Runner<'a> {
    Host,
    Gpu(&'a CudaDevice),
}

fn run(runner: Runner, form: LossForm, beta: f64, denominator: usize, x: &Batch) -> Outputs {
    let (n_ex, n_seq) = (x.seq_start.len() - 1, x.policy.len());
    let mut out = Outputs {
        example_loss: vec![f32::NAN; n_ex],
        dpolicy: vec![f32::NAN; n_seq],
        totals: vec![f64::NAN; 3],
    };
    match runner {
        Runner::Host => {
            let lens = SppoLossLens {
                policy: n_seq,
                reference: n_seq,
                example_loss: n_ex,
                dpolicy: n_seq,
                totals: 3,
            };
            let plan = plan_sppo_loss(form, beta, denominator, &x.seq_start, &x.probs, &lens)
                .unwrap_or_else(|e| panic!("plan: {e}"));
            let (gx, gy, gz, bx, by, bz) = grid_args(&plan.config);
            // SAFETY: sppo_loss_fwdbwd_f32(float* example_loss, float* dpolicy, double* totals,
            // const float* policy, const float* reference, const float* probs,
            // const int* seq_start, int n_examples, int kind, double beta, double denominator);
            // the plan checked every length against seq_start.
            let rc = unsafe {
                ffi::sppo_loss_fwdbwd_f32_host(
                    gx,
                    gy,
                    gz,
                    bx,
                    by,
                    bz,
                    out.example_loss.as_mut_ptr(),
                    out.dpolicy.as_mut_ptr(),
                    out.totals.as_mut_ptr(),
                    x.policy.as_ptr(),
                    x.reference.as_ptr(),
                    x.probs.as_ptr(),
                    x.seq_start.as_ptr(),
                    plan.n_examples,
                    plan.kind,
                    plan.beta,
                    plan.denominator,
                )
            };
            assert_eq!(rc, 0, "host launch of sppo_loss_fwdbwd_f32 failed");
        }
        Runner::Gpu(dev) => {
            let fail = |e: CudaError| panic!("{e}");
            let (d_policy, d_reference) = (
                dev.upload(&x.policy).unwrap(),
                dev.upload(&x.reference).unwrap(),
            );
            let mut d_loss = dev.upload(&out.example_loss).unwrap();
            let mut d_dpolicy = dev.upload(&out.dpolicy).unwrap();
            let mut d_totals = dev.upload(&out.totals).unwrap();
            sppo_loss(
                dev,
                &mut d_loss.as_view_mut(),
                &mut d_dpolicy.as_view_mut(),
                &mut d_totals.as_view_mut(),
                &d_policy.as_view(),
                &d_reference.as_view(),
                form,
                beta,
                denominator,
                &x.seq_start,
                &x.probs,
            )
            .unwrap_or_else(fail);
            dev.synchronize().unwrap_or_else(fail);
            out.example_loss = dev.download(&d_loss).unwrap();
            out.dpolicy = dev.download(&d_dpolicy).unwrap();
            out.totals = dev.download(&d_totals).unwrap();
        }
    }
    out
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn forms() -> Vec<LossForm> {
    let mut forms: Vec<LossForm> = LossType::ALL.iter().map(|&k| LossForm::Pair(k)).collect();
    forms.push(LossForm::All);
    forms
}

fn check_all(runner: Runner, where_: &str, seed: u64) {
    let mut rng = Rng::new(seed);
    // (β, examples, denominator): 600 examples exceed the block's 256 threads.
    for (beta, n_examples, denominator) in [
        (1e-3, 37, 37),
        (1e-3, 600, 640),
        (0.1, 53, 53),
        (1.0, 9, 12),
    ] {
        for form in forms() {
            let x = random_batch(&mut rng, form, n_examples);
            let got = run(runner, form, beta, denominator, &x);
            let (loss, dpolicy, totals) = reference(form, beta, denominator, &x);
            let tag = format!("{form:?} β={beta} E={n_examples} [{where_}]");
            // Both sides compute in f64 from the same inputs and round once (the GPU may fuse f64
            // multiply-adds: 1e-16 relative), so f32 outputs agree to the last bit or one ulp.
            assert_close(
                &format!("{tag} example_loss"),
                &got.example_loss,
                &to_f32(&loss),
                1e-30,
                2.4e-7,
            );
            assert_close(
                &format!("{tag} dpolicy"),
                &got.dpolicy,
                &to_f32(&dpolicy),
                1e-12,
                2.4e-7,
            );
            // Totals are f64 sums in another order: bound by the sum of the terms' magnitudes.
            let magnitude = |k: usize| -> f64 {
                match k {
                    0 => loss.iter().map(|l| l.abs()).sum::<f64>(),
                    _ => x
                        .policy
                        .iter()
                        .zip(&x.reference)
                        .map(|(p, r)| f64::from(p - r).abs())
                        .sum::<f64>(),
                }
            };
            for (k, what) in ["loss", "chosen log-ratio", "rejected log-ratio"]
                .iter()
                .enumerate()
            {
                let (g, w) = (got.totals[k], totals[k]);
                let allowed = 1e-12 * magnitude(k) / denominator as f64 + 1e-300;
                assert!(
                    (g - w).abs() <= allowed,
                    "{tag} total {what}: got {g:e}, want {w:e} (allowed |Δ| {allowed:e})"
                );
            }
        }
    }
}

#[test]
fn sppo_loss_host() {
    check_all(Runner::Host, "host", 61);
}

#[test]
fn sppo_loss_gpu() {
    let dev = gpu_or_skip!("sppo_loss_gpu");
    check_all(Runner::Gpu(&dev), "gpu", 61);
}

/// The kernel's batch mean and per-pair gradients equal `batch_pair_loss`'s (the f64 function the
/// CPU path would call for a batch of pairs) for each pair loss.
#[test]
fn sppo_loss_host_matches_batch_pair_loss() {
    let mut rng = Rng::new(62);
    for &kind in LossType::ALL {
        let form = LossForm::Pair(kind);
        let x = random_batch(&mut rng, form, 40);
        let pairs: Vec<PairInput> = (0..40)
            .map(|e| PairInput {
                policy_chosen: x.policy[2 * e].into(),
                policy_rejected: x.policy[2 * e + 1].into(),
                ref_chosen: x.reference[2 * e].into(),
                ref_rejected: x.reference[2 * e + 1].into(),
                probs: PairProbs {
                    chosen_probs: x.probs[3 * e].into(),
                    chosen_probs_win: x.probs[3 * e + 1].into(),
                    chosen_probs_lose: x.probs[3 * e + 2].into(),
                },
            })
            .collect();
        let want = batch_pair_loss(kind, 1e-3, &pairs, 40).expect("valid batch");
        let got = run(Runner::Host, form, 1e-3, 40, &x);
        let rel = (got.totals[0] - want.loss).abs() / want.loss.abs().max(1e-300);
        assert!(
            rel < 1e-12,
            "{kind}: batch loss {} vs batch_pair_loss {} (rel {rel:e})",
            got.totals[0],
            want.loss
        );
        let want_d: Vec<f64> = want
            .d_policy_chosen
            .iter()
            .zip(&want.d_policy_rejected)
            .flat_map(|(&c, &r)| [c, r])
            .collect();
        // batch_pair_loss multiplies by 1/denominator, the kernel divides: at most 1 ulp apart.
        assert_close(
            &format!("{kind} dpolicy vs batch_pair_loss"),
            &got.dpolicy,
            &to_f32(&want_d),
            1e-12,
            2.4e-7,
        );
    }
}

#[test]
fn sppo_loss_plan_rejects_bad_calls() {
    let lens = |e: usize, s: usize| SppoLossLens {
        policy: s,
        reference: s,
        example_loss: e,
        dpolicy: s,
        totals: 3,
    };
    let pair = LossForm::Pair(LossType::Sppo);
    let seq = [0, 2, 4];
    let probs = [0.5f32; 6];
    let plan = plan_sppo_loss(pair, 1e-3, 2, &seq, &probs, &lens(2, 4)).expect("valid call");
    assert_eq!(
        (
            plan.kind,
            plan.n_examples,
            plan.config.grid_dim,
            plan.config.block_dim
        ),
        (0, 2, (1, 1, 1), (256, 1, 1))
    );
    assert_eq!(LossForm::All.kind(), 5);
    assert!(plan_sppo_loss(
        LossForm::All,
        1e-3,
        2,
        &[0, 3, 4],
        &[0.0, 0.5, 1.0, 0.2],
        &lens(2, 4)
    )
    .is_ok());

    let expect = |r: Result<SppoLossPlan, CudaError>, needle: &str| match r {
        Err(e @ CudaError::Shape { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with("sppo_loss") && text.contains(needle),
                "{needle:?} not in: {text}"
            );
        }
        other => panic!("expected a shape error mentioning {needle:?}, got {other:?}"),
    };
    expect(
        plan_sppo_loss(pair, 0.0, 2, &seq, &probs, &lens(2, 4)),
        "beta = 0",
    );
    expect(
        plan_sppo_loss(pair, f64::NAN, 2, &seq, &probs, &lens(2, 4)),
        "beta = NaN",
    );
    expect(
        plan_sppo_loss(pair, 1e-3, 2, &[0], &[], &lens(0, 0)),
        "at least 2 entries",
    );
    expect(
        plan_sppo_loss(pair, 1e-3, 2, &[1, 3, 5], &probs, &lens(2, 4)),
        "seq_start[0] = 1",
    );
    expect(
        plan_sppo_loss(pair, 1e-3, 2, &[0, 2, 5], &probs, &lens(2, 5)),
        "example 1 has 3 sequences",
    );
    expect(
        plan_sppo_loss(LossForm::All, 1e-3, 2, &[0, 2, 2], &[0.5; 2], &lens(2, 2)),
        "example 1 has 0",
    );
    expect(
        plan_sppo_loss(pair, 1e-3, 1, &seq, &probs, &lens(2, 4)),
        "denominator 1 is smaller",
    );
    expect(
        plan_sppo_loss(pair, 1e-3, 2, &seq, &probs, &lens(2, 5)),
        "policy has 5",
    );
    expect(
        plan_sppo_loss(
            pair,
            1e-3,
            2,
            &seq,
            &probs,
            &SppoLossLens {
                dpolicy: 3,
                ..lens(2, 4)
            },
        ),
        "dpolicy has 3",
    );
    expect(
        plan_sppo_loss(pair, 1e-3, 2, &seq, &probs, &lens(1, 4)),
        "example_loss has 1",
    );
    expect(
        plan_sppo_loss(
            pair,
            1e-3,
            2,
            &seq,
            &probs,
            &SppoLossLens {
                totals: 1,
                ..lens(2, 4)
            },
        ),
        "totals has 1",
    );
    expect(
        plan_sppo_loss(pair, 1e-3, 2, &seq, &probs[..5], &lens(2, 4)),
        "probs has 5",
    );
    let mut bad = probs;
    bad[4] = 1.5;
    expect(
        plan_sppo_loss(pair, 1e-3, 2, &seq, &bad, &lens(2, 4)),
        "probs[4] = 1.5",
    );
    bad[4] = f32::NAN;
    expect(
        plan_sppo_loss(
            LossForm::Pair(LossType::SppoSingle),
            1e-3,
            2,
            &seq,
            &bad,
            &lens(2, 4),
        ),
        "probs[4] = NaN",
    );
    // The losses that do not read the probabilities do not check them (as batch_pair_loss).
    assert!(plan_sppo_loss(
        LossForm::Pair(LossType::Dpo),
        0.1,
        2,
        &seq,
        &bad,
        &lens(2, 4)
    )
    .is_ok());
    expect(
        plan_sppo_loss(
            LossForm::All,
            1e-3,
            2,
            &[0, 1, 2],
            &[0.5, -0.1],
            &lens(2, 2),
        ),
        "probs[1] = -0.1",
    );
}
