//! `sppo::prompts`: every prompt-file format, the errors (file + line or row), and the real ShareGPT file.
//!
//! Small fixtures live in tests/fixtures/prompts (the Parquet ones written by pyarrow in
//! scripts/make_chat_fixtures.py). The ShareGPT check reads `.cache/data/ShareGPT_V3_unfiltered_cleaned_split.json`
//! (or `$SPPO_CACHE_DIR/data/...`) and prints why it skips when the file is absent.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sppo::chat::Message;
use sppo::prompts::{
    detect_format, load_prompts, load_prompts_limit, load_prompts_with_report, PromptFormat,
    PromptRecord,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/prompts")
        .join(name)
}

fn cache_dir() -> PathBuf {
    std::env::var_os("SPPO_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"))
}

fn err_of(name: &str) -> String {
    match load_prompts(&fixture(name)) {
        Ok(p) => panic!("{name}: expected an error, loaded {p:?}"),
        Err(e) => format!("{e:#}"),
    }
}

fn rec(id: &str, messages: Vec<Message>, reference: Option<&str>) -> PromptRecord {
    PromptRecord {
        id: id.into(),
        messages,
        reference: reference.map(String::from),
    }
}

#[test]
fn jsonl_every_record_shape() {
    let path = fixture("formats.jsonl");
    assert_eq!(detect_format(&path).expect("detect"), PromptFormat::Jsonl);
    let (got, report) = load_prompts_with_report(&path, None).expect("load");
    let want = vec![
        rec(
            "p-1",
            vec![Message::user("What is the capital of France?")],
            Some("Paris."),
        ),
        // Alpaca: input joined after a blank line; `output` is the reference; id = line index (0-based).
        rec(
            "2",
            vec![Message::user("Translate to French.\n\nGood morning")],
            Some("Bonjour"),
        ),
        rec("42", vec![Message::user("List three colours.")], None),
        // A trailing assistant turn becomes the reference.
        rec(
            "4",
            vec![Message::system("Be brief."), Message::user("Say hi.")],
            Some("Hi."),
        ),
        rec(
            "5",
            vec![
                Message::user("Name a prime."),
                Message::assistant("7"),
                Message::user("Another?"),
            ],
            Some("11"),
        ),
        // Repeated id gets a suffix; `system` becomes a system turn.
        rec(
            "p-1#2",
            vec![
                Message::system("You are a teacher."),
                Message::user("Explain recursion."),
            ],
            None,
        ),
        rec("sg-1", vec![Message::user("Hello?")], Some("Hi there.")),
    ];
    assert_eq!(got, want);
    assert_eq!(report.records, 8);
    assert_eq!(report.skipped_not_human_gpt, 1);
    assert_eq!(report.renamed_duplicate_ids, 1);
    assert!(report.truncated_tail.is_none());
}

#[test]
fn jsonl_errors_name_file_and_line() {
    let err = err_of("malformed.jsonl");
    assert!(err.contains("malformed.jsonl:3"), "{err}");
    let err = err_of("missing_field.jsonl");
    assert!(
        err.contains("missing_field.jsonl:2") && err.contains("`prompt`"),
        "{err}"
    );
    let err = err_of("wrong_type.jsonl");
    assert!(
        err.contains("wrong_type.jsonl:3") && err.contains("prompt") && err.contains("a number"),
        "{err}"
    );
    let err = err_of("empty_prompt.jsonl");
    assert!(
        err.contains("empty_prompt.jsonl:2") && err.contains("empty prompt"),
        "{err}"
    );
    let err = err_of("bad_last_role.jsonl");
    assert!(
        err.contains("bad_last_role.jsonl:1") && err.contains("system"),
        "{err}"
    );
}

#[test]
fn empty_files_are_errors() {
    let err = err_of("empty.jsonl");
    assert!(
        err.contains("empty.jsonl") && err.contains("empty"),
        "{err}"
    );
    let err = err_of("blank.jsonl");
    assert!(err.contains("blank.jsonl"), "{err}");
    let err = format!(
        "{:#}",
        load_prompts(&fixture("does_not_exist.jsonl")).expect_err("missing file")
    );
    assert!(err.contains("does_not_exist.jsonl"), "{err}");
}

#[test]
fn limit_stops_early() {
    let got = load_prompts_limit(&fixture("formats.jsonl"), Some(2)).expect("load");
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].id, "2");
    // The malformed line is never reached.
    assert_eq!(
        load_prompts_limit(&fixture("malformed.jsonl"), Some(2))
            .expect("load")
            .len(),
        2
    );
}

#[test]
fn parquet_ultrafeedback_shape() {
    let path = fixture("ultrafeedback.parquet");
    assert_eq!(detect_format(&path).expect("detect"), PromptFormat::Parquet);
    let got = load_prompts(&path).expect("load");
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0],
        rec(
            "uf-0",
            vec![Message::user("What is the capital of France?")],
            Some("Paris.")
        )
    );
    assert_eq!(
        got[2].reference.as_deref(),
        Some("A function calling itself.")
    );
}

#[test]
fn parquet_messages_and_alpaca() {
    let got = load_prompts(&fixture("messages.parquet")).expect("load");
    assert_eq!(
        got,
        vec![
            rec(
                "m-0",
                vec![Message::system("Be brief."), Message::user("Say hi.")],
                Some("Hi.")
            ),
            rec("m-1", vec![Message::user("Count to three.")], None),
        ]
    );
    let got = load_prompts(&fixture("alpaca.parquet")).expect("load");
    assert_eq!(
        got,
        vec![
            rec(
                "10",
                vec![Message::user("Translate to French.\n\nGood morning")],
                Some("Bonjour")
            ),
            rec(
                "11",
                vec![Message::user("List three colours.")],
                Some("Red, green, blue")
            ),
        ]
    );
    assert_eq!(
        load_prompts_limit(&fixture("messages.parquet"), Some(1))
            .expect("load")
            .len(),
        1
    );
}

#[test]
fn parquet_without_prompt_column_names_the_columns() {
    let err = err_of("no_prompt_column.parquet");
    assert!(
        err.contains("no_prompt_column.parquet")
            && err.contains("question")
            && err.contains("answer"),
        "{err}"
    );
}

#[test]
fn json_array_sharegpt_with_truncated_tail() {
    let path = fixture("sharegpt_small.json");
    assert_eq!(
        detect_format(&path).expect("detect"),
        PromptFormat::JsonArray
    );
    let (got, report) = load_prompts_with_report(&path, None).expect("load");
    assert_eq!(
        got,
        vec![
            rec("a_0", vec![Message::user("What is 2 + 2?")], Some("4")),
            rec(
                "a_0#2",
                vec![Message::user(
                    "Quote: \"[{x}]\" and \\ backslash, ünïcode 🙂"
                )],
                Some("Done ]}")
            ),
        ]
    );
    assert_eq!(report.records, 5);
    assert_eq!(report.skipped_not_human_gpt, 2);
    assert_eq!(report.skipped_empty_prompt, 1);
    let (line, bytes) = report.truncated_tail.expect("the tail is cut");
    assert_eq!(line, 15);
    assert!(bytes > 0);
    assert!(report
        .warnings(&path)
        .iter()
        .any(|w| w.contains("truncated") && w.contains("line 15")));
}

#[test]
fn json_array_alpaca_eval_shape() {
    let got = load_prompts(&fixture("alpaca_eval.json")).expect("load");
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1],
        rec(
            "1",
            vec![Message::user("How do I wrap a present neatly?")],
            Some("Use crisp folds.")
        )
    );
}

#[test]
fn json_array_errors_name_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.json");
    std::fs::write(&path, "[\n  {\"prompt\": \"a\"},\n  {\"prompt\": 3}\n]\n").expect("write");
    let err = format!("{:#}", load_prompts(&path).expect_err("bad type"));
    assert!(err.contains("bad.json:3"), "{err}");
    std::fs::write(
        &path,
        "[\n  {\"prompt\": \"a\"}\n  {\"prompt\": \"b\"}\n]\n",
    )
    .expect("write");
    let err = format!("{:#}", load_prompts(&path).expect_err("missing comma"));
    assert!(err.contains("bad.json:3") && err.contains("`,`"), "{err}");
}

/// RESOURCES.md: 17,671 complete conversations, 11,135 of them start human → gpt (7 of those have an
/// empty first turn, which we skip).
#[test]
fn real_sharegpt_counts() {
    let path = cache_dir().join("data/ShareGPT_V3_unfiltered_cleaned_split.json");
    if !path.is_file() {
        eprintln!(
            "skipping: {} is absent (scripts/setup fetches it)",
            path.display()
        );
        return;
    }
    let t = Instant::now();
    let (got, report) = load_prompts_with_report(&path, None).expect("load");
    let secs = t.elapsed().as_secs_f64();
    eprintln!("ShareGPT: {} prompts in {secs:.2} s; {report:?}", got.len());
    assert_eq!(report.records, 17_671);
    assert_eq!(report.skipped_not_human_gpt, 17_671 - 11_135);
    assert_eq!(report.skipped_empty_prompt, 7);
    assert_eq!(got.len(), 11_135 - 7);
    assert!(report.truncated_tail.is_some());
    assert_eq!(got[0].id, "QWJhYvA_0");
    assert!(got[0].messages[0]
        .content
        .starts_with("Summarize the main ideas of Jeff Walker's Product Launch Formula"));
    assert!(got
        .iter()
        .all(|p| p.reference.is_some() && p.messages.len() == 1));
    let unique: std::collections::HashSet<&str> = got.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(unique.len(), got.len(), "ids are unique after suffixing");
    assert!(secs < 5.0, "loading took {secs:.2} s");

    // The first N without reading the rest.
    let t = Instant::now();
    let first = load_prompts_limit(&path, Some(100)).expect("load");
    assert_eq!(first.len(), 100);
    assert_eq!(first[..], got[..100]);
    assert!(
        t.elapsed().as_secs_f64() < 0.5,
        "limit took {:?}",
        t.elapsed()
    );
}

/// The README's demo file: every line loads, with a reference answer.
#[test]
fn demo_prompts_load() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo_prompts.jsonl");
    let got = load_prompts(&path).expect("load");
    assert_eq!(got.len(), 7);
    assert_eq!(
        got[0].messages,
        vec![Message::user("What is the capital of France?")]
    );
    assert!(got
        .iter()
        .all(|p| p.reference.as_deref().is_some_and(|r| !r.is_empty())));
    assert_eq!(
        got[5].messages,
        vec![Message::user(
            "Translate into Spanish.\n\nGood morning, how are you?"
        )]
    );
    assert_eq!(got[6].messages[0].role, "system");
}
