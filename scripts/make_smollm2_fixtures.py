"""Reference log-probs of SmolLM2-135M-Instruct (converted from the shipped GGUF by `sppo convert`)
for text inputs, tokenized the way TRL's DPO trainer does: the prompt rendered with the chat
template and the generation prompt, the response tokenized on its own and closed with EOS.

Usage: .venv/bin/python scripts/make_smollm2_fixtures.py [MODEL_DIR]
(default MODEL_DIR: .cache/models/SmolLM2-135M-Instruct, written by scripts/demo).
Writes tests/fixtures/smollm2/logprobs.json (format_version 1)."""
import json, sys, pathlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

root = pathlib.Path(__file__).resolve().parent.parent
model_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else root / ".cache/models/SmolLM2-135M-Instruct"
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()

examples = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Write a haiku about autumn rain.", "response": "Grey rain on the leaves,\nthe maple lets go its red."},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2 = ?"},
                  {"role": "assistant", "content": "4"}]},
]
out = []
for ex in examples:
    if "messages" in ex:
        prompt_msgs, response = ex["messages"][:-1], ex["messages"][-1]["content"]
    else:
        prompt_msgs, response = [{"role": "user", "content": ex["prompt"]}], ex["response"]
    prompt_ids = tok.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(prompt_ids, dict):
        prompt_ids = prompt_ids["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([list(prompt_ids) + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    token_lp = lp[len(prompt_ids) - 1:]
    out.append({"input": ex, "prompt_ids": list(prompt_ids), "response_ids": response_ids,
                "token_logprobs": token_lp.tolist(), "sum_logprob": float(token_lp.sum())})
path = root / "tests/fixtures/smollm2/logprobs.json"
path.write_text(json.dumps({"format_version": 1, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised f32)",
                            "examples": out}, indent=1))
print(f"wrote {path}: " + ", ".join(f"{e['sum_logprob']:.4f}" for e in out))
