//! Training examples from ranked records (our `sppo rank` output, or the reference pipeline's data
//! sets with `prompt`, `chosen`, `rejected`, `chosen_probs`, `chosen_probs_win`,
//! `chosen_probs_lose`), tokenized as TRL's DPO trainer does: the prompt rendered with the chat
//! template and generation prompt, truncated from the LEFT to `max_prompt_length`; each response
//! tokenized alone, closed with the end-of-turn (EOS) id, truncated to fit `max_length`.

use super::loss::PairProbs;
use super::trainer::{Target, TrainExample};
use crate::chat::{encode_chat, ChatTemplate, Message};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Tokenizer, template and length limits.
pub struct Tokenization<'a> {
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub template: &'a ChatTemplate,
    pub end_of_turn: u32,
    pub max_length: usize,
    pub max_prompt_length: usize,
}

/// Which responses of a ranked record train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    BestWorst,
    /// All K responses with their win-rates (`winrates` field of the record).
    All,
}

/// A text field that is a string or a list of chat messages (the reference pipeline stores
/// `chosen`/`rejected` as `[{role, content}, ...]` with the response last).
fn text_of(v: &Value, what: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(msgs) => msgs
            .last()
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("`{what}` is a message list without a final content")),
        other => bail!("`{what}` must be a string or a list of messages, got {other}"),
    }
}

fn prompt_messages(rec: &Value) -> Result<Vec<Message>> {
    match rec.get("prompt") {
        Some(Value::String(s)) => Ok(vec![Message::user(s.clone())]),
        Some(Value::Array(_)) => serde_json::from_value(rec["prompt"].clone()).context("`prompt` message list"),
        _ => match rec.get("messages") {
            Some(m) => serde_json::from_value(m.clone()).context("`messages`"),
            None => bail!("no `prompt` (string or messages) field"),
        },
    }
}

fn prob(rec: &Value, key: &str) -> Result<f64> {
    rec.get(key).and_then(Value::as_f64).with_context(|| format!("missing or non-numeric `{key}`"))
}

impl Tokenization<'_> {
    fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let mut ids = encode_chat(self.tokenizer, self.template, messages, true)?;
        if ids.len() > self.max_prompt_length {
            ids.drain(..ids.len() - self.max_prompt_length); // keep the end, where the question is
        }
        Ok(ids)
    }

    fn response_ids(&self, text: &str, prompt_len: usize) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing a response: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        ids.push(self.end_of_turn);
        let room = self.max_length.saturating_sub(prompt_len);
        ensure!(room > 0, "the prompt fills max_length ({}): no room for a response", self.max_length);
        ids.truncate(room);
        Ok(ids)
    }

    /// One ranked record (a JSONL line or a Parquet row as JSON) into a training example.
    pub fn example(&self, rec: &Value, selection: Selection) -> Result<TrainExample> {
        let prompt_ids = self.prompt_ids(&prompt_messages(rec)?)?;
        match selection {
            Selection::BestWorst => {
                let chosen = text_of(rec.get("chosen").context("missing `chosen`")?, "chosen")?;
                let rejected = text_of(rec.get("rejected").context("missing `rejected`")?, "rejected")?;
                let probs = PairProbs::new(prob(rec, "chosen_probs")?, prob(rec, "chosen_probs_win")?, prob(rec, "chosen_probs_lose")?)?;
                let responses = vec![self.response_ids(&chosen, prompt_ids.len())?, self.response_ids(&rejected, prompt_ids.len())?];
                Ok(TrainExample { prompt_ids, responses, target: Target::Pair(probs) })
            }
            Selection::All => {
                let responses = rec.get("responses").and_then(Value::as_array).context("`--train-on all` needs `responses`")?;
                // `sppo rank` writes `win_rates`; `winrates` is accepted too.
                let winrates = rec
                    .get("win_rates")
                    .or_else(|| rec.get("winrates"))
                    .and_then(Value::as_array)
                    .context("`--train-on all` needs per-response `win_rates`")?;
                ensure!(responses.len() == winrates.len(), "{} responses but {} winrates", responses.len(), winrates.len());
                let mut ids = Vec::with_capacity(responses.len());
                let mut w = Vec::with_capacity(responses.len());
                for (i, (r, p)) in responses.iter().zip(winrates).enumerate() {
                    ids.push(self.response_ids(&text_of(r, "responses")?, prompt_ids.len())?);
                    let p = p.as_f64().filter(|p| (0.0..=1.0).contains(p)).with_context(|| format!("winrates[{i}] = {p} is not a probability"))?;
                    w.push(p);
                }
                Ok(TrainExample { prompt_ids, responses: ids, target: Target::Winrates(w) })
            }
        }
    }
}

/// Reads ranked records from JSONL or Parquet, each with its location for errors
/// (`file:line` or `file:row`).
pub fn read_records(path: &std::path::Path) -> Result<Vec<(String, Value)>> {
    let recs = crate::rank::read_records(path)?;
    if recs.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(recs.into_iter().map(|r| (r.at, Value::Object(r.fields))).collect())
}
