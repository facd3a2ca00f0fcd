//! A branch-free f64 `exp` for arguments <= 0 that the compiler vectorises (libm's `exp` is a call
//! per element): the sampler's weights, the LM head's log-sum-exp, and f32 softmax exponentials
//! (computed in f64 and rounded once, so within an ulp of libm's `expf`).
//!
//! Each slice function is compiled twice, for AVX2 (picked at run time) and for the baseline
//! target, from the same code: the results do not depend on which runs (no FMA contraction).

/// Compiles `$body` (a slice loop over `exp_fast`) for AVX2 when the CPU has it, else as is.
macro_rules! with_avx2 {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above); the closure is safe code.
                return unsafe { avx2(|| $body) };
            }
        }
        $body
    }};
}
/// Also for other element-wise loops that want AVX2 codegen with unchanged results (attention).
pub(crate) use with_avx2;

/// Bound on |exp_fast(d) / f64::exp(d) - 1| for -700 <= d <= 0: both are within a few ulp (2^-52)
/// of exp; 1e-13 leaves a margin of about 100x (the test measures it). The sampler's fast path
/// relies on it.
pub(crate) const EXP_REL_ERR: f64 = 1e-13;
/// Below this exp_fast returns 0 (libm: below 1e-304); `err` adds this much per candidate.
pub(crate) const EXP_FLOOR_ARG: f64 = -700.0;
pub(crate) const EXP_FLOOR_ABS: f64 = 1e-304;

/// exp(d) for d <= 700 (callers pass d <= 0, up to rounding): Cody-Waite reduction d = k ln2 + r (|r| <= ln2/2), Taylor series of degree
/// 12 (truncation < 2e-16 relative), times 2^k built in the exponent bits. Branch-free, so the
/// compiler vectorises a loop of it.
#[inline(always)]
pub(crate) fn exp_fast(d: f64) -> f64 {
    const SHIFTER: f64 = 6755399441055744.0; // 1.5 * 2^52: adding it rounds to an integer
    const LN2_HI: f64 = 6.931_471_803_691_238e-1; // fdlibm's split of ln 2: k * LN2_HI is exact
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let dd = d.max(EXP_FLOOR_ARG);
    let t = dd * std::f64::consts::LOG2_E + SHIFTER;
    let kf = t - SHIFTER;
    let r = (dd - kf * LN2_HI) - kf * LN2_LO;
    let mut p = 1.0 / 479_001_600.0; // 1/12!
    for inv_fact in [
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + inv_fact;
    }
    // t's low mantissa bits hold k (|k| <= 1010): the bits of 2^k are (k + 1023) << 52.
    let k = t.to_bits().wrapping_sub(SHIFTER.to_bits());
    let scale = f64::from_bits(k.wrapping_add(1023) << 52);
    if d < EXP_FLOOR_ARG {
        0.0
    } else {
        p * scale
    }
}

/// `w[i] = exp_fast(w[i])` over a slice.
pub(crate) fn exp_fast_slice(w: &mut [f64]) {
    #[inline(always)]
    fn body(w: &mut [f64]) {
        for x in w.iter_mut() {
            *x = exp_fast(*x);
        }
    }
    with_avx2!(body(w))
}

/// Σ exp(x[i] - max) in f64 over f32 `x` (each difference taken in f32, as the LM head's softmax
/// does): the log-sum-exp of a logits row is `max + ln` of it.
pub(crate) fn sum_exp_shifted(x: &[f32], max: f32) -> f64 {
    #[inline(always)]
    fn body(x: &[f32], max: f32) -> f64 {
        let mut lanes = [0.0f64; 4];
        let mut chunks = x.chunks_exact(4);
        for c in &mut chunks {
            for l in 0..4 {
                lanes[l] += exp_fast(f64::from(c[l] - max));
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&v| exp_fast(f64::from(v - max))).sum();
        lanes.iter().sum::<f64>() + tail
    }
    with_avx2!(body(x, max))
}

/// `x[i] = exp(x[i] - shift)` in place for f32 `x` with every `x[i] <= shift` (softmax numerators):
/// the difference in f32, the exponential in f64, rounded once to f32.
pub(crate) fn exp_shifted_f32(x: &mut [f32], shift: f32) {
    #[inline(always)]
    fn body(x: &mut [f32], shift: f32) {
        for v in x.iter_mut() {
            *v = exp_fast(f64::from(*v - shift)) as f32;
        }
    }
    with_avx2!(body(x, shift))
}

/// σ(g) = 1 / (1 + exp(−g)) in f64 (exp_fast, its argument clamped to 700: σ is then below
/// 1e-304, 0 in f32), rounded once to f32: within an ulp of the exact value, 2 of the f32 libm formula where that
/// is a normal number (below g ≈ −87 it underflows to 0 where this keeps a subnormal), and
/// vectorisable where libm's `expf` is a call per element. NaN stays NaN through `g` itself.
#[inline(always)]
pub(crate) fn sigmoid_f32(g: f32) -> f32 {
    let e = exp_fast((-f64::from(g)).min(700.0));
    (1.0 / (1.0 + e)) as f32
}

/// SwiGLU forward over slices: `out[i] = g σ(g) u` (g = gate[i], u = up[i]).
pub(crate) fn swiglu_f32(out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[inline(always)]
    fn body(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid_f32(g) * u;
        }
    }
    with_avx2!(body(out, gate, up))
}

/// SwiGLU backward over slices: `dup = dy g σ`, `dgate = dy u σ (1 + g (1 − σ))`.
pub(crate) fn swiglu_backward_f32(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    #[inline(always)]
    fn body(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        for ((((dg, du), &dy), &g), &u) in dgate.iter_mut().zip(dup.iter_mut()).zip(dout).zip(gate).zip(up) {
            let s = sigmoid_f32(g);
            *du = dy * g * s;
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
    with_avx2!(body(dgate, dup, dout, gate, up))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// exp_fast against libm over the whole range it serves, with the bound `fast_draw` assumes.
    #[test]
    fn exp_fast_is_within_its_bound() {
        let mut worst = 0.0f64;
        let mut state = 12345u64;
        for i in 0..400_000u64 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let frac = (state >> 11) as f64 / (1u64 << 53) as f64;
            // Dense near 0 (where weights matter), then the whole range down to the floor.
            let d = if i % 2 == 0 { -frac * 20.0 } else { frac * EXP_FLOOR_ARG };
            let (got, want) = (exp_fast(d), d.exp());
            worst = worst.max((got / want - 1.0).abs());
        }
        assert!(worst < EXP_REL_ERR / 50.0, "exp_fast relative error {worst:e}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert_eq!(exp_fast(-745.5), 0.0);
        assert!(exp_fast(EXP_FLOOR_ARG - 1.0) == 0.0 && (EXP_FLOOR_ARG - 1.0).exp() < EXP_FLOOR_ABS);
        let mut v = vec![-1.0, -2.5, 0.0, -699.0, -701.0];
        exp_fast_slice(&mut v);
        assert_eq!(v, vec![exp_fast(-1.0), exp_fast(-2.5), 1.0, exp_fast(-699.0), 0.0]);
    }

    #[test]
    fn slice_helpers_match_libm() {
        let x: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.7919).sin() * 30.0 - 5.0).collect();
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want: f64 = x.iter().map(|&v| f64::from(v - max).exp()).sum();
        let got = sum_exp_shifted(&x, max);
        assert!((got / want - 1.0).abs() < 1e-14, "sum_exp_shifted {got} vs {want}");
        let mut y = x.clone();
        exp_shifted_f32(&mut y, max);
        for (&g, &v) in y.iter().zip(&x) {
            let want = (v - max).exp();
            assert!((g - want).abs() <= 2.0 * f32::EPSILON * want, "exp_shifted_f32 {g} vs {want}");
        }
    }

    #[test]
    fn sigmoid_f32_is_within_an_ulp_of_the_exact_value() {
        let mut worst = 0i64;
        for i in -200_000..=200_000 {
            let g = i as f32 * 1e-3;
            let want = 1.0 / (1.0 + (-g).exp());
            let got = sigmoid_f32(g);
            // Below g ≈ −87 the f32 formula's expf overflows or its quotient is subnormal (0 or a
            // few bits); the f64 path keeps the tiny value. Compare there in absolute terms.
            if want < f32::MIN_POSITIVE {
                assert!(got < 2.0 * f32::MIN_POSITIVE, "sigmoid_f32({g}) = {got}, want {want}");
                continue;
            }
            worst = worst.max((got.to_bits() as i64 - want.to_bits() as i64).abs());
            let exact = (1.0 / (1.0 + (-f64::from(g)).exp())) as f32;
            assert!((got.to_bits() as i64 - exact.to_bits() as i64).abs() <= 1, "sigmoid_f32({g}) = {got}, f64 formula {exact}");
        }
        // The f32 formula itself rounds three times.
        assert!(worst <= 2, "sigmoid_f32 is {worst} ulp from 1/(1+expf(-g))");
        assert_eq!(sigmoid_f32(1e30), 1.0);
        assert_eq!(sigmoid_f32(-1e30), 0.0);
        assert!(sigmoid_f32(f32::NAN).is_nan() || (f32::NAN * sigmoid_f32(f32::NAN)).is_nan());
    }
}
