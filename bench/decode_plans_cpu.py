"""Decode speed and memory of the default model (SmolLM2-135M-Instruct retrofitted to Oryx-GDN) per mode plan and
context length, on the CPU, through the torch and MLX backends.

Each (backend, plan, context) runs in its own process: load the model (float32 on the CPU), a short warm-up
generation under the same plan, then one generation of `--tokens` tokens after a prompt of `context` tokens
(text from data/heldout.txt, repeated), greedy, with no stop token, `--kv-policy drop` and the state policy
`auto`, as `oryx generate` runs it. The KV cache is dropped once the plan has no attention token left: from the
start under `recurrent`, after the prompt under `prefill-attention`; the other plans read it to the end.

Reported per run:
  decode tok/s     stream_generate's generation_tps (the number `oryx generate` prints)
  cache MiB        the cache's own byte count after the last token (KV cache + recurrent state + conv windows)
  decode RSS MiB   the process's peak resident memory while decoding: the kernel's high-water mark (VmHWM),
                   reset when the first token comes out (after the prompt, and after a KV drop at its end)
  MLX peak MiB     MLX's allocator peak over the whole generation, prompt included (mlx only)

Usage: python bench/decode_plans_cpu.py [--backends torch mlx] [--contexts 256 1024 4096]
                                        [--plans attention recurrent ...] [--tokens 64] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLANS = ["attention", "recurrent", "prefill-attention", "last:10%", "every:4:64"]
CONTEXTS = [256, 1024, 4096]
TEXT = REPO / "data" / "heldout.txt"


def status_kib(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Sets the kernel's peak-RSS mark to the current RSS (Linux clear_refs 5); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def prompt_ids(tokenizer, length: int) -> list[int]:
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False).ids
    return (ids * (length // len(ids) + 1))[:length]


SEED_TOKENS = 8  # real tokens run through the model before a synthetic context is filled in


def synthetic_context(backend: str, model, ids: list[int], plan, total: int):
    """A cache holding `len(ids)` tokens, of a generation whose prompt is one token more, without running them all: the first SEED_TOKENS go through the model
    (which shapes the conv windows and the recurrent state), the rest of the KV cache is filled with random keys
    and values and the position advanced. A decode step's work and memory depend on how many tokens the cache
    holds, not on their values; this skips a prefill that MLX's CPU matmul makes take many minutes at 4K."""
    import numpy as np

    context = len(ids)
    kv = plan.attention_after(0, context + 1)  # as generation's kv "drop" policy: no KV if no token attends
    cache = model.make_cache(1, total, kv=kv)
    modes = plan.resolve(total, prompt_length=context + 1)
    model.prefill(cache, np.asarray([ids[:SEED_TOKENS]], dtype=np.int64), modes[None, :SEED_TOKENS] if kv
                  else np.zeros((1, SEED_TOKENS), dtype=bool))
    rest = context - SEED_TOKENS
    if backend == "torch":
        import torch

        with torch.inference_mode():  # the cache's tensors are inference tensors
            for layer in cache.layers:
                if layer.keys is not None:
                    layer.keys[:, :, SEED_TOKENS:context].normal_()
                    layer.values[:, :, SEED_TOKENS:context].normal_()
            cache.advance(rest)
    else:
        import mlx.core as mx

        for layer in cache:
            if not layer.kv_dropped:
                shape_k, shape_v = list(layer.keys.shape), list(layer.values.shape)
                shape_k[2] = shape_v[2] = rest
                layer.append_kv(mx.random.normal(shape_k).astype(layer.keys.dtype),
                                mx.random.normal(shape_v).astype(layer.values.dtype))
            layer.offset = context
        mx.eval([a for layer in cache for a in layer.state])
    assert model.cache_length(cache) == context
    return cache


def run_one(backend: str, plan_text: str, context: int, tokens: int, source: str) -> dict:
    """One measured generation in this process (see the module docstring)."""
    from oryx_core.backend import get_backend
    from oryx_core.default import DEFAULT_MODEL
    from oryx_core.generation import stream_generate
    from oryx_core.plan import ModePlan
    from oryx_core.tokenizer import tokenizer_for

    start = time.perf_counter()
    model = get_backend(backend).load(DEFAULT_MODEL, device="cpu", dtype="float32")
    load_seconds = time.perf_counter() - start
    ids = prompt_ids(tokenizer_for(DEFAULT_MODEL), context)
    # no stop token; the state policy "drop" is what "auto" does for a cache the call makes itself
    options = dict(kv_policy="drop", state_policy="drop", stop_token_ids=[], stop_at_end_of_text=False)
    for _ in stream_generate(model, None, ids[:32], 8, plan_text, **options):  # warm-up: kernels, allocator
        pass
    plan = ModePlan.parse(plan_text)
    if source == "synthetic":
        cache = synthetic_context(backend, model, ids[:-1], plan, context + tokens)
        prompt, options = ids[-1:], dict(options, prompt_cache=cache)
    else:
        prompt = ids
    rss_before = status_kib("VmRSS")
    load_average = os.getloadavg()
    last, peak_reset = None, False
    for n, last in enumerate(stream_generate(model, None, prompt, tokens, plan_text, **options)):
        if n == 0:
            peak_reset = reset_peak_rss()
    decode_hwm = status_kib("VmHWM")
    stats = last.stats
    return {"backend": backend, "plan": plan_text, "context": context, "source": source,
            "tokens": stats.generation_tokens, "decode_tps": stats.generation_tps,
            "cache_mib": stats.cache_bytes / 2**20,
            "decode_rss_mib": decode_hwm / 1024 if peak_reset else None,
            "rss_before_mib": rss_before / 1024,
            "backend_peak_mib": stats.peak_memory_bytes / 2**20 if stats.peak_memory_bytes else None,
            "load_seconds": load_seconds, "load_average": [round(x, 2) for x in load_average + os.getloadavg()],
            "threads": threads(backend)}


def threads(backend: str) -> int | None:
    if backend == "torch":
        import torch

        return torch.get_num_threads()
    return None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for name in ("torch", "mlx", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = None
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def table(rows: list[dict]) -> str:
    lines = ["| backend | plan | context | decode tok/s | cache MiB | decode RSS MiB | MLX peak MiB | load avg (1 min) "
             "| context made |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['plan']} | {r['context']} | failed: {r['error'][:60]} | | | | "
                         f"| {r['source']} |")
            continue
        lines.append(f"| {r['backend']} | `{r['plan']}` | {r['context']} | {r['decode_tps']:.1f} | {r['cache_mib']:.1f} "
                     f"| {fmt(r['decode_rss_mib'], '.0f')} | {fmt(r['backend_peak_mib'], '.0f')} "
                     f"| {r['load_average'][0]:.2f} | {r['source']} |")
    return "\n".join(lines)


def pivot(rows: list[dict], source: str = "synthetic") -> str:
    """One row per plan and context, torch and MLX side by side (the table in docs/results.md), of the runs whose
    context was made the `source` way."""
    rows = [r for r in rows if r.get("source") == source]
    cell = {(r["backend"], r["plan"], r["context"]): r for r in rows if "error" not in r}
    contexts = sorted({r["context"] for r in rows})
    plans = [p for p in PLANS if any(k[1] == p for k in cell)] + sorted({k[1] for k in cell} - set(PLANS))
    lines = ["| plan | context | torch tok/s | torch cache MiB | torch RSS MiB | MLX tok/s | MLX cache MiB | MLX RSS MiB "
             "| MLX peak MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for plan in plans:
        for context in contexts:
            t, m = cell.get(("torch", plan, context)), cell.get(("mlx", plan, context))
            if t is None and m is None:
                continue
            part = lambda r, keys: [("" if r is None or r[k] is None else f"{r[k]:.{d}f}") for k, d in keys]  # noqa: E731
            lines.append("| " + " | ".join([f"`{plan}`", str(context),
                                            *part(t, [("decode_tps", 1), ("cache_mib", 1), ("decode_rss_mib", 0)]),
                                            *part(m, [("decode_tps", 1), ("cache_mib", 1), ("decode_rss_mib", 0),
                                                      ("backend_peak_mib", 0)])]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["torch", "mlx"], choices=["torch", "mlx"])
    p.add_argument("--plans", nargs="+", default=PLANS)
    p.add_argument("--contexts", nargs="+", type=int, default=CONTEXTS)
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    p.add_argument("--sources", nargs="+", default=["synthetic"], choices=["synthetic", "real"],
                   help="how the context is made: synthetic (default; see synthetic_context) or a real prompt")
    p.add_argument("--budget-minutes", type=float, default=None, help="start no run after this many minutes")
    p.add_argument("--out", help="write every run and the machine to this JSON file")
    p.add_argument("--pivot", metavar="FILE.json", help="print the side-by-side table of a written --out file")
    p.add_argument("--one", nargs=4, metavar=("BACKEND", "PLAN", "CONTEXT", "SOURCE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pivot:
        print(pivot(json.loads(Path(args.pivot).read_text())["runs"]))
        return 0
    if args.one:
        backend, plan, context, source = args.one
        print(json.dumps(run_one(backend, plan, int(context), args.tokens, source)))
        return 0
    info = machine()
    print(f"# {info['date']}, {info['cpu']}, {info['cores']} cores, commit {info['commit']}, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    rows, began = [], time.monotonic()
    # contexts outermost, so that a spent budget leaves whole shorter contexts; sources side by side
    runs = [(b, c, p, s) for c in args.contexts for b in args.backends for p in args.plans for s in args.sources]
    for backend, context, plan, source in runs:
        if args.budget_minutes is not None and time.monotonic() - began > 60 * args.budget_minutes:
            print(f"# budget spent: {backend} {plan} {context} {source} and later runs not started", flush=True)
            break
        done = subprocess.run([sys.executable, __file__, "--one", backend, plan, str(context), source,
                               "--tokens", str(args.tokens)], capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"backend": backend, "plan": plan, "context": context, "source": source,
                         "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    for source in args.sources:
        print(pivot(rows, source))
    if args.out:
        from oryx_core.atomic import atomic_write_bytes

        atomic_write_bytes(args.out, json.dumps({"machine": info, "command": " ".join(sys.argv), "tokens": args.tokens,
                                                 "runs": rows}, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
