//! The weight products of one CPU decode step beside this machine's memory-read ceiling, measured
//! in the same run: a decode step multiplies a few rows (one per sequence) by every weight, so its
//! speed is the rate at which the weights stream from memory.
//!
//! SmolLM2-135M shapes (30 layers, Q/K/V and gate/up as one pass each, as the model runs them, and
//! the 49152-row LM head), 8 rows, random weights; f32 and the bf16 decode copy
//! (`--decode-weights bf16`). The ceiling is a parallel sum over a 1 GiB buffer on the same pool.
//!
//! `cargo bench --bench cpu_decode` (`SPPO_BENCH_THREADS=N` to choose the pool's size)

mod common;

use rayon::prelude::*;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::Backend;
use sppo::config::ModelConfig;
use sppo::model::weights::ParamLayout;
use std::ops::Range;
use std::time::Instant;

const ROWS: usize = 8;
const STEPS: usize = 20;

/// Seconds per decode step's products, (median, best) of STEPS, and the weights they read, over
/// the model's own parameter layout in `flat`.
fn step_time(b: &CpuBackend, cfg: &ModelConfig, flat: &[f32]) -> ((f64, f64), usize) {
    let ranges = ParamLayout::llama(cfg).decoder_ranges(cfg);
    let head = ranges.lm_head.clone().unwrap_or(ranges.embed_tokens.clone());
    let w = |r: &Range<usize>| &flat[r.clone()];
    let (c, i, qd, kvd, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
    let x: Vec<f32> = (0..ROWS * c.max(qd).max(i)).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    let (mut q, mut k, mut v, mut o) = (vec![0.0; ROWS * qd], vec![0.0; ROWS * kvd], vec![0.0; ROWS * kvd], vec![0.0; ROWS * c]);
    let (mut gate, mut up, mut down, mut logits) = (vec![0.0; ROWS * i], vec![0.0; ROWS * i], vec![0.0; ROWS * c], vec![0.0; ROWS * vocab]);
    let mut times = Vec::new();
    b.enter(|| {
        for _ in 0..STEPS + 1 {
            let t = Instant::now();
            for l in &ranges.layers {
                let qkv = vec![(&mut q[..], w(&l.q_proj), qd), (&mut k[..], w(&l.k_proj), kvd), (&mut v[..], w(&l.v_proj), kvd)];
                b.matmul_forward_many(qkv, &x[..ROWS * c], c).expect("qkv");
                b.matmul_forward(&mut o, &x[..ROWS * qd], w(&l.o_proj), qd, c).expect("o");
                b.matmul_forward_many(vec![(&mut gate[..], w(&l.gate_proj), i), (&mut up[..], w(&l.up_proj), i)], &x[..ROWS * c], c).expect("gate/up");
                b.matmul_forward(&mut down, &x[..ROWS * i], w(&l.down_proj), i, c).expect("down");
            }
            b.matmul_forward(&mut logits, &x[..ROWS * c], w(&head), c, vocab).expect("lm head");
            times.push(t.elapsed().as_secs_f64());
        }
    });
    times.remove(0); // warm-up
    times.sort_by(f64::total_cmp);
    let layer = |l: &sppo::model::weights::LayerRanges| [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj].iter().map(|r| r.len()).sum::<usize>();
    let weights = ranges.layers.iter().map(layer).sum::<usize>() + head.len();
    ((times[times.len() / 2], times[0]), weights)
}

/// Bytes per second of a parallel f32 sum over 1 GiB (the median of 5), on the backend's pool.
fn read_ceiling(b: &CpuBackend) -> f64 {
    let buf: Vec<f32> = (0..1usize << 28).into_par_iter().map(|i| (i % 13) as f32).collect();
    let mut rates: Vec<f64> = (0..6)
        .map(|_| {
            let t = Instant::now();
            let s: f32 = b.enter(|| {
                buf.par_chunks(1 << 16)
                    .map(|c| {
                        let mut lanes = [0.0f32; 16];
                        for piece in c.chunks_exact(16) {
                            for (l, x) in lanes.iter_mut().zip(piece) {
                                *l += x;
                            }
                        }
                        lanes.iter().sum::<f32>()
                    })
                    .sum()
            });
            std::hint::black_box(s);
            (buf.len() * 4) as f64 / t.elapsed().as_secs_f64()
        })
        .skip(1)
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // SPPO_BENCH_THREADS=1 measures one core (the kernel's own rate, without the shared bus).
    let threads = std::env::var("SPPO_BENCH_THREADS").ok().map(|t| t.parse()).transpose()?;
    let b = CpuBackend::new(threads)?;
    let cfg = ModelConfig::from_json_str(common::SMOLLM2)?;
    let mut state = 1u32;
    let flat: Vec<f32> = (0..ParamLayout::llama(&cfg).total)
        .map(|_| {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 9) as f32 / (1u32 << 23) as f32 * 0.04 - 0.02
        })
        .collect();
    let ceiling = read_ceiling(&b);
    let (f32_step, total) = step_time(&b, &cfg, &flat);
    b.begin_decode(&flat, true)?;
    let (bf16_step, _) = step_time(&b, &cfg, &flat);
    b.end_decode();
    let ceiling_again = read_ceiling(&b);

    println!("\nCPU decode-step products (median of {STEPS} steps), SmolLM2-135M shapes, {ROWS} rows, {} threads", b.threads());
    println!("memory read ceiling (parallel sum over 1 GiB): {:.1} GB/s before, {:.1} GB/s after", ceiling / 1e9, ceiling_again / 1e9);
    let ceil = ceiling.max(ceiling_again);
    println!("{:<18} {:>20} {:>12} {:>14} {:>12}", "weights", "ms per step (best)", "GB/s", "% of ceiling", "GMAC/s");
    for (name, bytes, (t, best)) in [("f32", total * 4, f32_step), ("bf16 decode copy", total * 2, bf16_step)] {
        let rate = bytes as f64 / t;
        let macs = (ROWS * total) as f64 / t;
        println!("{name:<18} {:>11.2} ({:>5.2}) {:>12.1} {:>13.0}% {:>12.1}", t * 1e3, best * 1e3, rate / 1e9, 100.0 * rate / ceil, macs / 1e9);
    }
    Ok(())
}
