//! The bf16 copy of the parameters that decode steps read while generating (`Backend::begin_decode`).
//!
//! A decode step multiplies a few rows by every weight, so its speed is the speed of reading the
//! weights from memory. When every parameter is exactly representable in bf16 (a model loaded
//! from a bf16 checkpoint), a 2-byte copy holds the very same values: the few-row products
//! (`skinny.rs`) read it instead of the f32 buffer, with the same values in half the memory
//! traffic (many-row products, compute-bound, keep `gemm` on the f32 weights). Weights that are not exact (e.g. after f32 training) keep
//! the f32 path, unless generation asks for rounded weights (`DecodeWeights::Bf16`): then the copy
//! holds the weights rounded to nearest bf16, and every Linear and LM-head product of the
//! generation reads the rounded values (embeddings and norms stay f32), whatever the batching:
//! many-row products widen the rounded weight to f32 for `gemm`.
//!
//! The copy is registered by address: a weight slice that lies inside the registered parameter
//! buffer reads the copy at the same offset. The registration lives from `begin_decode` to
//! `end_decode`, a span during which generation holds the model and does not change it.

use rayon::prelude::*;
use std::sync::{Arc, RwLock};

/// Parameters per conversion task.
const CHUNK: usize = 1 << 16;

/// The registered copy: the f32 buffer's address range and its bf16 bit patterns.
pub(super) struct Bf16Copy {
    base: usize,
    bits: Vec<u16>,
    /// The copy holds the f32 values exactly (otherwise it holds them rounded).
    pub(super) exact: bool,
}

impl Bf16Copy {
    /// `params` rounded to nearest bf16 (ties to even).
    pub(super) fn rounded(params: &[f32]) -> Self {
        let mut bits = vec![0u16; params.len()];
        bits.par_chunks_mut(CHUNK).zip(params.par_chunks(CHUNK)).for_each(|(dst, src)| {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = half::bf16::from_f32(x).to_bits();
            }
        });
        Bf16Copy { base: params.as_ptr() as usize, bits, exact: false }
    }

    /// The bf16 copy of `params`, or `None` when some value is not exactly representable.
    pub(super) fn exact(params: &[f32]) -> Option<Self> {
        let mut bits = vec![0u16; params.len()];
        let exact = bits.par_chunks_mut(CHUNK).zip(params.par_chunks(CHUNK)).all(|(dst, src)| {
            let mut ok = true;
            for (d, &x) in dst.iter_mut().zip(src) {
                // Exact when the low 16 bits are zero; NaN payloads would not survive, so a NaN
                // weight (which the f32 path would propagate) also disables the copy.
                let b = x.to_bits();
                ok &= b & 0xFFFF == 0 && !x.is_nan();
                *d = (b >> 16) as u16;
            }
            ok
        });
        exact.then_some(Bf16Copy { base: params.as_ptr() as usize, bits, exact: true })
    }

    /// The copy of `weight` when it lies inside the registered buffer.
    pub(super) fn slice_for(&self, weight: &[f32]) -> Option<&[u16]> {
        let start = (weight.as_ptr() as usize).checked_sub(self.base)? / std::mem::size_of::<f32>();
        self.bits.get(start..start.checked_add(weight.len())?)
    }
}

/// The backend's slot for the copy (shared by clones of the backend).
pub(super) type DecodeSlot = Arc<RwLock<Option<Arc<Bf16Copy>>>>;
