//! The whole model on the CUDA backend (`CudaBackend`, f32) against the transformers fixtures and
//! the CPU reference: logits, per-token and summed log-probs, every parameter gradient (with and
//! without recomputation), an optimizer step, and greedy generation token for token; for the
//! default kernels and for the naive ones. Then the bf16 mode (`Precision::Bf16`): the model vs
//! the CPU's f32 forward and backward of the same bf16-rounded weights with bf16 tolerances,
//! bitwise repeatable; AdamW and RMSprop steps that keep f32 master weights equal to the CPU's f32
//! step and the bf16 copy equal to their rounding; zero-length buffers and the grow-only pools.
//! Needs a GPU: without one each test prints why it skips.

#[macro_use]
mod common;

use common::{rel_error, repo_root};
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::backend::CudaBackend;
use sppo::backend::cuda::kernel_choice::KernelChoice;
use sppo::backend::{Backend, BufRole, Precision};
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
/// A fixture case: its name, reference tensors and (token ids, prompt length) sequences.
type Refs = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;
fn load_case(dir: &std::path::Path) -> (String, Refs, Vec<(Vec<u32>, usize)>) {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let refs = read_all_f32(&dir.join("reference.safetensors")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let seqs = meta["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(s, m)| (refs[&format!("input_ids.{s}")].1.iter().map(|&x| x as u32).collect(), m["prompt_len"].as_u64().unwrap() as usize))
        .collect();
    (name, refs, seqs)
}

fn backends(test: &str) -> Option<Vec<(String, CudaBackend)>> {
    if let Some(reason) = sppo::backend::cuda::probe().unavailable_reason() {
        common::print_skip(test, &reason);
        return None;
    }
    let naive = "attention=naive,rmsnorm=naive,embedding=naive,rope=naive,swiglu=naive,gelu=naive,layernorm=naive,bias=naive";
    Some(
        [("default", KernelChoice::default()), ("naive", KernelChoice::parse(naive).unwrap())]
            .into_iter()
            .map(|(name, k)| (name.to_string(), CudaBackend::new(0, k, Precision::F32).unwrap_or_else(|e| panic!("{test}: a GPU was found but: {e:#}"))))
            .collect(),
    )
}

#[test]
fn cuda_model_matches_transformers_and_cpu() {
    let Some(gpus) = backends("cuda_model_matches_transformers_and_cpu") else { return };
    for (kname, g) in &gpus {
        for dir in cases() {
            let (name, refs, seqs) = load_case(&dir);
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

// ---- bf16 mode ----

/// bf16 backends: default kernels, then every naive variant (the naive ones mostly have no bf16
/// kernel, so this exercises the f32 staging path of nearly every op).
fn bf16_backends(test: &str) -> Option<Vec<(String, CudaBackend)>> {
    if let Some(reason) = sppo::backend::cuda::probe().unavailable_reason() {
        common::print_skip(test, &reason);
        return None;
    }
    let naive = "attention=naive,rmsnorm=naive,embedding=naive,rope=naive,swiglu=naive,gelu=naive,layernorm=naive,bias=naive";
    Some(
        [("bf16 default", KernelChoice::default()), ("bf16 naive", KernelChoice::parse(naive).unwrap())]
            .into_iter()
            .map(|(name, k)| (name.to_string(), CudaBackend::new(0, k, Precision::Bf16).unwrap_or_else(|e| panic!("{test}: a GPU was found but: {e:#}"))))
            .collect(),
    )
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// Forward (logits, summed log-probs) and backward (every gradient) of one fixture on `b`.
fn model_outputs<B: Backend>(b: &B, model: &Llama<B>, seqs: &[(Vec<u32>, usize)], recompute: bool, weights: &[f32]) -> (Vec<f32>, Vec<f64>, Vec<f32>) {
    let batch = Batch::from_sequences(seqs.iter().map(|(ids, p)| (ids.as_slice(), *p))).unwrap();
    let mut acts = Activations::new(b, &model.cfg, batch.len(), recompute).unwrap();
    model.forward(b, &batch, &mut acts).unwrap();
    let logits = model.logits(b, &acts).unwrap();
    let sums = model.sequence_logprobs(b, &batch, &acts).unwrap();
    let mut grads = model.alloc_grads(b).unwrap();
    model.backward(b, &batch, &mut acts, weights, &mut grads).unwrap();
    (logits, sums, b.download(&grads).unwrap())
}

#[test]
fn cuda_bf16_model_matches_cpu_with_bf16_tolerances() {
    let Some(gpus) = bf16_backends("cuda_bf16_model_matches_cpu_with_bf16_tolerances") else { return };
    let cpu = CpuBackend::new(None).unwrap();
    for (kname, g) in &gpus {
        for dir in cases() {
            let (name, refs, seqs) = load_case(&dir);
            let weights = &refs["loss_weights"].1;
            let on_gpu = Llama::load(g, &dir.join("model")).unwrap_or_else(|e| panic!("{kname} {name}: {e:#}"));
            // Download gives the f32 master weights: the file's values, unrounded.
            let flat = g.download(&on_gpu.params).unwrap();
            let on_cpu_f32 = Llama::load(&cpu, &dir.join("model")).unwrap();
            assert_eq!(flat, cpu.download(&on_cpu_f32.params).unwrap(), "{kname} {name}: master weights differ from the file");
            // The reference: the CPU in f32 on the same weights rounded to bf16 (what the GPU
            // computes with), so what remains is the bf16 rounding of activations.
            let on_cpu = Llama::from_flat(&cpu, on_gpu.cfg.clone(), &round_bf16(&flat)).unwrap();
            for recompute in [false, true] {
                let (want_logits, want_sums, want_grads) = model_outputs(&cpu, &on_cpu, &seqs, recompute, weights);
                let (logits, sums, grads) = model_outputs(g, &on_gpu, &seqs, recompute, weights);
                let err = rel_error(&logits, &want_logits);
                assert!(err < 3e-2, "{kname} {name} (recompute {recompute}): logits relative error {err:.2e}");
                for (s, (&got, &want)) in sums.iter().zip(&want_sums).enumerate() {
                    assert!((got - want).abs() <= 3e-2 * want.abs().max(1.0), "{kname} {name} seq {s}: summed logp {got} vs {want}");
                }
                for e in &on_gpu.layout.entries {
                    let err = rel_error(&grads[e.range()], &want_grads[e.range()]);
                    assert!(err < 1e-1, "{kname} {name} (recompute {recompute}): gradient of {} relative error {err:.2e}", e.name);
                }
                // Deterministic: a second pass is bitwise the same.
                let again = model_outputs(g, &on_gpu, &seqs, recompute, weights);
                assert!(again.0 == logits && again.1 == sums && again.2 == grads, "{kname} {name}: a second bf16 pass differs");
            }
            println!("{kname} {name}: bf16 logits, log-probs and gradients within bf16 tolerances, repeatable");
        }
    }
}

#[test]
fn cuda_bf16_optimizer_steps_keep_f32_master_weights() {
    let Some(gpus) = bf16_backends("cuda_bf16_optimizer_steps_keep_f32_master_weights") else { return };
    let cpu = CpuBackend::new(None).unwrap();
    let dir = cases().remove(0);
    for (kname, g) in &gpus {
        let model = Llama::load(g, &dir.join("model")).unwrap();
        let n = model.layout.total;
        let start = g.download(&model.params).unwrap();
        // Gradients small enough that many updates are below half a bf16 ulp of their weight:
        // the master weights must keep them.
        let grads: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
        let d_grads = g.upload(&grads).unwrap();
        for optim in ["rmsprop", "adamw"] {
            let mut p_gpu = g.upload_as(&start, BufRole::Param).unwrap();
            let (mut s1, mut s2) = (g.alloc(n).unwrap(), g.alloc(n).unwrap());
            let mut p_cpu = start.clone();
            let (mut c1, mut c2) = (vec![0f32; n], vec![0f32; n]);
            for step in 1..=3u64 {
                let lr = 1e-5;
                if optim == "rmsprop" {
                    let hp = sppo::backend::RmspropConfig { alpha: 0.99, eps: 1e-8, weight_decay: 0.0 };
                    cpu.rmsprop_step(&mut p_cpu, &grads, &mut c1, lr, &hp).unwrap();
                    g.rmsprop_step(g.view_mut(&mut p_gpu, 0..n), g.view(&d_grads, 0..n), g.view_mut(&mut s1, 0..n), lr, &hp).unwrap();
                } else {
                    let hp = sppo::backend::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
                    cpu.adamw_step(&mut p_cpu, &grads, &mut c1, &mut c2, step, lr, &hp).unwrap();
                    g.adamw_step(g.view_mut(&mut p_gpu, 0..n), g.view(&d_grads, 0..n), g.view_mut(&mut s1, 0..n), g.view_mut(&mut s2, 0..n), step, lr, &hp)
                        .unwrap();
                }
            }
            let master = g.download(&p_gpu).unwrap();
            assert_eq!(master, p_cpu, "{kname} {optim}: f32 master weights differ from the CPU's f32 step");
            let copy = g.download_compute_copy(&p_gpu).unwrap();
            assert_eq!(copy, round_bf16(&master), "{kname} {optim}: the bf16 copy is not the rounding of the master weights");
            let kept = master.iter().zip(&start).filter(|(m, s)| m != s && half::bf16::from_f32(**m) == half::bf16::from_f32(**s)).count();
            assert!(kept > 0, "{kname} {optim}: no sub-ulp update was kept by the master weights");
            println!("{kname} {optim}: master weights equal the CPU's f32 step; {kept} sub-bf16-ulp updates kept");
        }
    }
}

#[test]
fn cuda_zero_length_buffers_and_grow_only_pools() {
    let Some(gpus) = bf16_backends("cuda_zero_length_buffers_and_grow_only_pools") else { return };
    for (kname, g) in &gpus {
        for role in [BufRole::Exact, BufRole::Compute, BufRole::Param] {
            let mut z = g.alloc_as(0, role).unwrap();
            assert_eq!(g.len(&z), 0);
            assert!(g.download(&z).unwrap().is_empty(), "{kname} {role:?}");
            g.write(&mut z, 0, &[]).unwrap();
            g.fill(g.full_mut(&mut z), 1.0).unwrap();
            let mut y = g.alloc_as(0, role).unwrap();
            g.add_inplace(g.full_mut(&mut y), g.full(&z)).unwrap();
            assert!(g.write(&mut z, 0, &[1.0]).is_err(), "{kname}: a write past a zero-length buffer");
        }
        // Log-prob chunks and attention delta come from one grow-only scratch buffer.
        let dir = cases().remove(0);
        let model = Llama::load(g, &dir.join("model")).unwrap();
        let run = |len: usize| {
            let ids: Vec<u32> = (0..len as u32).map(|i| i % 50 + 1).collect();
            let batch = Batch::from_sequences([(ids.as_slice(), 1)]).unwrap();
            let mut acts = Activations::new(g, &model.cfg, batch.len(), false).unwrap();
            model.forward(g, &batch, &mut acts).unwrap();
            let mut grads = model.alloc_grads(g).unwrap();
            model.backward(g, &batch, &mut acts, &[1.0], &mut grads).unwrap();
            g.pool_sizes()
        };
        let big = run(40);
        assert!(big.0 > 0, "{kname}: no kernel scratch was used");
        let small = run(5);
        assert_eq!(small, big, "{kname}: the pools shrank or grew for a smaller batch");
    }
}
