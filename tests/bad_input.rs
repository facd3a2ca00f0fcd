//! Bad input gets a clear error naming the file and the problem, a non-zero exit, never a panic.
//! Each case runs the real `sppo` binary.

mod common;

use common::repo_root;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sppo(args: &[&str]) -> (bool, String) {
    sppo_with(args, &[])
}

/// `sppo args` with extra environment variables.
fn sppo_with(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sppo")).args(args).env("SPPO_THREADS", "1").envs(envs.iter().copied()).output().expect("running sppo");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "sppo {args:?} panicked:\n{stderr}");
    (out.status.success(), stderr)
}

fn expect_error(args: &[&str], must_mention: &[&str]) {
    let (ok, stderr) = sppo(args);
    assert!(!ok, "sppo {args:?} succeeded but should have failed");
    for m in must_mention {
        assert!(stderr.contains(m), "sppo {args:?}: the error should mention {m:?}:\n{stderr}");
    }
}

/// A copy of the tiny llama_gqa fixture model to corrupt.
fn model_copy(tmp: &Path) -> PathBuf {
    let src = repo_root().join("tests/fixtures/hf/llama_gqa/model");
    let dst = tmp.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A logprobs data file with one valid token-id example.
fn data_file(tmp: &Path) -> PathBuf {
    let p = tmp.join("data.jsonl");
    write(&p, "{\"prompt_ids\": [1, 5, 9], \"response_ids\": [4, 7]}\n");
    p
}

#[test]
fn valid_token_id_input_works() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let data = data_file(tmp.path());
    let out = tmp.path().join("out.jsonl");
    let (ok, stderr) = sppo(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(out).unwrap().trim()).unwrap();
    assert_eq!(line["num_response_tokens"], 2);
    assert!(line["sum_logprob"].as_f64().unwrap() < 0.0);
}

#[test]
fn missing_config() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    std::fs::remove_file(model.join("config.json")).unwrap();
    let data = data_file(tmp.path());
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], &["config.json", "cannot read"]);
}

#[test]
fn malformed_config() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    write(&model.join("config.json"), "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": ");
    let data = data_file(tmp.path());
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], &["config.json", "malformed JSON"]);
}

#[test]
fn unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap().replace("LlamaForCausalLM", "GPT2LMHeadModel").replace("\"llama\"", "\"gpt2\"");
    write(&model.join("config.json"), &cfg);
    let data = data_file(tmp.path());
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], &["config.json", "GPT2LMHeadModel"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let st = model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let data = data_file(tmp.path());
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], &["model.safetensors"]);
}

#[test]
fn unsupported_tensor_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    // Re-write the checkpoint with one tensor stored as int32.
    let tensors = sppo::model::weights::read_all_f32(&model.join("model.safetensors")).unwrap();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = tensors
        .iter()
        .map(|(name, (shape, vals))| {
            if name == "model.norm.weight" {
                (name.clone(), shape.clone(), vals.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(), safetensors::Dtype::I32)
            } else {
                (name.clone(), shape.clone(), vals.iter().flat_map(|v| v.to_le_bytes()).collect(), safetensors::Dtype::F32)
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        encoded.iter().map(|(n, s, b, d)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(model.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let data = data_file(tmp.path());
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], &["model.norm.weight", "I32"]);
}

#[test]
fn wrong_tensor_shape_and_missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap().replace("\"intermediate_size\": 80", "\"intermediate_size\": 96");
    write(&model.join("config.json"), &cfg);
    let data = data_file(tmp.path());
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], &["model.safetensors", "down_proj", "the config implies"]);
    let cfg = cfg.replace("\"intermediate_size\": 96", "\"intermediate_size\": 80").replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    write(&model.join("config.json"), &cfg);
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], &["model.layers.2", "missing"]);
}

#[test]
fn tokenizer_vocabulary_does_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    // MiniLM's tokenizer (30522 tokens) with a 128-token model.
    let tok = repo_root().join(".cache/models/all-MiniLM-L6-v2/tokenizer.json");
    if !tok.exists() {
        eprintln!("skipped: {} missing (run scripts/setup)", tok.display());
        return;
    }
    std::fs::copy(&tok, model.join("tokenizer.json")).unwrap();
    write(&model.join("tokenizer_config.json"), r#"{"chat_template": "{{ messages[0].content }}", "eos_token": "[SEP]"}"#);
    expect_error(&["generate", "--model", model.to_str().unwrap(), "--prompt", "hi"], &["tokenizer.json", "30522", "128"]);
}

#[test]
fn prompt_longer_than_context() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let p = tmp.path().join("long.jsonl");
    let ids: Vec<String> = (0..300).map(|i| (i % 100).to_string()).collect();
    write(&p, &format!("{{\"prompt_ids\": [{}], \"response_ids\": [3]}}\n", ids.join(",")));
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", p.to_str().unwrap()], &["context", "256"]);
}

#[test]
fn malformed_jsonl_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let p = tmp.path().join("bad.jsonl");
    write(&p, "{\"prompt_ids\": [1, 2], \"response_ids\": [3]}\n\n{\"prompt_ids\": [1, 2], \"response_ids\": [3\n");
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", p.to_str().unwrap()], &["bad.jsonl:3", "malformed JSON"]);
    write(&p, "{\"prompt_ids\": [1, -2], \"response_ids\": [3]}\n");
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", p.to_str().unwrap()], &["bad.jsonl:1", "prompt_ids"]);
    write(&p, "{\"prompt_ids\": [1, 500], \"response_ids\": [3]}\n");
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", p.to_str().unwrap()], &["500", "vocabulary"]);
}

#[test]
fn truncated_gguf() {
    let Some(gguf) = common::smollm2_gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    for frac in [0.0001, 0.01, 0.5] {
        std::fs::write(&cut, &bytes[..(bytes.len() as f64 * frac) as usize]).unwrap();
        let out = tmp.path().join("out");
        expect_error(&["convert", "--from-gguf", cut.to_str().unwrap(), "--out", out.to_str().unwrap()], &["cut.gguf"]);
        assert!(!out.exists(), "a failed conversion left {}", out.display());
    }
}

#[test]
fn missing_prompt_file_and_bad_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    expect_error(&["logprobs", "--model", model.to_str().unwrap(), "--data", "/nonexistent/x.jsonl"], &["/nonexistent/x.jsonl"]);
}

/// A tiny causal model with SmolLM2's tokenizer and chat template (what `run` and `train` need).
fn chat_model(tmp: &Path) -> PathBuf {
    let dst = tmp.join("chat_model");
    std::fs::create_dir_all(&dst).unwrap();
    for src in ["tests/fixtures/reward/smollm2_judge/model", "tests/fixtures/chat/smollm2"] {
        for e in std::fs::read_dir(repo_root().join(src)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    dst
}

#[test]
fn run_config_with_unknown_keys_or_impossible_values() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("sppo.toml");
    let base = "model = 'm'\nprompts = 'p.jsonl'\noracle = 'game:rps'\nrun_dir = 'r'\n";
    write(&cfg, &format!("{base}learning_rat = 1e-6\n"));
    expect_error(&["run", "--config", cfg.to_str().unwrap()], &["sppo.toml", "learning_rat"]);
    write(&cfg, &format!("{base}iterations = 'three'\n"));
    expect_error(&["run", "--config", cfg.to_str().unwrap()], &["sppo.toml", "iterations"]);
    for (extra, want) in [
        ("learning_rate = -1e-6", "learning_rate"),
        ("max_length = 512\nmax_prompt_length = 512", "no room for a response"),
        ("skip_spike_factor = 0.5", "skip_spike_factor"),
        ("num_samples = 1", "num_samples"),
        ("save_steps = 0", "save_steps"),
        ("loss_type = 'kto'", "loss_type"),
    ] {
        write(&cfg, &format!("{base}{extra}\n"));
        expect_error(&["run", "--config", cfg.to_str().unwrap()], &[want]);
    }
    // A flag is checked as its key is.
    write(&cfg, base);
    expect_error(&["run", "--config", cfg.to_str().unwrap(), "--warmup-ratio", "2"], &["warmup_ratio"]);
}

#[test]
fn training_data_missing_a_column_names_the_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let data = tmp.path().join("ranked.jsonl");
    write(&data, "{\"prompt\": \"hi\", \"chosen\": \"a\", \"rejected\": \"b\", \"chosen_probs\": 0.6, \"chosen_probs_win\": 0.7, \"chosen_probs_lose\": 0.3}\n{\"prompt\": \"yo\", \"chosen\": \"a\", \"chosen_probs\": 0.6}\n");
    let out = tmp.path().join("out");
    expect_error(
        &["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &["ranked.jsonl:2", "rejected"],
    );
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn run_prompts_without_text_or_without_room_for_a_response() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let prompts = tmp.path().join("prompts.jsonl");
    let cfg = tmp.path().join("sppo.toml");
    let run = |name: &str, extra: &str| {
        write(
            &cfg,
            &format!(
                "model = {model:?}\nprompts = {prompts:?}\noracle = 'game:rps'\nrun_dir = {:?}\niterations = 1\nnum_samples = 2\nmax_new_tokens = 4\n{extra}",
                tmp.path().join(name)
            ),
        );
        cfg.to_str().unwrap().to_string()
    };
    write(&prompts, "{\"id\": \"a\", \"text\": \"hello\"}\n");
    expect_error(&["run", "--config", &run("r1", "")], &["prompts.jsonl"]);
    // 3000 words: more tokens than max_prompt_length (512 by default): skipped, none left.
    write(&prompts, &format!("{{\"id\": \"long\", \"prompt\": \"{}\"}}\n", "word ".repeat(3000)));
    expect_error(&["run", "--config", &run("r2", "")], &["prompts.jsonl", "skipped 1 prompts longer than max_prompt_length", "no prompt left to train on"]);
    // Allowed by max_prompt_length but more tokens than the model's 2048-token context.
    let roomy = "max_length = 8192\nmax_prompt_length = 4096\n";
    expect_error(&["run", "--config", &run("r3", roomy)], &["long", "no room for a response"]);
}

/// No `--device` on a machine without a GPU runs on the CPU quietly; `--device cuda` without a
/// usable GPU is a clear error naming why (never a panic from a missing driver); `--device auto` falls back to the CPU and gives the CPU's answer; an unknown kernel
/// variant is an error listing the choices.
#[test]
fn device_and_kernel_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let data = data_file(tmp.path());
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out_cpu = tmp.path().join("cpu.jsonl");
    let out_auto = tmp.path().join("auto.jsonl");
    let (ok, stderr) = sppo(&["logprobs", "--model", m, "--data", d, "--out", out_cpu.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    if let Some(reason) = sppo::backend::cuda::probe().unavailable_reason() {
        // No --device: cuda when usable, else the CPU without a word about it.
        assert!(!stderr.contains("device:"), "the default on a CPU machine is quiet: {stderr}");
        let out_forced = tmp.path().join("forced.jsonl");
        let (ok, stderr) = sppo(&["logprobs", "--device", "cpu", "--model", m, "--data", d, "--out", out_forced.to_str().unwrap()]);
        assert!(ok, "{stderr}");
        assert_eq!(std::fs::read_to_string(&out_forced).unwrap(), std::fs::read_to_string(&out_cpu).unwrap());
        expect_error(&["logprobs", "--device", "cuda", "--model", m, "--data", d], &["--device cuda", &reason]);
        let (ok, stderr) = sppo(&["logprobs", "--device", "auto", "--model", m, "--data", d, "--out", out_auto.to_str().unwrap()]);
        assert!(ok && stderr.contains("device: cpu"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&out_auto).unwrap(), std::fs::read_to_string(&out_cpu).unwrap());
    } else {
        println!("device_and_kernel_choice: a GPU is present; the no-GPU error path is not exercised here");
    }
    expect_error(&["logprobs", "--device", "auto", "--kernel", "attention=flash", "--model", m, "--data", d], &["flash", "naive, fused"]);
    // The CPU's decode-product kernel by name: an unknown name is an error listing the choices;
    // the portable one runs anywhere and agrees with the default to f32 rounding.
    let (ok, stderr) = sppo_with(&["logprobs", "--device", "cpu", "--model", m, "--data", d], &[("SPPO_CPU_SKINNY", "avx3")]);
    assert!(!ok && stderr.contains("SPPO_CPU_SKINNY") && stderr.contains("avx512, avx2, portable"), "{stderr}");
    let out_portable = tmp.path().join("portable.jsonl");
    let (ok, stderr) = sppo_with(&["logprobs", "--device", "cpu", "--model", m, "--data", d, "--out", out_portable.to_str().unwrap()], &[("SPPO_CPU_SKINNY", "portable")]);
    assert!(ok, "{stderr}");
    let sum = |p: &Path| serde_json::from_str::<serde_json::Value>(std::fs::read_to_string(p).unwrap().trim()).unwrap()["sum_logprob"].as_f64().unwrap();
    assert!((sum(&out_portable) - sum(&out_cpu)).abs() < 1e-4, "{} vs {}", sum(&out_portable), sum(&out_cpu));
    // --precision: bf16 is for cuda; the CPU computes in f32 (an error when asked for explicitly).
    expect_error(&["logprobs", "--device", "cpu", "--precision", "bf16", "--model", m, "--data", d], &["--precision bf16", "f32 only"]);
    expect_error(&["logprobs", "--precision", "fp8", "--model", m, "--data", d], &["fp8"]);
    let (ok, stderr) = sppo(&["logprobs", "--device", "cpu", "--precision", "f32", "--model", m, "--data", d, "--out", out_cpu.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    if sppo::backend::cuda::probe().unavailable_reason().is_some() {
        let (ok, stderr) = sppo(&["logprobs", "--device", "auto", "--precision", "bf16", "--model", m, "--data", d, "--out", out_auto.to_str().unwrap()]);
        assert!(ok && stderr.contains("applies to cuda"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&out_auto).unwrap(), std::fs::read_to_string(&out_cpu).unwrap());
    }
}

/// `sppo train` end to end on good data (the counterpart of the bad-data tests above): a
/// checkpoint and one metrics line per optimizer step.
#[test]
fn train_cli_writes_checkpoint_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let data = tmp.path().join("ranked.jsonl");
    let line = |p: &str| format!("{{\"prompt\": \"{p}\", \"chosen\": \"yes\", \"rejected\": \"no\", \"chosen_probs\": 0.6, \"chosen_probs_win\": 0.7, \"chosen_probs_lose\": 0.3}}\n");
    write(&data, &format!("{}{}", line("hi"), line("hello there")));
    let out = tmp.path().join("out");
    let (ok, stderr) = sppo(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--per-device-train-batch-size",
        "1",
        "--gradient-accumulation-steps",
        "1",
        "--device",
        "auto",
    ]);
    assert!(ok, "{stderr}");
    assert!(out.join("model.safetensors").exists() && out.join("config.json").exists(), "{stderr}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
}

/// `generate` and `logprobs` on a machine too small (SPPO_MEMORY_AVAILABLE stands in for one):
/// refused before the weights load, naming the figures and the flag to lower.
#[test]
fn not_enough_memory_for_generate_or_logprobs() {
    use sppo::backend::Precision;
    use sppo::config::ModelConfig;
    use sppo::run::memory::{job_bytes, Job, Storage};
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path());
    let m = model.to_str().unwrap();
    let data = tmp.path().join("ids.jsonl");
    write(&data, "{\"prompt_ids\": [1, 2, 3], \"response_ids\": [4, 5]}\n");
    let d = data.to_str().unwrap();
    let cfg = ModelConfig::from_model_dir(&model).unwrap();
    let (params, total) = job_bytes(&cfg, Job::Scoring { tokens: 4096 }, &Storage::of(Precision::F32));
    assert!(params < total);
    let bytes = |n: u64| n.to_string();

    let (ok, err) = sppo_with(&["logprobs", "--model", m, "--data", d], &[("SPPO_MEMORY_AVAILABLE", &bytes(params - 1))]);
    assert!(!ok && err.contains("not enough memory") && err.contains("the parameters alone do not fit") && err.contains(m), "{err}");
    let (ok, err) = sppo_with(&["logprobs", "--model", m, "--data", d], &[("SPPO_MEMORY_AVAILABLE", &bytes(params + 1))]);
    assert!(!ok && err.contains("scoring needs about") && err.contains("lower `--batch-tokens` (now 4096)"), "{err}");
    // A smaller packed batch fits: the same model scores.
    let (_, small) = job_bytes(&cfg, Job::Scoring { tokens: 16 }, &Storage::of(Precision::F32));
    let (ok, err) = sppo_with(&["logprobs", "--model", m, "--data", d, "--batch-tokens", "16"], &[("SPPO_MEMORY_AVAILABLE", &bytes(small))]);
    assert!(ok, "{err}");

    // generate: a bf16 SmolLM2-vocabulary model with the SmolLM2 tokenizer; `auto` keeps a bf16
    // copy of its weights on the CPU, so the advice names `--decode-weights f32` too.
    let gen = tmp.path().join("gen");
    std::fs::create_dir_all(&gen).unwrap();
    for dir in ["tests/fixtures/reward/smollm2_judge/model", "tests/fixtures/chat/smollm2"] {
        for e in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), gen.join(e.file_name())).unwrap();
        }
    }
    let g = gen.to_str().unwrap();
    let gcfg = ModelConfig::from_model_dir(&gen).unwrap();
    let (gparams, _) = job_bytes(&gcfg, Job::Scoring { tokens: 1 }, &Storage::of(Precision::F32));
    let args = ["generate", "--model", g, "--prompt", "hi", "--max-new-tokens", "8", "--temperature", "0"];
    let (ok, err) = sppo_with(&args, &[("SPPO_MEMORY_AVAILABLE", "1K")]);
    assert!(!ok && err.contains("generation needs about") && err.contains("the parameters alone do not fit"), "{err}");
    let (ok, err) = sppo_with(&args, &[("SPPO_MEMORY_AVAILABLE", &bytes(gparams + 1000))]);
    assert!(!ok && err.contains("lower `--batch-size` (now 1) or `--max-new-tokens` (now 8)") && err.contains("--decode-weights f32"), "{err}");
    let (ok, err) = sppo_with(&args, &[("SPPO_MEMORY_AVAILABLE", "1G")]);
    assert!(ok, "{err}");
}
