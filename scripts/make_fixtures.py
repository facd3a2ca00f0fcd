#!/usr/bin/env python3
"""Build tiny random Llama / Mistral models + Hugging Face reference outputs.

These fixtures prove that the Rust model in the `sppo` crate computes exactly
what Hugging Face `transformers` computes (eager attention, float32).

How to run (from the repository root, with the dev venv):

    .venv/bin/python scripts/make_fixtures.py            # writes tests/fixtures/hf/
    .venv/bin/python scripts/make_fixtures.py --out DIR  # somewhere else

The script is deterministic (torch.manual_seed per case, single-sequence
batch-1 forwards on CPU), deletes and rewrites `<out>/<case>/` for every case,
then re-loads every saved directory with `AutoModelForCausalLM.from_pretrained`
and checks that the logits, generations and weights match (this proves that
both config layouts load in transformers). It ends with a summary table.

=============================================================================
FORMAT CONTRACT (format_version 1)
=============================================================================

Directory layout, one directory per case:

    tests/fixtures/hf/<case>/model/              Hugging Face model directory
        config.json                              (layout: see "Config layouts")
        generation_config.json                   bos_token_id (int),
                                                 eos_token_id (LIST of 2 ints),
                                                 pad_token_id (int)
        model.safetensors                        unsharded cases, or
        model-0000K-of-0000N.safetensors +       sharded case
        model.safetensors.index.json
        (no tokenizer files: everything is token ids)
    tests/fixtures/hf/<case>/reference.safetensors
    tests/fixtures/hf/<case>/meta.json

Weights are stored in the dtype named by config.json (`torch_dtype` or
`dtype`): float32, bfloat16 or float16. Tensor names are the usual HF names
(`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`,
`lm_head.weight`). Tied models (`tie_word_embeddings: true`) have NO
`lm_head.weight` tensor; lm_head uses `model.embed_tokens.weight`.

ALL reference numbers are computed in float32 with attn_implementation="eager",
from the weight values exactly as stored (bf16/f16 values widened to f32).

reference.safetensors (all float32 unless noted; S = number of sequences = 3,
s in 0..S, T_s = length of sequence s, V = vocab_size):

    input_ids.{s}        int64   [T_s]      random ids in [0, V)
    logits.{s}           f32     [T_s, V]   model(input_ids.{s}[None]).logits[0]
                                            (batch 1, no padding, positions 0..T_s-1)
    token_logprobs.{s}   f32     [T_s-1]    entry t = log_softmax(logits.{s}[t])[input_ids.{s}[t+1]]
    sum_logprobs         f32     [S]        sum over t with t+1 >= prompt_len_s of
                                            token_logprobs.{s}[t]  (i.e. t >= prompt_len_s-1:
                                            response tokens only, prompt masked)
    loss_weights         f32     [S]        fixed random weights in [-1, 1]
    grad.<param name>    f32     [same shape as the parameter]
                                            dL/dparam of L = sum_s loss_weights[s] * sum_logprobs[s]
                                            (each sequence run separately, batch 1; gradients summed).
                                            One entry for EVERY tensor in the model's
                                            safetensors, same names; for tied models only
                                            `grad.model.embed_tokens.weight` exists and holds the
                                            sum of the embedding-use and lm_head-use gradients.
    rope.inv_freq        f32     [head_dim/2]  the inverse RoPE frequencies transformers uses
                                            (after llama3 scaling where configured); extra aid
                                            for debugging, not needed to reproduce the outputs.

meta.json:

    {
      "format_version": 1,
      "case": "<case>",
      "description": "...",
      "transformers_version": "...", "torch_version": "...",
      "architecture": "LlamaForCausalLM" | "MistralForCausalLM",
      "storage_dtype": "float32" | "bfloat16" | "float16",
      "reference_dtype": "float32", "attn_implementation": "eager",
      "config_layout": "classic" | "v5",
      "weight_files": ["model.safetensors"] or the shard names,
      "generation": {"bos_token_id": int, "eos_token_id": [int, int], "pad_token_id": int},
      "sequences": [{"len": T, "prompt_len": p}, ...],          # S entries, order = s
      "greedy": [                                                # 2 entries
        {"prompt": [ids...], "max_new_tokens": 8,
         "output": [8 new ids...],                                # prompt NOT included
         "stopped_at_eos": false,                                 # eos ids never produced
         "top2_margin": [8 floats]}                               # per step: best logit minus
      ],                                                          # second-best logit (f32 eager,
                                                                  # full no-cache forward)
      "config_features": ["...", ...],                           # human-readable tags
      "rope_bands": {...}                                         # llama3 case only
    }

Greedy generation: at each step the next token is argmax of the last-position
logits (float32). The outputs were produced by a no-cache full-forward loop AND
checked identical to `model.generate(do_sample=False, max_new_tokens=8)` with
the saved generation_config (KV cache, eos ids = the two configured ids). The
eos ids were chosen among tokens that none of the greedy outputs contain, so
generation never stops early. Prompts are re-drawn until every step's top-2
margin is >= 1e-3 and the prompt does not contain pad_token_id (generate()
would otherwise infer an attention mask that hides those tokens), so
divergence is only acceptable where a margin is tiny.

Config layouts:
  * "classic" (transformers 4.x style): top-level `rope_theta`, `rope_scaling`
    (null, or {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}; Mistral classic
    configs have no `rope_scaling` key), `torch_dtype`. `head_dim` may be
    ABSENT (then head_dim = hidden_size / num_attention_heads).
  * "v5" (what transformers 5 writes natively): `rope_parameters`
    {"rope_type": "default"|..., "rope_theta": ...}, `dtype`, no top-level
    `rope_theta`/`rope_scaling`/`torch_dtype`.
transformers 5 only writes the v5 layout; the classic configs are produced by
rewriting config.json after save_pretrained.

Semantics worth knowing (checked against the installed transformers):
  * Sliding window (Mistral, `sliding_window: W`): query position q attends to
    key positions k with  q - W < k <= q  (W keys including itself). Verified:
    logits at positions < W equal those of the same model without a window, and
    position W differs. `sliding_window: null` = full causal attention.
  * llama3 RoPE: inv_freq_i = theta^(-2i/d); wavelen = 2*pi/inv_freq;
    low_wl = orig/low_freq_factor, high_wl = orig/high_freq_factor;
    wavelen < high_wl -> unchanged; wavelen > low_wl -> inv_freq/factor;
    otherwise s = (orig/wavelen - low_freq_factor)/(high_freq_factor - low_freq_factor),
    inv = (1-s)*inv/factor + s*inv. No attention scaling (cos/sin unscaled).
    All computed in float32 by transformers.
  * RoPE is the "rotate_half" (non-interleaved) form: pairs (i, i+d/2), with
    cos/sin = cos/sin(pos * inv_freq) repeated twice along head_dim.
  * RMSNorm: x * rsqrt(mean(x^2) + eps) * weight (weight not offset by 1).
  * Attention scale 1/sqrt(head_dim); GQA: kv head j serves query heads
    j*g .. j*g+g-1 (g = heads/kv_heads, repeat_kv/repeat_interleave order).
  * from_pretrained in transformers 5 defaults to dtype="auto" (stored dtype);
    pass dtype=torch.float32 to get the f32 reference behaviour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

FORMAT_VERSION = 1
MAX_NEW_TOKENS = 8
MIN_MARGIN = 1e-3
BOS_ID, PAD_ID = 1, 0

# --------------------------------------------------------------------------
# Case definitions
# --------------------------------------------------------------------------
CASES = [
    dict(
        name="llama_gqa",
        description="Llama, GQA 4 q heads / 2 kv heads, untied lm_head, rope_theta 1e4, "
        "eps 1e-5, f32 weights, classic config layout without head_dim key.",
        arch="llama",
        cfg=dict(vocab_size=128, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False),
        layout="classic", drop_head_dim=True, dtype=torch.float32, shard=None,
        seqs=[(7, 3), (13, 5), (20, 9)], prompt_lens=(4, 6),
        features=["gqa_4q_2kv", "untied_lm_head", "rope_default_theta_1e4", "rms_norm_eps_1e-5",
                  "f32_weights", "classic_config_layout", "head_dim_absent_from_config",
                  "rope_scaling_null"],
    ),
    dict(
        name="llama_mqa_tied",
        description="Llama, MQA 4 q heads / 1 kv head, tie_word_embeddings (no lm_head tensor), "
        "rope_theta 5e5, f32 weights, classic config layout.",
        arch="llama",
        cfg=dict(vocab_size=112, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=256, tie_word_embeddings=True),
        layout="classic", drop_head_dim=True, dtype=torch.float32, shard=None,
        seqs=[(7, 3), (13, 5), (20, 9)], prompt_lens=(4, 6),
        features=["mqa_4q_1kv", "tied_embeddings_no_lm_head_tensor", "rope_default_theta_5e5",
                  "f32_weights", "classic_config_layout", "head_dim_absent_from_config"],
    ),
    dict(
        name="llama3_rope_headdim_bf16",
        description="Llama, rope_scaling llama3 (factor 8, low 1, high 4, original_max_position_"
        "embeddings 32 so the 8 frequencies fall in all three bands), explicit head_dim 16 != "
        "hidden 48 / 4 heads, bfloat16 weights (reference in f32 from the bf16 values), "
        "classic config layout.",
        arch="llama",
        cfg=dict(vocab_size=144, hidden_size=48, head_dim=16, intermediate_size=112,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=32),
                 tie_word_embeddings=False),
        layout="classic", drop_head_dim=False, dtype=torch.bfloat16, shard=None,
        seqs=[(7, 3), (13, 5), (20, 9)], prompt_lens=(4, 6),
        features=["rope_llama3_scaling", "rope_all_three_bands", "explicit_head_dim_16_ne_hidden_over_heads",
                  "gqa_4q_2kv", "bf16_weights", "classic_config_layout", "untied_lm_head"],
    ),
    dict(
        name="mistral_sliding_f16",
        description="Mistral, sliding_window 5 with sequences longer than the window, GQA 4/2, "
        "float16 weights (reference in f32 from the f16 values), classic config layout.",
        arch="mistral",
        cfg=dict(vocab_size=100, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=256, sliding_window=5,
                 tie_word_embeddings=False),
        layout="classic", drop_head_dim=False, dtype=torch.float16, shard=None,
        seqs=[(9, 3), (14, 6), (20, 10)], prompt_lens=(4, 9),
        features=["mistral", "sliding_window_5", "seq_longer_than_window", "gqa_4q_2kv",
                  "f16_weights", "classic_config_layout", "untied_lm_head"],
    ),
    dict(
        name="llama_v5_layout_sharded",
        description="Llama, MHA (4 kv heads == 4 heads), rms_norm_eps 1e-6, transformers-5 config "
        "layout (rope_parameters, dtype), saved in >= 2 safetensors shards with index.",
        arch="llama",
        cfg=dict(vocab_size=160, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                 rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False),
        layout="v5", drop_head_dim=False, dtype=torch.float32, shard="100KB",
        seqs=[(7, 3), (13, 5), (20, 9)], prompt_lens=(4, 6),
        features=["mha_4q_4kv", "rms_norm_eps_1e-6", "v5_config_layout", "rope_parameters_default",
                  "sharded_safetensors_with_index", "f32_weights", "untied_lm_head",
                  "head_dim_12"],
    ),
    dict(
        name="mistral_v5_layout",
        description="Mistral, transformers-5 config layout with sliding_window null, GQA 8/2 heads "
        "with head_dim 8, untied embeddings, rope_theta 1e6, f32 weights.",
        arch="mistral",
        cfg=dict(vocab_size=128, hidden_size=64, head_dim=8, intermediate_size=160,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=256,
                 sliding_window=None, tie_word_embeddings=False),
        layout="v5", drop_head_dim=False, dtype=torch.float32, shard=None,
        seqs=[(7, 3), (13, 5), (20, 9)], prompt_lens=(4, 6),
        features=["mistral", "sliding_window_null", "gqa_8q_2kv", "head_dim_8", "v5_config_layout",
                  "rope_default_theta_1e6", "untied_lm_head", "f32_weights"],
    ),
]

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def build_config(case):
    cfg = dict(case["cfg"])
    rope_theta = cfg.pop("rope_theta")
    rope_scaling = cfg.pop("rope_scaling", None)
    rope_parameters = dict(rope_scaling) if rope_scaling else {"rope_type": "default"}
    rope_parameters["rope_theta"] = rope_theta
    common = dict(hidden_act="silu", attention_dropout=0.0, bos_token_id=BOS_ID, pad_token_id=PAD_ID,
                  eos_token_id=2, rope_parameters=rope_parameters, use_cache=True,
                  initializer_range=0.02)
    cls = LlamaConfig if case["arch"] == "llama" else MistralConfig
    if case["arch"] == "llama":
        common.update(attention_bias=False, mlp_bias=False)
    config = cls(**cfg, **common)
    config._attn_implementation = "eager"
    return config


def init_weights(model, seed):
    """Large-ish random init so logits are far from uniform and grads not tiny."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.15 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def rewrite_config(model_dir, case, eos_ids):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = list(eos_ids)
    cfg["bos_token_id"] = BOS_ID
    cfg["pad_token_id"] = PAD_ID
    if case["layout"] == "classic":
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        rtype = rp.get("rope_type", "default")
        if case["arch"] == "llama":
            cfg["rope_scaling"] = None if rtype == "default" else rp
        else:
            assert rtype == "default"
        cfg["torch_dtype"] = cfg.pop("dtype")
        if case["drop_head_dim"]:
            assert cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
            del cfg["head_dim"]
    else:
        assert "rope_parameters" in cfg and "dtype" in cfg
        for k in ("rope_theta", "rope_scaling", "torch_dtype"):
            assert k not in cfg, k
    with open(path, "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")
    return cfg


def forward_logits(model, ids):
    return model(input_ids=ids[None], use_cache=False).logits[0]


def greedy_no_cache(model, prompt, n):
    cur = list(prompt)
    out, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = forward_logits(model, torch.tensor(cur, dtype=torch.long))[-1]
            top = torch.topk(logits, 2)
            nxt = int(top.indices[0])
            margins.append(float(top.values[0] - top.values[1]))
            out.append(nxt)
            cur.append(nxt)
    return out, margins


def weight_files(model_dir):
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def read_saved_weights(model_dir):
    out = {}
    for fn in weight_files(model_dir):
        with safe_open(os.path.join(model_dir, fn), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def llama3_bands(config):
    rp = config.rope_parameters
    d = config.head_dim
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    wl = 2 * math.pi / inv
    orig = rp["original_max_position_embeddings"]
    hi_wl, lo_wl = orig / rp["high_freq_factor"], orig / rp["low_freq_factor"]
    bands = ["high_unchanged" if w < hi_wl else "low_divided" if w > lo_wl else "medium_smoothed" for w in wl]
    return dict(wavelengths=[round(float(w), 4) for w in wl], high_freq_wavelen=hi_wl,
                low_freq_wavelen=lo_wl, bands=bands)


# --------------------------------------------------------------------------
# Per-case generation
# --------------------------------------------------------------------------
def make_case(case, out_root):
    name = case["name"]
    seed = 1000 + CASES.index(case)
    torch.manual_seed(seed)
    case_dir = os.path.join(out_root, name)
    model_dir = os.path.join(case_dir, "model")
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(model_dir)

    config = build_config(case)
    cls = LlamaForCausalLM if case["arch"] == "llama" else MistralForCausalLM
    model = cls(config)
    init_weights(model, seed)
    # Round to the storage dtype, then compute everything in f32 from those values.
    # Only parameters are rounded: buffers (rotary inv_freq) stay as transformers computes
    # them in f32 (a model loaded with dtype=float32 recomputes them in f32 too).
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(prm.to(case["dtype"]).to(torch.float32))
    model.eval()
    V = config.vocab_size

    g = torch.Generator().manual_seed(seed + 1)
    seqs = [(torch.randint(0, V, (T,), generator=g), p) for T, p in case["seqs"]]
    loss_weights = (torch.rand(len(seqs), generator=g) * 2 - 1).to(torch.float32)

    ref = {}
    sum_lps = []
    model.zero_grad(set_to_none=True)
    for s, (ids, p) in enumerate(seqs):
        logits = forward_logits(model, ids)
        lp = F.log_softmax(logits, dim=-1)
        tok_lp = lp[:-1].gather(1, ids[1:, None])[:, 0]
        slp = tok_lp[p - 1:].sum()
        (loss_weights[s] * slp).backward()
        ref[f"input_ids.{s}"] = ids.to(torch.int64).clone()
        ref[f"logits.{s}"] = logits.detach().clone()
        ref[f"token_logprobs.{s}"] = tok_lp.detach().clone()
        sum_lps.append(slp.detach())
    ref["sum_logprobs"] = torch.stack(sum_lps).to(torch.float32)
    ref["loss_weights"] = loss_weights
    grads = {}
    for pname, prm in model.named_parameters():
        grads[pname] = prm.grad.detach().clone()
        ref[f"grad.{pname}"] = grads[pname]
    ref["rope.inv_freq"] = model.model.rotary_emb.inv_freq.detach().to(torch.float32).clone()
    model.zero_grad(set_to_none=True)

    # Greedy generations (no-cache loop), prompts re-drawn until margins are safe.
    greedy = []
    tries = 0
    for plen in case["prompt_lens"]:
        while True:
            tries += 1
            assert tries < 200, "could not find prompts with safe top-2 margins"
            prompt = torch.randint(0, V, (plen,), generator=g).tolist()
            out, margins = greedy_no_cache(model, prompt, MAX_NEW_TOKENS)
            # Prompts never contain pad_token_id: generate() would infer padding from it.
            if PAD_ID not in prompt and min(margins) >= MIN_MARGIN:
                break
        greedy.append(dict(prompt=prompt, max_new_tokens=MAX_NEW_TOKENS, output=out,
                           stopped_at_eos=False, top2_margin=[round(m, 6) for m in margins]))
    produced = {t for e in greedy for t in e["output"]}
    eos_ids = [t for t in range(2, V) if t not in produced and t != BOS_ID and t != PAD_ID][-2:]
    eos_ids = [eos_ids[0], eos_ids[1]]

    # Check generate() (KV cache, configured eos) gives the same tokens.
    gen_cfg = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=eos_ids, pad_token_id=PAD_ID)
    model.generation_config = gen_cfg
    model.config.eos_token_id = eos_ids
    for e in greedy:
        with torch.no_grad():
            pr = torch.tensor([e["prompt"]])
            o = model.generate(pr, attention_mask=torch.ones_like(pr), do_sample=False,
                               max_new_tokens=MAX_NEW_TOKENS)
        got = o[0, len(e["prompt"]):].tolist()
        assert got == e["output"], (name, got, e["output"])

    # Save in the storage dtype.
    save_model = cls(config)
    save_model.load_state_dict(model.state_dict())
    save_model = save_model.to(case["dtype"])
    save_model.generation_config = gen_cfg
    kw = {}
    if case["shard"]:
        kw["max_shard_size"] = case["shard"]
    save_model.save_pretrained(model_dir, **kw)
    del save_model
    saved_cfg = rewrite_config(model_dir, case, eos_ids)
    with open(os.path.join(model_dir, "generation_config.json")) as f:
        gc = json.load(f)
    assert gc["eos_token_id"] == eos_ids and gc["bos_token_id"] == BOS_ID and gc["pad_token_id"] == PAD_ID, gc

    # Saved weights == the f32 model's weights (after widening) and grads cover every tensor.
    saved = read_saved_weights(model_dir)
    assert set(saved) == set(grads), (name, sorted(set(saved) ^ set(grads)))
    params = dict(model.named_parameters())
    for k, t in saved.items():
        assert t.dtype == case["dtype"], (k, t.dtype)
        assert torch.equal(t.to(torch.float32), params[k].detach()), k
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in saved
    wfiles = weight_files(model_dir)
    if case["shard"]:
        assert len(wfiles) >= 2, wfiles

    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, os.path.join(case_dir, "reference.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})

    meta = dict(
        format_version=FORMAT_VERSION,
        case=name,
        description=case["description"],
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        architecture=cls.__name__,
        storage_dtype=DTYPE_NAMES[case["dtype"]],
        reference_dtype="float32",
        attn_implementation="eager",
        config_layout=case["layout"],
        weight_files=wfiles,
        generation=dict(bos_token_id=BOS_ID, eos_token_id=eos_ids, pad_token_id=PAD_ID),
        sequences=[dict(len=int(ids.numel()), prompt_len=p) for ids, p in seqs],
        greedy=greedy,
        config_features=case["features"],
    )
    if config.rope_parameters.get("rope_type") == "llama3":
        bands = llama3_bands(config)
        assert set(bands["bands"]) == {"high_unchanged", "medium_smoothed", "low_divided"}, bands
        meta["rope_bands"] = bands
    with open(os.path.join(case_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    # Sliding-window semantics check: window must actually be applied.
    if getattr(config, "sliding_window", None) is not None:
        W = config.sliding_window
        cfg2 = build_config(case)
        cfg2.sliding_window = None
        m2 = cls(cfg2)
        m2.load_state_dict(model.state_dict())
        m2.eval()
        with torch.no_grad():
            for s, (ids, _) in enumerate(seqs):
                assert ids.numel() > W + 1
                a = ref[f"logits.{s}"]
                b = forward_logits(m2, ids)
                assert torch.equal(a[:W], b[:W]), "positions < W must not see the window"
                assert (a[W] - b[W]).abs().max() > 1e-3, "position W must differ (window excludes key 0)"
                assert (a[W:] - b[W:]).abs().max(dim=-1).values.min() > 1e-4
        del m2

    stats = dict(
        case=name,
        params=sum(p.numel() for p in model.parameters()),
        max_logit=max(float(ref[f"logits.{s}"].abs().max()) for s in range(len(seqs))),
        logit_std=float(torch.cat([ref[f"logits.{s}"] for s in range(len(seqs))]).std(dim=-1).mean()),
        sum_lp=[round(float(x), 3) for x in ref["sum_logprobs"]],
        grad_norm=float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads.values()))),
        grad_min_norm=min((float(gr.norm()), k) for k, gr in grads.items()),
        min_margin=min(min(e["top2_margin"]) for e in greedy),
        dtype=DTYPE_NAMES[case["dtype"]],
        files=wfiles,
        eos=eos_ids,
    )
    return stats


# --------------------------------------------------------------------------
# Self-check: reload from disk with the Auto class.
# --------------------------------------------------------------------------
def self_check(case, out_root):
    name = case["name"]
    case_dir = os.path.join(out_root, name)
    model_dir = os.path.join(case_dir, "model")
    with open(os.path.join(case_dir, "meta.json")) as f:
        meta = json.load(f)
    ref = {}
    with safe_open(os.path.join(case_dir, "reference.safetensors"), framework="pt") as f:
        for k in f.keys():
            ref[k] = f.get_tensor(k)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    c = model.config
    # Config features survived the round trip.
    want = dict(case["cfg"])
    assert c.num_key_value_heads == want["num_key_value_heads"]
    assert c.head_dim == want.get("head_dim", want["hidden_size"] // want["num_attention_heads"])
    assert c.tie_word_embeddings == want["tie_word_embeddings"]
    assert c.rope_parameters["rope_theta"] == want["rope_theta"], c.rope_parameters
    assert c.rms_norm_eps == want["rms_norm_eps"]
    if "rope_scaling" in want:
        for k, v in want["rope_scaling"].items():
            assert c.rope_parameters[k] == v, (k, c.rope_parameters)
    else:
        assert c.rope_parameters["rope_type"] == "default"
    if case["arch"] == "mistral":
        assert c.sliding_window == want["sliding_window"]
    assert torch.equal(model.model.rotary_emb.inv_freq.float(), ref["rope.inv_freq"])
    if c.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    max_diff = 0.0
    with torch.no_grad():
        for s in range(len(meta["sequences"])):
            logits = forward_logits(model, ref[f"input_ids.{s}"])
            d = float((logits - ref[f"logits.{s}"]).abs().max())
            max_diff = max(max_diff, d)
            assert d <= 1e-5, (name, s, d)
        for e in meta["greedy"]:
            pr = torch.tensor([e["prompt"]])
            o = model.generate(pr, attention_mask=torch.ones_like(pr), do_sample=False,
                               max_new_tokens=e["max_new_tokens"])
            assert o[0, len(e["prompt"]):].tolist() == e["output"], name
    assert list(model.generation_config.eos_token_id) == meta["generation"]["eos_token_id"]
    return max_diff


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf"))
    args = ap.parse_args()
    out_root = os.path.normpath(args.out)
    os.makedirs(out_root, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, out {out_root}")

    rows = []
    for case in CASES:
        st = make_case(case, out_root)
        rows.append(st)
        print(f"  built {case['name']}")
    diffs = {}
    for case in CASES:
        diffs[case["name"]] = self_check(case, out_root)
        print(f"  self-check {case['name']}: reload max |dlogit| = {diffs[case['name']]:.2e}")

    print()
    hdr = f"{'case':28s} {'dtype':9s} {'params':>7s} {'max|logit|':>10s} {'logit sd':>8s} {'|grad|':>8s} {'min |grad_p|':>12s} {'min margin':>10s} {'files':>5s} eos"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['case']:28s} {r['dtype']:9s} {r['params']:7d} {r['max_logit']:10.3f} {r['logit_std']:8.3f} "
              f"{r['grad_norm']:8.3f} {r['grad_min_norm'][0]:12.4f} {r['min_margin']:10.4f} {len(r['files']):5d} {r['eos']}")
    total = 0
    for dp, _, fns in os.walk(out_root):
        total += sum(os.path.getsize(os.path.join(dp, fn)) for fn in fns)
    print(f"\ntotal size of {out_root}: {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
