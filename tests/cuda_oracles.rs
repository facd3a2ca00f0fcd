//! The model oracles on the CUDA backend, built as `sppo run` and `sppo rank --device cuda` build
//! them (`OracleSpec::build_on` with a `CudaBackend`), against the same oracle on the CPU: the
//! similarity oracle on the shipped all-MiniLM-L6-v2 (`.cache`, scripts/setup; skipped with a
//! printed reason when missing), the reward oracle and the judge on the fixtures of
//! tests/fixtures/reward (random SmolLM2-vocabulary models with the SmolLM2 tokenizer). Scores and
//! preference matrices agree within f32 tolerances at `Precision::F32` and within bf16 tolerances
//! at `Precision::Bf16`. Needs a GPU: without one each test prints why it skips.

mod common;

use common::{assert_close, print_skip, repo_root};
use serde_json::Value;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::kernel_choice::KernelChoice;
use sppo::backend::cuda::CudaBackend;
use sppo::backend::Precision;
use sppo::oracle::{Judgement, OracleInput, OracleSpec};
use std::path::{Path, PathBuf};

/// (name, backend) for f32 and bf16 storage, or None (skip printed) without a GPU.
fn gpus(test: &str) -> Option<Vec<(&'static str, CudaBackend)>> {
    if let Some(reason) = sppo::backend::cuda::probe().unavailable_reason() {
        print_skip(test, &reason);
        return None;
    }
    Some(
        [("f32", Precision::F32), ("bf16", Precision::Bf16)]
            .into_iter()
            .map(|(name, p)| (name, CudaBackend::new(0, KernelChoice::default(), p).unwrap_or_else(|e| panic!("{test}: a GPU was found but: {e:#}"))))
            .collect(),
    )
}

/// Scores (when the oracle gives them) and every matrix entry of `got` against `want`.
fn compare(what: &str, got: &[Judgement], want: &[Judgement], score_atol: f32, p_atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: judgements");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        match (&g.scores, &w.scores) {
            (Some(gs), Some(ws)) => assert_close(&format!("{what}: prompt {i} scores"), &to32(gs), &to32(ws), score_atol, 0.0),
            (None, None) => {}
            _ => panic!("{what}: prompt {i}: scores on one backend only"),
        }
        assert_close(&format!("{what}: prompt {i} matrix"), &to32(g.matrix.as_slice()), &to32(w.matrix.as_slice()), p_atol, 0.0);
    }
}

/// Builds `spec` on the CPU and on each GPU backend and compares their judgements of `batch`.
/// Tolerances: (score, P) at f32, then at bf16.
fn check_spec(test: &str, spec: &str, batch: &[OracleInput<'_>], f32_tol: (f32, f32), bf16_tol: (f32, f32)) {
    let Some(gpus) = gpus(test) else { return };
    let spec = OracleSpec::parse(spec).unwrap();
    let cpu = CpuBackend::new(None).unwrap();
    let want = spec.build_on(&cpu).unwrap().judge(batch).unwrap_or_else(|e| panic!("{test}: cpu: {e:#}"));
    for (name, gpu) in &gpus {
        let mut oracle = spec.build_on(gpu).unwrap_or_else(|e| panic!("{test}: building {spec} on cuda {name}: {e:#}"));
        let got = oracle.judge(batch).unwrap_or_else(|e| panic!("{test}: cuda {name}: {e:#}"));
        let (s, p) = if *name == "f32" { f32_tol } else { bf16_tol };
        compare(&format!("{test} cuda {name}"), &got, &want, s, p);
        // A second call on the same backend (pools grown, modules loaded) gives the same values.
        let again = oracle.judge(batch).unwrap();
        assert_eq!(again, got, "{test} cuda {name}: a repeated call differs");
    }
}

#[test]
fn cuda_similarity_oracle_matches_cpu() {
    let test = "cuda_similarity_oracle_matches_cpu";
    let dir = repo_root().join(".cache/models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        print_skip(test, &format!("{} is missing (run scripts/setup)", dir.display()));
        return;
    }
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let a = s(&["Paris is the capital of France.", "I think it is Lyon.", "Bananas are rich in potassium.", "", "The capital of France is Paris."]);
    let b = s(&["Call list.reverse(), or slice with [::-1] for a reversed copy.", "Reversing a list is impossible.", &"word ".repeat(400)]);
    let batch = [
        OracleInput { prompt: "What is the capital of France?", responses: &a, reference: Some("The capital of France is Paris.") },
        OracleInput { prompt: "How do I reverse a list in Python?", responses: &b, reference: Some("Use my_list.reverse(), or my_list[::-1] for a copy.") },
    ];
    // Cosines in [-1, 1]; P = σ(Δcos / 0.05) moves by up to 5 × the cosine error.
    check_spec(test, &format!("similarity:{}", dir.display()), &batch, (1e-4, 5e-4), (2e-2, 1e-1));
}

/// The fixture `case` of tests/fixtures/reward assembled with the SmolLM2 tokenizer and chat
/// template in a temp dir (as tests/reward_judge.rs does), and its reference.json.
fn assemble(case: &str) -> (tempfile::TempDir, Value) {
    let root = repo_root();
    let fixture = root.join("tests/fixtures/reward").join(case);
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &Path, name: &str| std::fs::copy(from.join(name), dir.path().join(name)).unwrap_or_else(|e| panic!("{}: {e}", from.join(name).display()));
    for f in ["config.json", "model.safetensors"] {
        copy(&fixture.join("model"), f);
    }
    let chat: PathBuf = root.join("tests/fixtures/chat/smollm2");
    copy(&chat, "tokenizer.json");
    copy(&chat, "tokenizer_config.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap()).unwrap();
    (dir, reference)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

#[test]
fn cuda_reward_oracle_matches_cpu() {
    let (dir, r) = assemble("smollm2_cls");
    let prompt = r["prompt"].as_str().unwrap();
    let responses = strings(&r["responses"]);
    let reversed: Vec<String> = responses.iter().rev().cloned().collect();
    let batch = [
        OracleInput { prompt, responses: &responses, reference: None },
        OracleInput { prompt, responses: &reversed, reference: None },
    ];
    check_spec("cuda_reward_oracle_matches_cpu", &format!("reward:{}", dir.path().display()), &batch, (1e-4, 1e-4), (5e-2, 2e-2));
}

#[test]
fn cuda_judge_oracle_matches_cpu() {
    let (dir, r) = assemble("smollm2_judge");
    let prompt = r["prompt"].as_str().unwrap();
    let responses = strings(&r["responses"]);
    let batch = [OracleInput { prompt, responses: &responses, reference: None }];
    check_spec("cuda_judge_oracle_matches_cpu", &format!("judge:{}", dir.path().display()), &batch, (1e-4, 1e-4), (5e-2, 2e-2));
}
