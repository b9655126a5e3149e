"""`oryx retrofit SRC DST`: teach SRC's recurrent mode from its own attention mode (oryx_torch.retrofit).

Several GPUs: `torchrun --nproc_per_node=N $(which oryx) retrofit SRC DST ...`. torch is imported only
when the command runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from oryx_core.argtypes import finite_float, non_negative_float, non_negative_int, positive_float, positive_int
from oryx_core.cli import FORCE_FLAG
from oryx_core.output import check_output, replacing_allowed


def cmd_retrofit(args) -> None:
    from .retrofit import EVAL_PLANS, STUDENT_PLANS, RetrofitConfig, retrofit

    sources = [("SRC", args.src), ("--data", args.data)]
    check_output(args.dst, "adapter" if args.adapter else "checkpoint", sources, args.force, "DST")
    check_output(args.run_dir or f"{args.dst}.run", "run", sources, args.force, "--run-dir")
    cfg = RetrofitConfig(
        src=args.src, out=args.run_dir or f"{args.dst}.run", data=args.data, mixer=args.mixer,
        recurrent_scale=None if args.recurrent_scale <= 0 else args.recurrent_scale,
        layer_tokens=args.layer_tokens, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
        warmup=args.warmup, student_plans=args.plans or list(STUDENT_PLANS), eval_plans=list(EVAL_PLANS),
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


def publish(model_dir: Path, dst: Path, adapter: bool, src: str) -> Path:
    """The finished run's model to DST: the whole checkpoint, or (--adapter) its recurrent adapter."""
    from oryx_core.atomic import atomic_directory

    if adapter:
        from oryx_core.adapter import save_adapter_of

        return save_adapter_of(model_dir, dst, base=src)
    import shutil

    atomic_directory(dst, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in sorted(model_dir.iterdir())])
    return dst


def register(subparsers) -> None:
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
    p.set_defaults(func=cmd_retrofit)
