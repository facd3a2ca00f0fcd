//! The whole model on the CUDA backend (`CudaBackend`, f32) against the transformers fixtures and
//! the CPU reference: logits, per-token and summed log-probs, every parameter gradient (with and
//! without recomputation), an optimizer step, and greedy generation token for token; for the
//! default kernels and for the naive ones. Needs a GPU: without one each test prints why it skips.

#[macro_use]
mod common;

use common::{rel_error, repo_root};
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::backend::CudaBackend;
use sppo::backend::cuda::kernel_choice::KernelChoice;
use sppo::backend::Backend;
use sppo::generate::{generate, GenOptions, GenRequest};
use sppo::model::weights::read_all_f32;
use sppo::model::{Activations, Batch, Llama};
use sppo::sampling::SamplingParams;
use std::path::PathBuf;

fn cases() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/fixtures/hf");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("meta.json").exists())
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

/// The backends to check: default kernels, then every naive variant.
fn backends(test: &str) -> Option<Vec<(String, CudaBackend)>> {
    if let Some(reason) = sppo::backend::cuda::probe().unavailable_reason() {
        common::print_skip(test, &reason);
        return None;
    }
    let naive = "attention=naive,rmsnorm=naive,embedding=naive,rope=naive,swiglu=naive,gelu=naive,layernorm=naive,bias=naive";
    Some(
        [("default", KernelChoice::default()), ("naive", KernelChoice::parse(naive).unwrap())]
            .into_iter()
            .map(|(name, k)| (name.to_string(), CudaBackend::new(0, k).unwrap_or_else(|e| panic!("{test}: a GPU was found but: {e:#}"))))
            .collect(),
    )
}

#[test]
fn cuda_model_matches_transformers_and_cpu() {
    let Some(gpus) = backends("cuda_model_matches_transformers_and_cpu") else { return };
    for (kname, g) in &gpus {
        for dir in cases() {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            let refs = read_all_f32(&dir.join("reference.safetensors")).unwrap();
            let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
            let seqs: Vec<(Vec<u32>, usize)> = meta["sequences"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(s, m)| (refs[&format!("input_ids.{s}")].1.iter().map(|&x| x as u32).collect(), m["prompt_len"].as_u64().unwrap() as usize))
                .collect();
            let model = Llama::load(g, &dir.join("model")).unwrap_or_else(|e| panic!("{kname} {name}: {e:#}"));
            for recompute in [false, true] {
                let batch = Batch::from_sequences(seqs.iter().map(|(ids, p)| (ids.as_slice(), *p))).unwrap();
                let mut acts = Activations::new(g, &model.cfg, batch.len(), recompute).unwrap();
                model.forward(g, &batch, &mut acts).unwrap();
                let logits = model.logits(g, &acts).unwrap();
                let v = model.cfg.vocab_size;
                let mut row = 0;
                for (s, (ids, _)) in seqs.iter().enumerate() {
                    let t = ids.len();
                    let err = rel_error(&logits[row * v..(row + t) * v], &refs[&format!("logits.{s}")].1);
                    assert!(err < 1e-4, "{kname} {name} seq {s}: logits relative error {err:.2e}");
                    row += t;
                }
                let sums = model.sequence_logprobs(g, &batch, &acts).unwrap();
                for (s, (&got, &want)) in sums.iter().zip(&refs["sum_logprobs"].1).enumerate() {
                    assert!(((got as f32) - want).abs() <= 1e-4 * want.abs().max(1.0), "{kname} {name} seq {s}: summed logp {got} vs {want}");
                }
                let weights = &refs["loss_weights"].1;
                let mut grads = model.alloc_grads(g).unwrap();
                model.backward(g, &batch, &mut acts, weights, &mut grads).unwrap();
                let grads = g.download(&grads).unwrap();
                for e in &model.layout.entries {
                    let err = rel_error(&grads[e.range()], &refs[&format!("grad.{}", e.name)].1);
                    assert!(err < 1e-4, "{kname} {name} (recompute {recompute}): gradient of {} relative error {err:.2e}", e.name);
                }
            }
            println!("{kname} {name}: logits, log-probs and gradients match on the GPU");
        }
    }
}

#[test]
fn cuda_greedy_generation_equals_cpu() {
    let Some(gpus) = backends("cuda_greedy_generation_equals_cpu") else { return };
    let cpu = CpuBackend::new(None).unwrap();
    for (kname, g) in &gpus {
        for dir in cases() {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            let mut on_cpu = Llama::load(&cpu, &dir.join("model")).unwrap();
            let mut on_gpu = Llama::load(g, &dir.join("model")).unwrap();
            let reqs: Vec<GenRequest> = (0..3u32)
                .map(|p| GenRequest {
                    prompt_id: format!("p{p}"),
                    sample_index: 0,
                    prompt_ids: (0..(4 + 3 * p)).map(|i| (5 * i + 7 * p + 1) % 50 + 1).collect(),
                })
                .collect();
            let opts = |sampling| GenOptions {
                sampling,
                max_new_tokens: 10,
                eos_ids: vec![],
                seed: 3,
                iteration: 0,
                batch_size: 2,
                max_prefill_tokens: 4096,
                weights: Default::default(),
            };
            // Greedy: equal token for token (f32 on both sides: ties within rounding are not
            // expected on random fixtures). Sampled: the same uniforms, equal tokens.
            for sampling in [SamplingParams::greedy(), SamplingParams { temperature: 0.8, top_p: 0.9, top_k: 0, min_p: 0.0 }] {
                let want = generate(&cpu, &mut on_cpu, &reqs, &opts(sampling), |_| {}).unwrap();
                let got = generate(g, &mut on_gpu, &reqs, &opts(sampling), |_| {}).unwrap();
                assert_eq!(got, want, "{kname} {name} {sampling:?}: GPU tokens differ from the CPU's");
            }
        }
    }
}

#[test]
fn cuda_optimizer_step_through_trainer_matches_cpu() {
    let Some(gpus) = backends("cuda_optimizer_step_through_trainer_matches_cpu") else { return };
    let cpu = CpuBackend::new(None).unwrap();
    let dir = cases().remove(0);
    for (kname, g) in &gpus {
        let m_cpu = Llama::load(&cpu, &dir.join("model")).unwrap();
        let m_gpu = Llama::load(g, &dir.join("model")).unwrap();
        let grads: Vec<f32> = (0..m_cpu.layout.total).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let hp = sppo::backend::RmspropConfig { alpha: 0.99, eps: 1e-8, weight_decay: 0.0 };
        let (mut p_cpu, mut sq_cpu) = (cpu.download(&m_cpu.params).unwrap(), vec![0.0f32; m_cpu.layout.total]);
        cpu.rmsprop_step(&mut p_cpu, &grads, &mut sq_cpu, 1e-3, &hp).unwrap();
        let mut p_gpu = g.upload(&g.download(&m_gpu.params).unwrap()).unwrap();
        let mut sq_gpu = g.alloc(m_gpu.layout.total).unwrap();
        let d_grads = g.upload(&grads).unwrap();
        let n = m_gpu.layout.total;
        g.rmsprop_step(g.view_mut(&mut p_gpu, 0..n), g.view(&d_grads, 0..n), g.view_mut(&mut sq_gpu, 0..n), 1e-3, &hp).unwrap();
        assert_eq!(g.download(&p_gpu).unwrap(), p_cpu, "{kname}: RMSprop step differs from the CPU's");
    }
}
