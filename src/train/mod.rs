//! Training groundwork for SPPO: the preference losses, optimizers over flat buffers, gradient
//! clipping and learning-rate schedules, each matching the reference pipeline (uclaml/SPPO's
//! modified TRL `DPOTrainer` on PyTorch + transformers) to rounding.
//!
//! - [`loss`]: `sppo`, `sppo_single`, `sppo_hard`, `dpo`, `ipo` on summed response log-probs,
//!   with analytic gradients w.r.t. each sequence's log-prob (what `Llama::backward` takes);
//!   `single_loss` for training on all K responses. f64.
//! - [`optim`]: AdamW / RMSprop state driving the `Backend` optimizer kernels, and
//!   `clip_grad_norm` (torch's `clip_grad_norm_`).
//! - [`schedule`]: linear / cosine / constant with warm-up, as transformers' schedulers and the
//!   Trainer's step order apply them.
//!
//! Reference settings (SPPO.md): RMSprop, lr 5e-7, linear schedule with 10% warm-up, clip 1.0,
//! β = 1e-3. tests/train_math.rs checks everything here against PyTorch/transformers fixtures
//! (`scripts/make_train_fixtures.py`).

pub mod data;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;
