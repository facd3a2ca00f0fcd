//! The `command:` oracle: an external program that judges over JSONL on stdin/stdout.
//!
//! The program is started ONCE (at [`CommandOracle::spawn`]) and kept for the whole run, so a
//! judge that loads a model pays for it once. Protocol, one JSON object per line, UTF-8:
//!
//! - request (sppo → program): `{"id": N, "prompt": "...", "responses": ["...", ...], "reference": "..."}`
//!   (`reference` only when the prompt set has one; `id` counts requests from 0 over the run).
//! - reply (program → sppo), one per request, in request order, either
//!   `{"matrix": [[P_00, ..., P_0K-1], ...]}` with P_ij = P(response i ≻ response j): K×K,
//!   entries finite and in [0, 1], P_ij + P_ji = 1 within 1e-6 off the diagonal (the diagonal is
//!   ignored and set to ½); or `{"scores": [s_0, ..., s_K-1]}`, K finite numbers, read as
//!   Bradley–Terry logits: P_ij = σ(s_i − s_j). A reply may echo `"id"` (then it must match) and may
//!   be `{"error": "..."}` to fail the run with that message. Blank lines are skipped; anything else
//!   is an error (log to stderr, never to stdout).
//! - batching: sppo writes ALL requests of a batch, then reads the replies; a program may answer
//!   each line as it comes (it must flush stdout after each reply, or at least after the batch).
//!   A writer thread feeds stdin and a reader thread drains stdout, so neither side can deadlock on
//!   a full pipe.
//! - end: sppo closes stdin when the oracle is dropped; the program should exit on EOF (it is
//!   killed after 5 s otherwise).
//!
//! Every failure is an error naming the command, never a hang or a panic: a reply that is not JSON,
//! of the wrong shape, non-finite (Python's `json.dumps` writes `NaN`, which is not JSON), out of
//! range or not antisymmetric (naming the entry); no reply within the timeout (default 600 s, the
//! wait for EACH reply; the program is killed); stdout closed or the program exited (its exit status
//! and last stderr lines are in the error). After an error the oracle is unusable (the program is
//! killed: its replies could be out of step).
//!
//! Example: `scripts/oracles/length_judge.py` prefers longer responses (scores = ln(1 + chars)):
//! `sppo rank --oracle 'command:"python3 scripts/oracles/length_judge.py"' --in gen.jsonl --out ranked.jsonl`.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{Judgement, Oracle, OracleInput, PrefMatrix};

/// The longest wait for one reply, unless the spec says `timeout=SECONDS`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Stderr lines kept for error messages.
const STDERR_TAIL: usize = 20;
/// How long a program that closed stdout, or whose stdin was closed, gets to exit before the kill.
const EXIT_GRACE: Duration = Duration::from_secs(5);

pub struct CommandOracle {
    argv: Vec<String>,
    name: String,
    timeout: Duration,
    child: Child,
    /// Batches of request bytes for the writer thread; dropping it closes the program's stdin.
    to_child: Option<Sender<Vec<u8>>>,
    /// Lines of the program's stdout (an `Err` when reading failed); disconnected at EOF.
    from_child: Receiver<std::io::Result<String>>,
    writer_error: Arc<Mutex<Option<String>>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
    /// Why the oracle cannot be used any more (set on the first error).
    broken: Option<String>,
    next_id: u64,
}

fn writer_thread(mut stdin: ChildStdin, rx: Receiver<Vec<u8>>, error: Arc<Mutex<Option<String>>>) {
    for bytes in rx {
        if let Err(e) = stdin.write_all(&bytes).and_then(|()| stdin.flush()) {
            if let Ok(mut slot) = error.lock() {
                *slot = Some(e.to_string());
            }
            return;
        }
    }
    // Channel closed: dropping stdin sends EOF, the program's cue to exit.
}

fn truncate(s: &str, max: usize) -> String {
    let s = s.trim_end();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} bytes)", &s[..i], s.len()),
        None => s.to_string(),
    }
}

impl CommandOracle {
    /// Starts `argv` (no shell) with piped stdin/stdout/stderr. `name` is the spec, for messages.
    pub fn spawn(argv: &[String], timeout: Duration, name: String) -> Result<Self> {
        let (program, args) = argv.split_first().context("the command is empty")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            bail!("`{}`: could not open its pipes", argv.join(" "));
        };

        let writer_error = Arc::new(Mutex::new(None));
        let (to_child, rx) = mpsc::channel::<Vec<u8>>();
        let err = Arc::clone(&writer_error);
        thread::Builder::new()
            .name("oracle-stdin".into())
            .spawn(move || writer_thread(stdin, rx, err))?;

        let (tx, from_child) = mpsc::channel();
        thread::Builder::new()
            .name("oracle-stdout".into())
            .spawn(move || {
                let mut reader = BufReader::new(stdout);
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) => return, // EOF: the receiver sees a disconnect
                        Ok(_) => {
                            if tx.send(Ok(line)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            })?;

        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        let stderr_thread =
            thread::Builder::new()
                .name("oracle-stderr".into())
                .spawn(move || {
                    let reader = BufReader::new(stderr);
                    for line in reader.split(b'\n') {
                        let Ok(line) = line else { return };
                        if let Ok(mut t) = tail.lock() {
                            if t.len() == STDERR_TAIL {
                                t.pop_front();
                            }
                            t.push_back(String::from_utf8_lossy(&line).trim_end().to_string());
                        }
                    }
                })?;

        Ok(CommandOracle {
            argv: argv.to_vec(),
            name,
            timeout,
            child,
            to_child: Some(to_child),
            from_child,
            writer_error,
            stderr_tail,
            stderr_thread: Some(stderr_thread),
            broken: None,
            next_id: 0,
        })
    }

    /// The program's process id (tests use it to check that it was killed).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn command_line(&self) -> String {
        self.argv.join(" ")
    }

    /// Waits up to `grace` for the program to exit by itself, then kills it; the exit status text.
    fn reap(&mut self, grace: Duration) -> String {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = self.child.kill();
                    return match self.child.wait() {
                        Ok(status) => format!("still running, killed ({status})"),
                        Err(e) => format!("still running, kill failed: {e}"),
                    };
                }
                Err(e) => return format!("unknown ({e})"),
            }
        }
    }

    /// The last stderr lines, after giving the stderr reader a moment to reach EOF.
    fn stderr_text(&mut self) -> String {
        if let Some(h) = self.stderr_thread.take() {
            let deadline = Instant::now() + Duration::from_millis(500);
            while !h.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if !h.is_finished() {
                self.stderr_thread = Some(h);
            }
        }
        let lines: Vec<String> = self
            .stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        if lines.is_empty() {
            "(stderr empty)".to_string()
        } else {
            format!("last stderr lines:\n  {}", lines.join("\n  "))
        }
    }

    /// Marks the oracle broken, ends the program, and returns the error to report.
    fn fail(&mut self, what: String, grace: Duration) -> anyhow::Error {
        self.to_child = None; // close stdin
        let status = self.reap(grace);
        let stderr = self.stderr_text();
        let msg = format!(
            "command oracle `{}`: {what}; exit status: {status}; {stderr}",
            self.command_line()
        );
        self.broken = Some(msg.clone());
        anyhow!(msg)
    }

    /// One reply line → a judgement for `k` responses.
    fn parse_reply(line: &str, k: usize, id: u64) -> Result<Judgement> {
        let v: Value = serde_json::from_str(line).map_err(|e| {
            let hint = if line.contains("NaN") || line.contains("Infinity") {
                " (NaN and Infinity are not JSON numbers: the oracle produced a non-finite value)"
            } else {
                ""
            };
            anyhow!("reply is not JSON{hint}: {e}: {}", truncate(line, 200))
        })?;
        let Value::Object(obj) = &v else {
            bail!(
                "reply must be a JSON object with `matrix` or `scores`, got {}",
                truncate(line, 200)
            );
        };
        if let Some(e) = obj.get("error") {
            bail!(
                "the oracle reported an error: {}",
                e.as_str().map_or_else(|| e.to_string(), str::to_string)
            );
        }
        if let Some(got) = obj.get("id") {
            if got.as_u64() != Some(id) {
                bail!("reply carries id {got}, expected {id} (replies must come in request order)");
            }
        }
        let number = |x: &Value, at: &str| -> Result<f64> {
            match x.as_f64() {
                Some(f) if f.is_finite() => Ok(f),
                Some(f) => bail!("{at} = {f} is not finite"),
                None => bail!("{at} must be a number, got {x}"),
            }
        };
        match (obj.get("matrix"), obj.get("scores")) {
            (Some(m), None) => {
                let rows = m.as_array().with_context(|| {
                    format!(
                        "`matrix` must be a list of {k} rows, got {}",
                        truncate(&m.to_string(), 200)
                    )
                })?;
                if rows.len() != k {
                    bail!(
                        "`matrix` has {} rows for {k} responses (expected {k}×{k})",
                        rows.len()
                    );
                }
                let mut p = Vec::with_capacity(k * k);
                for (i, row) in rows.iter().enumerate() {
                    let row = row.as_array().with_context(|| {
                        format!("`matrix[{i}]` must be a list of {k} numbers, got {row}")
                    })?;
                    if row.len() != k {
                        bail!(
                            "`matrix[{i}]` has {} entries for {k} responses (expected {k}×{k})",
                            row.len()
                        );
                    }
                    for (j, x) in row.iter().enumerate() {
                        let f = number(x, &format!("matrix[{i}][{j}]"))?;
                        if !(0.0..=1.0).contains(&f) {
                            bail!("matrix[{i}][{j}] = {f} is not a probability in [0, 1]");
                        }
                        p.push(f);
                    }
                }
                Ok(Judgement::from_matrix(PrefMatrix::new(k, p)?))
            }
            (None, Some(s)) => {
                let list = s.as_array().with_context(|| {
                    format!(
                        "`scores` must be a list of {k} numbers, got {}",
                        truncate(&s.to_string(), 200)
                    )
                })?;
                if list.len() != k {
                    bail!("`scores` has {} entries for {k} responses", list.len());
                }
                let scores = list
                    .iter()
                    .enumerate()
                    .map(|(i, x)| number(x, &format!("scores[{i}]")))
                    .collect::<Result<Vec<f64>>>()?;
                Judgement::from_scores(scores, 1.0)
            }
            (Some(_), Some(_)) => bail!("reply has both `matrix` and `scores`; send one"),
            (None, None) => bail!(
                "reply has neither `matrix` nor `scores`: {}",
                truncate(line, 200)
            ),
        }
    }
}

impl Oracle for CommandOracle {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn judge(&mut self, batch: &[OracleInput<'_>]) -> Result<Vec<Judgement>> {
        if let Some(why) = &self.broken {
            bail!("the oracle failed earlier: {why}");
        }
        let first_id = self.next_id;
        let mut bytes = Vec::new();
        for (n, x) in batch.iter().enumerate() {
            let mut req =
                json!({ "id": first_id + n as u64, "prompt": x.prompt, "responses": x.responses });
            if let Some(r) = x.reference {
                req["reference"] = Value::String(r.to_string());
            }
            serde_json::to_writer(&mut bytes, &req)?;
            bytes.push(b'\n');
        }
        self.next_id += batch.len() as u64;
        let sent = self
            .to_child
            .as_ref()
            .is_some_and(|tx| tx.send(bytes).is_ok());
        if !sent {
            return Err(self.fail("its stdin writer stopped".into(), EXIT_GRACE));
        }

        let mut out = Vec::with_capacity(batch.len());
        while out.len() < batch.len() {
            let n = out.len();
            let id = first_id + n as u64;
            let line = match self.from_child.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => return Err(self.fail(format!("reading reply {id}: {e}"), EXIT_GRACE)),
                Err(RecvTimeoutError::Timeout) => {
                    let what = format!(
                        "no reply to request {id} within {:?} (timeout; killed it)",
                        self.timeout
                    );
                    return Err(self.fail(what, Duration::ZERO));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let writer = self.writer_error.lock().ok().and_then(|e| e.clone());
                    let what = format!(
                        "it closed its stdout after {n} of {} replies to this batch (request {id} unanswered){}",
                        batch.len(),
                        writer.map(|e| format!("; writing requests failed: {e}")).unwrap_or_default()
                    );
                    return Err(self.fail(what, EXIT_GRACE));
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let k = batch[n].responses.len();
            match Self::parse_reply(&line, k, id) {
                Ok(j) => out.push(j),
                Err(e) => {
                    return Err(self.fail(
                        format!("reply {id} (batch item {n}, {k} responses): {e:#}"),
                        Duration::ZERO,
                    ))
                }
            }
        }
        Ok(out)
    }
}

impl Drop for CommandOracle {
    fn drop(&mut self) {
        self.to_child = None; // EOF on stdin
        if self.broken.is_none() {
            let _ = self.reap(EXIT_GRACE);
        }
    }
}
