//! The algorithm proofs on synthetic preference games (issue 5, part 5): the whole SPPO loop
//! (`sppo::run::run`: sample, rank, reference log-probs, train, checkpoint, eval) on a tiny random
//! Llama with the real SmolLM2 tokenizer and chat template, where a response is one token and its
//! class the first character's code point mod 3 (`oracle::game`). The eval stage computes each
//! iterate's class distribution exactly from the model (`run::classes`), so the exploitability
//! curves carry no sampling noise of their own.
//!
//! Settings: η = 20 (β 0.05), AdamW lr 1e-2, 8 epochs per iteration, K = 8 responses for each of 12
//! prompts, temperature 1 (the policy SPPO's theory is about). With a vocabulary of 49152 tokens
//! a class gains mass only through the tokens that were sampled, so a small η barely moves it
//! (η = 5: P(dominant) 0.25 → 0.45 in 4 iterations); η = 20 lets the winners take over.
//!
//! Observed (exact exploitability, iteration 0 = the scissors-heavy warm start, 0.476):
//! SPPO mixture after 8 iterations 0.047 / 0.156 / 0.140 for seeds 1 / 2 / 3 (the assertion asks
//! for less than half the start); the SPPO last iterate keeps cycling (0.49 / 0.19 / 0.24);
//! iterative DPO's mixture 0.158 / 0.117 / 0.075. Transitive game (seed 1): P(dominant class)
//! 0.247 → 0.290 → 0.342 → 0.627 → 0.964.
//!
//! Set `SPPO_GAME_PLOTS=DIR` to write the curves as PNGs into DIR, `SPPO_GAME_SEEDS=1,2,3` to run
//! several seeds; run with `--nocapture` to see the curves printed.

mod common;

use common::repo_root;
use sppo::run::config::{RunConfig, RunKeys};
use sppo::run::eval::EvalReport;
use std::path::{Path, PathBuf};

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// The tiny model (fixture weights + SmolLM2 tokenizer) and 16 prompts: 12 to train on, the last
/// 4 held out for the exact exploitability.
fn setup(tmp: &Path) -> (PathBuf, PathBuf) {
    let model = tmp.join("model");
    copy_dir(
        &repo_root().join("tests/fixtures/reward/smollm2_judge/model"),
        &model,
    );
    copy_dir(&repo_root().join("tests/fixtures/chat/smollm2"), &model);
    let prompts = tmp.join("prompts.jsonl");
    let words = [
        "Say hi.",
        "Name a colour.",
        "Count to three.",
        "Pick a fruit.",
        "Name a city.",
        "Pick a number.",
        "Say a word.",
        "Name an animal.",
        "Pick a letter.",
        "Name a tool.",
        "Say a greeting.",
        "Name a river.",
        "Pick a shape.",
        "Name a tree.",
        "Say a verb.",
        "Name a metal.",
    ];
    let lines: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": format!("p{i}"), "prompt": p}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    (model, prompts)
}

/// One loop run; returns its evaluation.
#[allow(clippy::too_many_arguments)]
fn run(
    model: &Path,
    prompts: &Path,
    run_dir: &Path,
    oracle: &str,
    loss: &str,
    train_on: &str,
    iterations: u32,
    seed: u64,
) -> EvalReport {
    let toml_text = format!(
        "model = {model:?}\nprompts = {prompts:?}\noracle = '{oracle}'\nrun_dir = {run_dir:?}\niterations = {iterations}\n\
         prompts_per_iteration = 12\neval_prompts = 4\neval_num_samples = 2\nnum_samples = 8\nmax_new_tokens = 1\n\
         temperature = 1.0\ntop_p = 1.0\nloss_type = '{loss}'\ntrain_on = '{train_on}'\nwinrate = 'pairwise'\n\
         beta = {BETA}\nlearning_rate = {LR}\noptim = 'adamw'\nlr_scheduler_type = 'constant'\nwarmup_ratio = 0.0\n\
         per_device_train_batch_size = 12\ngradient_accumulation_steps = 1\nnum_train_epochs = {EPOCHS}\n\
         max_length = 256\nmax_prompt_length = 128\nsave_steps = 1000\nseed = {seed}\n"
    );
    let keys: RunKeys = toml::from_str(&toml_text).unwrap();
    let cfg = RunConfig::resolve(&keys).unwrap();
    sppo::run::run(&cfg, false, Some(2), &sppo::run::report::Reporter::new(sppo::run::report::LogMode::Quiet)).unwrap();
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("eval.json")).unwrap()).unwrap()
}

const BETA: f64 = 0.05;
const LR: f64 = 1e-2;
const EPOCHS: u32 = 8;

fn curve(r: &EvalReport, f: impl Fn(&sppo::run::eval::GameFigures) -> f64) -> Vec<f64> {
    r.policies
        .iter()
        .map(|p| f(p.game.as_ref().expect("game figures")))
        .collect()
}

fn show(name: &str, v: &[f64]) {
    let cells: Vec<String> = v.iter().map(|x| format!("{x:.4}")).collect();
    println!("{name:<28} {}", cells.join(" "));
}

fn maybe_plot(file: &str, title: &str, series: Vec<(&str, &[f64])>) {
    let Ok(dir) = std::env::var("SPPO_GAME_PLOTS") else {
        return;
    };
    use sppo::run::plots::{draw_panels, Panel, Series};
    let panel = Panel {
        title: title.into(),
        x_label: "iteration".into(),
        y_label: "exploitability".into(),
        series: series
            .into_iter()
            .map(|(n, v)| {
                Series::new(
                    n,
                    v.iter().enumerate().map(|(i, &y)| (i as f64, y)).collect(),
                )
            })
            .collect(),
    };
    draw_panels(&Path::new(&dir).join(file), &[panel], 1).unwrap();
}

#[test]
fn transitive_game_last_iterate_goes_to_the_dominant_class() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, prompts) = setup(tmp.path());
    let r = run(
        &model,
        &prompts,
        &tmp.path().join("run"),
        "game:transitive,temp=0.25",
        "sppo",
        "all",
        4,
        1,
    );
    let top = curve(&r, |g| g.class_probs[2]);
    let expl = curve(&r, |g| g.exploitability);
    show("P(dominant class)", &top);
    show("exploitability (last)", &expl);
    assert!(
        top[0] < 0.5,
        "the random base should not already prefer the dominant class: {top:?}"
    );
    assert!(
        top.last().unwrap() > &0.9,
        "the last iterate should concentrate on the dominant class: {top:?}"
    );
    assert!(
        top.windows(2).all(|w| w[1] > w[0]),
        "the dominant class's mass should rise every iteration: {top:?}"
    );
}

/// Seeds of the RPS runs: `SPPO_GAME_SEEDS=1,2,3` checks several (CI runs seed 1).
fn seeds() -> Vec<u64> {
    std::env::var("SPPO_GAME_SEEDS").ok().map_or(vec![1], |v| {
        v.split(',')
            .map(|x| x.trim().parse().expect("SPPO_GAME_SEEDS: integers"))
            .collect()
    })
}

#[test]
fn rock_paper_scissors_mixture_exploitability_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, prompts) = setup(tmp.path());
    // A base far from the Nash equilibrium (uniform): SPPO on the transitive game concentrates it
    // on class 2 (scissors).
    let warm = run(
        &model,
        &prompts,
        &tmp.path().join("warm"),
        "game:transitive,temp=0.25",
        "sppo",
        "all",
        WARM_ITERATIONS,
        7,
    );
    let start = tmp
        .path()
        .join(format!("warm/iter-{WARM_ITERATIONS}/checkpoint"));
    println!(
        "warm start class probabilities {:?}",
        warm.policies
            .last()
            .unwrap()
            .game
            .as_ref()
            .unwrap()
            .class_probs
    );
    for seed in seeds() {
        let sppo = run(
            &start,
            &prompts,
            &tmp.path().join(format!("sppo-{seed}")),
            "game:rps",
            "sppo",
            "all",
            RPS_ITERATIONS,
            seed,
        );
        let dpo = run(
            &start,
            &prompts,
            &tmp.path().join(format!("dpo-{seed}")),
            "game:rps",
            "dpo",
            "best-worst",
            RPS_ITERATIONS,
            seed,
        );
        let (s_last, s_mix) = (
            curve(&sppo, |g| g.exploitability),
            curve(&sppo, |g| g.mixture_exploitability),
        );
        let (d_last, d_mix) = (
            curve(&dpo, |g| g.exploitability),
            curve(&dpo, |g| g.mixture_exploitability),
        );
        println!("seed {seed}");
        show("SPPO exploitability last", &s_last);
        show("SPPO exploitability mixture", &s_mix);
        show("DPO exploitability last", &d_last);
        show("DPO exploitability mixture", &d_mix);
        maybe_plot(
            &format!("rps_exploitability_seed{seed}.png"),
            "rock-paper-scissors: exploitability (exact)",
            vec![
                ("SPPO last iterate", &s_last),
                ("SPPO mixture", &s_mix),
                ("iterative DPO last iterate", &d_last),
                ("iterative DPO mixture", &d_mix),
            ],
        );
        assert!(
            s_mix[0] > 0.3,
            "the warm start should be far from the equilibrium: {s_mix:?}"
        );
        let end = *s_mix.last().unwrap();
        assert!(
            end < 0.5 * s_mix[0],
            "seed {seed}: SPPO's mixture exploitability should fall by half or more: {s_mix:?}"
        );
    }
}

const WARM_ITERATIONS: u32 = 4;
const RPS_ITERATIONS: u32 = 8;
