//! Chat templates rendered exactly as Hugging Face `transformers`' `apply_chat_template` renders them.
//!
//! transformers (`utils/chat_template_utils.py`, `_cached_compile_jinja_template` and `render_jinja_template`)
//! runs the model's Jinja template in a sandboxed Jinja2 environment with `trim_blocks` and `lstrip_blocks`
//! on, no trailing-newline keeping, loop controls, a `{% generation %}` tag, and four additions:
//! `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that calls `json.dumps` (no HTML escaping,
//! `ensure_ascii=False`, Python's default separators), and `namespace`/`dict`. The template sees `messages`,
//! `tools=None`, `documents=None`, `add_generation_prompt` and the named special tokens that are set
//! (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`).
//! `apply_chat_template(tokenize=True)` then encodes the rendered text with `add_special_tokens=False`.
//!
//! We render with minijinja configured to match, plus Python-style printing of non-string values
//! (`True`, `None`, `['a', 1]`) because Jinja2 prints them with `str()`. Checked against transformers'
//! output for the real SmolLM2, Llama-3, Llama-3.1 and Mistral templates in `tests/chat_templates.rs`
//! (fixtures from `scripts/make_chat_fixtures.py`).
//!
//! Known differences from Jinja2 (none affects the templates above): the `~` operator and string
//! interpolation inside minijinja's own filters print booleans as `true`, not `True`; Python methods are
//! those of `minijinja_contrib::pycompat`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Output, State, Value};
use serde::{Deserialize, Serialize};

/// One chat turn, as transformers' `{"role": ..., "content": ...}` dictionaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// The named special tokens transformers passes to the template (its `special_tokens_map`): only the
/// ones that are set become template variables; an unset one stays undefined, as in transformers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub sep_token: Option<String>,
    pub pad_token: Option<String>,
    pub cls_token: Option<String>,
    pub mask_token: Option<String>,
}

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl SpecialTokens {
    /// (name, token) for every token that is set, e.g. ("eos_token", "<|im_end|>").
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let values = [
            &self.bos_token,
            &self.eos_token,
            &self.unk_token,
            &self.sep_token,
            &self.pad_token,
            &self.cls_token,
            &self.mask_token,
        ];
        SPECIAL_TOKEN_NAMES
            .into_iter()
            .zip(values)
            .filter_map(|(n, v)| v.as_deref().map(|v| (n, v)))
    }

    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            "bos_token" => &mut self.bos_token,
            "eos_token" => &mut self.eos_token,
            "unk_token" => &mut self.unk_token,
            "sep_token" => &mut self.sep_token,
            "pad_token" => &mut self.pad_token,
            "cls_token" => &mut self.cls_token,
            "mask_token" => &mut self.mask_token,
            _ => return None,
        })
    }

    /// Reads the named tokens of a `tokenizer_config.json` (or `special_tokens_map.json`) object: plain
    /// strings or AddedToken dicts `{"content": ...}`; `null` means unset. `origin` names the file in errors.
    pub fn from_config(config: &serde_json::Value, origin: &str) -> Result<SpecialTokens> {
        let mut tokens = SpecialTokens::default();
        tokens.merge_from_config(config, origin)?;
        Ok(tokens)
    }

    fn merge_from_config(&mut self, config: &serde_json::Value, origin: &str) -> Result<()> {
        for name in SPECIAL_TOKEN_NAMES {
            let Some(value) = config.get(name) else {
                continue;
            };
            let token = match value {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    _ => bail!("{origin}: `{name}` is an object without a string `content`: {value}"),
                },
                other => bail!("{origin}: `{name}` must be a string, an AddedToken object or null, got {other}"),
            };
            if let Some(slot) = self.slot(name) {
                *slot = token;
            }
        }
        Ok(())
    }
}

/// A compiled chat template plus the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the source came from, e.g. `models/x/tokenizer_config.json (chat_template)`; names errors.
    origin: String,
    source: String,
    special_tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special_tokens", &self.special_tokens)
            .field("source_len", &self.source.len())
            .finish()
    }
}

/// Stands in for an assistant response when measuring what the template writes after one.
const RESPONSE_MARKER: &str = "<<SPPO_RESPONSE_MARKER>>";
/// The name the compiled template has inside its minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source` (Jinja) with the given special tokens; errors name it "<inline chat template>".
    pub fn new(source: impl Into<String>, special_tokens: SpecialTokens) -> Result<ChatTemplate> {
        ChatTemplate::with_origin(source, special_tokens, "<inline chat template>")
    }

    /// Like [`ChatTemplate::new`], naming the template's source (a file) in every error.
    pub fn with_origin(
        source: impl Into<String>,
        special_tokens: SpecialTokens,
        origin: impl Into<String>,
    ) -> Result<ChatTemplate> {
        let source = source.into();
        let origin = origin.into();
        let mut env = new_environment();
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(|e| jinja_error(&origin, &source, "compiling", &e))?;
        Ok(ChatTemplate {
            env,
            origin,
            source,
            special_tokens,
        })
    }

    /// Loads the template of a Hugging Face model folder the way `AutoTokenizer.from_pretrained` does:
    /// `chat_template.jinja` if present (it takes priority), else `chat_template.json` (the older processor
    /// format), else `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}` of
    /// which "default" is used). Special tokens come from `tokenizer_config.json`, overridden by
    /// `special_tokens_map.json` when the config predates `added_tokens_decoder` (transformers' legacy path).
    /// `Ok(None)` when the folder has no template at all.
    pub fn from_model_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };

        let mut special = SpecialTokens::default();
        if let Some(config) = &config {
            special.merge_from_config(config, &config_path.display().to_string())?;
        }
        let legacy_map = dir.join("special_tokens_map.json");
        let has_decoder = config
            .as_ref()
            .is_some_and(|c| c.get("added_tokens_decoder").is_some());
        if legacy_map.is_file() && !has_decoder {
            let map = read_json(&legacy_map)?;
            special.merge_from_config(&map, &legacy_map.display().to_string())?;
        }

        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let text = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("reading chat template {}", jinja_path.display()))?;
            // Python opens the file in text mode: universal newlines turn \r\n and \r into \n.
            let text = text.replace("\r\n", "\n").replace('\r', "\n");
            return ChatTemplate::with_origin(text, special, jinja_path.display().to_string())
                .map(Some);
        }
        let json_path = dir.join("chat_template.json");
        if json_path.is_file() {
            let v = read_json(&json_path)?;
            let origin = format!("{} (chat_template)", json_path.display());
            let source = template_from_json_field(v.get("chat_template"), &origin)?
                .ok_or_else(|| anyhow!("{}: no `chat_template` field", json_path.display()))?;
            return ChatTemplate::with_origin(source, special, origin).map(Some);
        }
        let Some(config) = config else {
            return Ok(None);
        };
        let origin = format!("{} (chat_template)", config_path.display());
        match template_from_json_field(config.get("chat_template"), &origin)? {
            Some(source) => ChatTemplate::with_origin(source, special, origin).map(Some),
            None => Ok(None),
        }
    }

    /// The template text as loaded (before the `{% generation %}` rewrite).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (used in error messages).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Renders `messages` exactly as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does. A template's `raise_exception(msg)` becomes an error carrying `msg`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        for (name, token) in self.special_tokens.iter() {
            ctx.insert(name, Value::from(token));
        }
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // transformers passes tools=None and documents=None: defined, and `is none`.
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| jinja_error(&self.origin, &self.source, "loading", &e))?;
        tmpl.render(ctx)
            .map_err(|e| jinja_error(&self.origin, &self.source, "rendering", &e))
    }

    /// The text the template writes after an assistant message's content, used to close a generated
    /// response the way TRL closes completions (appending the end-of-turn marker before training).
    ///
    /// Measured by rendering `[user "x", assistant MARKER]` without a generation prompt and taking what
    /// follows the marker. Trailing whitespace is dropped: it is the separator before the next turn
    /// (ChatML's `<|im_end|>\n` gives `<|im_end|>`), not part of the response, and a model stops at the
    /// marker token anyway. If the template writes only whitespace (or nothing) after the content, we fall
    /// back to `eos_token`, which is what TRL appends in that case; without one it is an error.
    pub fn end_of_turn(&self) -> Result<String> {
        let messages = [Message::user("x"), Message::assistant(RESPONSE_MARKER)];
        let text = self
            .render(&messages, false)
            .with_context(|| format!("measuring the end-of-turn text of {}", self.origin))?;
        let Some(at) = text.find(RESPONSE_MARKER) else {
            bail!("{}: the template drops the assistant message's content, cannot find its end-of-turn text", self.origin);
        };
        let suffix = &text[at + RESPONSE_MARKER.len()..];
        if suffix.contains(RESPONSE_MARKER) {
            bail!(
                "{}: the template repeats the assistant message's content",
                self.origin
            );
        }
        let trimmed = suffix.trim_end();
        if !trimmed.is_empty() {
            return Ok(trimmed.to_string());
        }
        self.special_tokens.eos_token.clone().ok_or_else(|| {
            anyhow!(
                "{}: the template writes nothing after an assistant message and no eos_token is set",
                self.origin
            )
        })
    }
}

/// `tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`: the rendered text
/// encoded with `add_special_tokens=False` (the template already writes BOS and the turn markers).
pub fn encode_chat(
    tokenizer: &tokenizers::Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<Vec<u32>> {
    let text = template.render(messages, add_generation_prompt)?;
    let encoding = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| anyhow!("tokenizing the chat rendered by {}: {e}", template.origin))?;
    Ok(encoding.get_ids().to_vec())
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {} as JSON", path.display()))
}

/// A `chat_template` field: a string, or transformers' list of `{"name", "template"}` (the "default" one).
fn template_from_json_field(
    field: Option<&serde_json::Value>,
    origin: &str,
) -> Result<Option<String>> {
    match field {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let mut names = Vec::new();
            for (i, entry) in list.iter().enumerate() {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => bail!("{origin}: entry {i} of the template list lacks a string `name` or `template`"),
                }
            }
            bail!(
                "{origin}: several chat templates ({}) and none named \"default\"",
                names.join(", ")
            )
        }
        Some(other) => {
            bail!("{origin}: must be a string or a list of {{name, template}}, got {other}")
        }
    }
}

/// Formats a minijinja error with the template's origin, the line and that line's text.
fn jinja_error(origin: &str, source: &str, what: &str, err: &JinjaError) -> anyhow::Error {
    let mut msg = format!("{what} chat template {origin}");
    if let Some(line) = err.line() {
        let _ = write!(msg, ", line {line}");
        if let Some(text) = source.lines().nth(line.saturating_sub(1)) {
            let text = text.trim();
            let shown: String = text.chars().take(120).collect();
            let ellipsis = if shown.len() < text.len() { "..." } else { "" };
            let _ = write!(msg, " (`{shown}{ellipsis}`)");
        }
    }
    let _ = write!(msg, ": {}", err.kind());
    if let Some(detail) = err.detail() {
        let _ = write!(msg, ": {detail}");
    }
    let mut source_err = std::error::Error::source(err);
    while let Some(e) = source_err {
        let _ = write!(msg, ": {e}");
        source_err = e.source();
    }
    anyhow!(msg)
}

/// The Jinja environment of transformers' `_cached_compile_jinja_template`, in minijinja.
fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    // Python string/dict/list methods (`.strip()`, `.items()`, `.startswith()`), as in Jinja2.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_filter("string", |v: Value| py_str(&v));
    env
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `datetime.now().strftime(format)` in local time.
fn strftime_now(format: String) -> Result<Value, JinjaError> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format string {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(
        out,
        "{}",
        chrono::Local::now().format_with_items(items.into_iter())
    )
    .map_err(|_| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// Jinja2 prints values with Python's `str()`: `True`, `None`, `['a', 1]`, `{'k': 'v'}`, `2.0`.
fn python_formatter(out: &mut Output, _state: &State, value: &Value) -> Result<(), JinjaError> {
    if value.is_undefined() {
        return Ok(()); // Jinja2's default Undefined prints as nothing
    }
    let text = py_str(value);
    out.write_str(&text)
        .map_err(|e| JinjaError::new(ErrorKind::WriteFailure, e.to_string()))
}

/// Python `str(value)`.
fn py_str(value: &Value) -> String {
    match value.as_str() {
        Some(s) if value.kind() == ValueKind::String => s.to_string(),
        _ => py_repr(value),
    }
}

/// Python `repr(value)` for the JSON-like values templates see.
fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => py_number(value),
        ValueKind::String => py_str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => match value.try_iter() {
            Ok(items) => format!(
                "[{}]",
                items.map(|v| py_repr(&v)).collect::<Vec<_>>().join(", ")
            ),
            Err(_) => value.to_string(),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => {
                let parts: Vec<String> = keys
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        format!("{}: {}", py_repr(&k), py_repr(&v))
                    })
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

fn py_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => py_float_repr(f),
        Err(_) => value.to_string(),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for exponents in [-4, 16), else
/// scientific with a sign and at least two exponent digits (`1e-05`, `1e+16`); always a `.0` when integral.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr: "1.5e-5", "-1e16".
    let sci = format!("{f:e}");
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => return sci,
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!(
                "{sign}{digits}{}.0",
                "0".repeat(point as usize - digits.len())
            )
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{sign}{a}.{b}")
        }
    } else {
        let (a, b) = digits.split_at(1);
        let m = if b.is_empty() {
            a.to_string()
        } else {
            format!("{a}.{b}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// Python's `repr(str)`: single quotes unless the text has a `'` and no `"`.
fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (c as u32) == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, positional arguments in that order, unknown keywords rejected as Python would.
fn tojson(
    value: Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    separators: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, JinjaError> {
    let pick = |positional: Option<Value>, name: &str| -> Result<Option<Value>, JinjaError> {
        let kw: Option<Value> = kwargs.get(name)?;
        match (positional, kw) {
            (Some(_), Some(_)) => Err(JinjaError::new(
                ErrorKind::TooManyArguments,
                format!("tojson() got multiple values for argument '{name}'"),
            )),
            (p, k) => Ok(p.or(k).filter(|v| !v.is_none() && !v.is_undefined())),
        }
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => match v.as_i64() {
            // json.dumps: an integer indent is that many spaces (0 or less: newlines only).
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: bad indent {v}"),
                ))
            }
        },
    };
    let (item_sep, key_sep) = match pick(separators, "separators")? {
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                ),
                _ => {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        // Python's defaults: (', ', ': ') without indent, (',', ': ') with one.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs
        .get::<Option<Value>>("sort_keys")?
        .is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, &value, &opts, 0)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn not_serializable(value: &Value) -> JinjaError {
    JinjaError::new(
        ErrorKind::InvalidOperation,
        format!(
            "tojson: Object of type {} is not JSON serializable",
            value.kind()
        ),
    )
}

/// `json.dumps`'s encoder over minijinja values.
fn write_json(
    out: &mut String,
    value: &Value,
    opts: &JsonOpts,
    level: usize,
) -> Result<(), JinjaError> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                // json.dumps writes float.__repr__, with NaN/Infinity spelled the JavaScript way.
                out.push_str(&if f.is_nan() {
                    "NaN".to_string()
                } else if f.is_infinite() {
                    if f > 0.0 {
                        "Infinity".to_string()
                    } else {
                        "-Infinity".to_string()
                    }
                } else {
                    py_float_repr(f)
                });
            }
        }
        ValueKind::String => {
            write_json_str(out, value.as_str().unwrap_or_default(), opts.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, level + 1);
                write_json(out, item, opts, level + 1)?;
            }
            newline_indent(out, opts, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                // json.dumps turns str/int/float/bool/None keys into strings and rejects the rest.
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
                    ValueKind::Number => py_number(&key),
                    _ => {
                        return Err(JinjaError::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: keys must be str, int, float, bool or None, not {}",
                                key.kind()
                            ),
                        ))
                    }
                };
                entries.push((key, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline_indent(out, opts, level + 1);
                write_json_str(out, k, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, v, opts, level + 1)?;
            }
            newline_indent(out, opts, level);
            out.push('}');
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

fn newline_indent(out: &mut String, opts: &JsonOpts, level: usize) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

/// A JSON string as Python's json module writes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other
/// control characters as `\u00XX`; with `ensure_ascii`, every non-ASCII character as `\uXXXX`
/// (surrogate pairs above the BMP).
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04x}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// transformers' `{% generation %}...{% endgeneration %}` tag only records where assistant text lies
/// (for `return_assistant_tokens_mask`); it renders its body unchanged. minijinja has no such tag, so we
/// rewrite it to `{% if true %}...{% endif %}`, keeping the whitespace-control marks (`-`, `+`) and the
/// tag's own whitespace, so output and line numbers stay identical.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, replacement)) => {
                out.push_str(&replacement);
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with `{%[-+]? generation|endgeneration [-+]?%}`, its length and replacement.
fn parse_generation_tag(tag: &str) -> Option<(usize, String)> {
    let b = tag.as_bytes();
    let mut i = 2;
    let open_mark = match b.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &tag[i - 1..i]
        }
        _ => "",
    };
    let ws1_start = i;
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    let ws1 = &tag[ws1_start..i];
    let word_start = i;
    while b
        .get(i)
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
    {
        i += 1;
    }
    let keyword = match &tag[word_start..i] {
        "generation" => "if true",
        "endgeneration" => "endif",
        _ => return None,
    };
    let ws2_start = i;
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    let ws2 = &tag[ws2_start..i];
    let close_mark = match b.get(i) {
        Some(b'-') | Some(b'+') => {
            i += 1;
            &tag[i - 1..i]
        }
        _ => "",
    };
    if !tag[i..].starts_with("%}") {
        return None;
    }
    let ws1 = if ws1.is_empty() { " " } else { ws1 };
    let ws2 = if ws2.is_empty() { " " } else { ws2 };
    Some((
        i + 2,
        format!("{{%{open_mark}{ws1}{keyword}{ws2}{close_mark}%}}"),
    ))
}
