"""Picks the best Oryx model that experiment 1 trained and writes it as the embedded default model.

    python3 experiments/export_default.py --lm-results DIR/lm_budget.json [MORE.json ...] --out oryx_core/default_model
    python3 experiments/export_default.py --checkpoint RUN/checkpoints/step-N/model --max-context 512 --out ...

"Best": the lowest mean held-out loss over the all-attention, all-recurrent and mixed plans
(the model must serve every plan); --checkpoint names the model instead (experiments/train_default.py
uses it). Written in bfloat16 (shards of at most 16 MiB) with the
tokenizer it was trained with, and max_context set to the context it was trained at (the
preset's 2048 would make `oryx eval` score windows its attention never saw); the choice and
its losses are printed as one JSON line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, run_main  # noqa: F401  (ROOT: import paths)

from oryx_core.weights import load_checkpoint, save_checkpoint

EMBEDDED_SHARD_BYTES = 16 * 1024 * 1024  # the package ships small files

SELECTION_PLANS = ("attention", "recurrent", "mixed")


def best_oryx(results: list[dict]) -> tuple[dict, dict]:
    """(model entry, the lm_budget results holding it) of the best Oryx model over all results."""
    candidates = [(m, lm) for lm in results for m in lm["models"] if m["modes"] == "mixed"]
    if not candidates:
        raise ValueError("--lm-results: no Oryx (mixed-mode) model in the results")
    return min(candidates, key=lambda c: sum(c[0]["eval_loss"][p] for p in SELECTION_PLANS) / len(SELECTION_PLANS))


def write_default(checkpoint: str | Path, max_context: int, out: str | Path, dtype: str = "bfloat16") -> None:
    """The checkpoint as the default model: `dtype` weights, its tokenizer, max_context = the trained context."""
    ckpt = load_checkpoint(checkpoint)
    tokenizer_path = Path(checkpoint) / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{tokenizer_path}: the trained model has no tokenizer.json")
    config = ckpt.config.replace(max_context=max_context)
    save_checkpoint(out, config, ckpt.params, dtype=dtype, tokenizer_json=tokenizer_path.read_text(),
                    shard_bytes=EMBEDDED_SHARD_BYTES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--lm-results", nargs="+", help="lm_budget.json files (one per GPU)")
    which.add_argument("--checkpoint", help="an Oryx checkpoint directory (with tokenizer.json) to export as it is")
    parser.add_argument("--max-context", type=int, help="with --checkpoint: the context it was trained at")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    if args.checkpoint:
        if not args.max_context or args.max_context < 1:
            raise ValueError("--max-context: --checkpoint needs the context the model was trained at (>= 1)")
        write_default(args.checkpoint, args.max_context, args.out, args.dtype)
        print(json.dumps({"default_model": args.checkpoint, "dtype": args.dtype, "max_context": args.max_context}))
        return
    chosen, lm = best_oryx([json.loads(Path(path).read_text()) for path in args.lm_results])
    write_default(chosen["checkpoint"], lm["settings"]["seq_len"], args.out, args.dtype)
    print(json.dumps({"default_model": chosen["name"], "from": chosen["checkpoint"], "dtype": args.dtype,
                      "eval_loss": chosen["eval_loss"], "steps": chosen["steps"], "tokens": chosen["tokens"]}))


if __name__ == "__main__":
    run_main(main)
