//! The real shipped model: SmolLM2-135M-Instruct converted from its GGUF answers the Paris
//! question under greedy decoding through its chat template; undoing llama.cpp's Q/K permutation
//! the wrong way round gives wrong text (so the permutation is really exercised).

mod common;

use sppo::backend::cpu::CpuBackend;
use sppo::chat::{encode_chat, ChatTemplate, Message};
use sppo::formats::convert::{convert_gguf_to_hf_with, OutDtype, QkPermutation};
use sppo::generate::{generate, GenOptions, GenRequest};
use sppo::model::Llama;
use sppo::sampling::SamplingParams;

/// The GGUF converted once per test binary with the correct permutation.
fn converted() -> Option<&'static std::path::Path> {
    static DIR: std::sync::OnceLock<Option<(tempfile::TempDir, std::path::PathBuf)>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = common::smollm2_gguf()?;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("smollm2");
        convert_gguf_to_hf_with(&gguf, &dir, OutDtype::F32, QkPermutation::Undo).unwrap();
        Some((tmp, dir))
    })
    .as_ref()
    .map(|(_, dir)| dir.as_path())
}

fn answer(qk: QkPermutation) -> Option<String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = match qk {
        QkPermutation::Undo => converted()?.to_path_buf(),
        _ => {
            let dir = tmp.path().join("smollm2");
            convert_gguf_to_hf_with(&common::smollm2_gguf()?, &dir, OutDtype::F32, qk).unwrap();
            dir
        }
    };
    let b = CpuBackend::new(None).unwrap();
    let mut model = Llama::load(&b, &dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let template = ChatTemplate::from_model_dir(&dir).unwrap().expect("the GGUF carries a chat template");
    let prompt = encode_chat(&tok, &template, &[Message::user("What is the capital of France?")], true).unwrap();
    let opts = GenOptions {
        sampling: SamplingParams::greedy(),
        max_new_tokens: 12,
        eos_ids: model.cfg.eos_token_ids.clone(),
        seed: 0,
        iteration: 0,
        batch_size: 1,
        max_prefill_tokens: 4096,
        weights: Default::default(),
    };
    let out = generate(&b, &mut model, &[GenRequest { prompt_id: "paris".into(), sample_index: 0, prompt_ids: prompt }], &opts, |_| {}).unwrap();
    Some(tok.decode(&out[0].tokens, true).unwrap())
}

#[test]
fn answers_paris() {
    let Some(text) = answer(QkPermutation::Undo) else { return };
    eprintln!("SmolLM2: {text:?}");
    assert!(text.contains("Paris"), "expected Paris in {text:?}");
}

#[test]
fn forward_permutation_gives_wrong_text() {
    let Some(text) = answer(QkPermutation::Forward) else { return };
    eprintln!("SmolLM2 with the wrong Q/K permutation: {text:?}");
    assert!(!text.contains("The capital of France is Paris"), "the wrong permutation still answered correctly: {text:?}");
}

/// `sppo logprobs` on text inputs (prompt/response and chat messages) equals transformers on the
/// same converted model with TRL's tokenization (fixture from scripts/make_smollm2_fixtures.py).
#[test]
fn text_logprobs_match_transformers() {
    let Some(dir) = converted() else { return };
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::repo_root().join("tests/fixtures/smollm2/logprobs.json")).unwrap()).unwrap();
    let examples = fixture["examples"].as_array().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("in.jsonl");
    let mut text = String::new();
    for e in examples {
        text.push_str(&e["input"].to_string());
        text.push('\n');
        // The same example as token ids: must give the same result without the tokenizer.
        text.push_str(&serde_json::json!({"prompt_ids": e["prompt_ids"], "response_ids": e["response_ids"]}).to_string());
        text.push('\n');
    }
    std::fs::write(&data, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sppo"))
        .args(["logprobs", "--model", dir.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 * examples.len());
    for (i, e) in examples.iter().enumerate() {
        let want = e["sum_logprob"].as_f64().unwrap();
        let n = e["response_ids"].as_array().unwrap().len();
        for line in &lines[2 * i..2 * i + 2] {
            let got = line["sum_logprob"].as_f64().unwrap();
            assert_eq!(line["num_response_tokens"].as_u64().unwrap() as usize, n, "example {i}: response length");
            assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "example {i}: sum logprob {got} vs transformers {want}");
            let toks = line["token_logprobs"].as_array().unwrap();
            for (t, (g, w)) in toks.iter().zip(e["token_logprobs"].as_array().unwrap()).enumerate() {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                assert!((g - w).abs() <= 2e-3 * w.abs().max(1.0), "example {i} token {t}: {g} vs {w}");
            }
        }
    }
}
