//! `sppo rank`: judge every prompt's K responses with an oracle and pick chosen/rejected.
//!
//! Input: generate's output, one record per prompt, `{"prompt", "responses": [...],
//! "reference"?, ...}` (JSONL, or Parquet by the `.parquet` extension or `PAR1` magic). `prompt` may
//! also be a chat message list (the last user message is judged); without `responses`, the reference
//! pipeline's `generate_0`, `generate_1`, ... columns (strings or message lists) are read.
//! Output: every input field, plus (replacing input fields of the same names) `matrix` (the oracle's
//! K×K P), `scores` (what chosen/rejected are the argmax/argmin of, [`Ranking::scores`]),
//! `win_rates`, `oracle_scores` (score-based oracles only), `chosen`, `rejected` (texts),
//! `chosen_index`, `rejected_index`, `chosen_probs`, `chosen_probs_win`, `chosen_probs_lose`, and
//! `oracle` + `winrate` (the spec and estimator, checked on resume).
//!
//! **Crash semantics.** Output is an append log of JSONL lines: each batch is written with one
//! `write_all`, then flushed and fsynced, so a crash loses at most the batch in flight. On start an
//! existing output is resumed: a torn last line (no trailing newline) is cut off, every complete line
//! must match the input at the same position (same `prompt`, `responses`, `prompt_id`, and the same
//! `oracle` and `winrate`, else an error: delete the file or pick another `--out`), those prompts
//! are skipped and the rest appended. A complete output is left as it is.
//! A `.parquet` output is built from the log `OUT.partial.jsonl` once every prompt is ranked
//! (written atomically, then the log is removed); its columns are the reference pipeline's
//! (`prompt`, `chosen`, `rejected` as `[{content, role}]` user+assistant message lists,
//! `chosen_probs`, `chosen_probs_win`, `chosen_probs_lose`) plus `prompt_id`, `responses`,
//! `scores`, `matrix`, `chosen_index`, `rejected_index`, and `extra_json`: a JSON object of every
//! other field, merged back when the file is read ([`read_records`], [`read_ranked`]).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::oracle::winrate::{rank, Ranking, WinRate};
use crate::oracle::{Judgement, Oracle, OracleInput};

/// One record read from a JSONL line or a Parquet row: where it came from, and its fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// `file:LINE` (1-based) or `file: row N` (0-based), for errors.
    pub at: String,
    pub fields: Map<String, Value>,
}

/// A prompt to rank.
#[derive(Clone, Debug, PartialEq)]
pub struct RankInput {
    pub at: String,
    /// Every field of the input record, kept in the output.
    pub fields: Map<String, Value>,
    /// The text the oracle judges (the prompt, or the last user message of a message list).
    pub prompt: String,
    pub responses: Vec<String>,
    pub reference: Option<String>,
}

/// One ranked record, read back from `sppo rank`'s output or the reference pipeline's Parquet.
#[derive(Clone, Debug, PartialEq)]
pub struct RankedRow {
    pub at: String,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_probs: f64,
    pub chosen_probs_win: f64,
    pub chosen_probs_lose: f64,
    /// Every field, with `chosen`/`rejected` as the response texts (message lists flattened).
    pub fields: Map<String, Value>,
}

pub struct RankOptions {
    pub winrate: WinRate,
    /// Prompts per oracle call (and per fsync of the output).
    pub batch_size: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RankSummary {
    pub prompts: usize,
    /// Prompts found done in an existing output.
    pub resumed: usize,
    /// Prompts ranked by this call.
    pub ranked: usize,
    /// Distinct pairs compared by this call, Σ K(K−1)/2.
    pub pairs: u64,
    pub seconds: f64,
}

pub fn is_parquet_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The append log behind a `.parquet` output.
pub fn partial_log_path(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial.jsonl");
    output.with_file_name(name)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A response or prompt given as a string or as a `[{role, content}]` message list: the string, or
/// the content of the last message with role `role` (else of the last message).
fn message_text(v: &Value, role: &str) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(msgs) => {
            let content = |m: &Value| m.get("content").and_then(Value::as_str).map(str::to_string);
            msgs.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some(role))
                .or_else(|| msgs.last())
                .and_then(content)
        }
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------ reading

fn is_parquet_file(path: &Path) -> Result<bool> {
    if is_parquet_path(path) {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f
        .read(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(n == 4 && &magic == b"PAR1")
}

/// Every record of a JSONL or Parquet file (blank lines skipped). Parquet rows get their
/// `extra_json` column merged back into the record; null cells are left out.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    if is_parquet_file(path)? {
        return read_parquet_records(path);
    }
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{at}: cannot read (is the file UTF-8?)"))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(fields)) => out.push(Record { at, fields }),
            Ok(other) => bail!("{at}: expected a JSON object, got {}", type_name(&other)),
            Err(e) => bail!("{at}: malformed JSON: {e}"),
        }
    }
    Ok(out)
}

fn read_parquet_records(path: &Path) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(f)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let rows = reader
        .get_row_iter(None)
        .with_context(|| format!("{}: reading rows", path.display()))?;
    let mut out = Vec::new();
    for (index, row) in rows.enumerate() {
        let at = format!("{}: row {index}", path.display());
        let row = row.with_context(|| format!("{at}: decoding"))?;
        let mut fields = Map::new();
        let mut extra = None;
        for (name, field) in row.get_column_iter() {
            let v = crate::prompts::field_to_json(field);
            if name == EXTRA_COLUMN {
                extra = Some(v);
            } else if !v.is_null() {
                // A null cell reads as an absent field (as in prompts.rs), so that a JSONL record
                // without `prompt_id` and its Parquet row compare equal on resume.
                fields.insert(name.clone(), v);
            }
        }
        match extra {
            Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
                Ok(Value::Object(more)) => fields.extend(more),
                _ => bail!("{at}: `{EXTRA_COLUMN}` is not a JSON object: {s:.200}"),
            },
            Some(Value::Null) | None => {}
            Some(other) => bail!(
                "{at}: `{EXTRA_COLUMN}` must be a string column, got {}",
                type_name(&other)
            ),
        }
        out.push(Record { at, fields });
    }
    Ok(out)
}

impl RankInput {
    pub fn from_record(r: Record) -> Result<RankInput> {
        let at = r.at;
        let f = r.fields;
        let prompt = match f.get("prompt") {
            None => bail!("{at}: no `prompt` field"),
            Some(v) => message_text(v, "user").with_context(|| {
                format!(
                    "{at}: `prompt` must be a string or a [{{role, content}}] list, got {}",
                    type_name(v)
                )
            })?,
        };
        let responses: Vec<String> = match f.get("responses") {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    message_text(v, "assistant").with_context(|| {
                        format!(
                            "{at}: `responses[{i}]` must be a string, got {}",
                            type_name(v)
                        )
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!(
                "{at}: `responses` must be a list of strings, got {}",
                type_name(other)
            ),
            None => {
                // The reference pipeline's generated set: generate_0 .. generate_{K-1}.
                let mut out = Vec::new();
                while let Some(v) = f.get(&format!("generate_{}", out.len())) {
                    let i = out.len();
                    out.push(message_text(v, "assistant").with_context(|| {
                        format!(
                            "{at}: `generate_{i}` must be a string or a message list, got {}",
                            type_name(v)
                        )
                    })?);
                }
                if out.is_empty() {
                    bail!("{at}: no `responses` field (nor generate_0, generate_1, ...)");
                }
                out
            }
        };
        if responses.len() < 2 {
            bail!(
                "{at}: ranking needs at least 2 responses, the record has {}",
                responses.len()
            );
        }
        let reference = match f.get("reference") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => bail!(
                "{at}: `reference` must be a string, got {}",
                type_name(other)
            ),
        };
        Ok(RankInput {
            at,
            fields: f,
            prompt,
            responses,
            reference,
        })
    }

    /// `prompt_id` as written, for messages.
    fn id_text(&self) -> String {
        match self
            .fields
            .get("prompt_id")
            .or_else(|| self.fields.get("id"))
        {
            Some(Value::String(s)) => format!(" (prompt_id {s})"),
            Some(v) => format!(" (prompt_id {v})"),
            None => String::new(),
        }
    }
}

/// Every prompt of a generations file.
pub fn read_rank_inputs(path: &Path) -> Result<Vec<RankInput>> {
    let inputs = read_records(path)?
        .into_iter()
        .map(RankInput::from_record)
        .collect::<Result<Vec<_>>>()?;
    if inputs.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(inputs)
}

/// A ranked output read back: `sppo rank`'s JSONL or Parquet, or the reference pipeline's Parquet
/// (`chosen`/`rejected` as message lists, `prompt` optional: then the user turn of `chosen`).
pub fn read_ranked(path: &Path) -> Result<Vec<RankedRow>> {
    read_records(path)?
        .into_iter()
        .map(|r| {
            let at = r.at;
            let mut fields = r.fields;
            let text = |fields: &Map<String, Value>, key: &str, role: &str| -> Result<String> {
                let v = fields
                    .get(key)
                    .with_context(|| format!("{at}: no `{key}` field"))?;
                message_text(v, role).with_context(|| {
                    format!(
                        "{at}: `{key}` must be a string or a [{{role, content}}] list, got {}",
                        type_name(v)
                    )
                })
            };
            let prompt = match fields.get("prompt") {
                Some(_) => text(&fields, "prompt", "user")?,
                None => text(&fields, "chosen", "user")?,
            };
            let chosen = text(&fields, "chosen", "assistant")?;
            let rejected = text(&fields, "rejected", "assistant")?;
            let num = |key: &str| -> Result<f64> {
                match fields.get(key).and_then(Value::as_f64) {
                    Some(x) if x.is_finite() => Ok(x),
                    _ => bail!(
                        "{at}: `{key}` must be a finite number, got {:?}",
                        fields.get(key)
                    ),
                }
            };
            let (chosen_probs, chosen_probs_win, chosen_probs_lose) = (
                num("chosen_probs")?,
                num("chosen_probs_win")?,
                num("chosen_probs_lose")?,
            );
            fields.insert("chosen".into(), Value::String(chosen.clone()));
            fields.insert("rejected".into(), Value::String(rejected.clone()));
            Ok(RankedRow {
                at,
                prompt,
                chosen,
                rejected,
                chosen_probs,
                chosen_probs_win,
                chosen_probs_lose,
                fields,
            })
        })
        .collect()
}

// ----------------------------------------------------------------------------------------- ranking

/// The output record for one prompt.
pub fn ranked_record(
    input: &RankInput,
    j: &Judgement,
    r: &Ranking,
    oracle: &str,
    mode: WinRate,
) -> Map<String, Value> {
    let mut out = input.fields.clone();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    put("matrix", Value::from(j.matrix.rows()));
    put("scores", Value::from(r.scores.clone()));
    put("win_rates", Value::from(r.win_rates.clone()));
    if let Some(s) = &j.scores {
        put("oracle_scores", Value::from(s.clone()));
    }
    put("chosen", Value::String(input.responses[r.chosen].clone()));
    put(
        "rejected",
        Value::String(input.responses[r.rejected].clone()),
    );
    put("chosen_index", Value::from(r.chosen));
    put("rejected_index", Value::from(r.rejected));
    put("chosen_probs", Value::from(r.chosen_probs));
    put("chosen_probs_win", Value::from(r.chosen_probs_win));
    put("chosen_probs_lose", Value::from(r.chosen_probs_lose));
    put("oracle", Value::String(oracle.to_string()));
    put("winrate", Value::String(mode.to_string()));
    out
}

/// Checks that output record `i` was made from input `i` by the same oracle and estimator.
fn check_done(done: &Record, input: &RankInput, oracle: &str, mode: WinRate) -> Result<()> {
    let hint = "delete it or pick another --out to start over";
    let same = |key: &str| done.fields.get(key) == input.fields.get(key);
    if !same("prompt") || !same("prompt_id") {
        bail!(
            "{}: this output line is for another prompt than input {}{} ({hint})",
            done.at,
            input.at,
            input.id_text()
        );
    }
    let responses: Option<Vec<String>> = match done.fields.get("responses") {
        Some(Value::Array(a)) => a.iter().map(|v| message_text(v, "assistant")).collect(),
        _ => None,
    };
    if responses.as_ref() != Some(&input.responses) {
        bail!(
            "{}: the responses differ from input {}{} (another generation?) ({hint})",
            done.at,
            input.at,
            input.id_text()
        );
    }
    let got = |key: &str| {
        done.fields
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("(none)")
            .to_string()
    };
    if got("oracle") != oracle || got("winrate") != mode.as_str() {
        bail!(
            "{}: ranked with oracle `{}` and --winrate {}, this run uses `{oracle}` and {mode} ({hint})",
            done.at,
            got("oracle"),
            got("winrate")
        );
    }
    Ok(())
}

/// Reads an existing append log, cuts a torn last line, verifies the done lines; how many are done.
fn resume_log(log: &Path, inputs: &[RankInput], oracle: &str, mode: WinRate) -> Result<usize> {
    let bytes = match fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", log.display())),
    };
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        eprintln!("warning: {}: dropping a torn last line ({} bytes, from an interrupted run); it is ranked again", log.display(), bytes.len() - keep);
        let f = OpenOptions::new()
            .write(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        f.set_len(keep as u64)
            .with_context(|| format!("truncating {}", log.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", log.display()))?;
    }
    let mut n = 0;
    for (i, line) in bytes[..keep].split(|&b| b == b'\n').enumerate() {
        let at = format!("{}:{}", log.display(), i + 1);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let fields = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(m)) => m,
            _ => bail!("{at}: not a JSON object: the output is corrupt (delete it to start over)"),
        };
        let Some(input) = inputs.get(n) else {
            bail!(
                "{at}: the output has more records than the input has prompts ({})",
                inputs.len()
            );
        };
        check_done(&Record { at, fields }, input, oracle, mode)?;
        n += 1;
    }
    Ok(n)
}

/// Ranks `input` into `output` (module doc), resuming a partial output.
pub fn rank_file(
    oracle: &mut dyn Oracle,
    input: &Path,
    output: &Path,
    opts: &RankOptions,
) -> Result<RankSummary> {
    if opts.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let inputs = read_rank_inputs(input)?;
    let name = oracle.name();
    let parquet_out = is_parquet_path(output);
    let log = if parquet_out {
        partial_log_path(output)
    } else {
        output.to_path_buf()
    };
    let mut summary = RankSummary {
        prompts: inputs.len(),
        resumed: 0,
        ranked: 0,
        pairs: 0,
        seconds: 0.0,
    };

    if parquet_out && output.exists() {
        // A Parquet output is only ever written whole: it must be complete and ours.
        let done = read_records(output)?;
        if done.len() != inputs.len() {
            bail!(
                "{}: has {} rows, the input {} has {} prompts (delete it to start over)",
                output.display(),
                done.len(),
                input.display(),
                inputs.len()
            );
        }
        for (d, i) in done.iter().zip(&inputs) {
            check_done(d, i, &name, opts.winrate)?;
        }
        if log.exists() {
            fs::remove_file(&log)
                .with_context(|| format!("removing the stale log {}", log.display()))?;
        }
        summary.resumed = inputs.len();
        return Ok(summary);
    }

    let resumed = resume_log(&log, &inputs, &name, opts.winrate)?;
    summary.resumed = resumed;
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {} for appending", log.display()))?;

    let pb = if opts.progress {
        indicatif::ProgressBar::new(inputs.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} ranking {bar:30} {pos}/{len} prompts, {msg} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(resumed as u64);
    pb.reset_eta();
    let start = Instant::now();

    for batch in inputs[resumed..].chunks(opts.batch_size) {
        let views: Vec<OracleInput<'_>> = batch
            .iter()
            .map(|x| OracleInput {
                prompt: &x.prompt,
                responses: &x.responses,
                reference: x.reference.as_deref(),
            })
            .collect();
        let (first, last) = (&batch[0], &batch[batch.len() - 1]);
        let where_ = || format!("ranking {} .. {}{}", first.at, last.at, first.id_text());
        let judgements = oracle.judge(&views).with_context(where_)?;
        if judgements.len() != batch.len() {
            bail!(
                "{}: the oracle returned {} judgements for {} prompts",
                where_(),
                judgements.len(),
                batch.len()
            );
        }
        let mut text = Vec::new();
        for (x, j) in batch.iter().zip(&judgements) {
            if j.matrix.k() != x.responses.len() {
                bail!(
                    "{}{}: the oracle judged {} responses, the record has {}",
                    x.at,
                    x.id_text(),
                    j.matrix.k(),
                    x.responses.len()
                );
            }
            let r = rank(&j.matrix, opts.winrate)
                .with_context(|| format!("{}{}", x.at, x.id_text()))?;
            serde_json::to_writer(
                &mut text,
                &Value::Object(ranked_record(x, j, &r, &name, opts.winrate)),
            )?;
            text.push(b'\n');
            summary.pairs += (x.responses.len() * (x.responses.len() - 1) / 2) as u64;
        }
        // One write, then fsync: a crash loses at most this batch (module doc).
        file.write_all(&text)
            .and_then(|()| file.flush())
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing {}", log.display()))?;
        summary.ranked += batch.len();
        pb.inc(batch.len() as u64);
        pb.set_message(format!(
            "{:.1} pairs/s",
            summary.pairs as f64 / start.elapsed().as_secs_f64().max(1e-9)
        ));
    }
    pb.finish_and_clear();
    drop(file);
    summary.seconds = start.elapsed().as_secs_f64();

    if parquet_out {
        let records = read_records(&log)?;
        write_ranked_parquet(output, &records)?;
        fs::remove_file(&log).with_context(|| format!("removing {}", log.display()))?;
    }
    Ok(summary)
}

// ------------------------------------------------------------------------------------ Parquet out

/// Other fields of a record travel in this column as a JSON object.
pub const EXTRA_COLUMN: &str = "extra_json";

const RANKED_SCHEMA: &str = "message ranked {
  required binary prompt (UTF8);
  optional binary prompt_id (UTF8);
  required group chosen (LIST) { repeated group list { required group element { required binary content (UTF8); required binary role (UTF8); } } }
  required group rejected (LIST) { repeated group list { required group element { required binary content (UTF8); required binary role (UTF8); } } }
  required double chosen_probs;
  required double chosen_probs_win;
  required double chosen_probs_lose;
  required int64 chosen_index;
  required int64 rejected_index;
  required group responses (LIST) { repeated group list { required binary element (UTF8); } }
  required group scores (LIST) { repeated group list { required double element; } }
  required group matrix (LIST) { repeated group list { required group element (LIST) { repeated group list { required double element; } } } }
  required binary extra_json (UTF8);
}";

/// Fields stored in typed columns; everything else goes to `extra_json`.
const TYPED: [&str; 12] = [
    "prompt",
    "prompt_id",
    "chosen",
    "rejected",
    "chosen_probs",
    "chosen_probs_win",
    "chosen_probs_lose",
    "chosen_index",
    "rejected_index",
    "responses",
    "scores",
    "matrix",
];

/// Column buffers: values plus definition/repetition levels (Dremel encoding; a list's first
/// element has repetition level 0, later ones the list's depth; every list here is required and
/// non-empty or empty, so an element's definition level is its list depth).
#[derive(Default)]
struct Col<T> {
    values: Vec<T>,
    def: Vec<i16>,
    rep: Vec<i16>,
}

impl<T> Col<T> {
    /// One row's list (depth 1).
    fn list(&mut self, items: impl IntoIterator<Item = T>) {
        let start = self.values.len();
        for (i, v) in items.into_iter().enumerate() {
            self.values.push(v);
            self.def.push(1);
            self.rep.push(if i == 0 { 0 } else { 1 });
        }
        if self.values.len() == start {
            self.def.push(0); // empty list: a level with no value
            self.rep.push(0);
        }
    }
}

/// Writes ranked records (from the log) as Parquet, atomically.
pub fn write_ranked_parquet(path: &Path, records: &[Record]) -> Result<()> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let mut prompt: Vec<ByteArray> = Vec::new();
    let mut prompt_id: Col<ByteArray> = Col::default();
    let mut msg_cols: [Col<ByteArray>; 4] = Default::default(); // chosen content, role, rejected content, role
    let mut probs: [Vec<f64>; 3] = Default::default();
    let mut idx: [Vec<i64>; 2] = Default::default();
    let mut responses: Col<ByteArray> = Col::default();
    let mut scores: Col<f64> = Col::default();
    let mut matrix: Col<f64> = Col::default();
    let mut extra: Vec<ByteArray> = Vec::new();

    for r in records {
        let at = &r.at;
        let f = &r.fields;
        let get = |k: &str| f.get(k).with_context(|| format!("{at}: no `{k}` field"));
        let prompt_text = message_text(get("prompt")?, "user")
            .with_context(|| format!("{at}: `prompt` is not text"))?;
        prompt.push(ByteArray::from(prompt_text.as_str()));
        let mut other: Map<String, Value> = f
            .iter()
            .filter(|(k, _)| !TYPED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !f["prompt"].is_string() {
            other.insert("prompt".into(), f["prompt"].clone()); // the original message list wins on reading
        }
        match f.get("prompt_id") {
            Some(Value::String(s)) => {
                prompt_id.values.push(ByteArray::from(s.as_str()));
                prompt_id.def.push(1);
            }
            Some(v) => {
                other.insert("prompt_id".into(), v.clone());
                prompt_id.def.push(0);
            }
            None => prompt_id.def.push(0),
        }
        for (c, key) in ["chosen", "rejected"].into_iter().enumerate() {
            let text = get(key)?
                .as_str()
                .with_context(|| format!("{at}: `{key}` must be a string"))?;
            msg_cols[2 * c].list([ByteArray::from(prompt_text.as_str()), ByteArray::from(text)]);
            msg_cols[2 * c + 1].list([ByteArray::from("user"), ByteArray::from("assistant")]);
        }
        for (c, key) in ["chosen_probs", "chosen_probs_win", "chosen_probs_lose"]
            .into_iter()
            .enumerate()
        {
            probs[c].push(
                get(key)?
                    .as_f64()
                    .with_context(|| format!("{at}: `{key}` must be a number"))?,
            );
        }
        for (c, key) in ["chosen_index", "rejected_index"].into_iter().enumerate() {
            idx[c].push(
                get(key)?
                    .as_i64()
                    .with_context(|| format!("{at}: `{key}` must be an integer"))?,
            );
        }
        let list = |k: &str| {
            get(k)?
                .as_array()
                .with_context(|| format!("{at}: `{k}` must be a list"))
        };
        let texts = list("responses")?
            .iter()
            .map(|v| v.as_str().map(ByteArray::from))
            .collect::<Option<Vec<_>>>();
        responses.list(texts.with_context(|| format!("{at}: `responses` must be strings"))?);
        let nums = list("scores")?
            .iter()
            .map(Value::as_f64)
            .collect::<Option<Vec<_>>>();
        scores.list(nums.with_context(|| format!("{at}: `scores` must be numbers"))?);
        // matrix: depth-2 list; rep 0 starts the row, 1 a new inner list, 2 continues one.
        let rows = list("matrix")?;
        for (i, row) in rows.iter().enumerate() {
            let row = row
                .as_array()
                .with_context(|| format!("{at}: `matrix[{i}]` must be a list"))?;
            for (j, v) in row.iter().enumerate() {
                matrix.values.push(
                    v.as_f64()
                        .with_context(|| format!("{at}: `matrix[{i}][{j}]` must be a number"))?,
                );
                matrix.def.push(2);
                matrix.rep.push(if i == 0 && j == 0 {
                    0
                } else if j == 0 {
                    1
                } else {
                    2
                });
            }
        }
        if rows.is_empty() {
            bail!("{at}: `matrix` is empty");
        }
        extra.push(ByteArray::from(Value::Object(other).to_string().as_str()));
    }

    let schema = Arc::new(parse_message_type(RANKED_SCHEMA).context("the ranked Parquet schema")?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    crate::io::write_atomic_with(path, |file| {
        let mut writer = SerializedFileWriter::new(&mut *file, schema, props)?;
        let mut rg = writer.next_row_group()?;
        let mut column = 0usize;
        while let Some(mut col) = rg.next_column()? {
            match column {
                0 => col
                    .typed::<ByteArrayType>()
                    .write_batch(&prompt, None, None)?,
                1 => col.typed::<ByteArrayType>().write_batch(
                    &prompt_id.values,
                    Some(&prompt_id.def),
                    None,
                )?,
                2..=5 => {
                    let c = &msg_cols[column - 2];
                    col.typed::<ByteArrayType>().write_batch(
                        &c.values,
                        Some(&c.def),
                        Some(&c.rep),
                    )?
                }
                6..=8 => col
                    .typed::<DoubleType>()
                    .write_batch(&probs[column - 6], None, None)?,
                9..=10 => col
                    .typed::<Int64Type>()
                    .write_batch(&idx[column - 9], None, None)?,
                11 => col.typed::<ByteArrayType>().write_batch(
                    &responses.values,
                    Some(&responses.def),
                    Some(&responses.rep),
                )?,
                12 => col.typed::<DoubleType>().write_batch(
                    &scores.values,
                    Some(&scores.def),
                    Some(&scores.rep),
                )?,
                13 => col.typed::<DoubleType>().write_batch(
                    &matrix.values,
                    Some(&matrix.def),
                    Some(&matrix.rep),
                )?,
                14 => col
                    .typed::<ByteArrayType>()
                    .write_batch(&extra, None, None)?,
                n => return Err(anyhow!("the ranked schema has an unexpected column {n}")),
            };
            col.close()?;
            column += 1;
        }
        rg.close()?;
        writer.close()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}
