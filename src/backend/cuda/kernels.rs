//! The fatbins of `kernels/*.cu`, compiled by `build.rs` and embedded in the binary.
//!
//! One const per file (`RMSNORM` for `kernels/rmsnorm.cu`) and [`ALL`], indexed by [`Kernel::id`].
//! Kernel function names inside a file are known only to the launcher in `ops/` that uses them.

/// One compiled kernel file.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// Index in [`ALL`]; the device's module cache is indexed by it.
    pub id: usize,
    /// The file's stem: `"rmsnorm"` for `kernels/rmsnorm.cu`.
    pub name: &'static str,
    /// The fatbin image (starts with [`FATBIN_MAGIC`]), 16-byte aligned for `cuModuleLoadData`.
    pub fatbin: &'static [u8],
}

/// First four bytes of an nvcc fatbin (`0xBA55ED50`, little-endian).
pub const FATBIN_MAGIC: [u8; 4] = [0x50, 0xED, 0x55, 0xBA];

/// Gives `include_bytes!` data a 16-byte alignment: the driver reads the fatbin header as structs.
#[repr(C, align(16))]
struct Aligned<T: ?Sized>(T);

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
