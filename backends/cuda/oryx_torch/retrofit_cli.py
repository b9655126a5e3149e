"""`oryx retrofit SRC DST`: teach SRC's recurrent mode from its own attention mode (oryx_torch.retrofit).

The parser lives in oryx_core.backend_commands, which imports this module when the command runs.
Several GPUs: `torchrun --nproc_per_node=N $(which oryx) retrofit SRC DST ...`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from oryx_core.output import check_output, replacing_allowed


def cmd_retrofit(args) -> None:
    from .retrofit import EVAL_PLANS, STUDENT_PLANS, RetrofitConfig, retrofit

    sources = [("SRC", args.src), ("--data", args.data)]
    check_output(args.dst, "adapter" if args.adapter else "checkpoint", sources, args.force, "DST")
    check_output(args.run_dir or f"{args.dst}.run", "run", sources, args.force, "--run-dir")
    if args.shared_rank:
        return cmd_shared_stage(args)
    cfg = RetrofitConfig(
        src=args.src, out=args.run_dir or f"{args.dst}.run", data=args.data, mixer=args.mixer,
        recurrent_scale=None if args.recurrent_scale <= 0 else args.recurrent_scale,
        layer_tokens=args.layer_tokens, tokens=args.tokens, kv_weight=args.kv_weight,
        recurrent_kv_convs=args.recurrent_kv_convs, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr=args.min_lr if args.min_lr is not None else args.lr / 10, warmup=args.warmup,
        student_plans=args.plans or list(STUDENT_PLANS), eval_plans=list(EVAL_PLANS),
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every, seed=args.seed,
        device=args.device, progress=not args.json)
    summary = retrofit(cfg, resume=args.resume, stop_after=args.stop_after)
    if "model" in summary:
        with replacing_allowed(args.dst if args.force else None):
            summary["model"] = str(publish(Path(summary["model"]), Path(args.dst), args.adapter, args.src))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2) if args.json else
              f"step {summary['step']}: loss {summary['loss']}, eval {summary['eval']}, "
              f"model {summary.get('model', '(not finished: --resume continues)')}")


def cmd_shared_stage(args) -> None:
    from .retrofit import EVAL_PLANS, STUDENT_PLANS
    from .retrofit_shared import SharedStageConfig, read_lowrank, retrofit_shared

    if args.layer_tokens:
        raise ValueError("--layer-tokens: the shared stage (--shared-rank) has one budget, --tokens; run stages (a) "
                         "and (b) first, then the shared stage on their result")
    if args.kv_weight:
        raise ValueError("--kv-weight: the shared stage (--shared-rank) fits the logits only")
    if args.recurrent_kv_convs:
        raise ValueError("--recurrent-kv-convs: the shared stage keeps SRC's sharing (give the convolutions in "
                         "stages (a) and (b) first)")
    if args.mixer is not None:
        raise ValueError("--mixer: the shared stage keeps SRC's mixer (SRC is an already retrofitted checkpoint)")
    cfg = SharedStageConfig(
        src=args.src, out=args.run_dir or f"{args.dst}.run", data=args.data, rank=args.shared_rank,
        targets=[t.strip() for t in args.shared_targets.split(",") if t.strip()], tokens=args.tokens,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr=args.min_lr if args.min_lr is not None else args.lr / 10, recurrent_lr_scale=args.recurrent_lr_scale,
        warmup=args.warmup, attention_share=args.attention_share, attention_weight=args.attention_weight,
        attention_weight_fixed=args.attention_weight_fixed,
        attention_budget=args.attention_budget, student_plans=args.plans or list(STUDENT_PLANS),
        eval_plans=list(EVAL_PLANS), eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, seed=args.seed, device=args.device, progress=not args.json)
    summary = retrofit_shared(cfg, resume=args.resume, stop_after=args.stop_after)
    if "model" in summary:
        with replacing_allowed(args.dst if args.force else None):
            summary["model"] = str(publish(Path(summary["model"]), Path(args.dst), args.adapter, args.src,
                                           read_lowrank(summary["lowrank"])))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2) if args.json else
              f"step {summary['step']}: loss {summary['loss']}, best {summary['best']}, "
              f"model {summary.get('model', '(not finished: --resume continues)')}")


def publish(model_dir: Path, dst: Path, adapter: bool, src: str, lowrank: dict | None = None) -> Path:
    """The finished run's model to DST: the whole checkpoint, or (--adapter) its recurrent adapter."""
    from oryx_core.atomic import atomic_directory

    if adapter:
        from oryx_core.adapter import adapter_base, is_adapter, save_adapter_of

        base, base_ref = adapter_base(src) if is_adapter(src) else (src, None)  # adapters do not stack
        return save_adapter_of(model_dir, dst, base=base, base_ref=base_ref, lowrank=lowrank)
    import shutil

    atomic_directory(dst, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in sorted(model_dir.iterdir())])
    return dst
