"""PyTorch side of benches/reward.rs: LlamaForSequenceClassification with the SmolLM2-135M shape
(random weights, f32, eager attention, no_grad) scoring the token sequences in IDS_JSON (a list of id
lists, written by the Rust bench). Sequences are sorted by length and right-padded in batches of
--batch with an attention mask (the pad id 2 also occurs mid-text in ChatML; transformers pools at the
rightmost non-pad token, which for these inputs is the last real token). Prints one JSON line."""
import argparse, json, time
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

ap = argparse.ArgumentParser()
ap.add_argument("ids_json")
ap.add_argument("--batch", type=int, default=32)
a = ap.parse_args()
seqs = json.load(open(a.ids_json))

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000,
                  max_position_embeddings=8192, tie_word_embeddings=True, num_labels=1, pad_token_id=2,
                  attn_implementation="eager")
model = LlamaForSequenceClassification(cfg).float().eval()
order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))

def run(indices):
    out = {}
    with torch.no_grad():
        for s in range(0, len(indices), a.batch):
            chunk = indices[s:s + a.batch]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), width), 2, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, :len(seqs[i])] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            for r, i in enumerate(chunk):
                out[i] = float(logits[r])
    return out

run(order[:5])  # warm-up
t = time.perf_counter()
rewards = run(order)
secs = time.perf_counter() - t
assert len(rewards) == len(seqs) and all(v == v for v in rewards.values())
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": a.batch, "seconds": secs,
                  "sequences": len(seqs)}))
