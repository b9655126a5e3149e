"""Experiment 1 (docs/results.md, section 1): language modelling at a fixed token budget.

    python3 experiments/lm_budget.py --config experiments/configs/lm_budget.json --out DIR
                                     [--scale toy] [--budget-s S | --steps N]

Trains, one after the other with `oryx train`'s loop (backends/cuda/oryx_torch/train.py), the same
architecture as
- a Transformer (fixed plan "attention"), a GDN-only and a Mamba-2-only model (fixed plan
  "recurrent"): the single-mixer baselines, each using only its own mode's weights;
- Oryx-GDN and Oryx-Mamba-2 with mixed training (the design's chunk sampler),
every model for the same number of steps on the same batches (same seed), so on the same
tokens. Held-out loss comes from the loop's final evaluation: the same validation windows
for every model, under each plan the model supports (baselines: their own plan).

With --budget-s the step count is chosen from a short throughput probe of the slowest
(mixed-mode) models, so that all models fit the budget; --steps fixes it instead (to rerun a
result exactly). Writes DIR/lm_budget.json (updated after every model) and one run
directory per model (log.jsonl, final checkpoint).
"""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from common import (environment, experiment_args, experiment_from_args, log, rerun_command, run_main,
                    steps_for_budget, write_json)

from oryx_core.spec import parameter_counts
from oryx_torch.train import config_from_dict, model_config, read_log, train

BASELINE_USED = {"attention": "attention_mode_total", "recurrent": "recurrent_mode_total", "mixed": "total"}


def model_spec(exp: dict, mixer: str) -> dict:
    return {**exp["model"], "mixer": mixer}


def used_parameters(exp: dict, entry: dict) -> dict:
    """Parameters the model actually uses: a fixed-plan baseline never touches the other mode's weights."""
    counts = parameter_counts(model_config(model_spec(exp, entry["mixer"]))[0])
    return {"used": counts[BASELINE_USED[entry["modes"]]], "total": counts["total"]}


def train_config(exp: dict, entry: dict, out: Path, steps: int, eval_plans: list[str]):
    return config_from_dict({
        "model": model_spec(exp, entry["mixer"]), "data": exp["data"], "out": str(out),
        "seq_len": exp["seq_len"], "batch_size": exp["batch_size"], "steps": steps,
        "lr": exp["lr"], "min_lr": exp["min_lr"], "warmup": max(1, round(exp["warmup_fraction"] * steps)),
        "weight_decay": exp["weight_decay"], "modes": entry["modes"], "mode_chunk": exp["mode_chunk"],
        "pure_share": exp["pure_share"], "eval_every": 0, "eval_batches": exp["eval_batches"],
        "eval_plans": eval_plans, "save_every": 0, "keep_checkpoints": 1, "log_every": exp["log_every"],
        "seed": exp["seed"], "compile": False, "progress": False,
    }, source=f"lm_budget:{entry['name']}")


def probe_rate(exp: dict, mixer: str, out: Path) -> float:
    """Training tokens/s of a mixed-mode model after its first log interval (kernel compilation excluded)."""
    entry = {"name": f"probe-{mixer}", "mixer": mixer, "modes": "mixed"}
    run_dir = out / f"probe-{mixer}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(train_config(exp, entry, run_dir, exp["probe_steps"], ["attention"]))
    rates = [r["tokens_per_s"] for r in read_log(run_dir) if "loss" in r][1:]
    shutil.rmtree(run_dir)
    if not rates:
        raise ValueError(f"probe_steps {exp['probe_steps']} must span at least two log intervals "
                         f"(log_every {exp['log_every']})")
    return statistics.median(rates)


def choose_steps(exp: dict, out: Path, budget_s: float, started: float, results: dict) -> int:
    mixers = sorted({m["mixer"] for m in exp["models"]})
    rates = {mixer: probe_rate(exp, mixer, out) for mixer in mixers}
    left = budget_s - (time.perf_counter() - started)
    per_model = left / len(exp["models"]) - exp["per_model_overhead_s"]
    tokens_per_step = exp["seq_len"] * exp["batch_size"]
    steps = steps_for_budget(per_model * exp["budget_safety"], min(rates.values()), tokens_per_step, exp["min_steps"])
    results["probe"] = {"tokens_per_s_mixed": rates, "seconds_per_model": per_model, "steps": steps}
    log(f"probe: mixed-mode tokens/s {rates}; {per_model:.0f} s per model -> {steps} steps")
    return steps


def run_model(exp: dict, entry: dict, out: Path, steps: int) -> dict:
    eval_plans = exp["oryx_eval_plans"] if entry["modes"] == "mixed" else [entry["modes"]]
    run_dir = out / entry["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = train(train_config(exp, entry, run_dir, steps, eval_plans))
    records = read_log(run_dir)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    all_rates = [r["tokens_per_s"] for r in records if "loss" in r]
    rates = all_rates[1:] or all_rates  # the first interval includes kernel compilation
    return {**entry, "parameters": used_parameters(exp, entry), "steps": summary["step"],
            "tokens": summary["step"] * exp["seq_len"] * exp["batch_size"], "wall_s": time.perf_counter() - started,
            "tokens_per_s": statistics.median(rates), "final_train_loss": summary["loss"],
            "eval_loss": summary["eval"], "loss_curve": losses,
            "checkpoint": str(Path(summary["checkpoint"]) / "model")}


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0], "experiments/configs/lm_budget.json")

    started = time.perf_counter()
    exp = experiment_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"experiment": "lm_budget", "config": args.config, "scale": args.scale, "settings": exp,
               "environment": environment(), "models": []}
    if args.budget_s:
        steps = choose_steps(exp, out, args.budget_s, started, results)
    else:
        steps = args.steps or exp["steps"]
    results["steps"] = steps
    results["command"] = rerun_command("lm_budget.py", args, steps)
    for entry in exp["models"]:
        log(f"training {entry['name']} ({entry['mixer']}, modes {entry['modes']}) for {steps} steps")
        record = run_model(exp, entry, out, steps)
        results["models"].append(record)
        write_json(out / "lm_budget.json", results)
        log(f"{entry['name']}: {record['wall_s']:.0f} s, {record['tokens_per_s']:,.0f} tok/s, eval {record['eval_loss']}")
    results["wall_s"] = time.perf_counter() - started
    write_json(out / "lm_budget.json", results)


if __name__ == "__main__":
    run_main(main)
