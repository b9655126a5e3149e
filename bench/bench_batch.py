"""Batched decode on the PyTorch backend against transformers' batched `generate`, on the same weights.

    python bench/bench_batch.py runs/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --batches 1 8 32

For each batch size B: B distinct prompts, `--new-tokens` greedy tokens each (no stop tokens), timed
from the call to the last token (prefill included), best of `--repeats`, the contestants taking turns. Ours: oryx_torch.batch's
BatchGenerator (one per batch size and plan, kept across repeats, as the server keeps it; CUDA graphs
per batch-size bucket on CUDA) under the attention plan (the plan that equals the Llama source), under
prefill-attention and under recurrent (with --compare-prefill also the attention plan with its prompts prefilled one forward
per distinct length instead of padded into one); transformers: LlamaForCausalLM loaded from the GGUF, prompts left-padded, one
`generate` call. Both run on `--device` in `--dtype`. An untimed warm-up call per contestant comes first
(kernel compilation, graph capture).

Token agreement: how many sequences of the attention plan equal transformers' in `--dtype` (in bf16 two
implementations of one model round differently, and near-tied logits then pick different tokens, so this
alone says little), and with `--check-dtype float32` the same comparison with both models loaded again in
fp32 (TF32 off), untimed: per batch the sequences equal, the mean length of the common prefix, and, for each
sequence that differs, transformers' own logit margin between its token and ours at the first difference
(a margin near 0 is a near-tie that any rounding decides; a large one is a bug).
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
    ap.add_argument("--compare-run-ahead", action="store_true",
                    help="also run the attention plan with the next step launched before each step's tokens are "
                         "read back (BatchGenerator(run_ahead=True); the default runs ahead on the CPU only, "
                         "batch.RUN_AHEAD_ON_CUDA)")
    ap.add_argument("--device", default="cpu", help="torch device for both models (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of both models (default float32)")
    ap.add_argument("--check-dtype", choices=["float32"],
                    help="also compare greedy tokens with transformers' with both models in this dtype (untimed)")
    ap.add_argument("--plans", nargs="+", default=["attention", "prefill-attention", "recurrent"],
                    help="our timed plans (default attention prefill-attention recurrent; attention is always run)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    plans = ["attention"] + [p for p in args.plans if p != "attention"]
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
        for plan in plans:
            requests = [SequenceRequest(tok.encode(t).ids, N, plan) for t in texts]
            gen = BatchGenerator(ours, max_batch=B, capacity=max(len(r.prompt_ids) for r in requests) + N)
            runs[f"oryx_{plan}"] = lambda gen=gen, requests=requests: gen.generate(requests)
        if args.compare_prefill:  # the attention plan again, the prompts prefilled one forward per distinct length
            requests = [SequenceRequest(tok.encode(t).ids, N, "attention") for t in texts]
            gen = BatchGenerator(ours, max_batch=B, capacity=max(len(r.prompt_ids) for r in requests) + N,
                                 prefill="segmented")
            runs["oryx_attention_segmented_prefill"] = lambda gen=gen, requests=requests: gen.generate(requests)
        if args.compare_run_ahead:  # the attention plan again, run ahead and step by step
            requests = [SequenceRequest(tok.encode(t).ids, N, "attention") for t in texts]
            for name, ahead in (("run_ahead", True), ("step_by_step", False)):
                gen = BatchGenerator(ours, max_batch=B, capacity=max(len(r.prompt_ids) for r in requests) + N,
                                     run_ahead=ahead)
                runs[f"oryx_attention_{name}"] = lambda gen=gen, requests=requests: gen.generate(requests)
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
        if args.out:  # every row saved as it lands
            write(args, rows, complete=False)
    if args.check_dtype:
        with torch.backends.cudnn.flags(allow_tf32=False):
            previous, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
            try:
                check = dtype_check(args, hf_tok, where, load_args, tok, N)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
        for row in rows:
            row[f"{args.check_dtype}_check"] = check[row["batch"]]
            print(json.dumps({"batch": row["batch"], f"{args.check_dtype}_check": check[row["batch"]]}), flush=True)
    if args.out:
        write(args, rows, complete=True)
    return 0


def agreement(ours: list[list[int]], theirs: list[list[int]], logits: list[torch.Tensor]) -> dict:
    """Sequences equal, mean common prefix, and at each differing sequence's first difference transformers' logit
    margin between its token and ours (logits: per step [B, V], transformers' own)."""
    margins, prefixes = [], []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        same = next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(same)
        if a != b and same < len(logits):
            step = logits[same][i].float()
            margins.append(float(step[b[same]] - step[a[same]]))
    return {"sequences_equal": sum(a == b for a, b in zip(ours, theirs)), "sequences": len(ours),
            "mean_equal_prefix_tokens": sum(prefixes) / len(prefixes),
            "margins_at_first_difference": [round(m, 6) for m in margins]}


def dtype_check(args, hf_tok, where, load_args, tok, N: int) -> dict[int, dict]:
    """{batch: agreement} of our attention plan and transformers' greedy tokens, both models in args.check_dtype."""
    import transformers

    from oryx_core.backend import get_backend
    from oryx_torch.batch import BatchGenerator, SequenceRequest

    dtype = getattr(torch, args.check_dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, **load_args, dtype=dtype).to(args.device).eval()
    ours = get_backend("torch").load(args.path, dtype=args.check_dtype, device=args.device).model
    out = {}
    for B in args.batches:
        texts = prompts(B)
        enc = hf_tok(texts, return_tensors="pt", padding=True).to(args.device)
        with torch.inference_mode():
            gen = hf.generate(**enc, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                              pad_token_id=hf_tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
        theirs = gen.sequences[:, enc["input_ids"].shape[1]:].tolist()
        requests = [SequenceRequest(tok.encode(t).ids, N, "attention") for t in texts]
        mine = BatchGenerator(ours, max_batch=B, capacity=max(len(r.prompt_ids) for r in requests) + N).generate(requests)
        out[B] = agreement(mine, theirs, list(gen.logits))
    del hf, ours
    return out


def write(args, rows: list[dict], complete: bool) -> None:
    """The JSON at args.out; `complete` False while rows are still to come."""
    import transformers

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
              "weights": f"gguf {Path(args.gguf).name}" if args.gguf else f"hf {args.hf}",
              "dtype": args.dtype, "check_dtype": args.check_dtype, "cuda_graphs": args.device.startswith("cuda"),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "command": " ".join(sys.argv), "complete": complete,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    sys.exit(main())
