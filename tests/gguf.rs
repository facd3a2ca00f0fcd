//! GGUF reader and GGUF → Hugging Face conversion tests.
//!
//! Synthetic files come from a small GGUF writer below (`writer`): every metadata type, every
//! dequantisable tensor type with values quantised by ports of ggml's reference quantisers (or, for
//! the K-quants, packed from chosen integer codes), alignments other than 32, truncations at every
//! section. Expected values are computed from the block formulas on the integer codes, independently
//! of the reader, and compared bit for bit.
//!
//! The real SmolLM2 GGUF tests skip, saying why, when `/work/main/.cache/models/...` (or
//! `SPPO_SMOLLM2_GGUF`) is absent. `write_converted_smollm2_for_python_check` (ignored) writes the
//! directory that `scripts/check_gguf_convert.py` cross-checks against transformers.

use half::{bf16, f16};
use sppo::formats::convert::{
    convert_gguf_to_hf, convert_gguf_to_hf_with, permute_qk, unpermute_qk, OutDtype, QkPermutation,
};
use sppo::formats::gguf::{GgmlType, GgufFile, MetadataValue};
use std::path::{Path, PathBuf};

mod writer {
    //! A minimal GGUF writer: enough to build every case the reader must handle.

    /// A metadata value with its GGUF type.
    #[derive(Clone, Debug)]
    pub enum V {
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
        Str(String),
        /// Element type id and elements (all of that type).
        Arr(u32, Vec<V>),
    }

    impl V {
        pub fn type_id(&self) -> u32 {
            match self {
                V::U8(_) => 0,
                V::I8(_) => 1,
                V::U16(_) => 2,
                V::I16(_) => 3,
                V::U32(_) => 4,
                V::I32(_) => 5,
                V::F32(_) => 6,
                V::Bool(_) => 7,
                V::Str(_) => 8,
                V::Arr(..) => 9,
                V::U64(_) => 10,
                V::I64(_) => 11,
                V::F64(_) => 12,
            }
        }

        pub fn strs(items: &[&str]) -> V {
            V::Arr(8, items.iter().map(|s| V::Str(s.to_string())).collect())
        }

        fn write(&self, out: &mut Vec<u8>) {
            match self {
                V::U8(v) => out.extend(v.to_le_bytes()),
                V::I8(v) => out.extend(v.to_le_bytes()),
                V::U16(v) => out.extend(v.to_le_bytes()),
                V::I16(v) => out.extend(v.to_le_bytes()),
                V::U32(v) => out.extend(v.to_le_bytes()),
                V::I32(v) => out.extend(v.to_le_bytes()),
                V::U64(v) => out.extend(v.to_le_bytes()),
                V::I64(v) => out.extend(v.to_le_bytes()),
                V::F32(v) => out.extend(v.to_le_bytes()),
                V::F64(v) => out.extend(v.to_le_bytes()),
                V::Bool(v) => out.push(*v as u8),
                V::Str(s) => write_str(out, s),
                V::Arr(ty, items) => {
                    out.extend(ty.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for i in items {
                        i.write(out);
                    }
                }
            }
        }
    }

    fn write_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    pub struct Tensor {
        pub name: String,
        /// ggml order (fastest first).
        pub dims: Vec<u64>,
        pub type_id: u32,
        pub data: Vec<u8>,
    }

    #[derive(Default)]
    pub struct Builder {
        pub version: u32,
        /// Alignment used for padding; written as `general.alignment` only if pushed as metadata.
        pub alignment: u64,
        pub kv: Vec<(String, V)>,
        pub tensors: Vec<Tensor>,
    }

    /// Section offsets of a built file, for truncation tests.
    pub struct Built {
        pub bytes: Vec<u8>,
        pub metadata_start: usize,
        pub tensor_table_start: usize,
        pub data_start: usize,
    }

    impl Builder {
        pub fn new() -> Builder {
            Builder {
                version: 3,
                alignment: 32,
                ..Default::default()
            }
        }

        pub fn kv(&mut self, key: &str, v: V) -> &mut Self {
            if key == "general.alignment" {
                if let V::U32(a) = v {
                    self.alignment = a as u64;
                }
            }
            self.kv.retain(|(k, _)| k != key);
            self.kv.push((key.to_string(), v));
            self
        }

        pub fn remove(&mut self, key: &str) -> &mut Self {
            self.kv.retain(|(k, _)| k != key);
            self
        }

        pub fn tensor(
            &mut self,
            name: &str,
            dims: &[u64],
            type_id: u32,
            data: Vec<u8>,
        ) -> &mut Self {
            self.tensors.push(Tensor {
                name: name.into(),
                dims: dims.to_vec(),
                type_id,
                data,
            });
            self
        }

        pub fn build(&self) -> Built {
            let mut out = Vec::new();
            out.extend(b"GGUF");
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.kv.len() as u64).to_le_bytes());
            let metadata_start = out.len();
            for (k, v) in &self.kv {
                write_str(&mut out, k);
                out.extend(v.type_id().to_le_bytes());
                v.write(&mut out);
            }
            let tensor_table_start = out.len();
            let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
            let mut offset = 0u64;
            for t in &self.tensors {
                write_str(&mut out, &t.name);
                out.extend((t.dims.len() as u32).to_le_bytes());
                for d in &t.dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(t.type_id.to_le_bytes());
                out.extend(offset.to_le_bytes());
                offset = align(offset + t.data.len() as u64);
            }
            let data_start = align(out.len() as u64) as usize;
            out.resize(data_start, 0);
            for (i, t) in self.tensors.iter().enumerate() {
                out.extend(&t.data);
                // No padding after the last tensor, so any cut of the file truncates tensor data.
                if i + 1 == self.tensors.len() {
                    break;
                }
                let padded = align(out.len() as u64 - data_start as u64) as usize + data_start;
                out.resize(padded, 0);
            }
            Built {
                bytes: out,
                metadata_start,
                tensor_table_start,
                data_start,
            }
        }
    }
}

use writer::{Builder, V};

// ---------------------------------------------------------------------------------------------
// Quantisers: ports of ggml-quants.c's `quantize_row_*_ref`, returning the block bytes and the
// values the block formula gives for the stored integer codes (the expected dequantisation).

fn f16_bits(x: f32) -> (Vec<u8>, f32) {
    let h = f16::from_f32(x);
    (h.to_le_bytes().to_vec(), h.to_f32())
}

fn quantize_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut expect) = (Vec::new(), Vec::new());
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (db, d16) = f16_bits(d);
        bytes.extend(db);
        for &v in b {
            let q = (v * id).round() as i8;
            bytes.push(q as u8);
            expect.push(q as f32 * d16);
        }
    }
    (bytes, expect)
}

fn quantize_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut expect) = (Vec::new(), Vec::new());
    for b in x.chunks(32) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in b {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (db, d16) = f16_bits(d);
        bytes.extend(db);
        let q: Vec<u8> = b
            .iter()
            .map(|&v| ((v * id + 8.5) as i8).min(15) as u8)
            .collect();
        for j in 0..16 {
            bytes.push(q[j] | (q[j + 16] << 4));
        }
        expect.extend(q.iter().map(|&q| (q as i32 - 8) as f32 * d16));
    }
    (bytes, expect)
}

fn quantize_q4_1(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut expect) = (Vec::new(), Vec::new());
    for b in x.chunks(32) {
        let min = b.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = b.iter().fold(f32::MIN, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (db, d16) = f16_bits(d);
        let (mb, m16) = f16_bits(min);
        bytes.extend(db);
        bytes.extend(mb);
        let q: Vec<u8> = b
            .iter()
            .map(|&v| (((v - min) * id + 0.5) as i8).min(15) as u8)
            .collect();
        for j in 0..16 {
            bytes.push(q[j] | (q[j + 16] << 4));
        }
        expect.extend(q.iter().map(|&q| q as f32 * d16 + m16));
    }
    (bytes, expect)
}

fn quantize_q5(x: &[f32], with_min: bool) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut expect) = (Vec::new(), Vec::new());
    for b in x.chunks(32) {
        let (q, d16, m16, header): (Vec<u8>, f32, f32, Vec<u8>) = if with_min {
            let min = b.iter().fold(f32::MAX, |m, &v| m.min(v));
            let max = b.iter().fold(f32::MIN, |m, &v| m.max(v));
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (db, d16) = f16_bits(d);
            let (mb, m16) = f16_bits(min);
            let q = b
                .iter()
                .map(|&v| ((v - min) * id + 0.5) as i8 as u8)
                .collect();
            (q, d16, m16, [db, mb].concat())
        } else {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in b {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (db, d16) = f16_bits(d);
            let q = b
                .iter()
                .map(|&v| ((v * id + 16.5) as i8).min(31) as u8)
                .collect();
            (q, d16, 0.0, db)
        };
        bytes.extend(header);
        let mut qh = 0u32;
        for j in 0..16 {
            qh |= ((q[j] as u32 & 0x10) >> 4) << j;
            qh |= ((q[j + 16] as u32 & 0x10) >> 4) << (j + 16);
        }
        bytes.extend(qh.to_le_bytes());
        for j in 0..16 {
            bytes.push((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
        }
        if with_min {
            expect.extend(q.iter().map(|&q| q as f32 * d16 + m16));
        } else {
            expect.extend(q.iter().map(|&q| (q as i32 - 16) as f32 * d16));
        }
    }
    (bytes, expect)
}

/// Deterministic pseudo-random numbers (xorshift), so tests need no extra crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// The 12 scale bytes of Q4_K/Q5_K holding eight 6-bit scales and mins (llama.cpp's packing).
fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    q
}

/// One Q4_K (`bits = 4`) or Q5_K (`bits = 5`) super-block from random codes.
fn random_q45k_block(rng: &mut Rng, bits: u32) -> (Vec<u8>, Vec<f32>) {
    let (db, d) = f16_bits(rng.f32() * 0.01);
    let (mb, dmin) = f16_bits(rng.f32().abs() * 0.01);
    let sc: [u8; 8] = std::array::from_fn(|_| rng.below(64) as u8);
    let mn: [u8; 8] = std::array::from_fn(|_| rng.below(64) as u8);
    let codes: Vec<u8> = (0..256).map(|_| rng.below(1 << bits) as u8).collect();
    let (mut qs, mut qh) = (vec![0u8; 128], vec![0u8; 32]);
    let mut expect = Vec::with_capacity(256);
    for (e, &c) in codes.iter().enumerate() {
        let (sub, l) = (e / 32, e % 32);
        let byte = 32 * (sub / 2) + l;
        qs[byte] |= if sub % 2 == 0 {
            c & 0xF
        } else {
            (c & 0xF) << 4
        };
        if c & 0x10 != 0 {
            qh[l] |= 1 << sub;
        }
        expect.push(d * sc[sub] as f32 * c as f32 - dmin * mn[sub] as f32);
    }
    let mut block = [db, mb, pack_scales_k4(&sc, &mn).to_vec()].concat();
    if bits == 5 {
        block.extend(qh);
    }
    block.extend(qs);
    (block, expect)
}

/// One Q2_K super-block from random codes: element e is in 16-value group e / 16, whose 2-bit
/// codes sit in byte 32·(e / 128) + 16·(group % 2) + e % 16 at bit 2·((e % 128) / 32).
fn random_q2k_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (db, d) = f16_bits(rng.f32() * 0.01);
    let (mb, dmin) = f16_bits(rng.f32().abs() * 0.01);
    let scales: [u8; 16] = std::array::from_fn(|_| rng.below(256) as u8);
    let mut qs = vec![0u8; 64];
    let mut expect = Vec::with_capacity(256);
    for e in 0..256 {
        let c = rng.below(4) as u8;
        let group = e / 16;
        qs[32 * (e / 128) + 16 * (group % 2) + e % 16] |= c << (2 * ((e % 128) / 32));
        let sc = scales[group];
        expect.push(d * (sc & 0xF) as f32 * c as f32 - dmin * (sc >> 4) as f32);
    }
    ([scales.to_vec(), qs, db, mb].concat(), expect)
}

/// One Q3_K super-block from random 3-bit codes: the low 2 bits as in Q2_K, the high bit in
/// hmask[16·(group % 2) + e % 16] at bit (e / 32); 6-bit scales packed as llama.cpp packs them
/// (low nibbles in bytes 0..8, two high bits per scale in bytes 8..12).
fn random_q3k_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (db, d) = f16_bits(rng.f32() * 0.01);
    let scales: [u8; 16] = std::array::from_fn(|_| rng.below(64) as u8);
    let mut packed = [0u8; 12];
    for (j, &sc) in scales.iter().enumerate() {
        packed[j % 8] |= (sc & 0xF) << (4 * (j / 8));
        packed[8 + j % 4] |= (sc >> 4) << (2 * (j / 4));
    }
    let (mut hmask, mut qs) = (vec![0u8; 32], vec![0u8; 64]);
    let mut expect = Vec::with_capacity(256);
    for e in 0..256 {
        let c = rng.below(8) as u8; // the value is c − 4
        let group = e / 16;
        qs[32 * (e / 128) + 16 * (group % 2) + e % 16] |= (c & 3) << (2 * ((e % 128) / 32));
        hmask[16 * (group % 2) + e % 16] |= (c >> 2) << (e / 32);
        expect.push(d * (scales[group] as i32 - 32) as f32 * (c as i32 - 4) as f32);
    }
    ([hmask, qs, packed.to_vec(), db].concat(), expect)
}

const IQ4: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// `blocks` IQ4_NL blocks (32 values: f16 d, 16 B of code-book indices, low nibbles first).
fn random_iq4nl(rng: &mut Rng, blocks: usize) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut expect) = (vec![], vec![]);
    for _ in 0..blocks {
        let (db, d) = f16_bits(rng.f32() * 0.01);
        let codes: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
        bytes.extend(db);
        bytes.extend((0..16).map(|j| codes[j] | (codes[j + 16] << 4)));
        expect.extend(codes.iter().map(|&c| d * IQ4[c as usize] as f32));
    }
    (bytes, expect)
}

/// One IQ4_XS super-block: eight 32-value groups, 6-bit scales split into low nibbles (4 B) and
/// high bit pairs (a u16), indices as in IQ4_NL.
fn random_iq4xs_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (db, d) = f16_bits(rng.f32() * 0.01);
    let scales: [u8; 8] = std::array::from_fn(|_| rng.below(64) as u8);
    let (mut high, mut low) = (0u16, [0u8; 4]);
    for (g, &sc) in scales.iter().enumerate() {
        low[g / 2] |= (sc & 0xF) << (4 * (g % 2));
        high |= ((sc >> 4) as u16) << (2 * g);
    }
    let (mut qs, mut expect) = (vec![], vec![]);
    for &sc in &scales {
        let codes: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
        qs.extend((0..16).map(|j| codes[j] | (codes[j + 16] << 4)));
        let dl = d * (sc as i32 - 32) as f32;
        expect.extend(codes.iter().map(|&c| dl * IQ4[c as usize] as f32));
    }
    ([db, high.to_le_bytes().to_vec(), low.to_vec(), qs].concat(), expect)
}

fn random_q6k_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (db, d) = f16_bits(rng.f32() * 0.01);
    let sc: [i8; 16] = std::array::from_fn(|_| rng.below(256) as u8 as i8);
    let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
    let mut expect = Vec::with_capacity(256);
    for e in 0..256 {
        let c = rng.below(64) as u8;
        let (n, r) = (e / 128, e % 128);
        let (quarter, l) = (r / 32, r % 32);
        let lo_byte = 64 * n + l + if quarter % 2 == 1 { 32 } else { 0 };
        ql[lo_byte] |= if quarter < 2 { c & 0xF } else { (c & 0xF) << 4 };
        qh[32 * n + l] |= (c >> 4) << (2 * quarter);
        let s = sc[8 * n + l / 16 + 2 * quarter];
        expect.push(d * s as f32 * (c as i32 - 32) as f32);
    }
    let block = [ql, qh, sc.iter().map(|&s| s as u8).collect(), db].concat();
    (block, expect)
}

fn tmp_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).expect("writing a test file");
    p
}

fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = bad {
        panic!("{name}: element {i}: got {} want {}", got[i], want[i]);
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn metadata_every_type_round_trips() {
    let mut b = Builder::new();
    b.kv("t.u8", V::U8(200))
        .kv("t.i8", V::I8(-100))
        .kv("t.u16", V::U16(60000))
        .kv("t.i16", V::I16(-30000))
        .kv("t.u32", V::U32(4_000_000_000))
        .kv("t.i32", V::I32(-2_000_000_000))
        .kv("t.u64", V::U64(u64::MAX))
        .kv("t.i64", V::I64(i64::MIN))
        .kv("t.f32", V::F32(1.5e-5))
        .kv("t.f64", V::F64(-2.25))
        .kv("t.bool", V::Bool(true))
        .kv("t.str", V::Str("héllo ▁ <|im_start|>".into()))
        .kv("t.strs", V::strs(&["a", "", "ĠĠ", "日本"]))
        .kv("t.ints", V::Arr(5, vec![V::I32(-1), V::I32(3)]))
        .kv("t.floats", V::Arr(6, vec![V::F32(0.5), V::F32(-1.0)]))
        .kv("t.empty", V::Arr(4, vec![]))
        .kv(
            "t.nested",
            V::Arr(
                9,
                vec![
                    V::Arr(4, vec![V::U32(1), V::U32(2)]),
                    V::Arr(4, vec![V::U32(3)]),
                ],
            ),
        );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tmp_file(&dir, "meta.gguf", &b.build().bytes);
    let g = GgufFile::open(&path).expect("open");
    assert_eq!(g.version, 3);
    assert_eq!(g.metadata().len(), 17);
    assert_eq!(g.get("t.u8"), Some(&MetadataValue::U8(200)));
    assert_eq!(g.get("t.i8"), Some(&MetadataValue::I8(-100)));
    assert_eq!(g.get_u64("t.u16").ok(), Some(60000));
    assert_eq!(g.get_i64("t.i16").ok(), Some(-30000));
    assert_eq!(g.get_u64("t.u32").ok(), Some(4_000_000_000));
    assert_eq!(g.get_i64("t.i32").ok(), Some(-2_000_000_000));
    assert_eq!(g.get_u64("t.u64").ok(), Some(u64::MAX));
    assert_eq!(g.get_i64("t.i64").ok(), Some(i64::MIN));
    assert_eq!(g.get_f64("t.f32").ok(), Some(1.5e-5f32 as f64));
    assert_eq!(g.get_f64("t.f64").ok(), Some(-2.25));
    assert_eq!(g.get_bool("t.bool").ok(), Some(true));
    assert_eq!(g.get_str("t.str").ok(), Some("héllo ▁ <|im_start|>"));
    assert_eq!(
        g.get_str_array("t.strs").ok(),
        Some(vec!["a", "", "ĠĠ", "日本"])
    );
    assert_eq!(g.get_i64_array("t.ints").ok(), Some(vec![-1, 3]));
    assert_eq!(g.get_f32_array("t.floats").ok(), Some(vec![0.5, -1.0]));
    assert_eq!(g.get("t.empty"), Some(&MetadataValue::Array(vec![])));
    let nested = g
        .get("t.nested")
        .and_then(|v| v.as_array())
        .expect("nested array");
    assert_eq!(
        nested[0],
        MetadataValue::Array(vec![MetadataValue::U32(1), MetadataValue::U32(2)])
    );
    assert_eq!(nested[1], MetadataValue::Array(vec![MetadataValue::U32(3)]));
    assert_eq!(g.opt_u64("absent").ok(), Some(None));

    // Errors name the key and the file.
    let e = g.get_str("t.u32").expect_err("wrong type").to_string();
    assert!(
        e.contains("t.u32") && e.contains("meta.gguf") && e.contains("u32"),
        "{e}"
    );
    let e = g.get_u64("t.i8").expect_err("negative").to_string();
    assert!(e.contains("t.i8"), "{e}");
    let e = g
        .get_u64("llama.block_count")
        .expect_err("missing")
        .to_string();
    assert!(
        e.contains("llama.block_count") && e.contains("meta.gguf"),
        "{e}"
    );
    let e = g.opt_bool("t.str").expect_err("wrong type").to_string();
    assert!(e.contains("t.str"), "{e}");
    let e = g.tensor("nope").expect_err("missing tensor").to_string();
    assert!(e.contains("nope") && e.contains("meta.gguf"), "{e}");
}

/// Every dequantisable type, with expected values from the block formula on the stored codes.
fn dtype_file(alignment: Option<u32>, version: u32) -> (Builder, Vec<(String, Vec<f32>)>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let x: Vec<f32> = (0..96).map(|_| rng.f32() * 3.0).collect(); // (3, 32)
    let mut b = Builder::new();
    b.version = version;
    if let Some(a) = alignment {
        b.kv("general.alignment", V::U32(a));
    }
    let mut expected = Vec::new();
    let mut add = |b: &mut Builder,
                   name: &str,
                   dims: &[u64],
                   ty: GgmlType,
                   (bytes, want): (Vec<u8>, Vec<f32>)| {
        b.tensor(name, dims, ty.id(), bytes);
        expected.push((name.to_string(), want));
    };
    add(
        &mut b,
        "f32",
        &[32, 3],
        GgmlType::F32,
        (x.iter().flat_map(|v| v.to_le_bytes()).collect(), x.clone()),
    );
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    add(
        &mut b,
        "f16",
        &[32, 3],
        GgmlType::F16,
        (
            h.iter().flat_map(|v| v.to_le_bytes()).collect(),
            h.iter().map(|v| v.to_f32()).collect(),
        ),
    );
    let bf: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    add(
        &mut b,
        "bf16",
        &[32, 3],
        GgmlType::Bf16,
        (
            bf.iter().flat_map(|v| v.to_le_bytes()).collect(),
            bf.iter().map(|v| v.to_f32()).collect(),
        ),
    );
    add(&mut b, "q8_0", &[32, 3], GgmlType::Q8_0, quantize_q8_0(&x));
    add(&mut b, "q4_0", &[32, 3], GgmlType::Q4_0, quantize_q4_0(&x));
    add(&mut b, "q4_1", &[32, 3], GgmlType::Q4_1, quantize_q4_1(&x));
    add(
        &mut b,
        "q5_0",
        &[32, 3],
        GgmlType::Q5_0,
        quantize_q5(&x, false),
    );
    add(
        &mut b,
        "q5_1",
        &[32, 3],
        GgmlType::Q5_1,
        quantize_q5(&x, true),
    );
    let k_blocks = |f: &mut dyn FnMut() -> (Vec<u8>, Vec<f32>)| {
        let (a, b) = (f(), f());
        ([a.0, b.0].concat(), [a.1, b.1].concat())
    };
    add(
        &mut b,
        "q2_k",
        &[256, 2],
        GgmlType::Q2K,
        k_blocks(&mut || random_q2k_block(&mut rng)),
    );
    add(
        &mut b,
        "q3_k",
        &[512, 1],
        GgmlType::Q3K,
        k_blocks(&mut || random_q3k_block(&mut rng)),
    );
    add(
        &mut b,
        "q4_k",
        &[256, 2],
        GgmlType::Q4K,
        k_blocks(&mut || random_q45k_block(&mut rng, 4)),
    );
    add(
        &mut b,
        "q5_k",
        &[512, 1],
        GgmlType::Q5K,
        k_blocks(&mut || random_q45k_block(&mut rng, 5)),
    );
    add(
        &mut b,
        "q6_k",
        &[256, 2],
        GgmlType::Q6K,
        k_blocks(&mut || random_q6k_block(&mut rng)),
    );
    add(&mut b, "iq4_nl", &[32, 3], GgmlType::Iq4Nl, random_iq4nl(&mut rng, 3));
    add(
        &mut b,
        "iq4_xs",
        &[256, 2],
        GgmlType::Iq4Xs,
        k_blocks(&mut || random_iq4xs_block(&mut rng)),
    );
    (b, expected)
}

#[test]
fn every_dtype_dequantizes_to_the_block_formula() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (alignment, version) in [(None, 3), (Some(64), 3), (Some(8), 2), (Some(256), 3)] {
        let (b, expected) = dtype_file(alignment, version);
        let built = b.build();
        let path = tmp_file(&dir, &format!("dtypes_{alignment:?}.gguf"), &built.bytes);
        let g = GgufFile::open(&path).expect("open");
        let align = alignment.unwrap_or(32) as u64;
        assert_eq!(g.alignment, align);
        assert_eq!(g.version, version);
        assert_eq!(g.data_offset, built.data_start as u64);
        assert_eq!(g.data_offset % align, 0);
        for (name, want) in &expected {
            let t = g.tensor(name).expect("tensor");
            assert_eq!(t.offset % align, 0, "{name} offset");
            assert_eq!(
                t.shape(),
                t.dims.iter().rev().map(|&d| d as usize).collect::<Vec<_>>()
            );
            let got = g.dequantize(name).expect("dequantize");
            assert_bits_eq(&format!("{name} (alignment {align})"), &got, want);
        }
        // The quantised values approximate the originals (a sanity check on the quantisers).
        let f32s = g.dequantize("f32").expect("f32");
        for name in ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"] {
            let q = g.dequantize(name).expect("q");
            let worst = q
                .iter()
                .zip(&f32s)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 0.5, "{name}: max |Δ| {worst}");
        }
    }
}

#[test]
fn shapes_follow_ggml_order() {
    let mut b = Builder::new();
    let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    b.tensor("m", &[3, 2], 0, data);
    let dir = tempfile::tempdir().expect("tempdir");
    let g = GgufFile::open(tmp_file(&dir, "s.gguf", &b.build().bytes)).expect("open");
    let t = g.tensor("m").expect("m");
    assert_eq!(t.dims, vec![3, 2]);
    assert_eq!(t.shape(), vec![2, 3]); // (rows, cols): ne[0] = 3 columns
    assert_eq!(t.n_elements(), 6);
}

#[test]
fn truncated_files_fail_with_the_file_name() {
    let (b, _) = dtype_file(Some(64), 3);
    let built = b.build();
    let dir = tempfile::tempdir().expect("tempdir");
    let len = built.bytes.len();
    let mut cuts: Vec<usize> = vec![
        0,
        3,
        6,
        built.metadata_start - 1,
        built.metadata_start + 5,
        built.metadata_start + 13,
        built.tensor_table_start - 1,
        built.tensor_table_start + 3,
        built.tensor_table_start + 20,
        built.data_start - 1,
        built.data_start + 10,
        len - 1,
    ];
    // And a sweep through the whole file: no cut may panic.
    cuts.extend((0..len).step_by(37));
    for cut in cuts {
        let path = tmp_file(&dir, "cut.gguf", &built.bytes[..cut]);
        let e = match GgufFile::open(&path) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a file cut at {cut} of {len} bytes opened"),
        };
        assert!(e.contains("cut.gguf"), "cut at {cut}: {e}");
        if cut >= built.data_start {
            // Data cut: the error names the tensor that runs past the end.
            assert!(e.contains("tensor '"), "cut at {cut}: {e}");
        }
    }
}

#[test]
fn corrupt_headers_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = Builder::new().kv("a", V::U32(1)).build().bytes;
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut v1 = good.clone();
    v1[4] = 1;
    let mut big_endian = good.clone();
    big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
    let mut huge_count = good.clone();
    huge_count[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    // A one-key file: the value of key "k" starts after the key (8 + 1 bytes) and its type (4).
    let value_at = |v: V| {
        let built = Builder::new().kv("k", v).build();
        (built.metadata_start + 13, built.bytes)
    };
    let (at, mut huge_string) = value_at(V::Str("abc".into()));
    huge_string[at..at + 8].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
    let (at, mut huge_array) = value_at(V::Arr(8, vec![V::Str("x".into())]));
    huge_array[at + 4..at + 12].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let (at, mut bad_bool) = value_at(V::Bool(true));
    bad_bool[at] = 7;
    let odd_alignment = Builder::new()
        .kv("general.alignment", V::U32(48))
        .build()
        .bytes;
    for (name, bytes, needle) in [
        ("magic", bad_magic, "not a GGUF"),
        ("v1", v1, "version 1"),
        ("be", big_endian, "big-endian"),
        ("count", huge_count, "truncated"),
        ("string", huge_string, "metadata key 'k'"),
        ("array", huge_array, "metadata key 'k'"),
        ("bool", bad_bool, "bool"),
        ("alignment", odd_alignment, "general.alignment"),
    ] {
        let path = tmp_file(&dir, &format!("{name}.gguf"), &bytes);
        let e = GgufFile::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(&format!("{name}.gguf")) && e.contains(needle),
            "{name}: {e:?}"
        );
    }
}

#[test]
fn unsupported_dtypes_name_the_tensor_and_type() {
    let mut b = Builder::new();
    b.tensor(
        "blk.0.attn_q.weight",
        &[256, 1],
        GgmlType::Iq2Xxs.id(),
        vec![0u8; 66],
    );
    b.tensor("weird", &[4], 99, vec![0u8; 16]);
    b.tensor("odd_length", &[33], GgmlType::F32.id(), vec![0u8; 33 * 4]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tmp_file(&dir, "types.gguf", &b.build().bytes);
    let g = GgufFile::open(&path).expect("open");
    let e = g
        .dequantize("blk.0.attn_q.weight")
        .expect_err("iq2_xxs")
        .to_string();
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("IQ2_XXS") && e.contains("types.gguf"),
        "{e}"
    );
    let e = g.dequantize("weird").expect_err("unknown").to_string();
    assert!(e.contains("weird") && e.contains("99"), "{e}");
    assert!(g.dequantize("odd_length").is_ok());

    // A block type whose first dimension is not a whole number of blocks is rejected at open.
    let mut b = Builder::new();
    b.tensor("partial", &[48], GgmlType::Q8_0.id(), vec![0u8; 68]);
    let path = tmp_file(&dir, "partial.gguf", &b.build().bytes);
    let e = GgufFile::open(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("partial") && e.contains("block size"), "{e}");
}

#[test]
fn qk_permutation_inverts_and_matches_a_hand_checked_case() {
    // One head, d = 3, two columns. HF rows are [x0 x1 x2 | y0 y1 y2] (rotate-half pairs (x_i, y_i));
    // llama.cpp interleaves them: [x0 y0 x1 y1 x2 y2], i.e. HF rows 0 3 1 4 2 5.
    let hf: Vec<f32> = (0..6).flat_map(|r| [r as f32, 10.0 + r as f32]).collect();
    let cpp = permute_qk(&hf, 6, 2, 1).expect("permute");
    let rows = |m: &[f32]| m.chunks(2).map(|r| r[0] as usize).collect::<Vec<_>>();
    assert_eq!(rows(&cpp), vec![0, 3, 1, 4, 2, 5]);
    assert_eq!(cpp[3], 13.0); // row 1 is HF row 3, both columns
    assert_eq!(unpermute_qk(&cpp, 6, 2, 1).expect("unpermute"), hf);
    // Unpermuting HF-ordered rows is a different map (so applying the wrong one is detectable).
    assert_eq!(
        rows(&unpermute_qk(&hf, 6, 2, 1).expect("unpermute")),
        vec![0, 2, 4, 1, 3, 5]
    );

    // Round trips on a larger GQA-shaped case: 3 heads of 8 rows, 5 columns.
    let x: Vec<f32> = (0..24 * 5).map(|i| i as f32 * 0.5 - 7.0).collect();
    assert_eq!(
        unpermute_qk(&permute_qk(&x, 24, 5, 3).expect("p"), 24, 5, 3).expect("u"),
        x
    );
    assert_eq!(
        permute_qk(&unpermute_qk(&x, 24, 5, 3).expect("u"), 24, 5, 3).expect("p"),
        x
    );
    assert!(
        permute_qk(&x, 24, 5, 5).is_err(),
        "24 rows do not split into 5 heads"
    );
    assert!(permute_qk(&x[1..], 24, 5, 3).is_err(), "wrong length");
}

// ---------------------------------------------------------------------------------------------
// Conversion of a tiny synthetic Llama

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FF: usize = 96;

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, then merged tokens.
fn byte_level_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    // GPT-2's byte alphabet, in byte order.
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
        tokens.push(char::from_u32(c).expect("char").to_string());
        types.push(1);
    }
    let merges = vec!["h i".to_string(), "Ġ hi".to_string(), "1 2".to_string()];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    tokens.push("<think>".into());
    types.push(4);
    (tokens, types, merges)
}

struct TinyModel {
    builder: Builder,
    /// Original (HF-layout) q/k weights of layer 0.
    q_hf: Vec<f32>,
    k_hf: Vec<f32>,
    vocab: usize,
}

/// A SentencePiece (llama.cpp `llama` model) vocabulary without merges: control tokens, 256 byte
/// tokens, then pieces whose scores (earlier = better) imply the merges, every prefix of a word
/// included so that merges can build it.
fn sentencepiece_vocab() -> (Vec<String>, Vec<i32>, Vec<f32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for byte in 0..256 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
    }
    let words = [
        "▁the", "▁hello", "▁world", "▁in", "▁a", "ing", "▁token", "izer", "▁is", "▁Mist", "ral",
        "er", "▁▁",
    ];
    let mut pieces: Vec<String> = Vec::new();
    for w in words {
        for c in w.chars() {
            if !pieces.contains(&c.to_string()) {
                pieces.push(c.to_string());
            }
        }
    }
    for len in 2..=7 {
        for w in words {
            let p: String = w.chars().take(len).collect();
            if p.chars().count() == len && !pieces.contains(&p) {
                pieces.push(p);
            }
        }
    }
    let mut scores = vec![0f32; tokens.len()];
    for (i, p) in pieces.into_iter().enumerate() {
        tokens.push(p);
        types.push(1);
        scores.push(-(i as f32));
    }
    (tokens, types, scores)
}

fn tiny_llama(tied: bool) -> TinyModel {
    tiny_llama_with(tied, false)
}

/// A one-layer Llama; `sentencepiece` picks a SentencePiece (`llama`) vocabulary instead of the
/// byte-level one.
fn tiny_llama_with(tied: bool, sentencepiece: bool) -> TinyModel {
    let (tokens, types, merges) = byte_level_vocab();
    let (sp_tokens, sp_types, sp_scores) = sentencepiece_vocab();
    let vocab = if sentencepiece {
        sp_tokens.len()
    } else {
        tokens.len()
    };
    let mut rng = Rng(42);
    let mut rand = |n: usize| (0..n).map(|_| rng.f32()).collect::<Vec<f32>>();
    let mut b = Builder::new();
    b.kv("general.architecture", V::Str("llama".into()))
        .kv("general.name", V::Str("tiny".into()))
        .kv("llama.block_count", V::U32(1))
        .kv("llama.context_length", V::U32(256))
        .kv("llama.embedding_length", V::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", V::U32(FF as u32))
        .kv("llama.attention.head_count", V::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", V::U32(KV_HEADS as u32))
        .kv("llama.rope.freq_base", V::F32(100000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5))
        .kv("llama.vocab_size", V::U32(vocab as u32))
        .kv("tokenizer.ggml.model", V::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", V::Str("smollm".into()))
        .kv(
            "tokenizer.ggml.tokens",
            V::strs(&tokens.iter().map(String::as_str).collect::<Vec<_>>()),
        )
        .kv(
            "tokenizer.ggml.token_type",
            V::Arr(5, types.iter().map(|&t| V::I32(t)).collect()),
        )
        .kv(
            "tokenizer.ggml.merges",
            V::strs(&merges.iter().map(String::as_str).collect::<Vec<_>>()),
        )
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.ggml.padding_token_id", V::U32(2))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(false))
        .kv("tokenizer.chat_template", V::Str("{{ messages }}".into()));
    if sentencepiece {
        b.remove("tokenizer.ggml.pre")
            .remove("tokenizer.ggml.merges")
            .remove("tokenizer.ggml.add_bos_token")
            .kv("tokenizer.ggml.model", V::Str("llama".into()))
            .kv(
                "tokenizer.ggml.tokens",
                V::strs(&sp_tokens.iter().map(String::as_str).collect::<Vec<_>>()),
            )
            .kv(
                "tokenizer.ggml.token_type",
                V::Arr(5, sp_types.iter().map(|&t| V::I32(t)).collect()),
            )
            .kv(
                "tokenizer.ggml.scores",
                V::Arr(6, sp_scores.iter().map(|&s| V::F32(s)).collect()),
            )
            .kv("tokenizer.ggml.unknown_token_id", V::U32(0))
            .kv("tokenizer.ggml.padding_token_id", V::U32(0));
    }
    let (q_rows, kv_rows) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let q_hf = rand(q_rows * HIDDEN);
    let k_hf = rand(kv_rows * HIDDEN);
    let embd = rand(vocab * HIDDEN);
    let (embd_q8, _) = quantize_q8_0(&embd);
    b.tensor(
        "token_embd.weight",
        &[HIDDEN as u64, vocab as u64],
        GgmlType::Q8_0.id(),
        embd_q8,
    );
    let perm_q = permute_qk(&q_hf, q_rows, HIDDEN, HEADS).expect("permute q");
    let perm_k = permute_qk(&k_hf, kv_rows, HIDDEN, KV_HEADS).expect("permute k");
    b.tensor(
        "blk.0.attn_q.weight",
        &[HIDDEN as u64, q_rows as u64],
        0,
        f32_bytes(&perm_q),
    );
    b.tensor(
        "blk.0.attn_k.weight",
        &[HIDDEN as u64, kv_rows as u64],
        0,
        f32_bytes(&perm_k),
    );
    b.tensor(
        "blk.0.attn_v.weight",
        &[HIDDEN as u64, kv_rows as u64],
        0,
        f32_bytes(&rand(kv_rows * HIDDEN)),
    );
    b.tensor(
        "blk.0.attn_output.weight",
        &[q_rows as u64, HIDDEN as u64],
        0,
        f32_bytes(&rand(q_rows * HIDDEN)),
    );
    let (gate, _) = quantize_q4_1(&rand(FF * HIDDEN));
    b.tensor(
        "blk.0.ffn_gate.weight",
        &[HIDDEN as u64, FF as u64],
        GgmlType::Q4_1.id(),
        gate,
    );
    b.tensor(
        "blk.0.ffn_up.weight",
        &[HIDDEN as u64, FF as u64],
        0,
        f32_bytes(&rand(FF * HIDDEN)),
    );
    b.tensor(
        "blk.0.ffn_down.weight",
        &[FF as u64, HIDDEN as u64],
        0,
        f32_bytes(&rand(FF * HIDDEN)),
    );
    b.tensor(
        "blk.0.attn_norm.weight",
        &[HIDDEN as u64],
        0,
        f32_bytes(&rand(HIDDEN)),
    );
    b.tensor(
        "blk.0.ffn_norm.weight",
        &[HIDDEN as u64],
        0,
        f32_bytes(&rand(HIDDEN)),
    );
    b.tensor(
        "output_norm.weight",
        &[HIDDEN as u64],
        0,
        f32_bytes(&rand(HIDDEN)),
    );
    if !tied {
        b.tensor(
            "output.weight",
            &[HIDDEN as u64, vocab as u64],
            0,
            f32_bytes(&rand(vocab * HIDDEN)),
        );
    }
    TinyModel {
        builder: b,
        q_hf,
        k_hf,
        vocab,
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn safetensors_f32(dir: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let values = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("{name}: dtype {other:?}"),
    };
    (t.shape().to_vec(), values)
}

#[test]
fn converts_a_tiny_llama_to_a_hugging_face_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    for tied in [true, false] {
        let m = tiny_llama(tied);
        let gguf = tmp_file(&dir, "tiny.gguf", &m.builder.build().bytes);
        let out = dir.path().join(format!("hf_tied_{tied}"));
        let report = convert_gguf_to_hf(&gguf, &out, OutDtype::F32).expect("convert");
        assert_eq!(report.tensors.len(), 1 + 9 + 1 + usize::from(!tied));
        assert!(
            report.ignored_metadata.is_empty(),
            "{:?}",
            report.ignored_metadata
        );

        let c = read_json(&out.join("config.json"));
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["hidden_size"], HIDDEN);
        assert_eq!(c["num_attention_heads"], HEADS);
        assert_eq!(c["num_key_value_heads"], KV_HEADS);
        assert_eq!(c["head_dim"], HEAD_DIM);
        assert_eq!(c["intermediate_size"], FF);
        assert_eq!(c["vocab_size"], m.vocab);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["rms_norm_eps"], 1e-5); // the f32 written as its shortest decimal
        assert_eq!(c["max_position_embeddings"], 256);
        assert_eq!(c["tie_word_embeddings"], tied);
        assert_eq!(c["rope_scaling"], serde_json::Value::Null);
        assert_eq!(
            (c["bos_token_id"].as_u64(), c["eos_token_id"].as_u64()),
            (Some(1), Some(2))
        );
        assert_eq!(c["torch_dtype"], "float32");

        let g = GgufFile::open(&gguf).expect("open");
        let (shape, q) = safetensors_f32(&out, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(shape, vec![HEADS * HEAD_DIM, HIDDEN]);
        assert_bits_eq("q_proj", &q, &m.q_hf);
        let (_, k) = safetensors_f32(&out, "model.layers.0.self_attn.k_proj.weight");
        assert_bits_eq("k_proj", &k, &m.k_hf);
        for (gguf_name, hf) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            (
                "blk.0.ffn_gate.weight",
                "model.layers.0.mlp.gate_proj.weight",
            ),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
            ),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            ("output_norm.weight", "model.norm.weight"),
        ] {
            let (shape, v) = safetensors_f32(&out, hf);
            assert_eq!(shape, g.tensor(gguf_name).expect("t").shape(), "{hf}");
            assert_bits_eq(hf, &v, &g.dequantize(gguf_name).expect("dq"));
        }
        let st = std::fs::read(out.join("model.safetensors")).expect("st");
        let has_head = safetensors::SafeTensors::deserialize(&st)
            .expect("st")
            .tensor("lm_head.weight")
            .is_ok();
        assert_eq!(has_head, !tied);

        let tc = read_json(&out.join("tokenizer_config.json"));
        assert_eq!(tc["bos_token"], "<|im_start|>");
        assert_eq!(tc["eos_token"], "<|im_end|>");
        assert_eq!(tc["chat_template"], "{{ messages }}");
        assert_eq!(tc["add_bos_token"], false);
        let sm = read_json(&out.join("special_tokens_map.json"));
        assert_eq!(sm["pad_token"], "<|im_end|>");
        let gc = read_json(&out.join("generation_config.json"));
        assert_eq!(gc["eos_token_id"], 2);

        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json"))
            .expect("tokenizer.json loads");
        let id = |t: &str| tok.token_to_id(t).unwrap_or_else(|| panic!("no token {t}"));
        let enc = tok
            .encode("<|im_start|>hi hi 123<think>", true)
            .expect("encode");
        // Digits split one by one (smollm), so the "12" merge never applies.
        let want = vec![
            1,
            id("hi"),
            id("Ġhi"),
            id("Ġ"),
            id("1"),
            id("2"),
            id("3"),
            id("<think>"),
        ];
        assert_eq!(enc.get_ids(), want.as_slice());
        assert_eq!(
            tok.decode(enc.get_ids(), false).expect("decode"),
            "<|im_start|>hi hi 123<think>"
        );
    }
}

#[test]
fn bf16_output_and_wrong_permutations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = tiny_llama(true);
    let gguf = tmp_file(&dir, "tiny.gguf", &m.builder.build().bytes);
    let out = dir.path().join("bf16");
    convert_gguf_to_hf(&gguf, &out, OutDtype::Bf16).expect("convert");
    assert_eq!(
        read_json(&out.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let (_, q) = safetensors_f32(&out, "model.layers.0.self_attn.q_proj.weight");
    let want: Vec<f32> = m.q_hf.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_bits_eq("bf16 q_proj", &q, &want);

    for qk in [QkPermutation::Forward, QkPermutation::Keep] {
        let out = dir.path().join(format!("{qk:?}"));
        convert_gguf_to_hf_with(&gguf, &out, OutDtype::F32, qk).expect("convert");
        let (_, q) = safetensors_f32(&out, "model.layers.0.self_attn.q_proj.weight");
        assert_ne!(q, m.q_hf, "{qk:?} must differ from the correct layout");
    }
}

#[test]
fn sentencepiece_vocabularies_get_merges_from_scores() {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0f32, 0.0, 0.0];
    for byte in 0..256 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (t, s) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("i", -3.0),
        ("▁h", -4.0),
        ("hi", -5.0),
        ("▁hi", -6.0),
    ] {
        tokens.push(t.into());
        types.push(1);
        scores.push(s);
    }
    let mut b = Builder::new();
    b.kv("tokenizer.ggml.model", V::Str("llama".into()))
        .kv(
            "tokenizer.ggml.tokens",
            V::strs(&tokens.iter().map(String::as_str).collect::<Vec<_>>()),
        )
        .kv(
            "tokenizer.ggml.token_type",
            V::Arr(5, types.iter().map(|&t| V::I32(t)).collect()),
        )
        .kv(
            "tokenizer.ggml.scores",
            V::Arr(6, scores.iter().map(|&s| V::F32(s)).collect()),
        )
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", V::U32(0));
    let dir = tempfile::tempdir().expect("tempdir");
    let g = GgufFile::open(tmp_file(&dir, "sp.gguf", &b.build().bytes)).expect("open");
    let files = sppo::formats::convert::tokenizer_files(&g, 4096).expect("tokenizer");
    // generate_merges order: by the merged token's score, best first.
    let merges = files.tokenizer_json["model"]["merges"].clone();
    // Equal scores: the longer left piece first (HF sorts by (score, len(left), len(right)), descending).
    assert_eq!(
        merges,
        serde_json::json!([["▁", "h"], ["h", "i"], ["▁h", "i"], ["▁", "hi"]])
    );
    assert_eq!(files.tokenizer_config["add_bos_token"], true); // llama.cpp's default for SentencePiece
    let tok: tokenizers::Tokenizer = serde_json::to_string(&files.tokenizer_json)
        .expect("json")
        .parse()
        .expect("load");
    let id = |t: &str| tok.token_to_id(t).unwrap_or_else(|| panic!("no token {t}"));
    let enc = tok.encode("hi hi\n", true).expect("encode");
    assert_eq!(enc.get_ids(), &[1, id("▁hi"), id("▁hi"), id("<0x0A>")]);
    assert_eq!(tok.decode(enc.get_ids(), true).expect("decode"), "hi hi\n");
}

#[test]
fn conversion_errors_name_the_key_or_tensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    type Edit = Box<dyn Fn(&mut Builder)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "no_layers",
            Box::new(|b| {
                b.remove("llama.block_count");
            }),
            "llama.block_count",
        ),
        (
            "no_eps",
            Box::new(|b| {
                b.remove("llama.attention.layer_norm_rms_epsilon");
            }),
            "llama.attention.layer_norm_rms_epsilon",
        ),
        (
            "bad_type",
            Box::new(|b| {
                b.kv("llama.block_count", V::Str("one".into()));
            }),
            "llama.block_count",
        ),
        (
            "arch",
            Box::new(|b| {
                b.kv("general.architecture", V::Str("gpt-neox".into()));
            }),
            "gpt-neox",
        ),
        (
            "tok_model",
            Box::new(|b| {
                b.kv("tokenizer.ggml.model", V::Str("bert".into()));
            }),
            "tokenizer.ggml.model",
        ),
        (
            "tok_pre",
            Box::new(|b| {
                b.kv("tokenizer.ggml.pre", V::Str("made-up".into()));
            }),
            "made-up",
        ),
        (
            "missing_tensor",
            Box::new(|b| {
                b.tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
            }),
            "blk.0.ffn_up.weight",
        ),
        (
            "extra_tensor",
            Box::new(|b| {
                b.tensor("blk.0.attn_q.bias", &[64], 0, vec![0u8; 256]);
            }),
            "blk.0.attn_q.bias",
        ),
        (
            "heads",
            Box::new(|b| {
                b.kv("llama.attention.head_count", V::U32(2));
            }),
            "blk.0.attn_k.weight",
        ),
    ];
    for (name, edit, needle) in cases {
        let mut m = tiny_llama(true);
        edit(&mut m.builder);
        let gguf = tmp_file(&dir, &format!("{name}.gguf"), &m.builder.build().bytes);
        let out = dir.path().join(format!("{name}_out"));
        let e = match convert_gguf_to_hf(&gguf, &out, OutDtype::F32) {
            Err(e) => format!("{e:#}"),
            Ok(_) => panic!("{name}: converted"),
        };
        assert!(
            e.contains(needle) && e.contains(&format!("{name}.gguf")),
            "{name}: {e}"
        );
        assert!(
            !out.exists(),
            "{name}: a failed conversion left {}",
            out.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct GGUF

fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("SPPO_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from("/work/main/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} not found (set SPPO_SMOLLM2_GGUF)",
            p.display()
        );
        None
    }
}

#[test]
fn smollm2_metadata_and_tokenizer_match_the_fixture() {
    let Some(path) = smollm2_path() else { return };
    let g = GgufFile::open(&path).expect("open SmolLM2");
    assert_eq!(g.get_str("general.architecture").ok(), Some("llama"));
    assert_eq!(g.get_u64("llama.block_count").ok(), Some(30));
    assert_eq!(g.get_u64("llama.attention.head_count").ok(), Some(9));
    assert_eq!(g.get_u64("llama.attention.head_count_kv").ok(), Some(3));
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens")
            .map(|t| t.len())
            .ok(),
        Some(49152)
    );
    assert_eq!(
        g.tensor("token_embd.weight").expect("embd").shape(),
        vec![49152, 576]
    );
    assert_eq!(
        g.tensor("token_embd.weight").expect("embd").dtype,
        GgmlType::Q8_0
    );
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").expect("q").dtype,
        GgmlType::Q4_1
    );
    assert!(!g.has_tensor("output.weight"));

    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("smollm2");
    let report = convert_gguf_to_hf(&path, &out, OutDtype::F32).expect("convert SmolLM2");
    assert_eq!(report.tensors.len(), 1 + 30 * 9 + 1);
    let c = read_json(&out.join("config.json"));
    assert_eq!(
        (c["num_hidden_layers"].as_u64(), c["head_dim"].as_u64()),
        (Some(30), Some(64))
    );
    assert_eq!(c["tie_word_embeddings"], true);

    // q_proj of layer 0 is exactly the unpermuted dequantised GGUF tensor.
    let (shape, q) = safetensors_f32(&out, "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(shape, vec![576, 576]);
    let raw = g.dequantize("blk.0.attn_q.weight").expect("dq");
    assert_bits_eq(
        "smollm2 q_proj",
        &q,
        &unpermute_qk(&raw, 576, 576, 9).expect("unpermute"),
    );

    let tok =
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("tokenizer.json loads");
    assert_eq!(tok.get_vocab_size(true), 49152);
    let fixture_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/smollm2_tokens.json");
    let fixture = read_json(&fixture_path);
    assert_eq!(fixture["format_version"], 1);
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 6);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        let enc = tok.encode(text, true).expect("encode");
        assert_eq!(enc.get_ids(), want.as_slice(), "{text:?}");
        assert_eq!(
            tok.decode(enc.get_ids(), false).expect("decode"),
            text,
            "round trip of {text:?}"
        );
    }
}

/// Writes the converted SmolLM2 directory to `SPPO_GGUF_CHECK_DIR` (default
/// `/tmp/sppo_gguf_check`) for `scripts/check_gguf_convert.py`, along with a synthetic GGUF holding
/// every dequantisable type and our dequantisation of it (`dtypes.gguf`, `dtypes_ours.safetensors`).
#[test]
#[ignore = "writes files for scripts/check_gguf_convert.py"]
fn write_converted_smollm2_for_python_check() {
    let root = std::env::var_os("SPPO_GGUF_CHECK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp/sppo_gguf_check".into());
    std::fs::create_dir_all(&root).expect("create check dir");
    let (b, _) = dtype_file(None, 3);
    let gguf = root.join("dtypes.gguf");
    std::fs::write(&gguf, b.build().bytes).expect("write dtypes.gguf");
    let g = GgufFile::open(&gguf).expect("open");
    let values: Vec<(String, Vec<usize>, Vec<u8>)> = g
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape(),
                f32_bytes(&g.dequantize(&t.name).expect("dq")),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = values
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &root.join("dtypes_ours.safetensors"))
        .expect("write safetensors");

    // A SentencePiece vocabulary (Mistral/Llama-2 style) for the tokenizer comparison.
    let sp = tiny_llama_with(true, true);
    let sp_gguf = root.join("sentencepiece.gguf");
    std::fs::write(&sp_gguf, sp.builder.build().bytes).expect("write sentencepiece.gguf");
    convert_gguf_to_hf(&sp_gguf, &root.join("sentencepiece_hf"), OutDtype::F32)
        .expect("convert sentencepiece");

    let Some(path) = smollm2_path() else { return };
    let report =
        convert_gguf_to_hf(&path, &root.join("smollm2_hf"), OutDtype::F32).expect("convert");
    eprintln!(
        "wrote {} tensors to {}",
        report.tensors.len(),
        report.out_dir.display()
    );
    eprintln!("ignored metadata: {:?}", report.ignored_metadata);
    eprintln!(
        "ignored tensors: {:?}; notes: {:?}",
        report.ignored_tensors, report.notes
    );
}

#[test]
fn llama_bpe_pre_tokenizer_and_rope_scaling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = tiny_llama(false);
    m.builder
        .kv("tokenizer.ggml.pre", V::Str("llama-bpe".into()))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(true))
        .kv("llama.rope.scaling.type", V::Str("linear".into()))
        .kv("llama.rope.scaling.factor", V::F32(2.0))
        .kv("llama.attention.key_length", V::U32(HEAD_DIM as u32));
    let gguf = tmp_file(&dir, "llama3ish.gguf", &m.builder.build().bytes);
    let out = dir.path().join("hf");
    convert_gguf_to_hf(&gguf, &out, OutDtype::F32).expect("convert");
    let c = read_json(&out.join("config.json"));
    assert_eq!(
        c["rope_scaling"],
        serde_json::json!({"type": "linear", "rope_type": "linear", "factor": 2.0})
    );
    assert_eq!(c["head_dim"], HEAD_DIM);
    let tok =
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).expect("tokenizer.json loads");
    let id = |t: &str| tok.token_to_id(t).unwrap_or_else(|| panic!("no token {t}"));
    // Llama 3 splits digit runs into groups of up to three, then merges within them; BOS is added.
    let enc = tok.encode("12345 hi", true).expect("encode");
    assert_eq!(
        enc.get_ids(),
        &[1, id("12"), id("3"), id("4"), id("5"), id("Ġhi")]
    );
}
