//! Build script: compiles every `kernels/*.cu` with nvcc into a fatbin and embeds them.
//!
//! Output, in `OUT_DIR`:
//! - `<stem>.fatbin` for each `kernels/<stem>.cu`: SASS for sm_80 (A100) and sm_90a (H100/H200,
//!   the `a` unlocks wgmma/TMA), plus compute_80 PTX so any newer GPU can JIT it.
//! - `kernels.rs`, included by `src/backend/cuda/kernels.rs`: one
//!   `pub const <STEM>: Kernel = Kernel { id, name: "<stem>", fatbin: ... }` per file, and
//!   `pub static ALL: &[Kernel]` in `id` order (the device's module cache is indexed by `id`).
//! - `nvcc-times.txt`: seconds nvcc spent per file (also printed with `cargo build -vv`).
//!
//! nvcc is looked for in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, this checkout's
//! `.tools/cuda/nvidia/cu13/bin/nvcc` (installed by `scripts/setup`), `nvcc` on `PATH`. It must be
//! release 13.0: the GPU machines' driver (580, CUDA 13.0) rejects PTX from newer toolkits, so
//! another version only gets a warning (the SASS may still load; the PTX fallback may not).
//! Extra flags come from `$NVCC_FLAGS` (whitespace-separated), e.g. `NVCC_FLAGS=-G` or `-DFOO=1`.
//!
//! Flags and why:
//! - `-lineinfo`: source lines in compute-sanitizer and Nsight reports; no effect on the code.
//! - `-std=c++17`: the same dialect the host-compiled copy (below) uses.
//! - No `--use_fast_math`: it flushes denormals and swaps `1/sqrtf`, division and `expf` for
//!   approximate instructions; these are reference kernels checked against an f32 oracle, and a
//!   kernel that wants an intrinsic writes `__expf`/`rsqrtf` itself where it can be seen.
//! - No `-O3`: nvcc's device code is already optimised at `-O3` by default (`-O` only
//!   affects host code, which a `-fatbin` build has none of).
//!
//! Files are compiled in parallel (one thread each, nvcc is single-threaded), each into a temporary
//! name in OUT_DIR that is renamed once complete, so an interrupted build never leaves a truncated
//! fatbin that a later build would embed.
//!
//! Later (DESIGN.md "Kernels on machines without a GPU"): the same `.cu` files will also be
//! compiled by the host C++ compiler with the `cc` crate (`-x c++ -std=c++17`, a portability
//! header `kernels/host/cuda_host.h` force-included with `-include`, `-I <nvcc include dir>` for
//! `cuda_bf16.h`) into a static library of `extern "C"` launch entry points (`<kernel>_host`)
//! that tests call to run each kernel on CPU threads. That step slots in after `compile_all` below:
//! it takes the same `kernels` list, uses `nvcc_include_dir` for the headers, emits its own
//! `cargo:rustc-link-lib=static=sppo_kernels_host`, and adds `kernels/host/**` to the rerun list
//! (already covered: the whole `kernels/` tree is watched).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const GENCODE: &[&str] = &[
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90a,code=sm_90a",
    "-gencode",
    "arch=compute_80,code=compute_80",
];
const BASE_FLAGS: &[&str] = &["-fatbin", "-std=c++17", "-lineinfo"];
const REQUIRED_RELEASE: &str = "release 13.0";
/// Relative to CARGO_MANIFEST_DIR; where `scripts/setup` installs nvcc from PyPI.
const PROJECT_NVCC: &str = ".tools/cuda/nvidia/cu13/bin/nvcc";

fn main() {
    if let Err(msg) = run() {
        // A build script's stderr is shown by cargo on failure; one readable block, no backtrace.
        eprintln!("\n{msg}\n");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    let kernels_dir = manifest_dir.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=NVCC_FLAGS");
    // The directory itself (files added or removed) and everything under it (sources, headers).
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    let mut watched = Vec::new();
    list_files(&kernels_dir, &mut watched)?;
    for f in &watched {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let mut kernels: Vec<PathBuf> = watched
        .iter()
        .filter(|p| p.parent() == Some(kernels_dir.as_path()) && p.extension().is_some_and(|e| e == "cu"))
        .cloned()
        .collect();
    kernels.sort();

    let nvcc = find_nvcc(&manifest_dir)?;
    println!("cargo:rerun-if-changed={}", nvcc.display());
    check_version(&nvcc)?;

    let extra: Vec<String> =
        std::env::var("NVCC_FLAGS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();

    let results = compile_all(&nvcc, &kernels_dir, &out_dir, &kernels, &extra);
    let mut errors = String::new();
    let mut times = String::new();
    for (src, res) in kernels.iter().zip(&results) {
        match res {
            Ok((secs, warnings)) => {
                let _ = writeln!(times, "{:.2}s {}", secs, src.display());
                println!("nvcc {:.2}s {}", secs, src.display());
                for line in warnings.lines().filter(|l| !l.trim().is_empty()) {
                    println!("cargo:warning={}: {}", file_name(src), line);
                }
            }
            Err(e) => {
                let _ = writeln!(errors, "{e}");
            }
        }
    }
    if !errors.is_empty() {
        return Err(format!("error: nvcc failed on kernels/*.cu (nvcc: {})\n{errors}", nvcc.display()));
    }
    write_file(&out_dir.join("nvcc-times.txt"), times.as_bytes())?;
    write_file(&out_dir.join("kernels.rs"), generate_rs(&kernels, &out_dir)?.as_bytes())?;
    Ok(())
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("build.rs: cargo did not set {name}"))
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Every file under `dir`, recursively (sources and headers both trigger a rebuild).
fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("build.rs: cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("build.rs: cannot read {}: {e}", dir.display()))?.path();
        if path.is_dir() {
            list_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// nvcc from `$NVCC`, `$CUDA_HOME/bin`, the project's `.tools`, or `PATH`, in that order.
fn find_nvcc(manifest_dir: &Path) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    // (label, path or None when the variable is unset), in search order.
    let env_path = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    let candidates = [
        ("$NVCC", env_path("NVCC")),
        ("$CUDA_HOME/bin/nvcc", env_path("CUDA_HOME").map(|home| home.join("bin/nvcc"))),
        ("this checkout's .tools (scripts/setup)", Some(manifest_dir.join(PROJECT_NVCC))),
    ];
    for (what, p) in candidates {
        match p {
            Some(p) if p.is_file() => return Ok(p),
            Some(p) => tried.push(format!("{what}: {} does not exist", p.display())),
            None => tried.push(format!("{what}: not set")),
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()) {
        return Ok(p);
    }
    tried.push("PATH: no nvcc in any of its directories".to_string());
    Err(format!(
        "error: nvcc (CUDA 13.0) not found; sppo compiles its CUDA kernels (kernels/*.cu) at build time.\n\
         Looked at:\n  {}\n\
         To fix, either:\n  \
         - run `scripts/setup --no-models` in the repository root: it installs nvcc 13.0 from PyPI into\n    \
           {} (about 105 MB, no GPU needed), or\n  \
         - set NVCC=/path/to/nvcc, or CUDA_HOME to a CUDA 13.0 toolkit (with bin/nvcc).",
        tried.join("\n  "),
        manifest_dir.join(PROJECT_NVCC).display()
    ))
}

fn check_version(nvcc: &Path) -> Result<(), String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("error: cannot run `{} --version`: {e}", nvcc.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "error: `{} --version` failed ({}):\n{}{}",
            nvcc.display(),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if !text.contains(REQUIRED_RELEASE) {
        let release = text.lines().find(|l| l.contains("release")).unwrap_or("unknown release");
        println!(
            "cargo:warning=nvcc at {} is '{}', not CUDA 13.0: the GPU machines' driver 580 rejects PTX \
             from newer toolkits (run scripts/setup, or set NVCC to a 13.0 nvcc)",
            nvcc.display(),
            release.trim()
        );
    }
    Ok(())
}

/// The directory holding `cuda_bf16.h` etc. next to an nvcc (`<root>/bin/nvcc` -> `<root>/include`).
/// Used by the future host-compiled kernel library; nvcc itself finds it through `nvcc.profile`.
#[allow(dead_code)]
fn nvcc_include_dir(nvcc: &Path) -> Option<PathBuf> {
    let dir = nvcc.parent()?.parent()?.join("include");
    dir.join("cuda_bf16.h").is_file().then_some(dir)
}

/// Compiles each kernel on its own thread; results in the order of `kernels`.
/// Ok: (seconds, nvcc's stderr/stdout on success, i.e. warnings). Err: a message naming the file.
fn compile_all(
    nvcc: &Path,
    kernels_dir: &Path,
    out_dir: &Path,
    kernels: &[PathBuf],
    extra: &[String],
) -> Vec<Result<(f64, String), String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> =
            kernels.iter().map(|src| s.spawn(move || compile_one(nvcc, kernels_dir, out_dir, src, extra))).collect();
        handles
            .into_iter()
            .zip(kernels)
            .map(|(h, src)| h.join().unwrap_or_else(|_| Err(format!("{}: compile thread panicked", src.display()))))
            .collect()
    })
}

fn compile_one(
    nvcc: &Path,
    kernels_dir: &Path,
    out_dir: &Path,
    src: &Path,
    extra: &[String],
) -> Result<(f64, String), String> {
    let stem = stem(src)?;
    let dest = out_dir.join(format!("{stem}.fatbin"));
    let tmp = out_dir.join(format!("{stem}.fatbin.tmp{}", std::process::id()));
    let mut cmd = Command::new(nvcc);
    cmd.args(BASE_FLAGS).args(GENCODE).arg("-I").arg(kernels_dir).args(extra).arg("-o").arg(&tmp).arg(src);
    let start = Instant::now();
    let out = cmd.output().map_err(|e| format!("{}: cannot run {}: {e}", src.display(), nvcc.display()))?;
    let secs = start.elapsed().as_secs_f64();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "--- nvcc failed on {} ({}) ---\ncommand: {:?}\n{}",
            src.display(),
            out.status,
            cmd,
            log.trim_end()
        ));
    }
    std::fs::rename(&tmp, &dest)
        .map_err(|e| format!("{}: cannot rename {} to {}: {e}", src.display(), tmp.display(), dest.display()))?;
    Ok((secs, log))
}

fn stem(src: &Path) -> Result<String, String> {
    let stem =
        src.file_stem().and_then(|s| s.to_str()).ok_or_else(|| format!("{}: not a UTF-8 file name", src.display()))?;
    let ok = stem.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && stem.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok || stem == "all" {
        return Err(format!("{}: kernel file names must be snake_case ([a-z][a-z0-9_]*) and not `all`: the name becomes a Rust const beside `ALL`", src.display()));
    }
    Ok(stem.to_owned())
}

fn generate_rs(kernels: &[PathBuf], out_dir: &Path) -> Result<String, String> {
    let mut rs = String::from("// @generated by build.rs from kernels/*.cu: one fatbin per file.\n\n");
    let mut names = Vec::new();
    for (id, src) in kernels.iter().enumerate() {
        let stem = stem(src)?;
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let konst = stem.to_ascii_uppercase();
        let _ = writeln!(
            rs,
            "/// Fatbin of `kernels/{stem}.cu`.\npub const {konst}: Kernel = Kernel {{\n    id: {id},\n    name: {stem:?},\n    fatbin: &Aligned(*include_bytes!({:?})).0,\n}};\n",
            fatbin.display().to_string()
        );
        names.push(konst);
    }
    let _ = writeln!(
        rs,
        "/// Every kernel file, indexed by `Kernel::id`.\npub static ALL: &[Kernel] = &[{}];",
        names.join(", ")
    );
    Ok(rs)
}

/// Writes through a temporary name so a reader never sees a partial file.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("build.rs: cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("build.rs: cannot rename {} to {}: {e}", tmp.display(), path.display()))
}
