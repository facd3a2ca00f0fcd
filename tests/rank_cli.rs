//! `sppo rank` end to end through the binary: JSONL in/out with every input field kept, resume
//! after a torn output line and after an oracle crash, refusal to resume someone else's output,
//! Parquet out and back in, the `command:` example oracle, and input errors naming file and line.

use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sppo::oracle::game::Game;
use sppo::oracle::winrate::{rank, WinRate};
use sppo::rank::{read_ranked, read_records};

fn sppo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sppo"))
        .args(args)
        .output()
        .expect("running sppo")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "sppo failed: {stderr}");
    stderr
}

fn fails(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "sppo should have failed; stderr: {stderr}"
    );
    stderr
}

/// Responses whose first letters give every rock-paper-scissors class ('T' 0, 'I' 1, 'S' 2).
const WORDS: [&str; 6] = [
    "The answer is 4.",
    "I think so.",
    "Sure! Here it is.",
    "Two.",
    "Indeed, yes",
    "So, 4",
];

/// A generations file like `sppo generate` writes, with extra fields that must survive.
fn write_generations(path: &Path, n: usize, k: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut text = String::new();
    for i in 0..n {
        let responses: Vec<String> = (0..k)
            .map(|j| {
                format!(
                    "{} (p{i} s{j})",
                    WORDS[(i * 7 + j * 5 + j * j) % WORDS.len()]
                )
            })
            .collect();
        let v = json!({
            "prompt_id": format!("id-{i}"),
            "prompt": format!("Question {i}?"),
            "responses": responses,
            "finish_reasons": vec!["stop"; k],
            "num_tokens": (0..k).collect::<Vec<_>>(),
            "meta": {"source": "test", "n": i},
        });
        text.push_str(&v.to_string());
        text.push('\n');
        lines.push(v);
    }
    std::fs::write(path, text).unwrap();
    lines
}

fn jsonl(path: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str::<Value>(l).unwrap() {
            Value::Object(m) => m,
            other => panic!("{other}"),
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn ranks_jsonl_keeping_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let (gen, out) = (
        dir.path().join("gen.jsonl"),
        dir.path().join("ranked.jsonl"),
    );
    let inputs = write_generations(&gen, 7, 4);
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&gen),
        "--out",
        s(&out),
        "--batch-size",
        "3",
    ]));
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 7);
    let g = Game::parse("rps", &[]).unwrap();
    for (line, input) in lines.iter().zip(&inputs) {
        for (k, v) in input.as_object().unwrap() {
            assert_eq!(line.get(k), Some(v), "field {k} not kept");
        }
        // Recompute with the library: same matrix, same choice, same targets.
        let responses: Vec<String> = serde_json::from_value(input["responses"].clone()).unwrap();
        let pm = g.matrix(&responses).unwrap();
        let r = rank(&pm, WinRate::Scores).unwrap();
        assert_eq!(line["matrix"], json!(pm.rows()));
        assert_eq!(line["chosen_index"], json!(r.chosen));
        assert_eq!(line["rejected_index"], json!(r.rejected));
        assert_eq!(line["chosen"], json!(responses[r.chosen]));
        assert_eq!(line["rejected"], json!(responses[r.rejected]));
        assert_eq!(line["chosen_probs"], json!(r.chosen_probs));
        assert_eq!(line["chosen_probs_win"], json!(r.chosen_probs_win));
        assert_eq!(line["chosen_probs_lose"], json!(r.chosen_probs_lose));
        assert_eq!(line["scores"], json!(r.scores));
        assert_eq!(line["oracle"], json!("game:rps"));
        assert_eq!(line["winrate"], json!("scores"));
        assert_ne!(line["chosen_index"], line["rejected_index"]);
    }
    // Pairwise is a different estimate: at least the recorded estimator and win-rates follow it.
    let out2 = dir.path().join("pairwise.jsonl");
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&gen),
        "--out",
        s(&out2),
        "--winrate",
        "pairwise",
    ]));
    let l2 = jsonl(&out2);
    let responses: Vec<String> = serde_json::from_value(inputs[0]["responses"].clone()).unwrap();
    let r = rank(&g.matrix(&responses).unwrap(), WinRate::Pairwise).unwrap();
    assert_eq!(l2[0]["win_rates"], json!(r.win_rates));
    assert_eq!(l2[0]["winrate"], json!("pairwise"));
}

#[test]
fn resumes_after_a_torn_line_and_leaves_a_complete_output_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (gen, out) = (
        dir.path().join("gen.jsonl"),
        dir.path().join("ranked.jsonl"),
    );
    write_generations(&gen, 9, 3);
    let args = [
        "rank",
        "--oracle",
        "game:rps5",
        "--in",
        s(&gen),
        "--out",
        s(&out),
        "--batch-size",
        "2",
    ];
    ok(&sppo(&args));
    let full = std::fs::read(&out).unwrap();

    // A crash mid-write: 4 complete lines and half of the 5th.
    let ends: Vec<usize> = full
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let cut = ends[3] + 1 + (ends[4] - ends[3]) / 2;
    std::fs::write(&out, &full[..cut]).unwrap();
    let stderr = ok(&sppo(&args));
    assert!(stderr.contains("dropping a torn last line"), "{stderr}");
    assert!(stderr.contains("ranked 5 prompts (4 resumed)"), "{stderr}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        full,
        "the resumed output differs from a clean run"
    );

    // Cut exactly at a line end: nothing torn, the rest appended.
    std::fs::write(&out, &full[..ends[6] + 1]).unwrap();
    let stderr = ok(&sppo(&args));
    assert!(
        !stderr.contains("torn") && stderr.contains("ranked 2 prompts (7 resumed)"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), full);

    let stderr = ok(&sppo(&args));
    assert!(stderr.contains("already complete (9 prompts)"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), full);
}

#[test]
fn refuses_to_resume_an_output_of_other_inputs_or_another_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let (gen, out) = (
        dir.path().join("gen.jsonl"),
        dir.path().join("ranked.jsonl"),
    );
    write_generations(&gen, 4, 3);
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&gen),
        "--out",
        s(&out),
    ]));
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps,win=0.9",
        "--in",
        s(&gen),
        "--out",
        s(&out),
    ]));
    assert!(
        e.contains("ranked.jsonl:1") && e.contains("ranked with oracle `game:rps`"),
        "{e}"
    );
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&gen),
        "--out",
        s(&out),
        "--winrate",
        "pairwise",
    ]));
    assert!(e.contains("--winrate scores"), "{e}");
    // Other generations with the same prompts: the responses differ.
    let gen2 = dir.path().join("gen2.jsonl");
    let text = std::fs::read_to_string(&gen)
        .unwrap()
        .replace("(p1 s0)", "(p1 s0, regenerated)");
    std::fs::write(&gen2, text).unwrap();
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&gen2),
        "--out",
        s(&out),
    ]));
    assert!(
        e.contains("ranked.jsonl:2")
            && e.contains("responses differ")
            && e.contains("prompt_id id-1"),
        "{e}"
    );
    // Fewer inputs than done lines.
    let gen3 = dir.path().join("gen3.jsonl");
    write_generations(&gen3, 2, 3);
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&gen3),
        "--out",
        s(&out),
    ]));
    assert!(
        e.contains("ranked.jsonl:3") && e.contains("more records than the input"),
        "{e}"
    );
}

#[test]
fn parquet_out_and_back_in() {
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("gen.jsonl");
    let (out_j, out_p) = (
        dir.path().join("ranked.jsonl"),
        dir.path().join("ranked.parquet"),
    );
    write_generations(&gen, 6, 4);
    // A record without prompt_id (a null cell in Parquet) must compare equal on resume.
    let mut text = std::fs::read_to_string(&gen).unwrap();
    text.push_str("{\"prompt\": \"Last?\", \"responses\": [\"Ice\", \"Tea\"]}\n");
    std::fs::write(&gen, text).unwrap();
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:transitive,n=3",
        "--in",
        s(&gen),
        "--out",
        s(&out_j),
    ]));
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:transitive,n=3",
        "--in",
        s(&gen),
        "--out",
        s(&out_p),
        "--batch-size",
        "4",
    ]));
    assert!(
        !dir.path().join("ranked.parquet.partial.jsonl").exists(),
        "the partial log was not removed"
    );

    // Same records either way (chosen/rejected are message lists in the Parquet file).
    let from_j = read_ranked(&out_j).unwrap();
    let from_p = read_ranked(&out_p).unwrap();
    assert_eq!(from_j.len(), 7);
    assert!(!from_p[6].fields.contains_key("prompt_id"));
    for (a, b) in from_j.iter().zip(&from_p) {
        assert_eq!(a.fields, b.fields);
        assert_eq!((a.chosen_probs, &a.chosen), (b.chosen_probs, &b.chosen));
    }
    let raw = read_records(&out_p).unwrap();
    assert_eq!(
        raw[0].fields["chosen"],
        json!([{"content": "Question 0?", "role": "user"}, {"content": from_j[0].chosen, "role": "assistant"}])
    );

    // A complete Parquet output is left alone.
    let stderr = ok(&sppo(&[
        "rank",
        "--oracle",
        "game:transitive,n=3",
        "--in",
        s(&gen),
        "--out",
        s(&out_p),
    ]));
    assert!(stderr.contains("already complete"), "{stderr}");

    // Parquet in: the ranked file as input (prompt, responses, extra fields), JSONL out.
    let again = dir.path().join("again.jsonl");
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:transitive,n=3",
        "--in",
        s(&out_p),
        "--out",
        s(&again),
    ]));
    let lines = jsonl(&again);
    for (line, a) in lines.iter().zip(&from_j) {
        for key in [
            "prompt_id",
            "prompt",
            "responses",
            "meta",
            "finish_reasons",
            "chosen",
            "matrix",
            "chosen_probs_win",
        ] {
            assert_eq!(line.get(key), a.fields.get(key), "{key}");
        }
    }
}

#[test]
fn command_oracle_through_the_cli_and_resume_after_its_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (gen, out) = (
        dir.path().join("gen.jsonl"),
        dir.path().join("ranked.jsonl"),
    );
    let inputs = write_generations(&gen, 6, 3);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/oracles/length_judge.py");
    let spec = format!("command:\"python3 {}\"", script.display());
    ok(&sppo(&[
        "rank",
        "--oracle",
        &spec,
        "--in",
        s(&gen),
        "--out",
        s(&out),
        "--batch-size",
        "4",
    ]));
    for (line, input) in jsonl(&out).iter().zip(&inputs) {
        let responses: Vec<String> = serde_json::from_value(input["responses"].clone()).unwrap();
        let longest = responses.iter().map(|r| r.chars().count()).max().unwrap();
        assert_eq!(line["chosen"].as_str().unwrap().chars().count(), longest);
        assert!(line["oracle_scores"].is_array());
    }

    // A judge that crashes on request 3 while a flag file exists: batches of 2, so batch 0 lands,
    // batch 1 fails mid-way; the rerun (flag removed, same spec) ranks the rest.
    let flag = dir.path().join("crash");
    std::fs::write(&flag, "").unwrap();
    let judge = dir.path().join("crashy.py");
    std::fs::write(
        &judge,
        format!(
            "import json, os, sys\nfor line in iter(sys.stdin.readline, ''):\n    req = json.loads(line)\n    if req['id'] == 3 and os.path.exists({:?}):\n        sys.stderr.write('judge crashed\\n'); sys.exit(9)\n    print(json.dumps({{'scores': [len(r) for r in req['responses']]}}), flush=True)\n",
            flag.display().to_string()
        ),
    )
    .unwrap();
    let spec = format!("command:\"python3 {}\"", judge.display());
    let out2 = dir.path().join("crash.jsonl");
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        &spec,
        "--in",
        s(&gen),
        "--out",
        s(&out2),
        "--batch-size",
        "2",
    ]));
    assert!(
        e.contains("exit status: 9")
            && e.contains("judge crashed")
            && e.contains("gen.jsonl:3 .. "),
        "{e}"
    );
    assert_eq!(jsonl(&out2).len(), 2, "the completed batch must be on disk");
    std::fs::remove_file(&flag).unwrap();
    let stderr = ok(&sppo(&[
        "rank",
        "--oracle",
        &spec,
        "--in",
        s(&gen),
        "--out",
        s(&out2),
        "--batch-size",
        "2",
    ]));
    assert!(stderr.contains("ranked 4 prompts (2 resumed)"), "{stderr}");
    assert_eq!(jsonl(&out2).len(), 6);
}

#[test]
fn input_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ranked.jsonl");
    let bad = |name: &str, text: &str| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ok_line = r#"{"prompt": "q", "responses": ["a", "b"]}"#;
    let p = bad(
        "one.jsonl",
        &format!("{ok_line}\n{{\"prompt\": \"q\", \"responses\": [\"a\"]}}\n"),
    );
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&p),
        "--out",
        s(&out),
    ]));
    assert!(
        e.contains("one.jsonl:2: ranking needs at least 2 responses"),
        "{e}"
    );
    let p = bad(
        "noprompt.jsonl",
        &format!("{ok_line}\n\n{{\"responses\": [\"a\", \"b\"]}}\n"),
    );
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&p),
        "--out",
        s(&out),
    ]));
    assert!(e.contains("noprompt.jsonl:3: no `prompt` field"), "{e}");
    let p = bad("json.jsonl", &format!("{ok_line}\n{{\"prompt\": \n"));
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&p),
        "--out",
        s(&out),
    ]));
    assert!(e.contains("json.jsonl:2: malformed JSON"), "{e}");
    let p = bad("types.jsonl", r#"{"prompt": "q", "responses": ["a", 3]}"#);
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&p),
        "--out",
        s(&out),
    ]));
    assert!(
        e.contains("types.jsonl:1: `responses[1]` must be a string"),
        "{e}"
    );
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:chess",
        "--in",
        s(&p),
        "--out",
        s(&out),
    ]));
    assert!(e.contains("unknown game `chess`"), "{e}");
    let e = fails(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&p),
        "--out",
        s(&out),
        "--winrate",
        "mean",
    ]));
    assert!(e.contains("unknown win-rate estimator `mean`"), "{e}");
    // A message-list prompt and the reference pipeline's generate_i columns are accepted.
    let p = bad(
        "reference.jsonl",
        r#"{"prompt": [{"role": "user", "content": "q?"}], "generate_0": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "Tea"}], "generate_1": "Ice"}"#,
    );
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&p),
        "--out",
        s(&out),
    ]));
    let l = jsonl(&out);
    assert_eq!(
        (l[0]["chosen"].as_str(), l[0]["rejected"].as_str()),
        (Some("Ice"), Some("Tea"))
    );
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/oracles")
        .join(name)
}

#[test]
fn reads_the_reference_pipelines_parquet() {
    // Written by pandas (scripts/make_rank_fixtures.py) in the reference's prepare_score layout:
    // chosen/rejected as [{content, role}] lists, no prompt column.
    let rows = read_ranked(&fixture("ref_train.parquet")).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0].prompt.as_str(),
            rows[0].chosen.as_str(),
            rows[0].rejected.as_str()
        ),
        ("What is 2+2?", "I believe 4.", "The answer is 4.")
    );
    assert_eq!(
        (
            rows[1].chosen_probs,
            rows[1].chosen_probs_win,
            rows[1].chosen_probs_lose
        ),
        (0.7, 0.6, 0.4)
    );
    assert_eq!(rows[1].fields["chosen"], json!("Teal."));

    // The reference's generated set (prompt + generate_i message lists) as rank input.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ranked.jsonl");
    ok(&sppo(&[
        "rank",
        "--oracle",
        "game:rps",
        "--in",
        s(&fixture("ref_generated.parquet")),
        "--out",
        s(&out),
    ]));
    let lines = jsonl(&out);
    // 'T' 84 → rock, 'I' 73 → paper, 'S' 83 → scissors: a full cycle ties → chosen 0, rejected 2.
    assert_eq!(
        lines[0]["matrix"],
        json!([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])
    );
    assert_eq!(
        (
            lines[0]["chosen_index"].as_u64(),
            lines[0]["rejected_index"].as_u64()
        ),
        (Some(0), Some(2))
    );
    assert_eq!(lines[1]["rm_scores"], json!([0.3, 0.2, 0.1]));
    assert_eq!(lines[1]["prompt"], json!("Name a colour."));
}

/// The reward fixture of tests/fixtures/reward/smollm2_cls with the SmolLM2 tokenizer and chat
/// template, as a model directory in `into`.
fn reward_model(into: &Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = into.join("reward-model");
    std::fs::create_dir_all(&dir).unwrap();
    let model = root.join("tests/fixtures/reward/smollm2_cls/model");
    let chat = root.join("tests/fixtures/chat/smollm2");
    for (from, name) in [(&model, "config.json"), (&model, "model.safetensors"), (&chat, "tokenizer.json"), (&chat, "tokenizer_config.json")] {
        std::fs::copy(from.join(name), dir.join(name)).unwrap();
    }
    dir
}

/// `--device` picks where a model oracle runs: `cuda` without a GPU is a clear error naming why
/// (no panic from a missing driver); `auto` falls back to the CPU and ranks exactly as `cpu`
/// (on a GPU machine it runs on cuda: the same choices within bf16 tolerance of the scores);
/// `command:` and `game:` oracles open no device, so `--device cuda` does not stop them.
#[test]
fn device_of_a_model_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("gen.jsonl");
    write_generations(&gen, 5, 3);
    let model = reward_model(dir.path());
    let oracle = format!("reward:{}", model.display());
    let rank_on = |device: &str, out: &Path| sppo(&["--device", device, "rank", "--oracle", &oracle, "--in", s(&gen), "--out", s(out)]);

    let cpu_out = dir.path().join("cpu.jsonl");
    ok(&rank_on("cpu", &cpu_out));
    let cpu = jsonl(&cpu_out);
    assert_eq!(cpu.len(), 5);

    let auto_out = dir.path().join("auto.jsonl");
    let stderr = ok(&rank_on("auto", &auto_out));
    let auto = jsonl(&auto_out);
    match sppo::backend::cuda::probe().unavailable_reason() {
        Some(reason) => {
            assert!(stderr.contains(&format!("device: cpu ({reason})")), "auto names its fallback: {stderr}");
            assert_eq!(auto, cpu, "auto on the CPU ranks as --device cpu");
            let e = fails(&rank_on("cuda", &dir.path().join("cuda.jsonl")));
            assert!(e.contains("--device cuda") && e.contains(&reason), "{e}");
            assert!(!e.contains("panicked"), "{e}");
            assert!(!dir.path().join("cuda.jsonl").exists(), "nothing written without the device");
        }
        None => {
            assert!(stderr.contains("device: cuda"), "{stderr}");
            for (a, c) in auto.iter().zip(&cpu) {
                let scores = |l: &Map<String, Value>| serde_json::from_value::<Vec<f64>>(l["oracle_scores"].clone()).unwrap_or_default();
                for (x, y) in scores(a).iter().zip(scores(c)) {
                    assert!((x - y).abs() < 5e-2, "cuda score {x} vs cpu {y}");
                }
            }
        }
    }

    // A game oracle needs no device.
    let game_out = dir.path().join("game.jsonl");
    ok(&sppo(&["--device", "cuda", "rank", "--oracle", "game:rps", "--in", s(&gen), "--out", s(&game_out)]));
    assert_eq!(jsonl(&game_out).len(), 5);
}
