#!/usr/bin/env python3
"""Writes the reference-pipeline Parquet fixtures for tests/rank_cli.rs with pandas + pyarrow.

- tests/fixtures/oracles/ref_generated.parquet: the reference's `generated/iterN/train.parquet`
  shape (compute_prob.py `from_ranks`): `prompt`, `generate_0..2` as [{content, role}] user +
  assistant message lists, `probability` (K x K), `rm_scores`.
- tests/fixtures/oracles/ref_train.parquet: the reference's `synthetic_data_*/train.parquet`
  (`prepare_score`): `chosen`, `rejected` message lists and the three probabilities, no `prompt`.

Run: python3 scripts/make_rank_fixtures.py  (needs pandas and pyarrow).
"""
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "oracles"


def conv(prompt: str, answer: str) -> list:
    return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    prompts = ["What is 2+2?", "Name a colour."]
    answers = [["The answer is 4.", "I believe 4.", "Sure: 4"], ["Teal.", "Indigo.", "Scarlet."]]
    gen = pd.DataFrame({"prompt": prompts})
    for i in range(3):
        gen[f"generate_{i}"] = [conv(p, a[i]) for p, a in zip(prompts, answers)]
    gen["probability"] = [[[0.5] * 3] * 3] * 2
    gen["rm_scores"] = [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]
    gen.to_parquet(OUT / "ref_generated.parquet")

    train = pd.DataFrame(
        {
            "chosen": [conv(prompts[0], answers[0][1]), conv(prompts[1], answers[1][0])],
            "rejected": [conv(prompts[0], answers[0][0]), conv(prompts[1], answers[1][2])],
            "chosen_probs": [0.9, 0.7],
            "chosen_probs_win": [0.7, 0.6],
            "chosen_probs_lose": [0.3, 0.4],
        }
    )
    train.to_parquet(OUT / "ref_train.parquet", index=False)


if __name__ == "__main__":
    main()
