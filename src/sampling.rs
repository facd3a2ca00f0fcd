//! Token sampler: temperature -> top-k -> top-p -> min-p, then one inverse-CDF draw.
//!
//! The truncation follows Hugging Face transformers' logits warpers in the order `generate` applies
//! them (`generation/utils.py` `_get_logits_processor`: `TemperatureLogitsWarper`,
//! `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`; transformers 5.x). The draw is ours,
//! defined exactly so that the CUDA sampler, given the same logits and the same uniform
//! ([`crate::rng::RngKey::uniform`]), picks the same token.
//!
//! # Exact procedure (the CUDA kernel implements this)
//!
//! Inputs: logits `l[0..V)` (f32), params, one uniform `u` (f32 in [0, 1), a multiple of 2^-24).
//!
//! 0. Errors: `V == 0`; any `l[i]` NaN or +inf; params failing [`SamplingParams::validate`];
//!    `u` outside [0, 1).
//! 1. Greedy (`temperature == 0`): return the lowest `i` with `l[i]` maximal. `u` is unused. All
//!    logits −inf is an error.
//! 2. Temperature: `x[i] = l[i] / temperature` in f32, IEEE round-to-nearest division (CUDA: no
//!    `--use_fast_math`, no `-prec-div=false`). HF skips the division at temperature 1; `l / 1 == l`
//!    exactly, so dividing anyway is the same. `x[i] == +inf` (overflow) is an error. The candidates
//!    are the tokens with `x[i] > −inf`; none is an error. `m = max x[i]`.
//! 3. Canonical order: `x` descending, ties by token id ascending (a total order). Every "first",
//!    "prefix" and "walk" below is in this order. −0.0 and +0.0 compare equal (a tie).
//! 4. Top-k (`0 < top_k < |candidates|`): `t` = the `top_k`-th largest `x` counting repeats (the
//!    `x` at canonical position `top_k - 1`); keep candidates with `x >= t`. Ties at the threshold
//!    are all kept, so more than `top_k` tokens may survive (HF: `scores < topk(scores)[..., -1]`
//!    is removed).
//! 5. Weights: `w[i] = exp((x[i] as f64) - (m as f64))` in f64 (so the max has `w = 1`).
//!    Candidates whose `w` underflows to 0 are dropped (they could never be drawn).
//!    `Z = Σ w[i]` over the candidates, f64, summation order unspecified.
//! 6. Top-p (`top_p < 1`; skipped at 1, as HF does): `limit = (top_p as f64) * Z`. Walk the
//!    candidates with `mass = 0`: a candidate is kept while `mass < limit`, then `mass += w`; the
//!    first candidate reached with `mass >= limit` and all after it are removed. The top candidate
//!    is always kept (`limit > 0`). This is HF's rule (`cumsum` of the ascending-sorted softmax
//!    `<= 1 - top_p` is removed, i.e. a token is kept iff the probability mass strictly above it
//!    is `< top_p`) computed from the top, in f64 instead of f32: the two can differ only when a
//!    cumulative sum lies within f32 rounding (~1e-7) of `top_p`. Ties straddling the cutoff keep
//!    the LOWEST ids (canonical order); HF's choice there is whatever `torch.sort` (not stable)
//!    returns, so no fixed rule can match it.
//! 7. Min-p (`min_p > 0`): keep candidates with `w >= (min_p as f64)`. As `w = p / p_max` this is
//!    HF's `probs < min_p * probs.max()` is removed, in f64. The max (`w = 1`) always stays.
//! 8. Draw: `total = Σ w` over the kept candidates (f64; when nothing was removed in 6-7 this is
//!    `Z`, otherwise summed in canonical order). `target = (u as f64) * total`. Walk the kept
//!    candidates with `c = 0`: `c += w`; return the first token with `target < c`. If rounding
//!    leaves none, return the last kept token.
//!
//! The probabilities of [`truncated_distribution`] are `w / total` over the kept candidates in
//! canonical order. CPU and CUDA agree exactly except where `exp` or a sum in a different order
//! moves a cutoff or `target` across a boundary by ~1e-16 relative: vanishingly rare, and never
//! more than a choice between two tokens adjacent in canonical order.
//!
//! # Cost
//!
//! One pass over the vocabulary (divide, compare, one f64 `exp` per surviving candidate), then a
//! canonical order built lazily: `select_nth_unstable` of the next chunk (64, then doubling) and a
//! sort of that chunk only, as far as the top-p walk and the draw go. A spiky or truncated
//! distribution sorts tens of tokens, not the vocabulary. [`SamplerScratch`] keeps the candidate
//! buffer between calls, so a call allocates nothing once warm.

use std::cmp::Ordering;

use anyhow::{bail, ensure, Result};

/// Truncation settings, HF `generate` semantics (module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, ties to the lowest id); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (and ties with the last); 0 = off.
    pub top_k: usize,
    /// Keep the smallest prefix of mass >= `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens with probability < `min_p` x the top probability; 0 = off.
    pub min_p: f32,
}

impl SamplingParams {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0 }
    }

    /// Plain softmax sampling at `temperature` (no truncation).
    pub fn with_temperature(temperature: f32) -> Self {
        Self { temperature, top_k: 0, top_p: 1.0, min_p: 0.0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        let Self { temperature, top_p, min_p, .. } = *self;
        ensure!(
            temperature.is_finite() && temperature >= 0.0,
            "SamplingParams: temperature must be finite and >= 0 (0 = greedy), got {temperature}"
        );
        ensure!(top_p > 0.0 && top_p <= 1.0, "SamplingParams: top_p must be in (0, 1] (1 = off), got {top_p}");
        ensure!(min_p >= 0.0 && min_p < 1.0, "SamplingParams: min_p must be in [0, 1) (0 = off), got {min_p}");
        Ok(())
    }
}

/// One surviving token: scaled logit, id, weight `exp(x - max)` (16 bytes).
#[derive(Clone, Copy, Debug)]
struct Cand {
    x: f32,
    id: u32,
    w: f64,
}

/// Canonical order: `x` descending, id ascending. `x` is never NaN here, so `partial_cmp` is total
/// (and treats -0.0 == +0.0, as a CUDA `<` would).
#[inline]
fn canonical(a: &Cand, b: &Cand) -> Ordering {
    b.x.partial_cmp(&a.x).unwrap_or(Ordering::Equal).then(a.id.cmp(&b.id))
}

/// First chunk of the lazily built canonical order; later chunks double.
const FIRST_CHUNK: usize = 64;

/// Reusable buffers for [`sample`]: one per thread, reused across calls.
#[derive(Debug, Default)]
pub struct SamplerScratch {
    /// (V) at most: the candidates; `cands[..sorted]` are the top `sorted` in canonical order,
    /// sorted, and every later one comes after them in canonical order.
    cands: Vec<Cand>,
    sorted: usize,
}

impl SamplerScratch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends the canonical prefix to at least `n` candidates (clamped to all of them).
    #[inline]
    fn ensure_sorted(&mut self, n: usize) {
        if n <= self.sorted {
            return;
        }
        let len = self.cands.len();
        let target = n.max(2 * self.sorted).max(FIRST_CHUNK).min(len);
        let rest = &mut self.cands[self.sorted..];
        let k = target - self.sorted;
        if k == 0 {
            return;
        }
        if k < rest.len() {
            rest.select_nth_unstable_by(k - 1, canonical);
        }
        rest[..k].sort_unstable_by(canonical);
        self.sorted = target;
    }
}

/// What [`prepare`] leaves: a greedy token, or the kept candidates (in the scratch) and their total.
enum Prepared {
    Greedy(u32),
    Kept { total: f64 },
}

/// Steps 0-7 of the module doc. On `Kept`, `scratch.cands` holds the kept candidates.
fn prepare(logits: &[f32], params: &SamplingParams, scratch: &mut SamplerScratch) -> Result<Prepared> {
    params.validate()?;
    ensure!(!logits.is_empty(), "sample: empty logits");
    ensure!(logits.len() <= u32::MAX as usize, "sample: vocabulary of {} exceeds u32 ids", logits.len());

    if params.is_greedy() {
        let mut best: Option<(u32, f32)> = None;
        for (i, &l) in logits.iter().enumerate() {
            check_logit(i, l)?;
            // Strict `>`: the first maximum wins (ties -> lowest id); −inf never becomes `best`.
            if l > best.map_or(f32::NEG_INFINITY, |b| b.1) {
                best = Some((i as u32, l));
            }
        }
        return match best {
            Some((id, _)) => Ok(Prepared::Greedy(id)),
            None => bail!("sample: all {} logits are -inf", logits.len()),
        };
    }

    // Step 2: temperature, candidates, max.
    let t = params.temperature;
    let cands = &mut scratch.cands;
    cands.clear();
    scratch.sorted = 0;
    let mut m = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        check_logit(i, l)?;
        let x = l / t;
        if x > f32::NEG_INFINITY {
            ensure!(x < f32::INFINITY, "sample: logit {l} at token {i} / temperature {t} overflows f32");
            m = m.max(x);
            cands.push(Cand { x, id: i as u32, w: 0.0 });
        }
    }
    ensure!(!cands.is_empty(), "sample: all {} logits are -inf", logits.len());

    // Step 4: top-k; `retain` keeps every tie of the threshold, wherever select put it.
    let k = params.top_k;
    if k > 0 && k < cands.len() {
        let (_, kth, _) = cands.select_nth_unstable_by(k - 1, canonical);
        let threshold = kth.x;
        cands.retain(|c| c.x >= threshold);
    }

    // Step 5: weights relative to the max, in f64.
    let m64 = f64::from(m);
    let mut z = 0.0f64;
    let mut underflow = false;
    for c in cands.iter_mut() {
        c.w = (f64::from(c.x) - m64).exp();
        underflow |= c.w == 0.0;
        z += c.w;
    }
    if underflow {
        cands.retain(|c| c.w > 0.0);
    }

    let mut truncated = false;
    // Step 6: top-p, walking the lazily sorted prefix.
    if params.top_p < 1.0 {
        let limit = f64::from(params.top_p) * z;
        let mut mass = 0.0f64;
        let mut n = 0;
        while n < scratch.cands.len() {
            scratch.ensure_sorted(n + 1);
            if mass >= limit {
                break;
            }
            mass += scratch.cands[n].w;
            n += 1;
        }
        truncated |= n < scratch.cands.len();
        scratch.cands.truncate(n);
        scratch.sorted = n;
    }

    // Step 7: min-p. After top-p the candidates are sorted and `w` is non-increasing, so the kept
    // set is a prefix; otherwise filter in place (nothing is sorted yet).
    if params.min_p > 0.0 {
        let floor = f64::from(params.min_p);
        let before = scratch.cands.len();
        if scratch.sorted == before {
            let n = scratch.cands.partition_point(|c| c.w >= floor);
            scratch.cands.truncate(n);
            scratch.sorted = n;
        } else {
            debug_assert_eq!(scratch.sorted, 0);
            scratch.cands.retain(|c| c.w >= floor);
        }
        truncated |= scratch.cands.len() < before;
    }

    let total = if truncated {
        // Canonical order when top-p ran (the kept set is sorted); candidate order otherwise.
        scratch.cands.iter().map(|c| c.w).sum()
    } else {
        z
    };
    Ok(Prepared::Kept { total })
}

#[inline]
fn check_logit(i: usize, l: f32) -> Result<()> {
    if l.is_nan() || l == f32::INFINITY {
        bail!("sample: logit at token {i} is {l} (NaN and +inf are invalid)");
    }
    Ok(())
}

/// Draws one token: the module doc's procedure with the uniform `u` in [0, 1).
pub fn sample(logits: &[f32], params: &SamplingParams, u: f32, scratch: &mut SamplerScratch) -> Result<u32> {
    ensure!((0.0..1.0).contains(&u), "sample: uniform must be in [0, 1), got {u}");
    let total = match prepare(logits, params, scratch)? {
        Prepared::Greedy(id) => return Ok(id),
        Prepared::Kept { total } => total,
    };
    // Step 8: inverse CDF over the canonical order, sorting only as far as the walk goes.
    let target = f64::from(u) * total;
    let len = scratch.cands.len();
    let mut c = 0.0f64;
    for i in 0..len {
        scratch.ensure_sorted(i + 1);
        c += scratch.cands[i].w;
        if target < c {
            return Ok(scratch.cands[i].id);
        }
    }
    // Rounding: `target` reached the canonical-order sum; the last kept token takes the remainder.
    match scratch.cands.last() {
        Some(last) => Ok(last.id),
        None => bail!("sample: no candidate survived truncation (internal invariant broken)"),
    }
}

/// The kept tokens and their probabilities (`w / total`), in canonical order, summing to 1.
/// Greedy returns the argmax with probability 1.
pub fn truncated_distribution(logits: &[f32], params: &SamplingParams) -> Result<Vec<(u32, f64)>> {
    let mut scratch = SamplerScratch::new();
    match prepare(logits, params, &mut scratch)? {
        Prepared::Greedy(id) => Ok(vec![(id, 1.0)]),
        Prepared::Kept { total } => {
            let len = scratch.cands.len();
            scratch.ensure_sorted(len);
            Ok(scratch.cands.iter().map(|c| (c.id, c.w / total)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_sort_matches_full_sort() {
        // A flat-ish 1000-token distribution forces several doublings of the sorted prefix.
        let logits: Vec<f32> = (0..1000u32).map(|i| ((i * 7919) % 97) as f32 * 0.01).collect();
        let p = SamplingParams::with_temperature(1.0);
        let dist = truncated_distribution(&logits, &p).expect("valid");
        let mut scratch = SamplerScratch::new();
        for j in 0..200 {
            let u = (j as f32 + 0.37) / 200.0;
            let target = f64::from(u);
            // Reference draw: first kept token whose cumulative probability exceeds u.
            let mut c = 0.0;
            let want = dist.iter().find(|(_, q)| {
                c += q;
                target < c
            });
            let got = sample(&logits, &p, u, &mut scratch).expect("valid");
            assert_eq!(Some(got), want.map(|w| w.0), "u = {u}");
        }
    }
}
