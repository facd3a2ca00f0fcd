//! The CUDA backend: the kernels of `kernels/*.cu`, compiled by `build.rs` into fatbins embedded in
//! the binary (sm_80, sm_90a SASS and compute_80 PTX), loaded through cudarc's driver API.
//!
//! - [`device`]: [`probe`] (is there a usable GPU? never panics) and [`CudaDevice`] (context,
//!   stream, each kernel file's module loaded once on first use).
//! - [`kernels`]: the embedded fatbins, one [`kernels::Kernel`] const per `kernels/<file>.cu`.
//! - [`ops`]: one launcher per kernel concern: checks dtype and shapes, picks the variant, launches.
//! - [`error`]: [`CudaError`], naming the op, kernel and shapes involved.
//!
//! Without a CUDA driver (most build machines) everything here compiles and [`probe`] reports why
//! no GPU is used; GPU tests skip with that sentence.

pub mod backend;
pub mod device;
pub mod error;
pub mod kernel_choice;
pub mod kernels;
pub mod ops;

pub use backend::CudaBackend;
pub use device::{probe, CudaDevice, GpuProbe};
pub use error::CudaError;
pub use ops::attention::AttentionVariant;
pub use ops::bias::BiasVariant;
pub use ops::embedding::EmbeddingVariant;
pub use ops::gelu::GeluVariant;
pub use ops::layernorm::LayerNormVariant;
pub use ops::rmsnorm::RmsNormVariant;
pub use ops::sampling::SamplingVariant;
pub use ops::rope::RopeVariant;
pub use ops::swiglu::SwigluVariant;
pub mod host;
