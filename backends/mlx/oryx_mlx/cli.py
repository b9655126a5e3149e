"""`oryx quantize` and `oryx export-mlx-lm` (mlx is imported only inside the commands)."""
from __future__ import annotations

from pathlib import Path

from oryx_core.cli import FORCE_FLAG, emit
from oryx_core.output import check_output, replacing_allowed


def cmd_quantize(args) -> None:
    from oryx_core.weights import TOKENIZER_FILE

    from .generate import load_model
    from .quantize import quantize_model, save_quantized

    check_output(args.out, "checkpoint", [("PATH", args.path)], args.force)
    model = load_model(args.path, args.dtype)
    quantize_model(model, args.bits, args.group_size)
    tokenizer = Path(args.path) / TOKENIZER_FILE
    with replacing_allowed(args.out if args.force else None):
        out = save_quantized(model, args.out, args.bits, args.group_size,
                             tokenizer.read_text() if tokenizer.exists() else None)
    size = sum(f.stat().st_size for f in out.iterdir())
    emit(args, {"path": str(out), "bits": args.bits, "group_size": args.group_size, "size_on_disk_bytes": size},
         [f"wrote {out}: {args.bits}-bit, groups of {args.group_size}, {size / 2**20:.2f} MiB on disk"])


def cmd_export_mlx_lm(args) -> None:
    from .export import export_mlx_lm

    check_output(args.out, "mlx-lm", [("PATH", args.path)], args.force)
    with replacing_allowed(args.out if args.force else None):
        out = export_mlx_lm(args.path, args.out, plan=args.plan, bits=args.bits, group_size=args.group_size)
    emit(args, {"path": str(out), "plan": args.plan, "bits": args.bits},
         [f"wrote {out} (plan {args.plan}); it holds code (oryx_mlx_lm.py): with Oryx installed load it with "
          f"oryx_mlx.export.load_export({str(out)!r}), which runs none of it; elsewhere "
          f"mlx_lm.load({str(out)!r}, trust_remote_code=True) runs it"])


def register(subparsers) -> None:
    json_flag = dict(action="store_true", help="print machine-readable JSON")
    bits_choices = [2, 3, 4, 5, 6, 8]

    p = subparsers.add_parser("quantize", help="quantise a checkpoint to 4 or 8 bits (MLX affine)",
                              description="Quantise every projection and the embedding of an Oryx checkpoint group-wise "
                                          "(MLX affine quantisation); recurrent gates, convs and norms stay full precision. "
                                          "Writes an Oryx checkpoint the MLX backend loads.")
    p.add_argument("path", help="full-precision checkpoint directory")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--bits", type=int, default=4, choices=bits_choices, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="weights per scale (default 64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of scales, biases and unquantised tensors (default: as stored)")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_quantize)

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
    p.add_argument("--bits", type=int, choices=bits_choices, help="quantise on export")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="weights per scale (default 64)")
    p.add_argument("--force", **FORCE_FLAG)
    p.add_argument("--json", **json_flag)
    p.set_defaults(func=cmd_export_mlx_lm)
