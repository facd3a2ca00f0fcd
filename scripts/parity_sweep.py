#!/usr/bin/env python3
"""Parity sweep: random Llama/Mistral configurations, sppo's log-probs against transformers.

The committed fixtures (make_fixtures.py) pin one model per feature; this draws many random
combinations of them (GQA/MQA/MHA, explicit head_dim ≠ hidden/heads, rope default/linear/llama3
with random theta, Mistral sliding windows shorter and longer than the sequences, tied or untied
embeddings, f32/bf16/f16 storage, single or sharded safetensors, odd vocabulary and MLP sizes),
saves each with `save_pretrained`, scores random token ids with `sppo logprobs` and compares every
response token's log-prob with transformers run in f32 on the same stored weights.

    .venv/bin/python scripts/parity_sweep.py [--cases 100] [--seed 0] [--device cpu|cuda]

`--device cuda` checks the CUDA backend (bf16 by default there: pass `--precision f32` for the f32
tolerance). A token passes when |sppo − transformers| ≤ tol · max(1, |transformers|); the summed
log-prob likewise. Exit status 1 on any mismatch or sppo failure.
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()


def random_case(r: random.Random):
    kv = r.choice([1, 1, 2, 3, 4])
    heads = kv * r.choice([1, 2, 3, 4])
    head_dim = r.choice([2, 4, 6, 8, 10, 16, 24, 32])
    hidden = r.choice([heads * head_dim, heads * r.randrange(1, 12)])
    mistral = r.random() < 0.4
    common = dict(
        vocab_size=r.randrange(17, 400), hidden_size=hidden, head_dim=head_dim, intermediate_size=r.randrange(3, 130),
        num_hidden_layers=r.randrange(1, 4), num_attention_heads=heads, num_key_value_heads=kv,
        rms_norm_eps=r.choice([1e-5, 1e-6]), max_position_embeddings=512, tie_word_embeddings=r.random() < 0.5,
    )
    theta = r.choice([1e4, 5e5, 1e6, 777.0])
    rope = {"rope_type": "default", "rope_theta": theta}
    kind = "default" if mistral else r.choice(["default", "linear", "llama3"])
    if kind == "linear":
        rope = {"rope_type": "linear", "factor": r.choice([2.0, 4.0]), "rope_theta": theta}
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": r.choice([16, 32, 64]), "rope_theta": theta}
    if mistral:
        cfg = MistralConfig(**common, sliding_window=r.choice([None, 1, 3, 7, 40]), rope_parameters=rope)
    else:
        cfg = LlamaConfig(**common, rope_parameters=rope)
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    shard = r.choice(["50MB", "20KB"])
    return mistral, cfg, dtype, shard


def describe(mistral, cfg, dtype, shard):
    c = cfg
    rope = c.rope_parameters["rope_type"]
    window = f" window={c.sliding_window}" if mistral else ""
    return (f"{'mistral' if mistral else 'llama'} hidden={c.hidden_size} heads={c.num_attention_heads}/{c.num_key_value_heads} "
            f"head_dim={c.head_dim} layers={c.num_hidden_layers} vocab={c.vocab_size} ffn={c.intermediate_size} "
            f"tied={c.tie_word_embeddings} rope={rope} theta={c.rope_parameters['rope_theta']:g}{window} {str(dtype)[6:]} shard={shard}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, help="passed to sppo on cuda (bf16 or f32)")
    ap.add_argument("--tol", type=float, default=None, help="default 1e-4 (f32), 3e-2 (bf16 on cuda)")
    ap.add_argument("--sppo", default=str(Path(__file__).resolve().parent.parent / "target/release/sppo"))
    ap.add_argument("--keep", help="keep the models in this directory instead of a temporary one")
    args = ap.parse_args()
    bf16 = args.device == "cuda" and args.precision != "f32"
    tol = args.tol if args.tol is not None else (3e-2 if bf16 else 1e-4)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sppo-sweep-"))
    failures, worst = 0, 0.0
    for case in range(args.seed, args.seed + args.cases):
        r = random.Random(case)
        torch.manual_seed(case)
        mistral, cfg, dtype, shard = random_case(r)
        model = (MistralForCausalLM if mistral else LlamaForCausalLM)(cfg)
        with torch.no_grad():  # larger than the init's 0.02 so that every layer matters
            for name, p in model.named_parameters():
                p.normal_(0, 0.2)
                if "norm" in name:
                    p.add_(1.0)
        d = root / f"case{case}"
        model.to(dtype).save_pretrained(d, max_shard_size=shard)
        # The reference reads the stored weights back, as sppo does (casting the model in memory
        # would also round its RoPE frequency buffer).
        model = (MistralForCausalLM if mistral else LlamaForCausalLM).from_pretrained(d, dtype=torch.float32).eval()
        examples = []
        for _ in range(r.randrange(1, 5)):
            prompt_len, response_len = r.randrange(1, 30), r.randrange(1, 60)
            examples.append({"prompt_ids": [r.randrange(cfg.vocab_size) for _ in range(prompt_len)],
                             "response_ids": [r.randrange(cfg.vocab_size) for _ in range(response_len)]})
        data = d / "data.jsonl"
        data.write_text("".join(json.dumps(e) + "\n" for e in examples))
        cmd = [args.sppo, "logprobs", "--model", str(d), "--data", str(data), "--device", args.device]
        if args.precision:
            cmd += ["--precision", args.precision]
        out = subprocess.run(cmd, capture_output=True, text=True)
        desc = describe(mistral, cfg, dtype, shard)
        if out.returncode != 0:
            failures += 1
            print(f"case {case}: sppo FAILED ({desc})\n{out.stderr[-2000:]}", flush=True)
            continue
        got = [json.loads(line) for line in out.stdout.splitlines()]
        err = 0.0
        for ex, g in zip(examples, got, strict=True):
            ids = torch.tensor([ex["prompt_ids"] + ex["response_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0].double(), -1)
            p = len(ex["prompt_ids"])
            ref = [lp[t - 1, ids[0, t]].item() for t in range(p, ids.shape[1])]
            err = max([err] + [abs(a - b) / max(1.0, abs(a)) for a, b in zip(ref, g["token_logprobs"], strict=True)])
            err = max(err, abs(sum(ref) - g["sum_logprob"]) / max(1.0, abs(sum(ref))))
        worst = max(worst, err)
        ok = err <= tol
        failures += not ok
        print(f"case {case}: {'ok' if ok else 'MISMATCH'} {err:.1e}  {desc}", flush=True)
    print(f"{args.cases - failures}/{args.cases} cases within {tol:g} (worst {worst:.1e}); models in {root}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
