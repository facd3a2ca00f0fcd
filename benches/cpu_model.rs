//! CPU throughput of the SmolLM2-135M architecture (random weights, f32) beside PyTorch +
//! transformers on the same machine, in the same run: prefill forward, forward+backward of the
//! summed response log-probs, and batched sampling.
//!
//! `cargo bench --bench cpu_model` (PyTorch side: `.venv/bin/python scripts/bench_pytorch.py`,
//! run automatically when `.venv` exists; set SPPO_BENCH_NO_TORCH=1 to skip it).

mod common;

use common::SMOLLM2;
use sppo::backend::cpu::CpuBackend;
use sppo::config::ModelConfig;
use sppo::generate::{generate, DecodeWeights, GenOptions, GenRequest};
use sppo::model::{weights::ParamLayout, Activations, Batch, Llama};
use sppo::sampling::SamplingParams;
use std::time::Instant;


const BATCH: usize = 4;
const SEQ: usize = 256;
const GEN_BATCH: usize = 8;
const GEN_PROMPT: usize = 32;
const GEN_NEW: usize = 64;

fn lcg(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f(); // warm-up
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() -> anyhow::Result<()> {
    let b = CpuBackend::new(None)?;
    let cfg = ModelConfig::from_json_str(SMOLLM2)?;
    let layout = ParamLayout::llama(&cfg);
    let mut s = 1u64;
    let flat: Vec<f32> = (0..layout.total).map(|_| (lcg(&mut s) as f32 / (1u64 << 31) as f32 - 0.5) * 0.04).collect();
    let mut model = Llama::from_flat(&b, cfg.clone(), &flat)?;
    model.ensure_positions(&b, 1024)?;
    let seqs: Vec<Vec<u32>> = (0..BATCH).map(|_| (0..SEQ).map(|_| (lcg(&mut s) % 49152) as u32).collect()).collect();
    let batch = Batch::from_sequences(seqs.iter().map(|x| (x.as_slice(), SEQ / 2)))?;
    let n = batch.len();
    let reps = 3;
    // Sampling figures vary more between runs on a shared VM: three timed generations each.
    const GEN_REPS: usize = 3;

    // SPPO_BENCH_ONLY=forward|forward_backward|sampling|sampling_bf16 runs one measure (for profiling).
    let only = std::env::var("SPPO_BENCH_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut acts = Activations::new(&b, &cfg, n, false)?;
    let fwd = if wanted("forward") { time(reps, || model.forward(&b, &batch, &mut acts).expect("forward")) } else { f64::NAN };
    let mut grads = model.alloc_grads(&b)?;
    let w = vec![1.0f32; BATCH];
    let fwdbwd = if !wanted("forward_backward") {
        f64::NAN
    } else {
        time(reps, || {
            model.forward(&b, &batch, &mut acts).expect("forward");
            model.backward(&b, &batch, &mut acts, &w, &mut grads).expect("backward");
        })
    };
    let opts = GenOptions {
        sampling: SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 0, min_p: 0.0 },
        max_new_tokens: GEN_NEW,
        eos_ids: vec![],
        seed: 1,
        iteration: 0,
        batch_size: GEN_BATCH,
        max_prefill_tokens: 4096,
        weights: Default::default(),
    };
    let reqs: Vec<GenRequest> = (0..GEN_BATCH)
        .map(|i| GenRequest { prompt_id: i.to_string(), sample_index: 0, prompt_ids: (0..GEN_PROMPT).map(|_| (lcg(&mut s) % 49152) as u32).collect() })
        .collect();
    let gen = if !wanted("sampling") {
        f64::NAN
    } else {
        time(GEN_REPS, || {
            generate(&b, &mut model, &reqs, &opts, |_| {}).expect("generate");
        })
    };
    // The same with the weights rounded to bf16 (`--decode-weights bf16`): decode steps then read
    // 2 bytes per weight. PyTorch's peer is its own generate in bf16.
    let opts_bf16 = GenOptions { weights: DecodeWeights::Bf16, ..opts.clone() };
    let gen_bf16 = if !wanted("sampling_bf16") {
        f64::NAN
    } else {
        time(GEN_REPS, || {
            generate(&b, &mut model, &reqs, &opts_bf16, |_| {}).expect("generate");
        })
    };

    let ours = [
        (format!("forward {BATCH}x{SEQ} (tokens/s)"), (n as f64) / fwd),
        (format!("forward+backward {BATCH}x{SEQ} (tokens/s)"), (n as f64) / fwdbwd),
        (format!("sampling batch {GEN_BATCH}, {GEN_NEW} new (tokens/s)"), (GEN_BATCH * GEN_NEW) as f64 / gen),
        ("sampling, bf16 weights (tokens/s)".to_string(), (GEN_BATCH * GEN_NEW) as f64 / gen_bf16),
    ];
    let torch = if only.is_some() { None } else { torch_figures() };
    println!("\nSmolLM2-135M architecture, random weights, f32, {} threads", rayon::current_num_threads());
    println!("{:<44} {:>12} {:>14} {:>8}", "measure", "sppo", "pytorch", "ratio");
    for (i, (name, v)) in ours.iter().enumerate() {
        match torch.as_ref().and_then(|t| t.get(i).copied()) {
            Some(t) => println!("{name:<44} {v:>12.1} {t:>14.1} {:>7.2}x", v / t),
            None => println!("{name:<44} {v:>12.1} {:>14} {:>8}", "-", "-"),
        }
    }
    Ok(())
}

/// Runs scripts/bench_pytorch.py with the same shapes; None when no venv is set up.
fn torch_figures() -> Option<Vec<f64>> {
    if std::env::var_os("SPPO_BENCH_NO_TORCH").is_some() {
        return None;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    if !py.exists() {
        eprintln!("PyTorch side skipped: no .venv (scripts/setup --dev creates it)");
        return None;
    }
    let out = std::process::Command::new(py)
        .arg(root.join("scripts/bench_pytorch.py"))
        .args(["--batch", &BATCH.to_string(), "--seq", &SEQ.to_string()])
        .args(["--gen-batch", &GEN_BATCH.to_string(), "--gen-prompt", &GEN_PROMPT.to_string(), "--gen-new", &GEN_NEW.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("PyTorch side failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(out.stdout.rsplit(|&c| c == b'\n').find(|l| !l.is_empty())?).ok()?;
    Some(vec![v["forward"].as_f64()?, v["forward_backward"].as_f64()?, v["sampling"].as_f64()?, v["sampling_bf16"].as_f64()?])
}
