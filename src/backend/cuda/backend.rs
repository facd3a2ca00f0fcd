//! [`CudaBackend`]: the model interface (`crate::backend::Backend`) on one GPU, every method a
//! launcher of `ops/` (the kernels of `kernels/*.cu`) or cuBLAS, so the model definition written
//! once in `src/model/` runs unchanged on the GPU.
//!
//! # Precision
//!
//! [`Precision::F32`] stores every buffer in f32 (cuBLAS sgemm): checked against the CPU
//! reference with f32 tolerances. [`Precision::Bf16`] (`--precision bf16`) stores by the role the
//! model gives a buffer ([`BufRole`], `Backend::alloc_as`):
//!
//! - `Compute` (activations, activation gradients, the KV cache, rotary tables): bf16.
//! - `Param`: a bf16 copy, which every op reads, beside f32 **master weights**. The optimizer
//!   kernels (`optimizer_{adamw,rmsprop}_bf16_master`) update the master weights in f32 and write
//!   their round-to-nearest-even bf16 copy; `download` returns the master weights (checkpoints and
//!   saved state keep full precision), `upload`/`write` set both. Master weights were chosen over
//!   stochastic rounding of bf16-only parameters: an update smaller than half a bf16 ulp of its
//!   weight (common at SPPO's learning rates, ~5e-7) is kept exactly instead of in expectation,
//!   no random stream is needed, so a run is deterministic given its seed and bitwise equal to
//!   the CPU's f32 optimizer on the master weights; the cost is 4 more bytes per parameter.
//! - `Exact` (what `alloc`/`upload` give: parameter gradients, optimizer state, rstd/lse
//!   statistics, log-probs, logits read by the host): f32.
//!
//! Products run through `cublasGemmEx` with bf16 inputs and f32 compute, writing bf16
//! activations or accumulating f32 parameter gradients. Reductions accumulate in f32 inside the
//! kernels (norms, softmax, log-prob logsumexp); summed log-probs and the loss are f64 on the host.
//!
//! Every op accepts any mix of storages. When the chosen kernel variant (or the naive one) has a
//! kernel for the operands' types it is launched directly; otherwise the op runs its f32 kernel
//! on **f32 staging copies**: bf16 inputs are widened (exact), bf16 outputs are computed in f32
//! and rounded back once (outputs the op accumulates into are widened first), and a parameter
//! output is computed on its master weights, then its bf16 copy is rounded from them. In bf16
//! mode this path serves the ops without a bf16 kernel yet (RMSNorm, embedding, LayerNorm and
//! bias backward): correct, at the cost of the copies. All of it is deterministic: fixed grids,
//! no atomics, cuBLAS's default (deterministic) algorithms on one stream.
//!
//! # Scratch
//!
//! Two grow-only pools live in the backend behind `Mutex`es (interior mutability: trait methods
//! take `&self`; clones of a backend share them): `scratch`, one f32 buffer for the kernels' own workspace (attention backward's
//! delta, the log-prob chunks of `LOGPROB_CHUNK_ROWS × vocab` logits), and `staging`, one f32
//! buffer per operand slot of the staging path above. Each grows to the largest request and is
//! never shrunk or freed before the backend; contents are undefined on entry (the kernels
//! overwrite them). The ops never nest a pool inside the same pool, so the locks cannot deadlock.
//!
//! # Profiling
//!
//! Every method opens an NVTX range named after the op (`rmsnorm_forward`), and each kernel
//! variant it tries a nested one (`RmsNormVariant::Warp`; an attempt that found no kernel for the
//! operands' types is an empty range before the variant that ran); the staging path's widen/round
//! copies sit in `f32 staging`. See `crate::nvtx`: without a profiler these cost an atomic load.
//!
//! Views: a `View` is a (buffer, range) pair (cudarc's `CudaView` is not `Copy`, the trait's views
//! are), turned into a `CudaView` at launch; a `ViewMut` is a [`DViewMut`] over cudarc's
//! `CudaViewMut`s. A zero-length buffer (`alloc(0)`) holds one element of device memory (CUDA
//! does not allocate 0 bytes) and has length 0: its only views are empty ones.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;

use super::device::CudaDevice;
use super::error::CudaError;
use super::kernel_choice::KernelChoice;
use super::ops::{attention, bias, elementwise, embedding, gelu, layernorm, logprobs, matmul, optimizer, rmsnorm, rope, sampling, swiglu, DType};
use crate::backend::{AdamWConfig, AttnSeq, AttnShape, Backend, BufRole, DeviceMemory, Precision, RmspropConfig};
use crate::nvtx;
use crate::sampling::{SamplerScratch, SamplingParams};

/// Rows of logits the log-prob kernels hold at once (their f32 scratch is this × vocab).
pub const LOGPROB_CHUNK_ROWS: usize = 64;

/// f32 → bf16, round to nearest even (the kernels' `f32_to_bf16`, PyTorch's `.to(bfloat16)`).
pub fn to_bf16(host: &[f32]) -> Vec<bf16> {
    host.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// bf16 → f32 (exact).
pub fn from_bf16(host: &[bf16]) -> Vec<f32> {
    host.iter().map(|x| x.to_f32()).collect()
}

/// The storage [`CudaBackend::alloc_as`] gives a role under a precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    F32,
    Bf16,
    /// bf16 copy + f32 master weights.
    Bf16Master,
}

/// Which storage `role` gets under `precision` (see the module doc).
pub fn storage_for(precision: Precision, role: BufRole) -> StorageKind {
    match (precision, role) {
        (Precision::F32, _) | (_, BufRole::Exact) => StorageKind::F32,
        (Precision::Bf16, BufRole::Compute) => StorageKind::Bf16,
        (Precision::Bf16, BufRole::Param) => StorageKind::Bf16Master,
    }
}

enum Store {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
    Master { bf16: CudaSlice<bf16>, master: CudaSlice<f32> },
}

/// A device buffer: f32, bf16, or bf16 with f32 master weights (see the module doc). Its device
/// allocation holds `max(len, 1)` elements.
pub struct DBuf {
    store: Store,
    len: usize,
}

impl DBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The type ops read (a parameter's bf16 copy for `Bf16Master`).
    pub fn dtype(&self) -> DType {
        match self.store {
            Store::F32(_) => DType::F32,
            Store::Bf16(_) | Store::Master { .. } => DType::Bf16,
        }
    }

    pub fn kind(&self) -> StorageKind {
        match self.store {
            Store::F32(_) => StorageKind::F32,
            Store::Bf16(_) => StorageKind::Bf16,
            Store::Master { .. } => StorageKind::Bf16Master,
        }
    }
}

impl std::fmt::Debug for DBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DBuf({:?}, {})", self.kind(), self.len)
    }
}

/// A read-only range of a device buffer.
#[derive(Clone, Copy, Debug)]
pub struct DView<'a> {
    buf: &'a DBuf,
    start: usize,
    end: usize,
}

/// What an op reads through a [`DView`].
enum Src<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
}

impl<'a> DView<'a> {
    fn src(&self) -> Src<'a> {
        let r = self.start..self.end;
        match &self.buf.store {
            Store::F32(s) => Src::F32(s.slice(r)),
            Store::Bf16(s) | Store::Master { bf16: s, .. } => Src::Bf16(s.slice(r)),
        }
    }

    /// The f32 view, when the buffer is f32.
    fn f32(&self) -> Option<CudaView<'a, f32>> {
        match self.src() {
            Src::F32(v) => Some(v),
            Src::Bf16(_) => None,
        }
    }

    /// The bf16 view (a parameter's bf16 copy), when the buffer is bf16.
    fn bf16(&self) -> Option<CudaView<'a, bf16>> {
        match self.src() {
            Src::Bf16(v) => Some(v),
            Src::F32(_) => None,
        }
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn dtype(&self) -> DType {
        self.buf.dtype()
    }
}

/// A mutable range of a device buffer, by storage.
#[derive(Debug)]
pub enum DViewMut<'a> {
    F32(CudaViewMut<'a, f32>),
    Bf16(CudaViewMut<'a, bf16>),
    /// A parameter range: its bf16 copy and its f32 master weights.
    Master { bf16: CudaViewMut<'a, bf16>, master: CudaViewMut<'a, f32> },
}

impl<'a> DViewMut<'a> {
    pub fn len(&self) -> usize {
        match self {
            DViewMut::F32(v) => v.len(),
            DViewMut::Bf16(v) => v.len(),
            DViewMut::Master { bf16, .. } => bf16.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 view, when the buffer is plain f32 (not master weights: writing those needs the
    /// bf16 copy refreshed, which the staging path does).
    fn f32(&mut self) -> Option<&mut CudaViewMut<'a, f32>> {
        match self {
            DViewMut::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The bf16 view, when the buffer is plain bf16.
    fn bf16(&mut self) -> Option<&mut CudaViewMut<'a, bf16>> {
        match self {
            DViewMut::Bf16(v) => Some(v),
            _ => None,
        }
    }
}

/// How the staging path treats an output: overwritten, or read first (accumulated into / updated
/// in place), so a bf16 one is widened before the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Write,
    ReadWrite,
}
use Access::{ReadWrite, Write};

/// The GPU backend (see the module doc).
///
/// Cloning gives a second handle on the same GPU: it shares the context, the stream (so the
/// clones' work is ordered as one backend's), the cuBLAS handle and the grow-only pools (their
/// locks serialise the clones' use). A component that owns its backend, such as an oracle
/// (`crate::oracle::OracleSpec::build_on`), runs on a clone of the loop's backend.
#[derive(Clone)]
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    blas: Arc<CudaBlas>,
    kernels: KernelChoice,
    precision: Precision,
    /// Grow-only kernel workspace (attention delta, log-prob chunks).
    scratch: Arc<Mutex<Option<CudaSlice<f32>>>>,
    /// Grow-only f32 staging copies, one slot per operand of the staging path.
    staging: Arc<Mutex<Vec<CudaSlice<f32>>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev.name())
            .field("kernels", &self.kernels.describe())
            .field("precision", &self.precision)
            .finish()
    }
}

/// A launcher's result, retried with the `Naive` variant when the chosen one has no kernel for
/// this direction or dtype (e.g. a forward-only fast variant during backward).
fn or_naive<V: Copy + std::fmt::Debug>(chosen: V, naive: V, mut f: impl FnMut(V) -> Result<(), CudaError>) -> Result<()> {
    match variant(chosen, &mut f) {
        Err(CudaError::UnsupportedDtype { .. }) => Ok(variant(naive, &mut f)?),
        other => Ok(other?),
    }
}

/// `f(v)` inside an NVTX range naming the variant (`RmsNormVariant::Warp`), nested in the op's
/// range: the launch of that variant's kernels, or an attempt that found no kernel for the types
/// (an empty range).
fn variant<V: Copy + std::fmt::Debug>(v: V, f: &mut impl FnMut(V) -> Result<(), CudaError>) -> Result<(), CudaError> {
    let _r = nvtx::range_fmt(format_args!("{}::{v:?}", nvtx::short_type_name::<V>()));
    f(v)
}

/// [`or_naive`] for a bf16 attempt: Ok(false) when neither variant has a kernel for the types
/// (the caller then takes the staging path); nothing was launched in that case.
fn try_variants<V: Copy + std::fmt::Debug>(chosen: V, naive: V, mut f: impl FnMut(V) -> Result<(), CudaError>) -> Result<bool> {
    for v in [chosen, naive] {
        match variant(v, &mut f) {
            Ok(()) => return Ok(true),
            Err(CudaError::UnsupportedDtype { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a pool was held leaves only undefined scratch contents: usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CudaBackend {
    /// Opens GPU `ordinal` (an error naming why when there is none, never a panic), storing at
    /// `precision` (see the module doc).
    pub fn new(ordinal: usize, kernels: KernelChoice, precision: Precision) -> Result<Self> {
        let dev = Arc::new(CudaDevice::new(ordinal)?);
        let blas = CudaBlas::new(dev.stream().clone()).map_err(|e| anyhow!("cuBLAS on {}: {e}", dev.name()))?;
        Ok(CudaBackend {
            dev,
            blas: Arc::new(blas),
            kernels,
            precision,
            scratch: Arc::new(Mutex::new(None)),
            staging: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    pub fn kernels(&self) -> KernelChoice {
        self.kernels
    }

    /// Elements held by the grow-only pools (kernel scratch, staging slots): for tests and logs.
    pub fn pool_sizes(&self) -> (usize, Vec<usize>) {
        let scratch = lock(&self.scratch).as_ref().map_or(0, |s| s.len());
        (scratch, lock(&self.staging).iter().map(|s| s.len()).collect())
    }

    /// The values ops read from `buf`, widened to f32: a parameter buffer's bf16 copy (where
    /// `download` gives its master weights), a bf16 buffer's values, an f32 buffer's values.
    pub fn download_compute_copy(&self, buf: &DBuf) -> Result<Vec<f32>> {
        if buf.len == 0 {
            return Ok(Vec::new());
        }
        Ok(match &buf.store {
            Store::F32(s) => self.dev.download(s)?,
            Store::Bf16(s) | Store::Master { bf16: s, .. } => from_bf16(&self.dev.download(s)?),
        })
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize, what: &str) -> Result<CudaSlice<T>> {
        self.dev
            .stream()
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| anyhow!("allocating {len} elements of {what} on {}: {e}", self.dev.name()))
    }

    fn alloc_kind(&self, len: usize, kind: StorageKind) -> Result<DBuf> {
        let store = match kind {
            StorageKind::F32 => Store::F32(self.zeros(len, "f32")?),
            StorageKind::Bf16 => Store::Bf16(self.zeros(len, "bf16")?),
            StorageKind::Bf16Master => Store::Master { bf16: self.zeros(len, "bf16 parameters")?, master: self.zeros(len, "f32 master weights")? },
        };
        Ok(DBuf { store, len })
    }

    /// Runs `f` on `len` elements of the grow-only kernel scratch (contents undefined).
    fn with_scratch<R>(&self, len: usize, f: impl FnOnce(&mut CudaViewMut<'_, f32>) -> Result<R>) -> Result<R> {
        let mut pool = lock(&self.scratch);
        if pool.as_ref().is_none_or(|s| s.len() < len) {
            *pool = None; // free the smaller one first
            *pool = Some(self.zeros(len, "GPU scratch")?);
        }
        let s = pool.as_mut().expect("scratch allocated above");
        f(&mut s.slice_mut(0..len))
    }

    /// Runs the f32 kernel `f` on f32 views of `ins` and `outs` (see the module doc): f32
    /// operands are passed as they are; bf16 ones through the staging slots (inputs widened,
    /// outputs rounded back after `f`, `ReadWrite` outputs widened before); parameter outputs as
    /// their master weights, whose bf16 copy is rounded afterwards.
    fn via_f32(
        &self,
        ins: &[DView<'_>],
        mut outs: Vec<(DViewMut<'_>, Access)>,
        f: impl FnOnce(&[CudaView<'_, f32>], &mut [CudaViewMut<'_, f32>]) -> Result<()>,
    ) -> Result<()> {
        let _r = nvtx::range("f32 staging");
        let dev = &*self.dev;
        let mut pool = lock(&self.staging);
        let need: Vec<usize> = ins
            .iter()
            .map(|v| if v.dtype() == DType::F32 { 0 } else { v.len() })
            .chain(outs.iter().map(|(o, _)| if let DViewMut::Bf16(v) = o { v.len() } else { 0 }))
            .collect();
        while pool.len() < need.len() {
            let s = self.zeros(1, "GPU staging")?;
            pool.push(s);
        }
        for (slot, &n) in pool.iter_mut().zip(&need) {
            if slot.len() < n {
                *slot = self.zeros(1, "GPU staging")?; // free the smaller one first
                *slot = self.zeros(n, "GPU staging")?;
            }
        }
        let (in_slots, out_slots) = pool[..need.len()].split_at_mut(ins.len());
        let mut in_views: Vec<CudaView<'_, f32>> = Vec::with_capacity(ins.len());
        for (v, slot) in ins.iter().zip(in_slots.iter_mut()) {
            match v.src() {
                Src::F32(x) => in_views.push(x),
                Src::Bf16(x) => {
                    let n = x.len();
                    elementwise::widen_bf16(dev, &mut slot.slice_mut(0..n), &x)?;
                    let slot: &CudaSlice<f32> = slot;
                    in_views.push(slot.slice(0..n));
                }
            }
        }
        let mut out_views: Vec<CudaViewMut<'_, f32>> = Vec::with_capacity(outs.len());
        for ((o, access), slot) in outs.iter_mut().zip(out_slots.iter_mut()) {
            match o {
                DViewMut::F32(x) => out_views.push(x.slice_mut(..)),
                DViewMut::Master { master, .. } => out_views.push(master.slice_mut(..)),
                DViewMut::Bf16(x) => {
                    let n = x.len();
                    let mut s = slot.slice_mut(0..n);
                    if *access == ReadWrite {
                        elementwise::widen_bf16(dev, &mut s, &x.as_view())?;
                    }
                    out_views.push(s);
                }
            }
        }
        f(&in_views, &mut out_views)?;
        drop(out_views);
        for ((o, _), slot) in outs.iter_mut().zip(out_slots.iter()) {
            match o {
                DViewMut::F32(_) => {}
                DViewMut::Master { bf16, master } if !bf16.is_empty() => optimizer::round_bf16(dev, bf16, &master.as_view())?,
                DViewMut::Bf16(x) if !x.is_empty() => {
                    let n = x.len();
                    optimizer::round_bf16(dev, x, &slot.slice(0..n))?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Two mutable views of disjoint ranges of one slice (see `view_mut_pair`).
fn pair_of<'a, T>(buf: &'a mut CudaSlice<T>, a: Range<usize>, b: Range<usize>) -> (CudaViewMut<'a, T>, CudaViewMut<'a, T>) {
    // Split at the later range's start: the earlier range lies in `lo`, the later in `hi`.
    let (first, second, swapped) = if a.end <= b.start { (a, b, false) } else { (b, a, true) };
    let (mut lo, mut hi) = buf.split_at_mut(second.start);
    // SAFETY: sub-slicing a CudaViewMut borrows the local view, but the result only holds the
    // device pointer, its length and references to `buf`'s events and stream, all valid for
    // 'a (CudaViewMut has no Drop); the two results cover disjoint ranges of `buf`, which is
    // mutably borrowed for 'a, so no other view of these elements can exist meanwhile.
    let x: CudaViewMut<'a, T> = unsafe { std::mem::transmute(lo.slice_mut(first)) };
    let y: CudaViewMut<'a, T> = unsafe { std::mem::transmute(hi.slice_mut(0..second.end - second.start)) };
    if swapped {
        (y, x)
    } else {
        (x, y)
    }
}

impl Backend for CudaBackend {
    type Buf = DBuf;
    type View<'a> = DView<'a>;
    type ViewMut<'a> = DViewMut<'a>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn sample_rows(&self, logits: &DBuf, vocab: usize, uniforms: &[f32], params: &SamplingParams, _scratch: &mut SamplerScratch) -> Result<Vec<u32>> {
        let _r = nvtx::range("sample_rows");
        let rows = uniforms.len();
        let mut tokens = self.dev.upload(&vec![-1i32; rows])?;
        let mut status = self.dev.upload(&vec![-1i32; rows])?;
        let mut picked = Vec::new();
        let logits = self.full(logits);
        self.via_f32(&[logits], vec![], |i, _| {
            picked = sampling::sample_rows(&self.dev, self.kernels.sampling, &mut tokens.as_view_mut(), &mut status.as_view_mut(), &i[0], vocab, uniforms, params)?;
            Ok(())
        })?;
        Ok(picked)
    }

    // ---- memory ----
    fn alloc(&self, len: usize) -> Result<DBuf> {
        let _r = nvtx::range("alloc");
        self.alloc_kind(len, StorageKind::F32)
    }

    fn upload(&self, host: &[f32]) -> Result<DBuf> {
        let _r = nvtx::range("upload");
        self.upload_as(host, BufRole::Exact)
    }

    fn download(&self, buf: &DBuf) -> Result<Vec<f32>> {
        let _r = nvtx::range("download");
        if buf.len == 0 {
            return Ok(Vec::new());
        }
        Ok(match &buf.store {
            Store::F32(s) | Store::Master { master: s, .. } => self.dev.download(s)?,
            Store::Bf16(s) => from_bf16(&self.dev.download(s)?),
        })
    }

    fn write(&self, buf: &mut DBuf, offset: usize, host: &[f32]) -> Result<()> {
        let _r = nvtx::range("write");
        let end = offset.checked_add(host.len()).filter(|&e| e <= buf.len);
        let end = end.ok_or_else(|| anyhow!("write: {} elements at {offset} overflow a buffer of {}", host.len(), buf.len))?;
        if host.is_empty() {
            return Ok(());
        }
        let stream = self.dev.stream();
        let copy_err = |what: &str| {
            let what = what.to_string();
            let n = host.len();
            move |e| anyhow!("write: copying {n} {what} to the GPU: {e}")
        };
        match &mut buf.store {
            Store::F32(s) => stream.memcpy_htod(host, &mut s.slice_mut(offset..end)).map_err(copy_err("f32")),
            Store::Bf16(s) => stream.memcpy_htod(&to_bf16(host), &mut s.slice_mut(offset..end)).map_err(copy_err("bf16")),
            Store::Master { bf16, master } => {
                stream.memcpy_htod(host, &mut master.slice_mut(offset..end)).map_err(copy_err("f32 master weights"))?;
                stream.memcpy_htod(&to_bf16(host), &mut bf16.slice_mut(offset..end)).map_err(copy_err("bf16 parameters"))
            }
        }
    }

    fn len(&self, buf: &DBuf) -> usize {
        buf.len
    }

    fn fill(&self, buf: DViewMut<'_>, value: f32) -> Result<()> {
        let _r = nvtx::range("fill");
        match buf {
            DViewMut::F32(mut v) => Ok(elementwise::fill(&self.dev, &mut v, value)?),
            DViewMut::Bf16(mut v) => Ok(elementwise::fill(&self.dev, &mut v, value)?),
            DViewMut::Master { mut bf16, mut master } => {
                elementwise::fill(&self.dev, &mut master, value)?;
                Ok(elementwise::fill(&self.dev, &mut bf16, value)?)
            }
        }
    }

    fn view<'a>(&self, buf: &'a DBuf, range: Range<usize>) -> DView<'a> {
        assert!(range.start <= range.end && range.end <= buf.len, "view {range:?} of a buffer of {}", buf.len);
        DView { buf, start: range.start, end: range.end }
    }

    fn view_mut<'a>(&self, buf: &'a mut DBuf, range: Range<usize>) -> DViewMut<'a> {
        assert!(range.start <= range.end && range.end <= buf.len, "view_mut {range:?} of a buffer of {}", buf.len);
        match &mut buf.store {
            Store::F32(s) => DViewMut::F32(s.slice_mut(range)),
            Store::Bf16(s) => DViewMut::Bf16(s.slice_mut(range)),
            Store::Master { bf16, master } => DViewMut::Master { bf16: bf16.slice_mut(range.clone()), master: master.slice_mut(range) },
        }
    }

    // ---- elementwise ----
    fn add(&self, mut out: DViewMut<'_>, a: DView<'_>, b: DView<'_>) -> Result<()> {
        let _r = nvtx::range("add");
        if let (Some(o), Some(x), Some(y)) = (out.bf16(), a.bf16(), b.bf16()) {
            return Ok(elementwise::add(&self.dev, o, &x, &y)?);
        }
        self.via_f32(&[a, b], vec![(out, Write)], |i, o| Ok(elementwise::add(&self.dev, &mut o[0], &i[0], &i[1])?))
    }

    fn add_inplace(&self, mut acc: DViewMut<'_>, x: DView<'_>) -> Result<()> {
        let _r = nvtx::range("add_inplace");
        if let (Some(a), Some(x)) = (acc.bf16(), x.bf16()) {
            return Ok(elementwise::add_inplace(&self.dev, a, &x)?);
        }
        self.via_f32(&[x], vec![(acc, ReadWrite)], |i, o| Ok(elementwise::add_inplace(&self.dev, &mut o[0], &i[0])?))
    }

    fn scatter_rows(&self, mut dst: DViewMut<'_>, src: DView<'_>, index: &[u32], width: usize) -> Result<()> {
        let _r = nvtx::range("scatter_rows");
        if let (Some(d), Some(s)) = (dst.bf16(), src.bf16()) {
            return Ok(elementwise::scatter_rows(&self.dev, d, &s, index, width)?);
        }
        // Rows the index does not name keep their values: read-write.
        self.via_f32(&[src], vec![(dst, ReadWrite)], |i, o| Ok(elementwise::scatter_rows(&self.dev, &mut o[0], &i[0], index, width)?))
    }

    fn gather_rows(&self, mut dst: DViewMut<'_>, src: DView<'_>, index: &[u32], width: usize) -> Result<()> {
        let _r = nvtx::range("gather_rows");
        if let (Some(d), Some(s)) = (dst.bf16(), src.bf16()) {
            return Ok(elementwise::gather_rows(&self.dev, d, &s, index, width)?);
        }
        self.via_f32(&[src], vec![(dst, Write)], |i, o| Ok(elementwise::gather_rows(&self.dev, &mut o[0], &i[0], index, width)?))
    }

    // ---- embedding ----
    fn embedding_forward(&self, mut out: DViewMut<'_>, table: DView<'_>, ids: &[u32], dim: usize) -> Result<()> {
        let _r = nvtx::range("embedding_forward");
        let k = self.kernels.embedding;
        let naive = embedding::EmbeddingVariant::Naive;
        if let (Some(o), Some(t)) = (out.bf16(), table.bf16()) {
            if try_variants(k, naive, |v| embedding::embedding_forward(&self.dev, v, o, &t, ids, dim))? {
                return Ok(());
            }
        }
        self.via_f32(&[table], vec![(out, Write)], |i, o| or_naive(k, naive, |v| embedding::embedding_forward(&self.dev, v, &mut o[0], &i[0], ids, dim)))
    }

    fn embedding_backward(&self, dtable: DViewMut<'_>, dout: DView<'_>, ids: &[u32], dim: usize) -> Result<()> {
        let _r = nvtx::range("embedding_backward");
        // f32 kernels only (a bf16 dout is widened).
        let k = self.kernels.embedding;
        let naive = embedding::EmbeddingVariant::Naive;
        self.via_f32(&[dout], vec![(dtable, ReadWrite)], |i, o| or_naive(k, naive, |v| embedding::embedding_backward(&self.dev, v, &mut o[0], &i[0], ids, dim)))
    }

    // ---- RMSNorm ----
    fn rmsnorm_forward(&self, mut out: DViewMut<'_>, mut rstd: DViewMut<'_>, inp: DView<'_>, weight: DView<'_>, dim: usize, eps: f32) -> Result<()> {
        let _r = nvtx::range("rmsnorm_forward");
        let k = self.kernels.rmsnorm;
        let naive = rmsnorm::RmsNormVariant::Naive;
        if let (Some(o), Some(r), Some(x), Some(w)) = (out.bf16(), rstd.f32(), inp.bf16(), weight.bf16()) {
            if try_variants(k, naive, |v| rmsnorm::rmsnorm_forward(&self.dev, v, o, r, &x, &w, dim, eps))? {
                return Ok(());
            }
        }
        self.via_f32(&[inp, weight], vec![(out, Write), (rstd, Write)], |i, o| {
            let [o, r] = o else { unreachable!("two outputs") };
            or_naive(k, naive, |v| rmsnorm::rmsnorm_forward(&self.dev, v, o, r, &i[0], &i[1], dim, eps))
        })
    }

    fn rmsnorm_backward(
        &self,
        dinp: DViewMut<'_>,
        dweight: DViewMut<'_>,
        dout: DView<'_>,
        inp: DView<'_>,
        weight: DView<'_>,
        rstd: DView<'_>,
        dim: usize,
    ) -> Result<()> {
        let _r = nvtx::range("rmsnorm_backward");
        // f32 kernels only: bf16 operands go through staging.
        let k = self.kernels.rmsnorm;
        self.via_f32(&[dout, inp, weight, rstd], vec![(dinp, ReadWrite), (dweight, ReadWrite)], |i, o| {
            let [di, dw] = o else { unreachable!("two outputs") };
            or_naive(k, rmsnorm::RmsNormVariant::Naive, |v| rmsnorm::rmsnorm_backward(&self.dev, v, di, dw, &i[0], &i[1], &i[2], &i[3], dim))
        })
    }

    // ---- matrix products (cuBLAS) ----
    fn matmul_forward(&self, mut out: DViewMut<'_>, inp: DView<'_>, weight: DView<'_>, in_dim: usize, out_dim: usize) -> Result<()> {
        let _r = nvtx::range("matmul_forward");
        let s = self.dev.stream();
        if let (Some(x), Some(w)) = (inp.bf16(), weight.bf16()) {
            match &mut out {
                DViewMut::Bf16(o) => return Ok(matmul::forward_ex(&self.blas, s, o, &x, &w, in_dim, out_dim)?),
                DViewMut::F32(o) => return Ok(matmul::forward_ex(&self.blas, s, o, &x, &w, in_dim, out_dim)?),
                DViewMut::Master { .. } => {}
            }
        }
        self.via_f32(&[inp, weight], vec![(out, Write)], |i, o| Ok(matmul::forward(&self.blas, &mut o[0], &i[0], &i[1], in_dim, out_dim)?))
    }

    fn matmul_backward_input(&self, mut dinp: DViewMut<'_>, dout: DView<'_>, weight: DView<'_>, in_dim: usize, out_dim: usize, accumulate: bool) -> Result<()> {
        let _r = nvtx::range("matmul_backward_input");
        let s = self.dev.stream();
        if let (Some(d), Some(w)) = (dout.bf16(), weight.bf16()) {
            match &mut dinp {
                DViewMut::Bf16(o) => return Ok(matmul::backward_input_ex(&self.blas, s, o, &d, &w, in_dim, out_dim, accumulate)?),
                DViewMut::F32(o) => return Ok(matmul::backward_input_ex(&self.blas, s, o, &d, &w, in_dim, out_dim, accumulate)?),
                DViewMut::Master { .. } => {}
            }
        }
        let access = if accumulate { ReadWrite } else { Write };
        self.via_f32(&[dout, weight], vec![(dinp, access)], |i, o| {
            Ok(matmul::backward_input(&self.blas, &mut o[0], &i[0], &i[1], in_dim, out_dim, accumulate)?)
        })
    }

    fn matmul_backward_weight(&self, mut dweight: DViewMut<'_>, dout: DView<'_>, inp: DView<'_>, in_dim: usize, out_dim: usize) -> Result<()> {
        let _r = nvtx::range("matmul_backward_weight");
        let s = self.dev.stream();
        if let (Some(d), Some(x)) = (dout.bf16(), inp.bf16()) {
            match &mut dweight {
                DViewMut::F32(o) => return Ok(matmul::backward_weight_ex(&self.blas, s, o, &d, &x, in_dim, out_dim)?),
                DViewMut::Bf16(o) => return Ok(matmul::backward_weight_ex(&self.blas, s, o, &d, &x, in_dim, out_dim)?),
                DViewMut::Master { .. } => {}
            }
        }
        self.via_f32(&[dout, inp], vec![(dweight, ReadWrite)], |i, o| Ok(matmul::backward_weight(&self.blas, &mut o[0], &i[0], &i[1], in_dim, out_dim)?))
    }

    // ---- rotary embedding ----
    fn rope_forward(&self, mut x: DViewMut<'_>, cos: DView<'_>, sin: DView<'_>, positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()> {
        let _r = nvtx::range("rope_forward");
        let k = self.kernels.rope;
        let naive = rope::RopeVariant::Naive;
        if let (Some(xv), Some(c), Some(s)) = (x.bf16(), cos.bf16(), sin.bf16()) {
            if try_variants(k, naive, |v| rope::rope_forward(&self.dev, v, xv, &c, &s, positions, n_heads, head_dim))? {
                return Ok(());
            }
        }
        self.via_f32(&[cos, sin], vec![(x, ReadWrite)], |i, o| {
            or_naive(k, naive, |v| rope::rope_forward(&self.dev, v, &mut o[0], &i[0], &i[1], positions, n_heads, head_dim))
        })
    }

    fn rope_backward(&self, mut dx: DViewMut<'_>, cos: DView<'_>, sin: DView<'_>, positions: &[u32], n_heads: usize, head_dim: usize) -> Result<()> {
        let _r = nvtx::range("rope_backward");
        let k = self.kernels.rope;
        let naive = rope::RopeVariant::Naive;
        if let (Some(xv), Some(c), Some(s)) = (dx.bf16(), cos.bf16(), sin.bf16()) {
            if try_variants(k, naive, |v| rope::rope_backward(&self.dev, v, xv, &c, &s, positions, n_heads, head_dim))? {
                return Ok(());
            }
        }
        self.via_f32(&[cos, sin], vec![(dx, ReadWrite)], |i, o| {
            or_naive(k, naive, |v| rope::rope_backward(&self.dev, v, &mut o[0], &i[0], &i[1], positions, n_heads, head_dim))
        })
    }

    // ---- attention ----
    fn attention_forward(
        &self,
        mut out: DViewMut<'_>,
        mut lse: DViewMut<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()> {
        let _r = nvtx::range("attention_forward");
        let chosen = self.kernels.attention;
        let naive = attention::AttentionVariant::Naive;
        if let (Some(o), Some(l), Some(qv), Some(kv), Some(vv)) = (out.bf16(), lse.f32(), q.bf16(), k.bf16(), v.bf16()) {
            if try_variants(chosen, naive, |var| attention::attention_forward(&self.dev, var, o, l, &qv, &kv, &vv, seqs, shape))? {
                return Ok(());
            }
        }
        self.via_f32(&[q, k, v], vec![(out, Write), (lse, Write)], |i, o| {
            let [o, l] = o else { unreachable!("two outputs") };
            or_naive(chosen, naive, |var| attention::attention_forward(&self.dev, var, o, l, &i[0], &i[1], &i[2], seqs, shape))
        })
    }

    fn attention_backward(
        &self,
        mut dq: DViewMut<'_>,
        mut dk: DViewMut<'_>,
        mut dv: DViewMut<'_>,
        dout: DView<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        out: DView<'_>,
        lse: DView<'_>,
        seqs: &[AttnSeq],
        shape: &AttnShape,
    ) -> Result<()> {
        let _r = nvtx::range("attention_backward");
        let chosen = self.kernels.attention;
        let naive = attention::AttentionVariant::Naive;
        // delta (Nq, n_heads) = rowsum(dout ⊙ out): the backward's scratch, from the pool.
        self.with_scratch(lse.len(), |delta| {
            if let (Some(a), Some(b), Some(c), Some(d), Some(qv), Some(kv), Some(vv), Some(ov), Some(l)) =
                (dq.bf16(), dk.bf16(), dv.bf16(), dout.bf16(), q.bf16(), k.bf16(), v.bf16(), out.bf16(), lse.f32())
            {
                let launched = try_variants(chosen, naive, |var| {
                    attention::attention_backward(&self.dev, var, a, b, c, delta, &d, &qv, &kv, &vv, &ov, &l, seqs, shape)
                })?;
                if launched {
                    return Ok(());
                }
            }
            self.via_f32(&[dout, q, k, v, out, lse], vec![(dq, Write), (dk, Write), (dv, Write)], |i, o| {
                let [a, b, c] = o else { unreachable!("three outputs") };
                or_naive(chosen, naive, |var| {
                    attention::attention_backward(&self.dev, var, a, b, c, delta, &i[0], &i[1], &i[2], &i[3], &i[4], &i[5], seqs, shape)
                })
            })
        })
    }

    // ---- SwiGLU ----
    fn swiglu_forward(&self, mut out: DViewMut<'_>, gate: DView<'_>, up: DView<'_>) -> Result<()> {
        let _r = nvtx::range("swiglu_forward");
        let k = self.kernels.swiglu;
        let naive = swiglu::SwigluVariant::Naive;
        if let (Some(o), Some(g), Some(u)) = (out.bf16(), gate.bf16(), up.bf16()) {
            if try_variants(k, naive, |v| swiglu::swiglu_forward(&self.dev, v, o, &g, &u))? {
                return Ok(());
            }
        }
        self.via_f32(&[gate, up], vec![(out, Write)], |i, o| or_naive(k, naive, |v| swiglu::swiglu_forward(&self.dev, v, &mut o[0], &i[0], &i[1])))
    }

    fn swiglu_backward(&self, mut dgate: DViewMut<'_>, mut dup: DViewMut<'_>, dout: DView<'_>, gate: DView<'_>, up: DView<'_>) -> Result<()> {
        let _r = nvtx::range("swiglu_backward");
        let k = self.kernels.swiglu;
        let naive = swiglu::SwigluVariant::Naive;
        if let (Some(dg), Some(du), Some(d), Some(g), Some(u)) = (dgate.bf16(), dup.bf16(), dout.bf16(), gate.bf16(), up.bf16()) {
            if try_variants(k, naive, |v| swiglu::swiglu_backward(&self.dev, v, dg, du, &d, &g, &u))? {
                return Ok(());
            }
        }
        self.via_f32(&[dout, gate, up], vec![(dgate, Write), (dup, Write)], |i, o| {
            let [dg, du] = o else { unreachable!("two outputs") };
            or_naive(k, naive, |v| swiglu::swiglu_backward(&self.dev, v, dg, du, &i[0], &i[1], &i[2]))
        })
    }

    // ---- LM head fused with log-prob gathering ----
    fn token_logprobs_forward(
        &self,
        mut logp: DViewMut<'_>,
        mut lse: DViewMut<'_>,
        hidden: DView<'_>,
        weight: DView<'_>,
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        let _r = nvtx::range("token_logprobs_forward");
        let rows = targets.iter().filter(|&&t| t >= 0).count().clamp(1, LOGPROB_CHUNK_ROWS);
        self.with_scratch(rows * vocab, |scratch| {
            if let (Some(lp), Some(l), Some(h), Some(w)) = (logp.f32(), lse.f32(), hidden.bf16(), weight.bf16()) {
                return Ok(logprobs::token_logprobs_forward(&self.dev, lp, l, scratch, &h, &w, targets, dim, vocab)?);
            }
            self.via_f32(&[hidden, weight], vec![(logp, Write), (lse, Write)], |i, o| {
                let [lp, l] = o else { unreachable!("two outputs") };
                Ok(logprobs::token_logprobs_forward(&self.dev, lp, l, scratch, &i[0], &i[1], targets, dim, vocab)?)
            })
        })
    }

    fn token_logprobs_backward(
        &self,
        mut dhidden: DViewMut<'_>,
        mut dweight: DViewMut<'_>,
        dlogp: DView<'_>,
        hidden: DView<'_>,
        weight: DView<'_>,
        lse: DView<'_>,
        targets: &[i32],
        dim: usize,
        vocab: usize,
    ) -> Result<()> {
        let _r = nvtx::range("token_logprobs_backward");
        let rows = targets.iter().filter(|&&t| t >= 0).count().clamp(1, LOGPROB_CHUNK_ROWS);
        self.with_scratch(rows * vocab, |scratch| {
            if let (Some(dh), Some(dw), Some(dl), Some(h), Some(w), Some(l)) =
                (dhidden.bf16(), dweight.f32(), dlogp.f32(), hidden.bf16(), weight.bf16(), lse.f32())
            {
                return Ok(logprobs::token_logprobs_backward(&self.dev, dh, dw, scratch, &dl, &h, &w, &l, targets, dim, vocab)?);
            }
            self.via_f32(&[dlogp, hidden, weight, lse], vec![(dhidden, Write), (dweight, ReadWrite)], |i, o| {
                let [dh, dw] = o else { unreachable!("two outputs") };
                Ok(logprobs::token_logprobs_backward(&self.dev, dh, dw, scratch, &i[0], &i[1], &i[2], &i[3], targets, dim, vocab)?)
            })
        })
    }

    // ---- encoder ops ----
    fn view_mut_pair<'a>(&self, buf: &'a mut DBuf, a: Range<usize>, b: Range<usize>) -> (DViewMut<'a>, DViewMut<'a>) {
        assert!(a.start <= a.end && b.start <= b.end && a.end.max(b.end) <= buf.len, "view_mut_pair {a:?}, {b:?} of {}", buf.len);
        assert!(a.end <= b.start || b.end <= a.start, "view_mut_pair: {a:?} and {b:?} overlap");
        match &mut buf.store {
            Store::F32(s) => {
                let (x, y) = pair_of(s, a, b);
                (DViewMut::F32(x), DViewMut::F32(y))
            }
            Store::Bf16(s) => {
                let (x, y) = pair_of(s, a, b);
                (DViewMut::Bf16(x), DViewMut::Bf16(y))
            }
            Store::Master { bf16, master } => {
                let (xb, yb) = pair_of(bf16, a.clone(), b.clone());
                let (xm, ym) = pair_of(master, a, b);
                (DViewMut::Master { bf16: xb, master: xm }, DViewMut::Master { bf16: yb, master: ym })
            }
        }
    }

    fn layernorm_forward(
        &self,
        mut out: DViewMut<'_>,
        mut mean: DViewMut<'_>,
        mut rstd: DViewMut<'_>,
        inp: DView<'_>,
        weight: DView<'_>,
        bias: DView<'_>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let _r = nvtx::range("layernorm_forward");
        let k = self.kernels.layernorm;
        let naive = layernorm::LayerNormVariant::Naive;
        if let (Some(o), Some(m), Some(r), Some(x), Some(w), Some(b)) = (out.bf16(), mean.f32(), rstd.f32(), inp.bf16(), weight.bf16(), bias.bf16()) {
            if try_variants(k, naive, |v| layernorm::layernorm_forward(&self.dev, v, o, m, r, &x, &w, &b, dim, eps))? {
                return Ok(());
            }
        }
        self.via_f32(&[inp, weight, bias], vec![(out, Write), (mean, Write), (rstd, Write)], |i, o| {
            let [o, m, r] = o else { unreachable!("three outputs") };
            or_naive(k, naive, |v| layernorm::layernorm_forward(&self.dev, v, o, m, r, &i[0], &i[1], &i[2], dim, eps))
        })
    }

    fn layernorm_backward(
        &self,
        dinp: DViewMut<'_>,
        dweight: DViewMut<'_>,
        dbias: DViewMut<'_>,
        dout: DView<'_>,
        inp: DView<'_>,
        weight: DView<'_>,
        mean: DView<'_>,
        rstd: DView<'_>,
        dim: usize,
    ) -> Result<()> {
        let _r = nvtx::range("layernorm_backward");
        // f32 kernels only.
        let k = self.kernels.layernorm;
        self.via_f32(&[dout, inp, weight, mean, rstd], vec![(dinp, ReadWrite), (dweight, ReadWrite), (dbias, ReadWrite)], |i, o| {
            let [di, dw, db] = o else { unreachable!("three outputs") };
            or_naive(k, layernorm::LayerNormVariant::Naive, |v| {
                layernorm::layernorm_backward(&self.dev, v, di, dw, db, &i[0], &i[1], &i[2], &i[3], &i[4], dim)
            })
        })
    }

    fn gelu_forward(&self, mut out: DViewMut<'_>, inp: DView<'_>) -> Result<()> {
        let _r = nvtx::range("gelu_forward");
        let k = self.kernels.gelu;
        let naive = gelu::GeluVariant::Naive;
        if let (Some(o), Some(x)) = (out.bf16(), inp.bf16()) {
            if try_variants(k, naive, |v| gelu::gelu_forward(&self.dev, v, o, &x))? {
                return Ok(());
            }
        }
        self.via_f32(&[inp], vec![(out, Write)], |i, o| or_naive(k, naive, |v| gelu::gelu_forward(&self.dev, v, &mut o[0], &i[0])))
    }

    fn gelu_backward(&self, mut dinp: DViewMut<'_>, dout: DView<'_>, inp: DView<'_>) -> Result<()> {
        let _r = nvtx::range("gelu_backward");
        let k = self.kernels.gelu;
        let naive = gelu::GeluVariant::Naive;
        if let (Some(di), Some(d), Some(x)) = (dinp.bf16(), dout.bf16(), inp.bf16()) {
            if try_variants(k, naive, |v| gelu::gelu_backward(&self.dev, v, di, &d, &x))? {
                return Ok(());
            }
        }
        self.via_f32(&[dout, inp], vec![(dinp, Write)], |i, o| or_naive(k, naive, |v| gelu::gelu_backward(&self.dev, v, &mut o[0], &i[0], &i[1])))
    }

    fn bias_add(&self, mut out: DViewMut<'_>, b: DView<'_>) -> Result<()> {
        let _r = nvtx::range("bias_add");
        let k = self.kernels.bias;
        let naive = bias::BiasVariant::Naive;
        if let (Some(o), Some(bv)) = (out.bf16(), b.bf16()) {
            if try_variants(k, naive, |v| bias::bias_add(&self.dev, v, o, &bv))? {
                return Ok(());
            }
        }
        self.via_f32(&[b], vec![(out, ReadWrite)], |i, o| or_naive(k, naive, |v| bias::bias_add(&self.dev, v, &mut o[0], &i[0])))
    }

    fn bias_backward(&self, dbias: DViewMut<'_>, dout: DView<'_>) -> Result<()> {
        let _r = nvtx::range("bias_backward");
        // f32 kernels only.
        let k = self.kernels.bias;
        self.via_f32(&[dout], vec![(dbias, ReadWrite)], |i, o| or_naive(k, bias::BiasVariant::Naive, |v| bias::bias_backward(&self.dev, v, &mut o[0], &i[0])))
    }

    // ---- optimizer over flat buffers ----
    fn grad_norm_sq(&self, grads: DView<'_>) -> Result<f64> {
        let _r = nvtx::range("grad_norm_sq");
        let mut total = 0.0;
        self.via_f32(&[grads], vec![], |i, _| {
            total = optimizer::grad_norm_sq(&self.dev, &i[0])?;
            Ok(())
        })?;
        Ok(total)
    }

    fn scale(&self, buf: DViewMut<'_>, factor: f64) -> Result<()> {
        let _r = nvtx::range("scale");
        self.via_f32(&[], vec![(buf, ReadWrite)], |_, o| Ok(optimizer::scale(&self.dev, &mut o[0], factor)?))
    }

    fn adamw_step(
        &self,
        mut params: DViewMut<'_>,
        grads: DView<'_>,
        mut m: DViewMut<'_>,
        mut v: DViewMut<'_>,
        step: u64,
        lr: f64,
        hp: &AdamWConfig,
    ) -> Result<()> {
        let _r = nvtx::range("adamw_step");
        ensure!(step >= 1, "adamw_step: step is 1-based, got 0");
        if let (Some(g), Some(mv), Some(vv)) = (grads.f32(), m.f32(), v.f32()) {
            match &mut params {
                DViewMut::Master { bf16, master } => return Ok(optimizer::adamw_step_bf16_master(&self.dev, bf16, master, &g, mv, vv, step, lr, hp)?),
                DViewMut::F32(p) => return Ok(optimizer::adamw_step(&self.dev, p, &g, mv, vv, step, lr, hp)?),
                DViewMut::Bf16(_) => {}
            }
        }
        // Other storages: the f32 step on staging copies (bf16-only parameters without master
        // weights are rounded after the step).
        self.via_f32(&[grads], vec![(params, ReadWrite), (m, ReadWrite), (v, ReadWrite)], |i, o| {
            let [p, mv, vv] = o else { unreachable!("three outputs") };
            Ok(optimizer::adamw_step(&self.dev, p, &i[0], mv, vv, step, lr, hp)?)
        })
    }

    fn rmsprop_step(&self, mut params: DViewMut<'_>, grads: DView<'_>, mut square_avg: DViewMut<'_>, lr: f64, hp: &RmspropConfig) -> Result<()> {
        let _r = nvtx::range("rmsprop_step");
        if let (Some(g), Some(sq)) = (grads.f32(), square_avg.f32()) {
            match &mut params {
                DViewMut::Master { bf16, master } => return Ok(optimizer::rmsprop_step_bf16_master(&self.dev, bf16, master, &g, sq, lr, hp)?),
                DViewMut::F32(p) => return Ok(optimizer::rmsprop_step(&self.dev, p, &g, sq, lr, hp)?),
                DViewMut::Bf16(_) => {}
            }
        }
        self.via_f32(&[grads], vec![(params, ReadWrite), (square_avg, ReadWrite)], |i, o| {
            let [p, sq] = o else { unreachable!("two outputs") };
            Ok(optimizer::rmsprop_step(&self.dev, p, &i[0], sq, lr, hp)?)
        })
    }

    // ---- storage precision and device memory ----
    fn alloc_as(&self, len: usize, role: BufRole) -> Result<DBuf> {
        let _r = nvtx::range("alloc_as");
        self.alloc_kind(len, storage_for(self.precision, role))
    }

    fn upload_as(&self, host: &[f32], role: BufRole) -> Result<DBuf> {
        let _r = nvtx::range("upload_as");
        let mut buf = self.alloc_as(host.len(), role)?;
        self.write(&mut buf, 0, host)?;
        Ok(buf)
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn device_memory(&self) -> Result<Option<DeviceMemory>> {
        let _r = nvtx::range("device_memory");
        let (free, total) = self
            .dev
            .context()
            .mem_get_info()
            .map_err(|e| anyhow!("reading the free memory of {}: {e}", self.dev.name()))?;
        Ok(Some(DeviceMemory { name: format!("{} (GPU {})", self.dev.name(), self.dev.ordinal()), free: free as u64, total: total as u64 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_conversions_round_to_nearest_even_and_widen_exactly() {
        // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to even (1); just above rounds up.
        let halfway = 1.0 + f32::powi(2.0, -8);
        let above = f32::from_bits(halfway.to_bits() + 1);
        let v = [0.0, -0.0, 1.0, halfway, above, -3.140625, 1e-40, f32::INFINITY, f32::MAX];
        let b = to_bf16(&v);
        let back = from_bf16(&b);
        assert_eq!(back[..3], [0.0, -0.0, 1.0]);
        assert!(back[1].is_sign_negative());
        assert_eq!(back[3], 1.0, "ties to even");
        assert_eq!(back[4], 1.0 + f32::powi(2.0, -7), "above the tie rounds up");
        assert_eq!(back[5], -3.140625, "representable values are kept");
        assert_eq!(back[7], f32::INFINITY);
        assert_eq!(back[8], f32::INFINITY, "f32::MAX rounds to infinity, as torch does");
        assert!(to_bf16(&[f32::NAN])[0].is_nan());
        // Widening then narrowing is the identity on bf16 values.
        assert_eq!(to_bf16(&back), b);
        // Every bf16 bit pattern widens exactly (no f32 rounding): bits are the top half.
        for bits in (0u16..=u16::MAX).step_by(97) {
            let x = bf16::from_bits(bits);
            if !x.is_nan() {
                assert_eq!(from_bf16(&[x])[0].to_bits(), (bits as u32) << 16);
            }
        }
    }

    #[test]
    fn roles_map_to_storage() {
        use BufRole::*;
        for role in [Exact, Compute, Param] {
            assert_eq!(storage_for(Precision::F32, role), StorageKind::F32);
        }
        assert_eq!(storage_for(Precision::Bf16, Exact), StorageKind::F32);
        assert_eq!(storage_for(Precision::Bf16, Compute), StorageKind::Bf16);
        assert_eq!(storage_for(Precision::Bf16, Param), StorageKind::Bf16Master);
        // The bytes the memory plan counts agree with the storage.
        for p in [Precision::F32, Precision::Bf16] {
            for role in [Exact, Compute, Param] {
                let want = match storage_for(p, role) {
                    StorageKind::F32 => 4,
                    StorageKind::Bf16 => 2,
                    StorageKind::Bf16Master => 6,
                };
                assert_eq!(p.bytes(role), want, "{p} {role:?}");
            }
        }
    }
}
