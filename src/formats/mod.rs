//! Model file formats: GGUF reading and GGUF → Hugging Face conversion.

pub mod convert;
pub mod gguf;
