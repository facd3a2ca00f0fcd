//! Kernel launchers, one module per concern (`kernels/<concern>.cu`).

pub mod attention;
pub mod bias;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod layer_util;
pub mod layernorm;
pub mod logprobs;
pub mod matmul;
pub mod optimizer;
pub mod rmsnorm;
pub mod rope;
pub mod sampling;
pub mod sppo_loss;
pub mod swiglu;

/// Element types the kernels are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A storage type a kernel can take: `f32` or `half::bf16`.
pub trait Element:
    cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Send + Sync + 'static + sealed::Sealed
{
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}
