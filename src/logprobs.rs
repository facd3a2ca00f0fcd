//! `sppo logprobs`: summed response log-probs of (prompt, response) pairs under a model, the
//! quantity SPPO's loss is built from. Inputs are token ids (no tokenizer needed) or text rendered
//! through the chat template as TRL's DPO trainer does: the prompt with the generation prompt, the
//! response tokenized on its own and closed with the end-of-turn (EOS) token.

use crate::backend::Backend;
use crate::chat::{encode_chat, ChatTemplate, Message};
use crate::model::{Activations, Batch, Llama};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// One scored example: `prompt_ids ++ response_ids`, the response scored.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub sum_logprob: f64,
    pub token_logprobs: Vec<f32>,
}

/// What text inputs need: the tokenizer, the chat template and the end-of-turn id.
pub struct TextCodec {
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    pub end_of_turn: u32,
}

impl TextCodec {
    /// Tokenizer + chat template of a model directory, checked against the model's vocabulary;
    /// `None` when the directory has no tokenizer.json (token-id inputs still work).
    pub fn from_model_dir(dir: &Path, vocab: usize) -> Result<Option<TextCodec>> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Ok(None);
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", tok_path.display()))?;
        let tv = tokenizer.get_vocab_size(true);
        if tv > vocab {
            bail!("{}: the tokenizer has {tv} tokens but the model's vocabulary is {vocab}: tokenizer and model do not match", tok_path.display());
        }
        let Some(template) = ChatTemplate::from_model_dir(dir)? else {
            bail!("{}: no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)", dir.display());
        };
        let eos_text = template.special_tokens().eos_token.clone().with_context(|| format!("{}: the chat template has no eos_token", dir.display()))?;
        let end_of_turn = tokenizer
            .token_to_id(&eos_text)
            .with_context(|| format!("{}: eos token {eos_text:?} is not in the vocabulary", tok_path.display()))?;
        Ok(Some(TextCodec { tokenizer, template, end_of_turn }))
    }
}

fn ids_field(v: &Value, key: &str, line: usize, file: &Path) -> Result<Vec<u32>> {
    let arr = v.get(key).and_then(Value::as_array).with_context(|| format!("{}:{line}: `{key}` must be a list of token ids", file.display()))?;
    arr.iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("{}:{line}: `{key}` holds {x}, not a token id", file.display()))
        })
        .collect()
}

/// Parses one input line into an example.
pub fn parse_example(v: &Value, line: usize, file: &Path, codec: Option<&TextCodec>) -> Result<Example> {
    if v.get("prompt_ids").is_some() || v.get("response_ids").is_some() {
        return Ok(Example { prompt_ids: ids_field(v, "prompt_ids", line, file)?, response_ids: ids_field(v, "response_ids", line, file)? });
    }
    let codec = codec.with_context(|| {
        format!("{}:{line}: text input needs a tokenizer.json and a chat template in the model directory (or give prompt_ids/response_ids)", file.display())
    })?;
    let (prompt_msgs, response): (Vec<Message>, String) = if let Some(msgs) = v.get("messages") {
        let mut msgs: Vec<Message> =
            serde_json::from_value(msgs.clone()).with_context(|| format!("{}:{line}: `messages` must be a list of {{role, content}}", file.display()))?;
        match msgs.pop() {
            Some(last) if last.role == "assistant" && !msgs.is_empty() => (msgs, last.content),
            _ => bail!("{}:{line}: `messages` must end with an assistant message (the response) after at least one prompt message", file.display()),
        }
    } else {
        let prompt = v.get("prompt").and_then(Value::as_str);
        let response = v.get("response").and_then(Value::as_str);
        match (prompt, response) {
            (Some(p), Some(r)) => (vec![Message { role: "user".into(), content: p.into() }], r.to_string()),
            _ => bail!("{}:{line}: expected `prompt_ids` + `response_ids`, `prompt` + `response` strings, or `messages`", file.display()),
        }
    };
    let prompt_ids = encode_chat(&codec.tokenizer, &codec.template, &prompt_msgs, true).with_context(|| format!("{}:{line}", file.display()))?;
    let enc = codec
        .tokenizer
        .encode(response.as_str(), false)
        .map_err(|e| anyhow::anyhow!("{}:{line}: tokenizing the response: {e}", file.display()))?;
    let mut response_ids = enc.get_ids().to_vec();
    response_ids.push(codec.end_of_turn);
    Ok(Example { prompt_ids, response_ids })
}

/// Scores examples in packed micro-batches of at most `max_batch_tokens` tokens.
pub fn score<B: Backend>(b: &B, model: &mut Llama<B>, examples: &[Example], max_batch_tokens: usize, mut progress: impl FnMut(usize)) -> Result<Vec<Scored>> {
    let mut out = Vec::with_capacity(examples.len());
    let mut i = 0;
    while i < examples.len() {
        let mut j = i;
        let mut tokens = 0;
        while j < examples.len() {
            let len = examples[j].prompt_ids.len() + examples[j].response_ids.len();
            if j > i && tokens + len > max_batch_tokens {
                break;
            }
            tokens += len;
            j += 1;
        }
        let seqs: Vec<(Vec<u32>, usize)> = examples[i..j]
            .iter()
            .enumerate()
            .map(|(k, e)| {
                if e.prompt_ids.is_empty() {
                    bail!("example {}: empty prompt (the first response token needs a preceding token)", i + k);
                }
                Ok(([e.prompt_ids.as_slice(), e.response_ids.as_slice()].concat(), e.prompt_ids.len()))
            })
            .collect::<Result<_>>()?;
        let batch = Batch::from_sequences(seqs.iter().map(|(ids, p)| (ids.as_slice(), *p)))?;
        model.ensure_positions(b, seqs.iter().map(|s| s.0.len()).max().unwrap_or(0))?;
        // Forward only: `recompute` mode keeps each layer's input, not what backward needs.
        let mut acts = Activations::new(b, &model.cfg, batch.len(), true)?;
        model.forward(b, &batch, &mut acts)?;
        let logp = b.download(&acts.logp)?;
        let mut row = 0;
        for (ids, p) in &seqs {
            // Rows p-1 .. len-2 predict the response tokens.
            let toks: Vec<f32> = logp[row + p - 1..row + ids.len() - 1].to_vec();
            out.push(Scored { sum_logprob: toks.iter().map(|&x| x as f64).sum(), token_logprobs: toks });
            row += ids.len();
        }
        progress(j - i);
        i = j;
    }
    Ok(out)
}

/// The output line for one scored example.
pub fn output_line(s: &Scored) -> Value {
    json!({"sum_logprob": s.sum_logprob, "token_logprobs": s.token_logprobs, "num_response_tokens": s.token_logprobs.len()})
}
