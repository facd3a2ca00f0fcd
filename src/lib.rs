//! sppo: Self-Play Preference Optimization for Llama/Mistral models.
//!
//! Layout: `backend` (the kernel interface, CPU reference, CUDA), `model` (the model definitions,
//! written once against the backend), `config` (Hugging Face configs), `formats` (GGUF reading and
//! GGUF → Hugging Face conversion), `io` (atomic writes).

pub mod backend;
pub mod config;
pub mod formats;
pub mod io;
pub mod model;
