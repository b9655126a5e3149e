"""Single-pass budgets: held-out loss against tokens, at most one pass over the training split, several seeds.

    python3 experiments/lm_single_pass.py --out DIR [--config experiments/configs/lm_single_pass.json]
                                          [--scale toy] [--budget-s S | --steps N] [--models ...] [--seed S]
                                          [--workers W]

The five models of experiments/lm_budget.py (Oryx-GDN and Oryx-Mamba-2 with mixed training, a
Transformer, GDN-only, Mamba-2-only), each trained with every seed of `seeds` by `oryx train`'s
loop, all for the same number of steps, that number capped so that no model sees more tokens
than the training split holds (`max_passes`, default 1; windows are drawn at random, so a
pass is a token count, not a guarantee that each token is seen once). Every model is
evaluated `eval_points` times along the way and at the end on ONE validation set: the same
`eval_batches` x `batch_size` windows of the val split for every model and seed (`eval_seed`).
Jobs run side by side in `workers` processes on the one device (0: in this process); with
--budget-s the step count is fitted to S seconds from a probe of the mixed-mode models running
side by side as the jobs will.

Writes DIR/lm_single_pass.json after every finished job (each model's eval curve: step,
tokens, loss per plan) and DIR/<model>-seed<S>/log.jsonl (checkpoints are removed).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from common import environment, experiment_args, experiment_from_args, log, run_main, steps_for_budget, write_json
from parallel_jobs import job_pool, run_all, run_jobs, side_by_side

RESULTS_NAME = "lm_single_pass.json"

# Larger prose corpora looked for in the registries this project can reach (package metadata only).
CORPORA_CONSIDERED = [
    {"source": "Debian bible-kjv-text 4.38", "what": "King James Bible with a concordance, a 2.4 MB package",
     "verdict": "archaic prose, small beside the 17.3 MB corpus archive; not added"},
    {"source": "Debian fortunes 1:1.99.1-7.3", "what": "fortune cookies, 2.6 MB installed",
     "verdict": "short quips, not running prose; not added"},
    {"source": "npm nlp-corpus 4.4.0", "what": "texts for testing NLP components: 100 files of 1,000 single sentences "
     "each (8.8 MB), shuffled, from lyrics, chat, transcripts, reviews, fiction and more",
     "verdict": "shuffled single sentences, no running text over a 512-token window; its README asks not to "
                "republish it and warns of offensive content; not added"},
    {"source": "PyPI gutenberg, gutenbergpy, gutenberg-books", "what": "clients that download Project Gutenberg "
     "books at run time", "verdict": "no text in the package; unusable on offline GPU hosts"},
]


def train_tokens(data: str) -> int:
    meta = Path(data) / "meta.json"
    try:
        return int(json.loads(meta.read_text())["tokens"]["train"])
    except OSError as e:
        raise FileNotFoundError(f"data: {meta}: cannot read ({e.strerror}); build the shards as docs/data.md says") from None


def job_config(exp: dict, entry: dict, run_dir: Path, steps: int, seed: int, plans: list[str], eval_every: int):
    from lm_budget import train_config

    cfg = train_config({**exp, "seed": seed}, entry, run_dir, steps, plans)
    return dataclasses.replace(cfg, eval_every=eval_every, eval_seed=exp["eval_seed"])


def train_job(job: dict) -> dict:
    """Trains one (model, seed) job; runs in a worker process."""
    from lm_budget import used_parameters
    from oryx_torch.train import read_log, train

    exp, entry, steps, seed = job["exp"], job["entry"], job["steps"], job["seed"]
    plans = exp["oryx_eval_plans"] if entry["modes"] == "mixed" else [entry["modes"]]
    run_dir = Path(job["out"]) / f"{entry['name']}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    cfg = job_config(exp, entry, run_dir, steps, seed, plans, job["eval_every"])
    summary = train(cfg)
    wall_s = time.perf_counter() - started
    records = read_log(run_dir)
    fresh = evaluate_checkpoint(cfg, summary["model"])
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    tokens_per_step = exp["seq_len"] * exp["batch_size"]
    rates = [r["tokens_per_s"] for r in records if "loss" in r]
    return {**entry, "seed": seed, "parameters": used_parameters(exp, entry), "steps": summary["step"],
            "tokens": summary["step"] * tokens_per_step, "wall_s": wall_s,
            "tokens_per_s": statistics.median(rates[1:] or rates),  # the first interval includes start-up
            "final_train_loss": summary["loss"], "eval_loss": summary["eval"],
            # the final checkpoint loaded afresh and scored on the same windows: equal to eval_loss up to rounding
            # (a cache of weights that outlived an optimizer step would show here)
            "eval_loss_final_checkpoint": fresh,
            "eval_loss_max_abs_difference": max(abs(fresh[p] - summary["eval"][p]) for p in fresh),
            "eval_curve": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["eval"]}
                           for r in records if "eval" in r],
            "loss_curve": [(r["step"], r["loss"]) for r in records if "loss" in r]}


def evaluate_checkpoint(cfg, model_dir: str) -> dict[str, float]:
    """The training loop's evaluation (same windows, plans and autocast) of a model loaded from model_dir."""
    from contextlib import nullcontext

    import torch

    from oryx_torch.model import OryxModel
    from oryx_torch.train import Runtime, evaluate, open_split

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    model = OryxModel.from_checkpoint(model_dir, dtype=torch.float32, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()
    losses = evaluate(model, open_split(Path(cfg.data), "val"), cfg, Runtime(0, 1, device), autocast)
    del model
    return losses


def probe_job(job: dict) -> dict:
    """Training tokens/s of a mixed-mode model while the other workers train too (first log interval excluded)."""
    from oryx_torch.train import read_log, train

    run_dir = Path(job["out"]) / f"probe-{job['index']}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(job_config(job["exp"], job["entry"], run_dir, job["exp"]["probe_steps"], 0, ["attention"], 0))
    rates = [r["tokens_per_s"] for r in read_log(run_dir) if "loss" in r][1:]
    shutil.rmtree(run_dir, ignore_errors=True)
    if not rates:
        raise ValueError(f"probe_steps {job['exp']['probe_steps']} must span at least two log intervals")
    return {"mixer": job["entry"]["mixer"], "tokens_per_s": statistics.median(rates)}


def choose_steps(exp: dict, pool, out: Path, n_jobs: int, budget_s: float, started: float,
                 results: dict) -> tuple[int, int]:
    """Optimizer steps per job that fit the budget, and how many jobs fit side by side: the workers whose probes
    did not run out of device memory (all of them when none did)."""
    workers = max(1, exp["workers"])
    mixers = sorted({m["mixer"] for m in exp["models"] if m["modes"] == "mixed"}) or ["gdn"]
    probes = [{"exp": exp, "out": str(out), "entry": {"name": "probe", "mixer": mixers[i % len(mixers)], "modes": "mixed"}}
              for i in range(workers)]
    measured, failed, workers = side_by_side(run_all(pool, probe_job, probes), workers)
    rate = min(m["tokens_per_s"] for m in measured)
    left = budget_s - (time.perf_counter() - started)
    rounds = math.ceil(n_jobs / workers)
    per_job = left * exp["budget_safety"] / rounds - exp["per_job_overhead_s"]
    steps = steps_for_budget(per_job, rate, exp["seq_len"] * exp["batch_size"], exp["min_steps"])
    results["probe"] = {"tokens_per_s_side_by_side": [m["tokens_per_s"] for m in measured], "workers": workers,
                        "rounds": rounds, "seconds_per_job": per_job, "steps": steps, "failed_probes": len(failed)}
    log(f"lm_single_pass probe: {rate:,.0f} tok/s per job with {len(measured) + len(failed)} side by side"
        f" ({len(failed)} failed); {rounds} rounds of {workers} jobs, {per_job:.0f} s each -> {steps} steps")
    return steps, workers


def rerun_command(args, steps: int) -> str:
    return (f"PYTHONPATH=.:backends/cuda python3 experiments/lm_single_pass.py --config {args.config} --out OUT "
            f"--steps {steps}" + (f" --scale {args.scale}" if args.scale else "")
            + (f" --models {' '.join(args.models)}" if args.models else "")
            + (f" --seed {args.seed}" if args.seed is not None else "")
            + (f" --workers {args.workers}" if args.workers is not None else ""))


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0], "experiments/configs/lm_single_pass.json")
    started = time.perf_counter()
    if args.lr is not None:
        raise ValueError("--lr: not used by this runner (set lr in the config)")
    exp = experiment_from_args(args)
    if args.seed is not None:
        exp["seeds"] = [args.seed]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens_per_step = exp["seq_len"] * exp["batch_size"]
    split_tokens = train_tokens(exp["data"])
    max_steps = max(1, math.floor(exp["max_passes"] * split_tokens / tokens_per_step))
    jobs = [{"entry": entry, "seed": seed} for seed in exp["seeds"] for entry in exp["models"]]
    results = {"experiment": "lm_single_pass", "config": args.config, "scale": args.scale, "settings": exp,
               "environment": environment(), "train_split_tokens": split_tokens, "max_steps_one_pass": max_steps,
               "validation": {"windows": exp["eval_batches"] * exp["batch_size"], "window_tokens": exp["seq_len"] + 1,
                              "eval_seed": exp["eval_seed"],
                              "same_for": "every model, seed, plan and evaluation step"},
               "corpora_considered": CORPORA_CONSIDERED, "jobs": len(jobs), "models": []}
    pool = job_pool(exp["workers"]) if exp["workers"] > 0 else None
    try:
        running = max(1, exp["workers"])
        if args.budget_s:
            budget_steps, running = choose_steps(exp, pool, out, len(jobs), args.budget_s, started, results)
        else:
            budget_steps = args.steps or exp["steps"]
        steps = min(budget_steps, max_steps)
        eval_every = max(1, steps // exp["eval_points"])
        results.update(steps=steps, tokens_per_model=steps * tokens_per_step, passes=steps * tokens_per_step / split_tokens,
                       eval_every=eval_every, command=rerun_command(args, steps))
        write_json(out / RESULTS_NAME, results)
        log(f"lm_single_pass: {len(jobs)} jobs of {steps} steps ({results['passes']:.2f} passes), "
            f"evaluated every {eval_every} steps, {running} at a time")
        jobs = [{**job, "exp": exp, "steps": steps, "eval_every": eval_every, "out": str(out)} for job in jobs]

        def record(job, result):
            if "error" in result:
                result = {**job["entry"], "seed": job["seed"], **result}
                log(f"lm_single_pass {job['entry']['name']} seed {job['seed']}: FAILED\n{result['error']}")
            else:
                log(f"lm_single_pass {result['name']} seed {result['seed']}: {result['wall_s']:.0f} s, "
                    f"{result['tokens_per_s']:,.0f} tok/s, eval {result['eval_loss']}")
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
