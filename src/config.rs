//! Model configuration: `config.json` as found on disk ([`HfConfig`], both the classic layout with
//! `rope_theta`/`rope_scaling`/`torch_dtype` and the transformers-5 layout with `rope_parameters`/
//! `dtype`) resolved into the [`ModelConfig`] the model code uses, plus `generation_config.json`.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Decoder families we run. Both are the same computation; Mistral adds the sliding window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
}

/// How rotary frequencies are scaled (Hugging Face `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// Everything the model needs, resolved and validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Mistral: a query sees itself and the `window - 1` keys before it.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was stored in (`torch_dtype` / `dtype`), kept when saving.
    pub stored_dtype: String,
    /// `Some(n)` for `LlamaForSequenceClassification` / `MistralForSequenceClassification`: the
    /// checkpoint has a score head `score.weight` (n, C) and no LM head. `None` for causal LMs.
    pub num_labels: Option<usize>,
}

/// `config.json` as written by transformers 4 (classic) or 5; unknown keys are kept in `raw`.
#[derive(Deserialize, Debug)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    num_labels: Option<usize>,
    id2label: Option<Value>,
}

/// Reads an id or list of ids (`eos_token_id` may be either).
fn token_ids(v: &Option<Value>, key: &str) -> Result<Vec<u32>> {
    let as_id = |x: &Value| -> Result<u32> {
        x.as_u64().and_then(|n| u32::try_from(n).ok()).with_context(|| format!("`{key}` must be a token id or a list of ids, got {x}"))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(xs)) => xs.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

fn get_f64(obj: &Value, key: &str, what: &str) -> Result<f64> {
    obj.get(key).and_then(Value::as_f64).with_context(|| format!("{what}: missing or non-numeric `{key}`"))
}

fn parse_rope(rope: &Value, what: &str) -> Result<RopeScaling> {
    if rope.is_null() {
        return Ok(RopeScaling::Default);
    }
    let kind = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: get_f64(rope, "factor", what)? },
        "llama3" => RopeScaling::Llama3 {
            factor: get_f64(rope, "factor", what)?,
            low_freq_factor: get_f64(rope, "low_freq_factor", what)?,
            high_freq_factor: get_f64(rope, "high_freq_factor", what)?,
            original_max_position_embeddings: get_f64(rope, "original_max_position_embeddings", what)?,
        },
        other => bail!("{what}: rope type `{other}` is not supported (supported: default, linear, llama3)"),
    })
}

/// The number of classifier labels as transformers resolves it (`PretrainedConfig.__init__`):
/// the size of `id2label` when present (it must agree with `num_labels` if both are given), else
/// `num_labels`, else transformers' default of 2.
fn num_labels(hf: &HfConfig) -> Result<usize> {
    let from_map = match &hf.id2label {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.len()),
        Some(other) => bail!("`id2label` must be an object mapping label ids to names, got {other}"),
    };
    let n = match (from_map, hf.num_labels) {
        (Some(m), Some(n)) if m != n => bail!("`num_labels` {n} disagrees with the {m} entries of `id2label`"),
        (Some(m), _) => m,
        (None, Some(n)) => n,
        (None, None) => 2,
    };
    if n == 0 {
        bail!("a sequence classifier needs at least one label (`num_labels` / `id2label`)");
    }
    Ok(n)
}

impl ModelConfig {
    /// Reads `<dir>/config.json` (and `generation_config.json` for the EOS ids, when present).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read the model config", path.display()))?;
        let mut cfg = Self::from_json_str(&text).with_context(|| format!("{}: invalid model config", path.display()))?;
        if let Some(gen) = GenerationConfig::from_model_dir(dir)? {
            if !gen.eos_token_ids.is_empty() {
                cfg.eos_token_ids = gen.eos_token_ids;
            }
        }
        Ok(cfg)
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).context("malformed JSON")?;
        if !raw.is_object() {
            bail!("expected a JSON object");
        }
        let hf: HfConfig = serde_json::from_value(raw).context("unexpected value types")?;
        let arch_name = hf.architectures.as_ref().and_then(|a| a.first().cloned()).unwrap_or_default();
        let model_type = hf.model_type.clone().unwrap_or_default();
        let arch = match (arch_name.as_str(), model_type.as_str()) {
            ("LlamaForCausalLM" | "LlamaForSequenceClassification", _) | ("", "llama") => Arch::Llama,
            ("MistralForCausalLM" | "MistralForSequenceClassification", _) | ("", "mistral") => Arch::Mistral,
            _ => bail!(
                "unsupported architecture `{}` (model_type `{model_type}`): supported are LlamaForCausalLM, MistralForCausalLM \
                 and their *ForSequenceClassification variants",
                if arch_name.is_empty() { "?" } else { &arch_name }
            ),
        };
        let num_labels = if arch_name.ends_with("ForSequenceClassification") { Some(num_labels(&hf)?) } else { None };
        let need = |v: Option<usize>, key: &str| v.filter(|&n| n > 0).with_context(|| format!("missing or zero `{key}`"));
        let hidden_size = need(hf.hidden_size, "hidden_size")?;
        let num_heads = need(hf.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}");
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given");
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even and positive (rotary embedding pairs)");
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (Llama/Mistral use silu)");
            }
        }
        if hf.attention_bias == Some(true) || hf.mlp_bias == Some(true) {
            bail!("attention_bias / mlp_bias = true is not supported yet (no Llama or Mistral release uses biases)");
        }
        // transformers 5 moves theta and scaling into `rope_parameters`; classic configs keep
        // `rope_theta` + `rope_scaling`. Accept either (and both, if they agree).
        let (rope_theta, rope_scaling) = match &hf.rope_parameters {
            Some(p) if !p.is_null() => {
                let theta = match p.get("rope_theta").and_then(Value::as_f64) {
                    Some(t) => t,
                    None => hf.rope_theta.unwrap_or(10000.0),
                };
                (theta, parse_rope(p, "rope_parameters")?)
            }
            _ => (
                hf.rope_theta.unwrap_or(10000.0),
                parse_rope(hf.rope_scaling.as_ref().unwrap_or(&Value::Null), "rope_scaling")?,
            ),
        };
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            bail!("rope_theta must be positive, got {rope_theta}");
        }
        let sliding_window = match (&hf.sliding_window, hf.use_sliding_window) {
            (_, Some(false)) | (None, _) | (Some(Value::Null), _) => None,
            (Some(v), _) => {
                let w = v.as_u64().with_context(|| format!("sliding_window must be a positive integer or null, got {v}"))? as usize;
                if w == 0 {
                    bail!("sliding_window must be positive");
                }
                Some(w)
            }
        };
        let rms_norm_eps = hf.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            bail!("rms_norm_eps must be a non-negative number");
        }
        Ok(ModelConfig {
            arch,
            vocab_size: need(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(hf.intermediate_size, "intermediate_size")?,
            num_layers: need(hf.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(&hf.bos_token_id, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(&hf.eos_token_id, "eos_token_id")?,
            pad_token_id: token_ids(&hf.pad_token_id, "pad_token_id")?.first().copied(),
            stored_dtype: hf.dtype.or(hf.torch_dtype).unwrap_or_else(|| "float32".into()),
            num_labels,
        })
    }

    /// The same configuration with another stored dtype (what a saved checkpoint declares).
    pub fn with_dtype(mut self, dtype: &str) -> Self {
        self.stored_dtype = dtype.to_string();
        self
    }

    /// The rotary inverse frequencies (head_dim/2), computed in f32 like transformers so that
    /// positions far into the context rotate identically.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> =
            (0..d / 2).map(|i| 1.0f32 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32)).collect();
        match self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high, old) =
                    (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
                let low_freq_wavelen = old / low;
                let high_freq_wavelen = old / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// A classic-layout `config.json` for this configuration (used when saving a model that came
    /// without one).
    pub fn to_hf_json(&self) -> Value {
        let rope_scaling = match self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let (arch, model_type) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Mistral => ("MistralForCausalLM", "mistral"),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.into(),
        };
        serde_json::json!({
            "architectures": [arch], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window, "bos_token_id": self.bos_token_id, "eos_token_id": eos,
            "pad_token_id": self.pad_token_id, "torch_dtype": self.stored_dtype, "attention_bias": false, "mlp_bias": false,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// `generation_config.json`: the ids that end a response, and the sampling defaults of the model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
}

impl GenerationConfig {
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", path.display()))?;
        let ctx = || format!("{}: invalid generation config", path.display());
        let opt = |k: &str| v.get(k).cloned();
        Ok(Some(GenerationConfig {
            bos_token_id: token_ids(&opt("bos_token_id"), "bos_token_id").with_context(ctx)?.first().copied(),
            eos_token_ids: token_ids(&opt("eos_token_id"), "eos_token_id").with_context(ctx)?,
            pad_token_id: token_ids(&opt("pad_token_id"), "pad_token_id").with_context(ctx)?.first().copied(),
            temperature: v.get("temperature").and_then(Value::as_f64).map(|x| x as f32),
            top_p: v.get("top_p").and_then(Value::as_f64).map(|x| x as f32),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|x| x as usize),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIC: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":100,"hidden_size":48,
      "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
      "head_dim":16,"rms_norm_eps":1e-5,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3",
      "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16},
      "torch_dtype":"bfloat16","tie_word_embeddings":true,"eos_token_id":[2,7]}"#;

    #[test]
    fn classic_layout() {
        let c = ModelConfig::from_json_str(CLASSIC).unwrap();
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.stored_dtype, "bfloat16");
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn v5_layout() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures":["MistralForCausalLM"],"vocab_size":100,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":1,"num_attention_heads":4,"rope_parameters":{"rope_type":"default","rope_theta":1000.0},
            "dtype":"float16","sliding_window":5}"#,
        )
        .unwrap();
        assert_eq!(c.arch, Arch::Mistral);
        assert_eq!(c.rope_theta, 1000.0);
        assert_eq!(c.sliding_window, Some(5));
        assert_eq!(c.stored_dtype, "float16");
        assert_eq!(c.head_dim, 8);
    }

    #[test]
    fn sequence_classifiers() {
        let base = r#""vocab_size":100,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":1,"num_attention_heads":4"#;
        let parse = |extra: &str| ModelConfig::from_json_str(&format!("{{{base},{extra}}}"));
        let c = parse(r#""architectures":["LlamaForSequenceClassification"],"id2label":{"0":"LABEL_0"},"pad_token_id":7"#).unwrap();
        assert_eq!((c.arch, c.num_labels, c.pad_token_id), (Arch::Llama, Some(1), Some(7)));
        let c = parse(r#""architectures":["MistralForSequenceClassification"],"num_labels":3"#).unwrap();
        assert_eq!((c.arch, c.num_labels), (Arch::Mistral, Some(3)));
        // transformers' default when a classifier config names no labels.
        assert_eq!(parse(r#""architectures":["LlamaForSequenceClassification"]"#).unwrap().num_labels, Some(2));
        assert_eq!(parse(r#""architectures":["LlamaForCausalLM"],"num_labels":1"#).unwrap().num_labels, None);
        let err = format!("{:#}", parse(r#""architectures":["LlamaForSequenceClassification"],"num_labels":2,"id2label":{"0":"a"}"#).unwrap_err());
        assert!(err.contains("disagrees"), "{err}");
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = [
            (r#"{"architectures":["GPT2LMHeadModel"]}"#, "unsupported architecture"),
            (r#"{"architectures":["LlamaForCausalLM"],"hidden_size":32}"#, "num_attention_heads"),
            (r#"[1,2]"#, "JSON object"),
            (
                r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":32,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#,
                "multiple",
            ),
            (
                r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":32,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":4,"rope_scaling":{"rope_type":"yarn","factor":2}}"#,
                "yarn",
            ),
        ];
        for (text, want) in bad {
            let err = format!("{:#}", ModelConfig::from_json_str(text).unwrap_err());
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
