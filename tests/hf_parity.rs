//! The CPU model against Hugging Face transformers on tiny random Llama/Mistral models that cover
//! the config space (fixtures made by scripts/make_fixtures.py): logits, per-token and summed
//! response log-probs, every parameter gradient, and greedy generation.

mod common;

use common::{rel_error, repo_root};
use sppo::backend::cpu::CpuBackend;
use sppo::generate::{generate, GenOptions, GenRequest};
use sppo::model::weights::read_all_f32;
use sppo::model::{Activations, Batch, Llama};
use sppo::sampling::SamplingParams;
use std::path::{Path, PathBuf};

fn cases() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/fixtures/hf");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (fixtures are committed; run scripts/make_fixtures.py)", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("meta.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 6, "expected at least 6 fixture cases in {}", dir.display());
    v
}

struct Case {
    name: String,
    meta: serde_json::Value,
    refs: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    seqs: Vec<(Vec<u32>, usize)>,
}

fn load_case(dir: &Path) -> Case {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["format_version"], 1, "{}: unknown fixture format", dir.display());
    let refs = read_all_f32(&dir.join("reference.safetensors")).unwrap();
    let seqs = meta["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(s, m)| {
            let ids: Vec<u32> = refs[&format!("input_ids.{s}")].1.iter().map(|&x| x as u32).collect();
            assert_eq!(ids.len() as u64, m["len"].as_u64().unwrap());
            (ids, m["prompt_len"].as_u64().unwrap() as usize)
        })
        .collect();
    Case { name: dir.file_name().unwrap().to_string_lossy().into(), meta, refs, seqs }
}

#[test]
fn forward_and_backward_match_transformers() {
    let b = CpuBackend::new(None).unwrap();
    for dir in cases() {
        let case = load_case(&dir);
        let model = Llama::load(&b, &dir.join("model")).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        for recompute in [false, true] {
            let batch = Batch::from_sequences(case.seqs.iter().map(|(ids, p)| (ids.as_slice(), *p))).unwrap();
            let mut acts = Activations::new(&b, &model.cfg, batch.len(), recompute).unwrap();
            model.forward(&b, &batch, &mut acts).unwrap();

            // Logits and per-token log-probs, sequence by sequence (packed in one batch).
            let logits = model.logits(&b, &acts).unwrap();
            let logp = b_download(&b, &acts.logp);
            let v = model.cfg.vocab_size;
            let mut row = 0;
            for (s, (ids, p)) in case.seqs.iter().enumerate() {
                let t = ids.len();
                let want = &case.refs[&format!("logits.{s}")].1;
                let got = &logits[row * v..(row + t) * v];
                let err = rel_error(got, want);
                assert!(err < 1e-4, "{} seq {s}: logits relative error {err:.2e}", case.name);
                let want_lp = &case.refs[&format!("token_logprobs.{s}")].1;
                // Our row r holds log p(ids[r+1]) when r+1 >= prompt_len, else 0.
                for r in (p - 1)..(t - 1) {
                    let (g, w) = (logp[row + r], want_lp[r]);
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{} seq {s} row {r}: logp {g} vs {w}", case.name);
                }
                row += t;
            }
            let sums = model.sequence_logprobs(&b, &batch, &acts).unwrap();
            let want_sums = &case.refs["sum_logprobs"].1;
            for (s, (&g, &w)) in sums.iter().zip(want_sums).enumerate() {
                assert!(((g as f32) - w).abs() <= 1e-4 * w.abs().max(1.0), "{} seq {s}: summed logp {g} vs {w}", case.name);
            }

            // Gradients of L = Σ w_s · sum_logprob_s.
            let weights = &case.refs["loss_weights"].1;
            let mut grads = model.alloc_grads(&b).unwrap();
            model.backward(&b, &batch, &mut acts, weights, &mut grads).unwrap();
            let grads = b_download(&b, &grads);
            for e in &model.layout.entries {
                let want = &case.refs.get(&format!("grad.{}", e.name)).unwrap_or_else(|| panic!("{}: no grad.{}", case.name, e.name)).1;
                let err = rel_error(&grads[e.range()], want);
                assert!(err < 1e-4, "{} (recompute {recompute}): gradient of {} relative error {err:.2e}", case.name, e.name);
            }
        }
        eprintln!("{}: logits, log-probs and gradients match ({})", case.name, case.meta["description"]);
    }
}

fn b_download(b: &CpuBackend, buf: &Vec<f32>) -> Vec<f32> {
    use sppo::backend::Backend;
    b.download(buf).unwrap()
}

#[test]
fn greedy_generation_matches_transformers() {
    let b = CpuBackend::new(None).unwrap();
    for dir in cases() {
        let case = load_case(&dir);
        let mut model = Llama::load(&b, &dir.join("model")).unwrap();
        for (gi, g) in case.meta["greedy"].as_array().unwrap().iter().enumerate() {
            let prompt: Vec<u32> = g["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let want: Vec<u32> = g["output"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let margins: Vec<f64> = g["top2_margin"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let opts = GenOptions {
                sampling: SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0 },
                max_new_tokens: want.len(),
                eos_ids: vec![],
                seed: 0,
                iteration: 0,
                batch_size: 2,
                max_prefill_tokens: 4096,
                weights: Default::default(),
            };
            // Twice in one batch (different slots) and alone: all equal.
            let reqs: Vec<GenRequest> =
                (0..3).map(|s| GenRequest { prompt_id: format!("p{gi}"), sample_index: s, prompt_ids: prompt.clone() }).collect();
            let out = generate(&b, &mut model, &reqs, &opts, |_| {}).unwrap();
            for o in &out {
                assert_eq!(o.tokens, out[0].tokens, "{}: greedy output depends on the slot", case.name);
            }
            let got = &out[0].tokens;
            // Equal token for token, except after a step whose top-2 margin is below f32 noise.
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if g != w {
                    assert!(margins[i] < 1e-4, "{} greedy {gi}: token {i} is {g}, transformers gives {w} (margin {})", case.name, margins[i]);
                    break;
                }
            }
        }
    }
}
