"""Experiment 2 (docs/results.md, section 2): multi-query associative recall against the share of attention-mode tokens.

    python3 experiments/mqar.py --config experiments/configs/mqar.json --out DIR
                                [--scale toy] [--budget-s S | --steps N]

Trains small models of one architecture on synthetic MQAR batches (oryx_core.mqar.make_mqar;
the loss is taken on the query targets only): a Transformer (fixed plan "attention"),
recurrent-only baselines (fixed plan "recurrent"), and Oryx models with mixed training. Every
model sees the same batches for the same number of steps.

A training batch mixes sequence lengths and numbers of key-value pairs; shorter sequences are
padded with filler (no targets) to one length, so every batch has the same shape. Oryx's mixed
training: the design's chunk sampler (with `mode_chunk`) for every sequence, except a share
`query_plan_share` of sequences that run the query-aligned plan below at a random share.

Evaluation, per (length, pairs) on fixed held-out batches: accuracy of the predicted value at
each queried key. For Oryx, under a share s of the (unpadded) tokens in attention mode:
- "query" placement: the queried keys first (a random subset if fewer slots than queries),
  remaining slots on the last tokens of the sequence (attention on the query span);
- "last" placement: simply the last s of the tokens, whatever the data (plan last:s%).
s = 0 is the all-recurrent plan and s = 1 the all-attention plan. Baselines: their own plan.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from common import (environment, experiment_args, experiment_from_args, log, rerun_command, run_main,
                    steps_for_budget, write_json)

from oryx_core.config import preset
from oryx_core.mqar import FILLER, IGNORE, make_mqar
from oryx_core.plan import sample_training_modes
from oryx_core.spec import parameter_counts

BASELINE_USED = {"attention": "attention_mode_total", "recurrent": "recurrent_mode_total", "mixed": "total"}


def model_cfg(exp: dict, mixer: str):
    return preset(exp["model"]["preset"], mixer, **exp["model"].get("overrides", {}))


def padded_mqar(rng, n: int, length: int, pairs: int, padded_length: int, vocab_size: int):
    """MQAR inputs/targets of `length` tokens, right-padded with filler (no targets) to padded_length."""
    batch = make_mqar(rng, n, length, pairs, vocab_size)
    pad = padded_length - length
    inputs = np.pad(batch.inputs, ((0, 0), (0, pad)), constant_values=FILLER)
    targets = np.pad(batch.targets, ((0, 0), (0, pad)), constant_values=IGNORE)
    return inputs, targets


def training_batch(rng, exp: dict, vocab_size: int):
    """inputs, targets [B, T] and the real length of each row, from the configured (length, pairs) mix."""
    settings = [(t, p) for t in exp["train_lengths"] for p in exp["train_pairs"] if 4 * p <= t]
    per_setting = np.bincount(rng.integers(0, len(settings), size=exp["batch_size"]), minlength=len(settings))
    parts = [padded_mqar(rng, int(n), t, p, exp["seq_len"], vocab_size) + (np.full(int(n), t),)
             for (t, p), n in zip(settings, per_setting) if n]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def query_aligned_modes(targets: np.ndarray, lengths: np.ndarray, share: float, rng) -> np.ndarray:
    """bool [B, T]: round(share * length) attention tokens per row, the queried keys first, then the last tokens."""
    modes = np.zeros(targets.shape, dtype=bool)
    for row, (target_row, length) in enumerate(zip(targets, lengths)):
        budget = int(round(share * length))
        queries = np.flatnonzero(target_row != IGNORE)
        if budget <= len(queries):
            modes[row, rng.choice(queries, size=budget, replace=False)] = True
            continue
        modes[row, queries] = True
        rest = [t for t in range(length - 1, -1, -1) if not modes[row, t]][:budget - len(queries)]
        modes[row, rest] = True
    return modes


def last_share_modes(lengths: np.ndarray, seq_len: int, share: float) -> np.ndarray:
    """bool [B, T]: the last round(share * length) unpadded tokens of each row (plan last:s%)."""
    position = np.arange(seq_len)[None, :]
    first = lengths[:, None] - np.round(share * lengths[:, None]).astype(int)
    return (position >= first) & (position < lengths[:, None])


def training_modes(entry: dict, exp: dict, targets, lengths, rng) -> np.ndarray:
    B, T = targets.shape
    if entry["modes"] != "mixed":
        return np.full((B, T), entry["modes"] == "attention")
    modes = sample_training_modes(rng, B, T, exp["mode_chunk"], exp["pure_share"])
    aligned = rng.random(B) < exp["query_plan_share"]
    if aligned.any():
        shares = rng.uniform(0.0, exp["query_plan_max_share"], size=B)
        for row in np.flatnonzero(aligned):
            modes[row] = query_aligned_modes(targets[row:row + 1], lengths[row:row + 1], shares[row], rng)[0]
    return modes


class Trainer:
    """The model, its optimizer and the device; `step` trains on one batch."""

    def __init__(self, exp: dict, entry: dict, steps: int):
        import torch

        from oryx_torch.model import OryxModel
        from oryx_torch.train import Runtime, TrainConfig, make_optimizer

        self.torch = torch
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = model_cfg(exp, entry["mixer"])
        self.model = OryxModel(self.cfg, seed=exp["seed"]).to(device)
        self.train_cfg = TrainConfig(model={}, data="", out="", lr=exp["lr"], min_lr=exp["min_lr"],
                                     warmup=max(1, round(exp["warmup_fraction"] * steps)),
                                     weight_decay=exp["weight_decay"])
        self.optimizer = make_optimizer(self.model, self.train_cfg, Runtime(0, 1, device))
        self.device, self.steps = device, steps
        # bf16 autocast on CUDA unless the experiment says "bf16": false
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and exp.get("bf16", True))

    def logits(self, inputs: np.ndarray, modes: np.ndarray):
        tokens = self.torch.from_numpy(inputs).to(self.device)
        with self.autocast:
            return self.model(tokens, self.torch.from_numpy(np.ascontiguousarray(modes)))

    def step(self, index: int, inputs, targets, modes) -> float:
        from oryx_torch.train import lr_at

        torch = self.torch
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.train_cfg, index, self.steps)
        logits = self.logits(inputs, modes)
        target = torch.from_numpy(targets).to(self.device)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def accuracy(self, inputs, targets, modes) -> tuple[int, int]:
        with self.torch.no_grad():
            predicted = self.logits(inputs, modes).argmax(-1).cpu().numpy()
        scored = targets != IGNORE
        return int((predicted[scored] == targets[scored]).sum()), int(scored.sum())


def train_model(exp: dict, entry: dict, steps: int) -> tuple[Trainer, list, list]:
    """Trains `steps` steps; returns the trainer, (step, loss) records and per-step seconds."""
    trainer = Trainer(exp, entry, steps)
    rng = np.random.default_rng([exp["seed"], 0])  # the same batches for every model
    mode_rng = np.random.default_rng([exp["seed"], 1])
    curve, times, pending = [], [], []
    trainer.model.train()
    for index in range(steps):
        started = time.perf_counter()
        inputs, targets, lengths = training_batch(rng, exp, trainer.cfg.vocab_size)
        modes = training_modes(entry, exp, targets, lengths, mode_rng)
        pending.append(trainer.step(index, inputs, targets, modes))
        if (index + 1) % exp["log_every"] == 0 or index + 1 == steps:
            curve.append((index + 1, float(trainer.torch.stack(pending).mean())))  # one host sync per interval
            pending = []
        times.append(time.perf_counter() - started)
    return trainer, curve, times


def eval_plans(entry: dict, exp: dict) -> list[tuple[str, float]]:
    if entry["modes"] != "mixed":
        return [("own", 1.0 if entry["modes"] == "attention" else 0.0)]
    plans = [("query", s) for s in exp["eval_shares"]]
    return plans + [("last", s) for s in exp["eval_shares"] if 0.0 < s < 1.0]


def eval_sets(exp: dict, seed: int, vocab_size: int):
    """(length, pairs, batches) for each evaluation length and each pair count that fits it (4 tokens a pair), the
    batches drawn from `seed`, the length and the pair count alone."""
    for length in exp["eval_lengths"]:
        for pairs in (p for p in exp["eval_pairs"] if 4 * p <= length):
            data_rng = np.random.default_rng([seed, 2, length, pairs])
            yield length, pairs, [padded_mqar(data_rng, exp["batch_size"], length, pairs, exp["seq_len"], vocab_size)
                                  for _ in range(exp["eval_batches"])]


def evaluate(trainer: Trainer, entry: dict, exp: dict) -> list[dict]:
    rows = []
    trainer.model.eval()
    for length, pairs, batches in eval_sets(exp, exp["seed"], trainer.cfg.vocab_size):
        lengths = np.full(exp["batch_size"], length)
        for placement, share in eval_plans(entry, exp):
            plan_rng = np.random.default_rng([exp["seed"], 3, length, pairs])
            correct = total = attention_tokens = 0
            for inputs, targets in batches:
                modes = (last_share_modes(lengths, exp["seq_len"], share) if placement == "last"
                         else query_aligned_modes(targets, lengths, share, plan_rng))
                hit, count = trainer.accuracy(inputs, targets, modes)
                correct, total = correct + hit, total + count
                attention_tokens += int(modes[:, :length].sum())
            rows.append({"length": length, "pairs": pairs, "placement": placement, "share": share,
                         "attention_share": attention_tokens / (length * exp["batch_size"] * len(batches)),
                         "accuracy": correct / total})
    return rows


def probe_seconds_per_step(exp: dict, mixers: list[str]) -> dict[str, float]:
    """Median seconds per training step of a mixed-mode model, after its first (compiling) steps."""
    seconds = {}
    for mixer in mixers:
        _, _, times = train_model(exp, {"name": f"probe-{mixer}", "mixer": mixer, "modes": "mixed"}, exp["probe_steps"])
        seconds[mixer] = statistics.median(times[len(times) // 2:])
    return seconds


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0], "experiments/configs/mqar.json")

    started = time.perf_counter()
    exp = experiment_from_args(args)
    out = Path(args.out)
    results = {"experiment": "mqar", "config": args.config, "scale": args.scale, "settings": exp,
               "environment": environment(), "models": []}
    if args.budget_s:
        seconds = probe_seconds_per_step(exp, sorted({m["mixer"] for m in exp["models"]}))
        left = args.budget_s - (time.perf_counter() - started)
        per_model = left / len(exp["models"]) - exp["per_model_overhead_s"]
        steps = steps_for_budget(per_model * exp["budget_safety"], 1.0 / max(seconds.values()), 1, exp["min_steps"])
        results["probe"] = {"seconds_per_step_mixed": seconds, "seconds_per_model": per_model, "steps": steps}
        log(f"mqar probe: s/step {seconds}; {per_model:.0f} s per model -> {steps} steps")
    else:
        steps = args.steps or exp["steps"]
    results["steps"] = steps
    results["command"] = rerun_command("mqar.py", args, steps)
    for entry in exp["models"]:
        log(f"mqar: training {entry['name']} for {steps} steps")
        model_started = time.perf_counter()
        trainer, curve, times = train_model(exp, entry, steps)
        train_s = time.perf_counter() - model_started
        counts = parameter_counts(trainer.cfg)
        rows = evaluate(trainer, entry, exp)
        results["models"].append({**entry, "parameters": {"used": counts[BASELINE_USED[entry["modes"]]],
                                                           "total": counts["total"]},
                                  "steps": steps, "train_s": train_s, "seconds_per_step": statistics.median(times),
                                  "loss_curve": curve, "eval": rows})
        write_json(out / "mqar.json", results)
        pure = {f"T{r['length']}/p{r['pairs']}/{'A' if r['share'] else 'R'}": round(r["accuracy"], 3)
                for r in rows if r["share"] in (0.0, 1.0)}
        log(f"mqar {entry['name']}: train {train_s:.0f} s, last loss {curve[-1][1]:.3f}, accuracy {pure}")
    results["wall_s"] = time.perf_counter() - started
    write_json(out / "mqar.json", results)


if __name__ == "__main__":
    run_main(main)
