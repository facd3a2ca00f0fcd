//! Counter-based randomness (`sppo::rng`) and the token sampler (`sppo::sampling`).
//!
//! - Philox4x32-10 against the Random123 known answers; key packing: determinism, every field
//!   changes the stream, no collisions over a grid; uniformity (Kolmogorov-Smirnov, chi-square).
//! - `truncated_distribution` against Hugging Face's warpers (fixtures from
//!   `scripts/make_sampling_fixtures.py`): same support, probabilities within 1e-5.
//! - `sample` with `RngKey` uniforms: chi-square of 20k draws against `truncated_distribution`.
//! - Greedy ties, invalid logits and parameters.
//! - `sample_timing`: a printed micro-benchmark (run with `--nocapture`), not a timed assertion.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde_json::Value;
use sppo::rng::{philox4x32_10, prompt_key, RngKey, Stream, MAX_ITERATION, MAX_PROMPT, MAX_SAMPLE};
use sppo::sampling::{sample, truncated_distribution, SamplerScratch, SamplingParams};

fn key(seed: u64, iteration: u32, stream: Stream, prompt: u64, sample: u32) -> RngKey {
    RngKey::new(seed, iteration, stream, prompt, sample).expect("key fields in range")
}

// ---------------------------------------------------------------- rng

#[test]
fn philox_known_answers() {
    // Random123 kat_vectors, "philox4x32 10": counter (4 words), key (2 words), expected output.
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        ([0; 4], [0; 2], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
        ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, k, want) in kat {
        assert_eq!(philox4x32_10(ctr, k), want, "ctr {ctr:08x?} key {k:08x?}");
    }
}

#[test]
fn key_packing_is_documented_layout() {
    // The layout the CUDA kernel replicates (src/rng.rs module doc).
    let k = key(0x0123_4567_89ab_cdef, 0x5a5, Stream::DataOrder, 0x1234_5678_9abc, 0x7e57);
    assert_eq!(k.philox_key(), [0x89ab_cdef, 0x0123_4567]);
    assert_eq!(k.counter(0xfedc_ba98_7654), [0xba98_7654, 0x7e57_fedc, 0x5678_9abc, 0x15a5_1234]);
    assert_eq!(k.u32s(0xfedc_ba98_7654), philox4x32_10(k.counter(0xfedc_ba98_7654), k.philox_key()));
    // Positions wrap modulo 2^48.
    assert_eq!(k.u32s(1 << 48), k.u32s(0));
}

#[test]
fn key_ranges_are_checked() {
    assert!(RngKey::new(0, MAX_ITERATION, Stream::Sampling, 0, 0).is_err());
    assert!(RngKey::new(0, 0, Stream::Sampling, MAX_PROMPT, 0).is_err());
    assert!(RngKey::new(0, 0, Stream::Sampling, 0, MAX_SAMPLE).is_err());
    assert!(RngKey::new(u64::MAX, MAX_ITERATION - 1, Stream::Eval, MAX_PROMPT - 1, MAX_SAMPLE - 1).is_ok());
    let e = RngKey::new(0, 0, Stream::Sampling, 0, MAX_SAMPLE).unwrap_err().to_string();
    assert!(e.contains("sample"), "{e}");
}

#[test]
fn prompt_key_is_fnv1a_folded() {
    // FNV-1a 64("a") = 0xaf63dc4c8601ec8c; folded: 0xdc4c8601ec8c ^ 0xaf63.
    assert_eq!(prompt_key("a"), 0xdc4c_8601_ec8c ^ 0xaf63);
    assert_eq!(prompt_key(""), (0xcbf29ce484222325u64 >> 48) ^ (0xcbf29ce484222325u64 & ((1 << 48) - 1)));
    assert_ne!(prompt_key("prompt-0001"), prompt_key("prompt-0002"));
    for id in ["", "a", "ultrafeedback/12345", "日本語"] {
        assert!(prompt_key(id) < MAX_PROMPT);
        assert!(RngKey::new(1, 0, Stream::Sampling, prompt_key(id), 0).is_ok());
    }
}

#[test]
fn streams_are_deterministic_and_every_field_matters() {
    let base = key(42, 1, Stream::Sampling, prompt_key("p"), 3);
    let pos = 17;
    assert_eq!(base.u32s(pos), base.u32s(pos));
    assert_eq!(base.uniform(pos), key(42, 1, Stream::Sampling, prompt_key("p"), 3).uniform(pos));
    let variants = [
        ("seed", key(43, 1, Stream::Sampling, prompt_key("p"), 3), pos),
        ("seed high half", key(42 | (1 << 32), 1, Stream::Sampling, prompt_key("p"), 3), pos),
        ("iteration", key(42, 2, Stream::Sampling, prompt_key("p"), 3), pos),
        ("stream", key(42, 1, Stream::DataOrder, prompt_key("p"), 3), pos),
        ("stream eval", key(42, 1, Stream::Eval, prompt_key("p"), 3), pos),
        ("prompt", key(42, 1, Stream::Sampling, prompt_key("q"), 3), pos),
        ("sample", key(42, 1, Stream::Sampling, prompt_key("p"), 4), pos),
        ("position", base, pos + 1),
        ("position high bits", base, pos + (1 << 40)),
    ];
    for (what, k, p) in variants {
        assert_ne!(k.u32s(p), base.u32s(pos), "changing {what} left the output unchanged");
    }
}

#[test]
fn no_collisions_over_a_key_grid() {
    let mut outputs = HashSet::new();
    let mut counters = HashSet::new();
    let mut n = 0usize;
    for seed in [0u64, 1, 1 << 32, u64::MAX] {
        for iteration in [0u32, 1, 2, MAX_ITERATION - 1] {
            for stream in [Stream::Sampling, Stream::DataOrder, Stream::Dropout, Stream::Eval] {
                for prompt in [0u64, 1, 1 << 32, prompt_key("a"), MAX_PROMPT - 1] {
                    for s in [0u32, 1, 2, MAX_SAMPLE - 1] {
                        let k = key(seed, iteration, stream, prompt, s);
                        for position in (0u64..12).chain([1 << 32, (1 << 48) - 1]) {
                            outputs.insert(k.u32s(position));
                            if seed == 0 {
                                counters.insert(k.counter(position));
                            }
                            n += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(outputs.len(), n, "{} colliding outputs among {n}", n - outputs.len());
    assert_eq!(counters.len(), n / 4, "packing maps two keys to one counter");
}

/// Two-sided Kolmogorov-Smirnov statistic of `xs` against U(0, 1).
fn ks_uniform(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len() as f64;
    xs.iter().enumerate().fold(0.0f64, |d, (i, &x)| d.max((x - i as f64 / n).abs()).max(((i + 1) as f64 / n - x).abs()))
}

/// Upper quantile of chi-square with `df` degrees of freedom at standard-normal quantile `z`
/// (Wilson-Hilferty, accurate to a few percent for df >= 3).
fn chi2_quantile(df: f64, z: f64) -> f64 {
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + z * a.sqrt()).powi(3)
}

/// Standard-normal quantile for p = 1e-6 upper tail: threshold for deterministic-seed tests whose
/// false-alarm rate would be 1e-6 even with fresh randomness.
const Z_1E6: f64 = 4.753;

#[test]
fn uniforms_are_uniform() {
    let n = 100_000u64;
    let k = key(7, 0, Stream::Sampling, prompt_key("uniformity"), 0);
    let u32s: Vec<f64> = (0..n).map(|p| f64::from(k.uniform(p))).collect();
    let u64s: Vec<f64> = (0..n).map(|p| k.uniform_f64(p)).collect();
    for (name, xs) in [("uniform", &u32s), ("uniform_f64", &u64s)] {
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)), "{name} left [0, 1)");
        // P(sqrt(n) D > 2.63) ~ 2 exp(-2 * 2.63^2) ~ 1e-6.
        let d = ks_uniform(xs.clone());
        println!("{name}: KS D = {d:.5} (sqrt(n) D = {:.3}, threshold 2.63)", d * (n as f64).sqrt());
        assert!(d * (n as f64).sqrt() < 2.63, "{name}: KS D = {d}");
    }
    // f32 uniforms are exact multiples of 2^-24.
    assert!(u32s.iter().all(|&x| (x * (1u64 << 24) as f64).fract() == 0.0));
    // Chi-square on 256 buckets of each of the four words (top byte): all words are usable.
    for w in 0..4 {
        let mut counts = [0u64; 256];
        for p in 0..n {
            counts[(k.u32s(p)[w] >> 24) as usize] += 1;
        }
        let e = n as f64 / 256.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        let limit = chi2_quantile(255.0, Z_1E6);
        assert!(chi2 < limit, "word {w}: chi2 {chi2:.1} >= {limit:.1}");
    }
}

// ---------------------------------------------------------------- sampler vs transformers

struct Case {
    name: String,
    logits: Vec<f32>,
    params: SamplingParams,
    ids: Vec<u32>,
    probs: Vec<f64>,
    tie_split: bool,
}

fn load_fixtures() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sampling/warpers.json");
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e} (run scripts/make_sampling_fixtures.py)"));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(doc["format"], "sppo-sampling-warpers", "{path}: wrong format");
    assert_eq!(doc["version"], 1, "{path}: unsupported version");
    let f = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("{path}: expected a number, got {v}"));
    let vectors: HashMap<String, Vec<f32>> = doc["vectors"]
        .as_object()
        .expect("vectors")
        .iter()
        .map(|(name, v)| {
            let logits = v.as_array().expect("logits array").iter();
            (name.clone(), logits.map(|x| if x.is_null() { f32::NEG_INFINITY } else { f(x) as f32 }).collect())
        })
        .collect();
    doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("name").to_string(),
            logits: vectors[c["vector"].as_str().expect("vector")].clone(),
            params: SamplingParams {
                temperature: f(&c["temperature"]) as f32,
                top_k: c["top_k"].as_u64().expect("top_k") as usize,
                top_p: f(&c["top_p"]) as f32,
                min_p: f(&c["min_p"]) as f32,
            },
            ids: c["ids"].as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect(),
            probs: c["probs"].as_array().expect("probs").iter().map(f).collect(),
            tie_split: c["tie_split"].as_bool().expect("tie_split"),
        })
        .collect()
}

#[test]
fn truncation_matches_transformers() {
    let cases = load_fixtures();
    assert!(cases.len() > 150, "only {} fixture cases", cases.len());
    let mut worst = 0.0f64;
    for c in &cases {
        let dist = truncated_distribution(&c.logits, &c.params).unwrap_or_else(|e| panic!("{}: {e:#}", c.name));
        let total: f64 = dist.iter().map(|d| d.1).sum();
        assert!((total - 1.0).abs() < 1e-12, "{}: probabilities sum to {total}", c.name);
        assert!(dist.windows(2).all(|w| w[0].1 >= w[1].1), "{}: not sorted by probability", c.name);
        assert_eq!(dist.len(), c.ids.len(), "{}: support size {} vs HF {}", c.name, dist.len(), c.ids.len());
        if c.tie_split {
            // HF's pick among equal logits at a cutoff follows an unstable sort: compare the kept
            // logit values and the sorted probabilities, not the ids.
            let mut ours: Vec<f32> = dist.iter().map(|d| c.logits[d.0 as usize]).collect();
            let mut theirs: Vec<f32> = c.ids.iter().map(|&i| c.logits[i as usize]).collect();
            ours.sort_by(f32::total_cmp);
            theirs.sort_by(f32::total_cmp);
            assert_eq!(ours, theirs, "{}: kept logit values differ", c.name);
            let mut hf = c.probs.clone();
            hf.sort_by(|a, b| b.total_cmp(a));
            for (d, p) in dist.iter().zip(&hf) {
                worst = worst.max((d.1 - p).abs());
                assert!((d.1 - p).abs() <= 1e-5, "{}: prob {} vs HF {p}", c.name, d.1);
            }
        } else {
            let hf: HashMap<u32, f64> = c.ids.iter().copied().zip(c.probs.iter().copied()).collect();
            for &(id, p) in &dist {
                let q = hf.get(&id).unwrap_or_else(|| panic!("{}: token {id} kept here, removed by HF", c.name));
                worst = worst.max((p - q).abs());
                assert!((p - q).abs() <= 1e-5, "{}: token {id}: {p} vs HF {q}", c.name);
            }
        }
    }
    println!("{} cases, max |p - p_HF| = {worst:.2e}", cases.len());
}

#[test]
fn sample_is_inverse_cdf_of_truncated_distribution() {
    let mut scratch = SamplerScratch::new();
    for c in load_fixtures() {
        let dist = truncated_distribution(&c.logits, &c.params).expect("fixture is valid");
        for j in 0..64 {
            let u = (j as f32 + 0.5) / 64.0;
            let mut acc = 0.0;
            let want = dist.iter().find(|d| {
                acc += d.1;
                f64::from(u) < acc
            });
            let want = want.or(dist.last()).map(|d| d.0);
            let got = sample(&c.logits, &c.params, u, &mut scratch).expect("valid");
            assert_eq!(Some(got), want, "{} u={u}", c.name);
        }
    }
}

#[test]
fn sample_frequencies_match_distribution() {
    // 20k draws per case with uniforms from the Sampling stream; chi-square at p = 1e-6 (fixed
    // seed, so deterministic; the threshold only says a healthy sampler would essentially never fail).
    let cases = load_fixtures();
    let picks = [
        "normal_v200/t1.30/k0/p1.00/m0.00",
        "normal_v200/t0.70/k5/p0.90/m0.05",
        "normal_v200/t1.30/k0/p0.90/m0.05",
        "ties_v120/t1.00/k0/p1.00/m0.00",
        "spiky_v100/t1.30/k0/p1.00/m0.00",
        "masked_v80/t2.00/k0/p0.99/m0.01",
    ];
    let n = 20_000u64;
    let mut scratch = SamplerScratch::new();
    for (ci, name) in picks.iter().enumerate() {
        let c = cases.iter().find(|c| c.name == *name).unwrap_or_else(|| panic!("no fixture case {name}"));
        let dist = truncated_distribution(&c.logits, &c.params).expect("valid");
        let k = key(2024, 0, Stream::Sampling, prompt_key(name), ci as u32);
        let mut counts: HashMap<u32, u64> = HashMap::new();
        for pos in 0..n {
            let id = sample(&c.logits, &c.params, k.uniform(pos), &mut scratch).expect("valid");
            *counts.entry(id).or_default() += 1;
        }
        assert!(counts.keys().all(|id| dist.iter().any(|d| d.0 == *id)), "{name}: drew a removed token");
        // Bins with expected count >= 5; the rest pooled into one bin.
        let (mut chi2, mut bins) = (0.0, 0usize);
        let (mut pool_e, mut pool_o) = (0.0, 0.0);
        for &(id, p) in &dist {
            let e = p * n as f64;
            let o = counts.get(&id).copied().unwrap_or(0) as f64;
            if e >= 5.0 {
                chi2 += (o - e).powi(2) / e;
                bins += 1;
            } else {
                pool_e += e;
                pool_o += o;
            }
        }
        if pool_e > 0.0 {
            chi2 += (pool_o - pool_e).powi(2) / pool_e.max(1e-12);
            bins += 1;
        }
        let df = (bins.max(2) - 1) as f64;
        let limit = chi2_quantile(df.max(3.0), Z_1E6);
        println!("{name}: {} kept, chi2 = {chi2:.1} on {df} df (limit {limit:.1})", dist.len());
        assert!(chi2 < limit, "{name}: chi2 {chi2:.1} >= {limit:.1} on {df} df");
    }
}

// ---------------------------------------------------------------- edge cases and errors

#[test]
fn greedy_takes_lowest_id_among_ties() {
    let g = SamplingParams::greedy();
    let mut s = SamplerScratch::new();
    assert_eq!(sample(&[1.0, 3.0, 3.0, 2.0], &g, 0.9, &mut s).expect("valid"), 1);
    assert_eq!(sample(&[f32::NEG_INFINITY, -5.0, -5.0], &g, 0.0, &mut s).expect("valid"), 1);
    assert_eq!(truncated_distribution(&[0.0, 7.0, 7.0], &g).expect("valid"), vec![(1, 1.0)]);
    // -0.0 and +0.0 tie.
    assert_eq!(sample(&[-0.0, 0.0], &g, 0.5, &mut s).expect("valid"), 0);
}

#[test]
fn top_k_keeps_threshold_ties_and_canonical_order() {
    let logits = [3.0, 5.0, 4.0, 4.0, 4.0, 1.0];
    let p = SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, min_p: 0.0 };
    let d = truncated_distribution(&logits, &p).expect("valid");
    let ids: Vec<u32> = d.iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    // Equal logits: probabilities equal, order by id.
    assert_eq!(d[1].1, d[3].1);
    // Top-p splitting a tie keeps the lowest ids: 4 equal tokens, top_p 0.5 keeps 2.
    let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0 };
    let d = truncated_distribution(&[0.0; 4], &p).expect("valid");
    assert_eq!(d, vec![(0, 0.5), (1, 0.5)]);
}

#[test]
fn invalid_logits_are_errors() {
    let mut s = SamplerScratch::new();
    let t = SamplingParams::with_temperature(1.0);
    for params in [t, SamplingParams::greedy()] {
        let e = sample(&[0.0, f32::NAN, 1.0], &params, 0.5, &mut s).unwrap_err().to_string();
        assert!(e.contains("token 1"), "{e}");
        assert!(sample(&[0.0, f32::INFINITY], &params, 0.5, &mut s).is_err());
        let e = sample(&[f32::NEG_INFINITY; 3], &params, 0.5, &mut s).unwrap_err().to_string();
        assert!(e.contains("-inf"), "{e}");
        assert!(sample(&[], &params, 0.5, &mut s).is_err());
        assert!(truncated_distribution(&[f32::NAN], &params).is_err());
    }
    // Temperature overflow: 3e38 / 0.5 = +inf.
    assert!(sample(&[3e38, 0.0], &SamplingParams::with_temperature(0.5), 0.5, &mut s).is_err());
    // The uniform must be in [0, 1).
    for u in [1.0, -0.1, f32::NAN] {
        assert!(sample(&[0.0, 1.0], &t, u, &mut s).is_err(), "u = {u}");
    }
}

#[test]
fn invalid_params_are_errors() {
    let ok = SamplingParams { temperature: 0.7, top_k: 5, top_p: 0.9, min_p: 0.05 };
    assert!(ok.validate().is_ok());
    assert!(SamplingParams::greedy().validate().is_ok());
    let bad = [
        ("temperature", SamplingParams { temperature: -0.1, ..ok }),
        ("temperature", SamplingParams { temperature: f32::NAN, ..ok }),
        ("temperature", SamplingParams { temperature: f32::INFINITY, ..ok }),
        ("top_p", SamplingParams { top_p: 0.0, ..ok }),
        ("top_p", SamplingParams { top_p: 1.5, ..ok }),
        ("top_p", SamplingParams { top_p: f32::NAN, ..ok }),
        ("min_p", SamplingParams { min_p: 1.0, ..ok }),
        ("min_p", SamplingParams { min_p: -0.01, ..ok }),
        ("min_p", SamplingParams { min_p: f32::NAN, ..ok }),
    ];
    let mut s = SamplerScratch::new();
    for (field, p) in bad {
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains(field), "{p:?}: message {e:?} does not name {field}");
        assert!(sample(&[0.0, 1.0], &p, 0.5, &mut s).is_err(), "{p:?}");
        assert!(truncated_distribution(&[0.0, 1.0], &p).is_err(), "{p:?}");
    }
}

// ---------------------------------------------------------------- timing

/// Logits shaped like a language model's: a Gaussian bulk plus a few strong candidates.
fn lm_like_logits(vocab: usize, seed: u64) -> Vec<f32> {
    let k = key(seed, 0, Stream::Eval, prompt_key("timing"), 0);
    (0..vocab as u64)
        .map(|i| {
            // Box-Muller from two 32-bit words.
            let w = k.u32s(i);
            let u1 = (f64::from(w[0]) + 1.0) / 4294967297.0;
            let u2 = f64::from(w[1]) / 4294967296.0;
            let g = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (2.5 * g + if w[2].is_multiple_of(4096) { 8.0 } else { 0.0 }) as f32
        })
        .collect()
}

#[test]
fn sample_timing() {
    let configs = [
        ("top_p 0.9", SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, min_p: 0.0 }),
        ("top_k 50, top_p 0.9", SamplingParams { temperature: 0.7, top_k: 50, top_p: 0.9, min_p: 0.0 }),
        ("min_p 0.05", SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.05 }),
        ("no truncation", SamplingParams::with_temperature(1.0)),
        ("greedy", SamplingParams::greedy()),
    ];
    for vocab in [49152usize, 128256] {
        let rows: Vec<Vec<f32>> = (0..8).map(|b| lm_like_logits(vocab, b)).collect(); // (8, V) f32
        let uk = key(1, 0, Stream::Sampling, 0, 0);
        let mut scratch = SamplerScratch::new();
        for (name, p) in &configs {
            let kept = truncated_distribution(&rows[0], p).expect("valid").len();
            let reps = 50u64;
            let mut sink = 0u64;
            for (b, row) in rows.iter().enumerate() {
                sink += u64::from(sample(row, p, uk.uniform(b as u64), &mut scratch).expect("valid")); // warm-up
            }
            let t0 = Instant::now();
            for r in 0..reps {
                for (b, row) in rows.iter().enumerate() {
                    sink += u64::from(sample(row, p, uk.uniform(r * 8 + b as u64), &mut scratch).expect("valid"));
                }
            }
            let per = t0.elapsed().as_secs_f64() / (reps * 8) as f64;
            println!(
                "sample timing: V={vocab:6} {name:22} {:8.1} us/row, {:7.1} us per batch of 8 ({kept} kept, sink {})",
                per * 1e6,
                per * 8e6,
                sink % 7
            );
        }
    }
}
