"""The handlers of `oryx quantize` and `oryx export-mlx-lm`; their parsers are oryx_core.backend_commands'."""
from __future__ import annotations

from pathlib import Path

from oryx_core.cli import emit
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
