//! Sampled generation is a function of (seed, iteration, prompt id, sample index) only: the same
//! tokens whatever the batch size, the order requests arrive in, or the thread count. Also the
//! stop conditions (EOS, max_new_tokens, context end).

mod common;

use sppo::backend::cpu::CpuBackend;
use sppo::generate::{generate, FinishReason, GenOptions, GenOutput, GenRequest};
use sppo::model::Llama;
use sppo::sampling::SamplingParams;

fn model(b: &CpuBackend, case: &str) -> Llama<CpuBackend> {
    Llama::load(b, &common::repo_root().join(format!("tests/fixtures/hf/{case}/model"))).unwrap()
}

fn requests() -> Vec<GenRequest> {
    let mut v = vec![];
    for p in 0..5u32 {
        let prompt: Vec<u32> = (0..(3 + 2 * p)).map(|i| (7 * i + 11 * p + 1) % 90 + 1).collect();
        for s in 0..3 {
            v.push(GenRequest { prompt_id: format!("prompt-{p}"), sample_index: s, prompt_ids: prompt.clone() });
        }
    }
    v
}

fn opts(batch_size: usize, sampling: SamplingParams) -> GenOptions {
    GenOptions { sampling, max_new_tokens: 12, eos_ids: vec![], seed: 1234, iteration: 1, batch_size, max_prefill_tokens: 16, weights: Default::default() }
}

fn run(threads: usize, case: &str, reqs: &[GenRequest], o: &GenOptions) -> Vec<GenOutput> {
    let b = CpuBackend::new(Some(threads)).unwrap();
    let mut m = model(&b, case);
    generate(&b, &mut m, reqs, o, |_| {}).unwrap()
}

#[test]
fn sampling_is_independent_of_batching_order_and_threads() {
    let params = [
        SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 0, min_p: 0.0 },
        SamplingParams { temperature: 0.7, top_p: 1.0, top_k: 20, min_p: 0.05 },
    ];
    for case in ["llama_gqa", "mistral_sliding_f16"] {
        for p in params {
            let reqs = requests();
            let base = run(1, case, &reqs, &opts(1, p));
            // Samples of one prompt differ from each other (the sample index is in the key).
            assert!(base[0].tokens != base[1].tokens || base[1].tokens != base[2].tokens, "{case}: samples identical");
            for (threads, bs) in [(2, 4), (2, 16), (1, 7)] {
                assert_eq!(run(threads, case, &reqs, &opts(bs, p)), base, "{case}: batch {bs}, {threads} threads changed the tokens");
            }
            // Reversed request order: each request still gets its own tokens.
            let mut rev = reqs.clone();
            rev.reverse();
            let mut out = run(2, case, &rev, &opts(4, p));
            out.reverse();
            assert_eq!(out, base, "{case}: request order changed the tokens");
            // A different seed changes them.
            let mut o = opts(4, p);
            o.seed += 1;
            assert_ne!(run(2, case, &reqs, &o), base, "{case}: the seed has no effect");
        }
    }
}

#[test]
fn stops_on_eos_and_length() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let mut m = model(&b, "llama_gqa");
    let reqs = requests();
    let greedy = SamplingParams::greedy();
    let free = generate(&b, &mut m, &reqs[..1], &opts(1, greedy), |_| {}).unwrap();
    assert_eq!(free[0].finish, FinishReason::Length);
    assert_eq!(free[0].tokens.len(), 12);
    // Make the 4th greedy token an EOS: generation stops before it, without it.
    let mut o = opts(1, greedy);
    o.eos_ids = vec![free[0].tokens[3]];
    let first = free[0].tokens.iter().position(|&t| t == free[0].tokens[3]).unwrap();
    let stopped = generate(&b, &mut m, &reqs[..1], &o, |_| {}).unwrap();
    assert_eq!(stopped[0].finish, FinishReason::Stop);
    assert_eq!(stopped[0].tokens, free[0].tokens[..first]);
}

#[test]
fn prompt_filling_the_context_is_an_error() {
    let b = CpuBackend::new(Some(1)).unwrap();
    let mut m = model(&b, "llama_gqa");
    let ctx = m.cfg.max_position_embeddings;
    let req = GenRequest { prompt_id: "long".into(), sample_index: 0, prompt_ids: vec![5; ctx] };
    let err = generate(&b, &mut m, &[req], &opts(1, SamplingParams::greedy()), |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("no room for a response"), "{err:#}");
    // One short of the context: room for exactly one token.
    let req = GenRequest { prompt_id: "long".into(), sample_index: 0, prompt_ids: vec![5; ctx - 1] };
    let out = generate(&b, &mut m, &[req], &opts(1, SamplingParams::greedy()), |_| {}).unwrap();
    assert_eq!((out[0].tokens.len(), out[0].finish), (1, FinishReason::Length));
}

/// The bf16 copy the CPU backend keeps while generating (`--decode-weights`): exact only when
/// every weight is representable (then tokens equal the f32 path's); rounded on request, the
/// same rounded values for few-row (decode) and many-row (prefill) products.
#[test]
fn decode_weights_copy_is_exact_or_rounded_consistently() {
    use sppo::backend::Backend;
    use sppo::generate::DecodeWeights;
    let bf16 = |x: f32| half::bf16::from_f32(x).to_f32();
    let b = CpuBackend::new(Some(2)).unwrap();
    for case in ["llama_gqa", "mistral_sliding_f16"] {
        let m = model(&b, case);
        assert_eq!(b.begin_decode(&m.params, false).unwrap(), None, "{case}: f32 weights are not bf16-exact");
        b.end_decode();
        let rounded: Vec<f32> = m.params.iter().map(|&x| bf16(x)).collect();
        let mut r = Llama::from_flat(&b, m.cfg.clone(), &rounded).unwrap();
        let kept = b.begin_decode(&r.params, false).unwrap();
        assert!(kept.as_deref().is_some_and(|k| k.contains("exact")), "{case}: {kept:?}");
        b.end_decode();
        // Exact copy: the same tokens as the f32 weights.
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 0, min_p: 0.0 };
        let reqs = requests();
        let with = |w: DecodeWeights, bs: usize| GenOptions { weights: w, ..opts(bs, p) };
        let f32_tokens = generate(&b, &mut r, &reqs, &with(DecodeWeights::F32, 4), |_| {}).unwrap();
        assert_eq!(generate(&b, &mut r, &reqs, &with(DecodeWeights::Auto, 4), |_| {}).unwrap(), f32_tokens, "{case}");
        // Rounded copy of the unrounded model: tokens independent of batching.
        let mut m = m;
        let base = generate(&b, &mut m, &reqs, &with(DecodeWeights::Bf16, 1), |_| {}).unwrap();
        assert_eq!(generate(&b, &mut m, &reqs, &with(DecodeWeights::Bf16, 16), |_| {}).unwrap(), base, "{case}: bf16 weights, batch 16");
    }
    // Products under a rounded copy equal products with pre-rounded weights, for 3 rows (the
    // streaming kernel) and 40 rows (gemm on the widened copy), and stop when the copy is dropped.
    let (ic, oc) = (24, 20);
    let params: Vec<f32> = (0..ic * oc + 7).map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5).collect();
    let weight = &params[7..];
    let pre: Vec<f32> = weight.iter().map(|&x| bf16(x)).collect();
    for n in [3usize, 40] {
        let inp: Vec<f32> = (0..n * ic).map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.4).collect();
        let (mut want, mut got, mut plain, mut after) = (vec![f32::NAN; n * oc], vec![f32::NAN; n * oc], vec![f32::NAN; n * oc], vec![f32::NAN; n * oc]);
        b.matmul_forward(&mut want, &inp, &pre, ic, oc).unwrap();
        b.matmul_forward(&mut plain, &inp, weight, ic, oc).unwrap();
        b.begin_decode(&params, true).unwrap();
        b.matmul_forward(&mut got, &inp, weight, ic, oc).unwrap();
        b.end_decode();
        b.matmul_forward(&mut after, &inp, weight, ic, oc).unwrap();
        for i in 0..n * oc {
            assert!((got[i] - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()), "n {n} [{i}]: {} vs {}", got[i], want[i]);
        }
        assert_ne!(got, plain, "n {n}: the rounded copy was not used");
        assert_eq!(after, plain, "n {n}: the copy outlived end_decode");
    }
}

/// Generation runs the KV-cache path (prefill, then one row per step), scoring runs the full
/// forward that the transformers fixtures check. On every fixture model (the Mistral one with a
/// sliding window of 5, crossed by prompt and response), each greedy token is the argmax of the
/// full forward's logits at its position (a near-tie within rounding excepted), and the logits of
/// every cached step equal the full forward's.
#[test]
fn cached_decoding_follows_the_full_forward() {
    use sppo::backend::AttnSeq;
    use sppo::model::{Activations, Batch};
    let cases = ["llama_gqa", "llama_mqa_tied", "llama3_rope_headdim_bf16", "llama_v5_layout_sharded", "mistral_sliding_f16", "mistral_v5_layout"];
    for case in cases {
        let b = CpuBackend::new(Some(2)).unwrap();
        let mut m = model(&b, case);
        let vocab = m.cfg.vocab_size;
        let prompts: Vec<Vec<u32>> = [1usize, 4, 9].iter().map(|&n| (0..n as u32).map(|i| (13 * i + 5 * n as u32 + 3) % (vocab as u32 - 1) + 1).collect()).collect();
        let reqs: Vec<GenRequest> = prompts.iter().enumerate().map(|(i, p)| GenRequest { prompt_id: format!("p{i}"), sample_index: 0, prompt_ids: p.clone() }).collect();
        let mut o = opts(2, SamplingParams::greedy());
        o.max_new_tokens = 14;
        let out = generate(&b, &mut m, &reqs, &o, |_| {}).unwrap();

        for (prompt, gen) in prompts.iter().zip(&out) {
            assert_eq!(gen.tokens.len(), o.max_new_tokens, "{case}: no EOS is set, so every response runs to the limit");
            let seq: Vec<u32> = prompt.iter().chain(&gen.tokens).copied().collect();
            let batch = Batch::from_sequences([(seq.as_slice(), prompt.len())]).unwrap();
            let mut acts = Activations::new(&b, &m.cfg, seq.len(), false).unwrap();
            m.forward(&b, &batch, &mut acts).unwrap();
            let full = m.logits(&b, &acts).unwrap();
            let row = |t: usize| &full[t * vocab..(t + 1) * vocab];

            // Greedy tokens against the full forward.
            for (g, &tok) in gen.tokens.iter().enumerate() {
                let r = row(prompt.len() + g - 1);
                let best = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert!(r[tok as usize] >= best - 1e-4, "{case}: token {g} ({tok}) is not the full forward's argmax ({} vs {best})", r[tok as usize]);
            }

            // The cached path step by step: the prompt in one prefill, then one token per step.
            m.ensure_positions(&b, seq.len()).unwrap();
            let mut cache = m.alloc_kv_cache(&b, seq.len()).unwrap();
            let mut done = 0;
            for end in std::iter::once(prompt.len()).chain(prompt.len() + 1..=seq.len() - 1) {
                let tokens = &seq[done..end];
                let positions: Vec<u32> = (done as u32..end as u32).collect();
                let seqs = [AttnSeq { q_start: 0, q_len: end - done, k_start: 0, k_len: end }];
                let logits = m.forward_cached(&b, tokens, &positions, &mut cache, &positions, &seqs, &[(end - done - 1) as u32]).unwrap();
                let want = row(end - 1);
                let scale = want.iter().fold(1f32, |a, x| a.max(x.abs()));
                for (v, (x, y)) in logits.iter().zip(want).enumerate() {
                    assert!((x - y).abs() <= 1e-4 * scale, "{case}: cached logit {v} at position {} is {x}, the full forward's {y}", end - 1);
                }
                done = end;
            }
        }
    }
}
