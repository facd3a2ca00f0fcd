//! Model definitions, each written once against [`crate::backend::Backend`].

pub mod bert;
pub mod llama;
pub mod weights;

pub use bert::{Bert, BertConfig, EncoderActivations, EncoderBatch};
pub use llama::{Activations, Batch, KvCache, KvSource, Llama};
