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

fn answer(qk: QkPermutation) -> Option<String> {
    let gguf = common::smollm2_gguf()?;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2");
    convert_gguf_to_hf_with(&gguf, &dir, OutDtype::F32, qk).unwrap();
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
