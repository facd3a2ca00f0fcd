#!/usr/bin/env python3
"""Cross-checks sppo's GGUF -> Hugging Face conversion against transformers' own GGUF loader.

Converts nothing itself. Inputs come from the ignored Rust test that writes them:

    CARGO_TARGET_DIR=... cargo test --test gguf -- --ignored write_converted_smollm2_for_python_check
    .venv/bin/python scripts/check_gguf_convert.py [--root /tmp/sppo_gguf_check] [--gguf PATH] [--write-fixture]

Checks:
1. tokenizer: `AutoTokenizer.from_pretrained(<our dir>)` vs
   `AutoTokenizer.from_pretrained(<gguf dir>, gguf_file=...)` on sample strings (ids, decode round
   trip) and on the chat template.
2. weights: `AutoModelForCausalLM.from_pretrained(<our dir>)` vs transformers' GGUF dequantisation
   (`from_pretrained(<gguf dir>, gguf_file=...)`), tensor by tensor, exactly; then greedy decoding of a
   chat prompt with both.
3. dtypes: our dequantisation of a synthetic GGUF holding every type we support
   (`dtypes_ours.safetensors`) vs gguf-py's `gguf.quants.dequantize`, exactly.

With --write-fixture it writes tests/fixtures/gguf/smollm2_tokens.json: the ids transformers gives
for our tokenizer (which the Rust test compares against), the ids of transformers' GGUF tokenizer,
and this run's summary. Exits non-zero if a check fails (known, explained differences excepted).
"""

import argparse
import json
import os
import sys

import numpy as np

SAMPLES = [
    "Hello, world! This is a test.",
    "12345",
    "The year 2024 had 366 days and 8784 hours.",
    "héllo wörld — 日本語テキスト 🙂 ñ",
    "def square(x):\n    return x ** 2  # fast\n\tprint(f\"{x=}\")",
    " leading space",
    "  two leading spaces and trailing  ",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]

DEFAULT_GGUF = "/work/main/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def check_tokenizers(ours_dir, gguf_path, summary):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(ours_dir)
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    cases, mismatches = [], []
    for text in SAMPLES:
        a = ours(text)["input_ids"]
        b = theirs(text)["input_ids"]
        round_trip = ours.decode(a) == text
        cases.append({"text": text, "ids": a, "transformers_gguf_ids": b, "same_as_transformers_gguf": a == b})
        if a != b:
            mismatches.append(text)
        if not round_trip:
            summary["failures"].append(f"decode round trip of {text!r}: {ours.decode(a)!r}")
        print(f"{'same' if a == b else 'DIFF'} {text[:40]!r}: ours {a[:16]}{'...' if len(a) > 16 else ''}"
              + ("" if a == b else f" transformers-gguf {b[:16]}"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    t_ours = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    t_theirs = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    summary["chat_template_same"] = t_ours == t_theirs
    if t_ours != t_theirs:
        summary["failures"].append("chat template renders differently")
    summary["tokenizer_cases"] = len(cases)
    summary["tokenizer_mismatches_vs_transformers_gguf"] = mismatches
    # transformers builds a byte-level GGUF tokenizer with GPT-2's pre-tokenizer whatever
    # `tokenizer.ggml.pre` says; llama.cpp's `smollm` (and SmolLM2's own tokenizer.json) split digits
    # one by one first. So digit runs are the one expected difference; anything else is a failure.
    unexplained = [t for t in mismatches if not any(c.isdigit() for c in t)]
    for t in unexplained:
        summary["failures"].append(f"token ids differ from transformers' GGUF tokenizer on {t!r}")
    summary["special_tokens"] = {
        "ours": {k: getattr(ours, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "transformers_gguf": {k: getattr(theirs, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
    }
    return cases, ours


SP_SAMPLES = [
    "hello world",
    "the tokenizer is Mistral",
    " leading space",
    "two  spaces and héllo 123\n",
    "in a world",
    "<s>hello</s> world",
]


def check_sentencepiece(root, summary):
    """Our tokenizer.json for a synthetic SentencePiece GGUF vs transformers' GGUF tokenizer."""
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(os.path.join(root, "sentencepiece_hf"))
    theirs = AutoTokenizer.from_pretrained(root, gguf_file="sentencepiece.gguf")
    results = {}
    for text in SP_SAMPLES:
        a, b = ours(text)["input_ids"], theirs(text)["input_ids"]
        results[text] = {"ours": a, "transformers_gguf": b, "decoded": ours.decode(a, skip_special_tokens=True)}
        print(f"sentencepiece {'same' if a == b else 'DIFF'} {text!r}: ours {a} transformers-gguf {b}")
        if a != b:
            summary["failures"].append(f"sentencepiece tokenizer: ids differ on {text!r}: {a} vs {b}")
    summary["sentencepiece_vs_transformers_gguf"] = results


def check_weights(ours_dir, gguf_path, tokenizer, summary):
    import torch
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32)
    try:
        theirs = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
        )
        summary["transformers_gguf_model"] = "from_pretrained(gguf_file=...)"
    except Exception as e:
        # from_pretrained(gguf_file=...) needs `accelerate`, which the venv may lack. The function it
        # calls does the same dequantisation and Q/K reverse permutation without it.
        import copy

        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        summary["transformers_gguf_model"] = (
            f"from_pretrained(gguf_file=...) failed ({type(e).__name__}: {e}); compared against "
            "transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint, which from_pretrained uses"
        )
        print(summary["transformers_gguf_model"])
        parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=ours)
        theirs = copy.deepcopy(ours)
        result = theirs.load_state_dict(parsed["tensors"], strict=False)
        unexpected = list(result.unexpected_keys)
        not_loaded = [k for k in result.missing_keys if not (k == "lm_head.weight" and ours.config.tie_word_embeddings)]
        if unexpected or not_loaded:
            summary["failures"].append(f"GGUF tensors did not map: unexpected {unexpected}, missing {not_loaded}")
        def ours_value(k):
            # transformers 5 keeps rope_theta inside rope_parameters.
            if k == "rope_theta" and getattr(ours.config, "rope_parameters", None):
                return ours.config.rope_parameters.get("rope_theta")
            return getattr(ours.config, k, None)

        skip = ("_model_name_or_path", "architectures", "model_type", "unk_token_id")  # unk: tokenizer side
        config_diffs = {
            k: {"ours": ours_value(k), "transformers_gguf": v}
            for k, v in parsed["config"].items()
            if k not in skip and ours_value(k) != v
            # GGUF floats are f32; we write their shortest decimal (1e-05), transformers the widened f64.
            and not (isinstance(v, float) and isinstance(ours_value(k), float) and abs(ours_value(k) - v) <= 1e-6 * abs(v))
        }
        if config_diffs:
            summary["failures"].append(f"config differs from transformers' GGUF config: {config_diffs}")
        summary["config_differences_vs_transformers_gguf"] = config_diffs
        print("config differences:", config_diffs)
    sd_a, sd_b = ours.state_dict(), theirs.state_dict()
    missing = sorted(set(sd_b) ^ set(sd_a))
    exact, worst = 0, (0.0, None)
    for name, a in sd_a.items():
        if name not in sd_b:
            continue
        b = sd_b[name]
        if a.shape != b.shape:
            summary["failures"].append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        if torch.equal(a, b):
            exact += 1
        d = (a - b).abs().max().item()
        if d > worst[0] or worst[1] is None:
            worst = (d, name)
    summary["weights_compared"] = len(sd_a)
    summary["weights_bitwise_equal"] = exact
    summary["weights_max_abs_diff"] = {"value": worst[0], "tensor": worst[1]}
    summary["weights_name_differences"] = missing
    print(f"weights: {exact}/{len(sd_a)} tensors bitwise equal; max |diff| {worst[0]} ({worst[1]}); name differences {missing}")
    if exact != len(sd_a) or missing:
        summary["failures"].append("weights differ from transformers' GGUF dequantisation")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    outs = {}
    for label, model in (("ours", ours), ("transformers_gguf", theirs)):
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=16, do_sample=False)
        outs[label] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"greedy ({label}): {outs[label]!r}")
    summary["greedy_answer"] = outs
    if "Paris" not in outs["ours"]:
        summary["failures"].append(f"greedy answer does not mention Paris: {outs['ours']!r}")


def check_dtypes(root, summary):
    import gguf
    from safetensors.numpy import load_file

    ours = load_file(os.path.join(root, "dtypes_ours.safetensors"))
    reader = gguf.GGUFReader(os.path.join(root, "dtypes.gguf"))
    results = {}
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        mine = ours[t.name].reshape(-1)
        same = ref.shape == mine.shape and np.array_equal(ref.view(np.uint32), mine.view(np.uint32))
        results[f"{t.name} ({t.tensor_type.name})"] = "bitwise equal" if same else \
            f"DIFFERS max |diff| {float(np.max(np.abs(ref - mine))) if ref.shape == mine.shape else 'shape'}"
        if not same:
            summary["failures"].append(f"dtype check: {t.name} differs from gguf-py")
    summary["dtypes_vs_gguf_py"] = results
    print("dtypes vs gguf-py:", json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.environ.get("SPPO_GGUF_CHECK_DIR", "/tmp/sppo_gguf_check"))
    ap.add_argument("--gguf", default=os.environ.get("SPPO_SMOLLM2_GGUF", DEFAULT_GGUF))
    ap.add_argument("--write-fixture", action="store_true")
    ap.add_argument("--skip-model", action="store_true", help="tokenizer and dtype checks only")
    args = ap.parse_args()

    import transformers

    ours_dir = os.path.join(args.root, "smollm2_hf")
    summary = {"transformers": transformers.__version__, "failures": []}
    check_dtypes(args.root, summary)
    check_sentencepiece(args.root, summary)
    cases, tokenizer = check_tokenizers(ours_dir, args.gguf, summary)
    if not args.skip_model:
        check_weights(ours_dir, args.gguf, tokenizer, summary)

    print(json.dumps(summary, indent=1, ensure_ascii=False))
    if args.write_fixture:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf", "smollm2_tokens.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fixture = {
            "format_version": 1,
            "source": os.path.basename(args.gguf),
            "generated_by": "scripts/check_gguf_convert.py --write-fixture",
            "about": "ids: transformers' encoding with the tokenizer.json sppo rebuilt (the Rust test checks the "
                     "tokenizers crate gives the same); transformers_gguf_ids: transformers' own GGUF tokenizer, "
                     "which uses GPT-2's pre-tokenizer whatever tokenizer.ggml.pre says (no digit splitting for smollm)",
            "cases": cases,
            "check_summary": summary,
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(fixture, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print("wrote", os.path.normpath(path))
    if summary["failures"]:
        print("FAILED:", *summary["failures"], sep="\n  ")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
