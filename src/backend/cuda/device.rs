//! Finding a GPU ([`probe`]) and holding one ([`CudaDevice`]).
//!
//! cudarc panics, rather than returning an error, when a driver function is called and
//! `libcuda.so` cannot be loaded (`CudaContext::new`, `device_count`, `result::init`), and
//! `catch_unwind` does not make later calls safe. So [`probe`] first asks whether the library can be
//! loaded at all, and [`CudaDevice::new`] refuses to start unless [`probe`] found a device.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys::{self, cudaError_enum};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError};
use cudarc::nvrtc::Ptx;

use super::error::{CudaError, Result};
use super::kernels::{Kernel, ALL};

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuProbe {
    /// `libcuda.so` (the driver) cannot be loaded: a machine without an NVIDIA driver.
    NoDriver,
    /// A driver, but no usable device; the string says why.
    NoDevice(String),
    /// `count` devices; the rest describes device 0.
    Available {
        count: usize,
        name: String,
        /// (major, minor): (8, 0) for A100, (9, 0) for H100/H200.
        compute_capability: (i32, i32),
        /// Total device memory in bytes.
        memory: usize,
        /// The CUDA version the driver supports, as (major, minor): (13, 0) for driver 580.
        driver_cuda: (i32, i32),
    },
}

impl GpuProbe {
    pub fn is_available(&self) -> bool {
        matches!(self, GpuProbe::Available { .. })
    }

    /// Why no GPU is used, or `None` when one is available.
    pub fn unavailable_reason(&self) -> Option<String> {
        match self {
            GpuProbe::NoDriver => Some("no CUDA driver (libcuda.so not found)".to_string()),
            GpuProbe::NoDevice(why) => Some(why.clone()),
            GpuProbe::Available { .. } => None,
        }
    }
}

impl fmt::Display for GpuProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuProbe::Available { count, name, compute_capability: (major, minor), memory, driver_cuda: (dmaj, dmin) } => write!(
                f,
                "{count} CUDA device(s); device 0: {name}, compute capability {major}.{minor}, {:.1} GiB, driver supports CUDA {dmaj}.{dmin}",
                *memory as f64 / (1u64 << 30) as f64
            ),
            other => write!(f, "{}: using the CPU backend", other.unavailable_reason().unwrap_or_default()),
        }
    }
}

/// Looks for a usable GPU. Never panics; safe to call on any machine, any number of times (the
/// answer is computed once per process).
pub fn probe() -> GpuProbe {
    static PROBE: OnceLock<GpuProbe> = OnceLock::new();
    PROBE.get_or_init(probe_uncached).clone()
}

fn probe_uncached() -> GpuProbe {
    // SAFETY: `is_culib_present` only tries `dlopen` on the candidate names of libcuda and closes
    // what it opened; it calls no driver function. Loading libcuda runs its initialisers, as any
    // CUDA program does.
    if !unsafe { sys::is_culib_present() } {
        return GpuProbe::NoDriver;
    }
    // From here libcuda loads, so cudarc's lazily resolved driver calls do not panic.
    let count = match CudaContext::device_count() {
        Ok(n) => n,
        Err(DriverError(cudaError_enum::CUDA_ERROR_NO_DEVICE)) => {
            return GpuProbe::NoDevice("a CUDA driver but no CUDA device".to_string())
        }
        Err(e) => return GpuProbe::NoDevice(format!("the CUDA driver failed to initialise ({e})")),
    };
    if count <= 0 {
        return GpuProbe::NoDevice("a CUDA driver but no CUDA device".to_string());
    }
    let describe = || -> std::result::Result<GpuProbe, DriverError> {
        let ctx = CudaContext::new(0)?;
        let mut version: std::ffi::c_int = 0;
        // SAFETY: cuDriverGetVersion writes one int through a valid pointer to a local.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
        Ok(GpuProbe::Available {
            count: count as usize,
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            memory: ctx.total_mem()?,
            driver_cuda: (version / 1000, (version % 1000) / 10),
        })
    };
    describe().unwrap_or_else(|e| GpuProbe::NoDevice(format!("CUDA device 0 cannot be used ({e})")))
}

/// One GPU: its context, the stream every launch goes to, and the kernel modules loaded so far.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    /// One slot per [`ALL`] entry (by `Kernel::id`); a fatbin is loaded on its first use.
    modules: Mutex<Vec<Option<Arc<CudaModule>>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaDevice({}: {})", self.ctx.ordinal(), self.name)
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Without a driver or device this is an error (the sentence from
    /// [`probe`]), never a panic.
    pub fn new(ordinal: usize) -> Result<Self> {
        match probe() {
            GpuProbe::Available { count, .. } if ordinal < count => {}
            GpuProbe::Available { count, .. } => {
                return Err(CudaError::Unavailable(format!("no CUDA device {ordinal}: {count} found")))
            }
            other => return Err(CudaError::Unavailable(other.unavailable_reason().unwrap_or_default())),
        }
        let ctx =
            CudaContext::new(ordinal).map_err(CudaError::driver(format!("creating a context on device {ordinal}")))?;
        let stream = ctx.new_stream().map_err(CudaError::driver(format!("creating a stream on device {ordinal}")))?;
        let name = ctx.name().map_err(CudaError::driver(format!("reading device {ordinal}'s name")))?;
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            modules: Mutex::new(vec![None; ALL.len()]),
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all launches and copies of this device go to, in order.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for everything queued on [`Self::stream`]; kernel faults surface here.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(CudaError::driver(format!(
            "synchronizing device {} ({})",
            self.ordinal(),
            self.name
        )))
    }

    /// A device copy of `host`.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(CudaError::driver(format!("copying {} elements to the device", host.len())))
    }

    /// A host copy of `dev` (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(CudaError::driver(format!("copying {} elements from the device", dev.len())))
    }

    /// Function `kernel_name` of `kernel`'s fatbin, loading the fatbin on first use.
    /// Only launchers in `ops/` call this, each with the names of its own file's kernels.
    pub fn function(&self, kernel: &Kernel, kernel_name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(kernel_name) {
            return Ok(f.clone());
        }
        let module = self.module(kernel)?;
        let f = module.load_function(kernel_name).map_err(|source| CudaError::MissingKernel {
            module: kernel.name,
            kernel: kernel_name,
            source,
        })?;
        lock(&self.functions).insert(kernel_name, f.clone());
        Ok(f)
    }

    fn module(&self, kernel: &Kernel) -> Result<Arc<CudaModule>> {
        let mut modules = lock(&self.modules);
        let slot = modules.get_mut(kernel.id).ok_or_else(|| {
            CudaError::Unavailable(format!(
                "kernel file {} has id {} outside ALL ({} files)",
                kernel.name,
                kernel.id,
                ALL.len()
            ))
        })?;
        if let Some(m) = slot {
            return Ok(m.clone());
        }
        // cuModuleLoadData takes a fatbin as well as a cubin or PTX; cudarc calls it "binary".
        let m = self.ctx.load_module(Ptx::from_binary(kernel.fatbin.to_vec())).map_err(|source| CudaError::Load {
            module: kernel.name,
            device: self.name.clone(),
            source,
        })?;
        *slot = Some(m.clone());
        Ok(m)
    }
}

/// Locks a cache; a panic elsewhere while holding it leaves the cache valid, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
