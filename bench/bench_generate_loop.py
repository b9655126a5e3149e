"""Decode speed of the generation loop users run (oryx_core.generation.generate, as `oryx generate` drives it):
greedy tokens read back step by step against run ahead on the device (the backend's greedy_chain).

    python bench/bench_generate_loop.py [--backend torch|mlx] [--device cpu|cuda] [--dtype bfloat16] [--json OUT]
    python bench/bench_generate_loop.py --model DIR ...      # a checkpoint instead of random weights
    python bench/bench_generate_loop.py --tiny                # a smoke run on the CPU in seconds (tested in CI)

Without --model the weights are random ones of SmolLM2-135M's shape (a transformers LlamaForCausalLM imported
exactly, recurrent tensors at their init), written once to a temporary checkpoint. Each plan's prompt is the same
random ids. The torch backend gives each call a cache its pool holds from an earlier call (with the CUDA graphs
captured for it); the third loop, "ahead, new cache", turns the pool off, so each call makes its own cache and,
on CUDA, captures its graphs inside the timed tokens, as a single `oryx generate` does. Rounds interleave the
loops; the table gives the median decode tokens/s (stats.generation_tps) over rounds, after a warm-up call per
plan and loop, and checks that every loop gave the same tokens.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_model import SMOLLM2_135M, TINY, hf_config_dict, llama_model, oryx_twin  # bench/ is the script's folder

from oryx_core import generation
from oryx_core.atomic import atomic_write_bytes
from oryx_core.backend import load_model

LOOPS = ("step by step", "ahead", "ahead, new cache")


def random_checkpoint(shape: dict, folder: Path, sharing: str = "kv") -> Path:
    """Random weights of `shape` as an Oryx checkpoint in `folder`."""
    hf = hf_config_dict(shape)
    return oryx_twin(hf, llama_model(hf, None, seed=0), sharing).save(folder / "model")


def time_loops(path, backend: str, dtype, device, plans, prompt_length: int, tokens: int, rounds: int) -> dict:
    loops = LOOPS if backend == "torch" else LOOPS[:2]  # the MLX backend pools nothing
    models = {loop: load_model(path, backend, dtype, device) for loop in loops}
    models["step by step"].greedy_chain = None  # the loop then samples and feeds each token from the host
    if "ahead, new cache" in models:
        models["ahead, new cache"].pool_caches = False
    vocab = models["ahead"].config.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_length).tolist()
    rows = {}
    for plan in plans:
        speeds = {loop: [] for loop in loops}
        outputs = {}
        for i in range(rounds + 1):  # the first round warms up (kernels, compilation)
            for loop, model in models.items():
                result = generation.generate(model, None, prompt, tokens, plan, stop_at_end_of_text=False)
                outputs[loop] = result.tokens
                if i:
                    speeds[loop].append(result.stats.generation_tps)
        rows[plan] = {loop: statistics.median(v) for loop, v in speeds.items()}
        rows[plan]["same_tokens"] = all(tokens == outputs["ahead"] for tokens in outputs.values())
        print(f"| {plan} | " + " | ".join(f"{rows[plan][loop]:,.1f}" if loop in rows[plan] else "–" for loop in LOOPS)
              + f" | {rows[plan]['ahead'] / rows[plan]['step by step']:.3f}x | {rows[plan]['same_tokens']} |",
              flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--device", help="cpu or cuda (torch), cpu or gpu (mlx); default: the backend's")
    ap.add_argument("--dtype", help="compute dtype (default: as stored, float32)")
    ap.add_argument("--model", type=Path, help="an Oryx checkpoint (default: random weights of SmolLM2-135M's shape)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model: the smoke test")
    ap.add_argument("--plans", default="attention,recurrent,prefill-attention")
    ap.add_argument("--sharing", choices=("kv", "kv-proj"), default="kv",
                    help="random weights' sharing: kv, or kv-proj (the default model's)")
    ap.add_argument("--prompt-length", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    if min(args.prompt_length, args.tokens, args.rounds) < 1:
        ap.error("--prompt-length, --tokens and --rounds must be >= 1")
    plans = [p for p in args.plans.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or random_checkpoint(TINY if args.tiny else SMOLLM2_135M, Path(tmp), args.sharing)
        loaded = load_model(path, args.backend, args.dtype, args.device)
        device, sharing = loaded.device, loaded.config.sharing
        print(f"{args.backend} on {device}, {args.dtype or 'as stored'}: {args.prompt_length}-token prompt, "
              f"{args.tokens} greedy tokens, median of {args.rounds} rounds")
        print("| plan | step by step tok/s | ahead tok/s | ahead, new cache tok/s | ahead ÷ step by step "
              "| same tokens |\n| --- | --- | --- | --- | --- | --- |")
        rows = time_loops(path, args.backend, args.dtype, args.device, plans, args.prompt_length, args.tokens,
                          args.rounds)
    report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=platform.processor() or platform.machine(), backend=args.backend, device=device,
                  command=" ".join(["bench_generate_loop.py"] + (sys.argv[1:] if argv is None else list(argv))),
                  model=str(args.model) if args.model else ("tiny" if args.tiny else "random SmolLM2-135M shape"),
                  sharing=sharing, rows=rows)
    if args.backend == "torch" and device.startswith("cuda"):
        import torch

        report["card"] = torch.cuda.get_device_name()
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0 if all(r["same_tokens"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
