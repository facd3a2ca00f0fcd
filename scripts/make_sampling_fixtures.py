#!/usr/bin/env python3
"""Writes tests/fixtures/sampling/warpers.json: Hugging Face's truncated sampling distributions.

For several logit vectors (vocab 50-200: Gaussian, heavy ties, one spike, -inf masked, flat) and a
grid of parameters (temperature 0.7/1.0/1.3, top_k 0/5, top_p 1.0/0.9, min_p 0/0.05, plus a few
hand-picked ones and greedy), applies transformers' own warpers in the order `generate` builds them
(generation/utils.py `_get_logits_processor`: Temperature -> TopK -> TopP -> MinP, each only when
`generate` would add it), then softmax, and records the tokens with nonzero probability.
`tests/sampling.rs` checks `sppo::sampling::truncated_distribution` against it.

Parameters are rounded to f32 first, so HF and the Rust sampler (which takes f32) use the same
values. `tie_split` marks cases where equal logits fall on both sides of a cutoff: HF's choice
there comes from `torch.sort`, which is not stable, so only the multiset of probabilities is
comparable, not the ids.

Run: /work/main/.venv/bin/python scripts/make_sampling_fixtures.py   (from the repository root)
"""

import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

FORMAT = "sppo-sampling-warpers"
VERSION = 1
OUT = os.path.join("tests", "fixtures", "sampling", "warpers.json")


def f32(v):
    return float(np.float32(v))


def logit_vectors():
    rng = np.random.default_rng(20240611)
    vecs = {}
    vecs["normal_v50"] = rng.normal(0, 2.0, 50)
    vecs["normal_v200"] = rng.normal(0, 3.0, 200)
    # Multiples of 0.5: many exact ties, including at the top-k threshold.
    vecs["ties_v120"] = np.round(rng.normal(0, 2.0, 120) * 2) / 2
    spiky = rng.normal(0, 1.0, 100)
    spiky[37] += 12.0
    vecs["spiky_v100"] = spiky
    masked = rng.normal(0, 2.0, 80)
    masked[rng.choice(80, 20, replace=False)] = -np.inf
    vecs["masked_v80"] = masked
    # Equal logits: every top-p cutoff splits the one tie group.
    vecs["flat_v64"] = np.zeros(64)
    # top_k 2 keeps the 5 and all three 4s.
    topk_ties = np.full(60, -1.0)
    topk_ties[[3, 10, 20, 40, 50]] = [5.0, 4.0, 4.0, 4.0, 3.0]
    vecs["topk_ties_v60"] = topk_ties
    return {k: v.astype(np.float32) for k, v in vecs.items()}


def hf_probs(logits, temperature, top_k, top_p, min_p):
    """Warpers as generate() adds them (do_sample=True, num_beams=1 => min_tokens_to_keep=1)."""
    scores = torch.tensor(logits, dtype=torch.float32)[None, :]
    ids = torch.zeros((1, 1), dtype=torch.long)
    procs = []
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    # generate adds MinP whenever min_p is not None; min_p == 0 removes nothing either way.
    if min_p > 0.0:
        procs.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    for p in procs:
        scores = p(ids, scores)
    probs = torch.softmax(scores, dim=-1)[0]
    return scores[0], probs


def tie_split(logits, kept_mask):
    """True if some finite logit value is both kept and removed."""
    kept = {float(v) for v, k in zip(logits, kept_mask) if k}
    removed = {float(v) for v, k in zip(logits, kept_mask) if not k and math.isfinite(v)}
    return bool(kept & removed)


def main():
    cases = []
    vectors = logit_vectors()
    grid = [
        (t, k, p, m)
        for t in (0.7, 1.0, 1.3)
        for k in (0, 5)
        for p in (1.0, 0.9)
        for m in (0.0, 0.05)
    ]
    extra = [(1.0, 2, 1.0, 0.0), (1.0, 0, 0.75, 0.0), (0.5, 50, 0.5, 0.2), (2.0, 0, 0.99, 0.01)]
    for name, logits in vectors.items():
        for t, k, p, m in grid + extra:
            t, p, m = f32(t), f32(p), f32(m)
            _, probs = hf_probs(logits, t, k, p, m)
            kept = (probs > 0).numpy()
            ids = [int(i) for i in np.nonzero(kept)[0]]
            cases.append(
                {
                    "name": f"{name}/t{t:.2f}/k{k}/p{p:.2f}/m{m:.2f}",
                    "vector": name,
                    "temperature": t,
                    "top_k": k,
                    "top_p": p,
                    "min_p": m,
                    "ids": ids,
                    "probs": [float(probs[i]) for i in ids],
                    "tie_split": tie_split(logits / np.float32(t), kept),
                }
            )
        # Greedy (do_sample=False): torch.argmax returns the first maximal index.
        am = int(torch.argmax(torch.tensor(logits)))
        cases.append(
            {
                "name": f"{name}/greedy",
                "vector": name,
                "temperature": 0.0,
                "top_k": 0,
                "top_p": 1.0,
                "min_p": 0.0,
                "ids": [am],
                "probs": [1.0],
                "tie_split": False,
            }
        )
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "generator": "scripts/make_sampling_fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "note": "vectors: f32 logits, null = -inf; cases name one; ids/probs: tokens with nonzero probability after HF warpers + softmax",
        "vectors": {n: [None if not math.isfinite(v) else float(v) for v in l] for n, l in vectors.items()},
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    n_split = sum(c["tie_split"] for c in cases)
    print(f"wrote {OUT}: {len(cases)} cases ({n_split} with tie splits), {os.path.getsize(OUT)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
