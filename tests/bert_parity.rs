//! The BERT encoder against references: the new CPU ops (LayerNorm, exact GELU, bias) by finite
//! differences and known values; a tiny random `BertModel` against transformers (hidden states,
//! pooled outputs, every parameter gradient; fixtures by scripts/make_minilm_fixtures.py); the
//! whole encoder by finite differences; all-MiniLM-L6-v2 embeddings against sentence-transformers.

mod common;

use common::{assert_close, print_skip, rel_error, repo_root, Rng};
use sppo::backend::{cpu::CpuBackend, Backend};
use sppo::model::bert::{Bert, BertConfig, EncoderActivations, EncoderBatch};
use sppo::model::weights::{read_all_f32, safetensors_bytes, ParamLayout, SaveDtype};
use sppo::oracle::similarity::SimilarityOracle;
use std::path::{Path, PathBuf};

fn normal(rng: &mut Rng) -> f32 {
    let (u1, u2) = (rng.uniform(1e-7, 1.0), rng.uniform(0.0, 1.0));
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

/// Checks a directional derivative: `analytic` vs the central difference (lp − lm) / 2h, within
/// `rtol` of the larger of the two plus `atol`, the f32 noise of the difference quotient (about
/// ε_f32 · |loss| / h: the losses are computed by f32 forwards).
fn check_fd(what: &str, analytic: f64, lp: f64, lm: f64, h: f64, rtol: f64, atol: f64) {
    let numeric = (lp - lm) / (2.0 * h);
    let err = (numeric - analytic).abs();
    let allowed = rtol * analytic.abs().max(numeric.abs()) + atol;
    assert!(
        err.is_finite() && err <= allowed,
        "{what}: analytic {analytic:.6e} vs finite difference {numeric:.6e} (|Δ| {err:.2e} > {allowed:.2e})"
    );
    println!("ok {what}: analytic {analytic:.6e}, finite difference {numeric:.6e}, |Δ| {err:.1e} <= {allowed:.1e}");
}

// ---------------------------------------------------------------- ops

#[test]
fn gelu_is_the_exact_erf_form() {
    let b = CpuBackend::new(Some(2)).unwrap();
    // (x, gelu(x), gelu'(x)) from Python's math.erf in f64; the tanh approximation is off by up to
    // 4.4e-4 on these points, so an implementation using it fails.
    let cases = [
        (-5.0, -1.4332578593401202e-06, -7.146946001803465e-06),
        (-2.5, -0.015524163314440398, -0.03761108590814519),
        (-1.0, -0.15865525393145707, -0.08331547058768629),
        (-0.5, -0.15426876936299344, 0.13250487534383712),
        (-0.001, -0.000499601057786089, 0.4992021157051586),
        (0.0, 0.0, 0.5),
        (0.25, 0.14967658142073093, 0.695373354883636),
        (1.0, 0.8413447460685429, 1.0833154705876864),
        (2.0, 1.9544997361036416, 1.085231801078197),
        (3.5, 3.4991857982233756, 1.0028217603536247),
        (8.0, 7.999999999999995, 1.0000000000000397),
    ];
    let x: Vec<f32> = cases.iter().map(|c| c.0 as f32).collect();
    let mut y = vec![f32::NAN; x.len()];
    b.gelu_forward(&mut y, &x).unwrap();
    let want: Vec<f32> = cases.iter().map(|c| c.1 as f32).collect();
    assert_close("gelu", &y, &want, 1e-12, 2e-7);
    let mut dx = vec![f32::NAN; x.len()];
    let dy = vec![1.0f32; x.len()];
    b.gelu_backward(&mut dx, &dy, &x).unwrap();
    let want: Vec<f32> = cases.iter().map(|c| c.2 as f32).collect();
    assert_close("gelu'", &dx, &want, 1e-12, 2e-7);
    // Overwrite, not accumulate.
    b.gelu_backward(&mut dx, &dy, &x).unwrap();
    assert_close("gelu' again (overwrites)", &dx, &want, 1e-12, 2e-7);
    assert!(b.gelu_forward(&mut y[..3], &x).unwrap_err().to_string().contains("gelu_forward"));
}

#[test]
fn layernorm_gelu_bias_finite_differences() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let mut rng = Rng::new(7);
    let (n, c) = (6, 24);
    let x: Vec<f32> = (0..n * c).map(|i| 3.0 * normal(&mut rng) + (i / c) as f32).collect(); // rows with large means
    let w: Vec<f32> = (0..c).map(|_| 1.0 + 0.3 * normal(&mut rng)).collect();
    let bias: Vec<f32> = (0..c).map(|_| 0.5 * normal(&mut rng)).collect();
    let dy: Vec<f32> = (0..n * c).map(|_| normal(&mut rng)).collect();
    let eps = 1e-12f32;

    let ln = |x: &[f32], w: &[f32], bias: &[f32]| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut y, mut m, mut r) = (vec![f32::NAN; n * c], vec![f32::NAN; n], vec![f32::NAN; n]);
        b.layernorm_forward(&mut y, &mut m, &mut r, x, w, bias, c, eps).unwrap();
        (y, m, r)
    };
    let (y, mean, rstd) = ln(&x, &w, &bias);
    assert!(y.iter().all(|v| v.is_finite()));
    // Each output row has mean bias-weighted ~ and unit variance before the affine part.
    for row in 0..n {
        let xhat: Vec<f64> = (0..c).map(|j| f64::from((y[row * c + j] - bias[j]) / w[j])).collect();
        let mu = xhat.iter().sum::<f64>() / c as f64;
        let var = xhat.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / c as f64;
        assert!(mu.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "row {row}: normalised mean {mu}, variance {var}");
    }
    // Gradients accumulate onto a nonzero base.
    let base = 0.25f32;
    let (mut dx, mut dw, mut db) = (vec![base; n * c], vec![base; c], vec![base; c]);
    b.layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd, c).unwrap();
    let sub = |v: &[f32]| v.iter().map(|g| g - base).collect::<Vec<f32>>();
    let (dx, dw, db) = (sub(&dx), sub(&dw), sub(&db));
    let h = 1e-3f32;
    let dir = |len: usize, rng: &mut Rng| (0..len).map(|_| normal(rng)).collect::<Vec<f32>>();
    let shift = |v: &[f32], d: &[f32], s: f32| v.iter().zip(d).map(|(a, b)| a + s * b).collect::<Vec<f32>>();
    let d = dir(n * c, &mut rng);
    check_fd(
        "layernorm dinp",
        dot(&dx, &d),
        dot(&ln(&shift(&x, &d, h), &w, &bias).0, &dy),
        dot(&ln(&shift(&x, &d, -h), &w, &bias).0, &dy),
        h.into(),
        5e-3,
        1e-4,
    );
    let d = dir(c, &mut rng);
    check_fd(
        "layernorm dweight",
        dot(&dw, &d),
        dot(&ln(&x, &shift(&w, &d, h), &bias).0, &dy),
        dot(&ln(&x, &shift(&w, &d, -h), &bias).0, &dy),
        h.into(),
        5e-3,
        1e-4,
    );
    let d = dir(c, &mut rng);
    check_fd(
        "layernorm dbias",
        dot(&db, &d),
        dot(&ln(&x, &w, &shift(&bias, &d, h)).0, &dy),
        dot(&ln(&x, &w, &shift(&bias, &d, -h)).0, &dy),
        h.into(),
        5e-3,
        1e-4,
    );

    // GELU
    let gelu = |x: &[f32]| {
        let mut y = vec![f32::NAN; x.len()];
        b.gelu_forward(&mut y, x).unwrap();
        y
    };
    let mut gx = vec![f32::NAN; n * c];
    b.gelu_backward(&mut gx, &dy, &x).unwrap();
    let d = dir(n * c, &mut rng);
    check_fd("gelu dinp", dot(&gx, &d), dot(&gelu(&shift(&x, &d, h)), &dy), dot(&gelu(&shift(&x, &d, -h)), &dy), h.into(), 5e-3, 1e-4);

    // bias: out += bias per row; dbias += column sums.
    let biased = |bias: &[f32]| {
        let mut y = x.clone();
        b.bias_add(&mut y, bias).unwrap();
        y
    };
    for (r, row) in biased(&bias).chunks(c).enumerate() {
        for j in 0..c {
            assert_eq!(row[j], x[r * c + j] + bias[j]);
        }
    }
    let mut gb = vec![base; c];
    b.bias_backward(&mut gb, &dy).unwrap();
    let gb = sub(&gb);
    let d = dir(c, &mut rng);
    check_fd(
        "bias dbias",
        dot(&gb, &d),
        dot(&biased(&shift(&bias, &d, h)), &dy),
        dot(&biased(&shift(&bias, &d, -h)), &dy),
        h.into(),
        5e-3,
        1e-4,
    );
}

#[test]
fn encoder_ops_reject_bad_shapes_and_are_deterministic() {
    let b1 = CpuBackend::new(Some(1)).unwrap();
    let b4 = CpuBackend::new(Some(4)).unwrap();
    let mut rng = Rng::new(3);
    let (n, c) = (1000, 64); // several row chunks per op
    let x = rng.vec(n * c, -2.0, 2.0);
    let w = rng.vec(c, 0.5, 1.5);
    let bias = rng.vec(c, -0.5, 0.5);
    let dy = rng.vec(n * c, -1.0, 1.0);
    let run = |b: &CpuBackend| {
        let (mut y, mut m, mut r) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        b.layernorm_forward(&mut y, &mut m, &mut r, &x, &w, &bias, c, 1e-12).unwrap();
        let (mut dx, mut dw, mut db) = (vec![0f32; n * c], vec![0f32; c], vec![0f32; c]);
        b.layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &m, &r, c).unwrap();
        let mut gb = vec![0f32; c];
        b.bias_backward(&mut gb, &dy).unwrap();
        (y, dx, dw, db, gb)
    };
    assert!(run(&b1) == run(&b4), "encoder ops depend on the thread count");

    let (mut y, mut m, mut r) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n - 1]);
    let e = b1.layernorm_forward(&mut y, &mut m, &mut r, &x, &w, &bias, c, 1e-12).unwrap_err().to_string();
    assert!(e.contains("layernorm_forward") && e.contains("rstd") && e.contains("layernorm.rs"), "{e}");
    let e = b1.bias_add(&mut y[..10], &bias).unwrap_err().to_string();
    assert!(e.contains("bias_add") && e.contains("10"), "{e}");
    let e = b1.bias_backward(&mut vec![0f32; c], &dy[..c + 1]).unwrap_err().to_string();
    assert!(e.contains("bias_backward"), "{e}");
}

// ---------------------------------------------------------------- tiny BERT vs transformers

fn tiny_dir() -> PathBuf {
    repo_root().join("tests/fixtures/bert_tiny")
}

struct Tiny {
    refs: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    ids: Vec<Vec<u32>>,
    types: Vec<Vec<u32>>,
}

fn load_tiny() -> Tiny {
    let dir = tiny_dir();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["format_version"], 1, "{}: unknown fixture format", dir.display());
    let refs = read_all_f32(&dir.join("reference.safetensors")).unwrap();
    let n = meta["sequences"].as_array().unwrap().len();
    let get = |k: String| refs[&k].1.iter().map(|&x| x as u32).collect::<Vec<u32>>();
    let ids: Vec<Vec<u32>> = (0..n).map(|s| get(format!("input_ids.{s}"))).collect();
    let types = (0..n).map(|s| get(format!("token_type_ids.{s}"))).collect();
    for (s, m) in meta["sequences"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ids[s].len() as u64, m["len"].as_u64().unwrap());
    }
    Tiny { refs, ids, types }
}

/// (hidden (N, C), pooled (S, C)) by a forward in `keep_layers` mode, every activation first
/// poisoned with NaN so an unwritten element shows.
fn run_forward(
    b: &CpuBackend,
    model: &Bert<CpuBackend>,
    batch: &EncoderBatch,
    keep: bool,
) -> (Vec<f32>, Vec<f32>, EncoderActivations<CpuBackend>) {
    let mut acts = EncoderActivations::new(b, &model.cfg, batch.len(), batch.num_seqs(), keep).unwrap();
    for buf in [&mut acts.emb_sum, &mut acts.emb_mean, &mut acts.emb_rstd, &mut acts.hidden, &mut acts.pooled] {
        buf.fill(f32::NAN);
    }
    for la in &mut acts.layers {
        for buf in [&mut la.resid_in, &mut la.q, &mut la.k, &mut la.v, &mut la.att, &mut la.att_lse, &mut la.sum1, &mut la.h1] {
            buf.fill(f32::NAN);
        }
        for buf in [&mut la.ln1_mean, &mut la.ln1_rstd, &mut la.inter, &mut la.act, &mut la.sum2, &mut la.ln2_mean, &mut la.ln2_rstd] {
            buf.fill(f32::NAN);
        }
    }
    model.forward(b, batch, &mut acts).unwrap();
    (acts.hidden.clone(), acts.pooled.clone(), acts)
}

#[test]
fn tiny_bert_matches_transformers() {
    let b = CpuBackend::new(None).unwrap();
    let t = load_tiny();
    let model = Bert::load(&b, &tiny_dir().join("model")).unwrap();
    let c = model.cfg.hidden_size;
    let batch = EncoderBatch::from_segments(t.ids.iter().map(Vec::as_slice).zip(t.types.iter().map(Vec::as_slice))).unwrap();
    let (hidden, pooled, acts) = run_forward(&b, &model, &batch, true);
    let (hidden_inf, pooled_inf, _) = run_forward(&b, &model, &batch, false);
    assert_eq!(hidden, hidden_inf, "inference mode (one reused layer) differs from keep_layers");
    assert_eq!(pooled, pooled_inf);

    let mut row = 0;
    for (s, ids) in t.ids.iter().enumerate() {
        let n = ids.len();
        let err = rel_error(&hidden[row * c..(row + n) * c], &t.refs[&format!("hidden.{s}")].1);
        println!("seq {s} ({n} tokens): hidden relative error {err:.2e}");
        assert!(err < 1e-4, "seq {s}: hidden relative error {err:.2e}");
        let err = rel_error(&pooled[s * c..(s + 1) * c], &t.refs[&format!("pooled.{s}")].1);
        println!("seq {s}: pooled relative error {err:.2e}");
        assert!(err < 1e-4, "seq {s}: pooled relative error {err:.2e}");
        row += n;
    }

    // Gradients of L = Σ <w_hidden, hidden> + <w_pooled, pooled>, every parameter tensor.
    let dhidden: Vec<f32> = (0..t.ids.len()).flat_map(|s| t.refs[&format!("w_hidden.{s}")].1.clone()).collect();
    let dpooled = t.refs["w_pooled"].1.clone();
    let mut grads = model.alloc_grads(&b).unwrap();
    model.backward(&b, &batch, &acts, &dhidden, &dpooled, &mut grads).unwrap();
    assert!(grads.iter().all(|g| g.is_finite()), "non-finite gradient");
    let mut worst = 0f64;
    let scale = grads.iter().fold(0f32, |m, g| m.max(g.abs()));
    for e in &model.layout.entries {
        let want = &t.refs.get(&format!("grad.{}", e.name)).unwrap_or_else(|| panic!("fixture has no grad.{}", e.name)).1;
        if e.name.ends_with("attention.self.key.bias") {
            // Exactly zero (softmax shift invariance): both sides are rounding noise, so compare
            // with the gradient scale instead of relatively.
            assert_close(&format!("grad {}", e.name), &grads[e.range()], want, 1e-6 * scale, 0.0);
            continue;
        }
        let err = rel_error(&grads[e.range()], want);
        worst = worst.max(err);
        assert!(err < 1e-4, "grad {}: relative error {err:.2e}", e.name);
    }
    println!("{} parameter gradients, worst relative error {worst:.2e}", model.layout.entries.len());

    // Accumulation: a second backward adds the same gradient again.
    let once = grads.clone();
    model.backward(&b, &batch, &acts, &dhidden, &dpooled, &mut grads).unwrap();
    let twice: Vec<f32> = once.iter().map(|g| 2.0 * g).collect();
    assert_close("grads accumulate", &grads, &twice, 1e-6, 1e-5);
}

#[test]
fn bert_checkpoint_names_and_config_errors() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let src = tiny_dir().join("model");
    let t = load_tiny();
    let batch = EncoderBatch::from_sequences(t.ids.iter().map(Vec::as_slice)).unwrap();
    let reference = Bert::load(&b, &src).unwrap();
    let (want, _, _) = run_forward(&b, &reference, &batch, false);

    // A task-model checkpoint (`bert.` prefix, an MLM head to skip) loads into the same encoder.
    let tmp = tempfile::tempdir().unwrap();
    let write = |dir: &Path, rename: &dyn Fn(&str) -> Option<String>, extra: bool| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let tensors = read_all_f32(&src.join("model.safetensors")).unwrap();
        let mut named: Vec<(String, Vec<usize>, Vec<f32>)> =
            tensors.into_iter().filter_map(|(n, (shape, v))| rename(&n).map(|n| (n, shape, v))).collect();
        if extra {
            named.push(("cls.predictions.bias".into(), vec![100], vec![0.0; 100]));
        }
        let views: Vec<(String, Vec<usize>, &[f32])> = named.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
        std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&views, SaveDtype::F32).unwrap()).unwrap();
    };
    let prefixed = tmp.path().join("prefixed");
    write(&prefixed, &|n| Some(format!("bert.{n}")), true);
    let model = Bert::load(&b, &prefixed).unwrap();
    let (got, _, _) = run_forward(&b, &model, &batch, false);
    assert_eq!(got, want, "bert.-prefixed checkpoint gives different hidden states");

    let missing = tmp.path().join("missing");
    write(&missing, &|n| (n != "encoder.layer.1.output.LayerNorm.bias").then(|| n.to_string()), false);
    let e = format!("{:#}", Bert::load(&b, &missing).err().unwrap());
    assert!(e.contains("encoder.layer.1.output.LayerNorm.bias") && e.contains("missing"), "{e}");

    let stray = tmp.path().join("stray");
    write(
        &stray,
        &|n| {
            Some(if n == "encoder.layer.0.intermediate.dense.bias" {
                "encoder.layer.0.intermediate.dense.bais".into()
            } else {
                n.to_string()
            })
        },
        false,
    );
    let e = format!("{:#}", Bert::load(&b, &stray).err().unwrap());
    assert!(e.contains("intermediate.dense.bais"), "{e}");

    let base = std::fs::read_to_string(src.join("config.json")).unwrap();
    for (from, to, needle) in [
        (r#""hidden_act": "gelu""#, r#""hidden_act": "gelu_new""#, "hidden_act `gelu_new`"),
        (r#""model_type": "bert""#, r#""model_type": "roberta""#, "model_type `roberta`"),
        (r#""num_attention_heads": 4"#, r#""num_attention_heads": 5"#, "not a multiple"),
        (r#""hidden_size": 32,"#, "", "missing `hidden_size`"),
    ] {
        assert!(base.contains(from), "fixture config lacks {from}");
        let e = format!("{:#}", BertConfig::from_json_str(&base.replace(from, to)).unwrap_err());
        assert!(e.contains(needle), "{needle}: {e}");
    }

    // Ids outside the tables are errors, not panics.
    let bad = EncoderBatch::from_sequences([&[1u32, 100][..]]).unwrap();
    let mut acts = EncoderActivations::new(&b, &reference.cfg, bad.len(), 1, false).unwrap();
    let e = reference.forward(&b, &bad, &mut acts).unwrap_err().to_string();
    assert!(e.contains("token id 100"), "{e}");
    let long: Vec<u32> = vec![5; 65];
    let bad = EncoderBatch::from_sequences([long.as_slice()]).unwrap();
    let mut acts = EncoderActivations::new(&b, &reference.cfg, bad.len(), 1, false).unwrap();
    let e = reference.forward(&b, &bad, &mut acts).unwrap_err().to_string();
    assert!(e.contains("position 64"), "{e}");
}

// ---------------------------------------------------------------- whole encoder, finite differences

#[test]
fn encoder_finite_differences() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let cfg = BertConfig::from_json_str(
        r#"{"model_type":"bert","vocab_size":30,"hidden_size":16,"num_hidden_layers":2,"num_attention_heads":2,
            "intermediate_size":24,"max_position_embeddings":16,"type_vocab_size":2,"layer_norm_eps":1e-12,"hidden_act":"gelu"}"#,
    )
    .unwrap();
    let layout = ParamLayout::bert(&cfg);
    let mut rng = Rng::new(0xBE27);
    let mut flat = vec![0f32; layout.total];
    for e in &layout.entries {
        let is_ln_weight = e.name.ends_with("LayerNorm.weight");
        for x in &mut flat[e.range()] {
            *x = if is_ln_weight { 1.0 + 0.2 * normal(&mut rng) } else { 0.3 * normal(&mut rng) };
        }
    }
    let seqs: Vec<Vec<u32>> = [4usize, 7, 1].iter().map(|&t| (0..t).map(|_| (rng.next_u64() % 30) as u32).collect()).collect();
    let types: Vec<Vec<u32>> = seqs.iter().map(|s| (0..s.len()).map(|i| u32::from(i >= 3)).collect()).collect();
    let batch = EncoderBatch::from_segments(seqs.iter().map(Vec::as_slice).zip(types.iter().map(Vec::as_slice))).unwrap();
    let c = cfg.hidden_size;
    let wh: Vec<f32> = (0..batch.len() * c).map(|_| normal(&mut rng)).collect();
    let wp: Vec<f32> = (0..batch.num_seqs() * c).map(|_| normal(&mut rng)).collect();
    let loss = |flat: &[f32]| -> f64 {
        let m = Bert::from_flat(&b, cfg.clone(), flat).unwrap();
        let (h, p, _) = run_forward(&b, &m, &batch, false);
        dot(&h, &wh) + dot(&p, &wp)
    };
    let model = Bert::from_flat(&b, cfg.clone(), &flat).unwrap();
    let (_, _, acts) = run_forward(&b, &model, &batch, true);
    let mut grads = model.alloc_grads(&b).unwrap();
    model.backward(&b, &batch, &acts, &wh, &wp, &mut grads).unwrap();

    let h = 5e-4f32;
    let dir: Vec<f32> = (0..flat.len()).map(|_| normal(&mut rng)).collect();
    let mut tensors: Vec<(String, std::ops::Range<usize>)> = layout.entries.iter().map(|e| (e.name.clone(), e.range())).collect();
    tensors.push(("all parameters".into(), 0..flat.len()));
    let scale = grads.iter().fold(0f32, |m, g| m.max(g.abs()));
    for (name, range) in tensors {
        if name.ends_with("attention.self.key.bias") {
            // Exactly zero: adding b to every key adds q·b to all of a query's scores, which the
            // softmax ignores. A finite difference only measures f32 noise here.
            let worst = grads[range.clone()].iter().fold(0f32, |m, g| m.max(g.abs()));
            assert!(worst <= 1e-5 * scale, "{name}: gradient {worst:e} should vanish (largest gradient {scale:e})");
            continue;
        }
        let (mut plus, mut minus) = (flat.clone(), flat.clone());
        let mut analytic = 0f64;
        for i in range {
            plus[i] += h * dir[i];
            minus[i] -= h * dir[i];
            analytic += f64::from(grads[i]) * f64::from(dir[i]);
        }
        // atol: the key bias (true derivative 0) measured 1.5e-3 of pure noise on this case.
        check_fd(&name, analytic, loss(&plus), loss(&minus), h.into(), 2e-2, 5e-3);
    }
}

// ---------------------------------------------------------------- all-MiniLM-L6-v2 vs sentence-transformers

pub fn minilm_dir() -> Option<PathBuf> {
    let d = repo_root().join(".cache/models/all-MiniLM-L6-v2");
    if d.join("model.safetensors").exists() {
        Some(d)
    } else {
        print_skip("minilm", &format!("{} is missing (run scripts/setup)", d.display()));
        None
    }
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let path = repo_root().join("tests/fixtures/minilm/embeddings.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(fx["format_version"], 1, "{}: unknown fixture format", path.display());
    let oracle = SimilarityOracle::load(&dir, 0.05).unwrap();
    assert_eq!(
        oracle.pipeline.max_seq_length,
        fx["max_seq_length"].as_u64().unwrap() as usize,
        "{}: sentence_bert_config.json not read (run scripts/setup to extract it)",
        dir.display()
    );
    assert_eq!(oracle.pipeline.normalize, fx["normalize"].as_bool().unwrap(), "modules.json not read (run scripts/setup)");
    let items = fx["texts"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|t| t["text"].as_str().unwrap()).collect();

    // Word pieces: exactly sentence-transformers' (lowercasing, unicode, truncation at 256).
    let ids = oracle.tokenize(&texts).unwrap();
    for (t, got) in items.iter().zip(&ids) {
        let want: Vec<u32> = t["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(got, &want, "{}: token ids differ", t["name"]);
    }

    // All texts in one packed batch against the one-at-a-time reference.
    let embs = oracle.embed(&texts).unwrap();
    let mut worst_cos = 1f64;
    let mut worst_abs = 0f32;
    for ((t, got), pieces) in items.iter().zip(&embs).zip(&ids) {
        let want: Vec<f32> = t["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        assert!(got.iter().all(|x| x.is_finite()), "{}: non-finite embedding", t["name"]);
        let cos = dot(got, &want) / (dot(got, got).sqrt() * dot(&want, &want).sqrt());
        let max_abs = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let norm = dot(got, got).sqrt();
        println!(
            "{:<16} {:>3} pieces  cosine {cos:.9}  max |Δ| {max_abs:.2e}  ‖e‖ {norm:.6}",
            t["name"].as_str().unwrap(),
            pieces.len()
        );
        assert!(cos >= 1.0 - 1e-4, "{}: cosine to sentence-transformers {cos}", t["name"]);
        assert!((norm - 1.0).abs() < 1e-5, "{}: not normalised ({norm})", t["name"]);
        worst_cos = worst_cos.min(cos);
        worst_abs = worst_abs.max(max_abs);
    }
    println!("worst cosine {worst_cos:.9} (1 - {:.1e}), worst max |Δ| {worst_abs:.2e}", 1.0 - worst_cos);
    assert!(worst_abs < 1e-4, "max |Δ| {worst_abs:e}");
}
