//! Prompt files: JSONL, Parquet and JSON arrays (ShareGPT, AlpacaEval), read into chat messages.
//!
//! One record becomes a [`PromptRecord`]: the chat `messages` to generate from (ending in a user turn), an
//! optional `reference` answer, and an `id`. Field names follow the data sets SPPO is run on:
//! - `messages` / `prompt` (a string or a message list) / `instruction` (+ `input`, Alpaca) / `chosen`
//!   (a preference pair's message list), in that order of precedence, plus an optional `system` string;
//! - `conversations` (ShareGPT: `[{"from": "human"|"gpt", "value"}]`): kept only when the first turn is
//!   human and the second gpt; prompt = first human turn, reference = first gpt turn; others are skipped
//!   and counted (ShareGPT is a scraped set: 6,358 of its records start with the model's turn);
//! - reference: `reference`, else a trailing assistant message of `messages` (dropped from the prompt),
//!   else `output` (Alpaca, AlpacaEval), else the assistant reply that ends `chosen`;
//! - id: `id` or `prompt_id` (string or integer), else the record's 0-based index in the file. Repeated
//!   ids get a `#2`, `#3` suffix (ShareGPT repeats 123 ids) so that ids can key per-prompt data.
//!
//! Errors name the file and the line (JSONL, JSON arrays) or row (Parquet). The ShareGPT file that
//! RESOURCES.md lists is truncated mid-record: JSON arrays are read record by record and a broken tail
//! is dropped with a warning, never an error; `max` stops reading after that many prompts.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::chat::Message;

/// One prompt to generate responses for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRecord {
    pub id: String,
    /// The conversation so far; the last message has role "user".
    pub messages: Vec<Message>,
    pub reference: Option<String>,
}

/// Which reader a file goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFormat {
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet, one record per row.
    Parquet,
    /// A JSON array of records (ShareGPT, AlpacaEval's `alpaca_eval.json`).
    JsonArray,
}

/// What loading skipped or repaired; `load_prompts` prints it as warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub format: Option<PromptFormat>,
    /// Complete records read (before skipping).
    pub records: usize,
    /// ShareGPT conversations whose first two turns are not human then gpt.
    pub skipped_not_human_gpt: usize,
    /// ShareGPT conversations whose first human turn is empty or whitespace.
    pub skipped_empty_prompt: usize,
    /// Records whose id repeated an earlier one and got a `#N` suffix.
    pub renamed_duplicate_ids: usize,
    /// A JSON array ended inside a record (or without `]`): (line where the broken record starts,
    /// bytes dropped).
    pub truncated_tail: Option<(usize, u64)>,
}

impl LoadReport {
    /// One line per thing worth telling the user, naming the file.
    pub fn warnings(&self, path: &Path) -> Vec<String> {
        let f = path.display();
        let mut w = Vec::new();
        if let Some((line, bytes)) = self.truncated_tail {
            w.push(format!("{f}: the JSON array is truncated; dropped the broken record at line {line} ({bytes} bytes)"));
        }
        if self.skipped_not_human_gpt > 0 {
            w.push(format!(
                "{f}: skipped {} conversations that do not start with a human turn followed by a gpt turn",
                self.skipped_not_human_gpt
            ));
        }
        if self.skipped_empty_prompt > 0 {
            w.push(format!(
                "{f}: skipped {} conversations whose first human turn is empty",
                self.skipped_empty_prompt
            ));
        }
        if self.renamed_duplicate_ids > 0 {
            w.push(format!(
                "{f}: {} records repeat an earlier id; suffixed them with #2, #3, ...",
                self.renamed_duplicate_ids
            ));
        }
        w
    }
}

/// Loads every prompt of `path`, printing warnings (skipped records, truncated tail) to stderr.
pub fn load_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    load_prompts_limit(path, None)
}

/// Loads the first `max` prompts of `path` (all with `None`), reading no further than needed.
pub fn load_prompts_limit(path: &Path, max: Option<usize>) -> Result<Vec<PromptRecord>> {
    let (prompts, report) = load_prompts_with_report(path, max)?;
    for w in report.warnings(path) {
        eprintln!("warning: {w}");
    }
    Ok(prompts)
}

/// Like [`load_prompts_limit`], returning what was skipped instead of printing it.
/// A file without any usable prompt is an error (unless `max` is `Some(0)`).
pub fn load_prompts_with_report(
    path: &Path,
    max: Option<usize>,
) -> Result<(Vec<PromptRecord>, LoadReport)> {
    let format = detect_format(path)?;
    let mut sink = Sink {
        max,
        prompts: Vec::new(),
        report: LoadReport {
            format: Some(format),
            ..Default::default()
        },
        seen: HashMap::new(),
    };
    match format {
        PromptFormat::Jsonl => read_jsonl(path, &mut sink)?,
        PromptFormat::Parquet => read_parquet(path, &mut sink)?,
        PromptFormat::JsonArray => read_json_array(path, &mut sink)?,
    }
    if sink.prompts.is_empty() && max != Some(0) {
        bail!(
            "{}: no prompts found ({} records read)",
            path.display(),
            sink.report.records
        );
    }
    Ok((sink.prompts, sink.report))
}

/// Picks the reader: Parquet by its `PAR1` magic or extension; otherwise the first non-blank byte
/// (`[`: a JSON array; `{`: JSONL). `.json` files holding one object per line are read as JSONL.
pub fn detect_format(path: &Path) -> Result<PromptFormat> {
    let mut file =
        File::open(path).with_context(|| format!("opening prompt file {}", path.display()))?;
    let mut head = [0u8; 4096];
    let mut n = 0;
    while n < head.len() {
        let got = file
            .read(&mut head[n..])
            .with_context(|| format!("reading {}", path.display()))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let head = &head[..n];
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if head.starts_with(b"PAR1") || ext.as_deref() == Some("parquet") {
        return Ok(PromptFormat::Parquet);
    }
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head); // UTF-8 byte-order mark
    match head.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Ok(PromptFormat::JsonArray),
        Some(b'{') => Ok(PromptFormat::Jsonl),
        None => bail!("{}: the file is empty", path.display()),
        Some(_) if matches!(ext.as_deref(), Some("jsonl") | Some("ndjson")) => Ok(PromptFormat::Jsonl),
        Some(&b) => bail!(
            "{}: cannot tell the format: expected Parquet, a JSON array or JSONL objects, found {:?} first",
            path.display(),
            b as char
        ),
    }
}

/// Collects records, stopping at `max`, making ids unique.
struct Sink {
    max: Option<usize>,
    prompts: Vec<PromptRecord>,
    report: LoadReport,
    seen: HashMap<String, usize>,
}

impl Sink {
    fn full(&self) -> bool {
        self.max.is_some_and(|m| self.prompts.len() >= m)
    }

    /// Parses one record (`index` is its 0-based position, `at` names it in errors: "file:LINE").
    fn push(&mut self, raw: RawRecord, index: usize, at: &str) -> Result<()> {
        self.report.records += 1;
        let Some(mut rec) = raw.into_prompt(index, at, &mut self.report)? else {
            return Ok(());
        };
        let n = self.seen.entry(rec.id.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            self.report.renamed_duplicate_ids += 1;
            rec.id = format!("{}#{}", rec.id, n);
        }
        self.prompts.push(rec);
        Ok(())
    }
}

/// The fields we read; everything else in a record is ignored. `null` reads as absent.
#[derive(Deserialize, Default)]
struct RawRecord {
    id: Option<Json>,
    prompt_id: Option<Json>,
    prompt: Option<Json>,
    instruction: Option<Json>,
    input: Option<Json>,
    output: Option<Json>,
    system: Option<Json>,
    messages: Option<Json>,
    chosen: Option<Json>,
    reference: Option<Json>,
    conversations: Option<Json>,
}

const PROMPT_FIELDS: [&str; 5] = [
    "messages",
    "prompt",
    "instruction",
    "chosen",
    "conversations",
];
const ALL_FIELDS: [&str; 11] = [
    "id",
    "prompt_id",
    "prompt",
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "chosen",
    "reference",
    "conversations",
];

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

fn opt_string(v: &Option<Json>, field: &str, at: &str) -> Result<Option<String>> {
    match v {
        None => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{at}: `{field}` must be a string, got {}", type_name(other)),
    }
}

/// `[{"role", "content"}]` → messages; `what` names the field in errors.
fn parse_messages(v: &Json, what: &str, at: &str) -> Result<Vec<Message>> {
    let Json::Array(items) = v else {
        bail!(
            "{at}: `{what}` must be a list of {{role, content}}, got {}",
            type_name(v)
        )
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let role = m.get("role").and_then(Json::as_str);
        let content = m.get("content").and_then(Json::as_str);
        match (role, content) {
            (Some(role), Some(content)) => out.push(Message::new(role, content)),
            _ => bail!(
                "{at}: `{what}[{i}]` must be an object with string `role` and `content`, got {m}"
            ),
        }
    }
    Ok(out)
}

impl RawRecord {
    fn into_prompt(
        self,
        index: usize,
        at: &str,
        report: &mut LoadReport,
    ) -> Result<Option<PromptRecord>> {
        let id = match self.id.as_ref().or(self.prompt_id.as_ref()) {
            None => index.to_string(),
            Some(Json::String(s)) => s.clone(),
            Some(Json::Number(n)) => n.to_string(),
            Some(other) => bail!(
                "{at}: `id` must be a string or an integer, got {}",
                type_name(other)
            ),
        };
        let mut reference = opt_string(&self.reference, "reference", at)?;
        let system = opt_string(&self.system, "system", at)?;

        let mut messages = if let Some(v) = &self.messages {
            let mut m = parse_messages(v, "messages", at)?;
            if m.last().is_some_and(|m| m.role == "assistant") {
                let last = m.pop().map(|m| m.content);
                reference = reference.or(last);
            }
            m
        } else if let Some(v) = &self.prompt {
            match v {
                Json::String(s) => vec![Message::user(s.clone())],
                Json::Array(_) => parse_messages(v, "prompt", at)?,
                other => bail!(
                    "{at}: `prompt` must be a string or a message list, got {}",
                    type_name(other)
                ),
            }
        } else if let Some(v) = &self.instruction {
            let Json::String(instruction) = v else {
                bail!("{at}: `instruction` must be a string, got {}", type_name(v))
            };
            // Alpaca keeps the input as a separate paragraph after the instruction.
            let text = match opt_string(&self.input, "input", at)? {
                Some(input) if !input.trim().is_empty() => format!("{instruction}\n\n{input}"),
                _ => instruction.clone(),
            };
            vec![Message::user(text)]
        } else if let Some(v) = &self.chosen {
            let mut m = parse_messages(v, "chosen", at)?;
            if m.last().is_some_and(|m| m.role == "assistant") {
                m.pop();
            }
            m
        } else if let Some(v) = &self.conversations {
            return sharegpt(v, id, at, report);
        } else {
            bail!(
                "{at}: no prompt: expected one of the fields {} (found none of them)",
                PROMPT_FIELDS.map(|f| format!("`{f}`")).join(", ")
            );
        };
        if reference.is_none() {
            reference = opt_string(&self.output, "output", at)?;
        }
        if let (None, Some(v)) = (&reference, &self.chosen) {
            // The preferred answer of a preference pair (UltraFeedback's `chosen` ends with it).
            reference = parse_messages(v, "chosen", at)?
                .pop()
                .filter(|m| m.role == "assistant")
                .map(|m| m.content);
        }
        if let Some(system) = system.filter(|s| !s.trim().is_empty()) {
            if messages.first().is_none_or(|m| m.role != "system") {
                messages.insert(0, Message::system(system));
            }
        }
        match messages.last() {
            None => bail!("{at}: the prompt has no messages"),
            Some(m) if m.role != "user" => {
                bail!(
                    "{at}: the prompt must end with a user message, it ends with role {:?}",
                    m.role
                )
            }
            Some(m) if m.content.trim().is_empty() => bail!("{at}: empty prompt"),
            Some(_) => {}
        }
        Ok(Some(PromptRecord {
            id,
            messages,
            reference,
        }))
    }
}

/// A ShareGPT conversation: `Ok(None)` (counted) unless it starts human → gpt with a non-empty prompt.
fn sharegpt(
    v: &Json,
    id: String,
    at: &str,
    report: &mut LoadReport,
) -> Result<Option<PromptRecord>> {
    let Json::Array(turns) = v else {
        bail!("{at}: `conversations` must be a list, got {}", type_name(v))
    };
    let turn = |i: usize| -> Result<Option<(&str, &str)>> {
        let Some(t) = turns.get(i) else {
            return Ok(None);
        };
        match (t.get("from").and_then(Json::as_str), t.get("value").and_then(Json::as_str)) {
            (Some(from), Some(value)) => Ok(Some((from, value))),
            _ => bail!("{at}: `conversations[{i}]` must be an object with string `from` and `value`, got {t}"),
        }
    };
    match (turn(0)?, turn(1)?) {
        (Some(("human", prompt)), Some(("gpt", answer))) => {
            if prompt.trim().is_empty() {
                report.skipped_empty_prompt += 1;
                return Ok(None);
            }
            Ok(Some(PromptRecord {
                id,
                messages: vec![Message::user(prompt)],
                reference: Some(answer.to_string()),
            }))
        }
        _ => {
            report.skipped_not_human_gpt += 1;
            Ok(None)
        }
    }
}

// ------------------------------------------------------------------------------------------------ JSONL

fn read_jsonl(path: &Path, sink: &mut Sink) -> Result<()> {
    let file =
        File::open(path).with_context(|| format!("opening prompt file {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    let mut lineno = 0usize;
    while !sink.full() {
        line.clear();
        let n = reader.read_line(&mut line).with_context(|| {
            format!(
                "{}:{}: reading (is the file UTF-8?)",
                path.display(),
                lineno + 1
            )
        })?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let text = line.trim();
        let text = if lineno == 1 {
            text.trim_start_matches('\u{feff}')
        } else {
            text
        };
        if text.is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), lineno);
        let raw: RawRecord =
            serde_json::from_str(text).map_err(|e| anyhow!("{at}: not a JSON object: {e}"))?;
        sink.push(raw, lineno - 1, &at)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------- JSON arrays

/// Reads a top-level JSON array one element at a time: a byte scanner finds each element's extent
/// (tracking strings and nesting) and serde parses just that slice, so a truncated file keeps every
/// complete record, and `max` stops the reading early.
fn read_json_array(path: &Path, sink: &mut Sink) -> Result<()> {
    let file =
        File::open(path).with_context(|| format!("opening prompt file {}", path.display()))?;
    let mut scan = ArrayScanner::new(BufReader::with_capacity(1 << 22, file));
    let mut element = Vec::new();
    let mut index = 0usize;
    let file_name = path.display().to_string();
    scan.open()
        .map_err(|e| anyhow!("{file_name}:{}: {e}", scan.line))?;
    while !sink.full() {
        match scan
            .next(&mut element)
            .map_err(|e| anyhow!("{file_name}:{}: {e}", scan.line))?
        {
            Next::End => break,
            Next::Truncated { line, bytes } => {
                sink.report.truncated_tail = Some((line, bytes));
                break;
            }
            Next::Element { line } => {
                let at = format!("{file_name}:{line}");
                let raw: RawRecord = serde_json::from_slice(&element).map_err(|e| {
                    anyhow!("{at}: record {index} is not a valid record object: {e}")
                })?;
                sink.push(raw, index, &at)?;
                index += 1;
            }
        }
    }
    Ok(())
}

enum Next {
    Element { line: usize },
    Truncated { line: usize, bytes: u64 },
    End,
}

struct ArrayScanner<R: BufRead> {
    reader: R,
    /// 1-based line of the next unread byte.
    line: usize,
    first: bool,
}

impl<R: BufRead> ArrayScanner<R> {
    fn new(reader: R) -> Self {
        ArrayScanner {
            reader,
            line: 1,
            first: true,
        }
    }

    fn peek(&mut self) -> std::io::Result<Option<u8>> {
        Ok(self.reader.fill_buf()?.first().copied())
    }

    fn bump(&mut self) {
        self.reader.consume(1);
    }

    fn skip_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            match self.peek()? {
                Some(b'\n') => {
                    self.line += 1;
                    self.bump();
                }
                Some(b) if b.is_ascii_whitespace() => self.bump(),
                other => return Ok(other),
            }
        }
    }

    /// Consumes an optional byte-order mark and the opening `[`.
    fn open(&mut self) -> Result<()> {
        let buf = self.reader.fill_buf()?;
        if buf.starts_with(b"\xEF\xBB\xBF") {
            self.reader.consume(3);
        }
        match self.skip_ws()? {
            Some(b'[') => {
                self.bump();
                Ok(())
            }
            Some(b) => bail!("expected a JSON array, found {:?}", b as char),
            None => bail!("the file is empty"),
        }
    }

    /// Copies the next element's bytes into `out`.
    fn next(&mut self, out: &mut Vec<u8>) -> Result<Next> {
        out.clear();
        match self.skip_ws()? {
            None => {
                return Ok(Next::Truncated {
                    line: self.line,
                    bytes: 0,
                })
            } // no closing `]`
            Some(b']') => {
                self.bump();
                return Ok(Next::End);
            }
            Some(b',') if !self.first => {
                self.bump();
            }
            Some(_) if self.first => {}
            Some(b) => bail!("expected `,` or `]` between records, found {:?}", b as char),
        }
        self.first = false;
        let start_line = match self.skip_ws()? {
            None => {
                return Ok(Next::Truncated {
                    line: self.line,
                    bytes: 0,
                })
            }
            Some(_) => self.line,
        };
        // Scan one value: nesting depth outside strings; a scalar ends at `,` `]` or whitespace.
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(Next::Truncated {
                    line: start_line,
                    bytes: out.len() as u64,
                });
            }
            let mut used = 0;
            let mut done = false;
            for &b in buf {
                if in_string {
                    used += 1;
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                        if depth == 0 {
                            done = true;
                            break;
                        }
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => {
                        depth -= 1;
                        if depth == 0 {
                            used += 1;
                            done = true;
                            break;
                        }
                    }
                    b',' | b']' | b'}' if depth == 0 => {
                        done = true; // end of a scalar element; leave the delimiter unread
                        break;
                    }
                    b if depth == 0 && b.is_ascii_whitespace() && used > 0 => {
                        done = true;
                        break;
                    }
                    b'\n' => self.line += 1,
                    _ => {}
                }
                used += 1;
            }
            out.extend_from_slice(&buf[..used]);
            self.reader.consume(used);
            if done {
                return Ok(Next::Element { line: start_line });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------- Parquet

fn read_parquet(path: &Path, sink: &mut Sink) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::schema::types::Type;

    let file =
        File::open(path).with_context(|| format!("opening prompt file {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema();
    let columns: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
    if !PROMPT_FIELDS.iter().any(|f| columns.contains(f)) {
        bail!(
            "{}: no prompt column: expected one of {}, the file has columns {}",
            path.display(),
            PROMPT_FIELDS.join(", "),
            columns.join(", ")
        );
    }
    // Decode only the columns we use: preference sets carry large `rejected` lists and scores.
    let kept: Vec<Arc<Type>> = schema
        .get_fields()
        .iter()
        .filter(|f| ALL_FIELDS.contains(&f.name()))
        .cloned()
        .collect();
    let projection = Type::group_type_builder(schema.name())
        .with_fields(kept)
        .build()
        .with_context(|| format!("{}: building the column projection", path.display()))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .with_context(|| format!("{}: reading rows", path.display()))?;
    for (index, row) in rows.enumerate() {
        if sink.full() {
            break;
        }
        let at = format!("{}: row {index}", path.display());
        let row = row.with_context(|| format!("{at}: decoding"))?;
        let mut object = serde_json::Map::new();
        for (name, field) in row.get_column_iter() {
            object.insert(name.clone(), field_to_json(field));
        }
        let raw: RawRecord = serde_json::from_value(Json::Object(object))
            .map_err(|e| anyhow!("{at}: unexpected column types: {e}"))?;
        sink.push(raw, index, &at)?;
    }
    Ok(())
}

/// A Parquet record field as JSON (strings, numbers, lists, structs and maps; other types as text).
pub(crate) fn field_to_json(field: &parquet::record::Field) -> Json {
    use parquet::record::Field;
    match field {
        Field::Null => Json::Null,
        Field::Bool(b) => Json::Bool(*b),
        Field::Byte(n) => Json::from(*n),
        Field::Short(n) => Json::from(*n),
        Field::Int(n) => Json::from(*n),
        Field::Long(n) => Json::from(*n),
        Field::UByte(n) => Json::from(*n),
        Field::UShort(n) => Json::from(*n),
        Field::UInt(n) => Json::from(*n),
        Field::ULong(n) => Json::from(*n),
        Field::Float(n) => {
            serde_json::Number::from_f64(f64::from(*n)).map_or(Json::Null, Json::Number)
        }
        Field::Double(n) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Field::Str(s) => Json::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Json::String(s.to_string()),
            Err(_) => Json::String(field.to_string()),
        },
        Field::Group(row) => Json::Object(
            row.get_column_iter()
                .map(|(k, v)| (k.clone(), field_to_json(v)))
                .collect(),
        ),
        Field::ListInternal(list) => {
            Json::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Json::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        other => Json::String(other.to_string()),
    }
}
