"""Helpers shared by the experiment runners: import paths, scaled configs, results files, throughput probes.

Every runner reads one JSON config from experiments/configs/. A config holds the settings
of the full-size (GPU) run at its top level and, under "scales", the keys a smaller run
overrides (`--scale toy` for the CPU pretest of the whole pipeline).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from oryx_core.atomic import atomic_write_bytes  # noqa: E402


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_experiment_config(path: str | Path, scale: str | None) -> dict:
    """The config's top-level settings with the named scale's overrides applied."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"--config {path}: cannot read ({e.strerror})") from None
    scales = raw.pop("scales", {})
    if scale is None:
        return raw
    if scale not in scales:
        raise ValueError(f"--scale {scale!r}: {path} defines scales {sorted(scales)}")
    return deep_merge(raw, scales[scale])


def experiment_args(description: str, default_config: str, extra=None) -> argparse.Namespace:
    """The command line every experiment runner shares; extra(parser), when given, adds the runner's own flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config)
    parser.add_argument("--scale", help="a smaller scale defined in the config (toy: the CPU pretest)")
    parser.add_argument("--out", required=True, help="output directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--budget-s", type=float, help="wall-clock seconds for the whole experiment (probe included)")
    which.add_argument("--steps", type=int, help="optimizer steps per model (default: the config's)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="train only these models of the config (e.g. to spread one experiment over GPUs)")
    parser.add_argument("--lr", type=float,
                        help="peak learning rate instead of the config's (min_lr scales with it), e.g. for a sweep")
    parser.add_argument("--seed", type=int,
                        help="seed instead of the config's (model init, data order, modes), for a repeat run")
    parser.add_argument("--workers", type=int,
                        help="processes training side by side on the one device instead of the config's (0: in this process)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def experiment_from_args(args: argparse.Namespace) -> dict:
    """The config at args.scale, restricted to args.models, with args.lr and args.seed applied."""
    exp = select_models(load_experiment_config(args.config, args.scale), args.models)
    if args.seed is not None:
        exp = {**exp, "seed": args.seed}
    if getattr(args, "workers", None) is not None:
        if "workers" not in exp:
            raise ValueError("--workers: this runner trains one model at a time")
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        exp = {**exp, "workers": args.workers}
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        exp = {**exp, "lr": args.lr, "min_lr": exp["min_lr"] * args.lr / exp["lr"]}
    return exp


def rerun_command(script: str, args: argparse.Namespace, steps: int) -> str:
    """The command that reruns this experiment exactly (the step count fixed)."""
    return (f"python3 experiments/{script} --config {args.config} --out OUT --steps {steps}"
            + (f" --scale {args.scale}" if args.scale else "")
            + (f" --models {' '.join(args.models)}" if args.models else "")
            + (f" --lr {args.lr}" if args.lr is not None else "")
            + (f" --seed {args.seed}" if args.seed is not None else ""))


def select_models(exp: dict, names: list[str] | None) -> dict:
    """The experiment restricted to the named models, in the config's order."""
    if not names:
        return exp
    known = [m["name"] for m in exp["models"]]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--models {' '.join(unknown)}: the config defines {', '.join(known)}")
    return {**exp, "models": [m for m in exp["models"] if m["name"] in names]}


def write_json(path: str | Path, obj) -> None:
    """Atomic, so a run killed at its deadline leaves the last complete results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def environment() -> dict:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'unknown'})"
    return {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version()}


def steps_for_budget(seconds: float, tokens_per_s: float, tokens_per_step: int, minimum: int) -> int:
    """Optimizer steps that fit `seconds` at the measured rate (never fewer than `minimum`)."""
    return max(minimum, math.floor(seconds * tokens_per_s / tokens_per_step))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {message}", flush=True)


def run_main(main) -> None:
    """Runs a runner's main(); a bad argument, config or input file ends with one line and exit status 2."""
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as error:
        if isinstance(error, OSError) and error.filename:
            message = f"{error.filename}: {error.strerror}"
        else:
            message = error.args[0] if error.args else repr(error)
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
