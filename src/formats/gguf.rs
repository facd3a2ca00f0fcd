//! GGUF reader (llama.cpp's model format, versions 2 and 3) over a memory map.
//!
//! Layout (little-endian; <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! ```text
//! "GGUF" u32 version, u64 tensor_count, u64 kv_count
//! kv_count × (string key, u32 value_type, value)            metadata
//! tensor_count × (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
//! padding to general.alignment (default 32)
//! tensor data; each tensor at data_start + offset
//! ```
//! A string is `u64 len` + UTF-8 bytes; an array is `u32 elem_type, u64 len` + elements (arrays may nest).
//!
//! `ne[0]` is the fastest-varying dimension, so a 2-D tensor with `ne = [cols, rows]` is the row-major
//! `(rows, cols)` matrix Hugging Face uses: [`TensorInfo::shape`] gives that reversed order.
//!
//! Every read is bounds-checked: a truncated or corrupt file yields a [`GgufError`] naming the file and
//! the key or tensor being read, never a panic. Dequantisation follows ggml's reference
//! `dequantize_row_*` functions (`ggml-quants.c`) bit for bit, in the same f32 operation order.

use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Why reading a GGUF file failed. Every variant names the file; most name the key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: truncated: needed {need} bytes at offset {offset} for {what}, file has {len} bytes")]
    Truncated {
        file: PathBuf,
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },
    #[error("{file}: {msg}")]
    Invalid { file: PathBuf, msg: String },
    #[error("{file}: missing metadata key '{key}'")]
    MissingKey { file: PathBuf, key: String },
    #[error("{file}: metadata key '{key}' is {found}, expected {expected}")]
    WrongType {
        file: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{file}: no tensor named '{name}'")]
    MissingTensor { file: PathBuf, name: String },
    #[error("{file}: tensor '{tensor}' has type {dtype}, which this reader cannot dequantize (supported: {supported})")]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
        supported: String,
    },
    #[error("{file}: tensor '{tensor}' data [{start}, {end}) lies past the end of the file ({len} bytes)")]
    TensorOutOfBounds {
        file: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },
}

pub type Result<T> = std::result::Result<T, GgufError>;

/// ggml tensor types (`enum ggml_type` in ggml.h). Ids that ggml has removed or that this reader does
/// not know stay as `Unknown(id)`: the file still opens, only reading that tensor fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq2Xxs,
    Iq2Xs,
    Iq3Xxs,
    Iq1S,
    Iq4Nl,
    Iq3S,
    Iq2S,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Iq1M,
    Bf16,
    Tq1_0,
    Tq2_0,
    Unknown(u32),
}

/// The types [`GgufFile::dequantize`] handles.
pub const DEQUANTIZABLE: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Bf16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Iq4Nl,
    GgmlType::Iq4Xs,
];

/// The non-linear 4-bit code book of IQ4_NL and IQ4_XS (`kvalues_iq4nl` in ggml).
const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Elements per super-block of the K-quants (`QK_K`).
pub const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => Iq2Xxs,
            17 => Iq2Xs,
            18 => Iq3Xxs,
            19 => Iq1S,
            20 => Iq4Nl,
            21 => Iq3S,
            22 => Iq2S,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => Iq1M,
            30 => Bf16,
            34 => Tq1_0,
            35 => Tq2_0,
            other => Unknown(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            Iq2Xxs => 16,
            Iq2Xs => 17,
            Iq3Xxs => 18,
            Iq1S => 19,
            Iq4Nl => 20,
            Iq3S => 21,
            Iq2S => 22,
            Iq4Xs => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            Iq1M => 29,
            Bf16 => 30,
            Tq1_0 => 34,
            Tq2_0 => 35,
            Unknown(id) => id,
        }
    }

    /// `(elements per block, bytes per block)` from ggml's `type_traits`; `None` for unknown ids.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Bf16 => (1, 2),
            F64 => (1, 8),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            Q4_0 => (32, 18), // f16 d, 16 B nibbles
            Q4_1 => (32, 20), // f16 d, f16 m, 16 B nibbles
            Q5_0 => (32, 22), // f16 d, u32 high bits, 16 B nibbles
            Q5_1 => (32, 24), // f16 d, f16 m, u32 high bits, 16 B nibbles
            Q8_0 => (32, 34), // f16 d, 32 × i8
            Q8_1 => (32, 36), // f16 d, f16 s, 32 × i8
            Q2K => (QK_K, 84),  // 16 B 4-bit scales/mins, 64 B 2-bit codes, f16 d, f16 dmin
            Q3K => (QK_K, 110), // 32 B high bits, 64 B 2-bit codes, 12 B 6-bit scales, f16 d
            Q4K => (QK_K, 144), // f16 d, f16 dmin, 12 B scales, 128 B nibbles
            Q5K => (QK_K, 176), // f16 d, f16 dmin, 12 B scales, 32 B high bits, 128 B nibbles
            Q6K => (QK_K, 210), // 128 B low nibbles, 64 B high 2-bits, 16 × i8 scales, f16 d
            Q8K => (QK_K, 292),
            Iq2Xxs => (QK_K, 66),
            Iq2Xs => (QK_K, 74),
            Iq3Xxs => (QK_K, 98),
            Iq1S => (QK_K, 50),
            Iq4Nl => (32, 18),
            Iq3S => (QK_K, 110),
            Iq2S => (QK_K, 82),
            Iq4Xs => (QK_K, 136),
            Iq1M => (QK_K, 56),
            Tq1_0 => (QK_K, 54),
            Tq2_0 => (QK_K, 66),
            Unknown(_) => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgmlType::*;
        let name = match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq2Xxs => "IQ2_XXS",
            Iq2Xs => "IQ2_XS",
            Iq3Xxs => "IQ3_XXS",
            Iq1S => "IQ1_S",
            Iq4Nl => "IQ4_NL",
            Iq3S => "IQ3_S",
            Iq2S => "IQ2_S",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Iq1M => "IQ1_M",
            Bf16 => "BF16",
            Tq1_0 => "TQ1_0",
            Tq2_0 => "TQ2_0",
            Unknown(id) => return write!(f, "unknown ggml type id {id}"),
        };
        f.write_str(name)
    }
}

/// Metadata value types (`enum gguf_type`).
mod vtype {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value. Arrays hold values of one type (possibly arrays themselves).
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The type's name for error messages, e.g. `u32` or `array of string`.
    pub fn type_name(&self) -> String {
        match self {
            MetadataValue::U8(_) => "u8".into(),
            MetadataValue::I8(_) => "i8".into(),
            MetadataValue::U16(_) => "u16".into(),
            MetadataValue::I16(_) => "i16".into(),
            MetadataValue::U32(_) => "u32".into(),
            MetadataValue::I32(_) => "i32".into(),
            MetadataValue::U64(_) => "u64".into(),
            MetadataValue::I64(_) => "i64".into(),
            MetadataValue::F32(_) => "f32".into(),
            MetadataValue::F64(_) => "f64".into(),
            MetadataValue::Bool(_) => "bool".into(),
            MetadataValue::String(_) => "string".into(),
            MetadataValue::Array(v) => match v.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "empty array".into(),
            },
        }
    }

    /// Any integer type, if it is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v as u64),
            MetadataValue::U16(v) => Some(v as u64),
            MetadataValue::U32(v) => Some(v as u64),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::I8(v) => Some(v as i64),
            MetadataValue::I16(v) => Some(v as i64),
            MetadataValue::I32(v) => Some(v as i64),
            MetadataValue::I64(v) => Some(v),
            MetadataValue::U8(v) => Some(v as i64),
            MetadataValue::U16(v) => Some(v as i64),
            MetadataValue::U32(v) => Some(v as i64),
            MetadataValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// f32 or f64 (an f64 is narrowed: metadata floats are hyper-parameters like eps or rope theta).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v as f64),
            MetadataValue::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest.
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data; `None` when the type is unknown (its block size is not known).
    pub n_bytes: Option<u64>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major shape as Hugging Face and safetensors write it (ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: parsed header, metadata and tensor table, with the data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    /// Metadata in file order.
    metadata: Vec<(String, MetadataValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
}

/// Bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    file: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = (self.pos as u64)
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len() as u64);
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                file: self.file.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                need: n,
                len: self.bytes.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| GgufError::Invalid {
            file: self.file.to_path_buf(),
            msg: format!("{} is not valid UTF-8: {e}", what()),
        })
    }

    fn invalid(&self, msg: String) -> GgufError {
        GgufError::Invalid {
            file: self.file.to_path_buf(),
            msg,
        }
    }

    /// One value of type `ty`; `what` names the key (and element) for errors.
    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<MetadataValue> {
        Ok(match ty {
            vtype::U8 => MetadataValue::U8(u8::from_le_bytes(self.array(what)?)),
            vtype::I8 => MetadataValue::I8(i8::from_le_bytes(self.array(what)?)),
            vtype::U16 => MetadataValue::U16(u16::from_le_bytes(self.array(what)?)),
            vtype::I16 => MetadataValue::I16(i16::from_le_bytes(self.array(what)?)),
            vtype::U32 => MetadataValue::U32(u32::from_le_bytes(self.array(what)?)),
            vtype::I32 => MetadataValue::I32(i32::from_le_bytes(self.array(what)?)),
            vtype::U64 => MetadataValue::U64(u64::from_le_bytes(self.array(what)?)),
            vtype::I64 => MetadataValue::I64(i64::from_le_bytes(self.array(what)?)),
            vtype::F32 => MetadataValue::F32(f32::from_le_bytes(self.array(what)?)),
            vtype::F64 => MetadataValue::F64(f64::from_le_bytes(self.array(what)?)),
            vtype::BOOL => match u8::from_le_bytes(self.array(what)?) {
                0 => MetadataValue::Bool(false),
                1 => MetadataValue::Bool(true),
                b => {
                    return Err(
                        self.invalid(format!("{}: bool byte is {b}, expected 0 or 1", what()))
                    )
                }
            },
            vtype::STRING => MetadataValue::String(self.string(what)?),
            vtype::ARRAY => {
                // Nesting is legal but a corrupt file could recurse without end.
                if depth >= 8 {
                    return Err(
                        self.invalid(format!("{}: arrays nested deeper than 8 levels", what()))
                    );
                }
                let elem_ty = self.u32(&|| format!("the element type of {}", what()))?;
                let len = self.u64(&|| format!("the length of {}", what()))?;
                // Every element takes at least one byte: refuse lengths the file cannot hold before
                // allocating, so a corrupt length reports truncation instead of exhausting memory.
                let min_size = match elem_ty {
                    vtype::U8 | vtype::I8 | vtype::BOOL => 1,
                    vtype::U16 | vtype::I16 => 2,
                    vtype::U32 | vtype::I32 | vtype::F32 => 4,
                    vtype::U64 | vtype::I64 | vtype::F64 | vtype::STRING => 8,
                    vtype::ARRAY => 12,
                    other => {
                        return Err(
                            self.invalid(format!("{}: unknown array element type {other}", what()))
                        )
                    }
                };
                if len.saturating_mul(min_size) > self.remaining() {
                    return Err(GgufError::Truncated {
                        file: self.file.to_path_buf(),
                        what: format!("{} ({len} elements)", what()),
                        offset: self.pos as u64,
                        need: len.saturating_mul(min_size),
                        len: self.bytes.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(len as usize);
                for i in 0..len {
                    items.push(self.value(elem_ty, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                MetadataValue::Array(items)
            }
            other => {
                return Err(self.invalid(format!("{}: unknown metadata value type {other}", what())))
            }
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`. Fails (never panics) on a bad magic, an unsupported version, truncation
    /// anywhere in the header or a tensor whose data lies past the end of the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            file: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is outside
        // what any reader can guard against (same contract as safetensors' and candle's loaders).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile> {
        let mut c = Cursor {
            file: &path,
            bytes: &mmap[..],
            pos: 0,
        };
        let magic = c.array::<4>(&|| "the magic".into())?;
        if &magic != b"GGUF" {
            return Err(c.invalid(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = c.u32(&|| "the version".into())?;
        match version {
            2 | 3 => {}
            1 => return Err(c.invalid("GGUF version 1 (32-bit counts) is not supported; re-convert with a current llama.cpp".into())),
            v if v.swap_bytes() <= 3 => return Err(c.invalid("big-endian GGUF files are not supported".into())),
            v => return Err(c.invalid(format!("unsupported GGUF version {v} (supported: 2, 3)"))),
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;
        // A key-value pair takes at least 12 bytes and a tensor info at least 24: bound counts by the
        // file size so a corrupt count cannot trigger a huge allocation.
        if n_kv.saturating_mul(12) > c.remaining() || n_tensors.saturating_mul(24) > c.remaining() {
            return Err(GgufError::Truncated {
                file: path.clone(),
                what: format!("{n_kv} metadata entries and {n_tensors} tensor infos"),
                offset: c.pos as u64,
                need: n_kv
                    .saturating_mul(12)
                    .saturating_add(n_tensors.saturating_mul(24)),
                len: mmap.len() as u64,
            });
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut metadata_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let ty = c.u32(&|| format!("the type of metadata key '{key}'"))?;
            let value = c.value(ty, 0, &|| format!("metadata key '{key}'"))?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.invalid(format!("metadata key '{key}' appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index
            .get("general.alignment")
            .map(|&i| &metadata[i].1)
        {
            None => 32,
            Some(MetadataValue::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(c.invalid(format!(
                    "general.alignment must be a power-of-two u32, found {} {v:?}",
                    v.type_name()
                )))
            }
        };

        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor #{i}"))?;
            let n_dims = c.u32(&|| format!("the rank of tensor '{name}'"))?;
            if n_dims > 4 {
                return Err(c.invalid(format!(
                    "tensor '{name}' has {n_dims} dimensions (ggml allows at most 4)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&|| format!("dimension {d} of tensor '{name}'"))?);
            }
            let dtype = GgmlType::from_id(c.u32(&|| format!("the type of tensor '{name}'"))?);
            let rel = c.u64(&|| format!("the data offset of tensor '{name}'"))?;
            infos.push((name, dims, dtype, rel));
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;

        let mut tensors = Vec::with_capacity(infos.len());
        let mut tensor_index = HashMap::new();
        for (name, dims, dtype, rel) in infos {
            let invalid = |msg: String| GgufError::Invalid {
                file: path.clone(),
                msg: format!("tensor '{name}': {msg}"),
            };
            if rel % alignment != 0 {
                return Err(invalid(format!(
                    "data offset {rel} is not a multiple of the alignment {alignment}"
                )));
            }
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| invalid(format!("element count of shape {dims:?} overflows")))?;
            let n_bytes = match dtype.block_layout() {
                None => None,
                Some((block, size)) => {
                    let ne0 = dims.first().copied().unwrap_or(1);
                    if ne0 % block as u64 != 0 {
                        return Err(invalid(format!(
                            "first dimension {ne0} is not a multiple of the {dtype} block size {block}"
                        )));
                    }
                    Some(n_elements / block as u64 * size as u64)
                }
            };
            let offset = data_offset
                .checked_add(rel)
                .ok_or_else(|| invalid(format!("data offset {rel} overflows")))?;
            if let Some(n) = n_bytes {
                let end = offset.saturating_add(n);
                if end > file_len {
                    return Err(GgufError::TensorOutOfBounds {
                        file: path.clone(),
                        tensor: name,
                        start: offset,
                        end,
                        len: file_len,
                    });
                }
            } else if offset > file_len {
                return Err(GgufError::TensorOutOfBounds {
                    file: path.clone(),
                    tensor: name,
                    start: offset,
                    end: offset,
                    len: file_len,
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(invalid("appears twice in the tensor table".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset,
                n_bytes,
            });
        }

        Ok(GgufFile {
            path,
            mmap,
            version,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&MetadataValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.path.clone(),
            key: key.into(),
        })
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &MetadataValue) -> GgufError {
        GgufError::WrongType {
            file: self.path.clone(),
            key: key.into(),
            expected,
            found: v.type_name(),
        }
    }

    /// Converts a present value, or `None` if the key is absent; a present value of the wrong type is
    /// an error (a silently ignored mistyped key would give a wrong config).
    fn typed<T>(
        &self,
        key: &str,
        expected: &'static str,
        f: impl Fn(&MetadataValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| self.wrong(key, expected, v)),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let v = self.require(key)?;
        v.as_i64().ok_or_else(|| self.wrong(key, "an integer", v))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong(key, "a float", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong(key, "a bool", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", MetadataValue::as_u64)
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a float", MetadataValue::as_f64)
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", MetadataValue::as_bool)
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong(key, "an array of strings", v))?;
        arr.iter()
            .map(|e| {
                e.as_str()
                    .ok_or_else(|| self.wrong(key, "an array of strings", v))
            })
            .collect()
    }

    /// An array of integers of any width (e.g. `tokenizer.ggml.token_type`, stored as i32).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong(key, "an array of integers", v))?;
        arr.iter()
            .map(|e| {
                e.as_i64()
                    .ok_or_else(|| self.wrong(key, "an array of integers", v))
            })
            .collect()
    }

    /// An array of f32 or f64 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.require(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong(key, "an array of floats", v))?;
        arr.iter()
            .map(|e| {
                e.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| self.wrong(key, "an array of floats", v))
            })
            .collect()
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorInfo> {
        self.tensor_ref(name).cloned()
    }

    fn tensor_ref(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor {
                file: self.path.clone(),
                name: name.into(),
            })
    }

    fn unsupported(&self, t: &TensorInfo) -> GgufError {
        GgufError::UnsupportedDtype {
            file: self.path.clone(),
            tensor: t.name.clone(),
            dtype: t.dtype.to_string(),
            supported: DEQUANTIZABLE
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// The tensor's raw bytes (bounds were checked at open; checked again here to stay panic-free).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_ref(name)?;
        let n = t.n_bytes.ok_or_else(|| self.unsupported(t))?;
        let len = self.mmap.len() as u64;
        let end = t
            .offset
            .checked_add(n)
            .filter(|&e| e <= len)
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                file: self.path.clone(),
                tensor: t.name.clone(),
                start: t.offset,
                end: t.offset.saturating_add(n),
                len,
            })?;
        Ok(&self.mmap[t.offset as usize..end as usize])
    }

    /// The tensor as f32 values in storage order (row-major in [`TensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_ref(name)?;
        if !DEQUANTIZABLE.contains(&t.dtype) {
            return Err(self.unsupported(t));
        }
        let bytes = self.tensor_bytes(name)?;
        let n = t.n_elements() as usize;
        let mut out = Vec::with_capacity(n);
        dequantize_into(t.dtype, bytes, &mut out).map_err(|msg| GgufError::Invalid {
            file: self.path.clone(),
            msg: format!("tensor '{}': {msg}", t.name),
        })?;
        if out.len() != n {
            return Err(GgufError::Invalid {
                file: self.path.clone(),
                msg: format!(
                    "tensor '{}': dequantized {} values, shape {:?} has {n}",
                    t.name,
                    out.len(),
                    t.shape()
                ),
            });
        }
        Ok(out)
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Splits `bytes` into `size`-byte blocks; an incomplete tail is an error (open() already rejects
/// it, this keeps the function safe on its own).
fn blocks(
    bytes: &[u8],
    size: usize,
    dtype: GgmlType,
) -> std::result::Result<std::slice::ChunksExact<'_, u8>, String> {
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes is not a whole number of {size}-byte {dtype} blocks",
            bytes.len()
        ));
    }
    Ok(bytes.chunks_exact(size))
}

/// The K-quant 6-bit scale and min `j` (0..8) packed in 12 bytes (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Appends the values of `bytes` (whole blocks of `dtype`) to `out`, as ggml's `dequantize_row_*`.
pub fn dequantize_into(
    dtype: GgmlType,
    bytes: &[u8],
    out: &mut Vec<f32>,
) -> std::result::Result<(), String> {
    use GgmlType::*;
    match dtype {
        F32 => out
            .extend(blocks(bytes, 4, dtype)?.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        F16 => {
            out.extend(blocks(bytes, 2, dtype)?.map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
        Bf16 => {
            out.extend(blocks(bytes, 2, dtype)?.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()))
        }
        Q8_0 => {
            for b in blocks(bytes, 34, dtype)? {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        Q4_0 => {
            for b in blocks(bytes, 18, dtype)? {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        Q4_1 => {
            for b in blocks(bytes, 20, dtype)? {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        Q5_0 | Q5_1 => {
            let (size, has_min) = if dtype == Q5_0 {
                (22, false)
            } else {
                (24, true)
            };
            for b in blocks(bytes, size, dtype)? {
                let d = f16_at(b, 0);
                let (m, rest) = if has_min {
                    (f16_at(b, 2), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                // Bit j of qh is the 5th bit of element j, bit j+16 that of element j+16.
                let value = |nib: u8, hi_bit: usize| -> f32 {
                    let x = (nib as u32 | (((qh >> hi_bit) & 1) << 4)) as i32;
                    if has_min {
                        x as f32 * d + m
                    } else {
                        (x - 16) as f32 * d
                    }
                };
                out.extend(qs.iter().enumerate().map(|(j, &q)| value(q & 0xF, j)));
                out.extend(qs.iter().enumerate().map(|(j, &q)| value(q >> 4, j + 16)));
            }
        }
        Q2K => {
            // 16 × 4-bit scale/min pairs, 64 B of 2-bit codes, f16 d, f16 dmin. Each 128-value
            // half reads 32 code bytes four times (shifts 0, 2, 4, 6), 16 values per scale.
            for b in blocks(bytes, 84, dtype)? {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                let mut is = 0;
                for q in qs.chunks_exact(32) {
                    for shift in [0, 2, 4, 6] {
                        for half in q.chunks_exact(16) {
                            let sc = scales[is];
                            is += 1;
                            let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                            out.extend(half.iter().map(|&x| dl * ((x >> shift) & 3) as f32 - ml));
                        }
                    }
                }
            }
        }
        Q3K => {
            // 32 B high-bit mask, 64 B of 2-bit codes, 12 B of sixteen 6-bit scales, f16 d. A
            // value is (2-bit code − 4 when its high bit is clear) × d × (scale − 32).
            for b in blocks(bytes, 110, dtype)? {
                let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
                let d = f16_at(b, 108);
                let scales: [i32; 16] = std::array::from_fn(|j| {
                    let low = if j < 8 { packed[j] & 0xF } else { packed[j - 8] >> 4 };
                    let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
                    (low | (high << 4)) as i32 - 32
                });
                let (mut is, mut bit) = (0, 0);
                for q in qs.chunks_exact(32) {
                    for shift in [0, 2, 4, 6] {
                        for (h, half) in q.chunks_exact(16).enumerate() {
                            let dl = d * scales[is] as f32;
                            is += 1;
                            let hm = &hmask[16 * h..16 * h + 16];
                            out.extend(half.iter().zip(hm).map(|(&x, &m)| {
                                let code = ((x >> shift) & 3) as i32 - if m & (1 << bit) != 0 { 0 } else { 4 };
                                dl * code as f32
                            }));
                        }
                        bit += 1;
                    }
                }
            }
        }
        Iq4Nl => {
            // f16 d, 16 B of 4-bit indices into the non-linear table (low nibbles first).
            for b in blocks(bytes, 18, dtype)? {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * IQ4_VALUES[(q & 0xF) as usize] as f32));
                out.extend(qs.iter().map(|&q| d * IQ4_VALUES[(q >> 4) as usize] as f32));
            }
        }
        Iq4Xs => {
            // f16 d, u16 high scale bits, 4 B low scale nibbles, 128 B of indices: eight 32-value
            // groups, each scaled by d × (6-bit scale − 32).
            for b in blocks(bytes, 136, dtype)? {
                let d = f16_at(b, 0);
                let high = u16::from_le_bytes([b[2], b[3]]);
                let (low, qs) = (&b[4..8], &b[8..136]);
                for (g, q) in qs.chunks_exact(16).enumerate() {
                    let scale = ((low[g / 2] >> (4 * (g % 2))) & 0xF) as i32 | ((((high >> (2 * g)) & 3) as i32) << 4);
                    let dl = d * (scale - 32) as f32;
                    out.extend(q.iter().map(|&x| dl * IQ4_VALUES[(x & 0xF) as usize] as f32));
                    out.extend(q.iter().map(|&x| dl * IQ4_VALUES[(x >> 4) as usize] as f32));
                }
            }
        }
        Q4K => {
            for b in blocks(bytes, 144, dtype)? {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (k, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&x| d1 * (x & 0xF) as f32 - min1));
                    out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - min2));
                }
            }
        }
        Q5K => {
            for b in blocks(bytes, 176, dtype)? {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for (k, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * k, scales);
                    let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    // Sub-block pair k takes its 5th bits from bits 2k and 2k+1 of qh[l].
                    let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
                    out.extend(q.iter().zip(qh).map(|(&x, &h)| {
                        d1 * ((x & 0xF) as u32 + if h & u1 != 0 { 16 } else { 0 }) as f32 - min1
                    }));
                    out.extend(q.iter().zip(qh).map(|(&x, &h)| {
                        d2 * ((x >> 4) as u32 + if h & u2 != 0 { 16 } else { 0 }) as f32 - min2
                    }));
                }
            }
        }
        Q6K => {
            for b in blocks(bytes, 210, dtype)? {
                let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                // Two halves of 128 values; each reads 64 B of ql, 32 B of qh and 8 scales.
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql_all[64 * n..], &qh_all[32 * n..], &sc_all[8 * n..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
        other => return Err(format!("cannot dequantize type {other}")),
    }
    Ok(())
}
