//! Whole-model backward against central finite differences on tiny random configs (GQA, MQA,
//! sliding window, tied embeddings, llama3 rope scaling), with and without recomputation, and
//! gradient accumulation across micro-batches.

use sppo::backend::{cpu::CpuBackend, Backend};
use sppo::config::ModelConfig;
use sppo::model::{weights::ParamLayout, Activations, Batch, Llama};

/// SplitMix64: a tiny deterministic generator for test inputs.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

fn config(json: &str) -> ModelConfig {
    ModelConfig::from_json_str(json).unwrap()
}

fn random_params(cfg: &ModelConfig, rng: &mut Rng) -> Vec<f32> {
    let layout = ParamLayout::llama(cfg);
    let mut flat = vec![0f32; layout.total];
    for e in &layout.entries {
        let is_norm = e.shape.len() == 1;
        for x in &mut flat[e.range()] {
            *x = if is_norm { 1.0 + 0.2 * rng.normal() } else { 0.15 * rng.normal() };
        }
    }
    flat
}

fn loss(b: &CpuBackend, model: &Llama<CpuBackend>, batch: &Batch, w: &[f32]) -> f64 {
    let mut acts = Activations::new(b, &model.cfg, batch.len(), false).unwrap();
    model.forward(b, batch, &mut acts).unwrap();
    model.sequence_logprobs(b, batch, &acts).unwrap().iter().zip(w).map(|(s, &w)| s * w as f64).sum()
}

fn check(name: &str, json: &str, lens: &[(usize, usize)]) {
    let b = CpuBackend::new(Some(2)).unwrap();
    let cfg = config(json);
    let mut rng = Rng(0x5EED ^ name.len() as u64);
    let flat = random_params(&cfg, &mut rng);
    let seqs: Vec<(Vec<u32>, usize)> =
        lens.iter().map(|&(t, p)| ((0..t).map(|_| (rng.next() % cfg.vocab_size as u64) as u32).collect(), p)).collect();
    let batch = Batch::from_sequences(seqs.iter().map(|(s, p)| (s.as_slice(), *p))).unwrap();
    let w: Vec<f32> = (0..seqs.len()).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let model = Llama::from_flat(&b, cfg.clone(), &flat).unwrap();

    let mut grads_by_mode = vec![];
    for recompute in [false, true] {
        let mut acts = Activations::new(&b, &cfg, batch.len(), recompute).unwrap();
        model.forward(&b, &batch, &mut acts).unwrap();
        let mut g = model.alloc_grads(&b).unwrap();
        model.backward(&b, &batch, &mut acts, &w, &mut g).unwrap();
        grads_by_mode.push(g);
    }
    assert_eq!(grads_by_mode[0], grads_by_mode[1], "{name}: recomputation changes the gradients");
    let grads = &grads_by_mode[0];
    assert!(grads.iter().all(|g| g.is_finite()), "{name}: non-finite gradient");

    // Directional derivative along a random direction, per parameter tensor and over all of them.
    let layout = ParamLayout::llama(&cfg);
    let h = 5e-4f32;
    let mut dir = vec![0f32; flat.len()];
    for x in dir.iter_mut() {
        *x = rng.normal();
    }
    let mut tensors: Vec<(String, std::ops::Range<usize>)> = layout.entries.iter().map(|e| (e.name.clone(), e.range())).collect();
    tensors.push(("all".into(), 0..flat.len()));
    for (tname, range) in tensors {
        let mut plus = flat.clone();
        let mut minus = flat.clone();
        let mut analytic = 0f64;
        for i in range.clone() {
            plus[i] += h * dir[i];
            minus[i] -= h * dir[i];
            analytic += grads[i] as f64 * dir[i] as f64;
        }
        let lp = loss(&b, &Llama::from_flat(&b, cfg.clone(), &plus).unwrap(), &batch, &w);
        let lm = loss(&b, &Llama::from_flat(&b, cfg.clone(), &minus).unwrap(), &batch, &w);
        let numeric = (lp - lm) / (2.0 * h as f64);
        let err = (numeric - analytic).abs() / analytic.abs().max(numeric.abs()).max(1e-2);
        assert!(err < 2e-2, "{name}: {tname}: analytic {analytic:.6} vs finite difference {numeric:.6} (rel {err:.2e})");
    }

    // Accumulation: two micro-batches (the sequences split) sum to the whole batch's gradient.
    let mut acc = model.alloc_grads(&b).unwrap();
    for part in [0..1, 1..seqs.len()] {
        let sub = Batch::from_sequences(seqs[part.clone()].iter().map(|(s, p)| (s.as_slice(), *p))).unwrap();
        let mut acts = Activations::new(&b, &cfg, sub.len(), false).unwrap();
        model.forward(&b, &sub, &mut acts).unwrap();
        model.backward(&b, &sub, &mut acts, &w[part], &mut acc).unwrap();
    }
    let acc = b.download(&acc).unwrap();
    let scale = grads.iter().fold(0f32, |m, g| m.max(g.abs()));
    for (i, (a, g)) in acc.iter().zip(grads.iter()).enumerate() {
        assert!((a - g).abs() <= 1e-4 * scale, "{name}: accumulated gradient {i}: {a} vs {g}");
    }
}

const BASE: &str = r#""vocab_size":37,"hidden_size":24,"intermediate_size":40,"num_hidden_layers":2,"rms_norm_eps":1e-5"#;

#[test]
fn llama_gqa_untied() {
    check("llama_gqa", &format!(r#"{{"architectures":["LlamaForCausalLM"],{BASE},"num_attention_heads":4,"num_key_value_heads":2}}"#), &[(7, 2), (11, 5), (5, 1)]);
}

#[test]
fn llama_mqa_tied_headdim_llama3() {
    check(
        "llama_mqa_tied",
        &format!(
            r#"{{"architectures":["LlamaForCausalLM"],{BASE},"num_attention_heads":3,"num_key_value_heads":1,"head_dim":10,
            "tie_word_embeddings":true,"rope_theta":500000,"rope_scaling":{{"rope_type":"llama3","factor":8,"low_freq_factor":1,
            "high_freq_factor":4,"original_max_position_embeddings":8}}}}"#
        ),
        &[(9, 3), (6, 6), (12, 4)],
    );
}

#[test]
fn mistral_sliding_window() {
    check(
        "mistral_window",
        &format!(r#"{{"architectures":["MistralForCausalLM"],{BASE},"num_attention_heads":4,"num_key_value_heads":2,"sliding_window":3}}"#),
        &[(10, 2), (8, 4)],
    );
}
