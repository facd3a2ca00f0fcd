//! sppo: Self-Play Preference Optimization for Llama/Mistral models.
//!
//! Layout: `backend` (the kernel interface, CPU reference, CUDA), `model` (the model definitions,
//! written once against the backend), `formats` (Hugging Face, safetensors, GGUF), `io` (atomic writes),
//! `chat` (chat templates rendered as transformers does), `prompts` (prompt files: JSONL, Parquet, ShareGPT).

pub mod backend;
pub mod chat;
pub mod io;
pub mod prompts;
