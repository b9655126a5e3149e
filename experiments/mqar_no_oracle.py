"""Retrieval without an oracle: MQAR accuracy against the share of attention tokens, under plans chosen blind.

    python3 experiments/mqar_no_oracle.py --out DIR [--config experiments/configs/mqar_no_oracle.json]
                                          [--scale toy] [--budget-s S | --steps N] [--models ...] [--seed S]
                                          [--workers W] [--lr-sweep with|without|only]

The models, data and training loop of experiments/mqar.py, with two differences:
- Oryx models train with the design's mixed sampler only (chunks of `mode_chunk` tokens, each
  in attention with a per-sequence probability, `pure_share` of the sequences pure); no
  sequence places attention on the query positions (`query_plan_share` must be 0).
- Evaluation uses only plans a user could pick without knowing where the answers are: the
  last span (`last:s%`, `last:N`), every k-th chunk (`every:k:c`), a fixed share of chunks
  drawn at random independently of the data (`chunks:s%:c`), and the pure plans. The plan
  runs over each sequence's own tokens (padding excluded) and the share of attention tokens
  it gives is measured.
Every model is trained with every seed of `seeds`, plus the learning-rate sweep of one
baseline (`lr_sweep`), all for the same number of steps; the held-out sequences are the same
for every model and seed (`eval_seed`). Jobs run side by side in `workers` processes on the
one device (0: in this process). With --budget-s the step count is fitted to S seconds from a
probe of the mixed-mode models running side by side as the jobs will. --lr-sweep without / only
leaves the sweep out / runs only the sweep's extra learning rates, so that the work can be split
over several calls (experiments/plot_science.py pools their files).

Writes DIR/mqar_no_oracle.json after every finished job.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np

from common import environment, experiment_args, experiment_from_args, log, run_main, steps_for_budget, write_json
from parallel_jobs import job_pool, run_all, run_jobs, side_by_side

from oryx_core.mqar import IGNORE
from oryx_core.plan import ModePlan
from oryx_core.spec import parameter_counts

BASELINE_USED = {"attention": "attention_mode_total", "recurrent": "recurrent_mode_total", "mixed": "total"}
RESULTS_NAME = "mqar_no_oracle.json"


def parse_chunks_plan(spec: str) -> tuple[float, int]:
    """'chunks:S%:C' -> (S / 100, C): each C-token chunk in attention with probability S, drawn blind."""
    try:
        _, share, chunk = spec.split(":")
        if not share.endswith("%"):
            raise ValueError
        value, size = float(share[:-1]) / 100.0, int(chunk)
    except ValueError:
        raise ValueError(f"eval_plans: {spec!r} is not chunks:S%:C (e.g. chunks:10%:16)") from None
    if not (0.0 <= value <= 1.0 and size >= 1):
        raise ValueError(f"eval_plans: {spec!r} needs S in [0%, 100%] and C >= 1")
    return value, size


def check_plan(spec: str) -> None:
    if spec.startswith("chunks:"):
        parse_chunks_plan(spec)
    else:
        ModePlan.parse(spec)


def plan_modes(spec: str, length: int, rows: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """bool [rows, seq_len]: the plan over each row's first `length` tokens; the padding after them recurrent."""
    modes = np.zeros((rows, seq_len), dtype=bool)
    if spec.startswith("chunks:"):
        share, chunk = parse_chunks_plan(spec)
        drawn = rng.random((rows, -(-length // chunk))) < share
        modes[:, :length] = np.repeat(drawn, chunk, axis=1)[:, :length]
    else:
        modes[:, :length] = ModePlan.parse(spec).resolve(length)
    return modes


def model_plans(entry: dict, exp: dict) -> list[str]:
    return exp["eval_plans"] if entry["modes"] == "mixed" else [entry["modes"]]


def evaluate(trainer, entry: dict, exp: dict) -> list[dict]:
    """One row per (length, pairs, plan): accuracy at the queried keys and the measured attention share."""
    from mqar import eval_sets

    rows = []
    trainer.model.eval()
    for length, pairs, batches in eval_sets(exp, exp["eval_seed"], trainer.cfg.vocab_size):
        for spec in model_plans(entry, exp):
            plan_rng = np.random.default_rng([exp["eval_seed"], 3, length, pairs])  # the same draws for every model
            correct = total = attention = 0
            for inputs, targets in batches:
                modes = plan_modes(spec, length, len(inputs), exp["seq_len"], plan_rng)
                right, scored = trainer.accuracy(inputs, targets, modes)
                correct, total, attention = correct + right, total + scored, attention + int(modes.sum())
            queries = int((batches[0][1] != IGNORE).sum(axis=1)[0])
            rows.append({"length": length, "pairs": pairs, "queries_share": queries / length, "plan": spec,
                         "share": attention / (length * exp["batch_size"] * exp["eval_batches"]),
                         "accuracy": correct / total, "correct": correct, "total": total})
    trainer.model.train()
    return rows


def job_settings(exp: dict, job: dict) -> dict:
    settings = {**exp, "seed": job["seed"], "lr": job["lr"], "min_lr": exp["min_lr"] * job["lr"] / exp["lr"]}
    return settings


def train_job(job: dict) -> dict:
    """Trains one (model, seed, lr) job and evaluates it; runs in a worker process."""
    from mqar import train_model

    exp, entry = job["exp"], job["entry"]
    settings = job_settings(exp, job)
    started = time.perf_counter()
    trainer, curve, times = train_model(settings, entry, job["steps"])
    train_s = time.perf_counter() - started
    counts = parameter_counts(trainer.cfg)
    eval_started = time.perf_counter()
    rows = evaluate(trainer, entry, settings)
    return {**entry, "seed": job["seed"], "lr": job["lr"], "steps": job["steps"],
            "parameters": {"used": counts[BASELINE_USED[entry["modes"]]], "total": counts["total"]},
            "train_s": train_s, "eval_s": time.perf_counter() - eval_started,
            "seconds_per_step": statistics.median(times), "loss_curve": curve, "eval": rows}


def probe_job(job: dict) -> dict:
    """Seconds per step of a mixed-mode model while the other workers train too (first half excluded)."""
    from mqar import train_model

    _, _, times = train_model(job["exp"], job["entry"], job["steps"])
    return {"mixer": job["entry"]["mixer"], "seconds_per_step": statistics.median(times[len(times) // 2:])}


LR_SWEEP_CHOICES = ("with", "without", "only")


def jobs_of(exp: dict, lr_sweep: str = "with") -> list[dict]:
    """Every model with every seed ("with", "without"), then ("with", "only") the swept baseline at each other
    learning rate with every seed."""
    main = [{"entry": entry, "seed": seed, "lr": exp["lr"]} for seed in exp["seeds"] for entry in exp["models"]]
    sweep = exp.get("lr_sweep")
    swept = [m for m in exp["models"] if sweep and m["name"] == sweep["model"]]
    extra = [{"entry": swept[0], "seed": seed, "lr": lr} for lr in sweep["lrs"] if lr != exp["lr"]
             for seed in exp["seeds"]] if swept else []
    if lr_sweep == "only":
        if not extra:
            raise ValueError(f"--lr-sweep only: no sweep to run (lr_sweep {sweep}, models "
                             f"{', '.join(m['name'] for m in exp['models'])})")
        return extra
    return main + (extra if lr_sweep == "with" else [])


def choose_steps(exp: dict, pool, n_jobs: int, budget_s: float, started: float, results: dict) -> tuple[int, int]:
    """Optimizer steps per job that fit the budget, and how many jobs fit side by side (parallel_jobs.side_by_side)."""
    workers = max(1, exp["workers"])
    mixers = sorted({m["mixer"] for m in exp["models"] if m["modes"] == "mixed"}) or ["gdn"]
    probes = [{"exp": exp, "steps": exp["probe_steps"],
               "entry": {"name": "probe", "mixer": mixers[i % len(mixers)], "modes": "mixed"}} for i in range(workers)]
    measured, failed, workers = side_by_side(run_all(pool, probe_job, probes), workers)
    seconds_per_step = max(m["seconds_per_step"] for m in measured)
    left = budget_s - (time.perf_counter() - started)
    rounds = math.ceil(n_jobs / workers)
    per_job = left * exp["budget_safety"] / rounds - exp["per_job_overhead_s"]
    steps = steps_for_budget(per_job, 1.0 / seconds_per_step, 1, exp["min_steps"])
    results["probe"] = {"seconds_per_step_side_by_side": [m["seconds_per_step"] for m in measured],
                        "workers": workers, "rounds": rounds, "seconds_per_job": per_job, "steps": steps, "failed_probes": len(failed)}
    log(f"mqar_no_oracle probe: {seconds_per_step:.4f} s/step with {len(measured) + len(failed)} side by side"
        f" ({len(failed)} failed); {rounds} rounds of {workers} jobs, {per_job:.0f} s each -> {steps} steps")
    return steps, workers


def rerun_command(args, steps: int, exp: dict) -> str:
    return (f"PYTHONPATH=.:backends/cuda python3 experiments/mqar_no_oracle.py --config {args.config} --out OUT "
            f"--steps {steps}" + (f" --scale {args.scale}" if args.scale else "")
            + (f" --models {' '.join(args.models)}" if args.models else "")
            + (f" --seed {args.seed}" if args.seed is not None else "")
            + (f" --workers {args.workers}" if args.workers is not None else "")
            + (f" --lr-sweep {args.lr_sweep}" if args.lr_sweep != "with" else ""))


def extra_args(parser) -> None:
    parser.add_argument("--lr-sweep", choices=LR_SWEEP_CHOICES, default="with",
                        help="with (default): the models and the config's lr_sweep; without: the models only; "
                             "only: just the swept baseline's other learning rates")


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0], "experiments/configs/mqar_no_oracle.json", extra_args)
    started = time.perf_counter()
    if args.lr is not None:
        raise ValueError("--lr: this runner sweeps learning rates from the config's lr_sweep")
    exp = experiment_from_args(args)
    if args.seed is not None:
        exp["seeds"] = [args.seed]
    if exp["query_plan_share"] != 0:
        raise ValueError(f"{args.config}: query_plan_share must be 0 (no attention placed on the queries in training)")
    for spec in exp["eval_plans"]:
        check_plan(spec)
    out = Path(args.out)
    jobs = jobs_of(exp, args.lr_sweep)
    results = {"experiment": "mqar_no_oracle", "config": args.config, "scale": args.scale, "settings": exp,
               "environment": environment(), "lr_sweep_jobs": args.lr_sweep, "jobs": len(jobs), "models": []}
    pool = job_pool(exp["workers"]) if exp["workers"] > 0 else None
    try:
        running = max(1, exp["workers"])
        if args.budget_s:
            steps, running = choose_steps(exp, pool, len(jobs), args.budget_s, started, results)
        else:
            steps = args.steps or exp["steps"]
        results["steps"] = steps
        results["command"] = rerun_command(args, steps, exp)
        write_json(out / RESULTS_NAME, results)
        jobs = [{**job, "exp": exp, "steps": steps} for job in jobs]
        log(f"mqar_no_oracle: {len(jobs)} jobs of {steps} steps, {running} at a time")

        def record(job, result):
            if "error" in result:
                result = {**job["entry"], "seed": job["seed"], "lr": job["lr"], **result}
                log(f"mqar_no_oracle {job['entry']['name']} seed {job['seed']} lr {job['lr']}: FAILED\n{result['error']}")
            else:
                pure = {plan: round(statistics.mean(r["accuracy"] for r in result["eval"] if r["plan"] == plan), 3)
                        for plan in ("recurrent", "attention") if any(r["plan"] == plan for r in result["eval"])}
                log(f"mqar_no_oracle {result['name']} seed {result['seed']} lr {result['lr']}: "
                    f"{result['train_s']:.0f} s, loss {result['loss_curve'][-1][1]:.3f}, mean accuracy {pure}")
            results["models"].append(result)
            results["wall_s"] = time.perf_counter() - started
            write_json(out / RESULTS_NAME, results)

        run_jobs(pool, train_job, jobs, record, max_running=running)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    results["wall_s"] = time.perf_counter() - started
    write_json(out / RESULTS_NAME, results)


if __name__ == "__main__":
    run_main(main)
