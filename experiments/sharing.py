"""Sharing ablation: which input projections the attention and recurrent modes share, at equal tokens.

    python3 experiments/sharing.py --out DIR [--config experiments/configs/sharing.json] [--scale toy]
                                   [--budget-s S | --steps N] [--workers W] [--seeds S ...]
                                   [--mixers gdn mamba2] [--sharings kv none qkv]

For each mixer (GDN, Mamba-2), each `sharing` of the model config and each seed, trains the config's
preset (20m) with mixed training (the design's chunk sampler) by `oryx train`'s loop:
- "kv": the design's block (both modes read the same keys and values, each has its own query);
- "none": each mode has its own query, keys and values (two full mixers sharing only the MLPs,
  norms, embeddings and the output path: gate, output norm and projection);
- "qkv": one query, keys and values for both modes.
Each mode computes the same function with the same number of weights in all three; only what is
tied differs. Every run of a seed sees the same batches and modes, and every run trains for the
same number of steps (equal tokens).

Held-out loss per plan (attention, recurrent, mixed) on ONE validation set for every run: `eval_windows`
non-overlapping windows of seq_len + 1 tokens at evenly spaced places of the val split (all of them
when 0), the mixed plan's modes drawn once by the design's sampler from `eval_modes_seed`.

Runs go side by side to `workers` processes on the one device (experiments/parallel_jobs.py), seed
by seed. With --budget-s the step count comes from a probe of the slowest variant (sharing "none")
run by all workers at once, so that the whole experiment fits S seconds. Writes DIR/sharing.json
(rewritten after every run: settings, the exact rerun command, device and date, each run's
parameter counts, tokens/s and held-out loss, the means over seeds); checkpoints are removed.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import signal
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from common import environment, load_experiment_config, log, run_main, steps_for_budget, write_json
from parallel_jobs import job_pool, run_all, run_jobs, side_by_side

from oryx_core.cli import OneLineErrorParser
from oryx_core.config import MIXERS, SHARINGS

RESULTS_NAME = "sharing.json"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/sharing.json")
    parser.add_argument("--scale", help="a smaller scale defined in the config (toy: the CPU pretest)")
    parser.add_argument("--out", required=True, help="output directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--budget-s", type=positive_float, help="wall-clock seconds for the whole experiment (probe included)")
    which.add_argument("--steps", type=positive_int, help="optimizer steps per run (default: the config's)")
    parser.add_argument("--workers", type=int, help="processes training side by side (0: in this process)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S")
    parser.add_argument("--mixers", nargs="+", choices=MIXERS)
    parser.add_argument("--sharings", nargs="+", choices=SHARINGS)
    return parser.parse_args(argv)


def experiment(args: argparse.Namespace) -> dict:
    exp = load_experiment_config(args.config, args.scale)
    for key in ("seeds", "mixers", "sharings", "workers"):
        if getattr(args, key) is not None:
            exp[key] = getattr(args, key)
    if exp["workers"] < 0:
        raise ValueError(f"--workers must be >= 0, got {exp['workers']}")
    for key in ("seeds", "mixers", "sharings"):
        if len(set(exp[key])) != len(exp[key]):
            raise ValueError(f"--{key}: {exp[key]} names one twice")
    for sharing in exp["sharings"]:
        if sharing not in SHARINGS:
            raise ValueError(f"{args.config}: sharing {sharing!r} is not one of {SHARINGS}")
    data = Path(exp["data"])
    if not (data / "meta.json").is_file():
        raise FileNotFoundError(f"data: {data}: no token shards (meta.json); build them as docs/data.md says")
    return exp


def run_name(run: dict) -> str:
    return f"{run['mixer']}-{run['sharing']}-seed{run['seed']}"


def model_spec(exp: dict, run: dict) -> dict:
    overrides = {**exp["model"].get("overrides", {}), "sharing": run["sharing"]}
    return {**exp["model"], "mixer": run["mixer"], "overrides": overrides}


# ----- the one validation set -----
def validation_set(exp: dict) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Windows int64 [N, seq_len + 1] at evenly spaced, non-overlapping places of the val split; the modes of
    each eval plan, bool [N, seq_len]; and a description with a digest of both (equal for every run)."""
    from oryx_core.plan import ModePlan, sample_training_modes
    from oryx_data import TokenShards

    val = TokenShards(exp["data"], "val")
    width = exp["seq_len"] + 1
    slots = len(val) // width
    if slots == 0:
        raise ValueError(f"data: the val split of {exp['data']} has {len(val)} tokens, fewer than seq_len + 1 = {width}")
    n = slots if not exp["eval_windows"] else min(slots, exp["eval_windows"])
    starts = np.floor(np.linspace(0, slots - 1, n)).astype(np.int64) * width
    windows = np.stack([val.window(int(s), width) for s in starts])
    length = exp["seq_len"]
    modes = {}
    for plan in exp["eval_plans"]:
        if plan == "mixed":
            rng = np.random.default_rng(exp["eval_modes_seed"])
            modes[plan] = sample_training_modes(rng, n, length, exp["mode_chunk"], exp["pure_share"])
        else:
            modes[plan] = np.broadcast_to(ModePlan.parse(plan).resolve(length), (n, length)).copy()
    digest = hashlib.sha256(windows.tobytes())
    for plan in exp["eval_plans"]:
        digest.update(plan.encode() + np.packbits(modes[plan]).tobytes())
    about = {"windows": n, "window_tokens": width, "scored_tokens": n * length, "val_split_tokens": len(val),
             "placement": "evenly spaced, non-overlapping", "mixed_modes_seed": exp["eval_modes_seed"],
             "sha256": digest.hexdigest()}
    return windows, modes, about


def evaluate(model, windows: np.ndarray, modes: dict[str, np.ndarray], batch: int) -> dict[str, float]:
    """Mean next-token loss (nats) per plan over every window, in batches, bf16 autocast on CUDA (as in training)."""
    import torch

    from oryx_torch.train import Runtime, batch_loss

    device = model.device
    rt = Runtime(0, 1, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    losses = {}
    model.eval()
    with torch.no_grad():
        for plan, plan_modes in modes.items():
            total = torch.zeros((), device=device, dtype=torch.float64)
            for start in range(0, len(windows), batch):
                rows = windows[start:start + batch]
                total += batch_loss(model, rows, plan_modes[start:start + batch], rt, autocast, len(rows)).double() * len(rows)
            losses[plan] = float(total) / len(windows)
    return losses


def first_batch_digest(exp: dict, seed: int) -> str:
    """sha256 of the first training batch (windows and modes) a run of this seed draws: equal for every sharing."""
    from oryx_core.plan import sample_training_modes
    from oryx_torch.train import TRAIN_STREAM, batch_rng, open_split

    rng = batch_rng(seed, TRAIN_STREAM, 0, 0, 0)
    windows = open_split(Path(exp["data"]), "train").sample_windows(rng, exp["batch_size"], exp["seq_len"] + 1)
    modes = sample_training_modes(rng, exp["batch_size"], exp["seq_len"], exp["mode_chunk"], exp["pure_share"])
    return hashlib.sha256(windows.tobytes() + np.packbits(modes).tobytes()).hexdigest()


# ----- one run (in a worker process) -----
def train_config(exp: dict, run: dict, run_dir: Path, steps: int):
    from oryx_torch.train import config_from_dict

    return config_from_dict({
        "model": model_spec(exp, run), "data": exp["data"], "out": str(run_dir),
        "seq_len": exp["seq_len"], "batch_size": exp["batch_size"], "steps": steps,
        "lr": exp["lr"], "min_lr": exp["min_lr"], "warmup": max(1, round(exp["warmup_fraction"] * steps)),
        "weight_decay": exp["weight_decay"], "modes": "mixed", "mode_chunk": exp["mode_chunk"],
        "pure_share": exp["pure_share"], "eval_every": 0, "eval_batches": 1, "eval_plans": ["attention"],
        "save_every": 0, "keep_checkpoints": 1, "log_every": exp["log_every"], "seed": run["seed"],
        "compile": False, "progress": False,
    }, source=f"sharing:{run_name(run)}")


def train_run(job: dict) -> dict:
    """Trains one (mixer, sharing, seed) run, then scores it on the validation set; the checkpoint is removed."""
    import torch

    from oryx_core.spec import parameter_counts
    from oryx_torch.model import OryxModel
    from oryx_torch.train import model_config, read_log, train

    exp, run, steps = job["exp"], job["run"], job["steps"]
    run_dir = Path(job["out"]) / "runs" / run_name(run)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = train(train_config(exp, run, run_dir, steps))
    train_s = time.perf_counter() - started
    records = read_log(run_dir)
    windows, modes, about = validation_set(exp)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = OryxModel.from_checkpoint(summary["model"], dtype=torch.float32, device=device)
    eval_loss = evaluate(model, windows, modes, exp["batch_size"])
    del model
    shutil.rmtree(run_dir, ignore_errors=True)
    rates = [r["tokens_per_s"] for r in records if "loss" in r]
    counts = parameter_counts(model_config(model_spec(exp, run))[0])
    return {**run, "name": run_name(run), "steps": summary["step"],
            "tokens": summary["step"] * exp["seq_len"] * exp["batch_size"],
            "parameters": {k: v for k, v in counts.items()},
            "tokens_per_s": statistics.median(rates[1:] or rates),  # the first interval includes start-up
            "train_s": train_s, "wall_s": time.perf_counter() - started, "final_train_loss": summary["loss"],
            "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in records), default=0.0),
            "eval_loss": eval_loss, "eval_ppl": {plan: math.exp(loss) for plan, loss in eval_loss.items()},
            "loss_curve": [(r["step"], r["loss"]) for r in records if "loss" in r],
            "validation_sha256": about["sha256"], "first_batch_sha256": first_batch_digest(exp, run["seed"]),
            "environment": environment()}


def probe_run(job: dict) -> dict:
    """Training tokens/s of the slowest variant while every worker probes at once (first log interval excluded)."""
    from oryx_torch.train import read_log, train

    exp = job["exp"]
    run_dir = Path(job["out"]) / "runs" / f"probe-{job['index']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(train_config(exp, job["run"], run_dir, exp["probe_steps"]))
    rates = [r["tokens_per_s"] for r in read_log(run_dir) if "loss" in r][1:]
    shutil.rmtree(run_dir, ignore_errors=True)
    if not rates:
        raise ValueError(f"probe_steps {exp['probe_steps']} must span at least two log intervals "
                         f"(log_every {exp['log_every']})")
    return {**job["run"], "tokens_per_s": statistics.median(rates)}


def choose_steps(exp: dict, pool, out: Path, n_runs: int, budget_s: float, started: float,
                 results: dict) -> tuple[int, int]:
    """Optimizer steps per run that fit the budget, and how many runs fit side by side
    (parallel_jobs.side_by_side)."""
    workers = max(1, exp["workers"])
    slowest = "none" if "none" in exp["sharings"] else exp["sharings"][0]
    probes = [{"exp": exp, "out": str(out),
               "run": {"mixer": exp["mixers"][i % len(exp["mixers"])], "sharing": slowest, "seed": exp["seeds"][0]}}
              for i in range(workers)]
    measured, failed, workers = side_by_side(run_all(pool, probe_run, probes), workers)
    for error in failed:
        log(f"sharing probe failed:\n{error}")
    rate = min(m["tokens_per_s"] for m in measured)
    left = budget_s - (time.perf_counter() - started) - exp["finish_s"]
    rounds = math.ceil(n_runs / workers)
    per_run = left * exp["budget_safety"] / rounds - exp["per_run_overhead_s"]
    steps = steps_for_budget(per_run, rate, exp["seq_len"] * exp["batch_size"], exp["min_steps"])
    results["probe"] = {"runs": measured, "failed": len(failed), "workers": workers, "rounds": rounds, "seconds_per_run": per_run,
                        "probe_s": time.perf_counter() - started, "steps": steps}
    log(f"sharing probe: {rate:,.0f} tok/s per run with {len(measured) + len(failed)} side by side "
        f"({len(failed)} failed); {rounds} rounds of {workers} runs, {per_run:.0f} s each -> {steps} steps")
    return steps, workers


def stop_workers(pool) -> None:
    """Ends the pool's worker processes now (on SIGTERM; a pool shutdown would wait for their running jobs)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()
    raise SystemExit(143)


def rerun_command(args: argparse.Namespace, exp: dict, steps: int) -> str:
    return (f"PYTHONPATH=.:backends/cuda python3 experiments/sharing.py --config {args.config} --out OUT --steps {steps} "
            f"--workers {exp['workers']}" + (f" --scale {args.scale}" if args.scale else "")
            + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
            + (f" --mixers {' '.join(args.mixers)}" if args.mixers else "")
            + (f" --sharings {' '.join(args.sharings)}" if args.sharings else ""))


def summarise(runs: list[dict], exp: dict) -> list[dict]:
    """Per (mixer, sharing): mean and sample standard deviation over the finished seeds of each plan's loss."""
    rows = []
    for mixer in exp["mixers"]:
        for sharing in exp["sharings"]:
            done = [r for r in runs if r["mixer"] == mixer and r["sharing"] == sharing and "eval_loss" in r]
            if not done:
                continue
            row = {"mixer": mixer, "sharing": sharing, "seeds": [r["seed"] for r in done],
                   "parameters": done[0]["parameters"], "tokens_per_s_mean": statistics.mean(r["tokens_per_s"] for r in done)}
            for plan in exp["eval_plans"]:
                losses = [r["eval_loss"][plan] for r in done]
                mean = statistics.mean(losses)
                row[plan] = {"loss_mean": mean, "loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
                             "ppl_of_mean_loss": math.exp(mean)}
            rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    exp = experiment(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, _, about = validation_set(exp)  # checks the split before any worker starts
    runs = [{"mixer": m, "sharing": s, "seed": seed} for seed in exp["seeds"] for m in exp["mixers"]
            for s in exp["sharings"]]
    results = {"experiment": "sharing", "config": args.config, "scale": args.scale, "settings": exp,
               "budget_s": args.budget_s, "validation": about, "runs": []}
    pool = job_pool(exp["workers"]) if exp["workers"] > 0 else None
    if pool is not None:  # killed at a deadline: take the workers along (the results file is already written)
        signal.signal(signal.SIGTERM, lambda *_: stop_workers(pool))
    try:
        steps, running = (choose_steps(exp, pool, out, len(runs), args.budget_s, started, results) if args.budget_s
                          else (args.steps or exp["steps"], max(1, exp["workers"])))
        results.update(steps=steps, tokens_per_run=steps * exp["seq_len"] * exp["batch_size"],
                       command=rerun_command(args, exp, steps))
        write_json(out / RESULTS_NAME, results)
        log(f"sharing: {len(runs)} runs of {steps} steps, {running} at a time")
        jobs = [{"exp": exp, "run": run, "steps": steps, "out": str(out)} for run in runs]

        def record(job, result):
            if "error" in result:
                result = {**job["run"], "name": run_name(job["run"]), **result}
                log(f"sharing {result['name']}: FAILED\n{result['error']}")
            else:
                results.setdefault("environment", result.pop("environment"))
                result.pop("environment", None)
                log(f"sharing {result['name']}: {result['wall_s']:.0f} s, {result['tokens_per_s']:,.0f} tok/s, "
                    f"eval {result['eval_loss']}")
            results["runs"].append(result)
            results["runs"].sort(key=lambda r: (r["seed"], r["mixer"], r["sharing"]))
            results["summary"] = summarise(results["runs"], exp)
            results["wall_s"] = time.perf_counter() - started
            write_json(out / RESULTS_NAME, results)

        run_jobs(pool, train_run, jobs, record, max_running=running)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    results["wall_s"] = time.perf_counter() - started
    results.setdefault("environment", environment())
    write_json(out / RESULTS_NAME, results)
    failed = [r["name"] for r in results["runs"] if "error" in r]
    if failed:
        raise SystemExit(f"sharing.py: {len(failed)} runs failed: {', '.join(failed)} (tracebacks in {out / RESULTS_NAME})")


if __name__ == "__main__":
    run_main(main)
