"""Where `oryx train` reports its metrics besides log.jsonl: TensorBoard and Weights & Biases.

The training config's `log_to` lists them ("tensorboard", "wandb"; default none). TensorBoard
event files go to OUT/tensorboard (`tensorboard --logdir OUT`); a wandb run takes its project
from WANDB_PROJECT (default "oryx") and resumes under the run directory's name. Each needs its
package installed (`pip install tensorboard`, `pip install wandb`); a missing one is named
before training starts. Every numeric field of a log record becomes a scalar at its step, the
evaluation losses as eval/<plan>.
"""
from __future__ import annotations

import os
from pathlib import Path

METRIC_SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the package it needs


def check_sinks(names, source: str = "log_to") -> None:
    """Fails with one line naming the sink when it is unknown or its package is missing."""
    import importlib.util

    if not isinstance(names, list):
        raise ValueError(f"{source}: must be a list of sinks ({', '.join(METRIC_SINKS)}), got {names!r}")
    for name in names:
        if name not in METRIC_SINKS:
            raise ValueError(f"{source}: unknown sink {name!r} (known: {', '.join(METRIC_SINKS)})")
        if importlib.util.find_spec(METRIC_SINKS[name]) is None:
            raise ValueError(f"{source}: {name} needs its package: pip install {METRIC_SINKS[name]}")


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a log record, nested ones as parent/child (eval/attention)."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class MetricSinks:
    """The sinks a run logs to; `log(record)` sends a log record's scalars at record["step"]."""

    def __init__(self, names: list[str], out: Path, run_config: dict):
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "oryx"), name=Path(out).name,
                                    id=Path(out).resolve().name, resume="allow", dir=str(out), config=run_config)

    def log(self, record: dict) -> None:
        values, step = scalars(record), int(record["step"])
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
