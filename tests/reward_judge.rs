//! `reward:` and `judge:` oracles against transformers (fixtures from
//! `scripts/make_reward_fixtures.py`, format in its docstring): sequence-classifier rewards at the
//! pooled position (id level, Llama and Mistral), the text-level reward oracle with the SmolLM2
//! tokenizer and template, the judge's answer-token probabilities and pair averaging, error
//! messages, and a smoke test of the real SmolLM2-135M-Instruct as a judge.

mod common;

use common::assert_close;
use serde_json::Value;
use sppo::backend::cpu::CpuBackend;
use sppo::model::Llama;
use sppo::oracle::judge::{pair_matrix, JudgePrompt};
use sppo::oracle::reward::{pooled_position, sequence_rewards};
use sppo::oracle::{JudgeOracle, Oracle, OracleInput, RewardOracle};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(case: &str) -> PathBuf {
    root().join("tests/fixtures/reward").join(case)
}

fn reference(case: &str) -> Value {
    let path = fixture(case).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(v["format_version"], 1, "{}: unknown format", path.display());
    v
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().expect("number")
}

/// A model folder assembled in a temp dir: the fixture's weights + config, and the SmolLM2
/// tokenizer (and, with `template`, its tokenizer_config.json carrying the chat template).
fn assemble(case: &str, template: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(case).join("model").join(f), dir.path().join(f)).expect("copy model file");
    }
    let chat = root().join("tests/fixtures/chat/smollm2");
    std::fs::copy(chat.join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copy tokenizer");
    if template {
        std::fs::copy(chat.join("tokenizer_config.json"), dir.path().join("tokenizer_config.json")).expect("copy tokenizer config");
    }
    dir
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn pooled_position_rule() {
    // transformers 5: the rightmost non-pad token; 0 when all are pads; the last without a pad id.
    assert_eq!(pooled_position(&[5, 3, 7, 3, 3], Some(3)), 2);
    assert_eq!(pooled_position(&[5, 6, 7], Some(3)), 2);
    assert_eq!(pooled_position(&[3, 3], Some(3)), 0);
    assert_eq!(pooled_position(&[3, 3], None), 1);
}

/// Rewards of raw token sequences equal transformers' pooled logits; the Llama case has a pad id
/// (mid-text, trailing, leading, all pads), the Mistral case none and a sliding window.
#[test]
fn id_level_rewards_match_transformers() {
    let b = CpuBackend::new(Some(2)).expect("backend");
    for case in ["llama_cls", "mistral_cls"] {
        let r = reference(case);
        let mut model = Llama::load(&b, &fixture(case).join("model")).expect("load classifier");
        assert_eq!(model.cfg.num_labels, Some(1));
        let pad = r["pad_token_id"].as_u64().map(|p| p as u32);
        assert_eq!(model.cfg.pad_token_id, pad, "{case}: pad id from config.json");
        let seqs: Vec<Vec<u32>> = r["sequences"].as_array().expect("sequences").iter().map(|s| ids(&s["input_ids"])).collect();
        let want: Vec<f32> = r["sequences"].as_array().expect("sequences").iter().map(|s| f(&s["reward"]) as f32).collect();
        for (s, entry) in seqs.iter().zip(r["sequences"].as_array().expect("sequences")) {
            assert_eq!(pooled_position(s, pad), entry["pooled_index"].as_u64().expect("index") as usize, "{case}: {s:?}");
        }
        // One packed forward, and forwards of at most 8 tokens (several batches).
        for budget in [4096, 8] {
            let got: Vec<f32> = sequence_rewards(&b, &mut model, &seqs, budget).expect("rewards").iter().map(|&x| x as f32).collect();
            assert_close(&format!("{case} rewards (budget {budget})"), &got, &want, 1e-6, 1e-4);
        }
    }
}

/// The pooling rule is what makes the pad cases pass: scoring the mid-pad sequence at its last
/// token, or before its first pad (the pre-4.48 rule), gives other numbers.
#[test]
fn pooling_rule_matters() {
    let b = CpuBackend::new(Some(2)).expect("backend");
    let r = reference("llama_cls");
    let mut model = Llama::load(&b, &fixture("llama_cls").join("model")).expect("load");
    let entry = &r["sequences"][3];
    let s = ids(&entry["input_ids"]);
    assert_eq!(s, vec![5, 17, 3, 42, 8, 3, 3, 30, 3]);
    let want = f(&entry["reward"]);
    // Before the first pad: the prefix [5, 17] has no pad, so it is scored at its last token.
    let old_rule = sequence_rewards(&b, &mut model, &[s[..2].to_vec()], 4096).expect("reward")[0];
    assert!((old_rule - want).abs() > 1e-2 * want.abs().max(1.0), "old rule {old_rule} vs {want}");
    // At the last token (a trailing pad): replace it with a non-pad id to force the last position.
    let mut last = s.clone();
    last.push(9);
    let at_end = sequence_rewards(&b, &mut model, &[last], 4096).expect("reward")[0];
    assert!((at_end - want).abs() > 1e-2 * want.abs().max(1.0), "last-token {at_end} vs {want}");
}

/// The text-level oracle: SmolLM2 tokenizer + ChatML template on a random classifier with the
/// SmolLM2 vocabulary; token ids, rewards and the Bradley–Terry matrix against transformers.
#[test]
fn reward_oracle_text_matches_transformers() {
    let r = reference("smollm2_cls");
    let prompt = r["prompt"].as_str().expect("prompt");
    let responses: Vec<String> = r["responses"].as_array().expect("responses").iter().map(|x| x.as_str().expect("str").to_string()).collect();
    for (template, key) in [(true, "templated"), (false, "plain")] {
        let dir = assemble("smollm2_cls", template);
        let mut oracle = RewardOracle::load(dir.path()).expect("load reward oracle").with_max_batch_tokens(64);
        assert_eq!(oracle.has_chat_template(), template);
        let per = r["per_response"].as_array().expect("per_response");
        for (resp, want) in responses.iter().zip(per) {
            assert_eq!(oracle.encode(prompt, resp).expect("encode"), ids(&want[key]["input_ids"]), "{key}: ids of {resp:?}");
        }
        let want: Vec<f32> = per.iter().map(|p| f(&p[key]["reward"]) as f32).collect();
        // Two prompts in one call (packed across prompts); the second lists the responses reversed.
        let reversed: Vec<String> = responses.iter().rev().cloned().collect();
        let batch = [
            OracleInput { prompt, responses: &responses, reference: None },
            OracleInput { prompt, responses: &reversed, reference: None },
        ];
        let out = oracle.judge(&batch).expect("judge");
        assert_eq!(out.len(), 2);
        let scores = out[0].scores.clone().expect("reward oracle returns scores");
        let got: Vec<f32> = scores.iter().map(|&x| x as f32).collect();
        assert_close(&format!("{key} rewards"), &got, &want, 1e-6, 1e-4);
        let back: Vec<f64> = out[1].scores.clone().expect("scores").into_iter().rev().collect();
        assert_close(&format!("{key} rewards, reversed prompt"), &back.iter().map(|&x| x as f32).collect::<Vec<_>>(), &want, 1e-6, 1e-4);
        let m = &out[0].matrix;
        for i in 0..3 {
            for j in 0..3 {
                let bt = if i == j { 0.5 } else { 1.0 / (1.0 + (scores[j] - scores[i]).exp()) };
                assert!((m.get(i, j) - bt).abs() < 1e-12, "{key}: P[{i}][{j}] = {} vs σ(r_i − r_j) = {bt}", m.get(i, j));
            }
        }
        println!("{key}: rewards {scores:?}");
    }
}

#[test]
fn reward_oracle_errors() {
    // A causal LM is a judge, not a reward model.
    let causal = assemble("smollm2_judge", true);
    let e = err_text(RewardOracle::load(causal.path()));
    assert!(e.contains("judge:") && e.contains("config.json"), "{e}");
    // More than one label.
    let two = assemble("smollm2_cls", true);
    let cfg_path = two.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
    cfg["id2label"] = serde_json::json!({"0": "bad", "1": "good"});
    cfg["label2id"] = serde_json::json!({"bad": 0, "good": 1});
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let e = err_text(RewardOracle::load(two.path()));
    assert!(e.contains("one label") && e.contains("has 2"), "{e}");
    // No tokenizer.json.
    let e = err_text(RewardOracle::load(&fixture("smollm2_cls").join("model")));
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    // A classifier cannot judge.
    let cls = assemble("smollm2_cls", true);
    let e = err_text(JudgeOracle::load(cls.path(), None));
    assert!(e.contains("reward:"), "{e}");
    // A judging prompt without a placeholder names its file.
    let judge = assemble("smollm2_judge", true);
    let bad = judge.path().join("bad_prompt.txt");
    std::fs::write(&bad, "Compare {response_a} and {response_b}.").expect("write");
    let e = err_text(JudgeOracle::load(judge.path(), Some(bad.clone())));
    assert!(e.contains("bad_prompt.txt") && e.contains("{prompt}"), "{e}");
}

#[test]
fn judge_prompt_fill_is_single_pass() {
    let p = JudgePrompt::new("Q: {prompt}\nA: {response_a}\nB: {response_b}\n{other} {", "inline").expect("prompt");
    assert_eq!(p.fill("x {response_b}", "a", "b"), "Q: x {response_b}\nA: a\nB: b\n{other} {");
    let shipped = std::fs::read_to_string(root().join("data/judge_prompt.txt")).expect("data/judge_prompt.txt");
    assert_eq!(shipped, sppo::oracle::judge::DEFAULT_JUDGE_PROMPT);
}

#[test]
fn pair_averaging_cancels_position_bias() {
    // A judge that always says "A" with probability 0.9: no preference after averaging both orders.
    let m = pair_matrix(3, |_, _| 0.9).expect("matrix");
    assert!(m.rows().iter().flatten().all(|&p| (p - 0.5).abs() < 1e-15));
    // Bradley–Terry preferences plus a constant logit bias toward A: averaging keeps the direction
    // and the matrix is antisymmetric.
    let s = [0.3, -1.0, 2.0];
    let p_a = |i: usize, j: usize| 1.0 / (1.0 + (-(s[i] - s[j] + 1.5f64)).exp());
    let m = pair_matrix(3, p_a).expect("matrix");
    for i in 0..3 {
        assert_eq!(m.get(i, i), 0.5);
        for j in 0..3 {
            assert!((m.get(i, j) + m.get(j, i) - 1.0).abs() < 1e-15);
            if s[i] > s[j] {
                assert!(m.get(i, j) > 0.5, "P[{i}][{j}] = {}", m.get(i, j));
            }
            if i != j {
                assert!((m.get(i, j) - 0.5 * (p_a(i, j) + 1.0 - p_a(j, i))).abs() < 1e-15);
            }
        }
    }
}

/// The judge on a random causal LM with the SmolLM2 vocabulary: answer-token ids, encoded pairs,
/// P(A ≻ B) per ordered pair and the averaged matrix against transformers.
#[test]
fn judge_matches_transformers() {
    let r = reference("smollm2_judge");
    let prompt = r["prompt"].as_str().expect("prompt");
    let responses: Vec<String> = r["responses"].as_array().expect("responses").iter().map(|x| x.as_str().expect("str").to_string()).collect();
    let dir = assemble("smollm2_judge", true);
    let mut judge = JudgeOracle::load(dir.path(), None).expect("load judge").with_max_batch_tokens(300);
    assert_eq!(judge.answer_ids(), [r["token_a"].as_u64().expect("a") as u32, r["token_b"].as_u64().expect("b") as u32]);
    let pairs = r["pairs"].as_array().expect("pairs");
    let mut seqs = Vec::new();
    for p in pairs {
        let (i, j) = (p["i"].as_u64().expect("i") as usize, p["j"].as_u64().expect("j") as usize);
        let enc = judge.encode_pair(prompt, &responses[i], &responses[j]).expect("encode");
        assert_eq!(enc, ids(&p["input_ids"]), "ids of pair ({i}, {j})");
        seqs.push(enc);
    }
    let got: Vec<f32> = judge.first_wins(&seqs).expect("first wins").iter().map(|&x| x as f32).collect();
    let want: Vec<f32> = pairs.iter().map(|p| f(&p["p_a"]) as f32).collect();
    // p ≈ 0.07 and ordered pairs differ by ≥ 3e-5, so 5e-6 separates a swapped pair.
    assert_close("P(A ≻ B) per ordered pair", &got, &want, 5e-6, 0.0);

    let out = judge.judge(&[OracleInput { prompt, responses: &responses, reference: None }]).expect("judge");
    assert!(out[0].scores.is_none());
    let m = &out[0].matrix;
    let got: Vec<f32> = m.rows().into_iter().flatten().map(|x| x as f32).collect();
    let want: Vec<f32> = r["matrix"].as_array().expect("matrix").iter().flat_map(|row| row.as_array().expect("row").iter().map(|x| f(x) as f32)).collect();
    assert_close("averaged matrix", &got, &want, 2e-6, 0.0);
    for i in 0..3 {
        for j in 0..3 {
            assert!((m.get(i, j) + m.get(j, i) - 1.0).abs() < 1e-12);
        }
    }
}

/// The real SmolLM2-135M-Instruct (converted from the GGUF) judging a right and a wrong answer.
#[test]
fn smollm2_as_judge() {
    let gguf = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        println!("skipping: {} not found (scripts/setup downloads it)", gguf.display());
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("smollm2");
    sppo::formats::convert::convert_gguf_to_hf(&gguf, &model_dir, sppo::formats::convert::OutDtype::F32).expect("convert");
    let mut judge = JudgeOracle::load(&model_dir, None).expect("load judge");
    let prompt = "What is the capital of France?";
    let responses = vec!["The capital of France is Paris.".to_string(), "I like turtles.".to_string()];
    let seqs = vec![
        judge.encode_pair(prompt, &responses[0], &responses[1]).expect("encode"),
        judge.encode_pair(prompt, &responses[1], &responses[0]).expect("encode"),
    ];
    let p = judge.first_wins(&seqs).expect("first wins");
    let out = judge.judge(&[OracleInput { prompt, responses: &responses, reference: None }]).expect("judge");
    let m = &out[0].matrix;
    println!(
        "SmolLM2-135M-Instruct judge: p(Paris as A ≻ turtles as B) = {:.4}, p(turtles as A ≻ Paris as B) = {:.4}, \
         averaged P(Paris ≻ turtles) = {:.4}",
        p[0],
        p[1],
        m.get(0, 1)
    );
    assert!((m.get(0, 1) - 0.5 * (p[0] + 1.0 - p[1])).abs() < 1e-9);
    assert!((m.get(0, 1) + m.get(1, 0) - 1.0).abs() < 1e-12);
    assert_eq!(m.get(0, 0), 0.5);
    assert!(p.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)));
}
