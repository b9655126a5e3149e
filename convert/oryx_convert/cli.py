"""`oryx convert SRC DST --from KIND --to KIND [--dtype] [--quantize BITS] [--group-size N]`.

torch and mlx are imported only when a conversion needs them, so `oryx --help` works without.
"""
from __future__ import annotations

from oryx_core.argtypes import non_negative_int
from oryx_core.cli import FORCE_FLAG, emit
from oryx_core.output import check_output, replacing_allowed

OUTPUT_KINDS = {"oryx": "checkpoint", "torch-state-dict": "torch", "mlx-weights": "mlx", "mlx-lm": "mlx-lm",
                "hf": "checkpoint"}


def cmd_convert(args) -> None:
    from .api import convert

    check_output(args.dst, OUTPUT_KINDS[args.to_kind], [("SRC", args.src)], args.force, "DST")
    with replacing_allowed(args.dst if args.force else None):
        out = convert(args.src, args.dst, from_kind=args.from_kind, to_kind=args.to_kind, dtype=args.dtype,
                      quantize=args.quantize, group_size=args.group_size, mixer=args.mixer, seed=args.seed,
                      dequantize=args.dequantize, plan=args.plan)
    size = sum(f.stat().st_size for f in out.iterdir())
    emit(args, {"path": str(out), "from": args.from_kind, "to": args.to_kind, "dtype": args.dtype,
                "quantize": args.quantize, "size_on_disk_bytes": size},
         [f"wrote {out} ({args.to_kind}{', ' + args.dtype if args.dtype else ''}"
          f"{f', {args.quantize}-bit' if args.quantize else ''}), {size / 2**20:.2f} MiB on disk"])


def register(subparsers) -> None:
    from .api import GROUP_SIZES, QUANT_BITS, SOURCE_KINDS, TARGET_KINDS
    from oryx_core.weights import FLOAT_DTYPES

    p = subparsers.add_parser(
        "convert", help="convert between backends and dtypes, or import Llama (HF/GGUF), fla GDN, mamba-ssm Mamba-2",
        description="Convert SRC to DST. Sources: an Oryx checkpoint, a torch-state-dict or mlx-weights directory written by this command, "
                    "a Hugging Face Llama directory, a Llama GGUF file (any tensor type the gguf package dequantises, K-quants included), an fla "
                    "GatedDeltaNetForCausalLM directory, a mamba-ssm MambaLMHeadModel (Mamba-2) directory. Targets: "
                    "oryx (what every oryx command reads; MLX-quantised with --quantize), hf, torch-state-dict (safetensors.torch, "
                    "for load_state_dict), mlx-weights (mx.save_safetensors, for load_weights), mlx-lm (for mlx_lm.load).")
    p.add_argument("src", help="source directory (or .gguf file)")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--from", dest="from_kind", default="auto", choices=["auto", *SOURCE_KINDS],
                   help="source kind (default: detected from the file or config.json)")
    p.add_argument("--to", dest="to_kind", default="oryx", choices=list(TARGET_KINDS), help="target kind (default oryx)")
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), help="cast float tensors (default: as stored; imports give float32)")
    p.add_argument("--quantize", type=int, choices=list(QUANT_BITS), metavar="BITS",
                   help="MLX affine quantisation to BITS (2, 3, 4, 5, 6, 8) for --to oryx/mlx-weights/mlx-lm")
    p.add_argument("--group-size", type=int, default=64, choices=list(GROUP_SIZES),
                   help="weights per quantisation scale (default 64)")
    p.add_argument("--dequantize", action="store_true", help="expand an MLX-quantised source to float weights first")
    p.add_argument("--mixer", choices=["gdn", "mamba2"], default="gdn",
                   help="recurrent mixer given to a Llama import (default gdn)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of a Llama import's initialised recurrent gates (default 0)")
    p.add_argument("--plan", default="attention", help="mode plan of an --to mlx-lm or hf export (default attention)")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_convert)
