//! Faults of `sppo run`, on the real binary with a tiny model (SmolLM2's tokenizer and chat
//! template, 16-wide layers) and the rock-paper-scissors oracle:
//! - SIGKILL at many points (each stage's start, mid-sampling, mid-training around a state save,
//!   mid-checkpoint, fixed delays, and twice in a row), then `--resume`: no finished stage is
//!   redone, training restarts at its last saved step, and the final weights and the deterministic
//!   metrics equal an uninterrupted run's;
//! - a full disk (injected ENOSPC) during a checkpoint and during an optimizer-state save: exit 5,
//!   the file named, the previous checkpoint and state intact, and a resume ends as the reference;
//! - a learning rate that makes the weights overflow: exit 3, the step and tensor named, the last
//!   good optimizer state kept;
//! - a plan that cannot fit in memory: exit 4 with the figures and the setting to lower;
//! - `--log-json` / `--quiet` output and the fields of metrics.jsonl.

mod common;

use common::repo_root;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A tiny model with a chat template, and 6 prompts (3 per iteration, 3 optimizer steps each).
fn setup(tmp: &Path) -> (PathBuf, PathBuf) {
    let model = tmp.join("model");
    copy_dir(&repo_root().join("tests/fixtures/reward/smollm2_judge/model"), &model);
    copy_dir(&repo_root().join("tests/fixtures/chat/smollm2"), &model);
    let prompts = tmp.join("prompts.jsonl");
    let lines: Vec<String> = ["Say hi.", "Name a colour.", "Count to three.", "Pick a fruit.", "Name a river.", "Spell cat."]
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": format!("p{i}"), "prompt": p}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    (model, prompts)
}

/// The run configuration every scenario shares (only `run_dir` differs): optimizer state saved
/// at step 2 and at the last step 3 of each iteration; sampling in shards of one prompt.
fn write_config(tmp: &Path, name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let (model, prompts) = setup(tmp);
    let run_dir = tmp.join(name);
    let config = tmp.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "model = {model:?}\nprompts = {prompts:?}\noracle = 'game:rps'\nrun_dir = {run_dir:?}\niterations = 2\nnum_samples = 3\n\
             max_new_tokens = 6\ngeneration_batch_size = 1\nper_device_train_batch_size = 1\ngradient_accumulation_steps = 1\n\
             learning_rate = 1e-3\nbeta = 0.1\nmax_length = 256\nmax_prompt_length = 128\nsave_steps = 2\nseed = 3\n{extra}"
        ),
    )
    .unwrap();
    (config, run_dir)
}

fn sppo() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sppo"));
    c.env("SPPO_THREADS", "2").env_remove("SPPO_FAIL_WRITES_AFTER_BYTES").env_remove("SPPO_FAIL_WRITES_MATCHING").env_remove("SPPO_MEMORY_AVAILABLE");
    c
}

struct Outcome {
    code: Option<i32>,
    killed: bool,
    stderr: String,
}

impl Outcome {
    /// The `--log-json` events printed.
    fn events(&self) -> Vec<Value> {
        self.stderr.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v.get("event").is_some()).collect()
    }
}

/// When to SIGKILL a running `sppo run`.
enum KillAt {
    /// On the first `--log-json` event the predicate accepts.
    Event(Box<dyn Fn(&Value) -> bool + Send>),
    /// Once the file (relative to the run directory) has at least this many lines.
    FileLines(&'static str, usize),
    After(Duration),
    Never,
}

fn stage_start(iteration: u64, stage: &'static str) -> KillAt {
    KillAt::Event(Box::new(move |e| e["event"] == "stage_start" && e["iteration"] == iteration && e["stage"] == stage))
}

fn train_step(iteration: u64, step: u64) -> KillAt {
    KillAt::Event(Box::new(move |e| e["event"] == "train_step" && e["iteration"] == iteration && e["step"] == step))
}

/// Runs `sppo <args> --log-json`, killing it (SIGKILL) when `kill_at` happens.
fn run_sppo(args: &[&str], envs: &[(&str, &str)], run_dir: &Path, kill_at: KillAt) -> Outcome {
    let mut cmd = sppo();
    cmd.args(args).arg("--log-json").envs(envs.iter().copied()).stderr(Stdio::piped()).stdout(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    let mut killed = false;
    loop {
        let mut fire = false;
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(line) => {
                if let KillAt::Event(pred) = &kill_at {
                    fire = serde_json::from_str::<Value>(&line).is_ok_and(|v| pred(&v));
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        fire |= match &kill_at {
            KillAt::FileLines(rel, n) => std::fs::read_to_string(run_dir.join(rel)).is_ok_and(|t| t.lines().count() >= *n),
            KillAt::After(d) => start.elapsed() >= *d,
            _ => false,
        };
        if fire && child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed = true;
            break;
        }
    }
    let status = child.wait().unwrap();
    lines.extend(rx.iter());
    reader.join().unwrap();
    Outcome { code: status.code(), killed, stderr: lines.join("\n") }
}

/// Metrics lines without the wall-clock and machine fields.
fn deterministic(metrics: &str) -> Vec<Value> {
    metrics
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            for k in ["tokens_per_s", "elapsed_s", "rss_bytes"] {
                o.remove(k);
            }
            v
        })
        .collect()
}

struct Reference {
    _tmp: tempfile::TempDir,
    weights: [Vec<u8>; 2],
    metrics: Vec<Value>,
}

/// The uninterrupted run every scenario is compared with (run once per test binary).
fn reference() -> &'static Reference {
    static CELL: OnceLock<Reference> = OnceLock::new();
    CELL.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let (config, run_dir) = write_config(tmp.path(), "reference", "");
        let out = run_sppo(&["run", "--config", config.to_str().unwrap()], &[], &run_dir, KillAt::Never);
        assert_eq!(out.code, Some(0), "reference run failed:\n{}", out.stderr);
        let events = out.events();
        for (stage, n) in [("generate", 2), ("rank", 2), ("ref_logprobs", 2), ("train", 2), ("checkpoint", 2)] {
            for kind in ["stage_start", "stage_end"] {
                let count = events.iter().filter(|e| e["event"] == kind && e["stage"] == stage).count();
                assert_eq!(count, n, "{kind} {stage}: {count} events:\n{}", out.stderr);
            }
        }
        assert_eq!(events.iter().filter(|e| e["event"] == "train_step").count(), 6);
        let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 6, "{metrics}");
        for l in metrics.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            for k in ["loss", "chosen_logratio", "rejected_logratio", "grad_norm", "lr", "tokens_per_s"] {
                assert!(v[k].as_f64().is_some_and(f64::is_finite), "{k} missing in {l}");
            }
            assert!(v["rss_bytes"].as_u64().is_some_and(|b| b > 0) && v["iteration"].as_u64().is_some() && v["kind"] == "train", "{l}");
            assert_eq!(v["skipped_steps"], 0);
        }
        assert_no_leftovers(&run_dir);
        Reference {
            weights: [1, 2].map(|t| std::fs::read(run_dir.join(format!("iter-{t}/checkpoint/model.safetensors"))).unwrap()),
            metrics: deterministic(&metrics),
            _tmp: tmp,
        }
    })
}

/// No temporaries, partial logs or optimizer state are left in a finished run.
fn assert_no_leftovers(run_dir: &Path) {
    let mut stack = vec![run_dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            assert!(!name.starts_with('.') && !name.contains("partial") && name != "train", "left over: {}", e.path().display());
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

fn manifest_done(run_dir: &Path) -> Vec<(u64, String)> {
    let Ok(text) = std::fs::read_to_string(run_dir.join("manifest.json")) else { return vec![] };
    let m: Value = serde_json::from_str(&text).unwrap();
    let mut done = vec![];
    for (it, stages) in m["iterations"].as_object().into_iter().flatten() {
        for stage in stages.as_object().unwrap().keys() {
            done.push((it.parse().unwrap(), stage.clone()));
        }
    }
    done
}

fn saved_step(run_dir: &Path, iteration: u64) -> Option<u64> {
    let text = std::fs::read_to_string(run_dir.join(format!("iter-{iteration}/train/state.json"))).ok()?;
    serde_json::from_str::<Value>(&text).unwrap()["step"].as_u64()
}

/// Resumes, checking that nothing the manifest records is redone and that training restarts
/// right after its saved step; kills again at `kill_at` when given.
fn resume(run_dir: &Path, kill_at: KillAt, envs: &[(&str, &str)]) -> Outcome {
    let done = manifest_done(run_dir);
    let saved: Vec<Option<u64>> = (1..=2).map(|t| saved_step(run_dir, t)).collect();
    let out = run_sppo(&["run", "--resume", run_dir.to_str().unwrap()], envs, run_dir, kill_at);
    let events = out.events();
    for e in events.iter().filter(|e| e["event"] == "stage_start") {
        let key = (e["iteration"].as_u64().unwrap(), e["stage"].as_str().unwrap().to_string());
        assert!(!done.contains(&key), "resume redid {key:?}, recorded as done:\n{}", out.stderr);
    }
    for t in 1..=2u64 {
        let first = events.iter().find(|e| e["event"] == "train_step" && e["iteration"] == t).and_then(|e| e["step"].as_u64());
        if let (Some(first), false) = (first, done.contains(&(t, "train".to_string()))) {
            assert_eq!(first, saved[t as usize - 1].unwrap_or(0) + 1, "iteration {t}: training did not restart after its saved step:\n{}", out.stderr);
        }
    }
    out
}

/// `--resume`, or a fresh start when the kill came before the run wrote its config.json (what a
/// user does then too).
fn restart(run_dir: &Path, config: &Path, kill_at: KillAt) -> Outcome {
    if run_dir.join("config.json").exists() {
        resume(run_dir, kill_at, &[])
    } else {
        run_sppo(&["run", "--config", config.to_str().unwrap()], &[], run_dir, kill_at)
    }
}

fn assert_matches_reference(run_dir: &Path, what: &str) {
    let r = reference();
    for t in 1..=2 {
        let w = std::fs::read(run_dir.join(format!("iter-{t}/checkpoint/model.safetensors"))).unwrap();
        assert!(w == r.weights[t - 1], "{what}: iteration {t} weights differ from the uninterrupted run");
    }
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(deterministic(&metrics), r.metrics, "{what}: metrics differ from the uninterrupted run");
    assert_no_leftovers(run_dir);
}

#[test]
fn killed_anywhere_resumes_to_the_uninterrupted_result() {
    reference();
    let tmp = tempfile::tempdir().unwrap();
    let scenarios: Vec<(&str, Vec<KillAt>)> = vec![
        ("start of sampling", vec![stage_start(1, "generate")]),
        ("mid-sampling, after a shard", vec![KillAt::FileLines("iter-1/generations.partial.jsonl", 1)]),
        ("start of ranking", vec![stage_start(2, "rank")]),
        ("reference log-probs", vec![stage_start(1, "ref_logprobs")]),
        ("mid-training, before a save", vec![train_step(1, 1)]),
        ("mid-training, around a save", vec![train_step(2, 2)]),
        ("mid-checkpoint", vec![stage_start(1, "checkpoint")]),
        ("last checkpoint", vec![stage_start(2, "checkpoint")]),
        ("after 0.3 s", vec![KillAt::After(Duration::from_millis(300))]),
        ("after 1 s", vec![KillAt::After(Duration::from_millis(1000))]),
        ("after 1.5 s", vec![KillAt::After(Duration::from_millis(1500))]),
        ("twice: mid-training, then mid-sampling and mid-checkpoint", vec![train_step(1, 2), stage_start(2, "generate"), stage_start(2, "checkpoint")]),
    ];
    let mut killed = 0;
    for (i, (what, kills)) in scenarios.into_iter().enumerate() {
        let (config, run_dir) = write_config(tmp.path(), &format!("run{i}"), "");
        let mut kills = kills.into_iter();
        let first = kills.next().unwrap();
        let out = run_sppo(&["run", "--config", config.to_str().unwrap()], &[], &run_dir, first);
        killed += out.killed as usize;
        eprintln!("{what}: killed {}, stages recorded then: {:?}", out.killed, manifest_done(&run_dir));
        assert!(out.killed || out.code == Some(0), "{what}: the first run failed:\n{}", out.stderr);
        for k in kills {
            let out = restart(&run_dir, &config, k);
            assert!(out.killed || out.code == Some(0), "{what}: a resume failed:\n{}", out.stderr);
        }
        let out = restart(&run_dir, &config, KillAt::Never);
        assert_eq!(out.code, Some(0), "{what}: the last resume failed:\n{}", out.stderr);
        assert_matches_reference(&run_dir, what);
    }
    // Nearly all kills land (a delay or the last checkpoint may come after the end on a fast machine).
    assert!(killed >= 8, "only {killed} runs were killed");
}

#[test]
fn full_disk_during_a_checkpoint_or_state_save_loses_nothing() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();

    // The second iteration's checkpoint cannot be written.
    let (config, run_a) = write_config(tmp.path(), "a", "");
    let envs = [("SPPO_FAIL_WRITES_AFTER_BYTES", "0"), ("SPPO_FAIL_WRITES_MATCHING", "iter-2/.checkpoint")];
    let out = run_sppo(&["run", "--config", config.to_str().unwrap()], &envs, &run_a, KillAt::Never);
    assert_eq!(out.code, Some(5), "{}", out.stderr);
    for m in ["No space left on device", "model.safetensors", "iter-1/checkpoint", "--resume"] {
        assert!(out.stderr.contains(m), "the error should mention {m:?}:\n{}", out.stderr);
    }
    assert!(std::fs::read(run_a.join("iter-1/checkpoint/model.safetensors")).unwrap() == r.weights[0], "the previous checkpoint changed");
    assert!(!run_a.join("iter-2/checkpoint").exists());
    let names: Vec<String> = std::fs::read_dir(run_a.join("iter-2")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "a temporary was left: {names:?}");
    assert_eq!(saved_step(&run_a, 2), Some(3), "the final optimizer state must survive");
    let state_bytes: u64 = ["state.safetensors", "state.json"].iter().map(|f| std::fs::metadata(run_a.join("iter-2/train").join(f)).unwrap().len()).sum();

    // The second state save of iteration 2 (step 3) fails: the state of step 2 stays.
    let (config, run_b) = write_config(tmp.path(), "b", "");
    // (state.json's length varies by a few digits between steps: leave it room.)
    let limit = (state_bytes + 200).to_string();
    let envs = [("SPPO_FAIL_WRITES_AFTER_BYTES", limit.as_str()), ("SPPO_FAIL_WRITES_MATCHING", "iter-2/.train")];
    let out = run_sppo(&["run", "--config", config.to_str().unwrap()], &envs, &run_b, KillAt::Never);
    assert_eq!(out.code, Some(5), "{}", out.stderr);
    for m in ["No space left on device", "state.safetensors", "step 3", "optimizer state of step 2"] {
        assert!(out.stderr.contains(m), "the error should mention {m:?}:\n{}", out.stderr);
    }
    assert_eq!(saved_step(&run_b, 2), Some(2));

    for run_dir in [&run_a, &run_b] {
        let out = resume(run_dir, KillAt::Never, &[]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert_matches_reference(run_dir, "resumed after a full disk");
    }
}

#[test]
fn overflowing_weights_stop_the_run_naming_step_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // One warm-up step makes step 1's learning rate 0 and step 2's 3e38: its update overflows f32.
    let (config, run_dir) = write_config(tmp.path(), "nan", "");
    let text = std::fs::read_to_string(&config).unwrap().replace("learning_rate = 1e-3", "learning_rate = 3e38\nwarmup_ratio = 0.1").replace("save_steps = 2", "save_steps = 1");
    std::fs::write(&config, text).unwrap();
    let base = std::fs::read(tmp.path().join("model/model.safetensors")).unwrap();
    for attempt in ["run", "resume"] {
        let out = if attempt == "run" {
            run_sppo(&["run", "--config", config.to_str().unwrap()], &[], &run_dir, KillAt::Never)
        } else {
            resume(&run_dir, KillAt::Never, &[])
        };
        assert_eq!(out.code, Some(3), "{attempt}: {}", out.stderr);
        let error = out.stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
        // The first step with a gradient after the warm-up step blows up (which one depends on the
        // sampled data): every step before it was saved (save_steps = 1), it was not.
        let bad: u64 = error.split("step ").nth(2).and_then(|t| t.split(':').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{attempt}: no step in {error}"));
        assert!(bad >= 2, "{error}");
        for m in ["iteration 1", "non-finite", "after the update is inf", "model.", &format!("optimizer state of step {}", bad - 1), "nothing of this step was saved"] {
            assert!(error.contains(m), "{attempt}: the error should mention {m:?}:\n{}", out.stderr);
        }
        assert_eq!(saved_step(&run_dir, 1), Some(bad - 1), "the last good optimizer state was lost");
        assert!(!run_dir.join("iter-1/checkpoint").exists());
        assert!(std::fs::read(tmp.path().join("model/model.safetensors")).unwrap() == base);
        let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count() as u64, bad - 1, "only the good steps are in the metrics: {metrics}");
    }
}

#[test]
fn a_plan_that_cannot_fit_in_memory_is_refused_before_it_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, run_dir) = write_config(tmp.path(), "oom", "");
    let c = config.to_str().unwrap();
    // The tiny model's parameters, gradients and optimizer state need ~10 MiB; 512 MiB is plenty
    // for the shipped settings but not for 4096 sequences of 256 tokens per micro-batch.
    let mem = [("SPPO_MEMORY_AVAILABLE", "512M")];
    let out = run_sppo(&["run", "--config", c, "--per-device-train-batch-size", "2048"], &mem, &run_dir, KillAt::Never);
    assert_eq!(out.code, Some(4), "{}", out.stderr);
    for m in ["not enough memory", "training needs about", "512.0 MiB is available", "per_device_train_batch_size", "gradient_checkpointing"] {
        assert!(out.stderr.contains(m), "the error should mention {m:?}:\n{}", out.stderr);
    }
    assert!(!run_dir.exists(), "a refused run must not create its directory");
    let out = run_sppo(&["run", "--config", c, "--generation-batch-size", "200000"], &mem, &run_dir, KillAt::Never);
    assert_eq!(out.code, Some(4), "{}", out.stderr);
    assert!(out.stderr.contains("sampling needs about") && out.stderr.contains("generation_batch_size"), "{}", out.stderr);
    let out = run_sppo(&["run", "--config", c], &[("SPPO_MEMORY_AVAILABLE", "1M")], &run_dir, KillAt::Never);
    assert_eq!(out.code, Some(4), "{}", out.stderr);
    assert!(out.stderr.contains("alone do not fit"), "{}", out.stderr);
}

#[test]
fn quiet_prints_nothing_and_verbose_prints_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, run_dir) = write_config(tmp.path(), "quiet", "iterations = 1\n");
    let text = std::fs::read_to_string(&config).unwrap().replace("iterations = 2\n", "");
    std::fs::write(&config, text).unwrap();
    let out = sppo().args(["run", "--config", config.to_str().unwrap(), "--quiet"]).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "--quiet printed:\n{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&run_dir).unwrap();
    let out = sppo().args(["run", "--config", config.to_str().unwrap(), "--verbose"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("iteration 1 step 3: loss") && stderr.contains("train done in"), "{stderr}");
}
