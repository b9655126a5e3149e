"""Trains the embedded default model on every GPU of the machine (torchrun, DDP) in a time budget, then exports it.

    python3 experiments/train_default.py --out DIR [--config experiments/configs/default_model_train.json]
                                         [--budget-s S | --steps N] [--nproc N] [--scale toy]

The config is an `oryx train` config (plus a "scales" section for the CPU pretest). With
--budget-s, a short probe run under the same launch measures tokens/s and the fixed start-up
cost (process start, torch.compile), and the run gets the step count that fits what is left
(its cosine schedule then ends on time, which a run killed at a deadline would not);
--steps N reruns a result exactly. Then the final checkpoint is written as a default model
(bf16, with its tokenizer, max_context = seq_len) to DIR/default_model. DIR/train_default.json
holds the settings, the probe, the command that reruns it, the loss curve and the held-out losses.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, environment, load_experiment_config, log, run_main, steps_for_budget, write_json
from export_default import write_default

from oryx_core.cli import command_line


def launch(oryx: list[str], nproc: int) -> list[str]:
    """The `oryx` command line, under torchrun when several processes share the run."""
    if nproc <= 1:
        return oryx
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *oryx[1:]]


def train_run(command: list[str], config: Path, run_dir: Path, overrides: dict) -> float:
    """Runs `oryx train` to the end; returns its wall-clock seconds. A failed run is an error naming it."""
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [a for key, value in {"out": str(run_dir), **overrides}.items()
            for a in ("--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}")]
    started = time.perf_counter()
    done = subprocess.run([*command, "train", str(config), *sets], cwd=ROOT)
    if done.returncode != 0:
        raise ValueError(f"{run_dir}: `oryx train` exited with status {done.returncode}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/default_model_train.json")
    parser.add_argument("--scale", help="a smaller scale defined in the config (toy: the CPU pretest)")
    parser.add_argument("--out", required=True, help="output directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--budget-s", type=float, help="wall-clock seconds for probe, training and export")
    which.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    parser.add_argument("--nproc", type=int,
                        help="training processes, one per GPU (default: every visible GPU; without CUDA 1, gloo beyond)")
    parser.add_argument("--probe-steps", type=int, default=40)
    parser.add_argument("--reserve-s", type=float, default=45.0,
                        help="seconds kept for the run's evaluations, checkpoints and the export")
    parser.add_argument("--safety", type=float, default=0.95, help="share of the remaining seconds planned for")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    from oryx_torch.train import config_from_dict, latest_checkpoint, read_log

    nproc = args.nproc if args.nproc is not None else max(1, torch.cuda.device_count())
    if nproc < 1 or (torch.cuda.is_available() and torch.cuda.device_count() < nproc):
        raise ValueError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} CUDA devices")
    settings = load_experiment_config(args.config, args.scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "train_config.json"  # the resolved config (scale applied) that every run reads
    config.write_text(json.dumps(settings, indent=1) + "\n")
    command = launch(command_line(), nproc)
    tokens_per_step = config_from_dict(settings, args.config).tokens_per_step(nproc)
    results = {"experiment": "train_default", "config": args.config, "scale": args.scale, "settings": settings,
               "processes": nproc, "tokens_per_step": tokens_per_step, "environment": environment()}

    if args.budget_s:
        probe_dir = out / "probe"
        log_every = max(1, args.probe_steps // 5)
        probe_s = train_run(command, config, probe_dir, {
            "steps": args.probe_steps, "warmup": 1, "log_every": log_every, "eval_every": 0, "save_every": 0,
            "eval_batches": 1, "eval_plans": ["attention"], "progress": False})
        rates = [r["tokens_per_s"] for r in read_log(probe_dir) if "loss" in r][1:]
        if not rates:
            raise ValueError(f"--probe-steps {args.probe_steps}: too few for two log intervals")
        rate = statistics.median(rates)
        startup_s = max(0.0, probe_s - args.probe_steps * tokens_per_step / rate)
        left = args.budget_s - (time.perf_counter() - started) - startup_s - args.reserve_s
        steps = steps_for_budget(left * args.safety, rate, tokens_per_step, args.probe_steps)
        results["probe"] = {"steps": args.probe_steps, "tokens_per_s": rate, "wall_s": probe_s,
                            "startup_s": startup_s, "planned_train_s": left * args.safety}
        shutil.rmtree(probe_dir)
        log(f"probe: {rate:,.0f} tokens/s on {nproc} process(es), start-up {startup_s:.0f} s -> {steps} steps")
    else:
        steps = args.steps or settings["steps"]
    results["steps"] = steps
    results["command"] = (f"python3 experiments/train_default.py --config {args.config} --out OUT --steps {steps} "
                          f"--nproc {nproc}" + (f" --scale {args.scale}" if args.scale else ""))

    run_dir = out / "run"
    results["train_wall_s"] = train_run(command, config, run_dir, {"steps": steps})
    records = read_log(run_dir)
    trained = [r for r in records if "loss" in r]
    results.update({
        "tokens": steps * tokens_per_step,
        "tokens_per_s": statistics.median([r["tokens_per_s"] for r in trained[1:]] or [r["tokens_per_s"] for r in trained]),
        "loss_curve": [(r["step"], r["loss"]) for r in trained],
        "eval": [r for r in records if "eval" in r],
    })
    write_default(latest_checkpoint(run_dir) / "model", settings["seq_len"], out / "default_model")
    results["wall_s"] = time.perf_counter() - started
    write_json(out / "train_default.json", results)
    log(f"{steps} steps, {results['tokens']:,} tokens in {results['train_wall_s']:.0f} s; "
        f"held-out {results['eval'][-1]['eval'] if results['eval'] else None}")


if __name__ == "__main__":
    run_main(main)
