#!/usr/bin/env python3
"""Tiny random reward models (sequence classifiers) and a tiny random judge (causal LM), with the
numbers transformers computes from them, for tests/reward_judge.rs.

    .venv/bin/python scripts/make_reward_fixtures.py        # rewrites tests/fixtures/reward/

Deterministic (torch.manual_seed per case, float32, eager attention, batch-1 forwards). Every saved
model is re-loaded with `from_pretrained` in float32 and the references are computed from the reloaded
model, i.e. from the weight values exactly as stored.

FORMAT (format_version 1), one folder per case under tests/fixtures/reward/:

  <case>/model/           Hugging Face model folder (config.json, model.safetensors); no tokenizer files:
                          the text cases borrow tests/fixtures/chat/smollm2/{tokenizer.json,tokenizer_config.json}
  <case>/reference.json   {"format_version", "case", "description", "transformers_version", "torch_version",
                           "architecture", "num_labels", "pad_token_id", ...case fields below}

  llama_cls, mistral_cls (token ids only; `sequences`: list of
      {"input_ids": [...], "pooled_index": i, "reward": r}
      where reward = model(input_ids[None]).logits[0, 0] (the pooled logit transformers returns) and
      pooled_index is the position transformers pools, recomputed here with its own formula)
  smollm2_cls (text; `prompt`, `responses`, and per response
      "templated": {"text", "input_ids", "reward"}   text = apply_chat_template([user, assistant],
                                                       tokenize=False, add_generation_prompt=False),
                                                       ids = apply_chat_template(..., tokenize=True)
      "plain": {"text", "input_ids", "reward"}       text = prompt + "\\n" + response, ids = tokenizer(text)
  smollm2_judge (text; causal LM; `prompt`, `responses`, `judge_prompt_file`, `token_a`, `token_b`,
      `pairs`: every ordered pair (i, j), i != j, with
      {"i", "j", "input_ids", "logit_a", "logit_b", "p_a"}   the judging prompt filled with response i as A and
                                                       j as B, rendered with the generation prompt; logits of the
                                                       tokens "A" and "B" at the last position; p_a = softmax of
                                                       those two logits, entry A
      `matrix`: P[i][j] = 1/2 [p_a(i, j) + 1 - p_a(j, i)], diagonal 1/2)
"""

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                          MistralForSequenceClassification)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "reward"
SMOLLM2_TOK = ROOT / "tests" / "fixtures" / "chat" / "smollm2"
JUDGE_PROMPT = ROOT / "data" / "judge_prompt.txt"
FORMAT_VERSION = 1

PROMPT = "What is the capital of France?"
RESPONSES = ["The capital of France is Paris.", "I like turtles.", "Paris, of course! It has been the capital since 987."]


def pooled_index(ids, pad):
    """transformers' GenericForSequenceClassification: the rightmost token that is not the pad token
    (argmax of index * non_pad_mask, so 0 when every token is the pad); the last token without a pad id."""
    if pad is None:
        return len(ids) - 1
    t = torch.tensor(ids)
    return int((torch.arange(len(ids), dtype=torch.int32) * (t != pad).to(torch.int32)).argmax(-1))


def spice(model):
    """transformers' init (std 0.02) gives near-uniform attention and near-constant outputs, under which a
    wrong position, order or token could pass unnoticed: sharpen attention, enlarge the embeddings and heads,
    and make the norm weights non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(12.0)
            elif "embed_tokens" in name:
                p.mul_(30.0)
            elif "score" in name or "lm_head" in name:
                p.mul_(10.0)
            else:
                p.mul_(3.0)


def save_and_reload(model, folder, cls, dtype):
    if folder.exists():
        shutil.rmtree(folder)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def meta(case, description, model, **extra):
    return {
        "format_version": FORMAT_VERSION,
        "case": case,
        "description": description,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "architecture": type(model).__name__,
        "num_labels": getattr(model.config, "num_labels", None),
        "pad_token_id": model.config.pad_token_id,
        **extra,
    }


def reward_of(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits  # (1, num_labels): already pooled
    return float(out[0, 0])


def id_case(case, description, cfg_cls, model_cls, seed, cfg_kwargs, sequences):
    torch.manual_seed(seed)
    cfg = cfg_cls(num_labels=1, attn_implementation="eager", **cfg_kwargs)
    model = model_cls(cfg).eval()
    spice(model)
    folder = OUT / case
    m = save_and_reload(model, folder / "model", model_cls, torch.float32)
    pad = m.config.pad_token_id
    seqs = []
    for ids in sequences:
        r = reward_of(m, ids)
        # Cross-check the pooled index: the full per-position logits at that index equal the pooled output.
        with torch.no_grad():
            hidden = m.model(torch.tensor([ids])).last_hidden_state
            per_pos = m.score(hidden)[0, :, 0]
        k = pooled_index(ids, pad)
        assert abs(float(per_pos[k]) - r) <= 1e-6 * max(1.0, abs(r)), (case, ids, k)
        seqs.append({"input_ids": ids, "pooled_index": k, "reward": r})
    ref = meta(case, description, m, sequences=seqs)
    (folder / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return [(case, len(seqs), [s["pooled_index"] for s in seqs])]


def smollm2_config(cfg_cls, **kw):
    return cfg_cls(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5, rope_theta=100000.0,
                   max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                   attn_implementation="eager", **kw)


def smollm2_cls_case():
    case = "smollm2_cls"
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(smollm2_config(LlamaConfig, num_labels=1)).eval()
    spice(model)
    folder = OUT / case
    m = save_and_reload(model, folder / "model", LlamaForSequenceClassification, torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOK)
    per = []
    for r in RESPONSES:
        msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": r}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        plain = PROMPT + "\n" + r
        plain_ids = tok(plain)["input_ids"]
        per.append({
            "templated": {"text": text, "input_ids": ids, "pooled_index": pooled_index(ids, 2), "reward": reward_of(m, ids)},
            "plain": {"text": plain, "input_ids": plain_ids, "pooled_index": pooled_index(plain_ids, 2),
                      "reward": reward_of(m, plain_ids)},
        })
    ref = meta(case, "LlamaForSequenceClassification, SmolLM2 vocabulary (49152), hidden 16, 2 layers, GQA 2/1, "
               "pad 2 (<|im_end|>, which the ChatML rendering contains mid-text), bf16 weights",
               m, prompt=PROMPT, responses=RESPONSES, per_response=per)
    (folder / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return [(case, len(per), [p["templated"]["pooled_index"] for p in per])]


def fill(template, prompt, a, b):
    """Single-pass placeholder substitution (a response containing "{response_b}" stays literal)."""
    vals = {"prompt": prompt, "response_a": a, "response_b": b}
    return re.sub(r"\{(prompt|response_a|response_b)\}", lambda mt: vals[mt.group(1)], template)


def smollm2_judge_case():
    case = "smollm2_judge"
    torch.manual_seed(4)
    model = LlamaForCausalLM(smollm2_config(LlamaConfig, tie_word_embeddings=True)).eval()
    spice(model)
    folder = OUT / case
    m = save_and_reload(model, folder / "model", LlamaForCausalLM, torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOK)
    template = JUDGE_PROMPT.read_text().rstrip()
    ta = tok("A", add_special_tokens=False)["input_ids"]
    tb = tok("B", add_special_tokens=False)["input_ids"]
    assert len(ta) == 1 and len(tb) == 1
    k = len(RESPONSES)
    p_a = {}
    pairs = []
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            msgs = [{"role": "user", "content": fill(template, PROMPT, RESPONSES[i], RESPONSES[j])}]
            ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            with torch.no_grad():
                last = m(torch.tensor([ids])).logits[0, -1]
            la, lb = float(last[ta[0]]), float(last[tb[0]])
            p = float(torch.softmax(torch.tensor([la, lb], dtype=torch.float64), 0)[0])
            p_a[(i, j)] = p
            pairs.append({"i": i, "j": j, "input_ids": ids, "logit_a": la, "logit_b": lb, "p_a": p})
    matrix = [[0.5 if i == j else 0.5 * (p_a[(i, j)] + 1.0 - p_a[(j, i)]) for j in range(k)] for i in range(k)]
    ref = meta(case, "LlamaForCausalLM judge, SmolLM2 vocabulary (49152), hidden 16, 2 layers, tied, weights scaled (spice), "
               "bf16 weights; the default judging prompt data/judge_prompt.txt",
               m, prompt=PROMPT, responses=RESPONSES, judge_prompt_file="data/judge_prompt.txt",
               token_a=ta[0], token_b=tb[0], pairs=pairs, matrix=matrix)
    (folder / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return [(case, len(pairs), [round(pr["p_a"], 4) for pr in pairs])]


def main():
    if len(sys.argv) > 1:
        sys.exit(__doc__)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
    pad = 3
    rows += id_case(
        "llama_cls", "LlamaForSequenceClassification, vocab 64, hidden 32, 2 layers, GQA 4/2, pad_token_id 3, f32; "
        "sequences: no pad, pad mid-text, trailing pads, leading pad, pad first and last, all pads",
        LlamaConfig, LlamaForSequenceClassification, 1, dict(small, pad_token_id=pad),
        [
            [5, 17, 42, 8, 60, 11, 9],                 # no pad: the last token
            [5, 17, pad, 42, 8, 60, 11],               # pad mid-text: still the last token (rightmost non-pad)
            [5, 17, 42, 8, pad, pad],                  # right padding: the token before the pads
            [5, 17, pad, 42, 8, pad, pad, 30, pad],    # pads mid-text and at the end: index 7
            [pad, 17, 42, 8, 60],                      # left padding: the last token
            [pad, pad, pad],                           # all pads: index 0 (argmax of an all-zero row)
            [21],                                      # one token
        ])
    rows += id_case(
        "mistral_cls", "MistralForSequenceClassification, vocab 64, hidden 32, 2 layers, GQA 4/2, sliding window 4, "
        "pad_token_id null (last token, whatever it is), f32",
        MistralConfig, MistralForSequenceClassification, 2, dict(small, sliding_window=4, pad_token_id=None),
        [
            [5, 17, 42, 8, 60, 11, 9, 33, 2, 50],
            [0, 0, 0, 7, 0, 0],                        # id 0 everywhere: no pad id, so still the last token
            [63, 1],
        ])
    rows += smollm2_cls_case()
    rows += smollm2_judge_case()
    # Every folder loads with the Auto classes too (proves the config's architectures field).
    for case in ["llama_cls", "mistral_cls", "smollm2_cls"]:
        AutoModelForSequenceClassification.from_pretrained(OUT / case / "model")
    AutoModelForCausalLM.from_pretrained(OUT / "smollm2_judge" / "model")
    for r in rows:
        print(*r, sep="  ")


if __name__ == "__main__":
    main()
