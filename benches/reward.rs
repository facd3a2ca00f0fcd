//! Throughput of the `reward:` oracle on the CPU: a random-weight `LlamaForSequenceClassification`
//! with the SmolLM2-135M shape (30 layers, hidden 576, GQA 9/3, vocab 49152), the SmolLM2 tokenizer
//! and ChatML template, 64 prompts × 5 responses of about 100 tokens, judged in one call (tokenizing,
//! packing, forward, score head). PyTorch `LlamaForSequenceClassification` (f32, eager, no_grad) runs
//! the same token ids in the same run (`scripts/bench_reward_torch.py`, via `.venv/bin/python` when it
//! exists; SPPO_BENCH_NO_TORCH=1 skips it). Prints responses/s and tokens/s.
//!
//! `cargo bench --bench reward`; SPPO_BENCH_PROMPTS=N changes the prompt count.

use sppo::config::ModelConfig;
use sppo::model::weights::{save_flat, ParamLayout, SaveDtype};
use sppo::oracle::{Oracle, OracleInput, RewardOracle};
use std::path::Path;
use std::time::Instant;

const CONFIG: &str = r#"{"architectures":["LlamaForSequenceClassification"],"model_type":"llama","vocab_size":49152,
 "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
 "rms_norm_eps":1e-5,"rope_theta":100000,"max_position_embeddings":8192,"tie_word_embeddings":true,
 "id2label":{"0":"LABEL_0"},"label2id":{"LABEL_0":0},"pad_token_id":2,"bos_token_id":1,"eos_token_id":2,"dtype":"bfloat16"}"#;
const K: usize = 5;
const RESPONSE_WORDS: usize = 90; // about 100 tokens with the SmolLM2 tokenizer

const WORDS: &[&str] = &[
    "the", "model", "answer", "question", "because", "river", "capital", "France", "seven", "quickly", "however",
    "number", "light", "energy", "simple", "explain", "between", "during", "small", "result", "people", "water",
    "language", "compute", "therefore", "example", "city", "history", "science", "music", "under", "across",
];

fn lcg(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

fn sentence(s: &mut u64, words: usize) -> String {
    let mut out: Vec<&str> = (0..words).map(|_| WORDS[(lcg(s) % WORDS.len() as u64) as usize]).collect();
    out.push(".");
    out.join(" ")
}

fn main() -> anyhow::Result<()> {
    let prompts: usize = std::env::var("SPPO_BENCH_PROMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let cfg = ModelConfig::from_json_str(CONFIG)?;
    let layout = ParamLayout::llama(&cfg);
    let mut s = 1u64;
    let flat: Vec<f32> = (0..layout.total).map(|_| (lcg(&mut s) as f32 / (1u64 << 31) as f32 - 0.5) * 0.04).collect();
    std::fs::write(dir.path().join("config.json"), CONFIG)?;
    save_flat(dir.path(), &layout, &flat, SaveDtype::Bf16)?;
    drop(flat);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(root.join("tests/fixtures/chat/smollm2").join(f), dir.path().join(f))?;
    }
    let mut oracle = RewardOracle::load(dir.path())?;

    let texts: Vec<(String, Vec<String>)> =
        (0..prompts).map(|_| (sentence(&mut s, 12), (0..K).map(|_| sentence(&mut s, RESPONSE_WORDS)).collect())).collect();
    let inputs: Vec<OracleInput<'_>> = texts.iter().map(|(p, r)| OracleInput { prompt: p, responses: r, reference: None }).collect();
    let ids: Vec<Vec<u32>> = texts.iter().flat_map(|(p, rs)| rs.iter().map(|r| oracle.encode(p, r))).collect::<anyhow::Result<_>>()?;
    let tokens: usize = ids.iter().map(Vec::len).sum();

    oracle.judge(&inputs[..1])?; // warm-up: thread pool, rotary tables, page-in of the weights
    let t = Instant::now();
    let out = oracle.judge(&inputs)?;
    let secs = t.elapsed().as_secs_f64();
    if out.len() != prompts || out.iter().any(|j| j.scores.as_ref().is_none_or(|r| r.len() != K || r.iter().any(|x| !x.is_finite()))) {
        anyhow::bail!("the oracle returned malformed judgements");
    }
    let n = (prompts * K) as f64;
    println!("\nreward oracle, SmolLM2-135M shape (random weights, f32 compute), {prompts} prompts x {K} responses, {} tokens (mean {:.0})", tokens, tokens as f64 / n);
    println!("{:<28} {:>14} {:>14}", "", "responses/s", "tokens/s");
    println!("{:<28} {:>14.1} {:>14.0}", "sppo (CPU backend)", n / secs, tokens as f64 / secs);

    if std::env::var_os("SPPO_BENCH_NO_TORCH").is_none() {
        let py = root.join(".venv/bin/python");
        if py.exists() {
            let ids_path = dir.path().join("ids.json");
            std::fs::write(&ids_path, serde_json::to_string(&ids)?)?;
            let out = std::process::Command::new(py).arg(root.join("scripts/bench_reward_torch.py")).arg(&ids_path).output()?;
            if !out.status.success() {
                anyhow::bail!("scripts/bench_reward_torch.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            let line = out.stdout.rsplit(|&c| c == b'\n').find(|l| !l.is_empty()).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(line)?;
            let label = format!("pytorch {} (batch {}, {} thr)", v["torch"].as_str().unwrap_or("?"), v["batch"], v["threads"]);
            let secs_t = v["seconds"].as_f64().unwrap_or(f64::NAN);
            println!("{label:<28} {:>14.1} {:>14.0}", n / secs_t, tokens as f64 / secs_t);
            println!("ratio sppo / pytorch: {:.2}x", secs_t / secs);
        } else {
            println!("PyTorch side skipped: no .venv (scripts/setup --dev creates it)");
        }
    }
    Ok(())
}
