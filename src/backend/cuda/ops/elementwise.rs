//! Launchers for `kernels/elementwise.cu`: `fill`, `add`, `add_inplace`, and the row copies behind
//! the Backend trait's `scatter_rows` (KV-cache appends) and `gather_rows` (logits rows), in f32 and
//! bf16 storage. Lengths and row indices are checked here; [`scatter_pairs`] and [`gather_pairs`]
//! turn an index into the kernel's (destination, source) row pairs, shared by the GPU launchers
//! and the host-harness tests. [`widen_bf16`] is the CUDA backend's bf16 → f32 staging copy.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{DType, Element};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::ELEMENTWISE;

/// Threads per block of every elementwise kernel.
const BLOCK: u32 = 256;
/// Grid cap of the grid-stride loops (enough blocks to fill any GPU; the loops cover the rest).
const MAX_BLOCKS: usize = 4096;

fn shape(op: &'static str, detail: String) -> CudaError {
    CudaError::Shape { op, detail }
}

/// The grid of a grid-stride kernel over `n` elements (n >= 1).
pub fn flat_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The grid of a row copy: one block per pair (capped; the kernel strides over the rest).
pub fn rows_config(pairs: usize) -> LaunchConfig {
    let blocks = pairs.clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn kernel_name(op: &str, dtype: DType) -> &'static str {
    match (op, dtype) {
        ("fill", DType::F32) => "elementwise_fill_f32",
        ("fill", DType::Bf16) => "elementwise_fill_bf16",
        ("add", DType::F32) => "elementwise_add_f32",
        ("add", DType::Bf16) => "elementwise_add_bf16",
        ("add_inplace", DType::F32) => "elementwise_add_inplace_f32",
        ("add_inplace", DType::Bf16) => "elementwise_add_inplace_bf16",
        ("copy_rows", DType::F32) => "elementwise_copy_rows_f32",
        (_, DType::Bf16) => "elementwise_copy_rows_bf16",
        _ => unreachable!("no elementwise op {op}"),
    }
}

/// Rows of a (rows, width) buffer of `len` elements, checked to fit the kernel's `int`s.
fn rows_of(op: &'static str, what: &str, len: usize, width: usize) -> Result<usize> {
    if width == 0 || !len.is_multiple_of(width) {
        return Err(shape(op, format!("{what} has {len} elements, not a whole number of rows of width {width}")));
    }
    let rows = len / width;
    if i32::try_from(rows).is_err() || i32::try_from(width).is_err() {
        return Err(shape(op, format!("{what} ({rows}, {width}) exceeds the kernel's int sizes")));
    }
    Ok(rows)
}

/// (dst row, src row) pairs of `dst[index[r]] = src[r]`: each index checked below `dst_rows`, and a
/// repeated destination written once, by its LAST source row (the CPU's sequential result).
pub fn scatter_pairs(index: &[u32], dst_rows: usize) -> Result<(Vec<i32>, Vec<i32>)> {
    if let Some((r, &bad)) = index.iter().enumerate().find(|(_, &i)| i as usize >= dst_rows) {
        return Err(shape("scatter_rows", format!("index[{r}] = {bad} is out of range for dst of {dst_rows} rows")));
    }
    let mut last = std::collections::HashMap::with_capacity(index.len());
    for (r, &i) in index.iter().enumerate() {
        last.insert(i, r);
    }
    let (mut dst, mut src) = (Vec::with_capacity(last.len()), Vec::with_capacity(last.len()));
    for (r, &i) in index.iter().enumerate() {
        if last[&i] == r {
            dst.push(i as i32); // < dst_rows, which rows_of checked fits i32
            src.push(r as i32);
        }
    }
    Ok((dst, src))
}

/// (dst row, src row) pairs of `dst[r] = src[index[r]]`, each index checked below `src_rows`.
pub fn gather_pairs(index: &[u32], src_rows: usize) -> Result<(Vec<i32>, Vec<i32>)> {
    if let Some((r, &bad)) = index.iter().enumerate().find(|(_, &i)| i as usize >= src_rows) {
        return Err(shape("gather_rows", format!("index[{r}] = {bad} is out of range for src of {src_rows} rows")));
    }
    Ok(((0..index.len() as i32).collect(), index.iter().map(|&i| i as i32).collect()))
}

/// Every element of `buf` set to `value` (rounded once for bf16).
pub fn fill<T: Element>(dev: &CudaDevice, buf: &mut CudaViewMut<'_, T>, value: f32) -> Result<()> {
    let n = buf.len();
    if n == 0 {
        return Ok(());
    }
    let kernel = kernel_name("fill", T::DTYPE);
    let func = dev.function(&ELEMENTWISE, kernel)?;
    let mut launch = dev.stream().launch_builder(&func);
    launch.arg(buf).arg(&value).arg(&n);
    // SAFETY: elementwise_fill_{f32,bf16}(T* buf, float value, size_t n) with buf holding n
    // elements; grid-stride loop guarded by i < n.
    unsafe { launch.launch(flat_config(n)) }.map_err(CudaError::driver(format!("launching {kernel} ({n})")))?;
    Ok(())
}

/// `out = a + b`, all the same length (OVERWRITES out).
pub fn add<T: Element>(dev: &CudaDevice, out: &mut CudaViewMut<'_, T>, a: &CudaView<'_, T>, b: &CudaView<'_, T>) -> Result<()> {
    let n = out.len();
    if a.len() != n || b.len() != n {
        return Err(shape("add", format!("out has {n} elements, a {}, b {}", a.len(), b.len())));
    }
    if n == 0 {
        return Ok(());
    }
    let kernel = kernel_name("add", T::DTYPE);
    let func = dev.function(&ELEMENTWISE, kernel)?;
    let mut launch = dev.stream().launch_builder(&func);
    launch.arg(out).arg(a).arg(b).arg(&n);
    // SAFETY: elementwise_add_{f32,bf16}(T* out, const T* a, const T* b, size_t n), all n long
    // (checked); out is an exclusive borrow, so it aliases neither input.
    unsafe { launch.launch(flat_config(n)) }.map_err(CudaError::driver(format!("launching {kernel} ({n})")))?;
    Ok(())
}

/// `acc += x`, the same length.
pub fn add_inplace<T: Element>(dev: &CudaDevice, acc: &mut CudaViewMut<'_, T>, x: &CudaView<'_, T>) -> Result<()> {
    let n = acc.len();
    if x.len() != n {
        return Err(shape("add_inplace", format!("acc has {n} elements, x {}", x.len())));
    }
    if n == 0 {
        return Ok(());
    }
    let kernel = kernel_name("add_inplace", T::DTYPE);
    let func = dev.function(&ELEMENTWISE, kernel)?;
    let mut launch = dev.stream().launch_builder(&func);
    launch.arg(acc).arg(x).arg(&n);
    // SAFETY: elementwise_add_inplace_{f32,bf16}(T* acc, const T* x, size_t n), both n long.
    unsafe { launch.launch(flat_config(n)) }.map_err(CudaError::driver(format!("launching {kernel} ({n})")))?;
    Ok(())
}

/// The widening kernel (bf16 → f32, exact).
pub const WIDEN_BF16_KERNEL: &str = "elementwise_widen_bf16";

/// `out = inp` widened from bf16 to f32 (exact), the same length. The way back (round to nearest
/// even) is `optimizer::round_bf16`.
pub fn widen_bf16(dev: &CudaDevice, out: &mut CudaViewMut<'_, f32>, inp: &CudaView<'_, half::bf16>) -> Result<()> {
    let n = out.len();
    if inp.len() != n {
        return Err(shape("widen_bf16", format!("out has {n} elements, inp {}", inp.len())));
    }
    if n == 0 {
        return Ok(());
    }
    let func = dev.function(&ELEMENTWISE, WIDEN_BF16_KERNEL)?;
    let mut launch = dev.stream().launch_builder(&func);
    launch.arg(out).arg(inp).arg(&n);
    // SAFETY: elementwise_widen_bf16(float* out, const bf16* inp, size_t n), both n long
    // (checked); out is an exclusive borrow, so it does not alias inp.
    unsafe { launch.launch(flat_config(n)) }.map_err(CudaError::driver(format!("launching {WIDEN_BF16_KERNEL} ({n})")))?;
    Ok(())
}

fn copy_rows<T: Element>(
    dev: &CudaDevice,
    op: &'static str,
    dst: &mut CudaViewMut<'_, T>,
    src: &CudaView<'_, T>,
    pairs: (Vec<i32>, Vec<i32>),
    width: usize,
) -> Result<()> {
    let (dst_idx, src_idx) = pairs;
    if dst_idx.is_empty() {
        return Ok(());
    }
    let n_pairs = i32::try_from(dst_idx.len()).map_err(|_| shape(op, format!("{} rows exceed the kernel's int", dst_idx.len())))?;
    let width_i = width as i32; // checked by rows_of
    let (d_dst_idx, d_src_idx) = (dev.upload(&dst_idx)?, dev.upload(&src_idx)?);
    let kernel = kernel_name("copy_rows", T::DTYPE);
    let func = dev.function(&ELEMENTWISE, kernel)?;
    let mut launch = dev.stream().launch_builder(&func);
    launch.arg(dst).arg(src).arg(&d_dst_idx).arg(&d_src_idx).arg(&n_pairs).arg(&width_i);
    // SAFETY: elementwise_copy_rows_{f32,bf16}(T* dst, const T* src, const int* dst_idx,
    // const int* src_idx, int pairs, int width); every index was checked against its buffer's rows
    // (scatter_pairs / gather_pairs), destinations are distinct, and dst is an exclusive borrow.
    unsafe { launch.launch(rows_config(dst_idx.len())) }.map_err(CudaError::driver(format!("launching {kernel} ({} rows of {width})", dst_idx.len())))?;
    Ok(())
}

/// `dst (R, width)[index[r]] = src (n, width)[r]`; a repeated index keeps the last row.
pub fn scatter_rows<T: Element>(dev: &CudaDevice, dst: &mut CudaViewMut<'_, T>, src: &CudaView<'_, T>, index: &[u32], width: usize) -> Result<()> {
    const OP: &str = "scatter_rows";
    let dst_rows = rows_of(OP, "dst", dst.len(), width)?;
    let src_rows = rows_of(OP, "src", src.len(), width)?;
    if src_rows != index.len() {
        return Err(shape(OP, format!("src has {src_rows} rows of {width}, index {} entries", index.len())));
    }
    let pairs = scatter_pairs(index, dst_rows)?;
    copy_rows(dev, OP, dst, src, pairs, width)
}

/// `dst (n, width)[r] = src (R, width)[index[r]]`.
pub fn gather_rows<T: Element>(dev: &CudaDevice, dst: &mut CudaViewMut<'_, T>, src: &CudaView<'_, T>, index: &[u32], width: usize) -> Result<()> {
    const OP: &str = "gather_rows";
    let dst_rows = rows_of(OP, "dst", dst.len(), width)?;
    let src_rows = rows_of(OP, "src", src.len(), width)?;
    if dst_rows != index.len() {
        return Err(shape(OP, format!("dst has {dst_rows} rows of {width}, index {} entries", index.len())));
    }
    let pairs = gather_pairs(index, src_rows)?;
    copy_rows(dev, OP, dst, src, pairs, width)
}
