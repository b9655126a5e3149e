"""Parsers of the commands that run on one backend only: `oryx train` and `oryx retrofit` (torch),
`oryx quantize` and `oryx export-mlx-lm` (MLX).

Their handlers live in the backend (oryx_torch.train_cli, oryx_torch.retrofit_cli, oryx_mlx.cli) and are imported when the
command runs, through oryx_core.backend, so `oryx --help` lists every command whatever is installed
and running one without its extra ends in one line saying what to install.
"""
from __future__ import annotations

import importlib

from .argtypes import finite_float, int_choice, non_negative_float, non_negative_int, positive_float, positive_int
from .backend import get_backend
from .weights import FLOAT_DTYPES, QUANT_BITS
from .weights import QUANT_GROUP_SIZES as GROUP_SIZES


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

    p = subparsers.add_parser(
        "retrofit", help="teach a checkpoint's recurrent mode from its attention mode (PyTorch; torchrun for DDP)",
        description="Self-distillation: only the recurrent-mode tensors (q_rec, conv_q, the recurrence's gates) train, "
                    "every shared tensor is frozen, so attention mode stays bit-identical to SRC. Stage (a) fits each "
                    "layer's recurrent output to its attention output (--layer-tokens); stage (b) fits the logits "
                    "under recurrent and mixed plans to the all-attention logits (--tokens). The run directory "
                    "(DST.run) holds log.jsonl and checkpoints that --resume continues exactly.")
    p.add_argument("src", help="Oryx checkpoint to retrofit (e.g. one converted from a Llama)")
    p.add_argument("dst", help="where the retrofitted checkpoint (or with --adapter, its adapter) goes")
    p.add_argument("--data", required=True, help="token shard directory made with SRC's tokenizer (oryx data build)")
    p.add_argument("--mixer", choices=["gdn", "mamba2"], help="recurrent mixer (default: SRC's); another one "
                   "re-initialises the recurrent tensors (q_rec from q_attn)")
    p.add_argument("--layer-tokens", type=non_negative_int, default=0, help="stage (a) tokens (default 0)")
    p.add_argument("--tokens", type=non_negative_int, default=0, help="stage (b) tokens (default 0)")
    p.add_argument("--kv-weight", type=non_negative_float, default=0.0,
                   help="stage (b) also fits each layer's keys and values under the plan to the all-attention ones, "
                        "with this weight on their relative squared error (default 0: the logits alone)")
    p.add_argument("--recurrent-kv-convs", action="store_true",
                   help="give the recurrence its own short convolutions on the shared keys and values (sharing "
                        "kv-proj; they start as SRC's and train with the recurrent tensors; the result runs on torch "
                        "and MLX)")
    p.add_argument("--plans", nargs="+", help="stage (b) plans, one drawn per sequence (default: recurrent "
                   "prefill-attention last:10%% every:4:64)")
    p.add_argument("--recurrent-scale", type=finite_float(), default=1.0,
                   help="GDN readout scale written into the config (default 1.0; 0 keeps SRC's)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per micro-step per rank (default 8)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per step (default 1)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--min-lr", type=non_negative_float, help="final learning rate of each stage (default lr/10)")
    p.add_argument("--warmup", type=non_negative_int, default=20, help="warm-up steps at each stage's start (default 20)")
    p.add_argument("--eval-every", type=non_negative_int, default=100, help="steps between evaluations (default 100)")
    p.add_argument("--eval-batches", type=positive_int, default=4, help="validation batches per plan (default 4)")
    p.add_argument("--save-every", type=non_negative_int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of batches and fresh tensors (default 0)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="device (default auto)")
    p.add_argument("--run-dir", help="run directory: log.jsonl and checkpoints (default DST.run)")
    p.add_argument("--adapter", action="store_true",
                   help="write DST as a recurrent adapter on SRC (only the recurrent tensors) instead of a whole model")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    p.add_argument("--stop-after", type=positive_int, metavar="N", help="stop (with a checkpoint) after step N")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (and no progress bar)")
    shared = p.add_argument_group(
        "shared stage", "--shared-rank R makes the run the shared stage instead of stages (a) and (b): SRC is an "
        "already retrofitted checkpoint or adapter; low-rank deltas (rank R) on shared projections and the recurrent "
        "tensors train on mixed plans against the frozen source's all-attention logits, while all-attention rows hold "
        "attention mode near SRC; the saved model is the best evaluation whose attention-mode validation NLL is within "
        "--attention-budget of SRC's, deltas merged (with --adapter: an adapter carrying the factor pairs). "
        "--tokens is its budget")
    shared.add_argument("--shared-rank", type=non_negative_int, default=0, help="rank of the deltas (default 0: off)")
    shared.add_argument("--shared-targets", default="q_attn,k_proj,v_proj,o_proj",
                        help="comma-separated projections to adapt: q_attn, k_proj, v_proj, g_proj, o_proj, gate_proj, "
                             "up_proj, down_proj (default q_attn,k_proj,v_proj,o_proj)")
    shared.add_argument("--attention-budget", type=non_negative_float, default=0.01,
                        help="allowed relative rise of attention mode's validation NLL (default 0.01)")
    shared.add_argument("--attention-share", type=positive_float, default=0.25,
                        help="share of each batch's rows run all-attention (default 0.25)")
    shared.add_argument("--attention-weight", type=non_negative_float, default=1.0,
                        help="starting weight of the all-attention rows' KL in the loss (default 1.0); each "
                             "evaluation doubles it while attention mode's drift is over half the budget and halves it "
                             "(not below the start) under a fifth")
    shared.add_argument("--attention-weight-fixed", action="store_true",
                        help="keep --attention-weight as given throughout")
    shared.add_argument("--recurrent-lr-scale", type=non_negative_float, default=0.5,
                        help="the recurrent tensors' learning rate relative to --lr (default 0.5)")
    p.set_defaults(func=backend_handler("torch", "oryx_torch.retrofit_cli", "cmd_retrofit"))
