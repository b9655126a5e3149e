"""The `oryx` command line. Core commands live here and in the modules of COMMAND_MODULES (the
one-backend commands' parsers in oryx_core.backend_commands); oryx_convert and oryx_data add theirs.

Each module in COMMAND_MODULES has `register(subparsers)` and imports its heavy
dependencies (torch, mlx) only inside the command functions, so `oryx --help` works
with any subset of the extras installed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .argtypes import non_negative_int, positive_int
from .config import PRESETS, ConfigError, preset
from .default import DEFAULT_MODEL
from .backend import BACKENDS
from .evaluate import evaluate_mqar, evaluate_text
from .init import init_params
from .output import check_output, replacing_allowed
from .plan import PlanError
from .safetensors_io import FormatError
from .spec import parameter_counts
from .text_tokens import evaluate_text_file
from .tokenizer import byte_level_tokenizer, load_tokenizer
from .weights import FLOAT_DTYPES, load_checkpoint, save_checkpoint

COMMAND_MODULES = ["oryx_core.generate_cli", "oryx_core.serve", "oryx_core.chat_cli", "oryx_core.backend_commands", "oryx_convert.cli", "oryx_data.cli"]
USER_ERRORS = (ConfigError, FormatError, PlanError, ValueError, FileNotFoundError)


FORCE_FLAG = dict(action="store_true",
                  help="replace the destination even if it exists and is not an artifact of this command's kind")


def emit(args, result: dict, lines: list[str]) -> None:
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))


# ----- oryx info -----
def cmd_info(args) -> None:
    path = Path(args.path)
    if not path.exists() and args.path.lower() in PRESETS:
        cfg, dtype, size, source = preset(args.path, args.mixer), "float32", None, f"preset {args.path} ({args.mixer})"
    else:
        ckpt = load_checkpoint(path)
        cfg, dtype, size, source = ckpt.config, ckpt.dtype, ckpt.size_on_disk(), str(path)
    counts = parameter_counts(cfg)
    result = {"source": source, "config": cfg.to_dict(), "parameters": counts, "dtype": dtype, "size_on_disk_bytes": size}
    lines = [f"{source}",
             f"  mixer {cfg.mixer}, {cfg.n_layers} layers, d_model {cfg.d_model}, heads {cfg.n_heads} (kv {cfg.n_kv_heads}) "
             f"of {cfg.head_dim}/{cfg.v_head_dim}, mlp {cfg.mlp_hidden}, vocab {cfg.vocab_size}, context {cfg.max_context}"
             + (f", sharing {cfg.sharing}" if cfg.sharing != "kv" else ""),
             f"  parameters: {counts['total']:,} total, {counts['shared']:,} shared, "
             f"{counts['attention_only']:,} attention-only, {counts['recurrent_only']:,} recurrent-only",
             f"  per mode: attention {counts['attention_mode_total']:,}, recurrent {counts['recurrent_mode_total']:,}",
             f"  tied fraction: {counts['tied_fraction']:.4f}",
             f"  dtype: {dtype}" + (f", {size / 2**20:.2f} MiB on disk" if size is not None else "")]
    emit(args, result, lines)


# ----- oryx init -----
def cmd_init(args) -> None:
    check_output(args.out, "checkpoint", [("--tokenizer", args.tokenizer)], args.force)
    cfg = preset(args.preset, args.mixer)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else byte_level_tokenizer()
    if tok.get_vocab_size() > cfg.vocab_size:
        cfg = cfg.replace(vocab_size=tok.get_vocab_size())
    params = init_params(cfg, args.seed)
    with replacing_allowed(args.out if args.force else None):
        out = save_checkpoint(args.out, cfg, params, dtype=args.dtype, tokenizer_json=tok.to_str())
    counts = parameter_counts(cfg)
    emit(args, {"path": str(out), "preset": args.preset, "mixer": args.mixer, "parameters": counts["total"],
                "tied_fraction": counts["tied_fraction"], "dtype": args.dtype},
         [f"wrote {out}: preset {args.preset}, mixer {args.mixer}, {counts['total']:,} parameters "
          f"(tied fraction {counts['tied_fraction']:.4f}), {args.dtype}"])


# ----- oryx eval -----
def cmd_eval(args) -> None:
    if (args.text is None) == (args.mqar is None):
        raise ValueError("give exactly one of --text FILE or --mqar PAIRS")
    if args.mqar is not None:
        r = evaluate_mqar(args.path, args.mqar, args.mqar_length, args.mqar_examples, plan=args.plan,
                          backend=args.backend, seed=args.seed)
        emit(args, r, [f"{args.path} [{r['backend']}, plan {r['plan']}, attention share {r['attention_share']:.3f}]: "
                       f"MQAR accuracy {r['accuracy']:.4f} ({r['pairs']} pairs, length {r['seq_len']}, "
                       f"{r['examples']} examples)"])
        return
    r = evaluate_text_file(args.path, args.text, plan=args.plan, backend=args.backend, window=args.window,
                           max_tokens=args.max_tokens)
    emit(args, r, [f"{args.path} [{r['backend']}, plan {r['plan']}]: nll {r['nll']:.6f}, "
                   f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens"])


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


EXTRAS = {"torch": "cuda", "triton": "cuda", "mlx": "mlx", "mlx_lm": "mlx", "gguf": "convert", "transformers": "convert",
          "fla": "cuda-ref", "mamba_ssm": "cuda-ref"}


def missing_extra_message(e: ModuleNotFoundError) -> str | None:
    """One line naming the extra that provides the missing module, or None when it is not an extra's."""
    top = (e.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return f"needs the {top} package, which is not installed: pip install 'oryx[{EXTRAS[top]}]'"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="oryx", description="Oryx: every layer runs each token with attention or a linear "
                                     "recurrence (Gated DeltaNet / Mamba-2), switching anywhere along the sequence.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    json_flag = dict(action="store_true", help="print machine-readable JSON")
    force_flag = FORCE_FLAG

    p = sub.add_parser("info", help="config, parameter counts and tied fraction of a checkpoint or preset",
                       description="Show a checkpoint's (or a preset's) config, parameters shared and per mode, tied fraction, "
                                   "dtype and size on disk.")
    p.add_argument("path", nargs="?", default=str(DEFAULT_MODEL),
                   help="checkpoint directory, or a preset name (" + ", ".join(PRESETS) + "); default: the embedded model")
    p.add_argument("--mixer", choices=["gdn", "mamba2"], default="gdn", help="recurrent mixer, for a preset (default gdn)")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint",
                       description="Write a randomly initialised Oryx checkpoint (with a tokenizer) to OUT.")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="model size")
    p.add_argument("--mixer", choices=["gdn", "mamba2"], default="gdn", help="recurrent mixer (default gdn)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), default="float32", help="stored dtype")
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: byte-level)")
    p.add_argument("--force", **force_flag)
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("eval", help="perplexity of a text (or MQAR accuracy) under a mode plan",
                       description="Mean negative log-likelihood, perplexity and token count of a text under a mode plan, "
                                   "or multi-query associative recall accuracy (--mqar). "
                                   "Plans: attention, recurrent, last:10%, every:4:64, A:0-512,R:512- ... "
                                   "A text longer than --window is scored in windows whose context starts empty; "
                                   "the plan's positions are positions in the whole text, across windows.")
    p.add_argument("path", nargs="?", default=str(DEFAULT_MODEL), help="checkpoint directory (default: the embedded model)")
    p.add_argument("--text", help="UTF-8 text file to score")
    p.add_argument("--mqar", type=int, metavar="PAIRS",
                   help="instead of a text: MQAR accuracy with PAIRS key-value pairs")
    p.add_argument("--mqar-length", type=positive_int, default=256, help="MQAR sequence length (default 256)")
    p.add_argument("--mqar-examples", type=positive_int, default=64, help="MQAR examples (default 64)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="MQAR data seed (default 0)")
    p.add_argument("--plan", default="attention", help="mode plan (default attention)")
    p.add_argument("--backend", default="reference", choices=list(BACKENDS), help="backend (default reference)")
    p.add_argument("--window", type=positive_int,
                   help="tokens per scored window, each from an empty context (default: the model's max_context)")
    p.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens")
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_eval)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if name == e.name or name.startswith(f"{e.name}."):
                continue  # that part of Oryx is not installed
            raise
        module.register(sub)
    return parser


def command_prog(args) -> str:
    """The command that ran, as its parser names itself in usage errors: `oryx eval`, `oryx data build`
    (a command with subcommands parses them into `subcommand`)."""
    sub = getattr(args, "subcommand", None)
    return f"oryx {args.command}" + (f" {sub}" if sub else "")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prog = command_prog(args)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused a read or write: a full disk, a read-only or missing path
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def command_line() -> list:
    """`oryx` as a subprocess argv from this interpreter (`python -m oryx_core`), installed or on PYTHONPATH;
    under torchrun the two items are its `-m oryx_core` arguments."""
    return [sys.executable, "-m", "oryx_core"]


if __name__ == "__main__":
    sys.exit(main())
