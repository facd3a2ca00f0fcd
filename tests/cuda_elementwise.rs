//! `kernels/elementwise.cu` (fill, add, add_inplace, scatter_rows, gather_rows; f32 and bf16)
//! against the CPU backend's ops, through the host harness everywhere and on the GPU when
//! `probe()` finds one. Outputs are poisoned first; rows a copy must not touch keep their values.

#[macro_use]
mod common;

use common::Rng;
use half::bf16;
use sppo::backend::cpu::CpuBackend;
use sppo::backend::cuda::host::{ffi, grid_args};
use sppo::backend::cuda::ops::elementwise::{self as ew, flat_config, gather_pairs, rows_config, scatter_pairs};
use sppo::backend::cuda::CudaDevice;
use sppo::backend::Backend;

const SIZES: &[usize] = &[1, 31, 257, 1000];

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn unbf(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// The host-harness launch of a grid-stride kernel (n as the kernels' size_t).
fn cfg(n: usize) -> (u32, u32, u32, u32, u32, u32) {
    grid_args(&flat_config(n))
}

#[test]
fn fill_add_add_inplace_host_match_cpu() {
    let cpu = CpuBackend::new(Some(1)).unwrap();
    let mut rng = Rng::new(81);
    for &n in SIZES {
        let (a, b) = (rng.vec(n, -3.0, 3.0), rng.vec(n, -3.0, 3.0));
        let (gx, gy, gz, bx, by, bz) = cfg(n);
        // add
        let mut want = vec![f32::NAN; n];
        cpu.add(&mut want, &a, &b).unwrap();
        let mut got = vec![f32::NAN; n];
        // SAFETY: elementwise_add_f32(float* out, const float* a, const float* b, size_t n), n each.
        assert_eq!(unsafe { ffi::elementwise_add_f32_host(gx, gy, gz, bx, by, bz, got.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n) }, 0);
        assert_eq!(got, want, "add f32 n {n}");
        // add_inplace
        let mut want = a.clone();
        cpu.add_inplace(&mut want, &b).unwrap();
        let mut got = a.clone();
        // SAFETY: elementwise_add_inplace_f32(float* acc, const float* x, size_t n), n each.
        assert_eq!(unsafe { ffi::elementwise_add_inplace_f32_host(gx, gy, gz, bx, by, bz, got.as_mut_ptr(), b.as_ptr(), n) }, 0);
        assert_eq!(got, want, "add_inplace f32 n {n}");
        // fill
        let mut got = vec![f32::NAN; n];
        // SAFETY: elementwise_fill_f32(float* buf, float value, size_t n), n elements.
        assert_eq!(unsafe { ffi::elementwise_fill_f32_host(gx, gy, gz, bx, by, bz, got.as_mut_ptr(), 0.625, n) }, 0);
        assert!(got.iter().all(|&x| x == 0.625), "fill f32 n {n}");
        // bf16: f32 math on bf16 inputs, one rounding: exactly bf16(a + b).
        let (ab, bb) = (bf(&a), bf(&b));
        let want: Vec<bf16> = ab.iter().zip(&bb).map(|(x, y)| bf16::from_f32(x.to_f32() + y.to_f32())).collect();
        let mut got = vec![bf16::NAN; n];
        // SAFETY: elementwise_add_bf16(bf16* out, const bf16* a, const bf16* b, size_t n).
        assert_eq!(unsafe { ffi::elementwise_add_bf16_host(gx, gy, gz, bx, by, bz, got.as_mut_ptr(), ab.as_ptr(), bb.as_ptr(), n) }, 0);
        assert_eq!(unbf(&got), unbf(&want), "add bf16 n {n}");
        let mut got = ab.clone();
        // SAFETY: elementwise_add_inplace_bf16(bf16* acc, const bf16* x, size_t n).
        assert_eq!(unsafe { ffi::elementwise_add_inplace_bf16_host(gx, gy, gz, bx, by, bz, got.as_mut_ptr(), bb.as_ptr(), n) }, 0);
        assert_eq!(unbf(&got), unbf(&want), "add_inplace bf16 n {n}");
        let mut got = vec![bf16::NAN; n];
        // SAFETY: elementwise_fill_bf16(bf16* buf, float value, size_t n).
        assert_eq!(unsafe { ffi::elementwise_fill_bf16_host(gx, gy, gz, bx, by, bz, got.as_mut_ptr(), 1.0 / 3.0, n) }, 0);
        assert!(got.iter().all(|&x| x == bf16::from_f32(1.0 / 3.0)), "fill bf16 n {n}");
    }
}

/// The bf16 → f32 staging copy of the CUDA backend widens exactly, and rounding it back
/// (`optimizer_round_bf16`) gives the same bf16 values: the host conversions at the boundary
/// (`backend::to_bf16` / `from_bf16`) agree with both kernels.
#[test]
fn widen_and_round_back_host_match_the_boundary_conversions() {
    use sppo::backend::cuda::backend::{from_bf16, to_bf16};
    let mut rng = Rng::new(83);
    for &n in SIZES {
        let mut x = rng.vec(n, -1e3, 1e3);
        x[0] = 1.0 + f32::powi(2.0, -8); // a tie: to even
        let b = to_bf16(&x);
        let (gx, gy, gz, bx, by, bz) = cfg(n);
        let mut wide = vec![f32::NAN; n];
        // SAFETY: elementwise_widen_bf16(float* out, const bf16* inp, size_t n), n each.
        assert_eq!(unsafe { ffi::elementwise_widen_bf16_host(gx, gy, gz, bx, by, bz, wide.as_mut_ptr(), b.as_ptr(), n) }, 0);
        assert_eq!(wide, from_bf16(&b), "widen n {n}");
        let mut narrow = vec![bf16::NAN; n];
        let oc = sppo::backend::cuda::ops::optimizer::flat_config("round_bf16", n, 4).unwrap();
        let (gx, gy, gz, bx, by, bz) = grid_args(&oc);
        // SAFETY: optimizer_round_bf16(bf16* params, const float* master, size_t n), n each.
        assert_eq!(unsafe { ffi::optimizer_round_bf16_host(gx, gy, gz, bx, by, bz, narrow.as_mut_ptr(), x.as_ptr(), n) }, 0);
        assert_eq!(unbf(&narrow), unbf(&b), "round n {n}: the kernel's rounding vs the host's");
    }
}

/// Runs the f32 row copy on the host harness for the given pairs.
fn copy_rows_host(dst: &mut [f32], src: &[f32], pairs: &(Vec<i32>, Vec<i32>), width: usize) {
    let (gx, gy, gz, bx, by, bz) = grid_args(&rows_config(pairs.0.len()));
    // SAFETY: elementwise_copy_rows_f32(float* dst, const float* src, const int* dst_idx,
    // const int* src_idx, int pairs, int width); scatter_pairs/gather_pairs checked every index.
    let rc = unsafe {
        ffi::elementwise_copy_rows_f32_host(
            gx,
            gy,
            gz,
            bx,
            by,
            bz,
            dst.as_mut_ptr(),
            src.as_ptr(),
            pairs.0.as_ptr(),
            pairs.1.as_ptr(),
            pairs.0.len() as i32,
            width as i32,
        )
    };
    assert_eq!(rc, 0);
}

#[test]
fn scatter_and_gather_rows_host_match_cpu() {
    let cpu = CpuBackend::new(Some(1)).unwrap();
    let mut rng = Rng::new(82);
    for &width in &[1usize, 64, 300] {
        let dst_rows = 40;
        // Appends with a repeated destination (row 7 twice: the later source row wins).
        let index: Vec<u32> = vec![3, 7, 39, 0, 7, 12];
        let src = rng.vec(index.len() * width, -1.0, 1.0);
        let base = rng.vec(dst_rows * width, -1.0, 1.0);
        let mut want = base.clone();
        cpu.scatter_rows(&mut want, &src, &index, width).unwrap();
        let mut got = base.clone();
        copy_rows_host(&mut got, &src, &scatter_pairs(&index, dst_rows).unwrap(), width);
        assert_eq!(got, want, "scatter width {width}: written rows, the last of a repeat, untouched rows kept");
        // Gather: rows in any order, repeats allowed.
        let index: Vec<u32> = vec![39, 0, 5, 5, 21];
        let mut want = vec![f32::NAN; index.len() * width];
        cpu.gather_rows(&mut want, &base, &index, width).unwrap();
        let mut got = vec![f32::NAN; index.len() * width];
        copy_rows_host(&mut got, &base, &gather_pairs(&index, dst_rows).unwrap(), width);
        assert_eq!(got, want, "gather width {width}");
    }
    // A repeated destination is written once, by its last source row (no two blocks race on it).
    let (d, s) = scatter_pairs(&[3, 7, 39, 0, 7, 12], 40).unwrap();
    assert_eq!((d, s), (vec![3, 39, 0, 7, 12], vec![0, 2, 3, 4, 5]));
    // Out-of-range rows are errors naming the entry, as on the CPU.
    let e = scatter_pairs(&[1, 40], 40).unwrap_err().to_string();
    assert!(e.contains("index[1] = 40"), "{e}");
    let e = gather_pairs(&[41], 40).unwrap_err().to_string();
    assert!(e.contains("index[0] = 41"), "{e}");
}

#[test]
fn elementwise_gpu_matches_cpu() {
    let dev: CudaDevice = gpu_or_skip!("elementwise_gpu_matches_cpu");
    let cpu = CpuBackend::new(Some(1)).unwrap();
    let mut rng = Rng::new(83);
    for &n in SIZES {
        let (a, b) = (rng.vec(n, -3.0, 3.0), rng.vec(n, -3.0, 3.0));
        let mut want = vec![0.0; n];
        cpu.add(&mut want, &a, &b).unwrap();
        let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        let mut out = dev.upload(&vec![f32::NAN; n]).unwrap();
        ew::add(&dev, &mut out.as_view_mut(), &da.as_view(), &db.as_view()).unwrap();
        assert_eq!(dev.download(&out).unwrap(), want, "gpu add n {n}");
        let mut acc = dev.upload(&a).unwrap();
        ew::add_inplace(&dev, &mut acc.as_view_mut(), &db.as_view()).unwrap();
        assert_eq!(dev.download(&acc).unwrap(), want, "gpu add_inplace n {n}");
        ew::fill(&dev, &mut acc.as_view_mut(), 2.5).unwrap();
        assert!(dev.download(&acc).unwrap().iter().all(|&x| x == 2.5), "gpu fill n {n}");
    }
    let width = 64;
    let index: Vec<u32> = vec![3, 7, 39, 0, 7, 12];
    let src = rng.vec(index.len() * width, -1.0, 1.0);
    let base = rng.vec(40 * width, -1.0, 1.0);
    let mut want = base.clone();
    cpu.scatter_rows(&mut want, &src, &index, width).unwrap();
    let mut dst = dev.upload(&base).unwrap();
    let dsrc = dev.upload(&src).unwrap();
    ew::scatter_rows(&dev, &mut dst.as_view_mut(), &dsrc.as_view(), &index, width).unwrap();
    assert_eq!(dev.download(&dst).unwrap(), want, "gpu scatter_rows");
    let gi: Vec<u32> = vec![39, 0, 5, 5];
    let mut want = vec![0.0; gi.len() * width];
    cpu.gather_rows(&mut want, &base, &gi, width).unwrap();
    let dbase = dev.upload(&base).unwrap();
    let mut out = dev.upload(&vec![f32::NAN; gi.len() * width]).unwrap();
    ew::gather_rows(&dev, &mut out.as_view_mut(), &dbase.as_view(), &gi, width).unwrap();
    assert_eq!(dev.download(&out).unwrap(), want, "gpu gather_rows");
    assert!(ew::scatter_rows(&dev, &mut dst.as_view_mut(), &dsrc.as_view(), &[0, 1, 2, 3, 4, 40], width).is_err());
}
