//! `sppo eval`, the run's eval stage, plots and the exact class distribution on games, on the tiny
//! random Llama with the real SmolLM2 tokenizer and chat template (as tests/run_loop.rs).

mod common;

use common::repo_root;
use sppo::backend::cpu::CpuBackend;
use sppo::logprobs::TextCodec;
use sppo::model::Llama;
use sppo::oracle::game::Game;
use sppo::run::classes::{class_distribution, ExpandLimits, TokenTable};
use std::path::{Path, PathBuf};
use std::process::Command;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn tiny_model(tmp: &Path) -> PathBuf {
    let model = tmp.join("model");
    copy_dir(
        &repo_root().join("tests/fixtures/reward/smollm2_judge/model"),
        &model,
    );
    copy_dir(&repo_root().join("tests/fixtures/chat/smollm2"), &model);
    model
}

fn sppo(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sppo"))
        .args(args)
        .env("SPPO_THREADS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sppo {args:?} failed:\n{stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn assert_close_json(got: &serde_json::Value, want: &serde_json::Value, at: &str) {
    match (got, want) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: {got} vs {want}");
            for (k, v) in b {
                assert_close_json(&a[k], v, &format!("{at}.{k}"));
            }
        }
        (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_close_json(x, y, &format!("{at}[{i}]"));
            }
        }
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                "{at}: {x} vs {y}"
            );
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

fn png_size(p: &Path) -> (u32, u32) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        p.display()
    );
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

#[test]
fn run_evaluates_each_iteration_and_sppo_eval_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let prompts = tmp.path().join("prompts.jsonl");
    let lines: Vec<String> = [
        "Say hi.",
        "Name a colour.",
        "Count to three.",
        "Pick a fruit.",
        "Name a city.",
        "Pick a number.",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| serde_json::json!({"id": format!("p{i}"), "prompt": p}).to_string())
    .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let run_dir = tmp.path().join("run");
    let config = tmp.path().join("sppo.toml");
    std::fs::write(
        &config,
        format!(
            "model = {model:?}\nprompts = {prompts:?}\noracle = 'game:rps'\nrun_dir = {run_dir:?}\niterations = 2\nnum_samples = 3\n\
             eval_prompts = 2\neval_num_samples = 2\nmax_new_tokens = 3\nper_device_train_batch_size = 1\ngradient_accumulation_steps = 1\n\
             learning_rate = 1e-3\nbeta = 0.1\nmax_length = 256\nmax_prompt_length = 128\nsave_steps = 1\nseed = 5\n"
        ),
    )
    .unwrap();
    sppo(&["run", "--config", config.to_str().unwrap()]);

    let manifest = read_json(&run_dir.join("manifest.json"));
    for t in ["1", "2"] {
        assert!(
            manifest["iterations"][t]["eval"].is_object(),
            "iteration {t}: eval stage not recorded: {manifest}"
        );
    }
    let report = read_json(&run_dir.join("eval.json"));
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 3, "base + 2 iterations: {report}");
    assert!(policies[0]["win_rate_vs_base"].is_null());
    for p in &policies[1..] {
        for key in ["win_rate_vs_base", "win_rate_vs_previous"] {
            let iv = &p[key];
            let (lo, mean, hi) = (
                iv["lo"].as_f64().unwrap(),
                iv["mean"].as_f64().unwrap(),
                iv["hi"].as_f64().unwrap(),
            );
            assert!(
                (0.0..=1.0).contains(&mean) && lo <= mean && mean <= hi,
                "{key}: {iv}"
            );
        }
        // Iteration 1's previous policy is the base.
        if p["iteration"] == 1 {
            assert_eq!(p["win_rate_vs_base"], p["win_rate_vs_previous"]);
        }
    }
    for p in policies {
        let g = &p["game"];
        let probs: Vec<f64> = serde_json::from_value(g["class_probs"].clone()).unwrap();
        assert_eq!(probs.len(), 3);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{probs:?}");
        let e = g["exploitability"].as_f64().unwrap();
        let m = g["mixture_exploitability"].as_f64().unwrap();
        assert!((0.0..=0.5).contains(&e) && (0.0..=0.5).contains(&m), "{g}");
        assert!(g["unresolved_mass"].as_f64().unwrap() < 0.05, "{g}");
    }
    // The base's mixture is itself.
    assert_eq!(
        policies[0]["game"]["exploitability"],
        policies[0]["game"]["mixture_exploitability"]
    );

    // metrics.jsonl: the step lines plus one eval line per iteration.
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let eval_lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval_iteration").is_some())
        .collect();
    assert_eq!(eval_lines.len(), 2, "{metrics}");
    assert_eq!(
        eval_lines[1]["eval_win_rate_vs_base"],
        policies[2]["win_rate_vs_base"]["mean"]
    );
    assert_eq!(
        std::fs::read_to_string(run_dir.join("eval.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // AlpacaEval files: one per policy, one record per prompt.
    for t in 0..3 {
        let a = read_json(&run_dir.join(format!("alpaca_eval/iter-{t}.json")));
        let rows = a.as_array().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["instruction"], "Name a city.");
        let want = if t == 0 {
            "run-base".to_string()
        } else {
            format!("run-iter{t}")
        };
        assert!(
            rows[0]["output"].is_string() && rows[0]["generator"] == want.as_str(),
            "{a}"
        );
    }
    let (w, h) = png_size(&run_dir.join("plots/training.png"));
    assert!(w >= 800 && h >= 600, "{w}x{h}");
    png_size(&run_dir.join("plots/eval.png"));

    // `sppo eval` on the finished run: the cached samples give the same figures.
    let before = read_json(&run_dir.join("eval.json"));
    let (stdout, stderr) = sppo(&["eval", "--run-dir", run_dir.to_str().unwrap()]);
    assert!(stdout.contains("iteration 2: win-rate vs base"), "{stdout}");
    assert!(
        !stderr.contains("sampling"),
        "the cached samples were not reused:\n{stderr}"
    );
    // Equal up to the last bit of a float read back from the cache.
    assert_close_json(&read_json(&run_dir.join("eval.json")), &before, "eval.json");
    // More samples: new samples, same structure.
    sppo(&[
        "eval",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--num-samples",
        "3",
    ]);
    assert_eq!(read_json(&run_dir.join("eval.json"))["num_samples"], 3);
    std::fs::remove_dir_all(run_dir.join("plots")).unwrap();
    sppo(&["plot", "--run-dir", run_dir.to_str().unwrap()]);
    png_size(&run_dir.join("plots/training.png"));
    png_size(&run_dir.join("plots/eval.png"));

    // A finished run resumed does not evaluate again.
    let (_, again) = sppo(&["run", "--resume", run_dir.to_str().unwrap()]);
    assert!(!again.contains("evaluating"), "{again}");
}

#[test]
fn eval_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sppo"))
        .args(["eval", "--run-dir", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("config.json"),
        "{err}"
    );
}

/// The class distribution with one-token responses is exactly the first-token softmax summed by
/// class (EOS = the empty response = class 0); with longer responses it matches the empirical
/// class frequencies of sampled responses.
#[test]
fn class_distribution_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path());
    let b = CpuBackend::new(Some(2)).unwrap();
    let mut model = Llama::load(&b, &dir).unwrap();
    let codec = TextCodec::from_model_dir(&dir, model.cfg.vocab_size)
        .unwrap()
        .unwrap();
    let game = Game::parse("rps", &[]).unwrap();
    let msgs = vec![sppo::chat::Message {
        role: "user".into(),
        content: "Pick one.".into(),
    }];
    let ids = sppo::chat::encode_chat(&codec.tokenizer, &codec.template, &msgs, true).unwrap();
    let table = TokenTable::new(&codec.tokenizer, model.cfg.vocab_size).unwrap();
    let eos = vec![2, codec.end_of_turn];

    // One token: an independent sum over the full softmax.
    let one = ExpandLimits {
        max_new_tokens: 1,
        ..Default::default()
    };
    let d = class_distribution(
        &b,
        &mut model,
        &codec.tokenizer,
        &table,
        &eos,
        &game,
        &ids,
        &one,
    )
    .unwrap();
    let batch = sppo::model::Batch::from_sequences([(ids.as_slice(), ids.len())]).unwrap();
    let mut acts = sppo::model::Activations::new(&b, &model.cfg, batch.len(), false).unwrap();
    model.forward(&b, &batch, &mut acts).unwrap();
    let logits = model.logits(&b, &acts).unwrap();
    let v = model.cfg.vocab_size;
    let row = &logits[(ids.len() - 1) * v..ids.len() * v];
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let mut want = [0.0f64; 3];
    for (t, &x) in row.iter().enumerate() {
        let text = if eos.contains(&(t as u32)) {
            String::new()
        } else {
            codec.tokenizer.decode(&[t as u32], true).unwrap()
        };
        want[game.classify(&text)] += (x as f64 - max).exp() / z;
    }
    // The cached forward and the full forward round f32 logits differently: ~1e-7 apart.
    for (c, w) in want.iter().enumerate() {
        assert!(
            (d.probs[c] - w).abs() < 1e-6,
            "class {c}: {} vs {w}",
            d.probs[c]
        );
    }
    assert_eq!(d.unresolved, 0.0);

    // Four tokens: undecided first tokens (whitespace, specials, partial UTF-8) are expanded.
    let four = ExpandLimits {
        max_new_tokens: 4,
        max_expansions: 1024,
        min_mass: 1e-7,
    };
    let d4 = class_distribution(
        &b,
        &mut model,
        &codec.tokenizer,
        &table,
        &eos,
        &game,
        &ids,
        &four,
    )
    .unwrap();
    assert!(d4.unresolved < 1e-3, "{d4:?}");
    let n = 1000u32;
    let records = vec![sppo::prompts::PromptRecord {
        id: "x".into(),
        messages: msgs.clone(),
        reference: None,
    }];
    let opts = sppo::generate::GenOptions {
        sampling: sppo::sampling::SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
        },
        max_new_tokens: 4,
        eos_ids: vec![],
        seed: 11,
        iteration: 0,
        batch_size: 64,
        max_prefill_tokens: 4096,
        weights: Default::default(),
    };
    let prompt_ids = sppo::generate::encode_records(&codec, &records).unwrap();
    let (lines, _) =
        sppo::generate::generate_records(&b, &mut model, &codec, &dir, &records, &prompt_ids, n, opts, |_| {})
            .unwrap();
    let responses: Vec<String> = serde_json::from_value(lines[0]["responses"].clone()).unwrap();
    let freq = game.empirical_policy(&responses);
    for (c, &p) in d4.probs.iter().enumerate() {
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (freq[c] - p).abs() < 4.0 * sd + 1e-3,
            "class {c}: sampled {} vs exact {p} (sd {sd})",
            freq[c]
        );
    }
    println!(
        "exact {:?} (unresolved {:.2e}), sampled {freq:?}",
        d4.probs, d4.unresolved
    );
}
