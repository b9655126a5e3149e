"""`oryx train CONFIG [--resume] [--set KEY=VALUE ...]`: the PyTorch training loop from the command line.

Several GPUs: `torchrun --nproc_per_node=N $(which oryx) train CONFIG` (DDP; `--set parallel=fsdp`
shards with FSDP2). torch is imported only when the command runs.
"""
from __future__ import annotations

import json
import os

from oryx_core.argtypes import positive_int
from oryx_core.cli import FORCE_FLAG
from oryx_core.output import check_output


def run_sources(cfg) -> list[tuple[str, str]]:
    """The paths a run reads, which its out directory must not be, contain or lie inside."""
    model = [(f"model.{key}", cfg.model[key]) for key in ("checkpoint", "config") if isinstance(cfg.model.get(key), str)]
    return [("data", cfg.data), *model]


def cmd_train(args) -> None:
    from .train import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    check_output(cfg.out, "run", run_sources(cfg), args.force, "out")
    summary = train(cfg, resume=args.resume, stop_after=args.stop_after)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(json.dumps(summary, indent=2) if args.json else
              f"step {summary['step']}: loss {summary['loss']}, eval {summary['eval']}\n"
              f"model {summary['model']} (oryx generate, eval, info and load_checkpoint read it)\n"
              f"training state {summary['checkpoint']} (oryx train --resume continues from it)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on token shards (PyTorch; one GPU, DDP or FSDP2 under torchrun)",
        description="Train an Oryx model with mixed-mode batches (or a fixed plan), evaluating per plan and saving "
                    "checkpoints that --resume continues exactly. CONFIG is a .json (or .toml) file; see "
                    "configs/train/. Paths in it are relative to the working directory.")
    p.add_argument("config", help="training config file")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the config's out dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; dotted for the model section (model.preset=20m); VALUE is JSON or "
                        "a plain string; repeatable")
    p.add_argument("--stop-after", type=positive_int, metavar="N",
                   help="stop (with a checkpoint) after step N of the schedule; continue later with --resume")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)
