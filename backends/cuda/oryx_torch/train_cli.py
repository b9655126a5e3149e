"""The handler of `oryx train CONFIG [--resume] [--set KEY=VALUE ...]` (its parser is
oryx_core.backend_commands'): the PyTorch training loop from the command line.

Several GPUs: `torchrun --nproc_per_node=N $(which oryx) train CONFIG` (DDP; `--set parallel=fsdp`
shards with FSDP2). torch is imported only when the command runs.
"""
from __future__ import annotations

import json
import os

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
