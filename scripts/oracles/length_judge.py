#!/usr/bin/env python3
"""A tiny `command:` oracle for sppo: prefers longer responses.

Speaks the JSONL protocol of src/oracle/command.rs: reads one request per line
({"id", "prompt", "responses", "reference"?}) and answers each with
{"id": ..., "scores": [...]}, score_i = ln(1 + number of characters of response i).
sppo reads scores as Bradley-Terry logits, so P(i > j) = (1 + len_i) / (2 + len_i + len_j).

    sppo rank --oracle 'command:"python3 scripts/oracles/length_judge.py"' \
        --in generations.jsonl --out ranked.jsonl

A PairRM-style judge has the same shape: load the model once at start-up, then loop over
stdin; reply with "matrix" (K x K probabilities) instead of "scores" for a pairwise model.
Log to stderr only: stdout carries the replies. Exits when stdin closes.
"""
import json
import math
import sys


def main() -> None:
    for line in iter(sys.stdin.readline, ""):
        if not line.strip():
            continue
        req = json.loads(line)
        scores = [math.log1p(len(r)) for r in req["responses"]]
        sys.stdout.write(json.dumps({"id": req.get("id"), "scores": scores}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
