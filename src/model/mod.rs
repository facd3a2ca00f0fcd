//! Model definitions, each written once against [`crate::backend::Backend`].

pub mod llama;
pub mod weights;

pub use llama::{Activations, Batch, KvCache, KvSource, Llama};
