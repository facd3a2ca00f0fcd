//! Errors of the CUDA backend. Each names what was being done (op, kernel, file, shapes), so a
//! failure deep in a training step reads as a sentence, not as a bare driver code.

use cudarc::driver::DriverError;

use super::ops::DType;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU; the sentence comes from [`super::GpuProbe`]'s `Display`.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),

    /// A driver call failed; `what` says which.
    #[error("CUDA driver error while {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },

    /// `cuModuleLoadData` rejected an embedded fatbin (e.g. a GPU older than sm_80, or a driver
    /// older than the toolkit that built the PTX).
    #[error("cannot load kernels/{module}.cu's fatbin on {device}: {source}")]
    Load {
        module: &'static str,
        device: String,
        #[source]
        source: DriverError,
    },

    /// The fatbin loaded but lacks the named function (a launcher/kernel name mismatch).
    #[error("kernel {kernel} not found in kernels/{module}.cu's fatbin: {source}")]
    MissingKernel {
        module: &'static str,
        kernel: &'static str,
        #[source]
        source: DriverError,
    },

    /// The op has no kernel for this dtype and variant.
    #[error("{op}: no {variant} kernel for dtype {dtype} (available: {available})")]
    UnsupportedDtype { op: &'static str, variant: &'static str, dtype: DType, available: String },

    /// Arguments whose shapes or lengths disagree; `detail` gives them.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },

    /// An unknown variant name (from `--kernel` or `SPPO_KERNELS`).
    #[error("unknown {concern} kernel variant '{name}' (choices: {choices})")]
    UnknownVariant { concern: &'static str, name: String, choices: String },
}

impl CudaError {
    pub(crate) fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
        let what = what.into();
        move |source| CudaError::Driver { what, source }
    }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;
