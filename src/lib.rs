//! sppo: Self-Play Preference Optimization for Llama/Mistral models.
//!
//! Layout: `backend` (the kernel interface, CPU reference, CUDA), `model` (the model definitions,
//! written once against the backend), `config` (Hugging Face configs), `formats` (safetensors,
//! GGUF, conversion), `chat` (chat templates rendered as transformers does), `prompts` (prompt
//! files: JSONL, Parquet, ShareGPT), `rng` + `sampling` (counter-based randomness, token sampler),
//! `generate` (batched generation with a KV cache), `logprobs` (response scoring), `io` (atomic writes),
//! `fastexp` (a vectorisable `exp` for softmax sums and the sampler),
//! `train` (losses, optimizers, clipping, lr schedules, the trainer),
//! `oracle` (preference oracles, win-rates), `rank` (the rank stage: oracle over generations),
//! `nvtx` (named ranges for Nsight profiles, free without a profiler).

pub mod backend;
pub mod chat;
pub mod config;
mod fastexp;
pub mod formats;
pub mod generate;
pub mod io;
pub mod logprobs;
pub mod model;
pub mod nvtx;
pub mod oracle;
pub mod prompts;
pub mod rank;
pub mod rng;
pub mod run;
pub mod sampling;
pub mod train;
