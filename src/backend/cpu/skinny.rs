//! `out (n, OC) = inp (n, IC) · weightᵀ` for a few rows n (decoding: one row per sequence), with
//! the weight streamed from memory once.
//!
//! `gemm` packs the whole weight matrix on every call, so a decode-step product reads the weights
//! about twice; for a few rows the product is bound by that traffic (a SmolLM2-135M decode step
//! reads 540 MB of f32 weights), not by arithmetic. Here each 8-float piece of a weight row is
//! loaded once and multiplied into a group of input rows (L1-resident), a few weight rows at a time,
//! the weight read as one sequential stream prefetched a few rows ahead.
//!
//! The weight is f32 or a bf16 copy ([`Weights`]): the CPU backend keeps a bf16 copy of the
//! parameters while generating when that copy is exact (every value representable in bf16, as in
//! a bf16 checkpoint) or when asked to round (`super::decode`); then every product of the
//! generation comes here, prefill included, in tasks of weight rows that stay in L2 while each
//! group of inputs passes over them.
//!
//! Kernels ([`Kernel`], picked at run time): the x86-64 one compiled for AVX-512VL (32 registers:
//! groups of 8 inputs) and for AVX2 + FMA (16 registers: groups of 4), bitwise equal, and
//! `rowwise_portable` (any target). All sum each dot product as 8 interleaved lanes then the
//! lanes, so they differ from `gemm` (and the x86 ones from the portable one, FMA vs. separate
//! rounding) only by f32 rounding. `cargo bench --bench cpu_decode` measures them against the
//! machine's memory-read ceiling.

use rayon::prelude::*;

/// A weight matrix (OC, IC) as the kernels read it.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns; value = f32::from_bits(bits << 16).
    Bf16(&'a [u16]),
}

impl<'a> Weights<'a> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }

    fn rows(&self, start: usize, end: usize, in_dim: usize) -> Weights<'a> {
        match *self {
            Weights::F32(w) => Weights::F32(&w[start * in_dim..end * in_dim]),
            Weights::Bf16(w) => Weights::Bf16(&w[start * in_dim..end * in_dim]),
        }
    }
}

/// Fewest weight rows per rayon task.
const MIN_ROWS_PER_TASK: usize = 16;
/// Tasks per worker thread: a few, so that one slow thread does not idle the others, and equal
/// in size, so that a product of 192 rows (a K projection) splits evenly over the workers.
const TASKS_PER_THREAD: usize = 4;

/// Bytes of weight rows a task keeps hot in L2 while it runs every group of inputs over them.
const L2_BLOCK_BYTES: usize = 192 << 10;

/// Weight rows per task for `out_dim` rows (every product of the pass) of `row_bytes` over
/// `threads` workers and `n` inputs in groups of `group`: with more than one group, few enough
/// rows that they stay in L2 between groups.
fn rows_per_task(out_dim: usize, row_bytes: usize, threads: usize, n: usize, group: usize) -> usize {
    let mut rows = out_dim.div_ceil(threads.max(1) * TASKS_PER_THREAD);
    if n > group {
        rows = rows.min(L2_BLOCK_BYTES / row_bytes.max(1));
    }
    rows.max(MIN_ROWS_PER_TASK)
}

/// out (n, OC) = inp (n, IC) · weightᵀ (weight (OC, IC)); shapes are checked by the caller.
/// `threads` > 1 splits the weight rows over the current rayon pool.
#[cfg(test)]
fn forward(out: &mut [f32], inp: &[f32], weight: Weights<'_>, n: usize, in_dim: usize, out_dim: usize, threads: usize) {
    forward_many(vec![Product { out, weight, out_dim }], inp, n, in_dim, threads, kernel())
}

/// One product of [`forward_many`]: out (n, out_dim) = inp · weightᵀ.
pub(super) struct Product<'a> {
    pub out: &'a mut [f32],
    pub weight: Weights<'a>,
    pub out_dim: usize,
}

/// Products of one input (n, IC) (a single one, or Q/K/V, or gate/up) as one pass: the input is
/// packed once and the weight rows of every product are split into the tasks of one parallel
/// region, so the weight stream does not stop between products. Shapes are checked by the
/// caller; `threads` > 1 splits the tasks over the current rayon pool. Each output is the same
/// whichever products share the pass.
pub(super) fn forward_many(products: Vec<Product<'_>>, inp: &[f32], n: usize, in_dim: usize, threads: usize, kernel: Kernel) {
    debug_assert!(inp.len() == n * in_dim);
    debug_assert!(products.iter().all(|p| p.weight.len() == p.out_dim * in_dim && p.out.len() == n * p.out_dim));
    let total: usize = products.iter().map(|p| p.out_dim).sum();
    if n == 0 || total == 0 {
        return;
    }
    // The tasks write (weight row, input row) tiles: each out transposed, (OC, n), one after the
    // other in one buffer, then transposed back. Both buffers are the thread's, reused: a decode
    // step makes ~150 passes (the LM head's buffer alone is 1.5 MB at batch 8). `take` leaves an
    // empty buffer, so a pass nested in another on the same thread simply allocates its own.
    let (mut out_t, mut packed) = (OUT_T.take(), PACKED.take());
    out_t.clear();
    out_t.resize(total * n, 0.0);
    let group = group_size(in_dim, kernel);
    pack(&mut packed, inp, n, in_dim, group);
    let mut tasks = Vec::new();
    let mut rest = &mut out_t[..];
    for p in &products {
        let row_bytes = in_dim * if matches!(p.weight, Weights::F32(_)) { 4 } else { 2 };
        let rows = rows_per_task(total, row_bytes, threads, n, group).min(p.out_dim).max(1);
        let (mine, tail) = rest.split_at_mut(p.out_dim * n);
        rest = tail;
        for (i, o) in mine.chunks_mut(rows * n).enumerate() {
            let first = i * rows;
            let w = p.weight.rows(first, first + o.len() / n, in_dim);
            tasks.push((o, w));
        }
    }
    let task = |(o, w): (&mut [f32], Weights<'_>)| tile(o, inp, &packed, w, n, in_dim, kernel, group);
    if threads > 1 && tasks.len() > 1 {
        tasks.into_par_iter().for_each(task);
    } else {
        tasks.into_iter().for_each(task);
    }
    let mut start = 0;
    for p in products {
        for (o, row) in out_t[start * n..(start + p.out_dim) * n].chunks_exact(n).enumerate() {
            for (r, &x) in row.iter().enumerate() {
                p.out[r * p.out_dim + o] = x;
            }
        }
        start += p.out_dim;
    }
    OUT_T.set(out_t);
    PACKED.set(packed);
}

thread_local! {
    /// [`forward_many`]'s buffers, kept between passes.
    static OUT_T: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The kernel for this CPU, picked at run time. Both x86 kernels compute every dot product in the
/// same order (8 lanes, FMA, then the lanes), so they give the same bits; they differ in how many
/// accumulators fit in the vector registers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kernel {
    /// AVX-512VL: 32 vector registers (used at 256 bits), 2 weight rows × 8 inputs of accumulators.
    Avx512,
    /// AVX2 + FMA: 16 registers, 3 weight rows × 4 inputs.
    Avx2,
    /// Any target: [`rowwise_portable`].
    Portable,
}

/// The fastest kernel this CPU runs.
fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            return if has!("avx512f") && has!("avx512vl") { Kernel::Avx512 } else { Kernel::Avx2 };
        }
    }
    Kernel::Portable
}

/// The environment variable that picks the kernel by name (experiments and benchmarks, e.g. the
/// AVX2 kernel on an AVX-512 machine): `avx512`, `avx2` or `portable`; unset: [`kernel`].
pub const KERNEL_ENV: &str = "SPPO_CPU_SKINNY";

/// The kernel to run: [`KERNEL_ENV`]'s, checked against this CPU, else [`kernel`]. Read once.
pub(super) fn chosen_kernel() -> anyhow::Result<Kernel> {
    static CHOICE: std::sync::OnceLock<Result<Kernel, String>> = std::sync::OnceLock::new();
    let choice = CHOICE.get_or_init(|| {
        let Ok(name) = std::env::var(KERNEL_ENV) else { return Ok(kernel()) };
        let wanted = match name.trim() {
            "avx512" => Kernel::Avx512,
            "avx2" => Kernel::Avx2,
            "portable" => Kernel::Portable,
            other => return Err(format!("{KERNEL_ENV}={other:?} is not a skinny kernel (avx512, avx2, portable)")),
        };
        let supported = match kernel() {
            Kernel::Avx512 => true,
            Kernel::Avx2 => wanted != Kernel::Avx512,
            Kernel::Portable => wanted == Kernel::Portable,
        };
        if supported {
            Ok(wanted)
        } else {
            Err(format!("{KERNEL_ENV}={name}: this CPU runs at most the {:?} kernel", kernel()))
        }
    });
    choice.clone().map_err(anyhow::Error::msg)
}

/// Bytes of packed inputs a group may keep in L1 (32 KiB here, shared with the weight stream).
const L1_INPUT_BYTES: usize = 24 << 10;

/// Input rows per group for rows of `in_dim`: as many as the kernel has accumulators for (8 or
/// 4), halved while the packed group would not stay in L1 (the down projection: 8 × 1536 floats
/// = 48 KiB; read from L2 at every step, the kernel ran at half speed). The next group then
/// reads the task's weight rows from L2 (`rows_per_task`). Each dot product is summed in the same
/// order whatever the group size.
fn group_size(in_dim: usize, kernel: Kernel) -> usize {
    let mut group = if kernel == Kernel::Avx512 { 8 } else { 4 };
    while group > 1 && group * in_dim * 4 > L1_INPUT_BYTES {
        group /= 2;
    }
    group
}

/// The inputs for the x86 kernels: rows in groups of `group` ([`group_size`]), each group
/// interleaved by 8-float piece, (IC/8, G, 8), so that the G loads of a step sit at constant
/// offsets from one pointer (addressed as `x + g * in_dim + k`, the compiler chains one add per
/// row and serialises the loop). Group j starts at `j * group * body`; the tails past `body` are
/// read from `inp`.
fn pack(packed: &mut Vec<f32>, inp: &[f32], n: usize, in_dim: usize, group: usize) {
    let body = in_dim - in_dim % LANES;
    packed.clear();
    packed.resize(n * body, 0.0);
    for (j, rows) in inp.chunks(group * in_dim).enumerate() {
        let g_n = rows.len() / in_dim;
        let dst = &mut packed[j * group * body..];
        for (g, row) in rows.chunks_exact(in_dim).enumerate() {
            for (c, piece) in row[..body].chunks_exact(LANES).enumerate() {
                dst[(c * g_n + g) * LANES..(c * g_n + g + 1) * LANES].copy_from_slice(piece);
            }
        }
    }
}

/// out_t (W, n) = weight (W, IC) · inpᵀ for a block of W weight rows (`packed`: `pack(inp)` in
/// groups of `group`, which is `group_size(in_dim, kernel)`).
#[allow(clippy::too_many_arguments)]
fn tile(out_t: &mut [f32], inp: &[f32], packed: &[f32], weight: Weights<'_>, n: usize, in_dim: usize, kernel: Kernel, group: usize) {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: `kernel()` found AVX-512F/VL, AVX2 and FMA.
        Kernel::Avx512 => return unsafe { avx512::rowwise(out_t, inp, packed, weight, n, in_dim, group) },
        // SAFETY: `kernel()` found AVX2 and FMA.
        Kernel::Avx2 => return unsafe { avx2::rowwise(out_t, inp, packed, weight, n, in_dim, group) },
        Kernel::Portable => {}
    }
    let _ = (packed, group);
    rowwise_portable(out_t, inp, weight, n, in_dim)
}

/// Lanes of the interleaved dot products (one AVX register of f32).
const LANES: usize = 8;

/// The portable kernel: each dot product kept as 8 lane sums, as the x86 kernels do.
pub(super) fn rowwise_portable(out_t: &mut [f32], inp: &[f32], weight: Weights<'_>, n: usize, in_dim: usize) {
    let body = in_dim - in_dim % LANES;
    let mut w = vec![0.0f32; in_dim];
    for (o, out) in out_t.chunks_exact_mut(n).enumerate() {
        match weight {
            Weights::F32(src) => w.copy_from_slice(&src[o * in_dim..(o + 1) * in_dim]),
            Weights::Bf16(src) => {
                for (d, &b) in w.iter_mut().zip(&src[o * in_dim..(o + 1) * in_dim]) {
                    *d = f32::from_bits(u32::from(b) << 16);
                }
            }
        }
        for (x, o) in inp.chunks_exact(in_dim).zip(out.iter_mut()) {
            let mut acc = [0.0f32; LANES];
            for (wc, xc) in w[..body].chunks_exact(LANES).zip(x[..body].chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] += wc[l] * xc[l];
                }
            }
            let tail: f32 = w[body..].iter().zip(&x[body..]).map(|(a, b)| a * b).sum();
            *o = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// A weight element type the x86 kernels read: 8 consecutive elements as 8 f32 lanes.
#[cfg(target_arch = "x86_64")]
trait WeightElem: Copy {
    /// Elements per 64-byte cache line.
    const PER_LINE: usize;
    /// # Safety
    /// AVX2 available; `p..p + 8` readable.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    fn to_f32(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl WeightElem for f32 {
    const PER_LINE: usize = 16;
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    fn to_f32(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "x86_64")]
impl WeightElem for u16 {
    const PER_LINE: usize = 32;
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 → f32 is exact: the 16 bits become the top half of the f32.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
}

/// Weight rows ahead of the current one that the kernels prefetch into L2: the stream must be
/// requested early, the hardware prefetcher alone leaves the cores waiting on memory.
const PREFETCH_ROWS: usize = 4;

/// The x86 kernel, compiled once per target feature set (`$features`), with groups of up to
/// `$max_group` inputs and `$rows` weight rows per block: AVX-512VL's 32 registers hold 2 × 8
/// accumulators and the loaded pieces, AVX2's 16 hold 3 × 4 (measured: 5% faster than 2 × 4 at
/// f32 on two cores).
macro_rules! x86_kernel {
    ($module:ident, $features:literal, $max_group:literal, $rows:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::{Weights, WeightElem, LANES, PREFETCH_ROWS};
            use std::arch::x86_64::*;

            /// Input rows in groups of `group` (the packing's, at most
            #[doc = stringify!($max_group)]
            /// ), each group over every weight row, weight rows in blocks.
            ///
            /// # Safety
            /// The CPU must support
            #[doc = $features]
            /// Slices must hold (W, IC), (n, IC) and (W, n) elements; `packed` is `pack(inp)`.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn rowwise(out_t: &mut [f32], inp: &[f32], packed: &[f32], weight: Weights<'_>, n: usize, in_dim: usize, group: usize) {
                match weight {
                    Weights::F32(w) => typed(out_t, inp, packed, w, n, in_dim, group),
                    Weights::Bf16(w) => typed(out_t, inp, packed, w, n, in_dim, group),
                }
            }

            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn typed<W: WeightElem>(out_t: &mut [f32], inp: &[f32], packed: &[f32], weight: &[W], n: usize, in_dim: usize, group: usize) {
                let rows_w = out_t.len() / n.max(1);
                let body = in_dim - in_dim % LANES;
                assert!(weight.len() >= rows_w * in_dim && inp.len() >= n * in_dim && out_t.len() == rows_w * n && packed.len() == n * body);
                assert!((1..=$max_group).contains(&group), "group {group}");
                let mut r = 0;
                while r < n {
                    let g = (n - r).min(group);
                    let x = &inp[r * in_dim..(r + g) * in_dim];
                    let p = &packed[r * body..(r + g) * body];
                    let o = &mut *out_t;
                    match g {
                        8 => rows::<8, W>(o, x, p, weight, n, r, in_dim, rows_w),
                        7 => rows::<7, W>(o, x, p, weight, n, r, in_dim, rows_w),
                        6 => rows::<6, W>(o, x, p, weight, n, r, in_dim, rows_w),
                        5 => rows::<5, W>(o, x, p, weight, n, r, in_dim, rows_w),
                        4 => rows::<4, W>(o, x, p, weight, n, r, in_dim, rows_w),
                        3 => rows::<3, W>(o, x, p, weight, n, r, in_dim, rows_w),
                        2 => rows::<2, W>(o, x, p, weight, n, r, in_dim, rows_w),
                        _ => rows::<1, W>(o, x, p, weight, n, r, in_dim, rows_w),
                    }
                    r += g;
                }
            }

            /// out_t[o, r0 + g] for the G input rows `x` (G, IC) and every weight row o: weight
            /// rows in blocks, so that each input piece loaded feeds several FMAs (at one load
            /// per FMA the loads bound the kernel), then the last rows one by one.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn rows<const G: usize, W: WeightElem>(
                out_t: &mut [f32],
                x: &[f32],
                packed: &[f32],
                weight: &[W],
                n: usize,
                r0: usize,
                in_dim: usize,
                rows_w: usize,
            ) {
                let body = in_dim - in_dim % LANES;
                assert!(x.len() == G * in_dim && packed.len() == G * body && weight.len() >= rows_w * in_dim && out_t.len() >= rows_w * n && r0 + G <= n);
                let mut o = 0;
                while o + $rows <= rows_w {
                    block::<G, $rows, W>(out_t, x, packed, weight, n, r0, in_dim, o);
                    o += $rows;
                }
                while o < rows_w {
                    block::<G, 1, W>(out_t, x, packed, weight, n, r0, in_dim, o);
                    o += 1;
                }
            }

            /// out_t[o0 + r, r0 + g] for r < R, g < G (bounds asserted by `rows`).
            #[target_feature(enable = $features)]
            #[inline]
            #[allow(clippy::too_many_arguments)]
            unsafe fn block<const G: usize, const R: usize, W: WeightElem>(
                out_t: &mut [f32],
                x: &[f32],
                packed: &[f32],
                weight: &[W],
                n: usize,
                r0: usize,
                in_dim: usize,
                o0: usize,
            ) {
                let body = in_dim - in_dim % LANES;
                let xp = packed.as_ptr();
                let rows: [*const W; R] = std::array::from_fn(|r| weight.as_ptr().add((o0 + r) * in_dim));
                let mut acc = [[_mm256_setzero_ps(); G]; R];
                let mut k = 0;
                while k < body {
                    if k % W::PER_LINE == 0 {
                        for row in rows {
                            // Prefetches never fault, so addresses past the slice (last rows)
                            // are harmless; `wrapping_add` keeps the arithmetic defined.
                            _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(PREFETCH_ROWS * in_dim + k) as *const i8);
                        }
                    }
                    // SAFETY (loads): k + 8 <= body <= in_dim, rows inside the asserted lengths.
                    let wv: [__m256; R] = std::array::from_fn(|r| W::load8(rows[r].add(k)));
                    let xk = xp.add(k * G);
                    for g in 0..G {
                        let xv = _mm256_loadu_ps(xk.add(g * LANES));
                        for r in 0..R {
                            acc[r][g] = _mm256_fmadd_ps(wv[r], xv, acc[r][g]);
                        }
                    }
                    k += LANES;
                }
                for (r, acc) in acc.iter().enumerate() {
                    let o = o0 + r;
                    let mut sums = [0.0f32; G];
                    for (g, a) in acc.iter().enumerate() {
                        let mut lanes = [0.0f32; LANES];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                        sums[g] = lanes.iter().sum::<f32>();
                    }
                    if body < in_dim {
                        let w_tail = &weight[o * in_dim + body..(o + 1) * in_dim];
                        for (g, sum) in sums.iter_mut().enumerate() {
                            let x_tail = &x[g * in_dim + body..(g + 1) * in_dim];
                            *sum += w_tail.iter().zip(x_tail).map(|(a, b)| a.to_f32() * b).sum::<f32>();
                        }
                    }
                    out_t[o * n + r0..o * n + r0 + G].copy_from_slice(&sums);
                }
            }
        }
    };
}

x86_kernel!(avx512, "avx2,fma,avx512f,avx512vl", 8, 2);
x86_kernel!(avx2, "avx2,fma", 4, 3);

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// out (n, OC) in f64 from the definition.
    fn reference(inp: &[f32], w: &[f32], n: usize, ic: usize, oc: usize) -> Vec<f64> {
        let mut out = vec![0.0; n * oc];
        for r in 0..n {
            for o in 0..oc {
                out[r * oc + o] = (0..ic).map(|k| f64::from(inp[r * ic + k]) * f64::from(w[o * ic + k])).sum();
            }
        }
        out
    }

    /// out (n, OC) by one kernel, single-threaded.
    fn product_with(kernel: Kernel, inp: &[f32], w: Weights<'_>, n: usize, ic: usize, oc: usize) -> Vec<f32> {
        let group = group_size(ic, kernel);
        let mut packed = Vec::new();
        pack(&mut packed, inp, n, ic, group);
        let mut out_t = vec![f32::NAN; oc * n];
        tile(&mut out_t, inp, &packed, w, n, ic, kernel, group);
        (0..n * oc).map(|i| out_t[(i % oc) * n + i / oc]).collect()
    }

    /// The kernels this CPU can run.
    fn kernels() -> Vec<Kernel> {
        match kernel() {
            Kernel::Avx512 => vec![Kernel::Avx512, Kernel::Avx2, Kernel::Portable],
            Kernel::Avx2 => vec![Kernel::Avx2, Kernel::Portable],
            Kernel::Portable => vec![Kernel::Portable],
        }
    }

    /// The x86 kernels give the same bits (the same sums in the same order), whatever their group
    /// size, through every remainder path: odd weight rows (pairs), n not a multiple of the
    /// group, IC not a multiple of 8, f32 and bf16 weights.
    #[test]
    fn x86_kernels_agree_bitwise() {
        let x86: Vec<Kernel> = kernels().into_iter().filter(|&k| k != Kernel::Portable).collect();
        if x86.len() < 2 {
            eprintln!("skipped: this CPU runs only {x86:?} (no second x86 kernel to compare)");
            return;
        }
        for &(n, ic, oc) in &[(1, 8, 3), (3, 17, 7), (8, 576, 33), (13, 100, 9), (5, 1536, 5), (11, 1000, 4)] {
            let inp = data(n * ic, 3);
            let w = data(oc * ic, 4);
            let bits: Vec<u16> = w.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            for weights in [Weights::F32(&w), Weights::Bf16(&bits)] {
                let a = product_with(x86[0], &inp, weights, n, ic, oc);
                let b = product_with(x86[1], &inp, weights, n, ic, oc);
                assert_eq!(a, b, "{:?} vs {:?}: n {n} ic {ic} oc {oc}", x86[0], x86[1]);
            }
        }
    }

    /// Every kernel and remainder path (rows of W mod 2, n mod the group, IC mod 8) against the f64 product.
    #[test]
    fn kernels_match_reference() {
        for &(n, ic, oc) in &[(1, 8, 4), (2, 3, 1), (3, 17, 7), (5, 64, 70), (8, 576, 133), (16, 100, 129), (7, 1, 5)] {
            let inp = data(n * ic, 1);
            let w = data(oc * ic, 2);
            let want = reference(&inp, &w, n, ic, oc);
            let check = |name: &str, got: &[f32]| {
                for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    assert!((f64::from(g) - r).abs() <= 1e-5 * (1.0 + r.abs()), "{name} n {n} ic {ic} oc {oc}: [{i}] {g} vs {r}");
                }
            };
            for threads in [1, 2, 3] {
                let mut out = vec![f32::NAN; n * oc];
                forward(&mut out, &inp, Weights::F32(&w), n, ic, oc, threads);
                check("forward", &out);
            }
            for kernel in kernels() {
                check(&format!("{kernel:?}"), &product_with(kernel, &inp, Weights::F32(&w), n, ic, oc));
            }
            // A bf16 copy of bf16-exact weights gives the same products as the f32 weights.
            let w_exact: Vec<f32> = w.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
            let w_bits: Vec<u16> = w_exact.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            let (mut a, mut b) = (vec![f32::NAN; n * oc], vec![f32::NAN; n * oc]);
            forward(&mut a, &inp, Weights::F32(&w_exact), n, ic, oc, 2);
            forward(&mut b, &inp, Weights::Bf16(&w_bits), n, ic, oc, 2);
            assert_eq!(a, b, "bf16 copy n {n} ic {ic} oc {oc}");
            let mut c = vec![f32::NAN; oc * n];
            rowwise_portable(&mut c, &inp, Weights::Bf16(&w_bits), n, ic);
            let mut d = vec![f32::NAN; oc * n];
            rowwise_portable(&mut d, &inp, Weights::F32(&w_exact), n, ic);
            assert_eq!(c, d, "portable bf16 copy n {n} ic {ic} oc {oc}");
        }
    }

    /// Wide rows go in smaller groups (packed inputs kept in L1); each dot product is summed in the
    /// same order whatever the group, so the group size never changes a bit.
    #[test]
    fn group_size_never_changes_results() {
        assert_eq!(group_size(576, Kernel::Avx512), 8);
        assert_eq!(group_size(1536, Kernel::Avx512), 4);
        assert_eq!(group_size(576, Kernel::Avx2), 4);
        assert_eq!(group_size(1536, Kernel::Avx2), 4);
        assert_eq!(group_size(4096, Kernel::Avx2), 1);
        for &(n, ic, oc) in &[(8, 1536, 40), (13, 1000, 17), (3, 1536, 5)] {
            let w = data(oc * ic, 5);
            let inp = data(n * ic, 6);
            let mut all = vec![f32::NAN; n * oc];
            forward(&mut all, &inp, Weights::F32(&w), n, ic, oc, 2);
            // Row r alone (a group of one) must give bitwise row r of the batch.
            for r in 0..n {
                let mut one = vec![f32::NAN; oc];
                forward(&mut one, &inp[r * ic..(r + 1) * ic], Weights::F32(&w), 1, ic, oc, 1);
                assert_eq!(one, all[r * oc..(r + 1) * oc], "n {n} ic {ic}: row {r} alone differs");
            }
        }
    }
}
