//! Helpers shared by the layer-kernel launchers (embedding, rope, swiglu, gelu, layernorm, bias):
//! the variant-enum boilerplate, length checks that name the op and the shapes, and grid sizes.

use cudarc::driver::LaunchConfig;

use super::DType;
use crate::backend::cuda::error::{CudaError, Result};

/// Threads per block of the layer kernels.
pub const BLOCK: u32 = 256;
/// Warps per block of the warp-per-row kernels.
pub const WARPS_PER_BLOCK: u32 = BLOCK / 32;
/// The largest grid of the grid-stride kernels: enough blocks to fill any current GPU several
/// times over; more work just loops.
pub const MAX_STRIDE_BLOCKS: usize = 4096;

/// Declares a kernel-variant enum with `ALL`, `name`, `from_name` (an unknown name is an error
/// listing the choices), `Display` and `FromStr`.
macro_rules! variant_enum {
    ($(#[$meta:meta])* $ty:ident, $concern:literal, { $($v:ident => $s:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $ty {
            $($v),+
        }

        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$v),+];

            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$v => $s),+
                }
            }

            /// The variant called `name`; an unknown name is an error listing the choices.
            pub fn from_name(name: &str) -> $crate::backend::cuda::error::Result<Self> {
                Self::ALL.iter().copied().find(|v| v.name() == name).ok_or_else(|| {
                    $crate::backend::cuda::error::CudaError::UnknownVariant {
                        concern: $concern,
                        name: name.to_string(),
                        choices: Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
                    }
                })
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::backend::cuda::error::CudaError;
            fn from_str(s: &str) -> $crate::backend::cuda::error::Result<Self> {
                Self::from_name(s)
            }
        }
    };
}
pub(crate) use variant_enum;

/// The error for a variant without a kernel for `dtype`, listing the (variant, dtype) pairs that
/// have one according to `has`.
pub fn unsupported<V: Copy + std::fmt::Display>(
    op: &'static str,
    variant: &'static str,
    all: &[V],
    dtype: DType,
    has: impl Fn(V, DType) -> Option<&'static str>,
) -> CudaError {
    let mut available = Vec::new();
    for &v in all {
        for d in [DType::F32, DType::Bf16] {
            if has(v, d).is_some() {
                available.push(format!("{v} {d}"));
            }
        }
    }
    CudaError::UnsupportedDtype { op, variant, dtype, available: available.join(", ") }
}

pub fn shape_err(op: &'static str, detail: impl Into<String>) -> CudaError {
    CudaError::Shape { op, detail: detail.into() }
}

/// Rows N of an (N, dim) buffer of `len` elements, with dim, N and N·dim checked to fit the
/// kernels' `int` arguments.
pub fn rows_of(op: &'static str, what: &str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(shape_err(op, "dim is 0"));
    }
    if !len.is_multiple_of(dim) {
        return Err(shape_err(op, format!("{what} has {len} elements, not a multiple of dim {dim}")));
    }
    let rows = len / dim;
    fits_int(op, what, len)?;
    Ok(rows)
}

/// `n` as the kernels' `int`, or an error naming `what`.
pub fn fits_int(op: &'static str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| shape_err(op, format!("{what} has {n} elements, more than the kernels' int sizes")))
}

pub fn check_len(op: &'static str, what: &str, got: usize, shape: &str, want: usize) -> Result<()> {
    if got != want {
        return Err(shape_err(op, format!("{what} has {got} elements, expected {shape} = {want}")));
    }
    Ok(())
}

/// One thread per item: ceil(items / BLOCK) blocks of BLOCK threads.
pub fn per_thread(op: &'static str, items: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(items.div_ceil(BLOCK as usize).max(1))
        .map_err(|_| shape_err(op, format!("{items} work items need too many blocks")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
}

/// One warp per row: ceil(rows / WARPS_PER_BLOCK) blocks of BLOCK threads.
pub fn per_warp(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(rows.div_ceil(WARPS_PER_BLOCK as usize).max(1))
        .map_err(|_| shape_err(op, format!("{rows} rows need too many blocks")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
}

/// A grid-stride loop over `items`: at most MAX_STRIDE_BLOCKS blocks of BLOCK threads.
pub fn grid_stride(items: usize) -> LaunchConfig {
    let blocks = items.div_ceil(BLOCK as usize).clamp(1, MAX_STRIDE_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// What an elementwise op launches: the kernel, its grid, and the element count `n` (its `int`
/// argument). `config` is None when n = 0 (nothing to launch).
#[derive(Clone, Debug)]
pub struct ElementwisePlan {
    pub kernel: &'static str,
    pub config: Option<LaunchConfig>,
    pub n: i32,
}

/// Checks that every length in `lens` (name, len) equals the first, and plans one thread per
/// element (`one_per_thread`, the naive kernels) or a grid-stride loop.
pub fn plan_elementwise(
    op: &'static str,
    kernel: &'static str,
    one_per_thread: bool,
    lens: &[(&str, usize)],
) -> Result<ElementwisePlan> {
    let (first, n) = lens[0];
    for &(what, len) in &lens[1..] {
        check_len(op, what, len, &format!("len({first})"), n)?;
    }
    let n_i = fits_int(op, first, n)?;
    let config = match n {
        0 => None,
        _ if one_per_thread => Some(per_thread(op, n)?),
        _ => Some(grid_stride(n)),
    };
    Ok(ElementwisePlan { kernel, config, n: n_i })
}
