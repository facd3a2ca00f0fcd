"""PyTorch + transformers side of benches/cpu_model.rs: the same shapes on the CPU, f32, random
weights with the SmolLM2-135M architecture. Prints one JSON line of tokens/s."""
import argparse, json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--gen-batch", type=int, default=8)
ap.add_argument("--gen-prompt", type=int, default=32)
ap.add_argument("--gen-new", type=int, default=64)
ap.add_argument("--reps", type=int, default=3)
a = ap.parse_args()

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000,
                  max_position_embeddings=8192, tie_word_embeddings=True)
model = LlamaForCausalLM(cfg).float().eval()
ids = torch.randint(0, 49152, (a.batch, a.seq))
n = a.batch * a.seq

def timed(f, reps):
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps

def fwd():
    with torch.no_grad():
        model(ids).logits

def fwdbwd():
    # Summed response log-probs (second half of each sequence), as the Rust side computes.
    model.zero_grad(set_to_none=False)
    logits = model(ids).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp[:, a.seq // 2 - 1:].sum().backward()

t_f = timed(fwd, a.reps)
t_fb = timed(fwdbwd, a.reps)
prompts = torch.randint(0, 49152, (a.gen_batch, a.gen_prompt))
def gen():
    with torch.no_grad():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=0.7, top_p=0.9,
                       max_new_tokens=a.gen_new, min_new_tokens=a.gen_new, pad_token_id=0)
t_g = timed(gen, 3)
# The peer of sppo's --decode-weights bf16: the same generate with the model in bf16.
model = model.to(torch.bfloat16)
t_g16 = timed(gen, 3)
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "forward": n / t_f,
                  "forward_backward": n / t_fb, "sampling": a.gen_batch * a.gen_new / t_g,
                  "sampling_bf16": a.gen_batch * a.gen_new / t_g16}))
