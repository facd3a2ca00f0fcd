//! `sppo run` end to end on a tiny causal model with the real SmolLM2 tokenizer and chat template
//! and a synthetic preference game: every stage completes, the manifest records it, each
//! iteration's checkpoint loads, a completed run is not redone, and a run resumed after losing
//! its last stages ends with the same weights as the uninterrupted one.

mod common;

use common::repo_root;
use std::path::{Path, PathBuf};
use std::process::Command;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn setup(tmp: &Path) -> (PathBuf, PathBuf) {
    let model = tmp.join("model");
    copy_dir(&repo_root().join("tests/fixtures/reward/smollm2_judge/model"), &model);
    copy_dir(&repo_root().join("tests/fixtures/chat/smollm2"), &model);
    let prompts = tmp.join("prompts.jsonl");
    let lines: Vec<String> = ["Say hi.", "Name a colour.", "Count to three.", "Pick a fruit."]
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": format!("p{i}"), "prompt": p}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    (model, prompts)
}

fn sppo_run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sppo")).args(args).env("SPPO_THREADS", "2").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sppo {args:?} failed:\n{stderr}");
    stderr
}

#[test]
fn loop_completes_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, prompts) = setup(tmp.path());
    let run_dir = tmp.path().join("run");
    let config = tmp.path().join("sppo.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nprompts = {:?}\noracle = 'game:rps'\nrun_dir = {:?}\niterations = 2\nnum_samples = 3\n\
             max_new_tokens = 6\nper_device_train_batch_size = 1\ngradient_accumulation_steps = 1\nlearning_rate = 1e-3\n\
             beta = 0.1\nmax_length = 256\nmax_prompt_length = 128\nsave_steps = 1\nseed = 3\n",
            model, prompts, run_dir
        ),
    )
    .unwrap();
    sppo_run(&["run", "--config", config.to_str().unwrap()]);
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap()).unwrap();
    for t in ["1", "2"] {
        for stage in ["generate", "rank", "ref_logprobs", "train", "checkpoint"] {
            assert!(manifest["iterations"][t][stage].is_object(), "iteration {t} stage {stage} not recorded: {manifest}");
        }
    }
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    // 2 prompts per iteration (4 prompts / 2 iterations), batch 1: 2 steps each.
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    for l in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["loss"].as_f64().unwrap().is_finite() && v["grad_norm"].as_f64().unwrap().is_finite());
    }
    let final_weights = std::fs::read(run_dir.join("iter-2/checkpoint/model.safetensors")).unwrap();
    let b = sppo::backend::cpu::CpuBackend::new(Some(1)).unwrap();
    sppo::model::Llama::load(&b, &run_dir.join("iter-2/checkpoint")).unwrap();

    // A finished run is not redone.
    let again = sppo_run(&["run", "--resume", run_dir.to_str().unwrap()]);
    assert!(!again.contains("sampling"), "a finished run re-sampled:\n{again}");
    // Without --resume an existing run directory is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_sppo")).args(["run", "--config", config.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--resume"));

    // Lose iteration 2's training and checkpoint (as if killed before its first saved optimizer
    // state; resuming from a saved state mid-iteration is tests/trainer.rs) and resume.
    let mut m = manifest.clone();
    for stage in ["train", "checkpoint"] {
        m["iterations"]["2"].as_object_mut().unwrap().remove(stage);
    }
    std::fs::write(run_dir.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    std::fs::remove_dir_all(run_dir.join("iter-2/checkpoint")).unwrap();
    // (The optimizer state is removed once the checkpoint is saved.)
    assert!(!run_dir.join("iter-2/train").exists(), "the optimizer state outlived the checkpoint");
    let lines: Vec<&str> = metrics.lines().take(2).collect();
    std::fs::write(run_dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let resumed = sppo_run(&["run", "--resume", run_dir.to_str().unwrap()]);
    assert!(!resumed.contains("sampling"), "resume re-sampled finished work:\n{resumed}");
    assert_eq!(std::fs::read(run_dir.join("iter-2/checkpoint/model.safetensors")).unwrap(), final_weights, "resumed run differs");
    assert_eq!(deterministic(&std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap()), deterministic(&metrics), "metrics differ after resume");
}

/// Metrics lines without the wall-clock fields.
fn deterministic(metrics: &str) -> Vec<serde_json::Value> {
    metrics
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("elapsed_s");
            o.remove("rss_bytes");
            v
        })
        .collect()
}
