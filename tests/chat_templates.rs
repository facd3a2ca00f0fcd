//! `sppo::chat` against transformers' `apply_chat_template`: rendered text and token ids for the real
//! SmolLM2, Llama-3, Llama-3.1 and Mistral templates, plus templates probing the Jinja environment
//! (tojson, Python methods, whitespace control, loop controls, `{% generation %}`).
//!
//! Expected values: tests/fixtures/chat/expected.json, written by scripts/make_chat_fixtures.py with
//! transformers. The Llama-3 tokenizer.json (9 MB) is not committed: its id checks read
//! `.cache/tokenizers/llama3/tokenizer.json` (or `$SPPO_CACHE_DIR/tokenizers/...`) and print why they
//! skip when it is absent; the text checks always run.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sppo::chat::{encode_chat, ChatTemplate, Message, SpecialTokens};

const FORMAT_VERSION: u32 = 1;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("SPPO_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"))
}

#[derive(Deserialize)]
struct Expected {
    format: String,
    version: u32,
    transformers: String,
    models: Vec<ModelFixture>,
    features: Vec<FeatureCase>,
}

#[derive(Deserialize)]
struct ModelFixture {
    name: String,
    dir: String,
    tokenizer: TokenizerRef,
    special_tokens: std::collections::BTreeMap<String, String>,
    end_of_turn: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TokenizerRef {
    /// Committed, relative to tests/fixtures/chat.
    path: Option<String>,
    /// In the cache folder, relative to it.
    cache: Option<String>,
    setup: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    text: Option<String>,
    ids: Option<Vec<u32>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct FeatureCase {
    name: String,
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    text: Option<String>,
    error: Option<String>,
}

fn expected() -> Expected {
    let path = fixtures().join("expected.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let e: Expected =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    assert_eq!(e.format, "sppo-chat-fixtures");
    assert_eq!(
        e.version, FORMAT_VERSION,
        "regenerate with scripts/make_chat_fixtures.py"
    );
    e
}

fn model(e: &Expected, name: &str) -> ChatTemplate {
    let dir = fixtures().join(name);
    let t = ChatTemplate::from_model_dir(&dir)
        .unwrap_or_else(|err| panic!("{name}: {err:#}"))
        .unwrap_or_else(|| panic!("{name}: no template found in {}", dir.display()));
    let fixture = e
        .models
        .iter()
        .find(|m| m.dir == name)
        .expect("model in expected.json");
    let got: std::collections::BTreeMap<String, String> = t
        .special_tokens()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        got, fixture.special_tokens,
        "{name}: special tokens as transformers reads them"
    );
    t
}

/// Shows where two strings first differ (templates differ by a space or newline).
fn assert_same_text(got: &str, want: &str, what: &str) {
    if got == want {
        return;
    }
    let at = got
        .chars()
        .zip(want.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let ctx = |s: &str| {
        s.chars()
            .skip(at.saturating_sub(30))
            .take(60)
            .collect::<String>()
    };
    panic!(
        "{what}: texts differ at char {at}\n   got: {:?}\n  want: {:?}\nfull got: {got:?}",
        ctx(got),
        ctx(want)
    );
}

fn load_tokenizer(fixture: &ModelFixture) -> Option<tokenizers::Tokenizer> {
    let path = match (&fixture.tokenizer.path, &fixture.tokenizer.cache) {
        (Some(p), _) => fixtures().join(p),
        (None, Some(c)) => cache_dir().join(c),
        (None, None) => panic!("{}: fixture names no tokenizer", fixture.name),
    };
    if !path.is_file() {
        eprintln!(
            "skipping {} token ids: {} is absent (setup: {})",
            fixture.name,
            path.display(),
            fixture.tokenizer.setup.as_deref().unwrap_or("-")
        );
        return None;
    }
    Some(
        tokenizers::Tokenizer::from_file(&path)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display())),
    )
}

/// Every model case: rendered text, token ids, error messages, end-of-turn text.
#[test]
fn real_templates_match_transformers() {
    let e = expected();
    eprintln!("fixtures from transformers {}", e.transformers);
    let mut checked_ids = 0;
    for fixture in &e.models {
        let tmpl = model(&e, &fixture.dir);
        let tokenizer = load_tokenizer(fixture);
        for case in &fixture.cases {
            let what = format!("{}/{}", fixture.name, case.name);
            let got = tmpl.render(&case.messages, case.add_generation_prompt);
            match (&case.text, &case.error) {
                (Some(want), _) => {
                    let got = got.unwrap_or_else(|err| panic!("{what}: {err:#}"));
                    assert_same_text(&got, want, &what);
                    if let (Some(tok), Some(ids)) = (&tokenizer, &case.ids) {
                        let got_ids =
                            encode_chat(tok, &tmpl, &case.messages, case.add_generation_prompt)
                                .unwrap_or_else(|err| panic!("{what}: {err:#}"));
                        assert_eq!(&got_ids, ids, "{what}: token ids");
                        checked_ids += 1;
                    }
                }
                (None, Some(want)) => {
                    let err = match got {
                        Ok(text) => {
                            panic!("{what}: expected the error {want:?}, rendered {text:?}")
                        }
                        Err(err) => format!("{err:#}"),
                    };
                    assert!(
                        err.contains(want.as_str()),
                        "{what}: error {err:?} lacks the template's message {want:?}"
                    );
                    // The error names the template's source file.
                    assert!(
                        err.contains(&fixture.dir),
                        "{what}: error {err:?} does not name the template file"
                    );
                }
                (None, None) => panic!("{what}: fixture has neither text nor error"),
            }
        }
        let eot = tmpl
            .end_of_turn()
            .unwrap_or_else(|err| panic!("{}: {err:#}", fixture.name));
        assert_eq!(eot, fixture.end_of_turn, "{}: end_of_turn", fixture.name);
    }
    eprintln!("checked token ids of {checked_ids} cases");
}

#[test]
fn environment_features_match_transformers() {
    let e = expected();
    let tokens = SpecialTokens {
        bos_token: Some("<|im_start|>".into()),
        eos_token: Some("<|im_end|>".into()),
        unk_token: Some("<|endoftext|>".into()),
        pad_token: Some("<|im_end|>".into()),
        ..Default::default()
    };
    for case in &e.features {
        let what = format!("feature {}", case.name);
        let tmpl = ChatTemplate::new(case.template.clone(), tokens.clone())
            .unwrap_or_else(|err| panic!("{what}: {err:#}"));
        let got = tmpl.render(&case.messages, case.add_generation_prompt);
        match (&case.text, &case.error) {
            (Some(want), _) => assert_same_text(
                &got.unwrap_or_else(|err| panic!("{what}: {err:#}")),
                want,
                &what,
            ),
            (None, Some(want)) => {
                let err = format!("{:#}", got.expect_err(&what));
                assert!(
                    err.contains(want.as_str()),
                    "{what}: {err:?} lacks {want:?}"
                );
            }
            (None, None) => panic!("{what}: fixture has neither text nor error"),
        }
    }
}

#[test]
fn smollm2_inserts_its_default_system_prompt() {
    let e = expected();
    let tmpl = model(&e, "smollm2");
    let text = tmpl
        .render(&[Message::user("What is the capital of France?")], true)
        .expect("render");
    assert!(text.starts_with(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    ));
    assert!(text.ends_with("<|im_start|>assistant\n"));
    // The committed config carries the template text read from the GGUF (key tokenizer.chat_template).
    let jinja =
        std::fs::read_to_string(fixtures().join("templates/smollm2.jinja")).expect("template file");
    assert_eq!(tmpl.source(), jinja);
}

#[test]
fn errors_name_the_source_and_line() {
    // A syntax error on line 2 of a chat_template.jinja.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ bos_token }}\n{% if %}\n",
    )
    .expect("write");
    let err = format!(
        "{:#}",
        ChatTemplate::from_model_dir(dir.path()).expect_err("syntax error")
    );
    assert!(err.contains("chat_template.jinja"), "{err}");
    assert!(err.contains("line 2"), "{err}");

    // raise_exception at render time: the message, the file and the line.
    let src = "{% for m in messages %}\n{% if m.role == 'tool' %}{{ raise_exception('no tools here: ' + m.content) }}{% endif %}\n{% endfor %}";
    let t = ChatTemplate::with_origin(src, SpecialTokens::default(), "demo/tokenizer_config.json")
        .expect("compile");
    let err = format!(
        "{:#}",
        t.render(&[Message::new("tool", "x")], false)
            .expect_err("raise")
    );
    assert!(
        err.contains("no tools here: x")
            && err.contains("demo/tokenizer_config.json")
            && err.contains("line 2"),
        "{err}"
    );

    // An undefined function is reported, not silently ignored.
    let t =
        ChatTemplate::new("{{ no_such_function() }}", SpecialTokens::default()).expect("compile");
    assert!(t.render(&[Message::user("x")], false).is_err());
}

#[test]
fn config_shapes_and_precedence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    // No template at all.
    std::fs::write(
        p.join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "</s>", "special": true}}"#,
    )
    .expect("write");
    assert!(ChatTemplate::from_model_dir(p).expect("load").is_none());

    // A list without "default" is an error naming the choices.
    std::fs::write(
        p.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "rag", "template": "a"}, {"name": "tool_use", "template": "b"}]}"#,
    )
    .expect("write");
    let err = format!(
        "{:#}",
        ChatTemplate::from_model_dir(p).expect_err("no default")
    );
    assert!(
        err.contains("rag") && err.contains("tool_use") && err.contains("tokenizer_config.json"),
        "{err}"
    );

    // A bad token type names the file and the field.
    std::fs::write(
        p.join("tokenizer_config.json"),
        r#"{"chat_template": "x", "bos_token": 5}"#,
    )
    .expect("write");
    let err = format!(
        "{:#}",
        ChatTemplate::from_model_dir(p).expect_err("bad token")
    );
    assert!(
        err.contains("bos_token") && err.contains("tokenizer_config.json"),
        "{err}"
    );

    // chat_template.jinja wins over the config; CRLF line ends read as Python's text mode reads them.
    std::fs::write(
        p.join("tokenizer_config.json"),
        r#"{"chat_template": "config", "eos_token": "</s>"}"#,
    )
    .expect("write");
    std::fs::write(
        p.join("chat_template.jinja"),
        "{% if true %}\r\nA{{ eos_token }}\r\n{% endif %}\r\n",
    )
    .expect("write");
    let t = ChatTemplate::from_model_dir(p)
        .expect("load")
        .expect("template");
    assert_eq!(
        t.render(&[Message::user("x")], false).expect("render"),
        "A</s>\n"
    );
}

#[test]
fn end_of_turn_falls_back_to_eos_when_the_template_writes_only_whitespace() {
    let tokens = SpecialTokens {
        eos_token: Some("</s>".into()),
        ..Default::default()
    };
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}",
        tokens,
    )
    .expect("compile");
    assert_eq!(t.end_of_turn().expect("eot"), "</s>");
    let t = ChatTemplate::new(
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        SpecialTokens::default(),
    )
    .expect("compile");
    assert!(
        t.end_of_turn().is_err(),
        "no marker and no eos_token must be an error"
    );
}

#[test]
fn strftime_now_is_local_time() {
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", SpecialTokens::default())
        .expect("compile");
    let before = chrono::Local::now().format("%Y-%m-%d").to_string();
    let got = t.render(&[Message::user("x")], false).expect("render");
    let after = chrono::Local::now().format("%Y-%m-%d").to_string();
    assert!(got == before || got == after, "{got} vs {before}");
    let bad =
        ChatTemplate::new("{{ strftime_now('%Q') }}", SpecialTokens::default()).expect("compile");
    assert!(bad.render(&[Message::user("x")], false).is_err());
}

#[test]
fn numbers_print_like_python() {
    // Jinja2 prints floats with repr(): exponents below 1e-4 and from 1e16, always a decimal point.
    let t = ChatTemplate::new(
        "{{ 1e-5 }} {{ 0.0001 }} {{ 1e16 }} {{ 1e15 }} {{ 0.1 + 0.2 }} {{ 3 }} {{ -2.5 }} {{ [1e-7] | tojson }}",
        SpecialTokens::default(),
    )
    .expect("compile");
    assert_eq!(
        t.render(&[Message::user("x")], false).expect("render"),
        "1e-05 0.0001 1e+16 1000000000000000.0 0.30000000000000004 3 -2.5 [1e-07]"
    );
}
