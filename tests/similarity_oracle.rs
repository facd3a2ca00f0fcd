//! The `similarity:DIR` oracle on all-MiniLM-L6-v2: preference-matrix properties, ranking of a
//! response equal to the reference, the missing-reference error, batched calls equal to
//! one-prompt calls, and the pipeline files it reads. Skips (with a printed reason) when the model
//! is not set up (scripts/setup).

mod common;

use common::{print_skip, repo_root};
use sppo::oracle::similarity::{Pipeline, SimilarityOracle, DEFAULT_TEMPERATURE};
use sppo::oracle::{sigmoid, Oracle, OracleInput};
use std::path::PathBuf;

fn minilm() -> Option<SimilarityOracle> {
    let d: PathBuf = repo_root().join(".cache/models/all-MiniLM-L6-v2");
    if !d.join("model.safetensors").exists() {
        print_skip("similarity_oracle", &format!("{} is missing (run scripts/setup)", d.display()));
        return None;
    }
    Some(SimilarityOracle::load(&d, DEFAULT_TEMPERATURE).unwrap_or_else(|e| panic!("{e:#}")))
}

struct Case {
    prompt: &'static str,
    reference: Option<&'static str>,
    responses: Vec<String>,
}

fn cases() -> Vec<Case> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    vec![
        Case {
            prompt: "What is the capital of France?",
            reference: Some("The capital of France is Paris."),
            responses: s(&[
                "Paris is the capital of France.",
                "I think it is Lyon.",
                "Bananas are rich in potassium.",
                "The capital of France is Paris.",
                "",
            ]),
        },
        Case {
            prompt: "How do I reverse a list in Python?",
            reference: Some("Use my_list.reverse() to reverse in place, or my_list[::-1] to get a reversed copy."),
            responses: s(&[
                "Call list.reverse(), or slice with [::-1] for a reversed copy.",
                "Python is a programming language created by Guido van Rossum.",
                "for i in range(len(xs)//2): xs[i], xs[-1-i] = xs[-1-i], xs[i]",
                "Reversing a list is impossible.",
            ]),
        },
        Case {
            prompt: "Name a primary colour.",
            reference: Some("Red is a primary colour."),
            responses: s(&["Blue.", "Red", "Green is a colour", "Seven", "Red is a primary colour!", "😀"]),
        },
    ]
}

fn inputs(cases: &[Case]) -> Vec<OracleInput<'_>> {
    cases.iter().map(|c| OracleInput { prompt: c.prompt, responses: &c.responses, reference: c.reference }).collect()
}

#[test]
fn matrices_are_valid_and_match_the_scores() {
    let Some(mut oracle) = minilm() else { return };
    let cases = cases();
    let out = oracle.judge(&inputs(&cases)).unwrap();
    assert_eq!(out.len(), cases.len());
    for (c, j) in cases.iter().zip(&out) {
        let k = c.responses.len();
        let scores = j.scores.as_ref().expect("similarity oracle returns scores");
        assert_eq!(scores.len(), k);
        assert_eq!(j.matrix.k(), k);
        for i in 0..k {
            assert!(scores[i].is_finite() && (-1.0..=1.0 + 1e-6).contains(&scores[i]), "{}: score {i} = {}", c.prompt, scores[i]);
            assert_eq!(j.matrix.get(i, i), 0.5);
            for jj in 0..k {
                let p = j.matrix.get(i, jj);
                assert!((0.0..=1.0).contains(&p), "{}: P[{i}][{jj}] = {p}", c.prompt);
                assert!((p + j.matrix.get(jj, i) - 1.0).abs() < 1e-12, "{}: not antisymmetric at {i},{jj}", c.prompt);
                if i != jj {
                    let want = sigmoid((scores[i] - scores[jj]) / DEFAULT_TEMPERATURE);
                    assert!((p - want).abs() < 1e-12, "{}: P[{i}][{jj}] = {p}, σ(Δs/τ) = {want}", c.prompt);
                }
            }
        }
        // Scores are cosines of the embeddings.
        let mut texts: Vec<&str> = vec![c.reference.unwrap()];
        texts.extend(c.responses.iter().map(String::as_str));
        let e = oracle.embed(&texts).unwrap();
        for i in 0..k {
            let cos: f64 = e[0].iter().zip(&e[i + 1]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            assert!((cos - scores[i]).abs() < 1e-5, "{}: score {i} {} vs cosine {cos}", c.prompt, scores[i]);
        }
        println!("{:<40} scores {:?}", c.prompt, scores.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>());
    }
}

#[test]
fn response_equal_to_reference_ranks_first() {
    let Some(mut oracle) = minilm() else { return };
    let cases = cases();
    let out = oracle.judge(&inputs(&cases)).unwrap();
    for (c, j) in cases.iter().zip(&out) {
        let scores = j.scores.as_ref().unwrap();
        let best = (0..scores.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap();
        let worst = (0..scores.len()).min_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap();
        if let Some(same) = c.responses.iter().position(|r| r == c.reference.unwrap()) {
            assert_eq!(best, same, "{}: the verbatim reference is not ranked first: {scores:?}", c.prompt);
            assert!(scores[same] > 1.0 - 1e-5, "{}: cosine of identical texts {}", c.prompt, scores[same]);
            for o in 0..scores.len() {
                if o != same {
                    assert!(j.matrix.get(same, o) > 0.5, "{}: P[{same}][{o}] = {}", c.prompt, j.matrix.get(same, o));
                }
            }
        }
        // And an off-topic response loses: a meaning check, not only an identity check.
        assert_ne!(best, worst);
    }
    let s = out[0].scores.as_ref().unwrap();
    assert!(s[0] > s[1] && s[1] > s[2], "France: paraphrase > wrong city > bananas expected, got {s:?}");
    let s = out[1].scores.as_ref().unwrap();
    assert!(s[0] > s[1] && s[0] > s[3], "Python: the right answer should beat the off-topic ones, got {s:?}");
}

#[test]
fn missing_reference_is_an_error_naming_the_prompt() {
    let Some(mut oracle) = minilm() else { return };
    let mut cases = cases();
    cases[1].reference = None;
    let e = oracle.judge(&inputs(&cases)).unwrap_err().to_string();
    assert!(e.contains("prompt 1") && e.contains("How do I reverse a list") && e.contains("reference"), "{e}");
}

#[test]
fn batched_call_equals_one_prompt_at_a_time() {
    let Some(mut oracle) = minilm() else { return };
    let cases = cases();
    let all = oracle.judge(&inputs(&cases)).unwrap();
    // A small token budget splits the batch into many packed chunks: still the same numbers.
    oracle.token_budget = 16;
    for (i, c) in cases.iter().enumerate() {
        let one = oracle.judge(&inputs(std::slice::from_ref(c))).unwrap();
        let (a, b) = (all[i].scores.as_ref().unwrap(), one[0].scores.as_ref().unwrap());
        for (r, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-6, "prompt {i} response {r}: batched {x} vs alone {y}");
        }
        for p in 0..c.responses.len() {
            for q in 0..c.responses.len() {
                assert!((all[i].matrix.get(p, q) - one[0].matrix.get(p, q)).abs() < 1e-4);
            }
        }
    }
    assert!(oracle.judge(&[]).unwrap().is_empty());
    assert!(oracle.name().starts_with("similarity:"));
}

#[test]
fn pipeline_files_are_read_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A plain BERT directory: mean pooling, no normalisation, the model's positions.
    assert_eq!(Pipeline::from_dir(d, 512).unwrap(), Pipeline { max_seq_length: 512, normalize: false });
    std::fs::write(d.join("sentence_bert_config.json"), r#"{"max_seq_length": 256, "do_lower_case": false}"#).unwrap();
    std::fs::write(
        d.join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    std::fs::create_dir(d.join("1_Pooling")).unwrap();
    std::fs::write(d.join("1_Pooling/config.json"), r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#).unwrap();
    assert_eq!(Pipeline::from_dir(d, 512).unwrap(), Pipeline { max_seq_length: 256, normalize: true });
    // max_seq_length never exceeds the position table.
    assert_eq!(Pipeline::from_dir(d, 128).unwrap().max_seq_length, 128);

    std::fs::write(d.join("1_Pooling/config.json"), r#"{"pooling_mode_mean_tokens": false, "pooling_mode_cls_token": true}"#).unwrap();
    let e = Pipeline::from_dir(d, 512).unwrap_err().to_string();
    assert!(e.contains("1_Pooling") && e.contains("mean pooling"), "{e}");
    std::fs::write(d.join("1_Pooling/config.json"), r#"{"pooling_mode_mean_tokens": true}"#).unwrap();
    std::fs::write(d.join("modules.json"), r#"[{"type":"sentence_transformers.models.Dense","path":"2_Dense"}]"#).unwrap();
    let e = Pipeline::from_dir(d, 512).unwrap_err().to_string();
    assert!(e.contains("modules.json") && e.contains("Dense"), "{e}");
}
