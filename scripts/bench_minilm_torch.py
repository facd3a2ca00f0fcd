"""sentence-transformers side of benches/oracles.rs: the same texts scored the same way (cosine of
each response's embedding to its prompt's reference), on the CPU, f32, in the same run.

Input: a JSON file {"prompts": [{"reference": str, "responses": [str, ...]}, ...]}.
Prints one JSON line: {"responses_per_s", "seconds", "threads", versions, "scores": [[...], ...]}.
"""
import argparse, json, time

import torch
from sentence_transformers import SentenceTransformer
import sentence_transformers

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--input", required=True)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--batch-size", type=int, default=64)
a = ap.parse_args()

data = json.load(open(a.input))["prompts"]
texts = []
for p in data:
    texts.append(p["reference"])
    texts.extend(p["responses"])
model = SentenceTransformer(a.model, device="cpu")


def score():
    # encode() tokenises, sorts by length, pads per batch, pools and normalises, as users call it.
    e = model.encode(texts, batch_size=a.batch_size, convert_to_tensor=True, normalize_embeddings=True)
    out, at = [], 0
    for p in data:
        ref, resp = e[at], e[at + 1 : at + 1 + len(p["responses"])]
        out.append(torch.nn.functional.cosine_similarity(resp, ref[None], dim=-1).tolist())
        at += 1 + len(p["responses"])
    return out


with torch.inference_mode():
    scores = score()  # warm-up
    t = time.perf_counter()
    for _ in range(a.reps):
        score()
    dt = (time.perf_counter() - t) / a.reps
n = sum(len(p["responses"]) for p in data)
print(json.dumps({"responses_per_s": n / dt, "seconds": dt, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
                  "batch_size": a.batch_size, "scores": scores}))
