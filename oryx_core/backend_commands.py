"""Parsers of the commands that run on one backend only: `oryx train` (torch), `oryx quantize` and
`oryx export-mlx-lm` (MLX).

Their handlers live in the backend (oryx_torch.train_cli, oryx_mlx.cli) and are imported when the
command runs, through oryx_core.backend, so `oryx --help` lists every command whatever is installed
and running one without its extra ends in one line saying what to install.
"""
from __future__ import annotations

import importlib

from .argtypes import int_choice, positive_int
from .backend import get_backend
from .weights import FLOAT_DTYPES

QUANT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def backend_handler(backend: str, module: str, function: str):
    """args -> module.function(args), once the backend's extra is known to be installed."""
    def run(args):
        get_backend(backend)
        return getattr(importlib.import_module(module), function)(args)
    return run


def register(subparsers) -> None:
    from .cli import FORCE_FLAG

    json_flag = dict(action="store_true", help="print machine-readable JSON")

    p = subparsers.add_parser(
        "train", help="train a model on token shards (PyTorch; one GPU, DDP or FSDP2 under torchrun)",
        description="Train an Oryx model with mixed-mode batches (or a fixed plan), evaluating per plan and saving "
                    "checkpoints that --resume continues exactly. CONFIG is a .json (or .toml) file; see "
                    "configs/train/. Paths in it are relative to the working directory. Several GPUs: "
                    "torchrun --nproc_per_node=N $(which oryx) train CONFIG (DDP; --set parallel=fsdp shards with "
                    "FSDP2).")
    p.add_argument("config", help="training config file")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the config's out dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; dotted for the model section (model.preset=20m); VALUE is JSON or "
                        "a plain string; repeatable")
    p.add_argument("--stop-after", type=positive_int, metavar="N",
                   help="stop (with a checkpoint) after step N of the schedule; continue later with --resume")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=backend_handler("torch", "oryx_torch.train_cli", "cmd_train"))

    p = subparsers.add_parser("quantize", help="quantise a checkpoint to 4 or 8 bits (MLX affine)",
                              description="Quantise every projection and the embedding of an Oryx checkpoint group-wise "
                                          "(MLX affine quantisation); recurrent gates, convs and norms stay full precision. "
                                          "Writes an Oryx checkpoint the MLX backend loads.")
    p.add_argument("path", help="full-precision checkpoint directory")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--bits", type=int_choice(*QUANT_BITS), default=4, help="bits per weight: 2, 3, 4, 5, 6 or 8 "
                                                                            "(default 4)")
    p.add_argument("--group-size", type=int_choice(*GROUP_SIZES), default=64,
                   help="weights per scale: 32, 64 or 128 (default 64)")
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES),
                   help="dtype of scales, biases and unquantised tensors (default: as stored)")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=backend_handler("mlx", "oryx_mlx.cli", "cmd_quantize"))

    p = subparsers.add_parser("export-mlx-lm", help="write a directory mlx_lm.load can run (it holds code)",
                              description="Export a checkpoint (full precision or quantised) for mlx-lm. The export is "
                                          "code: OUT/oryx_mlx_lm.py builds the model, and mlx_lm.load(OUT, "
                                          "trust_remote_code=True) executes it, so give an export only to people "
                                          "who trust you, and load one only from a source you trust. Where Oryx is "
                                          "installed, oryx_mlx.export.load_export(OUT) loads it through mlx-lm's "
                                          "loader with the installed model code instead, running nothing from OUT; "
                                          "either way mlx_lm.generate then runs it.")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--plan", default="attention",
                   help="mode plan mlx-lm runs with: attention, recurrent, every:K:C or spans (default attention)")
    p.add_argument("--bits", type=int_choice(*QUANT_BITS), help="quantise on export (2, 3, 4, 5, 6 or 8 bits)")
    p.add_argument("--group-size", type=int_choice(*GROUP_SIZES), default=64,
                   help="weights per scale: 32, 64 or 128 (default 64)")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=backend_handler("mlx", "oryx_mlx.cli", "cmd_export_mlx_lm"))
