//! Launcher for `kernels/sampling.cu`: one token per row of f32 logits with the CPU sampler's
//! exact procedure (`src/sampling.rs` module doc): temperature, top-k, top-p, min-p, then one
//! inverse-CDF draw with the row's uniform. The uniforms come from the host's counter-based
//! generator (`RngKey::uniform`), the same keys as the CPU path, so both pick the same tokens.
//!
//! Shapes: logits (rows, V) f32 on the device; `uniforms` (rows) host f32 in [0, 1) (uploaded);
//! `tokens`, `status` (rows) i32 device outputs, OVERWRITTEN. [`sample_rows`] downloads them and
//! turns a failed row into the CPU sampler's error (NaN/+inf logit, all -inf, overflow).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::error::{CudaError, Result};
use crate::backend::cuda::kernels::SAMPLING;
use crate::sampling::SamplingParams;

const OP: &str = "sampling";

/// Largest vocabulary the kernel's id search covers.
pub const MAX_VOCAB: usize = 1 << 30;

/// Sampling kernel variants (see the header of `kernels/sampling.cu`):
/// - `Search`: one block per row, thresholds found by bitwise binary searches over the order key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplingVariant {
    Search,
}

impl SamplingVariant {
    pub const ALL: &'static [SamplingVariant] = &[SamplingVariant::Search];

    pub fn name(self) -> &'static str {
        match self {
            SamplingVariant::Search => "search",
        }
    }

    /// The variant called `name`; an unknown name is an error listing the choices.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name).ok_or_else(|| CudaError::UnknownVariant {
            concern: "sampling",
            name: name.to_string(),
            choices: Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
        })
    }

    pub fn kernel(self) -> &'static str {
        match self {
            SamplingVariant::Search => "sampling_draw_f32_search",
        }
    }
}

/// A checked call: the kernel's scalar arguments and launch shape.
#[derive(Clone, Debug)]
pub struct SamplingPlan {
    pub config: LaunchConfig,
    pub rows: i32,
    pub vocab: i32,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
}

fn err(detail: impl Into<String>) -> CudaError {
    CudaError::Shape { op: OP, detail: detail.into() }
}

/// Checks a call and plans it; `threads` per block (a multiple of 32, at most 1024: the GPU
/// launcher uses 1024, host tests fewer).
pub fn plan_sampling(params: &SamplingParams, vocab: usize, logits_len: usize, uniforms: &[f32], threads: u32) -> Result<SamplingPlan> {
    params.validate().map_err(|e| err(e.to_string()))?;
    if vocab == 0 || vocab > MAX_VOCAB {
        return Err(err(format!("vocabulary of {vocab} tokens (must be 1 ..= {MAX_VOCAB})")));
    }
    let rows = uniforms.len();
    if rows == 0 || logits_len != rows * vocab {
        return Err(err(format!("logits has {logits_len} elements, expected (rows={rows}, V={vocab}) = {}", rows * vocab)));
    }
    if let Some((r, u)) = uniforms.iter().enumerate().find(|(_, u)| !(0.0..1.0).contains(*u)) {
        return Err(err(format!("uniform of row {r} is {u}, must be in [0, 1)")));
    }
    if threads == 0 || !threads.is_multiple_of(32) || threads > 1024 {
        return Err(err(format!("{threads} threads per block (a multiple of 32, at most 1024)")));
    }
    let too_big = |what: &str, v: usize| err(format!("{what} = {v} does not fit the kernel's int"));
    Ok(SamplingPlan {
        config: LaunchConfig {
            grid_dim: (u32::try_from(rows).map_err(|_| too_big("rows", rows))?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        },
        rows: i32::try_from(rows).map_err(|_| too_big("rows", rows))?,
        vocab: vocab as i32, // <= MAX_VOCAB
        temperature: params.temperature,
        // top_k above the vocabulary keeps everything, as on the CPU.
        top_k: i32::try_from(params.top_k.min(vocab)).unwrap_or(i32::MAX),
        top_p: params.top_p,
        min_p: params.min_p,
    })
}

/// The tokens of a finished launch, or the first failed row as the CPU sampler words it.
pub fn finish_rows(tokens: &[i32], status: &[i32], plan: &SamplingPlan) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::with_capacity(tokens.len());
    for (r, (&t, &s)) in tokens.iter().zip(status).enumerate() {
        match s {
            0 if t >= 0 && t < plan.vocab => out.push(t as u32),
            1 => anyhow::bail!("sample: row {r}: logit at token {t} is NaN or +inf (NaN and +inf are invalid)"),
            2 => anyhow::bail!("sample: row {r}: all {} logits are -inf", plan.vocab),
            3 => anyhow::bail!("sample: row {r}: logit at token {t} / temperature {} overflows f32", plan.temperature),
            _ => anyhow::bail!("internal: sampling kernel returned status {s}, token {t} for row {r}"),
        }
    }
    Ok(out)
}

/// Draws one token per row (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn sample_rows(
    dev: &CudaDevice,
    variant: SamplingVariant,
    tokens: &mut CudaViewMut<'_, i32>,
    status: &mut CudaViewMut<'_, i32>,
    logits: &CudaView<'_, f32>,
    vocab: usize,
    uniforms: &[f32],
    params: &SamplingParams,
) -> anyhow::Result<Vec<u32>> {
    let plan = plan_sampling(params, vocab, logits.len(), uniforms, 1024)?;
    if tokens.len() != uniforms.len() || status.len() != uniforms.len() {
        return Err(err(format!("tokens has {}, status {} elements, expected rows = {}", tokens.len(), status.len(), uniforms.len())).into());
    }
    let d_uniforms = dev.upload(uniforms)?;
    let f = dev.function(&SAMPLING, variant.kernel())?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut *tokens).arg(&mut *status).arg(logits).arg(&d_uniforms);
    b.arg(&plan.rows).arg(&plan.vocab).arg(&plan.temperature).arg(&plan.top_k).arg(&plan.top_p).arg(&plan.min_p);
    // SAFETY: sampling_draw_f32_search(int* tokens, int* status, const float* logits,
    // const float* uniforms, int rows, int V, float temperature, int top_k, float top_p,
    // float min_p), matching the arguments above; the plan checked logits = rows × V, the
    // uniforms and params, and the launch is one block of 1024 threads per row.
    unsafe { b.launch(plan.config) }.map_err(CudaError::driver(format!("launching {}", variant.kernel())))?;
    let mut host_tokens = vec![0i32; uniforms.len()];
    let mut host_status = vec![0i32; uniforms.len()];
    dev.stream().memcpy_dtoh(&*tokens, &mut host_tokens).map_err(CudaError::driver("downloading sampled tokens"))?;
    dev.stream().memcpy_dtoh(&*status, &mut host_status).map_err(CudaError::driver("downloading sampling status"))?;
    finish_rows(&host_tokens, &host_status, &plan)
}
