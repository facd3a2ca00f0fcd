//! `sppo::oracle`: spec strings, the `command:` oracle against the example script and against
//! misbehaving programs (wrong shape, NaN, out of range, crash, hang, garbage, closed stdout), the
//! games' payoffs and exact exploitability, the win-rate arithmetic (worked by hand in the
//! comments), and property tests of `PrefMatrix` and `rank` over random inputs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sppo::oracle::game::{Game, GameKind};
use sppo::oracle::spec::OracleSpec;
use sppo::oracle::winrate::{argmax_argmin, rank, reference_scores, WinRate, LOGIT_CLAMP};
use sppo::oracle::{build_oracle, sigmoid, Oracle, OracleInput, PrefMatrix};

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// SplitMix64 → f64 in [0, 1): deterministic random inputs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn policy(&mut self, n: usize) -> Vec<f64> {
        let w: Vec<f64> = (0..n).map(|_| self.unit() + 1e-3).collect();
        let s: f64 = w.iter().sum();
        w.into_iter().map(|x| x / s).collect()
    }
    /// A random valid K×K preference matrix (some entries exactly 0, ½ or 1).
    fn matrix(&mut self, k: usize) -> Vec<f64> {
        let mut p = vec![0.5; k * k];
        for i in 0..k {
            for j in (i + 1)..k {
                let v = match self.below(8) {
                    0 => 0.0,
                    1 => 1.0,
                    2 => 0.5,
                    _ => self.unit(),
                };
                p[i * k + j] = v;
                p[j * k + i] = 1.0 - v;
            }
        }
        p
    }
}

// ------------------------------------------------------------------------------------------- specs

#[test]
fn spec_parses_every_kind() {
    let s = OracleSpec::parse("similarity:models/minilm").unwrap();
    assert_eq!(
        s,
        OracleSpec::Similarity {
            dir: "models/minilm".into(),
            tau: 0.05
        }
    );
    let s = OracleSpec::parse("similarity:\"dir,with,commas\",tau=0.1").unwrap();
    assert_eq!(
        s,
        OracleSpec::Similarity {
            dir: "dir,with,commas".into(),
            tau: 0.1
        }
    );
    assert_eq!(
        OracleSpec::parse("reward:rm").unwrap(),
        OracleSpec::Reward { dir: "rm".into() }
    );
    assert_eq!(
        OracleSpec::parse("judge:j,template=t.jinja").unwrap(),
        OracleSpec::Judge {
            dir: "j".into(),
            template: Some(PathBuf::from("t.jinja"))
        }
    );
    assert_eq!(
        OracleSpec::parse("judge:j").unwrap(),
        OracleSpec::Judge {
            dir: "j".into(),
            template: None
        }
    );

    let s = OracleSpec::parse("command:\"python3 'my judge.py' --fast\",timeout=2.5").unwrap();
    assert_eq!(
        s,
        OracleSpec::Command {
            argv: vec!["python3".into(), "my judge.py".into(), "--fast".into()],
            timeout: Duration::from_millis(2500)
        }
    );
    // Inner double quotes: the command ends at the last quote.
    let s = OracleSpec::parse("command:\"python3 -c \"print(1)\"\"").unwrap();
    assert_eq!(
        s,
        OracleSpec::Command {
            argv: vec!["python3".into(), "-c".into(), "print(1)".into()],
            timeout: Duration::from_secs(600)
        }
    );
    // Unquoted: the whole rest, commas included, no options.
    let s = OracleSpec::parse("command:echo a,b").unwrap();
    assert_eq!(
        s,
        OracleSpec::Command {
            argv: vec!["echo".into(), "a,b".into()],
            timeout: Duration::from_secs(600)
        }
    );

    match OracleSpec::parse("game:rps,win=0.9").unwrap() {
        OracleSpec::Game { game, .. } => assert_eq!(game.kind(), &GameKind::Rps { win: 0.9 }),
        other => panic!("{other:?}"),
    }
    match OracleSpec::parse("game:rps5").unwrap() {
        OracleSpec::Game { game, .. } => {
            assert_eq!(game.kind(), &GameKind::Cyclic { n: 5, win: 1.0 })
        }
        other => panic!("{other:?}"),
    }
    match OracleSpec::parse("game:random,n=4,seed=7").unwrap() {
        OracleSpec::Game { game, .. } => {
            assert_eq!(game.kind(), &GameKind::Random { n: 4, seed: 7 })
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn spec_display_round_trips() {
    for spec in [
        "similarity:m,tau=0.2",
        "similarity:\"a,b\"",
        "reward:rm",
        "judge:j,template=\"t,1.jinja\"",
        "command:\"python3 'my judge.py' --x\",timeout=3",
        "command:python3 -c 'print(\"a\")'",
        "game:transitive,n=4,temp=0.5",
        "game:rps",
    ] {
        let parsed = OracleSpec::parse(spec).unwrap();
        let again = OracleSpec::parse(&parsed.to_string())
            .unwrap_or_else(|e| panic!("{spec} → {parsed} does not parse: {e:#}"));
        assert_eq!(parsed, again, "{spec} → {parsed}");
    }
}

#[test]
fn spec_errors_say_what_was_expected() {
    let e = err_text(OracleSpec::parse("pairwise:x"));
    assert!(
        e.contains("unknown oracle kind `pairwise`")
            && e.contains("similarity, reward, judge, command, game"),
        "{e}"
    );
    let e = err_text(OracleSpec::parse("models/rm"));
    assert!(e.contains("KIND:ARGUMENT"), "{e}");
    let e = err_text(OracleSpec::parse("game:chess"));
    assert!(
        e.contains("unknown game `chess`") && e.contains("rps, rps5, cyclic, transitive, random"),
        "{e}"
    );
    let e = err_text(OracleSpec::parse("game:rps,n=3"));
    assert!(e.contains("no option `n`"), "{e}");
    let e = err_text(OracleSpec::parse("game:cyclic,n=4"));
    assert!(e.contains("odd"), "{e}");
    let e = err_text(OracleSpec::parse("game:rps,win=0.2"));
    assert!(e.contains("[0.5, 1]"), "{e}");
    let e = err_text(OracleSpec::parse("similarity:m,tau=0"));
    assert!(e.contains("tau must be a positive"), "{e}");
    let e = err_text(OracleSpec::parse("similarity:m,tau=abc"));
    assert!(e.contains("tau=abc"), "{e}");
    let e = err_text(OracleSpec::parse("reward:rm,tau=1"));
    assert!(e.contains("takes no options"), "{e}");
    let e = err_text(OracleSpec::parse("reward:"));
    assert!(e.contains("needs a model directory"), "{e}");
    let e = err_text(OracleSpec::parse("command:\"python3 x.py"));
    assert!(e.contains("unterminated quote"), "{e}");
    let e = err_text(OracleSpec::parse("command:\"\""));
    assert!(e.contains("needs a program"), "{e}");
    let e = err_text(OracleSpec::parse("command:\"a\",timeout=-1"));
    assert!(e.contains("timeout must be a positive"), "{e}");
    let e = err_text(OracleSpec::parse("judge:j,template"));
    assert!(e.contains("key=value"), "{e}");
    // A model oracle whose directory does not exist names the spec and the missing file.
    let e = err_text(build_oracle("similarity:models/minilm"));
    assert!(e.contains("similarity:models/minilm") && e.contains("config.json"), "{e}");
    let e = err_text(build_oracle("reward:/nonexistent/rm"));
    assert!(e.contains("/nonexistent/rm"), "{e}");
    let e = err_text(build_oracle("command:/nonexistent/judge-program"));
    assert!(
        e.contains("cannot start `/nonexistent/judge-program`"),
        "{e}"
    );
}

// ----------------------------------------------------------------------------------------- command

fn repo_path(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

/// Writes a misbehaving oracle program (a Python script) to a temp dir; returns the spec.
fn script_oracle(dir: &tempfile::TempDir, name: &str, body: &str, options: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("import json, math, os, sys, time\n{body}")).unwrap();
    format!("command:\"python3 '{}'\"{options}", path.display())
}

fn inputs<'a>(responses: &'a [Vec<String>]) -> Vec<OracleInput<'a>> {
    responses
        .iter()
        .map(|r| OracleInput {
            prompt: "Say something.",
            responses: r,
            reference: None,
        })
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn command_oracle_runs_the_example_script_over_several_batches() {
    let spec = format!(
        "command:\"python3 {}\"",
        repo_path("scripts/oracles/length_judge.py")
    );
    let mut oracle = build_oracle(&spec).unwrap();
    let batch1 = vec![
        strings(&["a", "abcd"]),
        strings(&["xyz", "", "hello world"]),
    ];
    let batch2 = vec![strings(&["one", "two", "three", "four"])];
    let got = oracle.judge(&inputs(&batch1)).unwrap();
    assert_eq!(got.len(), 2);
    // scores ln(1 + len): P(i ≻ j) = (1 + len_i) / (2 + len_i + len_j). "abcd" vs "a": 5/7.
    assert!(
        close(got[0].matrix.get(1, 0), 5.0 / 7.0, 1e-12),
        "{:?}",
        got[0]
    );
    assert!(close(got[0].matrix.get(0, 1), 2.0 / 7.0, 1e-12));
    assert_eq!(got[0].scores.as_ref().unwrap().len(), 2);
    // "" vs "hello world" (11 chars): 1 / 13.
    assert!(close(got[1].matrix.get(1, 2), 1.0 / 13.0, 1e-12));
    // A second batch: the same program answers (request ids continue; the script echoes them).
    let got = oracle.judge(&inputs(&batch2)).unwrap();
    assert!(close(got[0].matrix.get(2, 0), 6.0 / 10.0, 1e-12)); // "three" vs "one": 6/10
    assert!(oracle.name().starts_with("command:"));
}

#[test]
fn command_oracle_accepts_a_matrix_reply() {
    let dir = tempfile::tempdir().unwrap();
    let spec = script_oracle(
        &dir,
        "pairwise.py",
        r#"
for line in iter(sys.stdin.readline, ""):
    req = json.loads(line)
    k = len(req["responses"])
    # response i beats j with 0.7 when i < j; diagonal 0 (ignored by sppo)
    m = [[0.0 if i == j else (0.7 if i < j else 0.3) for j in range(k)] for i in range(k)]
    print(json.dumps({"matrix": m}), flush=True)
"#,
        "",
    );
    let mut oracle = build_oracle(&spec).unwrap();
    let r = vec![strings(&["a", "b", "c"])];
    let got = oracle.judge(&inputs(&r)).unwrap();
    assert_eq!(
        got[0].matrix.rows(),
        vec![
            vec![0.5, 0.7, 0.7],
            vec![0.3, 0.5, 0.7],
            vec![0.3, 0.3, 0.5]
        ]
    );
    assert_eq!(got[0].scores, None);
}

/// Runs one batch against a misbehaving script and returns the error text.
fn misbehaving(body: &str, options: &str, batch: Vec<Vec<String>>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let spec = script_oracle(&dir, "bad.py", body, options);
    let mut oracle = build_oracle(&spec).unwrap();
    let e = err_text(oracle.judge(&inputs(&batch)));
    // The oracle is unusable afterwards, with the same reason.
    let again = err_text(oracle.judge(&inputs(&batch)));
    assert!(again.contains("failed earlier"), "{again}");
    e
}

const READ_LOOP: &str = "for line in iter(sys.stdin.readline, \"\"):\n    req = json.loads(line)\n    k = len(req[\"responses\"])\n";

#[test]
fn command_oracle_rejects_wrong_shapes() {
    let two = || vec![strings(&["a", "b"])];
    let e = misbehaving(
        &format!("{READ_LOOP}    print(json.dumps({{\"matrix\": [[0.5, 0.5]]}}), flush=True)\n"),
        "",
        two(),
    );
    assert!(e.contains("`matrix` has 1 rows for 2 responses"), "{e}");
    let e = misbehaving(
        &format!(
            "{READ_LOOP}    print(json.dumps({{\"matrix\": [[0.5, 0.5], [0.5]]}}), flush=True)\n"
        ),
        "",
        two(),
    );
    assert!(e.contains("`matrix[1]` has 1 entries"), "{e}");
    let e = misbehaving(
        &format!("{READ_LOOP}    print(json.dumps({{\"scores\": [1, 2, 3]}}), flush=True)\n"),
        "",
        two(),
    );
    assert!(e.contains("`scores` has 3 entries for 2 responses"), "{e}");
    let e = misbehaving(
        &format!("{READ_LOOP}    print(json.dumps({{\"scores\": [1, \"x\"]}}), flush=True)\n"),
        "",
        two(),
    );
    assert!(e.contains("scores[1] must be a number"), "{e}");
    let e = misbehaving(
        &format!("{READ_LOOP}    print(json.dumps({{\"ranks\": [1, 2]}}), flush=True)\n"),
        "",
        two(),
    );
    assert!(e.contains("neither `matrix` nor `scores`"), "{e}");
    let e = misbehaving(
        &format!("{READ_LOOP}    print(json.dumps([1, 2]), flush=True)\n"),
        "",
        two(),
    );
    assert!(e.contains("must be a JSON object"), "{e}");
    let e = misbehaving(
        &format!(
            "{READ_LOOP}    print(json.dumps({{\"id\": 7, \"scores\": [1, 2]}}), flush=True)\n"
        ),
        "",
        two(),
    );
    assert!(e.contains("id 7, expected 0"), "{e}");
    let e = misbehaving(
        &format!(
            "{READ_LOOP}    print(json.dumps({{\"error\": \"CUDA out of memory\"}}), flush=True)\n"
        ),
        "",
        two(),
    );
    assert!(
        e.contains("the oracle reported an error: CUDA out of memory"),
        "{e}"
    );
}

#[test]
fn command_oracle_rejects_non_finite_and_out_of_range_values() {
    let two = || vec![strings(&["a", "b"])];
    // json.dumps writes NaN, which is not JSON.
    let e = misbehaving(
        &format!(
            "{READ_LOOP}    print(json.dumps({{\"scores\": [float('nan'), 1.0]}}), flush=True)\n"
        ),
        "",
        two(),
    );
    assert!(e.contains("not JSON") && e.contains("non-finite"), "{e}");
    let e = misbehaving(&format!("{READ_LOOP}    print(json.dumps({{\"matrix\": [[0.5, float('inf')], [0, 0.5]]}}), flush=True)\n"), "", two());
    assert!(e.contains("non-finite"), "{e}");
    let e = misbehaving(
        &format!("{READ_LOOP}    print('{{\"scores\": [1e400, 0]}}', flush=True)\n"),
        "",
        two(),
    );
    assert!(e.contains("not JSON") || e.contains("not finite"), "{e}");
    let e = misbehaving(&format!("{READ_LOOP}    print(json.dumps({{\"matrix\": [[0.5, 1.5], [-0.5, 0.5]]}}), flush=True)\n"), "", two());
    assert!(e.contains("matrix[0][1] = 1.5 is not a probability"), "{e}");
    let e = misbehaving(&format!("{READ_LOOP}    print(json.dumps({{\"matrix\": [[0.5, 0.7], [0.7, 0.5]]}}), flush=True)\n"), "", two());
    assert!(
        e.contains("P[0][1] = 0.7 and P[1][0] = 0.7 do not sum to 1"),
        "{e}"
    );
    // The error names the reply, its position in the batch and the command.
    assert!(
        e.contains("reply 0 (batch item 0, 2 responses)") && e.contains("command oracle `python3"),
        "{e}"
    );
}

#[test]
fn command_oracle_reports_a_crash_with_its_status_and_stderr() {
    let batch = vec![
        strings(&["a", "b"]),
        strings(&["c", "d"]),
        strings(&["e", "f"]),
    ];
    let body = format!(
        "{READ_LOOP}    if req['id'] == 1:\n        sys.stderr.write('loading weights\\nRuntimeError: boom\\n')\n        sys.exit(3)\n    print(json.dumps({{'scores': [0, 1]}}), flush=True)\n"
    );
    let e = misbehaving(&body, "", batch);
    assert!(e.contains("closed its stdout after 1 of 3 replies"), "{e}");
    assert!(e.contains("exit status: 3"), "{e}");
    assert!(e.contains("RuntimeError: boom"), "{e}");
}

#[test]
fn command_oracle_times_out_and_kills_a_hung_program() {
    let dir = tempfile::tempdir().unwrap();
    let spec = script_oracle(
        &dir,
        "hang.py",
        "sys.stdin.readline()\ntime.sleep(120)\n",
        ",timeout=1",
    );
    let mut oracle = build_oracle(&spec).unwrap();
    let start = Instant::now();
    let batch = vec![strings(&["a", "b"])];
    let e = err_text(oracle.judge(&inputs(&batch)));
    let waited = start.elapsed();
    assert!(
        e.contains("no reply to request 0 within 1s") && e.contains("killed"),
        "{e}"
    );
    assert!(waited < Duration::from_secs(10), "took {waited:?}");
}

#[test]
fn command_oracle_timeout_kills_the_process() {
    use sppo::oracle::command::CommandOracle;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hang.py");
    std::fs::write(&path, "import time\ntime.sleep(120)\n").unwrap();
    let argv = vec!["python3".to_string(), path.display().to_string()];
    let mut oracle =
        CommandOracle::spawn(&argv, Duration::from_millis(300), "hang".into()).unwrap();
    let pid = oracle.pid();
    let batch = vec![strings(&["a", "b"])];
    let e = err_text(oracle.judge(&inputs(&batch)));
    assert!(e.contains("timeout"), "{e}");
    // Killed and reaped: no process (not even a zombie) is left under that id.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still exists"
    );
}

#[test]
fn command_oracle_rejects_garbage_and_a_closed_stdout() {
    let batch = || vec![strings(&["a", "b"])];
    let e = misbehaving(
        &format!("{READ_LOOP}    print('Loading model... done', flush=True)\n"),
        "",
        batch(),
    );
    assert!(
        e.contains("reply is not JSON") && e.contains("Loading model... done"),
        "{e}"
    );
    // Closes stdout but keeps running: reported (and killed after the grace period), not a hang.
    let e = misbehaving(
        "sys.stdin.readline()\nos.close(1)\ntime.sleep(60)\n",
        "",
        batch(),
    );
    assert!(
        e.contains("closed its stdout after 0 of 1 replies") && e.contains("killed"),
        "{e}"
    );
    // Exits without reading anything.
    let e = misbehaving("sys.exit(0)\n", "", batch());
    assert!(
        e.contains("closed its stdout") && e.contains("exit status: 0"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------- games

fn game(spec: &str) -> Game {
    match OracleSpec::parse(spec).unwrap() {
        OracleSpec::Game { game, .. } => game,
        other => panic!("{other:?}"),
    }
}

#[test]
fn rps_payoff_classes_and_exploitability() {
    let g = game("game:rps");
    // rock 0, paper 1, scissors 2: paper beats rock, scissors beat paper, rock beats scissors.
    assert_eq!(g.payoff(), &[0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.5]);
    // First character mod 3: 'T' = 84 → 0, 'I' = 73 → 1, 'S' = 83 → 2; leading spaces skipped; "" → 0.
    assert_eq!(
        [
            g.classify("The"),
            g.classify("  I think"),
            g.classify("Sure"),
            g.classify("")
        ],
        [0, 1, 2, 0]
    );
    let m = g.matrix(&strings(&["Tea", "Ice", "Sun", "Toast"])).unwrap();
    assert_eq!(m.get(1, 0), 1.0); // paper ≻ rock
    assert_eq!(m.get(2, 1), 1.0); // scissors ≻ paper
    assert_eq!(m.get(0, 2), 1.0); // rock ≻ scissors
    assert_eq!(m.get(0, 3), 0.5); // rock vs rock
    assert_eq!(g.nash(), Some(vec![1.0 / 3.0; 3]));
    assert!(g.exploitability(&[1.0 / 3.0; 3]).unwrap().abs() < 1e-15);
    // Pure rock: paper wins with P 1 → 1 − ½.
    assert_eq!(g.exploitability(&[1.0, 0.0, 0.0]).unwrap(), 0.5);
    // (½, ½, 0): rock ½·½ + ½·0 = ¼, paper ½·1 + ½·½ = ¾, scissors ½·0 + ½·1 = ½ → ¾ − ½.
    assert!(close(
        g.exploitability(&[0.5, 0.5, 0.0]).unwrap(),
        0.25,
        1e-15
    ));
    // Softened: win = 0.8, pure rock is exploited by paper at 0.8 → 0.3.
    let soft = game("game:rps,win=0.8");
    assert!(close(
        soft.exploitability(&[1.0, 0.0, 0.0]).unwrap(),
        0.3,
        1e-15
    ));
    assert_eq!(soft.payoff_at(0, 2), 0.8);
    assert!(close(soft.payoff_at(2, 0), 0.2, 1e-15));
    let e = err_text(g.exploitability(&[0.5, 0.6, 0.0]));
    assert!(e.contains("sums to"), "{e}");
    let e = err_text(g.exploitability(&[0.5, 0.5]));
    assert!(e.contains("3 classes"), "{e}");
}

#[test]
fn cyclic_games_are_balanced_tournaments() {
    for spec in ["game:rps5", "game:cyclic,n=7", "game:cyclic,n=3"] {
        let g = game(spec);
        let n = g.classes();
        for c in 0..n {
            // Each class beats (n−1)/2 others: row sum ½ + (n−1)/2.
            let row: f64 = (0..n).map(|d| g.payoff_at(c, d)).sum();
            assert_eq!(row, 0.5 + (n - 1) as f64 / 2.0, "{spec} row {c}");
        }
        let nash = g.nash().unwrap();
        assert!(g.exploitability(&nash).unwrap().abs() < 1e-12, "{spec}");
        // Any pure policy is exploited fully: some class beats it with P 1.
        let mut pure = vec![0.0; n];
        pure[0] = 1.0;
        assert_eq!(g.exploitability(&pure).unwrap(), 0.5, "{spec}");
    }
    assert_eq!(game("game:cyclic,n=3").payoff(), game("game:rps").payoff());
}

#[test]
fn transitive_game_has_a_dominant_class() {
    let g = game("game:transitive,n=3,temp=1");
    assert!(close(g.payoff_at(2, 0), sigmoid(2.0), 1e-15));
    assert!(close(g.payoff_at(0, 1), sigmoid(-1.0), 1e-15));
    // Uniform: class 2 wins (½ + σ(1) + σ(2)) / 3 = (0.5 + 0.731059 + 0.880797)/3 = 0.703952.
    assert!(close(
        g.exploitability(&[1.0 / 3.0; 3]).unwrap(),
        0.20395188553596244,
        1e-12
    ));
    assert_eq!(g.nash(), Some(vec![0.0, 0.0, 1.0]));
    assert_eq!(g.exploitability(&[0.0, 0.0, 1.0]).unwrap(), 0.0);
    let hard = game("game:transitive,n=4,temp=0");
    assert_eq!(hard.payoff_at(3, 0), 1.0);
    assert_eq!(hard.payoff_at(1, 2), 0.0);
    assert_eq!(hard.exploitability(&[0.0, 0.0, 1.0, 0.0]).unwrap(), 0.5);
}

#[test]
fn random_game_is_seeded_and_valid() {
    let a = game("game:random,n=5,seed=3");
    let b = game("game:random,n=5,seed=3");
    let c = game("game:random,n=5,seed=4");
    assert_eq!(a, b);
    assert_ne!(a.payoff(), c.payoff());
    assert_eq!(a.nash(), None);
    for x in 0..5 {
        for y in 0..5 {
            assert!(close(a.payoff_at(x, y) + a.payoff_at(y, x), 1.0, 1e-15));
        }
    }
}

#[test]
fn exploitability_is_nonnegative_and_matches_brute_force() {
    let mut rng = Rng(11);
    for spec in [
        "game:rps",
        "game:rps,win=0.7",
        "game:rps5",
        "game:transitive,n=5",
        "game:random,n=6,seed=9",
    ] {
        let g = game(spec);
        for _ in 0..200 {
            let pi = rng.policy(g.classes());
            let e = g.exploitability(&pi).unwrap();
            assert!(e >= -1e-12, "{spec}: {e} for {pi:?}");
            // No mixed response does better than the best pure one (brute force over random mixes).
            let best_mixed = (0..50)
                .map(|_| {
                    let y = rng.policy(g.classes());
                    (0..g.classes())
                        .map(|c| {
                            y[c] * (0..g.classes())
                                .map(|d| g.payoff_at(c, d) * pi[d])
                                .sum::<f64>()
                        })
                        .sum::<f64>()
                })
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(best_mixed - 0.5 <= e + 1e-12, "{spec}");
        }
    }
}

#[test]
fn game_oracle_judges_by_class_and_empirical_policy_counts() {
    let mut oracle = build_oracle("game:rps").unwrap();
    let r = vec![strings(&["Tea", "Ice"]), strings(&["Sun", "Sun", " Ice"])];
    let got = oracle.judge(&inputs(&r)).unwrap();
    assert_eq!(got[0].matrix.rows(), vec![vec![0.5, 0.0], vec![1.0, 0.5]]);
    assert_eq!(got[1].matrix.get(0, 2), 1.0);
    assert_eq!(got[1].matrix.get(0, 1), 0.5);
    let g = game("game:rps");
    assert_eq!(
        g.empirical_policy(&["Tea", "Ice", "Sun", "Sky"]),
        vec![0.25, 0.25, 0.5]
    );
}

// ---------------------------------------------------------------------------------------- win-rate

fn m(k: usize, upper: &[f64]) -> PrefMatrix {
    // Builds P from its strict upper triangle, row by row.
    let mut p = vec![0.5; k * k];
    let mut it = upper.iter();
    for i in 0..k {
        for j in (i + 1)..k {
            let v = *it.next().unwrap();
            p[i * k + j] = v;
            p[j * k + i] = 1.0 - v;
        }
    }
    PrefMatrix::new(k, p).unwrap()
}

#[test]
fn winrate_k2_by_hand() {
    let p = m(2, &[0.75]);
    // scores: C01 = logit 0.75 = ln 3, C10 = −ln 3; s0 = (1/2)(C01 − C10) = ln 3, s1 = −ln 3.
    // P̂01 = σ(2 ln 3) = 9/10. win = (½ + 0.9)/2 = 0.7, lose = (0.1 + ½)/2 = 0.3.
    let r = rank(&p, WinRate::Scores).unwrap();
    assert_eq!((r.chosen, r.rejected), (0, 1));
    assert!(close(r.scores[0], 3f64.ln(), 1e-12) && close(r.scores[1], -(3f64.ln()), 1e-12));
    assert!(close(r.chosen_probs, 0.9, 1e-12));
    assert!(close(r.chosen_probs_win, 0.7, 1e-12));
    assert!(close(r.chosen_probs_lose, 0.3, 1e-12));
    // pairwise: P̂(y0 ≻ π) = P01 = 0.75, P̂(y1 ≻ π) = 0.25; chosen_probs = P01.
    let r = rank(&p, WinRate::Pairwise).unwrap();
    assert_eq!((r.chosen, r.rejected), (0, 1));
    assert_eq!(
        (r.chosen_probs, r.chosen_probs_win, r.chosen_probs_lose),
        (0.75, 0.75, 0.25)
    );
    // Reversed preference: the other way round.
    let r = rank(&m(2, &[0.25]), WinRate::Scores).unwrap();
    assert_eq!((r.chosen, r.rejected), (1, 0));
}

#[test]
fn winrate_k3_by_hand() {
    // P01 = ½, P02 = 0.8, P12 = 0.6.
    let p = m(3, &[0.5, 0.8, 0.6]);
    // pairwise: y0 (0.5 + 0.8)/2 = 0.65, y1 (0.5 + 0.6)/2 = 0.55, y2 (0.2 + 0.4)/2 = 0.3.
    let r = rank(&p, WinRate::Pairwise).unwrap();
    assert_eq!((r.chosen, r.rejected), (0, 2));
    assert!(
        close(r.win_rates[0], 0.65, 1e-12)
            && close(r.win_rates[1], 0.55, 1e-12)
            && close(r.win_rates[2], 0.3, 1e-12)
    );
    assert_eq!(r.chosen_probs, 0.8);
    assert!(close(r.chosen_probs_win, 0.65, 1e-12) && close(r.chosen_probs_lose, 0.3, 1e-12));
    // scores: logits C01 = 0, C02 = ln 4, C12 = ln 1.5 (and C_ji = −C_ij), so
    // s0 = (2/3) ln 4 = 0.924196, s1 = (2/3) ln 1.5 = 0.270310, s2 = −(2/3) ln 6 = −1.194506.
    // P̂01 = σ((2/3) ln(8/3)) = 1.922999/2.922999 = 0.657886, P̂02 = σ((2/3) ln 24) = 8.320335/9.320335
    // = 0.892708, P̂12 = σ((2/3) ln 9) = 4.326749/5.326749 = 0.812268.
    // win = (½ + 0.657886 + 0.892708)/3 = 0.683531; lose = (0.107292 + 0.187732 + ½)/3 = 0.265008.
    let r = rank(&p, WinRate::Scores).unwrap();
    assert_eq!((r.chosen, r.rejected), (0, 2));
    assert!(close(r.scores[0], 0.9241962407465937, 1e-12));
    assert!(close(r.scores[1], 0.27031007207210955, 1e-12));
    assert!(close(r.scores[2], -1.1945063128187032, 1e-12));
    assert!(close(r.chosen_probs, 0.8927077225605754, 1e-12));
    assert!(close(r.chosen_probs_win, 0.6835311297798193, 1e-12));
    assert!(close(r.chosen_probs_lose, 0.26500801807551927, 1e-12));
}

#[test]
fn winrate_ties_break_deterministically() {
    // Everything ½: chosen = lowest index (0), rejected = highest index (K−1), never equal.
    for k in 2..6 {
        let p = PrefMatrix::new(k, vec![0.5; k * k]).unwrap();
        for mode in WinRate::ALL {
            let r = rank(&p, mode).unwrap();
            assert_eq!((r.chosen, r.rejected), (0, k - 1), "{mode} K={k}");
            assert_eq!(
                (r.chosen_probs, r.chosen_probs_win, r.chosen_probs_lose),
                (0.5, 0.5, 0.5),
                "{mode}"
            );
        }
    }
    // Two best tied (y0 ~ y1, both beat y2 with 0.9): chosen = 0.
    let p = m(3, &[0.5, 0.9, 0.9]);
    for mode in WinRate::ALL {
        assert_eq!(rank(&p, mode).unwrap().chosen, 0, "{mode}");
        assert_eq!(rank(&p, mode).unwrap().rejected, 2, "{mode}");
    }
    // Two worst tied (y0 beats both with 0.9, y1 ~ y2): rejected = 2, the higher index.
    let p = m(3, &[0.9, 0.9, 0.5]);
    for mode in WinRate::ALL {
        assert_eq!(
            (
                rank(&p, mode).unwrap().chosen,
                rank(&p, mode).unwrap().rejected
            ),
            (0, 2),
            "{mode}"
        );
    }
    // Rock-paper-scissors among three: a perfect cycle is a tie.
    let p = m(3, &[0.0, 1.0, 0.0]);
    assert_eq!(reference_scores(&p), vec![0.0, 0.0, 0.0]);
    assert_eq!(argmax_argmin(&[1.0, 3.0, 3.0, 0.0, 0.0]), (1, 4));
    let e = err_text(rank(
        &PrefMatrix::new(1, vec![0.5]).unwrap(),
        WinRate::Scores,
    ));
    assert!(e.contains("at least 2 responses"), "{e}");
}

#[test]
fn winrate_scores_clamps_certain_preferences() {
    // A hard win (P = 1): logits clamp at ±20, s1 = (1/2)(20 + 20) = 20, s0 = −20.
    let p = m(2, &[0.0]);
    let r = rank(&p, WinRate::Scores).unwrap();
    assert_eq!((r.chosen, r.rejected), (1, 0));
    assert_eq!(r.scores, vec![-LOGIT_CLAMP, LOGIT_CLAMP]);
    assert!(r.chosen_probs > 1.0 - 1e-15 && r.chosen_probs <= 1.0);
    assert!(r.scores.iter().all(|s| s.is_finite()));
}

// ------------------------------------------------------------------------------ PrefMatrix properties

#[test]
fn prefmatrix_properties_over_random_inputs() {
    let mut rng = Rng(2024);
    for case in 0..500 {
        let k = 1 + rng.below(8);
        let p = rng.matrix(k);
        let pm = PrefMatrix::new(k, p.clone()).unwrap_or_else(|e| panic!("case {case}: {e:#}"));
        for i in 0..k {
            assert_eq!(pm.get(i, i), 0.5);
            for j in 0..k {
                assert!(close(pm.get(i, j) + pm.get(j, i), 1.0, 1e-12));
            }
        }
        assert_eq!(PrefMatrix::from_rows(&pm.rows()).unwrap(), pm);
        if k >= 2 {
            // Break antisymmetry at one entry: the error names it.
            let (i, j) = (rng.below(k), rng.below(k));
            if i != j {
                let mut bad = p.clone();
                bad[i * k + j] = (bad[i * k + j] + 0.25) % 1.0;
                let e = err_text(PrefMatrix::new(k, bad));
                assert!(e.contains("do not sum to 1"), "{e}");
                let mut nan = p.clone();
                nan[i * k + j] = f64::NAN;
                let e = err_text(PrefMatrix::new(k, nan));
                assert!(e.contains(&format!("P[{i}][{j}] = NaN")), "{e}");
            }
            for mode in WinRate::ALL {
                let r = rank(&pm, mode).unwrap();
                assert_ne!(r.chosen, r.rejected, "case {case}");
                assert!(
                    r.chosen_probs_win >= r.chosen_probs_lose,
                    "case {case} {mode}"
                );
                for w in &r.win_rates {
                    assert!((0.0..=1.0).contains(w));
                }
                // chosen has the max score, rejected the min.
                let max = r.scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let min = r.scores.iter().cloned().fold(f64::INFINITY, f64::min);
                assert_eq!((r.scores[r.chosen], r.scores[r.rejected]), (max, min));
                if mode == WinRate::Pairwise {
                    // Σ_i mean_{j≠i} P_ij = (K(K−1)/2)/(K−1) = K/2.
                    assert!(close(r.win_rates.iter().sum::<f64>(), k as f64 / 2.0, 1e-9));
                    assert_eq!(r.chosen_probs, pm.get(r.chosen, r.rejected));
                } else {
                    // Σ_i s_i = 0 (every C_ij − C_ji appears once with each sign).
                    assert!(r.scores.iter().sum::<f64>().abs() < 1e-9);
                }
            }
        }
    }
    let e = err_text(PrefMatrix::new(3, vec![0.5; 8]));
    assert!(e.contains("8 entries, expected 3×3"), "{e}");
    let e = err_text(PrefMatrix::from_rows(&[vec![0.5, 0.5], vec![0.5]]));
    assert!(e.contains("row 1 has 1 entries"), "{e}");
}

#[test]
fn bradley_terry_matrices_rank_by_their_scores() {
    let mut rng = Rng(7);
    for _ in 0..300 {
        let k = 2 + rng.below(7);
        let s: Vec<f64> = (0..k).map(|_| rng.unit() * 6.0 - 3.0).collect();
        let pm = PrefMatrix::from_scores(&s, 1.0).unwrap();
        for i in 0..k {
            for j in 0..k {
                if s[i] > s[j] {
                    assert!(pm.get(i, j) > 0.5);
                }
            }
        }
        // logit(P_ij) = s_i − s_j, so the reference scores are 2(s_i − mean s) and rank alike.
        let mean = s.iter().sum::<f64>() / k as f64;
        let r = rank(&pm, WinRate::Scores).unwrap();
        for i in 0..k {
            assert!(
                close(r.scores[i], 2.0 * (s[i] - mean), 1e-6),
                "{:?} vs {s:?}",
                r.scores
            );
        }
        let (w, l) = argmax_argmin(&s);
        assert_eq!((r.chosen, r.rejected), (w, l));
        assert_eq!(rank(&pm, WinRate::Pairwise).unwrap().chosen, w);
    }
    assert!(err_text(PrefMatrix::from_scores(&[0.0, f64::NAN], 1.0)).contains("score 1 is NaN"));
}
