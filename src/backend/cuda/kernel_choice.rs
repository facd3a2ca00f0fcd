//! Which variant of each kernel concern the CUDA backend launches, chosen by name so an experiment
//! swaps one kernel without touching the model: `--kernel attention=naive,rmsnorm=warp` or the
//! `SPPO_KERNELS` environment variable (same syntax; the flag wins). Unknown concerns and unknown
//! variants are errors listing the choices.

use super::error::{CudaError, Result};
use super::ops::attention::AttentionVariant;
use super::ops::bias::BiasVariant;
use super::ops::embedding::EmbeddingVariant;
use super::ops::gelu::GeluVariant;
use super::ops::layernorm::LayerNormVariant;
use super::ops::rmsnorm::RmsNormVariant;
use super::ops::rope::RopeVariant;
use super::ops::sampling::SamplingVariant;
use super::ops::swiglu::SwigluVariant;

/// The environment variable read by [`KernelChoice::from_env`].
pub const ENV: &str = "SPPO_KERNELS";

/// One variant per concern; [`Default`] is the fastest correct one of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    pub attention: AttentionVariant,
    pub rmsnorm: RmsNormVariant,
    pub sampling: SamplingVariant,
    pub embedding: EmbeddingVariant,
    pub rope: RopeVariant,
    pub swiglu: SwigluVariant,
    pub gelu: GeluVariant,
    pub layernorm: LayerNormVariant,
    pub bias: BiasVariant,
}

impl Default for KernelChoice {
    fn default() -> Self {
        KernelChoice {
            attention: AttentionVariant::Fused,
            rmsnorm: RmsNormVariant::Warp,
            sampling: SamplingVariant::Search,
            embedding: EmbeddingVariant::Coalesced,
            rope: RopeVariant::Flat,
            swiglu: SwigluVariant::Grid,
            gelu: GeluVariant::Grid,
            layernorm: LayerNormVariant::Warp,
            bias: BiasVariant::Grid,
        }
    }
}

/// The concerns a spec may name.
pub const CONCERNS: &[&str] = &["attention", "rmsnorm", "sampling", "embedding", "rope", "swiglu", "gelu", "layernorm", "bias"];

impl KernelChoice {
    /// The defaults with `spec` applied: `concern=variant` pairs separated by commas (spaces
    /// ignored, empty spec = defaults). A concern named twice keeps the last.
    pub fn parse(spec: &str) -> Result<Self> {
        Self::default().with(spec)
    }

    /// `self` with `spec` applied (see [`KernelChoice::parse`]).
    pub fn with(mut self, spec: &str) -> Result<Self> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((concern, variant)) = item.split_once('=') else {
                return Err(CudaError::Shape {
                    op: "kernel choice",
                    detail: format!("'{item}' is not concern=variant (concerns: {})", CONCERNS.join(", ")),
                });
            };
            let variant = variant.trim();
            match concern.trim() {
                "attention" => self.attention = AttentionVariant::from_name(variant)?,
                "rmsnorm" => self.rmsnorm = RmsNormVariant::from_name(variant)?,
                "sampling" => self.sampling = SamplingVariant::from_name(variant)?,
                "embedding" => self.embedding = EmbeddingVariant::from_name(variant)?,
                "rope" => self.rope = RopeVariant::from_name(variant)?,
                "swiglu" => self.swiglu = SwigluVariant::from_name(variant)?,
                "gelu" => self.gelu = GeluVariant::from_name(variant)?,
                "layernorm" => self.layernorm = LayerNormVariant::from_name(variant)?,
                "bias" => self.bias = BiasVariant::from_name(variant)?,
                other => {
                    return Err(CudaError::UnknownVariant {
                        concern: "kernel concern",
                        name: other.to_string(),
                        choices: CONCERNS.join(", "),
                    })
                }
            }
        }
        Ok(self)
    }

    /// The defaults, then `SPPO_KERNELS`, then `flag` (the `--kernel` value, if given).
    pub fn from_env(flag: Option<&str>) -> Result<Self> {
        let mut c = Self::default();
        if let Ok(spec) = std::env::var(ENV) {
            c = c.with(&spec).map_err(|e| CudaError::Shape { op: "kernel choice", detail: format!("{ENV}: {e}") })?;
        }
        if let Some(spec) = flag {
            c = c.with(spec).map_err(|e| CudaError::Shape { op: "kernel choice", detail: format!("--kernel: {e}") })?;
        }
        Ok(c)
    }

    /// `attention=fused,rmsnorm=warp,...`: what a run used, for logs and metrics.
    pub fn describe(&self) -> String {
        format!(
            "attention={},rmsnorm={},sampling={},embedding={},rope={},swiglu={},gelu={},layernorm={},bias={}",
            self.attention.name(),
            self.rmsnorm.name(),
            self.sampling.name(),
            self.embedding.name(),
            self.rope.name(),
            self.swiglu.name(),
            self.gelu.name(),
            self.layernorm.name(),
            self.bias.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_by_name() {
        let c = KernelChoice::parse(" attention = naive , rmsnorm=naive").unwrap();
        assert_eq!(c.attention, AttentionVariant::Naive);
        assert_eq!(c.rmsnorm, RmsNormVariant::Naive);
        assert_eq!(c.sampling, KernelChoice::default().sampling);
        assert_eq!(KernelChoice::parse("").unwrap(), KernelChoice::default());
        // The description parses back to the same choice.
        assert_eq!(KernelChoice::parse(&c.describe()).unwrap(), c);
        let e = KernelChoice::parse("attention=flash9").unwrap_err().to_string();
        assert!(e.contains("flash9") && e.contains("naive") && e.contains("fused"), "{e}");
        let e = KernelChoice::parse("softmax=fast").unwrap_err().to_string();
        assert!(e.contains("softmax") && e.contains("attention"), "{e}");
        let e = KernelChoice::parse("attention").unwrap_err().to_string();
        assert!(e.contains("concern=variant"), "{e}");
    }
}
