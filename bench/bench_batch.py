"""Batched decode on the PyTorch backend against transformers' batched `generate`, on the same weights.

    python bench/bench_batch.py runs/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --batches 1 8 32

For each batch size B: B distinct prompts, `--new-tokens` greedy tokens each (no stop tokens), timed
from the call to the last token (prefill included), best of `--repeats`, the contestants taking turns. Ours: oryx_torch.batch's
BatchGenerator (one per batch size and plan, kept across repeats, as the server keeps it; CUDA graphs
per batch-size bucket on CUDA) under the attention plan (the plan that equals the Llama source) and under
prefill-attention (with --compare-prefill also the attention plan with its prompts prefilled one forward
per distinct length instead of padded into one); transformers: LlamaForCausalLM loaded from the GGUF, prompts left-padded, one
`generate` call. Both run on `--device` in `--dtype`. Also reports how many sequences' tokens agree with
transformers' exactly. An untimed warm-up call per contestant comes first (kernel compilation, graph capture).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from oryx_core.atomic import atomic_write_bytes

PROMPTS = ["The history of the city", "Write a short poem about the sea.", "def fibonacci(n):",
           "The three primary colours are", "Once upon a time, in a small village,", "The os module provides",
           "Explain why the sky is blue.", "A recipe for bread:"]


def prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(n)]


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="Oryx checkpoint converted from --gguf or --hf")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="the GGUF file the checkpoint came from (transformers loads it)")
    source.add_argument("--hf", help="the HF checkpoint directory the checkpoint came from (e.g. bench/random_llama.py's)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--compare-prefill", action="store_true",
                    help="also run the attention plan with the prompts prefilled one forward per distinct length "
                         "instead of padded into one")
    ap.add_argument("--device", default="cpu", help="torch device for both models (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of both models (default float32)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from oryx_core.backend import get_backend
    from oryx_core.tokenizer import load_tokenizer
    from oryx_torch.batch import BatchGenerator, SequenceRequest

    if args.gguf:
        gguf = Path(args.gguf)
        where, load_args = gguf.parent, dict(gguf_file=gguf.name)
    else:
        where, load_args = Path(args.hf), {}
    hf_tok = transformers.AutoTokenizer.from_pretrained(where, **load_args)
    hf_tok.padding_side = "left"
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    dtype = getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, **load_args, dtype=dtype).to(args.device).eval()
    ours = get_backend("torch").load(args.path, dtype=args.dtype, device=args.device).model
    tok = load_tokenizer(args.path)
    N, rows = args.new_tokens, []
    for B in args.batches:
        texts = prompts(B)
        enc = hf_tok(texts, return_tensors="pt", padding=True).to(args.device)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(**enc, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                  pad_token_id=hf_tok.pad_token_id)
            return out[:, enc["input_ids"].shape[1]:].tolist()

        runs = {"transformers": run_hf}
        for plan in ("attention", "prefill-attention"):
            requests = [SequenceRequest(tok.encode(t).ids, N, plan) for t in texts]
            gen = BatchGenerator(ours, max_batch=B, capacity=max(len(r.prompt_ids) for r in requests) + N)
            runs[f"oryx_{plan}"] = lambda gen=gen, requests=requests: gen.generate(requests)
        if args.compare_prefill:  # the attention plan again, the prompts prefilled one forward per distinct length
            requests = [SequenceRequest(tok.encode(t).ids, N, "attention") for t in texts]
            gen = BatchGenerator(ours, max_batch=B, capacity=max(len(r.prompt_ids) for r in requests) + N,
                                 prefill="segmented")
            runs["oryx_attention_segmented_prefill"] = lambda gen=gen, requests=requests: gen.generate(requests)
        for run in runs.values():
            run()  # warm-up, untimed
        # the contestants take turns, repeat after repeat, so a load that drifts over the run hits all alike
        best, tokens = {name: float("inf") for name in runs}, {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                seconds, tokens[name] = best_time(run, 1)
                best[name] = min(best[name], seconds)
        row = {"batch": B, "new_tokens": N, **{f"{name}_tokens_per_second": B * N / best[name] for name in runs},
               "sequences_equal_to_transformers": sum(a == b for a, b in zip(tokens["oryx_attention"],
                                                                             tokens["transformers"]))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "weights": f"gguf {Path(args.gguf).name}" if args.gguf else f"hf {args.hf}",
              "dtype": args.dtype, "cuda_graphs": args.device.startswith("cuda"), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "command": " ".join(sys.argv), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
