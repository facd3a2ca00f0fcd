//! Oracle throughput on the CPU: responses scored per second by `similarity` (all-MiniLM-L6-v2,
//! f32) for 64 prompts × 5 responses of about 100 word pieces (plus one reference each), beside
//! sentence-transformers on the same machine, in the same run, on the same texts; the two sides'
//! scores must agree (max |Δcos| < 1e-4) or the bench exits non-zero.
//!
//! `cargo bench --bench oracles` (sentence-transformers side: `.venv/bin/python
//! scripts/bench_minilm_torch.py`, run automatically when `.venv` exists; set
//! SPPO_BENCH_NO_TORCH=1 to skip it). Needs the model from scripts/setup.

use sppo::oracle::similarity::{SimilarityOracle, DEFAULT_TEMPERATURE};
use sppo::oracle::{Oracle, OracleInput};
use std::path::Path;
use std::time::Instant;

const PROMPTS: usize = 64;
const RESPONSES: usize = 5;
const WORDS: usize = 80; // about 100 word pieces with punctuation and sub-words
const REPS: usize = 3;

const VOCAB: &[&str] = &[
    "the",
    "model",
    "answer",
    "gradient",
    "tokenizer",
    "quickly",
    "because",
    "preference",
    "equilibrium",
    "samples",
    "reference",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "with",
    "as",
    "was",
    "on",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "her",
    "all",
    "she",
    "there",
    "would",
    "their",
    "we",
    "him",
    "been",
    "has",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "photosynthesis",
    "Paris",
    "asynchronous",
    "self-play",
    "optimisation",
    "2024",
    "kernel",
    "matrix",
    "preferred",
    "response",
];

fn lcg(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

fn text(state: &mut u64) -> String {
    let mut s = String::new();
    for w in 0..WORDS {
        if w > 0 {
            s.push(if lcg(state).is_multiple_of(12) { ',' } else { ' ' });
            if s.ends_with(',') {
                s.push(' ');
            }
        }
        s.push_str(VOCAB[(lcg(state) % VOCAB.len() as u64) as usize]);
    }
    s.push('.');
    s
}

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(".cache/models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        anyhow::bail!("{} is missing: run scripts/setup", dir.display());
    }
    let mut s = 7u64;
    let prompts: Vec<(String, Vec<String>)> =
        (0..PROMPTS).map(|_| (text(&mut s), (0..RESPONSES).map(|_| text(&mut s)).collect())).collect();
    let inputs: Vec<OracleInput> =
        prompts.iter().map(|(r, resp)| OracleInput { prompt: "bench", responses: resp, reference: Some(r) }).collect();

    let mut oracle = SimilarityOracle::load(&dir, DEFAULT_TEMPERATURE)?;
    let pieces: usize = prompts
        .iter()
        .flat_map(|(r, resp)| std::iter::once(r).chain(resp))
        .map(|t| oracle.tokenize(&[t]).map(|v| v[0].len()).unwrap_or(0))
        .sum();
    let texts = PROMPTS * (RESPONSES + 1);
    let ours = oracle.judge(&inputs)?; // warm-up
    let t = Instant::now();
    for _ in 0..REPS {
        oracle.judge(&inputs)?;
    }
    let dt = t.elapsed().as_secs_f64() / REPS as f64;
    let n = (PROMPTS * RESPONSES) as f64;

    println!("\nsimilarity oracle (all-MiniLM-L6-v2, f32, CPU, {} threads): {PROMPTS} prompts x {RESPONSES} responses, {texts} texts, {:.1} word pieces per text", oracle_threads(), pieces as f64 / texts as f64);
    println!("{:<34} {:>14} {:>12}", "implementation", "responses/s", "s per call");
    println!("{:<34} {:>14.1} {:>12.3}", "sppo similarity (CPU backend)", n / dt, dt);
    if let Some(torch) = torch_side(root, &dir, &prompts)? {
        let rps = torch["responses_per_s"].as_f64().unwrap_or(f64::NAN);
        let label = format!("sentence-transformers {} ({} thr)", torch["sentence_transformers"].as_str().unwrap_or("?"), torch["threads"]);
        println!("{label:<34} {rps:>14.1} {:>12.3}", torch["seconds"].as_f64().unwrap_or(f64::NAN));
        println!("ratio sppo / sentence-transformers: {:.2}x", (n / dt) / rps);
        let mut worst = 0f64;
        for (p, j) in ours.iter().enumerate() {
            let ours = j.scores.as_ref().ok_or_else(|| anyhow::anyhow!("no scores"))?;
            for (r, &x) in ours.iter().enumerate() {
                let y = torch["scores"][p][r].as_f64().ok_or_else(|| anyhow::anyhow!("torch side: no score {p}/{r}"))?;
                worst = worst.max((x - y).abs());
            }
        }
        println!("max |Δ score| vs sentence-transformers: {worst:.2e}");
        // NaN-safe: a NaN score fails too.
        if worst.is_nan() || worst >= 1e-4 {
            anyhow::bail!("scores disagree with sentence-transformers by {worst:e}");
        }
    }
    Ok(())
}

fn oracle_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Runs scripts/bench_minilm_torch.py on the same texts; None when no venv is set up.
fn torch_side(root: &Path, dir: &Path, prompts: &[(String, Vec<String>)]) -> anyhow::Result<Option<serde_json::Value>> {
    if std::env::var_os("SPPO_BENCH_NO_TORCH").is_some() {
        return Ok(None);
    }
    let py = root.join(".venv/bin/python");
    if !py.exists() {
        eprintln!("sentence-transformers side skipped: no .venv (scripts/setup --dev creates it)");
        return Ok(None);
    }
    let input = tempfile::NamedTempFile::new()?;
    let doc = serde_json::json!({"prompts": prompts.iter().map(|(r, resp)| serde_json::json!({"reference": r, "responses": resp})).collect::<Vec<_>>()});
    std::fs::write(input.path(), serde_json::to_vec(&doc)?)?;
    let out = std::process::Command::new(py)
        .arg(root.join("scripts/bench_minilm_torch.py"))
        .arg("--model")
        .arg(dir)
        .arg("--input")
        .arg(input.path())
        .args(["--reps", &REPS.to_string()])
        .output()?;
    if !out.status.success() {
        eprintln!("sentence-transformers side failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return Ok(None);
    }
    let line = out.stdout.rsplit(|&c| c == b'\n').find(|l| !l.is_empty()).unwrap_or(b"");
    Ok(Some(serde_json::from_slice(line)?))
}
