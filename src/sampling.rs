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
//!    "prefix" and "walk" below is in this order. −0.0 and +0.0 compare equal (a tie). One u64 sort
//!    key gives it (ascending): `x += 0.0` (turns −0.0 into +0.0); `b = bits(x)`;
//!    `a = b & 0x80000000 ? ~b : b | 0x80000000` (f32 order as u32 order); `key = (~a << 32) | id`.
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
//! canonical order. CPU and CUDA agree exactly except where a last-ulp difference in `exp` (neither
//! libm nor CUDA's `exp` is correctly rounded) or a sum taken in another order moves a cutoff or
//! `target` across a boundary: that needs a cumulative sum within ~1e-15 relative of `limit` or
//! `target`, a chance of order 1e-12 per token.
//!
//! # Cost (CPU)
//!
//! [`sample`] first tries a fast path (the "fast path" section below): weights from a vectorised
//! polynomial `exp`, per-bucket sums over 1/256-nat buckets of `m - x`, and a sort of only the
//! bucket where each threshold falls; it returns a token only when its sums are provably far enough
//! from the cutoff and the draw that the steps above give the same token, else it runs them
//! (about one draw in a million; always for min-p). The same draws, about 4x cheaper at V = 49152.
//!
//! The steps themselves: one pass over the vocabulary (divide, check, compare), one f64 `exp` per
//! candidate (`Z` needs every weight), and a canonical order built only as far as the top-p walk
//! and the draw go: while computing weights, candidates are histogrammed by `m - x` into buckets of 1/8 nat
//! (a monotone function of `x`, so buckets are contiguous in canonical order). To walk to a mass
//! `s`, the buckets whose cumulative mass first reaches `s` (plus a 1e-9 relative margin that
//! covers summation-order rounding) are partitioned to the front and only they are sorted; the
//! walk itself is then exactly steps 6 and 8. A peaked distribution sorts a handful of tokens, a
//! flat one a few thousand, never needlessly the vocabulary. [`SamplerScratch`] keeps the buffers
//! between calls, so a warm call allocates nothing.

use crate::fastexp::{exp_fast_slice, EXP_FLOOR_ABS, EXP_REL_ERR};
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
        ensure!((0.0..1.0).contains(&min_p), "SamplingParams: min_p must be in [0, 1) (0 = off), got {min_p}");
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

impl Cand {
    /// Canonical order as one u64 compared ascending: high half = `x` descending (as the bit
    /// pattern of a monotone f32 -> u32 map), low half = id ascending. `x` is never NaN and -0.0
    /// was normalised to +0.0, so this is exactly "x descending, ties by id ascending".
    #[inline(always)]
    fn key(&self) -> u64 {
        let bits = self.x.to_bits();
        let ascending = if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 };
        (u64::from(!ascending) << 32) | u64::from(self.id)
    }
}

/// Histogram buckets of `m - x`: BUCKETS_PER_NAT per nat, the last bucket open-ended (d >= 32).
const BUCKETS_PER_NAT: f32 = 8.0;
const N_BUCKETS: usize = 256;

/// Bucket of a candidate: non-decreasing as `x` decreases (f32 subtraction and scaling are
/// monotone), so every bucket is a contiguous run of the canonical order.
#[inline(always)]
fn bucket(m: f32, x: f32) -> usize {
    ((m - x) * BUCKETS_PER_NAT).min((N_BUCKETS - 1) as f32) as usize
}

/// Relative slack when choosing how many buckets to sort before a walk to mass `s`: bucket sums
/// and the walk's running sum add the same weights in different orders (relative error below
/// V * 2^-53 ~ 1e-11 for V = 128k), so sorting buckets up to cumulative mass `s + 1e-9 * Z`
/// always contains the walk's stopping point.
const WALK_MARGIN: f64 = 1e-9;

/// Reusable buffers for [`sample`]: one per thread, reused across calls.
#[derive(Debug)]
pub struct SamplerScratch {
    /// (<= V) the candidates. `cands[..sorted]` are in canonical order and are exactly the
    /// candidates of buckets `..=sorted_through` (or all candidates); the rest follow them.
    cands: Vec<Cand>,
    sorted: usize,
    /// Last bucket whose candidates are all in the sorted prefix (None: none yet).
    sorted_through: Option<usize>,
    /// (N_BUCKETS) f64: total weight per bucket.
    bucket_mass: Vec<f64>,
    /// Max scaled logit of the current call (bucket origin).
    m: f32,
    /// `fast_draw` scratch: (cands) `m - x` in f64 then the weight; (cands) fine bucket of each
    /// candidate; (FINE_BUCKETS) weight and candidate count per fine bucket; one bucket's candidates.
    fast_w: Vec<f64>,
    fast_bucket: Vec<u16>,
    fine_mass: Vec<f64>,
    fine_count: Vec<u32>,
    fine_cands: Vec<Cand>,
    /// `flat_draw`: (V) every token's scaled logit `l / t`, in id order (the candidates then are
    /// every token, and `fast_w`/`fast_bucket` are indexed by id).
    flat_x: Vec<f32>,
    /// Calls that took the step-by-step path (tests check that the fast path is the usual one).
    fast_fallbacks: u64,
}

impl Default for SamplerScratch {
    fn default() -> Self {
        Self {
            cands: Vec::new(),
            sorted: 0,
            sorted_through: None,
            bucket_mass: vec![0.0; N_BUCKETS],
            m: 0.0,
            fast_w: Vec::new(),
            fast_bucket: Vec::new(),
            fine_mass: vec![0.0; FINE_BUCKETS],
            fine_count: vec![0; FINE_BUCKETS],
            fine_cands: Vec::new(),
            flat_x: Vec::new(),
            fast_fallbacks: 0,
        }
    }
}

impl SamplerScratch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the unsorted candidates of buckets `..=b` to the end of the sorted prefix and sorts them.
    fn sort_through_bucket(&mut self, b: usize) {
        if self.sorted_through.is_some_and(|s| s >= b) {
            return;
        }
        let m = self.m;
        let rest = &mut self.cands[self.sorted..];
        let mut front = 0;
        for i in 0..rest.len() {
            if bucket(m, rest[i].x) <= b {
                rest.swap(front, i);
                front += 1;
            }
        }
        rest[..front].sort_unstable_by_key(Cand::key);
        self.sorted += front;
        self.sorted_through = Some(b);
    }

    /// Sorts enough buckets that their cumulative mass reaches `mass` (or all of them).
    fn sort_for_mass(&mut self, mass: f64) {
        let mut cum = 0.0;
        for b in 0..N_BUCKETS {
            cum += self.bucket_mass[b];
            if cum >= mass {
                return self.sort_through_bucket(b);
            }
        }
        self.sort_through_bucket(N_BUCKETS - 1);
    }

    /// Extends the canonical prefix to at least `n` candidates (clamped to all), bucket by bucket.
    /// Only rounding beyond WALK_MARGIN would need this after `sort_for_mass`; it keeps walks exact.
    #[inline]
    fn ensure_sorted(&mut self, n: usize) {
        while self.sorted < n.min(self.cands.len()) {
            let next = self.sorted_through.map_or(0, |s| s + 1);
            if next >= N_BUCKETS {
                break; // unreachable: the last bucket holds every remaining candidate
            }
            self.sort_through_bucket(next);
        }
    }

    /// Marks the whole (already canonical) candidate list as sorted, after a truncation of the prefix.
    fn all_sorted(&mut self) {
        self.sorted = self.cands.len();
        self.sorted_through = Some(N_BUCKETS - 1);
    }
}

/// What [`prepare`] leaves: a greedy token, or the kept candidates (in the scratch) and their total.
enum Prepared {
    Greedy(u32),
    Kept { total: f64 },
}

/// Steps 0-4 of the module doc: a greedy token, or the candidates in `scratch.cands` (weights not
/// yet computed) with their max in `scratch.m`.
fn start(logits: &[f32], params: &SamplingParams, scratch: &mut SamplerScratch) -> Result<Option<u32>> {
    params.validate()?;
    ensure!(!logits.is_empty(), "sample: empty logits");
    ensure!(logits.len() <= u32::MAX as usize, "sample: vocabulary of {} exceeds u32 ids", logits.len());

    check_logits(logits)?;
    if params.is_greedy() {
        // Strict `>`: the first maximum wins (ties -> lowest id); -inf never becomes `best`.
        let (mut best, mut best_l) = (None, f32::NEG_INFINITY);
        for (i, &l) in logits.iter().enumerate() {
            if l > best_l {
                (best, best_l) = (Some(i as u32), l);
            }
        }
        return match best {
            Some(id) => Ok(Some(id)),
            None => bail!("sample: all {} logits are -inf", logits.len()),
        };
    }

    // Step 2: temperature, candidates, max.
    let t = params.temperature;
    scratch.cands.clear();
    scratch.sorted = 0;
    scratch.sorted_through = None;
    scratch.cands.reserve(logits.len());
    let mut m = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        // `+ 0.0` turns -0.0 into +0.0 so that the two tie in the canonical key.
        let x = l / t + 0.0;
        if x > f32::NEG_INFINITY {
            ensure!(x < f32::INFINITY, "sample: logit {l} at token {i} / temperature {t} overflows f32");
            m = m.max(x);
            scratch.cands.push(Cand { x, id: i as u32, w: 0.0 });
        }
    }
    ensure!(!scratch.cands.is_empty(), "sample: all {} logits are -inf", logits.len());
    scratch.m = m;

    // Step 4: top-k. The threshold is the k-th largest x; `retain` keeps every tie of it.
    let k = params.top_k;
    if k > 0 && k < scratch.cands.len() {
        let (_, kth, _) = scratch.cands.select_nth_unstable_by_key(k - 1, Cand::key);
        let threshold = kth.x;
        scratch.cands.retain(|c| c.x >= threshold);
    }
    Ok(None)
}

/// Steps 0-7 of the module doc. On `Kept`, `scratch.cands` holds the kept candidates.
fn prepare(logits: &[f32], params: &SamplingParams, scratch: &mut SamplerScratch) -> Result<Prepared> {
    if let Some(id) = start(logits, params, scratch)? {
        return Ok(Prepared::Greedy(id));
    }
    let m = scratch.m;

    // Step 5 (and step 7 when top-p is off, since min-p then depends on w alone): weights relative
    // to the max, Z, and the bucket histogram, compacting in place.
    let top_p_on = params.top_p < 1.0;
    let min_p_on = params.min_p > 0.0;
    let floor = if !top_p_on && min_p_on { f64::from(params.min_p) } else { 0.0 };
    let m64 = f64::from(m);
    let mut z = 0.0f64;
    scratch.bucket_mass.fill(0.0);
    let mut kept = 0;
    for i in 0..scratch.cands.len() {
        let c = scratch.cands[i];
        let w = (f64::from(c.x) - m64).exp();
        if w > 0.0 && w >= floor {
            scratch.cands[kept] = Cand { w, ..c };
            kept += 1;
            z += w;
            scratch.bucket_mass[bucket(m, c.x)] += w;
        }
    }
    scratch.cands.truncate(kept);

    // Step 6: top-p, walking the canonical order from the top.
    if top_p_on {
        let limit = f64::from(params.top_p) * z;
        scratch.sort_for_mass(limit + WALK_MARGIN * z);
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
        let truncated = n < scratch.cands.len();
        scratch.cands.truncate(n);
        scratch.all_sorted();

        // Step 7 after top-p: the kept list is canonical and w non-increasing, so min-p keeps a prefix.
        if min_p_on {
            let floor = f64::from(params.min_p);
            let n_min = scratch.cands.partition_point(|c| c.w >= floor);
            scratch.cands.truncate(n_min);
            scratch.all_sorted();
        }
        if truncated || scratch.cands.len() < n {
            // Summed in canonical order: the same order as the draw's walk.
            let total = scratch.cands.iter().map(|c| c.w).sum();
            return Ok(Prepared::Kept { total });
        }
    }
    Ok(Prepared::Kept { total: z })
}

/// NaN and +inf logits are errors (step 0). One branch-free pass; the index only on failure.
// `!(l < inf)` is true exactly for NaN and +inf: the negation is the point.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn check_logits(logits: &[f32]) -> Result<()> {
    let bad = logits.iter().fold(false, |bad, &l| bad | !(l < f32::INFINITY));
    if bad {
        if let Some((i, l)) = logits.iter().enumerate().find(|(_, l)| !(**l < f32::INFINITY)) {
            bail!("sample: logit at token {i} is {l} (NaN and +inf are invalid)");
        }
    }
    Ok(())
}

/// Draws one token: the module doc's procedure with the uniform `u` in [0, 1).
pub fn sample(logits: &[f32], params: &SamplingParams, u: f32, scratch: &mut SamplerScratch) -> Result<u32> {
    ensure!((0.0..1.0).contains(&u), "sample: uniform must be in [0, 1), got {u}");
    match flat_draw(logits, params, u, scratch) {
        Flat::Token(id) => return Ok(id),
        Flat::Undecided => return sample_exact(logits, params, u, scratch),
        Flat::NotApplicable => {}
    }
    if let Some(id) = start(logits, params, scratch)? {
        return Ok(id);
    }
    if let Some(id) = fast_draw(params, u, scratch) {
        return Ok(id);
    }
    sample_exact(logits, params, u, scratch)
}

/// The module doc's procedure step by step (the reference `fast_draw` falls back to).
fn sample_exact(logits: &[f32], params: &SamplingParams, u: f32, scratch: &mut SamplerScratch) -> Result<u32> {
    scratch.fast_fallbacks += 1;
    let total = match prepare(logits, params, scratch)? {
        Prepared::Greedy(id) => return Ok(id),
        Prepared::Kept { total } => total,
    };
    // Step 8: inverse CDF over the canonical order, sorting only the buckets the walk reaches.
    let target = f64::from(u) * total;
    scratch.sort_for_mass(target + WALK_MARGIN * total);
    let mut c = 0.0f64;
    for i in 0..scratch.cands.len() {
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

// ---------------------------------------------------------------- fast path
//
// `fast_draw` returns the token the procedure above returns, without sorting the candidates or
// calling libm's `exp`. Every cutoff and the draw compare a threshold (`limit`, `target`) with the
// prefix sums `S_j` of the weights in canonical order; the fast path computes the weights with a
// polynomial `exp` (within EXP_REL_ERR of libm's), sums them per fine bucket of `m - x` (each bucket
// a contiguous run of the canonical order), sorts only the bucket where the threshold falls, and
// walks it. Its sums differ from the step-by-step ones by at most `err` (weight error plus f64
// rounding of both summation orders); it answers only when the threshold is more than `2 err` from
// both prefix sums around the chosen token, so the step-by-step comparisons give the same token, and
// otherwise (a chance of order 1e-6 per draw) returns None and the caller runs `sample_exact`.
// Min-p (a per-token cutoff) is left to `sample_exact`.

/// Fine buckets of `m - x`: FINE_BUCKETS spread over the candidates' range `m - min x`, but never
/// coarser than FINE_PER_NAT per nat (a range over 16 nats leaves the last bucket open-ended).
const FINE_PER_NAT: f32 = 256.0;
const FINE_BUCKETS: usize = 4096;

/// Fine buckets per nat for candidates spanning `range` nats. A nearly flat distribution (high
/// temperature, an untrained model) spans a small fraction of a nat: at a fixed 256 per nat its
/// whole vocabulary would fall in a few buckets, each crossing sorting thousands of tokens.
fn fine_scale(range: f32) -> f32 {
    let full = FINE_BUCKETS as f32 / FINE_PER_NAT;
    if range >= full {
        FINE_PER_NAT
    } else {
        // (m - x) * scale <= ~FINE_BUCKETS for every candidate, so the product never overflows.
        FINE_BUCKETS as f32 / range.max(1e-30)
    }
}

/// The fine bucket of `x`: monotone in `m - x` (a positive scale, then truncation), so each
/// bucket is a contiguous run of the canonical order whatever the scale.
#[inline(always)]
fn fine_bucket(scale: f32, m: f32, x: f32) -> usize {
    ((m - x) * scale).min((FINE_BUCKETS - 1) as f32) as usize
}

/// Where a threshold falls in the canonical order: the first candidate whose prefix sum (itself
/// included) exceeds it, by index, with that prefix sum.
struct Crossing {
    index: usize,
    id: u32,
    sum: f64,
}

impl SamplerScratch {
    /// The first canonical index j with `S_{j+1} > t`, if both `S_{j+1} - t` and `t - S_j` exceed
    /// `2 err` (then `>` and `>=` agree, and so do the step-by-step sums); else None.
    /// `flat`: the candidates are every token in id order (`flat_draw`), else `self.cands`.
    fn crossing(&mut self, t: f64, err: f64, flat: bool) -> Option<Crossing> {
        let mut cum = 0.0f64;
        let mut before = 0usize;
        let b = (0..FINE_BUCKETS).find(|&b| {
            let next = cum + self.fine_mass[b];
            if next > t {
                return true;
            }
            cum = next;
            before += self.fine_count[b] as usize;
            false
        })?;
        self.fine_cands.clear();
        let bucket = b as u16;
        if flat {
            let (xs, ws) = (&self.flat_x, &self.fast_w);
            let hits = self.fast_bucket.iter().enumerate().filter(|(_, &cb)| cb == bucket);
            self.fine_cands.extend(hits.map(|(i, _)| Cand { x: xs[i], id: i as u32, w: ws[i] }));
        } else {
            self.fine_cands.extend(self.cands.iter().zip(&self.fast_bucket).filter(|(_, &cb)| cb == bucket).map(|(c, _)| *c));
        }
        self.fine_cands.sort_unstable_by_key(Cand::key);
        let mut sum = cum;
        for (k, c) in self.fine_cands.iter().enumerate() {
            let prev = sum;
            sum += c.w;
            if sum > t {
                let clear = sum - t > 2.0 * err && t - prev > 2.0 * err;
                return clear.then_some(Crossing { index: before + k, id: c.id, sum });
            }
        }
        None // the walk's rounding disagrees with the bucket sums: too close to call
    }
}

/// Steps 5-8 on the candidates `start` left, or None when min-p is on or a threshold lies too
/// close to a prefix sum to decide without the step-by-step sums (see the section comment).
fn fast_draw(params: &SamplingParams, u: f32, s: &mut SamplerScratch) -> Option<u32> {
    if params.min_p > 0.0 {
        return None;
    }
    let m = s.m;
    let m64 = f64::from(m);
    s.fast_w.clear();
    s.fast_w.extend(s.cands.iter().map(|c| f64::from(c.x) - m64));
    exp_fast_slice(&mut s.fast_w);
    let lo = s.cands.iter().fold(f32::INFINITY, |a, c| a.min(c.x));
    let scale = fine_scale(m - lo);
    // One pass over the candidate records: their weight and fine bucket.
    s.fast_bucket.clear();
    for (c, &w) in s.cands.iter_mut().zip(&s.fast_w) {
        c.w = w;
        s.fast_bucket.push(fine_bucket(scale, m, c.x) as u16);
    }
    let z = s.fine_histogram();
    s.decide(params, u, z, false)
}

/// What [`flat_draw`] found.
enum Flat {
    /// Top-k or min-p on, a logit that is not finite after temperature, or invalid parameters:
    /// the general path handles it (and reports errors).
    NotApplicable,
    Token(u32),
    /// Too close to call: the step-by-step path decides.
    Undecided,
}

/// `fast_draw` straight from the logits for the usual case (no top-k, no min-p, every scaled
/// logit finite): the candidates are then every token in id order, so the weights, fine buckets
/// and histogram are computed over flat arrays instead of 16-byte candidate records (the records
/// are built only for the one bucket each threshold falls in). Same weights, same error bound,
/// same decisions.
fn flat_draw(logits: &[f32], params: &SamplingParams, u: f32, s: &mut SamplerScratch) -> Flat {
    let n = logits.len();
    let top_k_on = params.top_k > 0 && params.top_k < n;
    if params.validate().is_err() || params.is_greedy() || params.min_p > 0.0 || top_k_on || n == 0 || n > u32::MAX as usize {
        return Flat::NotApplicable;
    }
    let t = params.temperature;
    s.flat_x.clear();
    // `+ 0.0` turns -0.0 into +0.0 (the canonical key ties them), as `start` does.
    s.flat_x.extend(logits.iter().map(|&l| l / t + 0.0));
    // The max and min in 8 lanes (one running max is a latency chain); any non-finite x (NaN,
    // ±inf, overflow) sends the call to the general path.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut lows = [f32::INFINITY; 8];
    let mut finite = true;
    let mut chunks = s.flat_x.chunks_exact(8);
    for ch in &mut chunks {
        for ((lane, low), &x) in lanes.iter_mut().zip(&mut lows).zip(ch) {
            *lane = lane.max(x);
            *low = low.min(x);
            finite &= x.is_finite();
        }
    }
    for &x in chunks.remainder() {
        lanes[0] = lanes[0].max(x);
        lows[0] = lows[0].min(x);
        finite &= x.is_finite();
    }
    if !finite {
        return Flat::NotApplicable;
    }
    let m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let scale = fine_scale(m - lows.iter().fold(f32::INFINITY, |a, &b| a.min(b)));
    let m64 = f64::from(m);
    s.m = m;
    s.fast_w.clear();
    s.fast_w.extend(s.flat_x.iter().map(|&x| f64::from(x) - m64));
    exp_fast_slice(&mut s.fast_w);
    s.fast_bucket.clear();
    s.fast_bucket.extend(s.flat_x.iter().map(|&x| fine_bucket(scale, m, x) as u16));
    let z = s.fine_histogram();
    match s.decide(params, u, z, true) {
        Some(id) => Flat::Token(id),
        None => Flat::Undecided,
    }
}

impl SamplerScratch {
    /// Fine-bucket masses and counts of `fast_w` by `fast_bucket`; returns Z, their sum.
    fn fine_histogram(&mut self) -> f64 {
        self.fine_mass.fill(0.0);
        self.fine_count.fill(0);
        let mut z = 0.0f64;
        for (&w, &b) in self.fast_w.iter().zip(&self.fast_bucket) {
            z += w;
            self.fine_mass[b as usize] += w;
            self.fine_count[b as usize] += 1;
        }
        z
    }

    /// Steps 6 and 8 from the weights and the histogram (`fast_w`, Z): the top-p cut, then the
    /// draw, each by [`Self::crossing`]; None when either is too close to call.
    fn decide(&mut self, params: &SamplingParams, u: f32, z: f64, flat: bool) -> Option<u32> {
        let n = self.fast_w.len();
        // Each sum of positive weights is off by at most (terms added) * 2^-53 relative per summation
        // order (n weights and FINE_BUCKETS bucket sums here, n in the step-by-step order), plus the
        // weights' own error; 2x for the products (top_p * Z, u * total) and slack.
        let rel = EXP_REL_ERR + (2 * n + FINE_BUCKETS + 16) as f64 * f64::EPSILON;
        let err = rel * z + n as f64 * EXP_FLOOR_ABS;
        let (kept, total) = if params.top_p < 1.0 {
            let cut = self.crossing(f64::from(params.top_p) * z, err, flat)?;
            let kept = cut.index + 1;
            (kept, if kept == n { z } else { cut.sum })
        } else {
            (n, z)
        };
        let draw = self.crossing(f64::from(u) * total, err, flat)?;
        (draw.index < kept).then_some(draw.id)
    }
}

/// The kept tokens and their probabilities (`w / total`), in canonical order, summing to 1.
/// Greedy returns the argmax with probability 1.
pub fn truncated_distribution(logits: &[f32], params: &SamplingParams) -> Result<Vec<(u32, f64)>> {
    let mut scratch = SamplerScratch::new();
    match prepare(logits, params, &mut scratch)? {
        Prepared::Greedy(id) => Ok(vec![(id, 1.0)]),
        Prepared::Kept { total } => {
            scratch.sort_through_bucket(N_BUCKETS - 1);
            Ok(scratch.cands.iter().map(|c| (c.id, c.w / total)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucketed lazy sort must give the same draws as walking the fully sorted distribution,
    /// whichever buckets the walk stops in (narrow and 40-nat-wide logit ranges, with truncation).
    #[test]
    fn lazy_sort_matches_full_sort() {
        let narrow: Vec<f32> = (0..1000u32).map(|i| ((i * 7919) % 97) as f32 * 0.01).collect();
        let wide: Vec<f32> = (0..1000u32).map(|i| ((i * 7919) % 97) as f32 * -0.45).collect();
        let params = [
            SamplingParams::with_temperature(1.0),
            SamplingParams::with_temperature(0.3),
            SamplingParams { temperature: 1.3, top_k: 0, top_p: 0.9, min_p: 0.0 },
            SamplingParams { temperature: 1.0, top_k: 300, top_p: 0.999, min_p: 1e-6 },
        ];
        let mut scratch = SamplerScratch::new();
        for logits in [&narrow, &wide] {
            for p in &params {
                let dist = truncated_distribution(logits, p).expect("valid");
                for j in 0..200 {
                    let u = (j as f32 + 0.37) / 200.0;
                    let target = f64::from(u);
                    // Reference draw: first kept token whose cumulative probability exceeds u.
                    let mut c = 0.0;
                    let want = dist.iter().find(|(_, q)| {
                        c += q;
                        target < c
                    });
                    let got = sample(logits, p, u, &mut scratch).expect("valid");
                    assert_eq!(Some(got), want.map(|w| w.0), "{p:?} u = {u}");
                }
            }
        }
    }

    /// `sample` (fast path with fallback) draws exactly the tokens of the step-by-step procedure,
    /// on peaked, flat, tied and very wide logits, and the fast path answers almost every draw.
    #[test]
    fn fast_draw_matches_step_by_step() {
        let mut state = 7u64;
        let mut gauss = || {
            let mut u = || {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            let (u1, u2) = (u(), u());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let lm_like: Vec<f32> = (0..20000).map(|i| (2.5 * gauss() + if i % 997 == 0 { 9.0 } else { 0.0 }) as f32).collect();
        let flat: Vec<f32> = (0..20000).map(|_| (0.05 * gauss()) as f32).collect();
        // An untrained model's logits: the whole vocabulary within a hundredth of a nat.
        let near_flat: Vec<f32> = (0..49152).map(|_| (0.002 * gauss()) as f32).collect();
        let tied = vec![0.25f32; 4096];
        let mut wide: Vec<f32> = (0..5000).map(|i| -(i as f32) * 0.37).collect();
        wide[17] = f32::NEG_INFINITY;
        wide[4000] = -1e30; // weight underflows to 0: dropped
        let params = [
            SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.9, min_p: 0.0 },
            SamplingParams::with_temperature(1.0),
            SamplingParams { temperature: 1.3, top_k: 50, top_p: 0.9, min_p: 0.0 },
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.3, min_p: 0.0 },
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.95, min_p: 0.05 },
        ];
        let (mut fast, mut exact) = (SamplerScratch::new(), SamplerScratch::new());
        for (name, logits) in [("lm_like", &lm_like), ("flat", &flat), ("near_flat", &near_flat), ("tied", &tied), ("wide", &wide)] {
            for p in &params {
                let before = fast.fast_fallbacks;
                let draws = 600u32;
                for j in 0..draws {
                    // Multiples of 1/4096 put `target` exactly on prefix sums of the tied logits.
                    let u = if j % 3 == 0 { (j % 4096) as f32 / 4096.0 } else { (j as f32 + 0.31) / draws as f32 };
                    let got = sample(logits, p, u, &mut fast).expect("valid");
                    let want = sample_exact(logits, p, u, &mut exact).expect("valid");
                    assert_eq!(got, want, "{name} {p:?} u = {u}");
                }
                let fallbacks = fast.fast_fallbacks - before;
                if p.min_p > 0.0 {
                    assert_eq!(fallbacks, u64::from(draws), "min-p is left to the step-by-step path");
                } else if name == "tied" {
                    // Targets exactly on prefix sums: the fast path must decline some, not guess.
                    assert!(fallbacks > 0, "{name} {p:?}: no draw fell back");
                } else {
                    assert!(fallbacks <= u64::from(draws) / 100, "{name} {p:?}: {fallbacks} of {draws} draws fell back");
                }
            }
        }
    }

    /// Fine buckets follow the candidates' range: a vocabulary within 0.01 nat spreads over the
    /// buckets instead of filling two or three (each crossing would sort thousands of tokens).
    #[test]
    fn fine_buckets_spread_narrow_ranges() {
        let logits: Vec<f32> = (0..49152u32).map(|i| ((i.wrapping_mul(2654435761) >> 8) % 10007) as f32 * 1e-6).collect();
        let mut s = SamplerScratch::new();
        let params = SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.9, min_p: 0.0 };
        assert!(matches!(flat_draw(&logits, &params, 0.5, &mut s), Flat::Token(_)));
        let fullest = *s.fine_count.iter().max().unwrap();
        assert!(fullest < 100, "the fullest fine bucket holds {fullest} of 49152 tokens");
        // Monotone in m - x at any scale, and the widest range keeps 256 per nat.
        assert_eq!(fine_scale(40.0), FINE_PER_NAT);
        for scale in [fine_scale(1e-35), fine_scale(1e-3), fine_scale(3.0), FINE_PER_NAT] {
            let xs = [0.0f32, -1e-36, -1e-7, -1e-4, -0.5, -2.9, -3.0, -100.0, f32::MIN];
            let b: Vec<usize> = xs.iter().map(|&x| fine_bucket(scale, 0.0, x)).collect();
            assert!(b.windows(2).all(|w| w[0] <= w[1]), "scale {scale}: {b:?}");
        }
    }

    #[test]
    fn canonical_key_orders_x_descending_then_id() {
        let c = |x: f32, id: u32| Cand { x, id, w: 0.0 }.key();
        assert!(c(1.0, 5) < c(0.5, 0));
        assert!(c(0.0, 0) < c(-1e-30, 0));
        assert!(c(-1.0, 0) < c(-2.0, 0));
        assert!(c(3.0, 1) < c(3.0, 2));
        assert!(c(f32::MAX, 9) < c(1.0, 0));
        assert!(c(-1.0, 9) < c(f32::MIN, 0));
    }
}
