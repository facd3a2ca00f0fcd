//! Launcher for `kernels/sppo_loss.cu`: the SPPO / DPO / IPO losses of a batch and their
//! gradients w.r.t. the policy's summed log-probs, in one kernel (formulas in the kernel's header
//! and in `src/train/loss.rs`, the f64 reference).
//!
//! Layout: example e owns sequences `seq_start[e] .. seq_start[e + 1]` of the (S) f32 `policy` and
//! `reference` buffers: two (chosen, rejected) for the pair losses, K >= 1 for
//! [`LossForm::All`] (`--train-on all`). `probs` are host data from the ranking stage: (E, 3) =
//! (P_wl, P_win, P_lose) per pair, or (S) win-rates for `All`; [`plan_sppo_loss`] checks them (as
//! `batch_pair_loss` does) and the launcher uploads them with `seq_start`. Outputs: per-example
//! losses (E), `dpolicy` (S) = ∂loss/∂policy / denominator (the model backward's `dseq`), and
//! `totals` (3) f64 = Σ loss / denominator, Σ chosen log-ratio / denominator, Σ rejected
//! log-ratio / denominator (the trainer's step metrics).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::SPPO_LOSS;
use crate::train::loss::LossType;

pub const KERNEL: &str = "sppo_loss_fwdbwd_f32";
/// Threads of the kernel's single block (its reduction tree halves it).
const THREADS: u32 = 256;
const OP: &str = "sppo_loss";

/// Which loss the kernel computes: a pair loss, or SPPO on each of all K responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossForm {
    /// (chosen, rejected) per example, with the given loss.
    Pair(LossType),
    /// `--train-on all`: Σ_k ½(r_k − η(P_k − ½))² per example (`loss::single_loss`).
    All,
}

impl LossForm {
    /// The kernel's `kind` argument.
    pub fn kind(self) -> i32 {
        match self {
            LossForm::Pair(LossType::Sppo) => 0,
            LossForm::Pair(LossType::SppoSingle) => 1,
            LossForm::Pair(LossType::SppoHard) => 2,
            LossForm::Pair(LossType::Dpo) => 3,
            LossForm::Pair(LossType::Ipo) => 4,
            LossForm::All => 5,
        }
    }

    fn name(self) -> String {
        match self {
            LossForm::Pair(k) => k.name().to_string(),
            LossForm::All => "sppo (train on all responses)".to_string(),
        }
    }

    /// Whether the kernel reads the probabilities (the others ignore them, as `pair_loss` does).
    fn reads_probs(self) -> bool {
        matches!(
            self,
            LossForm::Pair(LossType::Sppo | LossType::SppoSingle) | LossForm::All
        )
    }
}

/// Element counts of the device buffers of a call.
#[derive(Clone, Copy, Debug)]
pub struct SppoLossLens {
    pub policy: usize,
    pub reference: usize,
    pub example_loss: usize,
    pub dpolicy: usize,
    pub totals: usize,
}

/// A checked call: the kernel's scalar arguments and its launch shape.
#[derive(Clone, Debug)]
pub struct SppoLossPlan {
    pub config: LaunchConfig,
    pub kind: i32,
    pub n_examples: i32,
    pub beta: f64,
    pub denominator: f64,
}

fn err(detail: impl Into<String>) -> CudaError {
    CudaError::Shape {
        op: OP,
        detail: detail.into(),
    }
}

fn check_len(what: &str, got: usize, want: usize, shape: &str) -> Result<()> {
    if got != want {
        return Err(err(format!(
            "{what} has {got} elements, expected {shape} = {want}"
        )));
    }
    Ok(())
}

/// Checks a call against the layout above and plans it. `denominator` is the number of examples
/// of the whole optimizer step (at least this batch's).
pub fn plan_sppo_loss(
    form: LossForm,
    beta: f64,
    denominator: usize,
    seq_start: &[i32],
    probs: &[f32],
    lens: &SppoLossLens,
) -> Result<SppoLossPlan> {
    let name = form.name();
    if !(beta.is_finite() && beta > 0.0) {
        return Err(err(format!("{name}: beta = {beta} must be finite and > 0")));
    }
    if seq_start.len() < 2 {
        return Err(err(format!(
            "{name}: seq_start needs at least 2 entries (one example), has {}",
            seq_start.len()
        )));
    }
    let n_examples = seq_start.len() - 1;
    if seq_start[0] != 0 {
        return Err(err(format!(
            "{name}: seq_start[0] = {} must be 0",
            seq_start[0]
        )));
    }
    for (e, w) in seq_start.windows(2).enumerate() {
        let count = i64::from(w[1]) - i64::from(w[0]);
        let ok = match form {
            LossForm::Pair(_) => count == 2,
            LossForm::All => count >= 1,
        };
        if !ok {
            let want = if form == LossForm::All {
                "at least 1"
            } else {
                "2 (chosen, rejected)"
            };
            return Err(err(format!(
                "{name}: example {e} has {count} sequences (seq_start {} .. {}), expected {want}",
                w[0], w[1]
            )));
        }
    }
    let n_seqs = seq_start[n_examples] as usize; // ascending from 0: non-negative
    if denominator < n_examples {
        return Err(err(format!("{name}: denominator {denominator} is smaller than the {n_examples} examples of this batch")));
    }
    check_len("policy", lens.policy, n_seqs, &format!("(S={n_seqs})"))?;
    check_len(
        "reference",
        lens.reference,
        n_seqs,
        &format!("(S={n_seqs})"),
    )?;
    check_len("dpolicy", lens.dpolicy, n_seqs, &format!("(S={n_seqs})"))?;
    check_len(
        "example_loss",
        lens.example_loss,
        n_examples,
        &format!("(E={n_examples})"),
    )?;
    check_len(
        "totals",
        lens.totals,
        3,
        "(loss, chosen log-ratio, rejected log-ratio)",
    )?;
    let want_probs = match form {
        LossForm::Pair(_) => 3 * n_examples,
        LossForm::All => n_seqs,
    };
    let probs_shape = if form == LossForm::All {
        format!("(S={n_seqs}) win-rates")
    } else {
        format!("(E={n_examples}, 3)")
    };
    check_len("probs", probs.len(), want_probs, &probs_shape)?;
    if form.reads_probs() {
        if let Some((i, p)) = probs
            .iter()
            .enumerate()
            .find(|(_, p)| !(0.0..=1.0).contains(*p))
        {
            return Err(err(format!(
                "{name}: probs[{i}] = {p} is not a probability in [0, 1]"
            )));
        }
    }
    Ok(SppoLossPlan {
        config: LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        kind: form.kind(),
        n_examples: n_examples as i32, // < seq_start.len(), which the caller built as i32 offsets
        beta,
        denominator: denominator as f64,
    })
}

/// Computes the batch's losses and gradients (see the module doc); every output OVERWRITTEN.
#[allow(clippy::too_many_arguments)]
pub fn sppo_loss(
    dev: &CudaDevice,
    example_loss: &mut CudaViewMut<'_, f32>,
    dpolicy: &mut CudaViewMut<'_, f32>,
    totals: &mut CudaViewMut<'_, f64>,
    policy: &CudaView<'_, f32>,
    reference: &CudaView<'_, f32>,
    form: LossForm,
    beta: f64,
    denominator: usize,
    seq_start: &[i32],
    probs: &[f32],
) -> Result<()> {
    let lens = SppoLossLens {
        policy: policy.len(),
        reference: reference.len(),
        example_loss: example_loss.len(),
        dpolicy: dpolicy.len(),
        totals: totals.len(),
    };
    let plan = plan_sppo_loss(form, beta, denominator, seq_start, probs, &lens)?;
    let d_seq_start = dev.upload(seq_start)?;
    let d_probs = dev.upload(probs)?;
    let f = dev.function(&SPPO_LOSS, KERNEL)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *example_loss)
        .arg(&mut *dpolicy)
        .arg(&mut *totals);
    b.arg(policy).arg(reference).arg(&d_probs).arg(&d_seq_start);
    b.arg(&plan.n_examples)
        .arg(&plan.kind)
        .arg(&plan.beta)
        .arg(&plan.denominator);
    // SAFETY: sppo_loss_fwdbwd_f32(float* example_loss, float* dpolicy, double* totals,
    // const float* policy, const float* reference, const float* probs, const int* seq_start,
    // int n_examples, int kind, double beta, double denominator), matching the arguments above;
    // the plan checked every length against seq_start (ascending from 0, the per-kind counts),
    // and the launch is one block of 256 threads as the kernel requires.
    unsafe { b.launch(plan.config) }.map_err(CudaError::driver(format!(
        "launching {KERNEL} ({})",
        form.name()
    )))?;
    Ok(())
}
