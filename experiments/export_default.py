"""Picks the best Oryx model that experiment 1 trained and writes it as the embedded default model.

    python3 experiments/export_default.py --lm-results DIR/lm_budget.json [MORE.json ...] --out oryx_core/default_model

"Best": the lowest mean held-out loss over the all-attention, all-recurrent and mixed plans
(the model must serve every plan). Written in bfloat16 (shards of at most 16 MiB) with the
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

SELECTION_PLANS = ("attention", "recurrent", "mixed")


def best_oryx(results: list[dict]) -> tuple[dict, dict]:
    """(model entry, the lm_budget results holding it) of the best Oryx model over all results."""
    candidates = [(m, lm) for lm in results for m in lm["models"] if m["modes"] == "mixed"]
    if not candidates:
        raise ValueError("--lm-results: no Oryx (mixed-mode) model in the results")
    return min(candidates, key=lambda c: sum(c[0]["eval_loss"][p] for p in SELECTION_PLANS) / len(SELECTION_PLANS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-results", required=True, nargs="+", help="lm_budget.json files (one per GPU)")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    chosen, lm = best_oryx([json.loads(Path(path).read_text()) for path in args.lm_results])
    ckpt = load_checkpoint(chosen["checkpoint"])
    tokenizer_path = Path(chosen["checkpoint"]) / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_text() if tokenizer_path.exists() else None
    if tokenizer_json is None:
        raise FileNotFoundError(f"{tokenizer_path}: the trained model has no tokenizer.json")
    config = ckpt.config.replace(max_context=lm["settings"]["seq_len"])
    save_checkpoint(args.out, config, ckpt.params, dtype=args.dtype, tokenizer_json=tokenizer_json)
    print(json.dumps({"default_model": chosen["name"], "from": chosen["checkpoint"], "dtype": args.dtype,
                      "eval_loss": chosen["eval_loss"], "steps": chosen["steps"], "tokens": chosen["tokens"]}))


if __name__ == "__main__":
    run_main(main)
