"""Why retrieval fails with attention on the question only: the default model (SmolLM2-135M-Instruct retrofitted)
under plans that give attention to more than the question, on the CPU (docs/results.md, "Retrieval probe").

    python experiments/retrieval_probe.py [--model DIR] [--lengths 512 1024] [--examples 20] [--out FILE]

For the passkey and key-value tasks of retrofit_smollm2.py (same examples, same seeds), exact-match accuracy of
the answer under teacher forcing per plan, with each plan's share of (layer, token) pairs in attention:
    attention, recurrent, last:question      as in retrofit_smollm2.py
    first-K+question     layers 0..K-1 attend for every token, the others for the question and answer only
    every-4th-layer+question   every fourth layer attends for every token, the others as last:question
    needle+question      (passkey) attention for the needle sentence and the question only: an oracle that says
                         whether keys and values written by the recurrent mode are readable at all
Then key drift: on each task's first example, per layer, the relative difference between the keys (after RoPE) of
the context tokens that the all-recurrent plan writes into the KV cache and those of the all-attention plan.
The first layer's keys read the embeddings only, so they agree; how the difference grows with depth is how far
the recurrent mode's hidden states stray from the attention mode's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from retrofit_smollm2 import kv_example, passkey_example  # noqa: E402

NEEDLE = "The pass key is "


def plans_for(layers: int, total: int, question: int, needle: tuple[int, int] | None) -> dict:
    """{name: modes [L, 1, T] bool} for a sequence of `total` tokens whose last `question` are the question and
    answer, and (passkey) the needle sentence at token span `needle`."""
    last = np.zeros(total, bool)
    last[total - question:] = True
    per_layer = lambda rows: np.stack(rows)[:, None, :]  # noqa: E731
    plans = {"attention": per_layer([np.ones(total, bool)] * layers),
             "recurrent": per_layer([np.zeros(total, bool)] * layers),
             "last:question": per_layer([last] * layers)}
    for k in (1, 2, 4, 8):
        if k < layers:
            plans[f"first-{k}+question"] = per_layer([np.ones(total, bool)] * k + [last] * (layers - k))
    plans["every-4th-layer+question"] = per_layer([np.ones(total, bool) if i % 4 == 0 else last
                                                   for i in range(layers)])
    if needle is not None:
        oracle = last.copy()
        oracle[needle[0]:needle[1]] = True
        plans["needle+question"] = per_layer([oracle] * layers)
    return plans


def examples(tokenizer, task: str, length: int, n: int) -> list[dict]:
    """retrofit_smollm2's examples (same seed per length): ids, where the answer starts, question tokens, needle."""
    make = passkey_example if task == "passkey" else kv_example
    rng = np.random.default_rng(1000 + length)
    out = []
    for _ in range(n):
        text, answer = make(tokenizer, rng, length)
        encoded = tokenizer.encode(text)
        prompt_ids = encoded.ids
        ids = prompt_ids + tokenizer.encode(answer).ids
        question_start = text.rfind("\n") + 1
        question = len(ids) - len(tokenizer.encode(text[:question_start]).ids)
        needle = None
        if task == "passkey":
            at = text.index(NEEDLE)
            end = text.index(" is the pass key. ", at) + len(" is the pass key.")
            # the tokens whose characters overlap the needle sentence (a prefix tokenized alone would end in a
            # space token that the whole text merges into the next word)
            inside = [i for i, (a, b) in enumerate(encoded.offsets) if a < end and b > at]
            needle = (inside[0], inside[-1] + 1)
        out.append(dict(ids=ids, answer_start=len(prompt_ids), question=question, needle=needle))
    return out


def accuracy(model, tokenizer, task: str, length: int, n: int) -> dict:
    import torch

    layers = model.cfg.n_layers
    hits, shares = {}, {}
    for ex in examples(tokenizer, task, length, n):
        ids, start = ex["ids"], ex["answer_start"]
        device = model.embed.weight.device
        tokens = torch.tensor([ids], device=device)
        for name, modes in plans_for(layers, len(ids), ex["question"], ex["needle"]).items():
            with torch.inference_mode():
                logits = model(tokens, torch.from_numpy(modes).to(device))
            hit = logits[0, start - 1:len(ids) - 1].argmax(-1).tolist() == ids[start:]
            hits[name] = hits.get(name, 0) + int(hit)
            shares.setdefault(name, []).append(float(modes.mean()))
    return {name: dict(accuracy=hits[name] / n, attention_share=float(np.mean(shares[name]))) for name in hits}


def key_drift(model, ids: list[int], context: int) -> list[float]:
    """Per layer, ||K_rec - K_attn|| / ||K_attn|| over the first `context` tokens' cached keys."""
    import torch

    keys = {}
    for name, mode in (("attention", True), ("recurrent", False)):
        cache = model.make_cache(1, len(ids))
        with torch.inference_mode():
            model(torch.tensor([ids], device=model.embed.weight.device), mode, cache=cache)
        keys[name] = [layer.keys[:, :, :context].double() for layer in cache.layers]
    return [float((r - a).norm() / a.norm()) for a, r in zip(keys["attention"], keys["recurrent"])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="an Oryx checkpoint (default: the default model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--tasks", nargs="+", default=["passkey", "kv"], choices=["passkey", "kv"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.examples < 1 or min(args.lengths) < 64:
        ap.error("--examples must be positive and --lengths at least 64")
    from tokenizers import Tokenizer

    from oryx_core.atomic import atomic_write_bytes
    from oryx_torch.model import OryxModel

    from oryx_core.default import DEFAULT_ADAPTER

    path = args.model or DEFAULT_ADAPTER  # an adapter loads merged into its base
    model = OryxModel.from_checkpoint(path, dtype="float32").eval()
    tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    began = time.time()
    report = dict(model=str(path), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=platform.processor() or platform.machine(),
                  command=" ".join(["retrieval_probe.py"] + (sys.argv[1:] if argv is None else list(argv))),
                  examples=args.examples, accuracy={}, key_drift={})
    for task in args.tasks:
        report["accuracy"][task] = {}
        for length in args.lengths:
            report["accuracy"][task][str(length)] = result = accuracy(model, tokenizer, task, length, args.examples)
            print(f"{task} {length}: " + ", ".join(f"{k} {v['accuracy']:.2f} ({v['attention_share']:.1%})"
                                                  for k, v in result.items()), flush=True)
        first = examples(tokenizer, task, args.lengths[0], 1)[0]
        drift = key_drift(model, first["ids"], len(first["ids"]) - first["question"])
        report["key_drift"][task] = drift
        print(f"{task} key drift by layer: " + " ".join(f"{d:.3f}" for d in drift), flush=True)
    report["seconds"] = round(time.time() - began, 1)
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
