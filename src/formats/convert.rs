//! GGUF → Hugging Face directory conversion for Llama and Mistral models.
//!
//! Writes, atomically (`crate::io::write_dir_atomic`): `config.json`, `model.safetensors` (HF tensor
//! names, f32 holding exactly the dequantised values, or bf16), `tokenizer.json` rebuilt from the
//! GGUF vocabulary, `tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json`.
//!
//! Two traps this file exists to get right:
//! - llama.cpp's `convert_hf_to_gguf.py` permutes the rows of `q_proj`/`k_proj` so that its RoPE can
//!   rotate adjacent pairs; HF rotates halves. [`unpermute_qk`] undoes it; [`permute_qk`] is
//!   llama.cpp's forward permutation, kept so tests can show that the wrong choice breaks the model.
//! - the tokenizer: a GGUF stores tokens, merges and token types, plus the *name* of a pre-tokenizer
//!   (`tokenizer.ggml.pre`); the splitting rules behind that name live in llama.cpp's code, so each
//!   supported name is spelled out here and an unknown one is an error rather than a silently
//!   different tokenizer.

use crate::formats::gguf::{GgmlType, GgufError, GgufFile, MetadataValue};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Element type of the tensors in `model.safetensors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    /// Exactly the dequantised values.
    F32,
    /// Dequantised values rounded to nearest-even bf16.
    Bf16,
}

impl OutDtype {
    fn safetensors_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "F32",
            OutDtype::Bf16 => "BF16",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::Bf16 => "bfloat16",
        }
    }

    fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::Bf16 => 2,
        }
    }
}

/// What to do with the rows of `q_proj`/`k_proj`. Only [`QkPermutation::Undo`] gives a correct model;
/// the others exist for negative tests (a model converted with them must produce garbage text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkPermutation {
    /// Undo llama.cpp's permutation ([`unpermute_qk`]): the correct conversion.
    Undo,
    /// Apply llama.cpp's permutation a second time ([`permute_qk`]): wrong on purpose.
    Forward,
    /// Copy rows as stored: wrong on purpose.
    Keep,
}

/// One tensor written to `model.safetensors`.
#[derive(Clone, Debug)]
pub struct ConvertedTensor {
    pub gguf_name: String,
    pub hf_name: String,
    pub gguf_dtype: GgmlType,
    /// Row-major shape as written.
    pub shape: Vec<usize>,
}

/// What [`convert_gguf_to_hf`] wrote and what it left out.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub out_dir: PathBuf,
    pub dtype: OutDtype,
    pub tensors: Vec<ConvertedTensor>,
    /// Metadata keys the conversion did not use (names, licences, quantisation settings ...).
    pub ignored_metadata: Vec<String>,
    /// GGUF tensors not written (e.g. `rope_freqs.weight`), with the reason.
    pub ignored_tensors: Vec<String>,
    /// Anything else worth knowing (skipped special tokens, duplicate vocabulary entries).
    pub notes: Vec<String>,
}

/// Converts `gguf` into a Hugging Face model directory at `out` (replaced atomically if it exists).
pub fn convert_gguf_to_hf(gguf: &Path, out: &Path, dtype: OutDtype) -> Result<ConvertReport> {
    convert_gguf_to_hf_with(gguf, out, dtype, QkPermutation::Undo)
}

/// [`convert_gguf_to_hf`] with a choice of Q/K row handling; anything but [`QkPermutation::Undo`]
/// writes a broken model on purpose (negative tests).
pub fn convert_gguf_to_hf_with(
    gguf: &Path,
    out: &Path,
    dtype: OutDtype,
    qk: QkPermutation,
) -> Result<ConvertReport> {
    let g = GgufFile::open(gguf)?;
    let meta = Meta {
        g: &g,
        used: RefCell::new(BTreeSet::new()),
    };
    let arch = ModelArch::read(&meta)?;
    let tok = build_tokenizer(&meta, arch.context_length)?;
    let config = arch.config_json(&meta, dtype)?;
    let plan = plan_tensors(&g, &arch)?;

    let mut notes = tok.notes.clone();
    if let Some(note) = &arch.note {
        notes.push(note.clone());
    }
    let generation_config = json!({
        "_from_model_config": true,
        "bos_token_id": arch.bos_id,
        "eos_token_id": arch.eos_id,
        "pad_token_id": arch.pad_id,
    });

    crate::io::write_dir_atomic(out, |dir| {
        write_json(&dir.join("config.json"), &config)?;
        write_json(&dir.join("generation_config.json"), &generation_config)?;
        write_json(&dir.join("tokenizer.json"), &tok.tokenizer_json)?;
        write_json(&dir.join("tokenizer_config.json"), &tok.tokenizer_config)?;
        write_json(
            &dir.join("special_tokens_map.json"),
            &tok.special_tokens_map,
        )?;
        write_safetensors(&g, &plan.entries, dtype, qk, &dir.join("model.safetensors"))
    })
    .with_context(|| format!("converting {} to {}", gguf.display(), out.display()))?;

    // Keys the file format itself consumes.
    meta.mark("general.alignment");
    let used = meta.used.borrow();
    let ignored_metadata = g
        .metadata()
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| !used.contains(k))
        .collect();
    Ok(ConvertReport {
        out_dir: out.to_path_buf(),
        dtype,
        tensors: plan
            .entries
            .iter()
            .map(|e| ConvertedTensor {
                gguf_name: e.gguf_name.clone(),
                hf_name: e.hf_name.clone(),
                gguf_dtype: e.gguf_dtype,
                shape: e.shape.clone(),
            })
            .collect(),
        ignored_metadata,
        ignored_tensors: plan.ignored,
        notes,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Q/K permutation

/// Row index map shared by both directions. Rows of one head, viewed as (2, d) in HF order and as
/// (d, 2) in llama.cpp order: HF row `j*d + i` is llama.cpp row `i*2 + j`.
fn permute_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_heads: usize,
    to_llama_cpp: bool,
) -> Result<Vec<f32>> {
    ensure!(
        n_heads > 0 && rows.is_multiple_of(2 * n_heads),
        "Q/K permutation: {rows} rows do not split into {n_heads} heads of an even size"
    );
    ensure!(
        w.len() == rows * cols,
        "Q/K permutation: {} values for a ({rows}, {cols}) matrix",
        w.len()
    );
    let d = rows / n_heads / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_heads {
        for i in 0..d {
            for j in 0..2 {
                let hf_row = h * 2 * d + j * d + i;
                let cpp_row = h * 2 * d + i * 2 + j;
                let (dst, src) = if to_llama_cpp {
                    (cpp_row, hf_row)
                } else {
                    (hf_row, cpp_row)
                };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// llama.cpp's permutation (`convert_hf_to_gguf.py`'s `permute`): the (rows, cols) matrix viewed as
/// (n_heads, 2, d, cols) with axes 1 and 2 swapped. `n_heads` is the attention heads for q, the
/// key/value heads for k.
pub fn permute_qk(w: &[f32], rows: usize, cols: usize, n_heads: usize) -> Result<Vec<f32>> {
    permute_rows(w, rows, cols, n_heads, true)
}

/// The inverse of [`permute_qk`]: (n_heads, d, 2, cols) with axes 1 and 2 swapped, which turns a
/// GGUF's Q/K rows back into Hugging Face's rotate-half layout.
pub fn unpermute_qk(w: &[f32], rows: usize, cols: usize, n_heads: usize) -> Result<Vec<f32>> {
    permute_rows(w, rows, cols, n_heads, false)
}

// ---------------------------------------------------------------------------------------------
// Metadata → config.json

/// Metadata access that records which keys were used, so the report can list the rest.
struct Meta<'a> {
    g: &'a GgufFile,
    used: RefCell<BTreeSet<String>>,
}

impl Meta<'_> {
    fn mark(&self, key: &str) {
        self.used.borrow_mut().insert(key.to_string());
    }
    fn u64(&self, key: &str) -> Result<u64> {
        self.mark(key);
        Ok(self.g.get_u64(key)?)
    }
    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.mark(key);
        Ok(self.g.opt_u64(key)?)
    }
    /// A float for config.json. An f32 is written as its shortest decimal (1e-5, not the widened
    /// 9.999999747378752e-6), which is what the HF config it came from said.
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.mark(key);
        Ok(match self.g.get(key) {
            Some(MetadataValue::F32(v)) => Some(v.to_string().parse::<f64>().unwrap_or(*v as f64)),
            _ => self.g.opt_f64(key)?,
        })
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| {
            GgufError::MissingKey {
                file: self.g.path().to_path_buf(),
                key: key.into(),
            }
            .into()
        })
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.mark(key);
        Ok(self.g.opt_bool(key)?)
    }
    fn str(&self, key: &str) -> Result<&str> {
        self.mark(key);
        Ok(self.g.get_str(key)?)
    }
    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.mark(key);
        Ok(self.g.opt_str(key)?)
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.u64(key)?;
        usize::try_from(v).map_err(|_| {
            anyhow!(
                "{}: metadata key '{key}' = {v} does not fit usize",
                self.g.path().display()
            )
        })
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(v) => Ok(Some(usize::try_from(v).map_err(|_| {
                anyhow!(
                    "{}: metadata key '{key}' = {v} does not fit usize",
                    self.g.path().display()
                )
            })?)),
        }
    }
}

/// The model hyper-parameters, resolved from `{arch}.*` keys.
struct ModelArch {
    /// `llama` or `mistral` (HF `model_type`).
    model_type: &'static str,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    context_length: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_scaling: Value,
    tied: bool,
    bos_id: Option<u64>,
    eos_id: Option<u64>,
    pad_id: Option<u64>,
    note: Option<String>,
}

impl ModelArch {
    fn read(m: &Meta) -> Result<ModelArch> {
        let g = m.g;
        let file = g.path().display().to_string();
        let arch = m.str("general.architecture")?;
        ensure!(
            arch == "llama" || arch == "mistral",
            "{file}: general.architecture is '{arch}'; only llama and mistral models convert"
        );
        let k = |suffix: &str| format!("{arch}.{suffix}");
        if let Some(n) = m.opt_u64(&k("expert_count"))? {
            ensure!(
                n == 0,
                "{file}: {} = {n}: mixture-of-experts models are not supported",
                k("expert_count")
            );
        }
        // llama.cpp writes Mistral 7B under the llama architecture; its name is the only trace left.
        let name = format!(
            "{} {}",
            g.opt_str("general.basename")?.unwrap_or(""),
            g.opt_str("general.name")?.unwrap_or("")
        )
        .to_lowercase();
        let model_type = if arch == "mistral" || name.contains("mistral") {
            "mistral"
        } else {
            "llama"
        };

        let hidden = m.usize(&k("embedding_length"))?;
        let layers = m.usize(&k("block_count"))?;
        let intermediate = m.usize(&k("feed_forward_length"))?;
        let heads = m.usize(&k("attention.head_count"))?;
        let kv_heads = m.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
        ensure!(
            heads > 0 && kv_heads > 0 && heads % kv_heads == 0,
            "{file}: {heads} attention heads and {kv_heads} key/value heads do not group"
        );
        let head_dim = match m.opt_usize(&k("attention.key_length"))? {
            Some(d) => d,
            None => {
                ensure!(hidden % heads == 0, "{file}: hidden size {hidden} is not a multiple of {heads} heads and {} is missing", k("attention.key_length"));
                hidden / heads
            }
        };
        if let Some(v) = m.opt_usize(&k("attention.value_length"))? {
            ensure!(v == head_dim, "{file}: value head size {v} differs from key head size {head_dim}; HF Llama needs them equal");
        }
        if let Some(r) = m.opt_usize(&k("rope.dimension_count"))? {
            ensure!(r == head_dim, "{file}: RoPE rotates {r} of {head_dim} head dimensions; HF Llama rotates all of them");
        }
        let context_length = m.usize(&k("context_length"))?;
        let rms_norm_eps = m.f64(&k("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = m.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0);

        let scaling_type = m.opt_str(&k("rope.scaling.type"))?;
        let factor = m.opt_f64(&k("rope.scaling.factor"))?;
        let scale_linear = m.opt_f64(&k("rope.scale_linear"))?; // older files
        let original = m.opt_u64(&k("rope.scaling.original_context_length"))?;
        let rope_scaling = match (scaling_type, factor, scale_linear) {
            (Some("none"), _, _) | (None, None, None) => Value::Null,
            (None, None, Some(f)) => json!({"type": "linear", "rope_type": "linear", "factor": f}),
            (t, f, _) => {
                let t = t.unwrap_or("linear");
                ensure!(
                    t == "linear" || t == "yarn",
                    "{file}: {} = '{t}' is not supported (linear, yarn)",
                    k("rope.scaling.type")
                );
                let f = f.ok_or_else(|| {
                    anyhow!(
                        "{file}: {} is set without {}",
                        k("rope.scaling.type"),
                        k("rope.scaling.factor")
                    )
                })?;
                let mut s = json!({"type": t, "rope_type": t, "factor": f});
                if let Some(o) = original {
                    s["original_max_position_embeddings"] = json!(o);
                }
                s
            }
        };

        let embd = g.tensor("token_embd.weight")?;
        let shape = embd.shape();
        ensure!(
            shape.len() == 2 && shape[1] == hidden,
            "{file}: token_embd.weight has shape {shape:?}, expected (vocab, {hidden})"
        );
        let vocab = match m.opt_usize(&k("vocab_size"))? {
            Some(v) => {
                ensure!(
                    v == shape[0],
                    "{file}: {} = {v} but token_embd.weight has {} rows",
                    k("vocab_size"),
                    shape[0]
                );
                v
            }
            None => shape[0],
        };

        let note = (model_type == "mistral").then(|| {
            "Mistral: GGUF does not record the sliding window; config.json sets sliding_window null (full attention, as llama.cpp runs it)".to_string()
        });
        Ok(ModelArch {
            model_type,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context_length,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tied: !g.has_tensor("output.weight"),
            bos_id: m.opt_u64("tokenizer.ggml.bos_token_id")?,
            eos_id: m.opt_u64("tokenizer.ggml.eos_token_id")?,
            pad_id: m.opt_u64("tokenizer.ggml.padding_token_id")?,
            note,
        })
    }

    fn config_json(&self, m: &Meta, dtype: OutDtype) -> Result<Value> {
        m.mark("general.name");
        m.mark("general.basename");
        let architecture = if self.model_type == "mistral" {
            "MistralForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        let mut c = json!({
            "architectures": [architecture],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.context_length,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "torch_dtype": dtype.torch_name(),
            "attention_bias": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
        });
        if self.model_type == "mistral" {
            c["sliding_window"] = Value::Null;
        } else {
            c["mlp_bias"] = json!(false);
            c["pretraining_tp"] = json!(1);
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors

/// How a tensor's rows are rearranged on the way out.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rows {
    AsIs,
    /// A q/k projection with this many heads.
    Qk(usize),
}

struct Entry {
    gguf_name: String,
    hf_name: String,
    gguf_dtype: GgmlType,
    shape: Vec<usize>,
    rows: Rows,
}

struct Plan {
    entries: Vec<Entry>,
    ignored: Vec<String>,
}

/// The HF name of a GGUF tensor of the Llama family, or `None` if it has none.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Checks every tensor the model needs is present with the shape the config implies, and that no
/// tensor would be silently dropped (a bias, say, would change the model).
fn plan_tensors(g: &GgufFile, a: &ModelArch) -> Result<Plan> {
    let file = g.path().display();
    let (h, q_rows, kv_rows) = (a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let mut wanted: Vec<(String, Vec<usize>, Rows)> =
        vec![("token_embd.weight".into(), vec![a.vocab, h], Rows::AsIs)];
    for l in 0..a.layers {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        wanted.extend([
            (b("attn_q"), vec![q_rows, h], Rows::Qk(a.heads)),
            (b("attn_k"), vec![kv_rows, h], Rows::Qk(a.kv_heads)),
            (b("attn_v"), vec![kv_rows, h], Rows::AsIs),
            (b("attn_output"), vec![h, q_rows], Rows::AsIs),
            (b("ffn_gate"), vec![a.intermediate, h], Rows::AsIs),
            (b("ffn_up"), vec![a.intermediate, h], Rows::AsIs),
            (b("ffn_down"), vec![h, a.intermediate], Rows::AsIs),
            (b("attn_norm"), vec![h], Rows::AsIs),
            (b("ffn_norm"), vec![h], Rows::AsIs),
        ]);
    }
    wanted.push(("output_norm.weight".into(), vec![h], Rows::AsIs));
    if !a.tied {
        wanted.push(("output.weight".into(), vec![a.vocab, h], Rows::AsIs));
    }

    let mut entries = Vec::with_capacity(wanted.len());
    for (name, shape, rows) in wanted {
        let t = g
            .tensor(&name)
            .with_context(|| format!("{file}: the config needs tensor '{name}'"))?;
        ensure!(
            t.shape() == shape,
            "{file}: tensor '{name}' has shape {:?}, the config implies {shape:?}",
            t.shape()
        );
        let hf_name =
            hf_tensor_name(&name).ok_or_else(|| anyhow!("internal: no HF name for '{name}'"))?;
        entries.push(Entry {
            gguf_name: name,
            hf_name,
            gguf_dtype: t.dtype,
            shape,
            rows,
        });
    }

    let planned: BTreeSet<&str> = entries.iter().map(|e| e.gguf_name.as_str()).collect();
    let mut ignored = Vec::new();
    for t in g.tensors() {
        if planned.contains(t.name.as_str()) {
            continue;
        }
        match t.name.as_str() {
            // Llama 3.1's frequency factors: HF recomputes them from `rope_scaling`, which the GGUF
            // does not keep; say so rather than pretend.
            "rope_freqs.weight" => ignored.push(
                "rope_freqs.weight: per-frequency RoPE factors (Llama 3.1 style); config.json has no matching rope_scaling".into(),
            ),
            n if n.ends_with(".attn_rot_embd") => ignored.push(format!("{n}: precomputed RoPE table, recomputed by HF")),
            n => bail!("{file}: tensor '{n}' has no place in a {} model; converting would drop it", a.model_type),
        }
    }
    Ok(Plan { entries, ignored })
}

/// Streams tensors into a safetensors file one at a time: the header is computable from shapes
/// alone, so a 7B model never needs all its f32 values in memory at once.
fn write_safetensors(
    g: &GgufFile,
    entries: &[Entry],
    dtype: OutDtype,
    qk: QkPermutation,
    path: &Path,
) -> Result<()> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for e in entries {
        let n: usize = e.shape.iter().product::<usize>() * dtype.size();
        header.insert(
            e.hf_name.clone(),
            json!({"dtype": dtype.safetensors_name(), "shape": e.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))?;
    // The data must start 8-byte aligned; the format pads the header with spaces.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    let mut buf = Vec::new();
    for e in entries {
        let mut values = g.dequantize(&e.gguf_name)?;
        if let Rows::Qk(n_heads) = e.rows {
            let (rows, cols) = (e.shape[0], e.shape[1]);
            values = match qk {
                QkPermutation::Undo => unpermute_qk(&values, rows, cols, n_heads),
                QkPermutation::Forward => permute_qk(&values, rows, cols, n_heads),
                QkPermutation::Keep => Ok(values),
            }
            .with_context(|| format!("tensor '{}'", e.gguf_name))?;
        }
        buf.clear();
        match dtype {
            OutDtype::F32 => buf.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            OutDtype::Bf16 => buf.extend(
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
            ),
        }
        w.write_all(&buf)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| anyhow!("writing {}: {}", path.display(), e.error()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// The tokenizer files of the output directory.
pub struct TokenizerFiles {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub special_tokens_map: Value,
    pub notes: Vec<String>,
}

/// Builds the tokenizer files from a GGUF's `tokenizer.*` metadata and checks that the `tokenizers`
/// crate loads the result. `model_max_length` goes into `tokenizer_config.json`.
pub fn tokenizer_files(g: &GgufFile, model_max_length: usize) -> Result<TokenizerFiles> {
    build_tokenizer(
        &Meta {
            g,
            used: RefCell::new(BTreeSet::new()),
        },
        model_max_length,
    )
}

// llama.cpp token types (`enum llama_token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Llama 3's split regex (`tokenizer.json` of Meta-Llama-3; llama.cpp's LLAMA3 pre-tokenizer).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's reversible byte → printable character map (`bytes_to_unicode` in HF and OpenAI code).
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        map[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    map
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": special,
    })
}

/// `TemplateProcessing` adding bos/eos around each sequence, as HF's Llama tokenizers do.
fn template_processor(bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (seq_id, type_id) in [("A", 0), ("B", 1)] {
        let part = if seq_id == "A" {
            &mut single
        } else {
            &mut pair
        };
        if let Some((t, _)) = bos {
            part.push(special(t, type_id));
        }
        part.push(seq(seq_id, type_id));
        if let Some((t, _)) = eos {
            part.push(special(t, type_id));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    for (t, id) in bos.into_iter().chain(eos) {
        specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// Merges implied by a SentencePiece vocabulary and its scores, exactly as HF's `generate_merges`
/// (used by transformers' GGUF loader): every split of a token into two vocabulary pieces, ranked by
/// the merged token's score (best first), then by the pieces' lengths, ties kept in vocabulary order.
fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    // Python dicts: a repeated token keeps its first position and its last id/score.
    let mut vocab: HashMap<&str, usize> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    let mut score: HashMap<&str, f32> = HashMap::new();
    for (i, (&t, &s)) in tokens.iter().zip(scores).enumerate() {
        if vocab.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, s);
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for &t in &order {
        let s = score[t];
        let mut local: Vec<(&str, &str, f32)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..], s))
            .filter(|(l, r, _)| vocab.contains_key(l) && vocab.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    // Python's sort(reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        let ka = (a.0.chars().count(), a.1.chars().count());
        let kb = (b.0.chars().count(), b.1.chars().count());
        b.2.total_cmp(&a.2).then(kb.cmp(&ka))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

fn build_tokenizer(m: &Meta, model_max_length: usize) -> Result<TokenizerFiles> {
    let g = m.g;
    let file = g.path().display().to_string();
    let model = m.str("tokenizer.ggml.model")?;
    m.mark("tokenizer.ggml.tokens");
    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let n = tokens.len();
    m.mark("tokenizer.ggml.token_type");
    let types = match g.get("tokenizer.ggml.token_type") {
        Some(_) => g.get_i64_array("tokenizer.ggml.token_type")?,
        None => vec![1; n],
    };
    ensure!(
        types.len() == n,
        "{file}: tokenizer.ggml.token_type has {} entries for {n} tokens",
        types.len()
    );
    let token_of = |key: &str| -> Result<Option<(&str, usize)>> {
        match m.opt_u64(key)? {
            None => Ok(None),
            Some(id) => {
                let t = tokens
                    .get(id as usize)
                    .ok_or_else(|| anyhow!("{file}: {key} = {id} is past the {n} tokens"))?;
                Ok(Some((*t, id as usize)))
            }
        }
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    let unk = token_of("tokenizer.ggml.unknown_token_id")?;
    let pad = token_of("tokenizer.ggml.padding_token_id")?;
    // llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise (so does transformers).
    let add_bos = m
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let add_eos = m.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos_for_template = if add_bos {
        Some(bos.ok_or_else(|| {
            anyhow!("{file}: add_bos_token is set but tokenizer.ggml.bos_token_id is missing")
        })?)
    } else {
        None
    };
    let eos_for_template = if add_eos {
        Some(eos.ok_or_else(|| {
            anyhow!("{file}: add_eos_token is set but tokenizer.ggml.eos_token_id is missing")
        })?)
    } else {
        None
    };

    let mut notes = Vec::new();
    let mut vocab = Map::new();
    let mut added = Vec::new();
    let tokenizer_json = match model {
        "gpt2" => {
            let spelling = bytes_to_unicode();
            let alphabet: BTreeSet<char> = spelling.iter().copied().collect();
            for (id, t) in tokens.iter().enumerate() {
                let in_alphabet = t.chars().all(|c| alphabet.contains(&c));
                // A token outside the byte alphabet is stored as raw text: spell its bytes (as HF does).
                let key = if in_alphabet {
                    t.to_string()
                } else {
                    t.bytes().map(|b| spelling[b as usize]).collect()
                };
                vocab.insert(key, json!(id));
                match types[id] {
                    TOKEN_CONTROL | TOKEN_UNKNOWN if in_alphabet => added.push(added_token(id, t, true)),
                    TOKEN_CONTROL | TOKEN_UNKNOWN => notes.push(format!(
                        "token {id} {t:?} is marked control but is not byte-level spelled; not added as special (as transformers does)"
                    )),
                    TOKEN_USER_DEFINED => added.push(added_token(id, t, false)),
                    _ => {}
                }
            }
            m.mark("tokenizer.ggml.merges");
            let merges = g
                .get_str_array("tokenizer.ggml.merges")?
                .into_iter()
                .map(|s| {
                    s.split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| anyhow!("{file}: tokenizer.ggml.merges entry {s:?} is not two tokens separated by a space"))
                })
                .collect::<Result<Vec<_>>>()?;
            let pre = m.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
            // llama.cpp's byte-level vocabularies normally say false here; honour true if a file says so.
            let prefix = m
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(false);
            let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": use_regex});
            // The pre-tokenizers behind llama.cpp's names (llama-vocab.cpp), as HF tokenizer.json spells them.
            let (pre_tokenizer, ignore_merges) = match pre {
                "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
                "smollm" => (
                    json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                    false,
                ),
                // Llama 3 looks a whole pre-token up before merging (llama.cpp: ignore_merges).
                "llama-bpe" | "llama3" | "llama-v3" => (
                    json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                        byte_level(false)]}),
                    true,
                ),
                other => bail!(
                    "{file}: tokenizer.ggml.pre = '{other}' is not supported (supported: default, gpt2, smollm, llama-bpe); \
                     its splitting rules are not stored in the file"
                ),
            };
            let byte_level_post = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
            let post_processor = if add_bos || add_eos {
                json!({"type": "Sequence", "processors": [byte_level_post, template_processor(bos_for_template, eos_for_template)]})
            } else {
                byte_level_post
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": post_processor,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                    "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
                },
            })
        }
        "llama" => {
            for (id, t) in tokens.iter().enumerate() {
                vocab.insert(t.to_string(), json!(id));
                match types[id] {
                    TOKEN_CONTROL | TOKEN_UNKNOWN => added.push(added_token(id, t, true)),
                    TOKEN_USER_DEFINED => added.push(added_token(id, t, false)),
                    _ => {}
                }
            }
            m.mark("tokenizer.ggml.merges");
            m.mark("tokenizer.ggml.scores");
            let merges: Vec<Value> = if g.get("tokenizer.ggml.merges").is_some() {
                g.get_str_array("tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|s| {
                        s.split_once(' ')
                            .map(|(a, b)| json!([a, b]))
                            .ok_or_else(|| anyhow!("{file}: tokenizer.ggml.merges entry {s:?} is not two tokens separated by a space"))
                    })
                    .collect::<Result<_>>()?
            } else {
                let scores = g
                    .get_f32_array("tokenizer.ggml.scores")
                    .context("a SentencePiece vocabulary without merges needs scores")?;
                ensure!(
                    scores.len() == n,
                    "{file}: tokenizer.ggml.scores has {} entries for {n} tokens",
                    scores.len()
                );
                merges_from_scores(&tokens, &scores)
                    .into_iter()
                    .map(|(a, b)| json!([a, b]))
                    .collect()
            };
            let add_prefix = m
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let post_processor = if add_bos || add_eos {
                template_processor(bos_for_template, eos_for_template)
            } else {
                Value::Null
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                                  "prepend_scheme": if add_prefix { "first" } else { "never" }, "split": false},
                "post_processor": post_processor,
                "decoder": {"type": "Sequence", "decoders": decoders},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk.map(|(t, _)| t), "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                    "ignore_merges": false, "vocab": vocab, "merges": merges,
                },
            })
        }
        other => bail!(
            "{file}: tokenizer.ggml.model = '{other}' is not supported (supported: gpt2, llama)"
        ),
    };
    if vocab_len(&tokenizer_json) != n {
        notes.push(format!(
            "the vocabulary repeats tokens: {} distinct of {n}",
            vocab_len(&tokenizer_json)
        ));
    }

    // Validate: the tokenizers crate must load what we write.
    let text = serde_json::to_string(&tokenizer_json)?;
    let loaded: tokenizers::Tokenizer = text
        .parse()
        .map_err(|e| anyhow!("{file}: the rebuilt tokenizer.json does not load: {e}"))?;
    ensure!(
        loaded.get_vocab_size(true) >= vocab_len(&tokenizer_json),
        "{file}: the rebuilt tokenizer has {} tokens, expected at least {}",
        loaded.get_vocab_size(true),
        vocab_len(&tokenizer_json)
    );

    fn name(t: Option<(&str, usize)>) -> Option<&str> {
        t.map(|(s, _)| s)
    }
    m.mark("tokenizer.chat_template");
    let chat_template = g.opt_str("tokenizer.chat_template")?;
    let mut tokenizer_config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": name(bos),
        "eos_token": name(eos),
        "pad_token": name(pad),
        "unk_token": name(unk),
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = chat_template {
        tokenizer_config["chat_template"] = json!(t);
    }
    let mut special_tokens_map = Map::new();
    for (k, t) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("pad_token", pad),
        ("unk_token", unk),
    ] {
        if let Some((s, _)) = t {
            special_tokens_map.insert(k.into(), json!(s));
        }
    }
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config,
        special_tokens_map: Value::Object(special_tokens_map),
        notes,
    })
}

fn vocab_len(tokenizer_json: &Value) -> usize {
    tokenizer_json["model"]["vocab"]
        .as_object()
        .map_or(0, |v| v.len())
}
