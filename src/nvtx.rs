//! NVTX ranges, so that Nsight Systems / Nsight Compute profiles read by name: each stage of the
//! loop (`src/run/`), each optimizer step, each layer's forward and backward (`src/model/`), each
//! op of the CUDA backend with the kernel variant it launches.
//!
//! ```text
//! nsys profile --trace=cuda,nvtx -o sppo-run sppo --device cuda run --config run.toml
//! ```
//!
//! The ranges are thread ranges (push/pop) of NVTX v3 (the `nvtx` crate: NVIDIA's header-only C
//! library compiled by `cc`, no CUDA needed at build or run time). NVTX calls are no-ops unless a
//! profiler injects its library, which it announces in `NVTX_INJECTION64_PATH`; [`enabled`] reads
//! that once, and while it is false a range costs one relaxed atomic load and a branch: no call into
//! NVTX, no name formatted (the layer ranges' names are built only when recording), nothing
//! measurable next to the ops they wrap. `SPPO_NVTX=1` forces recording on (a profiler that injects
//! NVTX another way), `SPPO_NVTX=0` off.
//!
//! ```
//! let _r = sppo::nvtx::range("rank");
//! for l in 0..2 {
//!     let _layer = sppo::nvtx::range_fmt(format_args!("layer {l} forward"));
//! }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether ranges are recorded: a profiler injects NVTX (`NVTX_INJECTION64_PATH` is set), or
/// `SPPO_NVTX` forces it (`1`/`0`). Read from the environment once per process.
#[inline]
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => init(),
    }
}

#[cold]
fn init() -> bool {
    let on = decide(std::env::var_os("SPPO_NVTX").as_deref().and_then(|v| v.to_str()), std::env::var_os("NVTX_INJECTION64_PATH").is_some_and(|v| !v.is_empty()));
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
    on
}

/// The [`enabled`] rule: `SPPO_NVTX` = `1`/`true`/`on` or `0`/`false`/`off` decides; otherwise
/// whether a profiler injects NVTX.
fn decide(forced: Option<&str>, injected: bool) -> bool {
    match forced.map(|s| s.trim().to_ascii_lowercase()) {
        Some(s) if matches!(s.as_str(), "1" | "true" | "on" | "yes") => true,
        Some(s) if matches!(s.as_str(), "0" | "false" | "off" | "no") => false,
        _ => injected,
    }
}

/// An open NVTX thread range, closed when dropped (on the thread that opened it: not `Send`).
#[must_use = "the range closes when this guard is dropped: bind it (`let _r = ...`)"]
pub struct Range {
    open: bool,
    _thread_bound: PhantomData<*const ()>,
}

impl Range {
    fn push(name: fmt::Arguments<'_>) -> Range {
        ::nvtx::range_push!("{name}");
        Range { open: true, _thread_bound: PhantomData }
    }

    const fn closed() -> Range {
        Range { open: false, _thread_bound: PhantomData }
    }

    /// Whether this guard opened a range (recording was on).
    pub fn is_open(&self) -> bool {
        self.open
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.open {
            ::nvtx::range_pop!();
        }
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("nvtx::Range").field("open", &self.open).finish()
    }
}

/// Opens a range named `name` until the guard drops (nothing when not [`enabled`]).
#[inline]
pub fn range(name: &'static str) -> Range {
    if enabled() {
        Range::push(format_args!("{name}"))
    } else {
        Range::closed()
    }
}

/// Opens a range whose name is formatted only when recording: `range_fmt(format_args!("layer
/// {l} forward"))` builds no string while [`enabled`] is false.
#[inline]
pub fn range_fmt(name: fmt::Arguments<'_>) -> Range {
    if enabled() {
        Range::push(name)
    } else {
        Range::closed()
    }
}

/// The last path segment of a type name (`sppo::…::RmsNormVariant` → `RmsNormVariant`), for
/// naming kernel variants in ranges.
pub fn short_type_name<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_decides() {
        assert!(!decide(None, false));
        assert!(decide(None, true), "a profiler injecting NVTX turns ranges on");
        assert!(decide(Some("1"), false) && decide(Some(" On "), false));
        assert!(!decide(Some("0"), true) && !decide(Some("off"), true), "SPPO_NVTX=0 wins over the profiler");
        assert!(decide(Some("maybe"), true) && !decide(Some(""), false), "other values leave it to the profiler");
    }

    #[test]
    fn ranges_nest_and_close_with_or_without_recording() {
        // Push/pop run through NVTX's no-op stubs here (no profiler): balanced, no panic.
        let outer = Range::push(format_args!("outer"));
        {
            let inner = Range::push(format_args!("layer {} forward", 3));
            assert!(inner.is_open());
        }
        drop(outer);
        // Whatever the environment, a guard closes exactly what it opened.
        let r = range("stage");
        assert_eq!(r.is_open(), enabled());
        let f = range_fmt(format_args!("layer {} backward", 1));
        assert_eq!(f.is_open(), enabled());
        assert_eq!(short_type_name::<crate::backend::cuda::RmsNormVariant>(), "RmsNormVariant");
    }
}
