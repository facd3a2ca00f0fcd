//! The CPU backend against naive f64 references (forward) and central finite differences
//! (backward), on awkward sizes; plus accumulate/overwrite semantics and shape errors.
//!
//! Outputs start as NaN so an element an op forgets to write fails `assert_close`.

use sppo::backend::cpu::CpuBackend;
use sppo::backend::{AttnMask, AttnSeq, AttnShape, Backend, IGNORE_TARGET};

// ---------------------------------------------------------------- helpers

/// SplitMix64: deterministic inputs without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.uniform()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn backend() -> CpuBackend {
    CpuBackend::new(Some(2)).expect("cpu backend")
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Fails on any non-finite element of `got`, or when the worst element misses
/// `|got − want| <= atol + rtol·|want|`; reports that element and max |Δ|.
fn assert_close(name: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: got {} elements, want {}", got.len(), want.len());
    let mut worst = (0usize, 0.0f64);
    let mut max_abs = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{name}: element {i} is {g} (want {w})");
        let err = (f64::from(g) - w).abs();
        // Exact agreement passes even with zero tolerance; a NaN `want` (a broken reference) fails.
        let ratio = if err == 0.0 { 0.0 } else { err / (atol + rtol * w.abs()) };
        if ratio.is_nan() || ratio > worst.1 {
            worst = (i, ratio);
        }
        max_abs = max_abs.max(err);
    }
    let (i, ratio) = worst;
    assert!(
        ratio <= 1.0,
        "{name}: worst element {i}: got {} want {} (|Δ| {:.3e}, allowed {:.3e}); max |Δ| {max_abs:.3e}",
        got[i],
        want[i],
        (f64::from(got[i]) - want[i]).abs(),
        atol + rtol * want[i].abs()
    );
}

/// Σ r·y in f64: the scalar loss whose gradient w.r.t. y is r.
fn proj(r: &[f32], y: &[f32]) -> f64 {
    r.iter().zip(y).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
}

/// Checks `analytic` = ∂loss/∂x by central differences on a few random coordinates (plus the one
/// with the largest analytic gradient) and along a random direction.
fn check_grad(name: &str, x: &[f32], analytic: &[f32], loss: &dyn Fn(&[f32]) -> f64, rng: &mut Rng) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    assert!(analytic.iter().all(|g| g.is_finite()), "{name}: non-finite analytic gradient");
    // Central differences in f32 with this step are good to ~1e-4 relative on these smooth ops, so
    // RTOL catches a gradient off by a fraction of a percent. The absolute floor covers f32 rounding
    // of the forward (worst seen: 0.6 of the bound, on LM-head weight entries of non-target rows).
    let h = 1e-2f32;
    const RTOL: f64 = 3e-3;
    let n = x.len();
    let rms = (analytic.iter().map(|&g| f64::from(g).powi(2)).sum::<f64>() / n as f64).sqrt().max(1e-6);
    assert!(rms > 1e-5, "{name}: gradient is (almost) zero everywhere; the test would prove nothing");
    let argmax = (0..n).max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs())).unwrap_or(0);
    let mut coords: Vec<usize> = (0..6).map(|_| rng.below(n)).collect();
    coords.push(argmax);
    let mut xp = x.to_vec();
    for &i in &coords {
        xp[i] = x[i] + h;
        let lp = loss(&xp);
        xp[i] = x[i] - h;
        let lm = loss(&xp);
        xp[i] = x[i];
        // The perturbation actually applied, after f32 rounding.
        let fd = (lp - lm) / (f64::from(x[i] + h) - f64::from(x[i] - h));
        let a = f64::from(analytic[i]);
        assert!(
            (a - fd).abs() <= RTOL * fd.abs() + 1e-3 * rms,
            "{name}: ∂L/∂x[{i}] analytic {a:.6e} vs finite difference {fd:.6e} (gradient rms {rms:.3e})"
        );
    }
    let u = rng.vec(n, 1.0);
    let plus: Vec<f32> = x.iter().zip(&u).map(|(&x, &u)| x + h * u).collect();
    let minus: Vec<f32> = x.iter().zip(&u).map(|(&x, &u)| x - h * u).collect();
    let fd = (loss(&plus) - loss(&minus)) / (2.0 * f64::from(h));
    let a: f64 = analytic.iter().zip(&u).map(|(&g, &u)| f64::from(g) * f64::from(u)).sum();
    assert!(
        (a - fd).abs() <= RTOL * fd.abs() + 1e-4 * rms * (n as f64).sqrt(),
        "{name}: directional derivative analytic {a:.6e} vs finite difference {fd:.6e}"
    );
}

// ---------------------------------------------------------------- construction and memory

#[test]
fn construction_and_memory() {
    assert!(CpuBackend::new(Some(0)).is_err());
    let be = CpuBackend::new(None).expect("all cores");
    assert!(be.threads() >= 1);
    assert_eq!(be.name(), "cpu");

    let mut buf = be.alloc(10).expect("alloc");
    assert_eq!(buf, vec![0.0; 10]);
    assert_eq!(be.len(&buf), 10);
    be.write(&mut buf, 7, &[1.0, 2.0, 3.0]).expect("write in range");
    assert_eq!(&buf[7..], &[1.0, 2.0, 3.0]);
    assert!(be.write(&mut buf, 8, &[1.0, 2.0, 3.0]).is_err(), "write past the end");
    assert!(be.write(&mut buf, usize::MAX, &[1.0]).is_err(), "offset overflow");
    be.fill(be.view_mut(&mut buf, 2..5), 4.5).expect("fill");
    assert_eq!(be.download(&buf).expect("download"), vec![0.0, 0.0, 4.5, 4.5, 4.5, 0.0, 0.0, 1.0, 2.0, 3.0]);
    assert_eq!(be.view(&buf, 7..9), &[1.0, 2.0]);
    let up = be.upload(&[5.0, 6.0]).expect("upload");
    assert_eq!(be.full(&up), &[5.0, 6.0]);

    // Large enough for the parallel path.
    let mut big = nan(300_001);
    be.fill(&mut big, -2.0).expect("fill big");
    assert!(big.iter().all(|&v| v == -2.0));
}

#[test]
fn elementwise() {
    let be = backend();
    let mut rng = Rng(1);
    for n in [13usize, 200_003] {
        let (a, b) = (rng.vec(n, 3.0), rng.vec(n, 3.0));
        let mut out = nan(n);
        be.add(&mut out, &a, &b).expect("add");
        let want: Vec<f64> = a.iter().zip(&b).map(|(&a, &b)| f64::from(a) + f64::from(b)).collect();
        assert_close("add", &out, &want, 1e-6, 1e-6);
        let mut acc = a.clone();
        be.add_inplace(&mut acc, &b).expect("add_inplace");
        assert_close("add_inplace", &acc, &want, 1e-6, 1e-6);
    }
    let mut out = nan(4);
    assert!(be.add(&mut out, &[1.0; 4], &[1.0; 3]).is_err());
    assert!(be.add_inplace(&mut out, &[1.0; 5]).is_err());

    // scatter_rows: rows of 3 into a (6, 3) destination.
    let mut dst: Vec<f32> = (0..18).map(|i| i as f32).collect();
    let src = vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0];
    be.scatter_rows(&mut dst, &src, &[4, 1], 3).expect("scatter_rows");
    let mut want: Vec<f64> = (0..18).map(f64::from).collect();
    want[12..15].copy_from_slice(&[-1.0, -2.0, -3.0]);
    want[3..6].copy_from_slice(&[-4.0, -5.0, -6.0]);
    assert_close("scatter_rows", &dst, &want, 0.0, 0.0);
    assert!(be.scatter_rows(&mut dst, &src, &[6, 1], 3).is_err(), "index out of range");
    assert!(be.scatter_rows(&mut dst, &src, &[0], 3).is_err(), "src rows != index len");
    assert!(be.scatter_rows(&mut dst, &src, &[0, 1], 4).is_err(), "dst not a multiple of width");
    assert!(be.scatter_rows(&mut dst, &src, &[0, 1], 0).is_err(), "zero width");
}

// ---------------------------------------------------------------- embedding

#[test]
fn embedding() {
    let be = backend();
    let mut rng = Rng(2);
    let (vocab, dim) = (11usize, 13usize);
    let table = rng.vec(vocab * dim, 1.0);
    let ids: Vec<u32> = vec![3, 0, 10, 3, 3, 7, 0, 5, 10];
    let n = ids.len();
    let mut out = nan(n * dim);
    be.embedding_forward(&mut out, &table, &ids, dim).expect("embedding_forward");
    let want: Vec<f64> = ids.iter().flat_map(|&id| f64s(&table[id as usize * dim..][..dim])).collect();
    assert_close("embedding_forward", &out, &want, 0.0, 0.0);

    // Backward accumulates into an existing gradient, repeated ids summed.
    let dout = rng.vec(n * dim, 1.0);
    let init = rng.vec(vocab * dim, 1.0);
    let mut dtable = init.clone();
    be.embedding_backward(&mut dtable, &dout, &ids, dim).expect("embedding_backward");
    let mut want = f64s(&init);
    for (t, &id) in ids.iter().enumerate() {
        for c in 0..dim {
            want[id as usize * dim + c] += f64::from(dout[t * dim + c]);
        }
    }
    assert_close("embedding_backward", &dtable, &want, 1e-6, 1e-6);

    // A table big enough for several row blocks, ids crossing them.
    let (vocab, dim) = (1000usize, 5usize);
    let ids: Vec<u32> = (0..300).map(|_| rng.below(40) as u32 * 25).collect();
    let dout = rng.vec(ids.len() * dim, 1.0);
    let mut dtable = vec![0.0; vocab * dim];
    be.embedding_backward(&mut dtable, &dout, &ids, dim).expect("embedding_backward big");
    let mut want = vec![0.0f64; vocab * dim];
    for (t, &id) in ids.iter().enumerate() {
        for c in 0..dim {
            want[id as usize * dim + c] += f64::from(dout[t * dim + c]);
        }
    }
    assert_close("embedding_backward (blocks)", &dtable, &want, 1e-5, 1e-5);

    let mut out = nan(2 * dim);
    assert!(be.embedding_forward(&mut out, &dtable, &[0, 1000], dim).is_err(), "id out of range");
    assert!(be.embedding_forward(&mut out, &dtable, &[0], dim).is_err(), "out rows != ids");
    assert!(be.embedding_forward(&mut out, &dtable[..7], &[0, 1], dim).is_err(), "table not a multiple of dim");
    assert!(be.embedding_backward(&mut dtable, &out, &[0, 1000], dim).is_err(), "id out of range");
    assert!(be.embedding_forward(&mut out, &dtable, &[0, 1], 0).is_err(), "zero dim");
}

// ---------------------------------------------------------------- RMSNorm

fn rmsnorm_ref(x: &[f32], w: &[f32], dim: usize, eps: f32) -> (Vec<f64>, Vec<f64>) {
    let mut out = Vec::new();
    let mut rstd = Vec::new();
    for row in x.chunks(dim) {
        let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / dim as f64;
        let r = 1.0 / (ms + f64::from(eps)).sqrt();
        rstd.push(r);
        out.extend(row.iter().zip(w).map(|(&x, &w)| f64::from(x) * r * f64::from(w)));
    }
    (out, rstd)
}

#[test]
fn rmsnorm() {
    let be = backend();
    let mut rng = Rng(3);
    let eps = 1e-5;
    for (n, dim) in [(7usize, 19usize), (300, 97)] {
        let x = rng.vec(n * dim, 2.0);
        let w = rng.vec(dim, 1.5);
        let (mut out, mut rstd) = (nan(n * dim), nan(n));
        be.rmsnorm_forward(&mut out, &mut rstd, &x, &w, dim, eps).expect("rmsnorm_forward");
        let (want, want_rstd) = rmsnorm_ref(&x, &w, dim, eps);
        assert_close("rmsnorm_forward out", &out, &want, 1e-5, 1e-6);
        assert_close("rmsnorm_forward rstd", &rstd, &want_rstd, 1e-5, 1e-6);

        let r = rng.vec(n * dim, 1.0);
        let (mut dx, mut dw) = (vec![0.0; n * dim], vec![0.0; dim]);
        be.rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, &rstd, dim).expect("rmsnorm_backward");
        let fwd = |x: &[f32], w: &[f32]| {
            let (mut out, mut rs) = (nan(n * dim), nan(n));
            be.rmsnorm_forward(&mut out, &mut rs, x, w, dim, eps).expect("rmsnorm_forward");
            proj(&r, &out)
        };
        check_grad("rmsnorm dinp", &x, &dx, &|xp| fwd(xp, &w), &mut rng);
        check_grad("rmsnorm dweight", &w, &dw, &|wp| fwd(&x, wp), &mut rng);

        // Both gradients accumulate.
        let (mut dx2, mut dw2) = (dx.clone(), dw.clone());
        be.rmsnorm_backward(&mut dx2, &mut dw2, &r, &x, &w, &rstd, dim).expect("rmsnorm_backward again");
        assert_close("rmsnorm dinp accumulates", &dx2, &dx.iter().map(|&v| 2.0 * f64::from(v)).collect::<Vec<_>>(), 1e-5, 1e-6);
        assert_close("rmsnorm dweight accumulates", &dw2, &dw.iter().map(|&v| 2.0 * f64::from(v)).collect::<Vec<_>>(), 1e-5, 1e-6);

        // The same bits whatever the thread count (chunks depend only on the shape).
        let one = CpuBackend::new(Some(1)).expect("1 thread");
        let (mut dx1, mut dw1) = (vec![0.0; n * dim], vec![0.0; dim]);
        one.rmsnorm_backward(&mut dx1, &mut dw1, &r, &x, &w, &rstd, dim).expect("rmsnorm_backward 1 thread");
        assert_eq!(dx1, dx, "rmsnorm dinp differs between 1 and 2 threads");
        assert_eq!(dw1, dw, "rmsnorm dweight differs between 1 and 2 threads");
    }
    let (mut out, mut rstd) = (nan(12), nan(3));
    let x = vec![1.0; 12];
    assert!(be.rmsnorm_forward(&mut out, &mut rstd, &x, &[1.0; 4], 4, eps).is_ok());
    assert!(be.rmsnorm_forward(&mut out, &mut rstd, &x, &[1.0; 3], 4, eps).is_err(), "weight != dim");
    assert!(be.rmsnorm_forward(&mut out, &mut rstd[..2], &x, &[1.0; 4], 4, eps).is_err(), "rstd != rows");
    assert!(be.rmsnorm_forward(&mut out, &mut rstd, &x, &[1.0; 5], 5, eps).is_err(), "inp not a multiple of dim");
    let (mut dx, mut dw) = (nan(12), nan(4));
    assert!(be.rmsnorm_backward(&mut dx, &mut dw, &x[..8], &x, &[1.0; 4], &rstd, 4).is_err(), "dout length");
    assert!(be.rmsnorm_backward(&mut dx, &mut dw[..3], &x, &x, &[1.0; 4], &rstd, 4).is_err(), "dweight length");
}

// ---------------------------------------------------------------- matmul

/// out (N, OC) = inp (N, IC) · wᵀ, w (OC, IC), triple loop in f64.
fn matmul_ref(inp: &[f32], w: &[f32], ic: usize, oc: usize) -> Vec<f64> {
    let n = inp.len() / ic;
    let mut out = vec![0.0; n * oc];
    for t in 0..n {
        for o in 0..oc {
            out[t * oc + o] = (0..ic).map(|i| f64::from(inp[t * ic + i]) * f64::from(w[o * ic + i])).sum();
        }
    }
    out
}

/// Several products of one input in one call (Q/K/V, gate/up): each output bitwise what
/// `matmul_forward` gives alone, for decode-sized inputs (one pass over every weight) and
/// prefill-sized ones (a `gemm` each), with an empty product among them.
#[test]
fn matmul_forward_many() {
    let be = backend();
    let mut rng = Rng(14);
    for (n, ic) in [(1usize, 40usize), (8, 576), (5, 1536), (16, 33), (17, 64), (70, 24)] {
        let inp = rng.vec(n * ic, 1.0);
        let dims = [96usize, 32, 0, 7, 160];
        let weights: Vec<Vec<f32>> = dims.iter().map(|&oc| rng.vec(oc * ic, 1.0)).collect();
        let mut outs: Vec<Vec<f32>> = dims.iter().map(|&oc| nan(n * oc)).collect();
        let products = outs.iter_mut().zip(&weights).zip(dims).map(|((o, w), oc)| (&mut o[..], &w[..], oc)).collect();
        be.matmul_forward_many(products, &inp, ic).expect("matmul_forward_many");
        for ((got, w), oc) in outs.iter().zip(&weights).zip(dims) {
            let mut alone = nan(n * oc);
            be.matmul_forward(&mut alone, &inp, w, ic, oc).expect("matmul_forward");
            assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), alone.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "n {n} ic {ic} oc {oc}");
            assert_close("matmul_forward_many", got, &matmul_ref(&inp, w, ic, oc), 1e-5, 1e-5);
        }
    }
}

#[test]
fn matmul() {
    let be = backend();
    let mut rng = Rng(4);
    // Tiny (single-threaded gemm) and big enough for the threaded path.
    for (n, ic, oc) in [(5usize, 3usize, 7usize), (1, 9, 4), (67, 131, 97)] {
        let inp = rng.vec(n * ic, 1.0);
        let w = rng.vec(oc * ic, 1.0);
        let mut out = nan(n * oc);
        be.matmul_forward(&mut out, &inp, &w, ic, oc).expect("matmul_forward");
        assert_close("matmul_forward", &out, &matmul_ref(&inp, &w, ic, oc), 1e-5, 1e-5);

        let dout = rng.vec(n * oc, 1.0);
        // dinp = dout · w, i.e. the reference product with wᵀ as the weight.
        let mut wt = vec![0.0; ic * oc];
        for o in 0..oc {
            for i in 0..ic {
                wt[i * oc + o] = w[o * ic + i];
            }
        }
        let want_dinp = matmul_ref(&dout, &wt, oc, ic);
        let mut dinp = nan(n * ic);
        be.matmul_backward_input(&mut dinp, &dout, &w, ic, oc, false).expect("matmul_backward_input");
        assert_close("matmul_backward_input overwrite", &dinp, &want_dinp, 1e-5, 1e-5);
        let base = rng.vec(n * ic, 1.0);
        let mut acc = base.clone();
        be.matmul_backward_input(&mut acc, &dout, &w, ic, oc, true).expect("matmul_backward_input acc");
        let want: Vec<f64> = want_dinp.iter().zip(&base).map(|(a, &b)| a + f64::from(b)).collect();
        assert_close("matmul_backward_input accumulate", &acc, &want, 1e-5, 1e-5);

        // dweight += doutᵀ · inp, twice from zero.
        let mut dw = vec![0.0; oc * ic];
        be.matmul_backward_weight(&mut dw, &dout, &inp, ic, oc).expect("matmul_backward_weight");
        let mut want_dw = vec![0.0f64; oc * ic];
        for o in 0..oc {
            for i in 0..ic {
                want_dw[o * ic + i] = (0..n).map(|t| f64::from(dout[t * oc + o]) * f64::from(inp[t * ic + i])).sum();
            }
        }
        assert_close("matmul_backward_weight", &dw, &want_dw, 1e-5, 1e-5);
        be.matmul_backward_weight(&mut dw, &dout, &inp, ic, oc).expect("matmul_backward_weight again");
        let twice: Vec<f64> = want_dw.iter().map(|v| 2.0 * v).collect();
        assert_close("matmul_backward_weight accumulates", &dw, &twice, 1e-5, 1e-5);

        // And the chain rule, independently of the reference formulas.
        if n * ic < 1000 {
            let mut dw = vec![0.0; oc * ic];
            be.matmul_backward_weight(&mut dw, &dout, &inp, ic, oc).expect("matmul_backward_weight");
            let fwd = |inp: &[f32], w: &[f32]| {
                let mut out = nan(n * oc);
                be.matmul_forward(&mut out, inp, w, ic, oc).expect("matmul_forward");
                proj(&dout, &out)
            };
            check_grad("matmul dinp", &inp, &dinp, &|x| fwd(x, &w), &mut rng);
            check_grad("matmul dweight", &w, &dw, &|wp| fwd(&inp, wp), &mut rng);
        }
    }
    let mut out = nan(6);
    let inp = vec![1.0; 6];
    assert!(be.matmul_forward(&mut out, &inp, &[1.0; 6], 3, 3).is_err(), "weight != OC·IC");
    assert!(be.matmul_forward_many(vec![(&mut out[..], &[1.0; 9][..], 3), (&mut [0.0; 6][..], &[1.0; 5][..], 3)], &inp, 3).is_err(), "second weight");
    assert!(be.matmul_forward(&mut out, &inp, &[1.0; 12], 4, 3).is_err(), "inp not a multiple of IC");
    assert!(be.matmul_forward(&mut out[..5], &inp, &[1.0; 9], 3, 3).is_err(), "out != N·OC");
    assert!(be.matmul_forward(&mut out, &inp, &[], 0, 3).is_err(), "zero IC");
    assert!(be.matmul_backward_input(&mut out[..4], &inp, &[1.0; 9], 3, 3, false).is_err(), "dinp length");
    let mut dw = nan(9);
    assert!(be.matmul_backward_weight(&mut dw, &inp[..5], &inp, 3, 3).is_err(), "dout length");
    assert!(be.matmul_backward_weight(&mut dw[..8], &inp, &inp, 3, 3).is_err(), "dweight length");
}

// ---------------------------------------------------------------- RoPE

fn rope_tables(p: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for pos in 0..p {
        for i in 0..half {
            let theta = pos as f64 * 10000f64.powf(-(i as f64) / half as f64);
            cos.push(theta.cos() as f32);
            sin.push(theta.sin() as f32);
        }
    }
    (cos, sin)
}

#[test]
fn rope() {
    let be = backend();
    let mut rng = Rng(5);
    let (n, heads, hd, p) = (9usize, 3usize, 10usize, 23usize);
    let half = hd / 2;
    let (cos, sin) = rope_tables(p, half);
    let positions: Vec<u32> = vec![0, 1, 2, 22, 5, 5, 0, 17, 3];
    let x = rng.vec(n * heads * hd, 1.0);
    let mut y = x.clone();
    be.rope_forward(&mut y, &cos, &sin, &positions, heads, hd).expect("rope_forward");
    let mut want = vec![0.0f64; x.len()];
    for (t, &pos) in positions.iter().enumerate() {
        let pos = pos as usize;
        for h in 0..heads {
            let base = (t * heads + h) * hd;
            for i in 0..half {
                let (c, s) = (f64::from(cos[pos * half + i]), f64::from(sin[pos * half + i]));
                let (a, b) = (f64::from(x[base + i]), f64::from(x[base + i + half]));
                want[base + i] = a * c - b * s;
                want[base + i + half] = b * c + a * s;
            }
        }
    }
    assert_close("rope_forward", &y, &want, 1e-5, 1e-6);

    // Backward: the gradient of Σ r·rope(x) w.r.t. x is rope_backward(r).
    let r = rng.vec(x.len(), 1.0);
    let mut dx = r.clone();
    be.rope_backward(&mut dx, &cos, &sin, &positions, heads, hd).expect("rope_backward");
    let fwd = |x: &[f32]| {
        let mut y = x.to_vec();
        be.rope_forward(&mut y, &cos, &sin, &positions, heads, hd).expect("rope_forward");
        proj(&r, &y)
    };
    check_grad("rope dx", &x, &dx, &fwd, &mut rng);
    // A rotation: backward undoes forward.
    be.rope_backward(&mut y, &cos, &sin, &positions, heads, hd).expect("rope_backward");
    assert_close("rope backward∘forward", &y, &f64s(&x), 1e-5, 1e-5);

    let mut y = x.clone();
    assert!(be.rope_forward(&mut y, &cos, &sin, &[0, 1, 2, 23, 5, 5, 0, 17, 3], heads, hd).is_err(), "position out of range");
    assert!(be.rope_forward(&mut y, &cos, &sin, &positions[..8], heads, hd).is_err(), "x rows != positions");
    assert!(be.rope_forward(&mut y[..9 * 3 * 9], &cos, &sin, &positions, heads, 9).is_err(), "odd head_dim");
    assert!(be.rope_forward(&mut y, &cos, &sin[..10], &positions, heads, hd).is_err(), "sin != cos");
    assert!(be.rope_backward(&mut y, &cos[..7], &sin[..7], &positions, heads, hd).is_err(), "table not a multiple of d/2");
}

// ---------------------------------------------------------------- SwiGLU

#[test]
fn swiglu() {
    let be = backend();
    let mut rng = Rng(6);
    for n in [37usize, 50_001] {
        let gate = rng.vec(n, 4.0);
        let up = rng.vec(n, 2.0);
        let mut out = nan(n);
        be.swiglu_forward(&mut out, &gate, &up).expect("swiglu_forward");
        let want: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let g = f64::from(g);
                g / (1.0 + (-g).exp()) * f64::from(u)
            })
            .collect();
        assert_close("swiglu_forward", &out, &want, 1e-5, 1e-6);
        if n > 1000 {
            continue;
        }
        let r = rng.vec(n, 1.0);
        let (mut dg, mut du) = (nan(n), nan(n));
        be.swiglu_backward(&mut dg, &mut du, &r, &gate, &up).expect("swiglu_backward");
        let fwd = |g: &[f32], u: &[f32]| {
            let mut out = nan(n);
            be.swiglu_forward(&mut out, g, u).expect("swiglu_forward");
            proj(&r, &out)
        };
        check_grad("swiglu dgate", &gate, &dg, &|g| fwd(g, &up), &mut rng);
        check_grad("swiglu dup", &up, &du, &|u| fwd(&gate, u), &mut rng);
    }
    let (mut a, mut b) = (nan(4), nan(4));
    assert!(be.swiglu_forward(&mut a, &[1.0; 4], &[1.0; 3]).is_err());
    assert!(be.swiglu_backward(&mut a, &mut b[..3], &[1.0; 4], &[1.0; 4], &[1.0; 4]).is_err());
    assert!(be.swiglu_backward(&mut a, &mut b, &[1.0; 4], &[1.0; 5], &[1.0; 4]).is_err());
}

// ---------------------------------------------------------------- attention

fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize, mask: AttnMask) -> AttnShape {
    AttnShape { n_heads, n_kv_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), mask }
}

/// Training/prefill layout: sequences of `lens` packed end to end, queries and keys at the same rows.
fn packed(lens: &[usize]) -> Vec<AttnSeq> {
    let mut start = 0;
    lens.iter()
        .map(|&len| {
            let s = AttnSeq { q_start: start, q_len: len, k_start: start, k_len: len };
            start += len;
            s
        })
        .collect()
}

/// Naive attention: the full (q_len, k_len) score matrix per sequence and head, in f64.
fn attention_ref(q: &[f32], k: &[f32], v: &[f32], seqs: &[AttnSeq], sh: &AttnShape) -> (Vec<f64>, Vec<f64>) {
    let (h, kvh, d) = (sh.n_heads, sh.n_kv_heads, sh.head_dim);
    let nq = q.len() / (h * d);
    let mut out = vec![f64::NAN; q.len()];
    let mut lse = vec![f64::NAN; nq * h];
    for s in seqs {
        for head in 0..h {
            let kv = head / (h / kvh);
            let mut scores = vec![vec![f64::NEG_INFINITY; s.k_len]; s.q_len];
            for (i, row) in scores.iter_mut().enumerate() {
                let p = s.k_len - s.q_len + i;
                for (j, sc) in row.iter_mut().enumerate() {
                    let visible = match sh.mask {
                        AttnMask::Causal { window } => j <= p && window.is_none_or(|w| p - j < w),
                        AttnMask::Bidirectional => true,
                    };
                    if visible {
                        let qi = &q[((s.q_start + i) * h + head) * d..][..d];
                        let kj = &k[((s.k_start + j) * kvh + kv) * d..][..d];
                        *sc = f64::from(sh.scale) * qi.iter().zip(kj).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
                    }
                }
            }
            for (i, row) in scores.iter().enumerate() {
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|&x| (x - max).exp()).sum();
                let t = s.q_start + i;
                lse[t * h + head] = max + sum.ln();
                for c in 0..d {
                    out[(t * h + head) * d + c] = row
                        .iter()
                        .enumerate()
                        .map(|(j, &x)| (x - max).exp() / sum * f64::from(v[((s.k_start + j) * kvh + kv) * d + c]))
                        .sum();
                }
            }
        }
    }
    (out, lse)
}

fn check_attention_forward(name: &str, be: &CpuBackend, rng: &mut Rng, nq: usize, nk: usize, seqs: &[AttnSeq], sh: &AttnShape) {
    let (h, kvh, d) = (sh.n_heads, sh.n_kv_heads, sh.head_dim);
    let q = rng.vec(nq * h * d, 2.0);
    let k = rng.vec(nk * kvh * d, 2.0);
    let v = rng.vec(nk * kvh * d, 1.0);
    let (mut out, mut lse) = (nan(q.len()), nan(nq * h));
    be.attention_forward(&mut out, &mut lse, &q, &k, &v, seqs, sh).expect(name);
    let (want, want_lse) = attention_ref(&q, &k, &v, seqs, sh);
    assert_close(&format!("{name} out"), &out, &want, 1e-4, 1e-5);
    assert_close(&format!("{name} lse"), &lse, &want_lse, 1e-5, 1e-5);
}

#[test]
fn attention_forward() {
    let be = backend();
    let mut rng = Rng(7);
    let lens = [5usize, 1, 11, 8];
    let n: usize = lens.iter().sum();
    let seqs = packed(&lens);
    let masks = [
        ("causal", AttnMask::Causal { window: None }),
        ("window 3", AttnMask::Causal { window: Some(3) }),
        ("window 1", AttnMask::Causal { window: Some(1) }),
        ("window 100", AttnMask::Causal { window: Some(100) }),
        ("bidirectional", AttnMask::Bidirectional),
    ];
    for (heads, kv, what) in [(4usize, 4usize, "MHA"), (4, 2, "GQA 4:2"), (4, 1, "MQA 4:1")] {
        for (mname, mask) in masks {
            for d in [6usize, 16] {
                let sh = shape(heads, kv, d, mask);
                check_attention_forward(&format!("attention {what} {mname} d{d}"), &be, &mut rng, n, n, &seqs, &sh);
            }
        }
    }

    // Long sequences (>= 16 queries) take the blocked gemm path, in blocks of 64 queries: several
    // blocks, a partial last block, and a short sequence (per-row path) in the same call.
    let lens = [70usize, 16, 130, 3];
    let n: usize = lens.iter().sum();
    let seqs = packed(&lens);
    for (mname, mask) in [masks[0], ("window 20", AttnMask::Causal { window: Some(20) }), masks[4]] {
        for (heads, kv) in [(4usize, 2usize), (3, 3)] {
            let sh = shape(heads, kv, 8, mask);
            check_attention_forward(&format!("attention blocked {heads}:{kv} {mname}"), &be, &mut rng, n, n, &seqs, &sh);
        }
    }
    // Prefill against a cache: 20 new queries after 70 cached keys, and a per-row sequence beside it.
    let seqs = [AttnSeq { q_start: 0, q_len: 20, k_start: 5, k_len: 90 }, AttnSeq { q_start: 20, q_len: 2, k_start: 95, k_len: 4 }];
    for (mname, mask) in [masks[0], ("window 30", AttnMask::Causal { window: Some(30) })] {
        let sh = shape(4, 2, 8, mask);
        check_attention_forward(&format!("attention blocked cache {mname}"), &be, &mut rng, 22, 99, &seqs, &sh);
    }

    // Decode layout: q_len 1 and 3 against longer key caches in another buffer, listed out of order.
    let seqs = [
        AttnSeq { q_start: 1, q_len: 3, k_start: 9, k_len: 5 },
        AttnSeq { q_start: 0, q_len: 1, k_start: 0, k_len: 9 },
        AttnSeq { q_start: 4, q_len: 1, k_start: 14, k_len: 12 },
    ];
    for (mname, mask) in [("causal", AttnMask::Causal { window: None }), ("window 4", AttnMask::Causal { window: Some(4) })] {
        for (heads, kv) in [(4usize, 2usize), (2, 2), (3, 1)] {
            let sh = shape(heads, kv, 10, mask);
            check_attention_forward(&format!("attention decode {heads}:{kv} {mname}"), &be, &mut rng, 5, 26, &seqs, &sh);
        }
    }
}

#[test]
fn attention_backward() {
    let be = backend();
    let mut rng = Rng(8);
    // Short sequences (per-row path), then long ones (blocked gemm path: several 64-query blocks,
    // a partial one, and a short sequence beside them).
    let short = [5usize, 1, 11, 8];
    let long = [70usize, 16, 90, 3];
    let cases = [
        (&short[..], 4usize, 2usize, 6usize, AttnMask::Causal { window: None }),
        (&short[..], 4, 1, 10, AttnMask::Causal { window: Some(3) }),
        (&short[..], 3, 3, 8, AttnMask::Bidirectional),
        (&long[..], 4, 2, 6, AttnMask::Causal { window: None }),
        (&long[..], 2, 1, 8, AttnMask::Causal { window: Some(20) }),
        (&long[..], 3, 3, 4, AttnMask::Bidirectional),
    ];
    for (lens, heads, kv, d, mask) in cases {
        let n: usize = lens.iter().sum();
        let seqs = packed(lens);
        let name = format!("attention_backward {lens:?} {heads}:{kv} d{d} {mask:?}");
        let sh = shape(heads, kv, d, mask);
        let q = rng.vec(n * heads * d, 2.0);
        let k = rng.vec(n * kv * d, 2.0);
        let v = rng.vec(n * kv * d, 1.0);
        let (mut out, mut lse) = (nan(q.len()), nan(n * heads));
        be.attention_forward(&mut out, &mut lse, &q, &k, &v, &seqs, &sh).expect("attention_forward");
        let r = rng.vec(q.len(), 1.0);
        let (mut dq, mut dk, mut dv) = (nan(q.len()), nan(k.len()), nan(v.len()));
        be.attention_backward(&mut dq, &mut dk, &mut dv, &r, &q, &k, &v, &out, &lse, &seqs, &sh).expect(&name);
        let fwd = |q: &[f32], k: &[f32], v: &[f32]| {
            let (mut out, mut lse) = (nan(q.len()), nan(n * heads));
            be.attention_forward(&mut out, &mut lse, q, k, v, &seqs, &sh).expect("attention_forward");
            proj(&r, &out)
        };
        check_grad(&format!("{name} dq"), &q, &dq, &|x| fwd(x, &k, &v), &mut rng);
        check_grad(&format!("{name} dk"), &k, &dk, &|x| fwd(&q, x, &v), &mut rng);
        check_grad(&format!("{name} dv"), &v, &dv, &|x| fwd(&q, &k, x), &mut rng);

        // Overwrite semantics: a second call on the results gives the same values.
        let (mut dq2, mut dk2, mut dv2) = (dq.clone(), dk.clone(), dv.clone());
        be.attention_backward(&mut dq2, &mut dk2, &mut dv2, &r, &q, &k, &v, &out, &lse, &seqs, &sh).expect(&name);
        assert_close("attention dq overwritten", &dq2, &f64s(&dq), 0.0, 0.0);
        assert_close("attention dk overwritten", &dk2, &f64s(&dk), 0.0, 0.0);
        assert_close("attention dv overwritten", &dv2, &f64s(&dv), 0.0, 0.0);
    }
}

#[test]
fn attention_bad_shapes() {
    let be = backend();
    let causal = AttnMask::Causal { window: None };
    let (n, h, kvh, d) = (6usize, 4usize, 2usize, 4usize);
    let q = vec![0.1; n * h * d];
    let k = vec![0.1; n * kvh * d];
    let (mut out, mut lse) = (nan(q.len()), nan(n * h));
    let ok = packed(&[2, 4]);
    let sh = shape(h, kvh, d, causal);
    assert!(be.attention_forward(&mut out, &mut lse, &q, &k, &k, &ok, &sh).is_ok());
    let bad_seqs: [&[AttnSeq]; 4] = [
        &[AttnSeq { q_start: 2, q_len: 5, k_start: 2, k_len: 5 }],
        &[AttnSeq { q_start: 0, q_len: 2, k_start: 5, k_len: 2 }],
        &[AttnSeq { q_start: 0, q_len: 3, k_start: 0, k_len: 2 }],
        &[AttnSeq { q_start: 0, q_len: 3, k_start: 0, k_len: 3 }, AttnSeq { q_start: 2, q_len: 2, k_start: 3, k_len: 2 }],
    ];
    for seqs in bad_seqs {
        assert!(be.attention_forward(&mut out, &mut lse, &q, &k, &k, seqs, &sh).is_err(), "{seqs:?}");
        let (mut dq, mut dk, mut dv) = (nan(q.len()), nan(k.len()), nan(k.len()));
        assert!(be.attention_backward(&mut dq, &mut dk, &mut dv, &q, &q, &k, &k, &q, &lse, seqs, &sh).is_err(), "{seqs:?}");
    }
    assert!(be.attention_forward(&mut out, &mut lse, &q, &k, &k, &ok, &shape(4, 3, d, causal)).is_err(), "heads % kv");
    assert!(be.attention_forward(&mut out, &mut lse, &q, &k, &k, &ok, &shape(4, 0, d, causal)).is_err(), "zero kv heads");
    let win0 = shape(h, kvh, d, AttnMask::Causal { window: Some(0) });
    assert!(be.attention_forward(&mut out, &mut lse, &q, &k, &k, &ok, &win0).is_err(), "window 0");
    assert!(be.attention_forward(&mut out, &mut lse[..5], &q, &k, &k, &ok, &sh).is_err(), "lse length");
    assert!(be.attention_forward(&mut out[..8], &mut lse, &q, &k, &k, &ok, &sh).is_err(), "out length");
    assert!(be.attention_forward(&mut out, &mut lse, &q, &k, &k[..8], &ok, &sh).is_err(), "v length");
    assert!(be.attention_forward(&mut out, &mut lse, &q[..5], &k, &k, &ok, &sh).is_err(), "q not whole rows");
    let (mut dq, mut dk, mut dv) = (nan(q.len()), nan(k.len()), nan(k.len()));
    assert!(be.attention_backward(&mut dq, &mut dk[..8], &mut dv, &q, &q, &k, &k, &q, &lse, &ok, &sh).is_err(), "dk length");
    assert!(be.attention_backward(&mut dq, &mut dk, &mut dv, &q[..8], &q, &k, &k, &q, &lse, &ok, &sh).is_err(), "dout length");
}

// ---------------------------------------------------------------- LM head log-probs

/// Full logits and log-softmax in f64; masked rows give (0, 0).
fn logprobs_ref(hidden: &[f32], w: &[f32], targets: &[i32], dim: usize, vocab: usize) -> (Vec<f64>, Vec<f64>) {
    let logits = matmul_ref(hidden, w, dim, vocab);
    let mut logp = Vec::new();
    let mut lse = Vec::new();
    for (row, &t) in logits.chunks(vocab).zip(targets) {
        if t < 0 {
            logp.push(0.0);
            lse.push(0.0);
            continue;
        }
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        logp.push(row[t as usize] - l);
        lse.push(l);
    }
    (logp, lse)
}

#[test]
fn token_logprobs() {
    let be = backend();
    let mut rng = Rng(9);
    // 150 rows, about a third masked: active rows span three 64-row chunks.
    for (n, dim, vocab) in [(7usize, 5usize, 13usize), (150, 48, 1000)] {
        let hidden = rng.vec(n * dim, 1.0);
        let w = rng.vec(vocab * dim, 0.5);
        let targets: Vec<i32> = (0..n).map(|_| if rng.below(3) == 0 { IGNORE_TARGET } else { rng.below(vocab) as i32 }).collect();
        assert!(targets.iter().any(|&t| t < 0) && targets.iter().any(|&t| t >= 0));
        let (mut logp, mut lse) = (nan(n), nan(n));
        be.token_logprobs_forward(&mut logp, &mut lse, &hidden, &w, &targets, dim, vocab).expect("token_logprobs_forward");
        let (want, want_lse) = logprobs_ref(&hidden, &w, &targets, dim, vocab);
        assert_close("token_logprobs_forward logp", &logp, &want, 1e-5, 1e-5);
        assert_close("token_logprobs_forward lse", &lse, &want_lse, 1e-5, 1e-5);

        // dlogp of masked rows must be ignored: NaN there.
        let r: Vec<f32> = targets.iter().map(|&t| if t < 0 { 0.0 } else { rng.uniform() }).collect();
        let dlogp: Vec<f32> = r.iter().zip(&targets).map(|(&r, &t)| if t < 0 { f32::NAN } else { r }).collect();
        let (mut dh, mut dw) = (nan(n * dim), vec![0.0; vocab * dim]);
        be.token_logprobs_backward(&mut dh, &mut dw, &dlogp, &hidden, &w, &lse, &targets, dim, vocab).expect("token_logprobs_backward");
        for (t, &tg) in targets.iter().enumerate() {
            if tg < 0 {
                assert!(dh[t * dim..(t + 1) * dim].iter().all(|&g| g == 0.0), "masked row {t} has a nonzero dhidden");
            }
        }
        let fwd = |h: &[f32], w: &[f32]| {
            let (mut logp, mut lse) = (nan(n), nan(n));
            be.token_logprobs_forward(&mut logp, &mut lse, h, w, &targets, dim, vocab).expect("token_logprobs_forward");
            proj(&r, &logp)
        };
        check_grad("token_logprobs dhidden", &hidden, &dh, &|h| fwd(h, &w), &mut rng);
        check_grad("token_logprobs dweight", &w, &dw, &|wp| fwd(&hidden, wp), &mut rng);

        // dweight accumulates; dhidden is overwritten.
        let mut dh2 = rng.vec(n * dim, 1.0);
        let mut dw2 = dw.clone();
        be.token_logprobs_backward(&mut dh2, &mut dw2, &dlogp, &hidden, &w, &lse, &targets, dim, vocab).expect("again");
        assert_close("token_logprobs dhidden overwritten", &dh2, &f64s(&dh), 1e-6, 1e-7);
        assert_close("token_logprobs dweight accumulates", &dw2, &dw.iter().map(|&v| 2.0 * f64::from(v)).collect::<Vec<_>>(), 1e-5, 1e-7);
    }

    // All rows masked: zeros out, no gradient.
    let (mut logp, mut lse) = (nan(2), nan(2));
    be.token_logprobs_forward(&mut logp, &mut lse, &[1.0; 6], &[1.0; 12], &[-1, -1], 3, 4).expect("all masked");
    assert_eq!((logp, lse), (vec![0.0; 2], vec![0.0; 2]));

    let (mut logp, mut lse) = (nan(2), nan(2));
    let (h, w) = (vec![0.5; 6], vec![0.5; 12]);
    assert!(be.token_logprobs_forward(&mut logp, &mut lse, &h, &w, &[0, 4], 3, 4).is_err(), "target >= vocab");
    assert!(be.token_logprobs_forward(&mut logp, &mut lse, &h, &w, &[0], 3, 4).is_err(), "targets != rows");
    assert!(be.token_logprobs_forward(&mut logp, &mut lse, &h, &w[..9], &[0, 1], 3, 4).is_err(), "weight != V·C");
    assert!(be.token_logprobs_forward(&mut logp[..1], &mut lse, &h, &w, &[0, 1], 3, 4).is_err(), "logp length");
    let (mut dh, mut dw) = (nan(6), nan(12));
    assert!(be.token_logprobs_backward(&mut dh, &mut dw, &[1.0; 2], &h, &w, &lse, &[0, 4], 3, 4).is_err(), "target >= vocab");
    assert!(be.token_logprobs_backward(&mut dh, &mut dw[..8], &[1.0; 2], &h, &w, &lse, &[0, 1], 3, 4).is_err(), "dweight length");
    assert!(be.token_logprobs_backward(&mut dh, &mut dw, &[1.0; 2], &h, &w, &lse[..1], &[0, 1], 3, 4).is_err(), "lse length");
}
