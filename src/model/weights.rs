//! The flat parameter layout (Hugging Face tensor name → offset, shape) and its conversion to and
//! from Hugging Face safetensors checkpoints (single file or sharded, f32/f16/bf16 on disk).
//!
//! Parameters, gradients and optimizer state are each ONE flat buffer with this layout (as in
//! llm.c), so one kernel updates them all and a layer's weight is a range of the buffer.

use crate::config::ModelConfig;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

impl ParamEntry {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// Offsets of every parameter in the flat buffer, in a fixed order.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub entries: Vec<ParamEntry>,
    index: HashMap<String, usize>,
    pub total: usize,
}

/// Ranges of one decoder layer's weights in the flat buffer.
#[derive(Clone, Debug)]
pub struct LayerRanges {
    pub input_layernorm: std::ops::Range<usize>,          // (C)
    pub q_proj: std::ops::Range<usize>,                   // (Hq*D, C)
    pub k_proj: std::ops::Range<usize>,                   // (Hkv*D, C)
    pub v_proj: std::ops::Range<usize>,                   // (Hkv*D, C)
    pub o_proj: std::ops::Range<usize>,                   // (C, Hq*D)
    pub post_attention_layernorm: std::ops::Range<usize>, // (C)
    pub gate_proj: std::ops::Range<usize>,                // (I, C)
    pub up_proj: std::ops::Range<usize>,                  // (I, C)
    pub down_proj: std::ops::Range<usize>,                // (C, I)
}

/// Ranges of the whole decoder.
#[derive(Clone, Debug)]
pub struct DecoderRanges {
    pub embed_tokens: std::ops::Range<usize>, // (V, C)
    pub layers: Vec<LayerRanges>,
    pub norm: std::ops::Range<usize>, // (C)
    /// (V, C); equal to `embed_tokens` when the embeddings are tied; `None` for a sequence
    /// classifier, which has no LM head.
    pub lm_head: Option<std::ops::Range<usize>>,
    /// (num_labels, C) `score.weight` of a sequence classifier (`*ForSequenceClassification`).
    pub score: Option<std::ops::Range<usize>>,
}

impl ParamLayout {
    pub fn new(shapes: Vec<(String, Vec<usize>)>) -> Self {
        let mut entries = Vec::with_capacity(shapes.len());
        let mut index = HashMap::new();
        let mut offset = 0;
        for (name, shape) in shapes {
            let len = shape.iter().product();
            index.insert(name.clone(), entries.len());
            entries.push(ParamEntry { name, shape, offset, len });
            offset += len;
        }
        ParamLayout { entries, index, total: offset }
    }

    /// The Llama/Mistral decoder: embeddings, then per layer attention and MLP weights, the final
    /// norm and, when untied, the LM head; a sequence classifier (`cfg.num_labels`) has the score
    /// head `score.weight` (num_labels, C) instead of any LM head, as transformers'
    /// `GenericForSequenceClassification`. Names are exactly Hugging Face's.
    pub fn llama(cfg: &ModelConfig) -> Self {
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let mut s: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![v, c])];
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            s.push((format!("{p}.input_layernorm.weight"), vec![c]));
            s.push((format!("{p}.self_attn.q_proj.weight"), vec![cfg.q_dim(), c]));
            s.push((format!("{p}.self_attn.k_proj.weight"), vec![cfg.kv_dim(), c]));
            s.push((format!("{p}.self_attn.v_proj.weight"), vec![cfg.kv_dim(), c]));
            s.push((format!("{p}.self_attn.o_proj.weight"), vec![c, cfg.q_dim()]));
            s.push((format!("{p}.post_attention_layernorm.weight"), vec![c]));
            s.push((format!("{p}.mlp.gate_proj.weight"), vec![i, c]));
            s.push((format!("{p}.mlp.up_proj.weight"), vec![i, c]));
            s.push((format!("{p}.mlp.down_proj.weight"), vec![c, i]));
        }
        s.push(("model.norm.weight".into(), vec![c]));
        match cfg.num_labels {
            Some(n) => s.push(("score.weight".into(), vec![n, c])),
            None if !cfg.tie_word_embeddings => s.push(("lm_head.weight".into(), vec![v, c])),
            None => {}
        }
        Self::new(s)
    }

    /// The BERT encoder (`BertModel` without its pooler): embeddings and their LayerNorm, then per
    /// layer self-attention, attention output (+ LayerNorm), intermediate and output (+ LayerNorm),
    /// every Linear with its bias. Names are Hugging Face's without the optional `bert.` prefix.
    pub fn bert(cfg: &crate::model::bert::BertConfig) -> Self {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut s: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![cfg.vocab_size, c]),
            ("embeddings.position_embeddings.weight".into(), vec![cfg.max_position_embeddings, c]),
            ("embeddings.token_type_embeddings.weight".into(), vec![cfg.type_vocab_size, c]),
            ("embeddings.LayerNorm.weight".into(), vec![c]),
            ("embeddings.LayerNorm.bias".into(), vec![c]),
        ];
        for l in 0..cfg.num_layers {
            let p = format!("encoder.layer.{l}");
            for (name, out, inp) in [
                ("attention.self.query", c, c),
                ("attention.self.key", c, c),
                ("attention.self.value", c, c),
                ("attention.output.dense", c, c),
                ("attention.output.LayerNorm", c, 0),
                ("intermediate.dense", i, c),
                ("output.dense", c, i),
                ("output.LayerNorm", c, 0),
            ] {
                // inp == 0 marks a LayerNorm: (C) weight; a Linear has an (out, in) weight.
                let w = if inp == 0 { vec![out] } else { vec![out, inp] };
                s.push((format!("{p}.{name}.weight"), w));
                s.push((format!("{p}.{name}.bias"), vec![out]));
            }
        }
        Self::new(s)
    }

    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// The range of a tensor this layout's own constructor created (`llama()`, `bert()`).
    pub(crate) fn range(&self, name: &str) -> std::ops::Range<usize> {
        // Only called with names the constructors created: a miss is a bug here, not bad input.
        self.get(name).map(ParamEntry::range).unwrap_or_else(|| panic!("layout has no tensor {name}"))
    }

    pub fn decoder_ranges(&self, cfg: &ModelConfig) -> DecoderRanges {
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let r = |s: &str| self.range(&format!("model.layers.{l}.{s}"));
                LayerRanges {
                    input_layernorm: r("input_layernorm.weight"),
                    q_proj: r("self_attn.q_proj.weight"),
                    k_proj: r("self_attn.k_proj.weight"),
                    v_proj: r("self_attn.v_proj.weight"),
                    o_proj: r("self_attn.o_proj.weight"),
                    post_attention_layernorm: r("post_attention_layernorm.weight"),
                    gate_proj: r("mlp.gate_proj.weight"),
                    up_proj: r("mlp.up_proj.weight"),
                    down_proj: r("mlp.down_proj.weight"),
                }
            })
            .collect();
        let embed_tokens = self.range("model.embed_tokens.weight");
        let (lm_head, score) = match cfg.num_labels {
            Some(_) => (None, Some(self.range("score.weight"))),
            None if cfg.tie_word_embeddings => (Some(embed_tokens.clone()), None),
            None => (Some(self.range("lm_head.weight")), None),
        };
        DecoderRanges { embed_tokens, layers, norm: self.range("model.norm.weight"), lm_head, score }
    }
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: malformed JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().with_context(|| format!("{}: weight_map[{tensor}] is not a file name", index.display()))?;
            let p = dir.join(file);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        Ok(files)
    } else if single.exists() {
        Ok(vec![single])
    } else {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
    }
}

/// Converts one stored tensor to f32 into `dst`.
fn tensor_to_f32(view: &TensorView<'_>, dst: &mut [f32], name: &str, file: &Path) -> Result<()> {
    let data = view.data();
    let n = dst.len();
    let elem = match view.dtype() {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => bail!("{}: tensor {name} has dtype {other:?}; supported are F32, F16, BF16", file.display()),
    };
    if data.len() != n * elem {
        bail!("{}: tensor {name} holds {} bytes, expected {} for {n} elements", file.display(), data.len(), n * elem);
    }
    // The data may be unaligned in the file: read element by element from bytes.
    match view.dtype() {
        Dtype::F32 => dst.iter_mut().zip(data.chunks_exact(4)).for_each(|(d, b)| *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => dst.iter_mut().zip(data.chunks_exact(2)).for_each(|(d, b)| *d = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => dst.iter_mut().zip(data.chunks_exact(2)).for_each(|(d, b)| *d = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        _ => unreachable!("checked above"),
    }
    Ok(())
}

/// Reads every tensor of `layout` from the model directory's safetensors into one flat f32 buffer.
/// Missing tensors, wrong shapes, unknown extra tensors and unsupported dtypes are errors naming
/// the file and tensor.
pub fn load_flat_f32(dir: &Path, layout: &ParamLayout, tied: bool) -> Result<Vec<f32>> {
    load_flat_f32_mapped(dir, layout, &|name: &str| {
        // Tied checkpoints sometimes also store the head; old ones store rotary buffers.
        if (tied && name == "lm_head.weight") || name.ends_with("rotary_emb.inv_freq") {
            None
        } else {
            Some(name.to_string())
        }
    })
}

/// [`load_flat_f32`] with a naming rule: `map(stored name)` gives the layout name to load the
/// tensor into, or `None` to skip it (buffers and heads a model does not use). A mapped name that
/// is not in the layout, or two stored tensors mapping to the same name, is an error.
pub fn load_flat_f32_mapped(dir: &Path, layout: &ParamLayout, map: &dyn Fn(&str) -> Option<String>) -> Result<Vec<f32>> {
    let mut flat = vec![0f32; layout.total];
    let mut seen: Vec<Option<String>> = vec![None; layout.entries.len()];
    for file in safetensors_files(dir)? {
        let f = std::fs::File::open(&file).with_context(|| format!("{}: cannot open", file.display()))?;
        // SAFETY: the map is read-only and lives only within this loop iteration; a file changed
        // underneath us could give garbage values but not unsoundness in safe code reading bytes.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("{}: cannot map", file.display()))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", file.display()))?;
        // Sorted so the first error reported does not depend on hash order.
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (stored, view) in tensors {
            let Some(name) = map(&stored) else { continue };
            let Some(entry) = layout.get(&name) else {
                bail!("{}: unexpected tensor {stored} (not part of this model's configuration)", file.display());
            };
            if view.shape() != entry.shape.as_slice() {
                bail!("{}: tensor {stored} has shape {:?}, the config implies {:?}", file.display(), view.shape(), entry.shape);
            }
            let idx = layout.index[&name];
            if let Some(first) = &seen[idx] {
                bail!("{}: tensor {stored} and {first} both hold {name}", file.display());
            }
            tensor_to_f32(&view, &mut flat[entry.range()], &stored, &file)?;
            seen[idx] = Some(stored.clone());
        }
    }
    if let Some(missing) = layout.entries.iter().zip(&seen).find(|(_, s)| s.is_none()) {
        bail!("{}: tensor {} is missing from the checkpoint", dir.display(), missing.0.name);
    }
    if let Some(bad) = layout.entries.iter().find(|e| flat[e.range()].iter().any(|x| !x.is_finite())) {
        bail!("{}: tensor {} contains NaN or infinite values", dir.display(), bad.name);
    }
    Ok(flat)
}

/// On-disk dtype of a checkpoint we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

impl SaveDtype {
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }
}

/// Serialises named f32 tensors to safetensors bytes in `dtype` (bf16 rounds to nearest even).
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>, &[f32])], dtype: SaveDtype) -> Result<Vec<u8>> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let bytes = match dtype {
                SaveDtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                SaveDtype::Bf16 => data.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
            };
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(st_dtype, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("building safetensors: {e}"))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views, Some(meta)).map_err(|e| anyhow::anyhow!("serialising safetensors: {e}"))
}

/// Writes the flat parameters as `<dir>/model.safetensors` (atomic file write).
pub fn save_flat(dir: &Path, layout: &ParamLayout, flat: &[f32], dtype: SaveDtype) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        layout.entries.iter().map(|e| (e.name.clone(), e.shape.clone(), &flat[e.range()])).collect();
    let bytes = safetensors_bytes(&tensors, dtype)?;
    crate::io::write_atomic(&dir.join("model.safetensors"), &bytes)
}

/// Tensors by name: (shape, values as f32).
pub type TensorsF32 = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Loads every tensor of a safetensors file as f32 (fixtures, tests).
pub fn read_all_f32(path: &Path) -> Result<TensorsF32> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let n: usize = view.shape().iter().product();
        let vals: Vec<f32> = match view.dtype() {
            Dtype::I64 => view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32).collect(),
            Dtype::I32 => view.data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as f32).collect(),
            _ => {
                let mut v = vec![0f32; n];
                tensor_to_f32(&view, &mut v, &name, path)?;
                v
            }
        };
        out.insert(name, (view.shape().to_vec(), vals));
    }
    Ok(out)
}
