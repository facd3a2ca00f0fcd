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
//! Second pass, host C++ (DESIGN.md "Kernels on machines without a GPU"), in `compile_host`: the
//! same `.cu` files are compiled by the host C++ compiler with the `cc` crate (`-std=c++20`,
//! `kernels/host/cuda_host.h` force-included with `-include`, the nvcc include directory for
//! `cuda_bf16.h`) into `libsppo_kernels_host.a`. For each `extern "C" __global__` kernel, build.rs
//! parses the signature and generates a C++ entry point `<kernel>_host(grid, block, args...)`
//! (`OUT_DIR/host/<stem>_host.cpp`) and its Rust declaration (`OUT_DIR/kernels_host.rs`, included
//! by `src/backend/cuda/host.rs`), so both sides come from one parse. Tests run every variant on
//! CPU threads with it; see the header of `cuda_host.h` for the model and its limits. A kernel
//! parameter type the generator does not know is a build error naming the kernel (`rust_type`).
//! Cost on 2 cores: about 2.6 s of g++ for rmsnorm.cu (the `<barrier>`/`<thread>` headers dominate).

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
    compile_host(&nvcc, &kernels_dir, &out_dir, &kernels)?;
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
/// Used by the host-compiled kernel library; nvcc itself finds it through `nvcc.profile`.
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

// ---- the same kernels as host C++ (CPU tests) ----

/// One `extern "C" __global__ void name(params)` of a kernel file.
struct KernelSig {
    name: String,
    /// (C type as written, normalised; parameter name)
    params: Vec<(String, String)>,
}

/// Compiles each `kernels/<stem>.cu` with the host C++ compiler, `kernels/host/cuda_host.h`
/// force-included, into `libsppo_kernels_host.a`, with one generated entry point per kernel:
/// `extern "C" int <kernel>_host(gx, gy, gz, bx, by, bz, params...)` running the grid on CPU
/// threads (0 = ok). Writes the matching Rust declarations to `OUT_DIR/kernels_host.rs`, from the
/// same parsed signatures, so the two sides cannot drift.
fn compile_host(nvcc: &Path, kernels_dir: &Path, out_dir: &Path, kernels: &[PathBuf]) -> Result<(), String> {
    let include = nvcc_include_dir(nvcc).ok_or_else(|| {
        format!(
            "error: no cuda_bf16.h in the include directory beside {} (needed to compile kernels as host C++)",
            nvcc.display()
        )
    })?;
    let host_dir = out_dir.join("host");
    std::fs::create_dir_all(&host_dir).map_err(|e| format!("build.rs: cannot create {}: {e}", host_dir.display()))?;
    let mut rs = String::from(
        "// @generated by build.rs: CPU-thread launch entry points of kernels/*.cu (kernels/host/cuda_host.h).\n\
         // Each returns 0, or 1 after printing why to stderr.\n\nextern \"C\" {\n",
    );
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(&include)
        .include(kernels_dir)
        .flag("-include")
        .flag(kernels_dir.join("host/cuda_host.h").to_string_lossy().as_ref())
        .flag_if_supported("-Wno-unused-function")
        .opt_level(2);
    for src in kernels {
        let text = std::fs::read_to_string(src).map_err(|e| format!("build.rs: cannot read {}: {e}", src.display()))?;
        let sigs = parse_kernels(&text).map_err(|e| format!("{}: {e}", src.display()))?;
        let mut cpp = format!("// @generated by build.rs\n#include {:?}\n\n", src.display().to_string());
        for sig in &sigs {
            let c_params: Vec<String> = sig.params.iter().map(|(t, n)| format!("{t} {n}")).collect();
            let names: Vec<&str> = sig.params.iter().map(|(_, n)| n.as_str()).collect();
            let _ = writeln!(
                cpp,
                "extern \"C\" int {k}_host(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz{sep}{params}) {{\n    \
                 return sppo_host::launch(\"{k}\", uint3{{gx, gy, gz}}, uint3{{bx, by, bz}}, [=] {{ {k}({args}); }});\n}}\n",
                k = sig.name,
                sep = if c_params.is_empty() { "" } else { ", " },
                params = c_params.join(", "),
                args = names.join(", "),
            );
            let mut rust_params = Vec::new();
            for (t, n) in &sig.params {
                let rt = rust_type(t).ok_or_else(|| {
                    format!("{}: kernel {}: parameter `{t} {n}` has a type the host harness does not map to Rust (see rust_type in build.rs)", src.display(), sig.name)
                })?;
                rust_params.push(format!("{n}: {rt}"));
            }
            let _ = writeln!(
                rs,
                "    /// `{k}` of `kernels/{file}`, run on CPU threads.\n    pub fn {k}_host(gx: u32, gy: u32, gz: u32, bx: u32, by: u32, bz: u32{sep}{params}) -> i32;",
                k = sig.name,
                file = file_name(src),
                sep = if rust_params.is_empty() { "" } else { ", " },
                params = rust_params.join(", "),
            );
        }
        let cpp_path = host_dir.join(format!("{}_host.cpp", stem(src)?));
        write_file(&cpp_path, cpp.as_bytes())?;
        build.file(&cpp_path);
    }
    rs.push_str("}\n");
    let start = Instant::now();
    build
        .try_compile("sppo_kernels_host")
        .map_err(|e| format!("error: compiling kernels/*.cu as host C++ failed: {e}"))?;
    println!("host c++ {:.2}s for {} kernel file(s)", start.elapsed().as_secs_f64(), kernels.len());
    write_file(&out_dir.join("kernels_host.rs"), rs.as_bytes())
}

/// The `extern "C" __global__ void` kernels of a source file, with their parameters.
fn parse_kernels(text: &str) -> Result<Vec<KernelSig>, String> {
    const MARK: &str = "extern \"C\" __global__ void";
    let mut sigs = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let mut s = rest[at + MARK.len()..].trim_start();
        if let Some(after) = s.strip_prefix("__launch_bounds__") {
            let close = after.find(')').ok_or("unterminated __launch_bounds__")?;
            s = after[close + 1..].trim_start();
        }
        let name_len = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
        let name = s[..name_len].to_string();
        let s2 = s[name_len..].trim_start();
        let body = s2.strip_prefix('(').ok_or_else(|| format!("kernel {name}: expected '(' after the name"))?;
        let close = body.find(')').ok_or_else(|| format!("kernel {name}: unterminated parameter list"))?;
        let mut params = Vec::new();
        for p in body[..close].split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "void") {
            let p = p.replace("__restrict__", " ").replace('*', " * ");
            let words: Vec<&str> = p.split_whitespace().collect();
            let (pname, ty) = words.split_last().ok_or_else(|| format!("kernel {name}: empty parameter"))?;
            if ty.is_empty() {
                return Err(format!("kernel {name}: parameter `{pname}` needs a name"));
            }
            params.push((ty.join(" "), pname.to_string()));
        }
        sigs.push(KernelSig { name, params });
        rest = &body[close..];
    }
    Ok(sigs)
}

/// The Rust FFI type of a kernel parameter's C type (normalised: `const float *`).
fn rust_type(c: &str) -> Option<&'static str> {
    Some(match c {
        "float *" => "*mut f32",
        "const float *" => "*const f32",
        "bf16 *" | "__nv_bfloat16 *" => "*mut half::bf16",
        "const bf16 *" | "const __nv_bfloat16 *" => "*const half::bf16",
        "int *" => "*mut i32",
        "const int *" => "*const i32",
        "const unsigned *" | "const unsigned int *" => "*const u32",
        "int" => "i32",
        "unsigned" | "unsigned int" => "u32",
        "float" => "f32",
        "double *" => "*mut f64",
        "const double *" => "*const f64",
        "double" => "f64",
        "size_t" => "usize",
        "long long" => "i64",
        _ => return None,
    })
}
