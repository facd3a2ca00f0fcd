//! Counter-based randomness: Philox4x32-10 keyed by (seed, iteration, stream, prompt, sample, position).
//!
//! Every random number in sppo is a pure function of where it is used, never of a generator's
//! history, so results do not depend on batch size, thread count, device or resume point, and the
//! CUDA sampler draws the same numbers as this file (DESIGN.md, "Randomness").
//!
//! # Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
//!
//! The exact Random123 `philox4x32_R(10, ctr, key)`, identical to cuRAND's
//! `curand_Philox4x32_10(uint4 ctr, uint2 key)` (curand_philox4x32_x.h). All arithmetic is mod 2^32.
//!
//! ```text
//! M0 = 0xD2511F53, M1 = 0xCD9E8D57          // multipliers
//! W0 = 0x9E3779B9, W1 = 0xBB67AE85          // Weyl key increments
//! round(c, k):
//!     p0 = (u64)M0 * c[0];  hi0 = p0 >> 32;  lo0 = (u32)p0
//!     p1 = (u64)M1 * c[2];  hi1 = p1 >> 32;  lo1 = (u32)p1
//!     return [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
//! philox(c, k):
//!     c = round(c, k)
//!     repeat 9 times: k = [k[0] + W0, k[1] + W1]; c = round(c, k)
//!     return c
//! ```
//!
//! Checked against the Random123 known-answer vectors (`kat_vectors`) in the tests below.
//!
//! # Key and counter packing (the CUDA kernel must replicate this bit for bit)
//!
//! ```text
//! key[0] = seed bits  0..32           key[1] = seed bits 32..64
//! ctr[0] = position bits  0..32
//! ctr[1] = position bits 32..48  | sample << 16
//! ctr[2] = prompt bits  0..32
//! ctr[3] = prompt bits 32..48    | iteration << 16 | stream << 28
//! ```
//!
//! Ranges (checked by [`RngKey::new`]): seed any u64; iteration < 2^12 (4096); stream < 2^4 (the
//! four [`Stream`]s use 0..=3); prompt < 2^48 ([`prompt_key`] always is); sample < 2^16 (65536);
//! position < 2^48 (a larger position is taken modulo 2^48). Within these ranges the fields occupy
//! disjoint bits of the 128-bit counter, so distinct (iteration, stream, prompt, sample, position)
//! give distinct counters, and since Philox is a bijection of the counter for a fixed key, distinct
//! 128-bit outputs: no two uses share random numbers. Different seeds are different keys
//! (independent streams, as Random123 intends).
//!
//! # Conversions
//!
//! - [`RngKey::u32s`]`(position)` = `philox(ctr(position), key)`, four u32 words.
//! - [`RngKey::uniform`]`(position)` = `(w[0] >> 8) as f32 * 2^-24`: the top 24 bits of word 0,
//!   exact in f32, so u is a multiple of 2^-24 in [0, 1 - 2^-24]. (Not cuRAND's `curand_uniform`,
//!   which returns (0, 1]: the kernel must use this formula: `__uint2float_rn(w.x >> 8) * 0x1p-24f`.)
//! - [`RngKey::uniform_f64`]`(position)` = `((w[0] as u64) << 21 | (w[1] >> 11)) as f64 * 2^-53`:
//!   53 bits (32 from word 0, the top 21 of word 1), exact in f64, in [0, 1 - 2^-53].
//!
//! # Prompt ids
//!
//! [`prompt_key`]`(id)` = FNV-1a 64 of the id's UTF-8 bytes (offset basis 0xcbf29ce484222325,
//! prime 0x100000001b3; per byte: `h ^= b; h *= prime`), xor-folded to 48 bits:
//! `(h >> 48) ^ (h & (2^48 - 1))`. 48 bits keep two prompts of a 100k-prompt set apart with
//! probability about 1 - 2e-5 (birthday bound n^2 / 2^49).

use anyhow::{ensure, Result};

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// One Philox4x32 round (Random123 `_philox4x32round`).
#[inline(always)]
fn philox_round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
    let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
    let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
    let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32-10: the Random123 / cuRAND block function (counter, key) -> 4 words.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = philox_round(counter, key);
    let mut k = key;
    for _ in 1..10 {
        k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        c = philox_round(c, k);
    }
    c
}

/// Which consumer draws: each gets its own disjoint part of the counter space.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Token sampling during generation (one uniform per (prompt, sample, position)).
    Sampling = 0,
    /// Shuffling of prompts / pairs between iterations.
    DataOrder = 1,
    /// Dropout masks, if a run uses dropout.
    Dropout = 2,
    /// Evaluation-time generation, kept apart so that evaluating never shifts training samples.
    Eval = 3,
}

/// Exclusive upper bounds of the key fields (see the packing in the module doc).
pub const MAX_ITERATION: u32 = 1 << 12;
pub const MAX_SAMPLE: u32 = 1 << 16;
pub const MAX_PROMPT: u64 = 1 << 48;
pub const POSITION_BITS: u32 = 48;

const MASK16: u64 = (1 << 16) - 1;
const MASK32: u64 = (1 << 32) - 1;
const MASK48: u64 = (1 << 48) - 1;

/// Names one random stream: (seed, iteration, stream, prompt, sample); positions index into it.
///
/// Fields are private so that every key in existence satisfies the ranges checked by [`RngKey::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RngKey {
    seed: u64,
    iteration: u32,
    stream: Stream,
    prompt: u64,
    sample: u32,
}

impl RngKey {
    /// Checks the documented ranges (module doc) so that no two keys share counters.
    pub fn new(seed: u64, iteration: u32, stream: Stream, prompt: u64, sample: u32) -> Result<Self> {
        ensure!(iteration < MAX_ITERATION, "RngKey: iteration {iteration} out of range (must be < {MAX_ITERATION})");
        ensure!(prompt < MAX_PROMPT, "RngKey: prompt key {prompt:#x} out of range (must be < 2^48; use rng::prompt_key)");
        ensure!(sample < MAX_SAMPLE, "RngKey: sample index {sample} out of range (must be < {MAX_SAMPLE})");
        Ok(Self { seed, iteration, stream, prompt, sample })
    }

    /// The same key with another sample index (the K responses of one prompt).
    pub fn with_sample(&self, sample: u32) -> Result<Self> {
        Self::new(self.seed, self.iteration, self.stream, self.prompt, sample)
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
    pub fn iteration(&self) -> u32 {
        self.iteration
    }
    pub fn stream(&self) -> Stream {
        self.stream
    }
    pub fn prompt(&self) -> u64 {
        self.prompt
    }
    pub fn sample(&self) -> u32 {
        self.sample
    }

    /// Philox key: the seed's two halves, low half first.
    #[inline]
    pub fn philox_key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// Philox counter for `position` (taken modulo 2^48), packed as in the module doc.
    #[inline]
    pub fn counter(&self, position: u64) -> [u32; 4] {
        let pos = position & MASK48;
        [
            (pos & MASK32) as u32,
            ((pos >> 32) as u32) | (self.sample << 16),
            (self.prompt & MASK32) as u32,
            (((self.prompt >> 32) & MASK16) as u32) | (self.iteration << 16) | ((self.stream as u32) << 28),
        ]
    }

    /// Four independent u32s for `position`.
    #[inline]
    pub fn u32s(&self, position: u64) -> [u32; 4] {
        philox4x32_10(self.counter(position), self.philox_key())
    }

    /// Uniform in [0, 1): `(w[0] >> 8) * 2^-24`, exact in f32 (module doc).
    #[inline]
    pub fn uniform(&self, position: u64) -> f32 {
        (self.u32s(position)[0] >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 random bits: `((w[0] << 21) | (w[1] >> 11)) * 2^-53`.
    #[inline]
    pub fn uniform_f64(&self, position: u64) -> f64 {
        let w = self.u32s(position);
        let bits = (u64::from(w[0]) << 21) | u64::from(w[1] >> 11);
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of the UTF-8 bytes.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV64_OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV64_PRIME))
}

/// Stable 48-bit key of a prompt's string id: FNV-1a 64 xor-folded to 48 bits (module doc).
pub fn prompt_key(id: &str) -> u64 {
    let h = fnv1a64(id.as_bytes());
    (h >> 48) ^ (h & MASK48)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 `kat_vectors`, philox4x32 with 10 rounds: counter, key, expected.
    #[test]
    fn philox_known_answers() {
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            ([0; 4], [0; 2], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
            ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in kat {
            assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:08x?} key {key:08x?}");
        }
    }

    #[test]
    fn fnv1a64_known_answers() {
        // Published FNV-1a 64 test values (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn packing_is_disjoint() {
        let k = RngKey::new(0, MAX_ITERATION - 1, Stream::Eval, MAX_PROMPT - 1, MAX_SAMPLE - 1).expect("in range");
        assert_eq!(k.counter(MASK48), [u32::MAX, u32::MAX, u32::MAX, 0x3fff_ffff]);
        let k = RngKey::new(0, 0, Stream::Sampling, 0, 0).expect("in range");
        assert_eq!(k.counter(0), [0; 4]);
    }
}
