//! `kernels/sampling.cu` against the CPU sampler (`src/sampling.rs`): for the same logits, params
//! and uniform, the same token (or the same error), on random rows with ties, -inf entries, peaked
//! and flat distributions and every truncation; and the empirical token frequencies of many draws
//! against the truncated softmax (chi-square). Through the host harness (CPU threads) everywhere,
//! and on the GPU when `probe()` finds one (else those tests print why they skip).

#[macro_use]
mod common;

use common::Rng;
use sppo::backend::cuda::host::{ffi, grid_args};
use sppo::backend::cuda::ops::sampling::{finish_rows, plan_sampling, sample_rows, SamplingVariant};
use sppo::backend::cuda::CudaDevice;
use sppo::sampling::{sample, truncated_distribution, SamplerScratch, SamplingParams};

#[derive(Clone, Copy)]
enum Runner<'a> {
    /// The host-compiled kernel with this many threads per block.
    Host(u32),
    Gpu(&'a CudaDevice),
}

fn run(runner: Runner<'_>, logits: &[f32], vocab: usize, uniforms: &[f32], params: &SamplingParams) -> anyhow::Result<Vec<u32>> {
    match runner {
        Runner::Host(threads) => {
            let plan = plan_sampling(params, vocab, logits.len(), uniforms, threads)?;
            // Poisoned outputs: a row the kernel does not write fails `finish_rows`.
            let mut tokens = vec![-7i32; uniforms.len()];
            let mut status = vec![-9i32; uniforms.len()];
            let (gx, gy, gz, bx, by, bz) = grid_args(&plan.config);
            // SAFETY: sampling_draw_f32_search(int* tokens, int* status, const float* logits,
            // const float* uniforms, int rows, int V, float temperature, int top_k, float top_p,
            // float min_p); the plan checked logits = rows × V and the uniforms.
            let rc = unsafe {
                ffi::sampling_draw_f32_search_host(
                    gx,
                    gy,
                    gz,
                    bx,
                    by,
                    bz,
                    tokens.as_mut_ptr(),
                    status.as_mut_ptr(),
                    logits.as_ptr(),
                    uniforms.as_ptr(),
                    plan.rows,
                    plan.vocab,
                    plan.temperature,
                    plan.top_k,
                    plan.top_p,
                    plan.min_p,
                )
            };
            assert_eq!(rc, 0, "host launch of sampling_draw_f32_search failed");
            finish_rows(&tokens, &status, &plan)
        }
        Runner::Gpu(dev) => {
            let d_logits = dev.upload(logits)?;
            let mut tokens = dev.upload(&vec![-7i32; uniforms.len()])?;
            let mut status = dev.upload(&vec![-9i32; uniforms.len()])?;
            sample_rows(
                dev,
                SamplingVariant::Search,
                &mut tokens.as_view_mut(),
                &mut status.as_view_mut(),
                &d_logits.as_view(),
                vocab,
                uniforms,
                params,
            )
        }
    }
}

/// A row of logits of one of several shapes (index `kind`).
fn row(rng: &mut Rng, kind: usize, vocab: usize) -> Vec<f32> {
    match kind % 5 {
        0 => rng.vec(vocab, -8.0, 8.0),
        // Many exact ties: multiples of 0.5.
        1 => (0..vocab).map(|_| (rng.uniform(-4.0, 4.0) * 2.0).round() / 2.0).collect(),
        // A third of the tokens banned (-inf), the rest spread.
        2 => (0..vocab).map(|_| if rng.uniform(0.0, 1.0) < 0.33 { f32::NEG_INFINITY } else { rng.uniform(-5.0, 5.0) }).collect(),
        // Peaked: one token far above the others.
        3 => {
            let mut v = rng.vec(vocab, -3.0, 3.0);
            let top = (rng.next_u64() % vocab as u64) as usize;
            v[top] = 25.0;
            v
        }
        // Flat: all equal (every threshold is one big tie), some -0.0 among +0.0.
        _ => (0..vocab).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }).collect(),
    }
}

fn params_set() -> Vec<SamplingParams> {
    let p = |temperature, top_p, top_k, min_p| SamplingParams { temperature, top_p, top_k, min_p };
    vec![
        SamplingParams::greedy(),
        p(1.0, 1.0, 0, 0.0),
        p(0.7, 0.9, 0, 0.0),
        p(1.0, 1.0, 5, 0.0),
        p(1.0, 1.0, 1, 0.0),
        p(0.8, 0.5, 0, 0.1),
        p(1.0, 1.0, 0, 0.2),
        p(1.3, 0.8, 20, 0.05),
        p(1.0, 0.3, 3, 0.0),
    ]
}

/// Every params set on rows of every shape and several vocabularies: the kernel's token is the
/// CPU sampler's, row by row.
fn matches_cpu(runner: Runner<'_>, what: &str, vocabs: &[usize], rows_per_case: usize) {
    let mut rng = Rng::new(71);
    let mut scratch = SamplerScratch::new();
    let mut checked = 0;
    for &vocab in vocabs {
        for (pi, params) in params_set().iter().enumerate() {
            let mut logits = Vec::new();
            let mut uniforms = Vec::new();
            for r in 0..rows_per_case {
                logits.extend(row(&mut rng, r + pi, vocab));
                // Include the ends of [0, 1): 0 and the largest uniform below 1.
                uniforms.push(match r % 7 {
                    0 => 0.0,
                    1 => 1.0 - f32::EPSILON / 2.0,
                    _ => (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32,
                });
            }
            // Rows whose every token is banned are errors on both sides; keep this check to the
            // rows the CPU accepts (the error rows are tested below).
            let want: Vec<Option<u32>> = logits
                .chunks(vocab)
                .zip(&uniforms)
                .map(|(l, &u)| sample(l, params, u, &mut scratch).ok())
                .collect();
            let (mut ok_logits, mut ok_u, mut ok_want) = (vec![], vec![], vec![]);
            for ((l, &u), w) in logits.chunks(vocab).zip(&uniforms).zip(&want) {
                if let Some(t) = w {
                    ok_logits.extend_from_slice(l);
                    ok_u.push(u);
                    ok_want.push(*t);
                }
            }
            if ok_u.is_empty() {
                continue;
            }
            let got = run(runner, &ok_logits, vocab, &ok_u, params).unwrap_or_else(|e| panic!("{what}: V {vocab} {params:?}: {e:#}"));
            for (r, (g, w)) in got.iter().zip(&ok_want).enumerate() {
                assert_eq!(g, w, "{what}: V {vocab} {params:?} row {r} (u {}): kernel token {g}, CPU {w}", ok_u[r]);
            }
            checked += got.len();
        }
    }
    println!("{what}: {checked} rows give the CPU sampler's token");
}

#[test]
fn sampling_host_matches_cpu_sampler() {
    // The host harness runs a block's threads as OS threads (~0.1 s per row here): few rows.
    matches_cpu(Runner::Host(64), "host", &[1, 7, 100], 6);
    matches_cpu(Runner::Host(32), "host, one warp", &[33], 4);
}

#[test]
fn sampling_gpu_matches_cpu_sampler() {
    let dev = gpu_or_skip!("sampling_gpu_matches_cpu_sampler");
    matches_cpu(Runner::Gpu(&dev), "gpu", &[1, 7, 100, 5000, 49152], 64);
}

/// Bad rows fail as the CPU sampler fails: a NaN or +inf logit (naming the lowest such token),
/// every logit -inf, and a logit / temperature that overflows.
fn errors(runner: Runner<'_>, what: &str) {
    let p = SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 0, min_p: 0.0 };
    let mut scratch = SamplerScratch::new();
    let mut nan = vec![0.5f32; 9];
    nan[6] = f32::INFINITY;
    nan[4] = f32::NAN;
    let cases: Vec<(&str, Vec<f32>, SamplingParams, &str)> = vec![
        ("NaN", nan.clone(), p, "token 4"),
        ("NaN, greedy", nan, SamplingParams::greedy(), "token 4"),
        ("all -inf", vec![f32::NEG_INFINITY; 9], p, "-inf"),
        ("all -inf, greedy", vec![f32::NEG_INFINITY; 9], SamplingParams::greedy(), "-inf"),
        ("overflow", vec![1.0, 3e38, 2.0, 3e38, 0.0, 1.0, 1.0, 1.0, 1.0], SamplingParams { temperature: 0.01, ..p }, "token 1"),
    ];
    for (name, l, params, says) in cases {
        assert!(sample(&l, &params, 0.5, &mut scratch).is_err(), "{name}: the CPU accepts it");
        // The bad row second, after a good one: the error names row 1.
        let mut two = vec![0.0f32; 9];
        two.extend_from_slice(&l);
        let e = run(runner, &two, 9, &[0.25, 0.5], &params).expect_err(name);
        let msg = format!("{e:#}");
        assert!(msg.contains("row 1") && msg.contains(says), "{what}: {name}: {msg}");
    }
    // Launch-side checks: a uniform outside [0, 1), logits of the wrong length.
    assert!(run(runner, &[0.0; 9], 9, &[1.0], &p).is_err(), "{what}: u = 1 accepted");
    assert!(run(runner, &[0.0; 8], 9, &[0.5], &p).is_err(), "{what}: 8 logits for V 9 accepted");
}

#[test]
fn sampling_host_errors() {
    errors(Runner::Host(32), "host");
}

#[test]
fn sampling_gpu_errors() {
    let dev = gpu_or_skip!("sampling_gpu_errors");
    errors(Runner::Gpu(&dev), "gpu");
}

/// Many draws of one row (one uniform each): token frequencies against `truncated_distribution`
/// by Pearson's chi-square. Deterministic uniforms, so the statistic is fixed; the bound is the
/// 0.9999 quantile, far from where a correct sampler lands and far below a wrong truncation's.
fn chi_square(runner: Runner<'_>, what: &str, draws: usize) {
    let logits: Vec<f32> = vec![2.0, 1.5, 1.5, 1.0, 0.5, f32::NEG_INFINITY, 0.25, 0.0, -0.5, -1.0, -3.0, -6.0];
    let vocab = logits.len();
    let params = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 9, min_p: 0.02 };
    let dist = truncated_distribution(&logits, &params).unwrap();
    let mut rng = Rng::new(5);
    let uniforms: Vec<f32> = (0..draws).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32).collect();
    let rows: Vec<f32> = (0..draws).flat_map(|_| logits.iter().copied()).collect();
    let got = run(runner, &rows, vocab, &uniforms, &params).unwrap();
    let mut counts = vec![0usize; vocab];
    for &t in &got {
        counts[t as usize] += 1;
    }
    let kept: Vec<u32> = dist.iter().map(|&(id, _)| id).collect();
    for (id, &c) in counts.iter().enumerate() {
        assert!(c == 0 || kept.contains(&(id as u32)), "{what}: token {id} drawn {c} times but truncated away");
    }
    let stat: f64 = dist
        .iter()
        .map(|&(id, p)| {
            let e = p * draws as f64;
            (counts[id as usize] as f64 - e).powi(2) / e
        })
        .sum();
    let df = dist.len() - 1;
    // Wilson-Hilferty 0.9999 quantile of chi-square(df).
    let z = 3.719;
    let k = df as f64;
    let bound = k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3);
    println!("{what}: chi-square {stat:.2} over {} kept tokens ({draws} draws), bound {bound:.2}", dist.len());
    assert!(stat < bound, "{what}: chi-square {stat:.2} >= {bound:.2}: frequencies {counts:?} vs {dist:?}");
}

#[test]
fn sampling_host_frequencies_match_truncated_softmax() {
    chi_square(Runner::Host(32), "host", 700);
}

#[test]
fn sampling_gpu_frequencies_match_truncated_softmax() {
    let dev = gpu_or_skip!("sampling_gpu_frequencies_match_truncated_softmax");
    chi_square(Runner::Gpu(&dev), "gpu", 200_000);
}

#[test]
fn unknown_variant_lists_choices() {
    let e = SamplingVariant::from_name("sorted").unwrap_err().to_string();
    assert!(e.contains("search"), "{e}");
    assert_eq!(SamplingVariant::from_name("search").unwrap(), SamplingVariant::Search);
}
