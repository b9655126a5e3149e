"""Experiment 3 (docs/results.md, section 3): the cost of switching modes along a sequence.

    python3 experiments/switching.py --lm-results DIR/lm_budget.json --out DIR
                                     [--config experiments/configs/switching.json] [--scale toy]

For every Oryx model that experiment 1 trained, scores the same held-out windows under the
pure plans and under plans that switch once (A->R, R->A), twice (A->R->A) and many times
(every:2:C). Besides each plan's mean loss, it reports the loss the pure plans would give on
the same tokens (each token scored by the pure plan of its own mode, at its own position):
the difference is the switching cost. A per-position loss curve (mean over windows, averaged
in buckets) goes to the results for the plots. Writes DIR/switching.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import environment, load_experiment_config, log, run_main, write_json

from oryx_data import TokenShards
from oryx_core.plan import ModePlan


def plan_text(template: str, length: int) -> str:
    """Spans written as fractions of the window: {q1}, {h}, {q3} are 1/4, 1/2 and 3/4 of its length."""
    return template.format(q1=length // 4, h=length // 2, q3=3 * length // 4)


def token_losses(model, windows: np.ndarray, modes: np.ndarray, batch_size: int) -> np.ndarray:
    """Next-token NLL [N, T] of windows [N, T+1] under modes bool [T]."""
    import torch

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    losses = []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            chunk = torch.from_numpy(windows[start:start + batch_size]).to(model.device)
            with autocast:
                logits = model(chunk[:, :-1], torch.from_numpy(modes))
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")
            losses.append(nll.cpu().numpy())
    return np.concatenate(losses)


def score_model(checkpoint: str, exp: dict, windows: np.ndarray) -> dict:
    import torch

    from oryx_torch.model import OryxModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = OryxModel.from_checkpoint(checkpoint, dtype=torch.float32, device=device).eval()
    length = windows.shape[1] - 1
    curves, plans = {}, []
    for template in exp["plans"]:
        text = plan_text(template, length)
        modes = ModePlan.parse(text).resolve(length)
        curve = token_losses(model, windows, modes, exp["batch_size"]).mean(0)
        curves[text] = curve
        plans.append((text, modes))
    attention, recurrent = curves["attention"], curves["recurrent"]
    rows = []
    def bucketed(curve):
        return [round(float(x), 4) for x in curve.reshape(-1, exp["curve_bucket"]).mean(1)]

    for text, modes in plans:
        pure = np.where(modes, attention, recurrent)
        switches = int(np.count_nonzero(modes[1:] != modes[:-1]))
        rows.append({"plan": text, "switches": switches, "attention_share": float(modes.mean()),
                     "loss": float(curves[text].mean()), "pure_plan_loss": float(pure.mean()),
                     "switch_cost": float(curves[text].mean() - pure.mean()),
                     "perplexity": float(np.exp(curves[text].mean())),
                     "curve": bucketed(curves[text]), "cost_curve": bucketed(curves[text] - pure)})
    return {"plans": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/switching.json")
    parser.add_argument("--scale", help="a smaller scale defined in the config (toy: the CPU pretest)")
    parser.add_argument("--lm-results", required=True, help="lm_budget.json written by experiments/lm_budget.py")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()

    exp = load_experiment_config(args.config, args.scale)
    lm = json.loads(Path(args.lm_results).read_text())
    val = TokenShards(Path(lm["settings"]["data"]), "val")
    windows = val.sample_windows(np.random.default_rng([exp["seed"], 7]), exp["windows"], exp["seq_len"] + 1)
    results = {"experiment": "switching", "config": args.config, "scale": args.scale, "settings": exp,
               "environment": environment(), "tokens_per_plan": int(windows.shape[0] * exp["seq_len"]),
               "command": "python3 experiments/switching.py --lm-results OUT/lm_budget.json --out OUT"
                          + (f" --scale {args.scale}" if args.scale else ""), "models": []}
    for entry in (m for m in lm["models"] if m["modes"] == "mixed"):
        log(f"switching: scoring {entry['name']}")
        results["models"].append({"name": entry["name"], **score_model(entry["checkpoint"], exp, windows)})
        write_json(Path(args.out) / "switching.json", results)
    for model in results["models"]:
        for row in model["plans"]:
            log(f"{model['name']:12s} {row['plan']:28s} loss {row['loss']:.4f} cost {row['switch_cost']:+.4f}")


if __name__ == "__main__":
    run_main(main)
