//! The trainer on a tiny model: the SPPO loss falls, training stops the same whether or not it was
//! interrupted and resumed from a saved state, and a NaN is caught with the step named.

mod common;

use sppo::backend::{cpu::CpuBackend, Backend};
use sppo::model::Llama;
use sppo::train::loss::{LossType, PairProbs};
use sppo::train::optim::{AdamWConfig, OptimizerConfig};
use sppo::train::schedule::ScheduleKind;
use sppo::train::trainer::{response_logprobs, Target, TrainExample, TrainSettings, Trainer};

fn model(b: &CpuBackend) -> Llama<CpuBackend> {
    Llama::load(b, &common::repo_root().join("tests/fixtures/hf/llama_gqa/model")).unwrap()
}

fn examples() -> Vec<TrainExample> {
    (0..6u32)
        .map(|i| TrainExample {
            prompt_ids: vec![1, 5 + i, 9],
            responses: vec![vec![20 + i, 30, 2], vec![40 + i, 50, 60, 2]],
            target: Target::Pair(PairProbs::new(0.8, 0.7, 0.3).unwrap()),
        })
        .collect()
}

fn settings(loss: LossType) -> TrainSettings {
    TrainSettings {
        loss,
        beta: 0.1,
        learning_rate: 1e-2,
        schedule: ScheduleKind::Constant,
        warmup_ratio: 0.0,
        optimizer: OptimizerConfig::AdamW(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }),
        max_grad_norm: 1.0,
        micro_batch: 2,
        accumulation: 2,
        epochs: 4,
        seed: 7,
        iteration: 1,
        recompute: false,
        skip_spike_factor: 0.0,
    }
}

#[test]
fn loss_falls_and_resume_is_exact() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let ex = examples();
    let mut m = model(&b);
    let reference = response_logprobs(&b, &mut m, &ex, 1 << 20, |_| {}).unwrap();
    let mut t = Trainer::new(&b, &m, settings(LossType::Sppo), ex.len()).unwrap();
    assert_eq!(t.total_steps, 8, "6 examples, global batch 4, 4 epochs");
    let mut losses = vec![];
    t.run(&b, &mut m, &ex, &reference, |s, _, _| {
        losses.push(s.loss);
        Ok(())
    })
    .unwrap();
    // At step 1 the policy is the reference: ½η²[(0.7−½)² + (0.3−½)²] = ½·100·0.08 = 4.
    assert!((losses[0] - 4.0).abs() < 1e-6, "first loss {}", losses[0]);
    assert!(losses.last().unwrap() < &(0.5 * losses[0]), "loss did not fall: {losses:?}");
    let full = b.download(&m.params).unwrap();

    // Interrupted after 3 steps, state saved, resumed in a fresh trainer and model.
    let tmp = tempfile::tempdir().unwrap();
    let mut m2 = model(&b);
    let mut t2 = Trainer::new(&b, &m2, settings(LossType::Sppo), ex.len()).unwrap();
    let r = t2.run(&b, &mut m2, &ex, &reference, |s, tr, mm| {
        if s.step == 3 {
            tr.save_state(&b, mm, &tmp.path().join("state"))?;
            anyhow::bail!("simulated crash");
        }
        Ok(())
    });
    assert!(r.is_err());
    let mut m3 = model(&b);
    let mut t3 = Trainer::new(&b, &m3, settings(LossType::Sppo), ex.len()).unwrap();
    t3.load_state(&b, &mut m3, &tmp.path().join("state")).unwrap();
    assert_eq!(t3.step(), 3);
    t3.run(&b, &mut m3, &ex, &reference, |_, _, _| Ok(())).unwrap();
    assert_eq!(b.download(&m3.params).unwrap(), full, "resumed training differs from uninterrupted training");
}

#[test]
fn every_loss_trains_and_nan_is_caught() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let ex = examples();
    for loss in [LossType::SppoSingle, LossType::SppoHard, LossType::Dpo, LossType::Ipo] {
        let mut m = model(&b);
        let reference = response_logprobs(&b, &mut m, &ex, 1 << 20, |_| {}).unwrap();
        let mut t = Trainer::new(&b, &m, settings(loss), ex.len()).unwrap();
        let mut margins = vec![];
        t.run(&b, &mut m, &ex, &reference, |s, _, _| {
            margins.push(s.chosen_logratio - s.rejected_logratio);
            Ok(())
        })
        .unwrap();
        assert!(margins.last().unwrap() > &0.0, "{loss}: chosen not pushed above rejected: {margins:?}");
    }
    // A NaN reference log-prob makes the loss NaN: training stops naming the step.
    let mut m = model(&b);
    let mut reference = response_logprobs(&b, &mut m, &ex, 1 << 20, |_| {}).unwrap();
    for r in reference.iter_mut() {
        r[0] = f64::NAN;
    }
    let mut t = Trainer::new(&b, &m, settings(LossType::Sppo), ex.len()).unwrap();
    let err = format!("{:#}", t.run(&b, &mut m, &ex, &reference, |_, _, _| Ok(())).unwrap_err());
    assert!(err.contains("step 1") && err.contains("NaN"), "{err}");
}

#[test]
fn spike_guard_skips_updates_and_resumes_with_its_counts() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let ex = examples();
    let mut m = model(&b);
    let reference = response_logprobs(&b, &mut m, &ex, 1 << 20, |_| {}).unwrap();
    // A factor below 1 calls every step a spike once the guard has its 5 warm-up steps.
    let mut s = settings(LossType::Sppo);
    s.skip_spike_factor = 1e-9;
    let mut t = Trainer::new(&b, &m, s.clone(), ex.len()).unwrap();
    let mut after_five = vec![];
    let mut flags = vec![];
    t.run(&b, &mut m, &ex, &reference, |st, _, mm| {
        flags.push((st.step, st.skipped, st.skipped_steps));
        if st.step == 5 {
            after_five = b.download(&mm.params)?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(flags, vec![(1, false, 0), (2, false, 0), (3, false, 0), (4, false, 0), (5, false, 0), (6, true, 1), (7, true, 2), (8, true, 3)]);
    assert_eq!(b.download(&m.params).unwrap(), after_five, "a skipped update changed the weights");
    assert_eq!((t.step(), t.skipped(), t.optimizer.steps()), (8, 3, 5));

    // Saved after the first skip and resumed: the same counts and weights.
    let tmp = tempfile::tempdir().unwrap();
    let mut m2 = model(&b);
    let mut t2 = Trainer::new(&b, &m2, s.clone(), ex.len()).unwrap();
    let r = t2.run(&b, &mut m2, &ex, &reference, |st, tr, mm| {
        if st.step == 6 {
            tr.save_state(&b, mm, &tmp.path().join("state"))?;
            anyhow::bail!("simulated crash");
        }
        Ok(())
    });
    assert!(r.is_err());
    let mut m3 = model(&b);
    let mut t3 = Trainer::new(&b, &m3, s, ex.len()).unwrap();
    t3.load_state(&b, &mut m3, &tmp.path().join("state")).unwrap();
    assert_eq!((t3.step(), t3.skipped(), t3.optimizer.steps()), (6, 1, 5));
    t3.run(&b, &mut m3, &ex, &reference, |_, _, _| Ok(())).unwrap();
    assert_eq!((t3.skipped(), b.download(&m3.params).unwrap()), (3, after_five));
}

#[test]
fn non_finite_gradient_names_the_first_tensor() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let ex = examples();
    let mut m = model(&b);
    let reference = response_logprobs(&b, &mut m, &ex, 1 << 20, |_| {}).unwrap();
    // A final-norm gain of 1e37 keeps the forward finite but overflows the backward.
    let norm = m.layout.get("model.norm.weight").unwrap().range();
    let mut params = b.download(&m.params).unwrap();
    params[norm.start] = 1e37;
    b.write(&mut m.params, 0, &params).unwrap();
    let mut t = Trainer::new(&b, &m, settings(LossType::Sppo), ex.len()).unwrap();
    let mut saved = 0;
    let err = t.run(&b, &mut m, &ex, &reference, |_, _, _| {
        saved += 1;
        Ok(())
    });
    let err = err.unwrap_err();
    let nf = err.downcast_ref::<sppo::train::trainer::NonFinite>().expect("a NonFinite error");
    assert_eq!(nf.step, 1, "{err:#}");
    assert!(nf.tensor.as_deref().is_some_and(|t| t.starts_with("model.")), "{err:#}");
    assert!(format!("{err:#}").contains("first parameter with a non-finite gradient"), "{err:#}");
    assert_eq!(saved, 0, "a bad step reached after_step");
    assert_eq!(b.download(&m.params).unwrap(), params, "a bad step changed the weights");
}
