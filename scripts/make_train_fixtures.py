#!/usr/bin/env python3
"""Writes tests/fixtures/train/{losses,optim,schedules}.json: PyTorch/transformers references for
`sppo::train` (losses, optimizers, gradient clipping, learning-rate schedules).

- losses.json: per-pair SPPO/DPO/IPO losses (formulas of docs SPPO.md, which match uclaml/SPPO's
  trainer: sppo = ((a - eta(P_win - 1/2))^2 + (b - eta(P_lose - 1/2))^2) / 2, ...) and their
  gradients w.r.t. the two policy log-probs from torch autograd in float64, on random inputs
  including large DPO margins (|beta (a - b)| up to ~800, where a naive log(sigmoid) overflows).
- optim.json: 20 steps of the Trainer's inner loop (clip_grad_norm_ -> optimizer.step() ->
  lr_scheduler.step()) with torch.optim.AdamW / RMSprop (foreach=False: the single-tensor path,
  which is what CPU tensors get by default) on ~1000 float32 parameters split over three tensors,
  with fixed random gradients per step. Parameters after every step, the pre-clip norm of every
  step, and the lr each step used are stored. Float arrays are base64 of little-endian f32.
  Also standalone clip_grad_norm_ cases.
- schedules.json: transformers' get_scheduler("linear" | "cosine" | "constant_with_warmup")
  with warm-up steps from TrainingArguments.get_warmup_steps(total) (transformers 5: a
  `warmup_steps` below 1 is a ratio, ceil(total * ratio)), recording the lr the optimizer holds
  before each optimizer step, as the Trainer applies it (step k uses lambda(k); the first step
  uses lambda(0), which is 0 whenever there is a warm-up).

Run: .venv/bin/python scripts/make_train_fixtures.py   (from the repository root)
"""

import base64
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import TrainingArguments, get_scheduler

VERSION = 1
OUT_DIR = os.path.join("tests", "fixtures", "train")


def b64_f32(x):
    arr = np.ascontiguousarray(np.asarray(x, dtype="<f4"))
    return base64.b64encode(arr.tobytes()).decode("ascii")


def hf_warmup_steps(warmup, total):
    """transformers' own TrainingArguments.get_warmup_steps, called on a stand-in object: building
    a real TrainingArguments needs `accelerate`, which the shared venv lacks, and the method reads
    only `self.warmup_steps`."""
    return TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=warmup), total)


# ---------------------------------------------------------------- losses
def torch_pair_loss(kind, beta, pc, pr, rc, rr, p_wl, p_win, p_lose):
    """One pair, float64, as uclaml/SPPO's trainer and TRL's DPOTrainer compute it."""
    a = pc - rc
    b = pr - rr
    eta = 1.0 / beta
    if kind == "sppo":
        return ((a - eta * (p_win - 0.5)) ** 2 + (b - eta * (p_lose - 0.5)) ** 2) / 2
    if kind == "sppo_single":
        return ((a - eta * (p_wl - 0.5)) ** 2 + (b + eta * (p_wl - 0.5)) ** 2) / 2
    if kind == "sppo_hard":
        return (a - 0.5 * eta) ** 2 + (b + 0.5 * eta) ** 2
    if kind == "dpo":
        return -F.logsigmoid(beta * (a - b))
    if kind == "ipo":
        return ((a - b) - 1 / (2 * beta)) ** 2
    raise ValueError(kind)


def loss_cases():
    rng = np.random.default_rng(20250107)
    cases = []
    kinds = ["sppo", "sppo_single", "sppo_hard", "dpo", "ipo"]
    for beta in (0.001, 0.01, 0.1, 1.0):
        for i in range(12):
            ref_c, ref_r = rng.uniform(-400, -20, 2)
            # log-ratios from 0 (first step of an iteration) to a few hundred nats.
            scale = [0.0, 0.5, 5.0, 50.0, 400.0][i % 5]
            a, b = rng.normal(0, 1, 2) * scale
            pc, pr = ref_c + a, ref_r + b
            p_win, p_lose, p_wl = rng.uniform(0, 1, 3)
            for kind in kinds:
                t_pc = torch.tensor(pc, dtype=torch.float64, requires_grad=True)
                t_pr = torch.tensor(pr, dtype=torch.float64, requires_grad=True)
                loss = torch_pair_loss(kind, beta, t_pc, t_pr, ref_c, ref_r, p_wl, p_win, p_lose)
                loss.backward()
                cases.append(
                    {
                        "kind": kind,
                        "beta": beta,
                        "policy_chosen": pc,
                        "policy_rejected": pr,
                        "ref_chosen": ref_c,
                        "ref_rejected": ref_r,
                        "chosen_probs": p_wl,
                        "chosen_probs_win": p_win,
                        "chosen_probs_lose": p_lose,
                        "loss": loss.item(),
                        "d_policy_chosen": t_pc.grad.item(),
                        "d_policy_rejected": t_pr.grad.item(),
                    }
                )
    return cases


# ---------------------------------------------------------------- optimizers
N_STEPS = 20
SIZES = [400, 350, 250]  # three parameter tensors, concatenated into one flat buffer in Rust


def make_grads(rng):
    """(N_STEPS, sum(SIZES)) f32; per-step scales so that max_norm 1 clips some steps, not others."""
    n = sum(SIZES)
    scales = rng.choice([0.003, 0.02, 0.3, 2.0], N_STEPS)
    g = rng.normal(0, 1, (N_STEPS, n)) * scales[:, None]
    return g.astype(np.float32)


OPT_CASES = [
    # name, optimizer, kwargs, schedule, warmup (transformers warmup_steps: <1 is a ratio), max_grad_norm
    ("adamw_wd0_linear", "adamw", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), "linear", 0.1, 0.0),
    ("adamw_wd0.1_cosine_clip1", "adamw", dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1), "cosine", 0.1, 1.0),
    ("rmsprop_wd0_linear_clip1", "rmsprop", dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.0), "linear", 0.1, 1.0),
    ("rmsprop_wd0.01_constant", "rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-6, weight_decay=0.01), "constant_with_warmup", 0.2, 0.0),
]


def run_opt_case(p0, grads, opt_name, kwargs, sched, warmup, max_norm):
    params = [torch.nn.Parameter(t.clone()) for t in torch.split(torch.from_numpy(p0.copy()), SIZES)]
    if opt_name == "adamw":
        opt = torch.optim.AdamW(params, foreach=False, **kwargs)
    else:
        opt = torch.optim.RMSprop(params, foreach=False, **kwargs)
    warmup_steps = hf_warmup_steps(warmup, N_STEPS)
    scheduler = get_scheduler(sched, opt, num_warmup_steps=warmup_steps, num_training_steps=N_STEPS)
    traj, norms, lrs = [], [], []
    for k in range(N_STEPS):
        for p, g in zip(params, torch.split(torch.from_numpy(grads[k].copy()), SIZES)):
            p.grad = g.clone()
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        norms.append(float(norm))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
        traj.append(torch.cat([p.detach() for p in params]).numpy().copy())
    return warmup_steps, np.stack(traj), norms, lrs


def optim_fixture():
    rng = np.random.default_rng(42)
    n = sum(SIZES)
    p0 = rng.uniform(-1, 1, n).astype(np.float32)
    grads = make_grads(rng)
    cases = []
    for name, opt_name, kwargs, sched, warmup, max_norm in OPT_CASES:
        warmup_steps, traj, norms, lrs = run_opt_case(p0, grads, opt_name, kwargs, sched, warmup, max_norm)
        case = {
            "name": name,
            "optimizer": opt_name,
            "lr": kwargs["lr"],
            "eps": kwargs["eps"],
            "weight_decay": kwargs["weight_decay"],
            "schedule": sched,
            "warmup": warmup,
            "warmup_steps": warmup_steps,
            "max_grad_norm": max_norm,
            "grad_norms": norms,
            "lrs": lrs,
            "params": b64_f32(traj),  # (steps, n): parameters after each step
        }
        if opt_name == "adamw":
            case["beta1"], case["beta2"] = kwargs["betas"]
        else:
            case["alpha"] = kwargs["alpha"]
        cases.append(case)

    clip_cases = []
    for i, (scale, max_norm) in enumerate([(0.01, 1.0), (1.0, 1.0), (1.0, 0.05), (50.0, 1.0), (1e-4, 1e-3)]):
        g = (rng.normal(0, 1, n) * scale).astype(np.float32)
        ts = [t.clone() for t in torch.split(torch.from_numpy(g.copy()), SIZES)]
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in ts]
        for p, t in zip(params, ts):
            p.grad = t
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        clip_cases.append(
            {
                "max_norm": max_norm,
                "grads": b64_f32(g),
                "norm": float(norm),
                "clipped": b64_f32(torch.cat([p.grad for p in params]).numpy()),
            }
        )
    return {
        "n": n,
        "steps": N_STEPS,
        "sizes": SIZES,
        "params0": b64_f32(p0),
        "grads": b64_f32(grads),  # (steps, n), before clipping
        "cases": cases,
        "clip": clip_cases,
    }


# ---------------------------------------------------------------- schedules
def schedules_fixture():
    cases = []
    grid = [(3, 0.1), (10, 0.1), (1000, 0.1), (7, 0.25), (20, 0.0), (100, 0.05), (1, 0.1), (2, 0.5), (37, 0.3), (64, 5.0)]
    base_lr = 5e-7
    for total, warmup in grid:
        warmup_steps = hf_warmup_steps(warmup, total)
        for kind in ("linear", "cosine", "constant_with_warmup"):
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.SGD([p], lr=base_lr)
            sched = get_scheduler(kind, opt, num_warmup_steps=warmup_steps, num_training_steps=total)
            lrs = []
            for _ in range(total):
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
            cases.append(
                {"kind": kind, "total_steps": total, "warmup": warmup, "warmup_steps": warmup_steps, "base_lr": base_lr, "lrs": lrs}
            )
    return cases


def write(name, doc):
    path = os.path.join(OUT_DIR, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    if not os.path.isdir("tests"):
        sys.exit("run from the repository root")
    os.makedirs(OUT_DIR, exist_ok=True)
    meta = {"version": VERSION, "torch": torch.__version__, "transformers": transformers.__version__}
    torch.manual_seed(0)
    write("losses.json", {"format": "sppo-train-losses", **meta, "cases": loss_cases()})
    write("optim.json", {"format": "sppo-train-optim", **meta, **optim_fixture()})
    write("schedules.json", {"format": "sppo-train-schedules", **meta, "cases": schedules_fixture()})


if __name__ == "__main__":
    main()
